"""`dsocr ocr`: images or PDF pages -> text streamed to stdout (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from dsocr.cli.config import Inference
from dsocr.cli.output import RunOutputs, compile_notice, table_text
from dsocr.runtime.engine import DEFAULT_PROMPT, PROMPTS
from dsocr.runtime.errors import InputError
from dsocr.runtime.grounding import save_outputs
from dsocr.runtime.pdf import PAGE_SEPARATOR, page_heading
from dsocr.runtime.preprocess import LAYOUTS, MODE_NAMES, ViewConfig, candidate_grids, image_token_count


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes", "on"):
        return True
    if v.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """Vision and decoding flags shared by `ocr` and `serve` (defaults come from config.toml)."""
    g = p.add_argument_group("vision")
    g.add_argument("--mode", choices=MODE_NAMES, help="view sizes, see `modes` below")
    g.add_argument("--base-size", type=int, metavar="PX", help="global view side in pixels (0: the mode's)")
    g.add_argument("--image-size", type=int, metavar="PX", help="tile side in pixels (0: the mode's)")
    g.add_argument("--crop-mode", type=_bool, metavar="true|false", help="cut tiles (unset: the mode's)")
    g.add_argument("--max-pixels", type=int, metavar="N", help="refuse larger images (decompression-bomb guard)")
    g = p.add_argument_group("decoding")
    g.add_argument("-n", "--max-new-tokens", type=int, metavar="N", help="the most tokens to generate, at least 1")
    g.add_argument("--temperature", type=float, metavar="T", help=">= 0; 0 is greedy")
    g.add_argument("--top-p", type=float, metavar="P", help="0 to 1; 0 is greedy (only the likeliest token)")
    g.add_argument("--top-k", type=int, metavar="K", help=">= 0; 0 keeps every token")
    g.add_argument("--seed", type=int, metavar="N", help="sampling seed (< 0: random)")
    g.add_argument("--no-repeat-ngram-size", type=int, metavar="N", help="windowed n-gram blocking size (0 disables)")
    g.add_argument("--ngram-window", type=int, metavar="N", help=">= 0")
    g = p.add_argument_group("runtime")
    g.add_argument("-t", "--threads", type=int, metavar="N",
                   help="CPU threads, at least 1 (0 in config.toml or DSOCR_THREADS: all cores)")
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--parallel", type=int, metavar="N", help="sequences decoded together, at least 1: a run's pages, "
                   "a server's requests")
    g.add_argument("-m", "--model", metavar="PATH", help="language-model GGUF, or a folder holding the pair (default: "
                   "the models.active entry of config.toml, fetched and converted on first use)")
    g.add_argument("--mmproj", metavar="PATH", help="vision GGUF (default: the mmproj-*.gguf beside the model)")
    g.add_argument("--config", metavar="FILE", help="config.toml (default: $DSOCR_CONFIG or the user config dir)")


def modes_help() -> str:
    """What each --mode means: its views and the prompt tokens one image takes (as the context counts them)."""
    rows = []
    for layout in LAYOUTS.values():
        for name, (base, size, crop) in layout.modes.items():
            view = ViewConfig(base, size, crop, layout)
            whole = image_token_count(view, (1, 1))
            if crop:
                tiled = [image_token_count(view, grid) for grid in candidate_grids(layout.min_crops, layout.max_crops)]
                rows.append([layout.model, name, f"{base}x{base} global view + {layout.min_crops}-{layout.max_crops} "
                             f"{size}x{size} tiles", f"{min(tiled)}-{max(tiled)} tokens ({whole} when the image "
                             "fits one tile)"])
            else:
                side = base if layout.nocrop_pad_to_base else size
                rows.append([layout.model, name, f"{side}x{side} view, no tiles"
                             + (f" (the image squashed to {size}x{size} first)" if side != size else ""),
                             f"{whole} tokens"])
    return "modes (views, and the prompt tokens one image takes):\n" + table_text(rows, indent="  ")


def tasks_help() -> str:
    rows = [[f"--task {t}" if t != "locate" else "--locate TEXT", json.dumps(p.replace("{}", "TEXT"))]
            for t, p in PROMPTS.items()]
    rows[0][1] += "  (the default)"
    return "prompts (the official ones; --prompt TEXT or --prompt-file FILE for any other):\n" + \
        table_text(rows, indent="  ")


OCR_EXAMPLES = """\
examples:
  dsocr ocr page.png                          markdown with layout tags, streamed to stdout
  dsocr ocr scan.pdf --pages 1-3 -o out       PDF pages; out/result.md, per page boxes.png and crops
  dsocr ocr photo.jpg --task free -q          plain text only, nothing on stderr
  dsocr ocr form.png --locate "the total"     boxes of one thing
  dsocr ocr page.png --json --mode base       one JSON object: text, regions, tokens, timings
  dsocr ocr page.png -m models/ -n 2048 -t 4  the pair in models/, at most 2048 tokens, 4 threads"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ocr", help="OCR images or PDF pages", description="OCR images or PDF pages: text to "
                       "stdout (or --json), progress on stderr.",
                       epilog="\n\n".join([modes_help(), tasks_help(), OCR_EXAMPLES]))
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image or PDF files")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image or PDF (repeatable)")
    add_prompt_flags(p)
    p.add_argument("--pages", metavar="RANGES", help="PDF pages, e.g. 1-3,7 (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="write result.md, result.mmd, boxes.png and images/ "
                   "there (what an earlier run wrote there is removed first)")
    add_inference_flags(p)
    p.set_defaults(run=cmd_ocr)


def cli_overrides(args) -> dict:
    inf = {k: getattr(args, k, None) for k in Inference.model_fields}      # a flag has its setting's name
    return {"inference": inf, "models": {"model": getattr(args, "model", None), "mmproj": getattr(args, "mmproj", None)}}


def thread_count(settings) -> int | None:
    """None: all cores. On the command line --threads is at least 1 (leave it out for all cores); in the
    config and DSOCR_THREADS 0 means all cores."""
    threads = settings["inference"]["threads"]
    least = 1 if settings.source("inference", "threads") == "flag" else 0
    if threads < least:
        raise InputError(f"{settings.where('inference', 'threads')} must be at least {least}, not {threads}")
    return threads or None


def checked_inference(settings):
    """(inference settings, sampling params, threads) from flags, environment and config (their types
    already checked by load_settings), every range checked before any work; an error names the flag (or
    variable, or config key) the bad value came from. The views depend on the model: once its mmproj is
    known, `inference.view(layout=read_layout(mmproj))` gives them (before its weights load)."""
    inf = Inference(**settings["inference"])
    inf.check_mode()
    sampling = inf.sampling()
    sampling.validate(lambda key: settings.where("inference", key))
    return inf, sampling, thread_count(settings)


def writable_dir(path: Path) -> Path:
    """Creates `path` and writes a scratch file there, so a bad --output-dir is refused before inference."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise InputError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None
    return path


class VisionProgress:
    """One progress line on stderr while the views are encoded."""

    def __init__(self, label: str):
        self.label, self.t0, self.tty = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        msg = f"dsocr: {self.label}vision {done}/{total} views, {time.perf_counter() - self.t0:.1f} s"
        print(("\r" + msg) if self.tty else msg, file=sys.stderr, end="" if self.tty and done < total else "\n",
              flush=True)


@contextmanager
def run_requests(paths: list[str], pages: str | None, max_pixels: int):
    """The run's requests, (page number, [PIL images]): image files go together in one request (page
    None); a PDF gives one per page, checked when opened (before any work) and rendered as its turn comes."""
    from dsocr.runtime.pdf import PdfPages, is_pdf
    from dsocr.runtime.preprocess import read_image_file
    if not paths:
        raise InputError("no image given (dsocr ocr IMAGE or --image FILE)")
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"{p}: no such file")
    pdfs = [p for p in paths if is_pdf(p)]
    if pdfs:
        if len(paths) > 1:
            raise InputError("give a PDF on its own (its pages are OCR'd one by one)")
        with PdfPages(pdfs[0], pages, max_pixels) as pdf:
            yield ((number, [image]) for number, image in pdf)
        return
    if pages:
        raise InputError("--pages applies to PDF input")
    yield [(None, [read_image_file(p, max_pixels) for p in paths])]


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """--prompt, --prompt-file, --task, --locate: one of them (`ocr` and `batch`); chosen_prompt reads them."""
    pr = p.add_mutually_exclusive_group()
    pr.add_argument("-p", "--prompt", metavar="TEXT", help="the prompt (default: --task markdown's)")
    pr.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    pr.add_argument("--task", choices=[t for t in PROMPTS if t != "locate"], help="an official prompt (see "
                    "`dsocr ocr --help`)")
    pr.add_argument("--locate", metavar="TEXT", help="find TEXT in the image (the official locate prompt)")


def chosen_prompt(args) -> str:
    """--prompt, --prompt-file, --task or --locate (argparse lets one through), else the default."""
    if args.prompt is not None:
        return args.prompt
    if args.task:
        return PROMPTS[args.task]
    if args.locate is not None:
        return PROMPTS["locate"].format(args.locate)
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.prompt_file}: cannot read the prompt ({e})") from None
    return DEFAULT_PROMPT


def cmd_ocr(args) -> int:
    from dsocr.cli.config import load_settings
    from dsocr.cli.models import resolve_model
    from dsocr.engine import Engine
    from dsocr.result import OcrResult
    from dsocr.runtime.engine import OcrRequest, find_model_pair
    from dsocr.runtime.generate import GenerationResult
    from dsocr.runtime.vision import read_layout
    settings = load_settings(args.config, cli_overrides(args))
    inference, sampling, _ = checked_inference(settings)
    prompt = chosen_prompt(args)
    inputs = list(args.inputs) + list(args.image)
    with run_requests(inputs, args.pages, settings["inference"]["max_pixels"]) as requests:
        outdir = writable_dir(Path(args.output_dir)) if args.output_dir else None
        outputs = RunOutputs(outdir) if outdir else None
        lm, mm = resolve_model(settings, progress=not args.quiet)
        view = inference.view(layout=read_layout(find_model_pair(lm, mm)[1]))
        results = []
        with compile_notice(enabled=not args.quiet):
            engine = Engine(settings, lm, mm).ocr_engine
            if outputs:
                outputs.clear_previous()      # only once the model loaded: a refused run leaves the last results

            def submit(request):
                page, images = request
                progress = None if args.quiet else VisionProgress("" if page is None else f"page {page}: ")
                return engine.submit(OcrRequest(images, prompt, view, sampling), GenerationResult(), progress=progress)

            # `parallel` pages at a time decode together, the next rendered when the first of them is done
            for (page, images), seq in engine.scheduler.submit_ahead(requests, submit):
                if page is not None and not args.json:
                    print((PAGE_SEPARATOR if results else "") + page_heading(page), end="", flush=True)
                for delta in engine.scheduler.stream(seq):
                    if not args.json:
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                results.append(OcrResult.of(seq.result, *images[0].size, page=page))
                if outputs:
                    outputs.add(save_outputs(outdir if page is None else outdir / page_folder(page), images[0], seq.result.text))
    if not args.json:
        print()
    if results[0].page is not None and outputs:
        joined = PAGE_SEPARATOR.join(page_heading(r.page) + (outdir / page_folder(r.page) / "result.md").read_text()
                                     for r in results)
        (outdir / "result.md").write_text(joined, encoding="utf-8")
        outputs.add([outdir / "result.md"])
    if args.json:
        print(json.dumps(json_report(results, inputs), ensure_ascii=False))
    return 0


def page_folder(page: int) -> str:
    return f"page-{page}"


def json_report(results, inputs: list[str]) -> dict:
    """The run's JSON object from its OcrResults: the request's, or for a PDF, its pages' and their totals."""
    if results[0].page is None:
        return {"inputs": inputs, **results[0].record()}
    pages = [{"page": r.page, **r.record()} for r in results]
    return {"inputs": inputs, "text": PAGE_SEPARATOR.join(r.text for r in results), "pages": pages,
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
            "finish_reason": results[-1].finish_reason}
