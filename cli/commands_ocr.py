"""`dsocr ocr`: images or PDF pages -> text streamed to stdout (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dsocr.runtime.engine import DEFAULT_PROMPT
from dsocr.runtime.errors import InputError


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes", "on"):
        return True
    if v.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """Vision and decoding flags shared by `ocr` and `serve` (defaults come from config.toml)."""
    g = p.add_argument_group("vision")
    g.add_argument("--mode", choices=["tiny", "small", "base", "large", "gundam"])
    g.add_argument("--base-size", type=int)
    g.add_argument("--image-size", type=int)
    g.add_argument("--crop-mode", type=_bool, metavar="true|false")
    g.add_argument("--max-pixels", type=int, help="refuse larger images (decompression-bomb guard)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, help="at least 1")
    g.add_argument("--temperature", type=float, help=">= 0; 0 is greedy")
    g.add_argument("--top-p", type=float, help="0 to 1; 0 is greedy (only the likeliest token)")
    g.add_argument("--top-k", type=int, help=">= 0; 0 keeps every token")
    g.add_argument("--seed", type=int, help="sampling seed (< 0: random)")
    g.add_argument("--no-repeat-ngram-size", type=int, help="windowed n-gram blocking size (0 disables)")
    g.add_argument("--ngram-window", type=int, help=">= 0")
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, help="CPU threads, at least 1 (default: all cores; also DSOCR_THREADS)")
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--model", help="language-model GGUF, or a folder holding the pair")
    g.add_argument("--mmproj", help="vision GGUF (default: the mmproj-*.gguf beside the model)")
    g.add_argument("--config", help="config.toml (default: $DSOCR_CONFIG or the user config dir)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ocr", help="OCR images or PDF pages")
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image or PDF files")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image or PDF (repeatable)")
    pr = p.add_mutually_exclusive_group()
    pr.add_argument("--prompt", help=f"default: {DEFAULT_PROMPT!r}")
    pr.add_argument("--prompt-file", help="read the prompt from a file")
    p.add_argument("--pages", help="PDF pages, e.g. 1-3,7 (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--output-dir", help="write result.md, result.mmd, boxes.png and images/ there")
    add_inference_flags(p)
    p.set_defaults(run=cmd_ocr)


def cli_overrides(args) -> dict:
    inf = {k: getattr(args, k, None) for k in ("mode", "base_size", "image_size", "crop_mode", "max_new_tokens",
                                                "temperature", "top_p", "top_k", "seed", "no_repeat_ngram_size",
                                                "ngram_window", "threads", "device", "max_pixels")}
    return {"inference": inf, "models": {"model": getattr(args, "model", None), "mmproj": getattr(args, "mmproj", None)}}


def setting_name(args, settings, key: str) -> str:
    """Where inference.<key> came from, for error messages: its flag, its DSOCR_* variable or the config file."""
    from dsocr.cli.config import ENV
    if getattr(args, key, None) is not None:
        return "--" + key.replace("_", "-")
    env = [v for v, (section, k, _) in ENV.items() if (section, k) == ("inference", key) and os.environ.get(v)]
    return env[0] if env else f"inference.{key} in {settings.path}"


def _number(inf: dict, key: str, typ, name):
    try:
        return typ(inf[key])
    except (TypeError, ValueError):
        raise InputError(f"{name(key)} must be a number, not {inf[key]!r}") from None


def view_config(inf: dict, name=lambda key: key):
    from dsocr.runtime.preprocess import ViewConfig
    cfg = ViewConfig.from_mode(inf["mode"])
    if inf.get("base_size"):
        cfg.base_size = _number(inf, "base_size", int, name)
    if inf.get("image_size"):
        cfg.image_size = _number(inf, "image_size", int, name)
    if inf.get("crop_mode") not in ("", None):
        cfg.crop_mode = inf["crop_mode"] if isinstance(inf["crop_mode"], bool) else _bool(str(inf["crop_mode"]))
    cfg.validate()
    return cfg


def sampling_params(inf: dict, name=lambda key: key):
    """Decoding parameters from the merged settings, range-checked by SamplingParams.validate."""
    from dsocr.runtime.generate import SamplingParams
    n = _number(inf, "no_repeat_ngram_size", int, name)
    seed = _number(inf, "seed", int, name)
    params = SamplingParams(max_new_tokens=_number(inf, "max_new_tokens", int, name),
                            temperature=_number(inf, "temperature", float, name),
                            top_p=_number(inf, "top_p", float, name), top_k=_number(inf, "top_k", int, name),
                            seed=None if seed < 0 else seed, no_repeat_ngram_size=n,
                            ngram_window=_number(inf, "ngram_window", int, name), ngram_mode="window" if n > 0 else "off")
    params.validate(name)
    return params


def thread_count(args, inf: dict, name) -> int | None:
    """None: all cores. On the command line --threads is at least 1 (leave it out for all cores); in the
    config and DSOCR_THREADS 0 means all cores."""
    threads = _number(inf, "threads", int, name)
    least = 1 if args.threads is not None else 0
    if threads < least:
        raise InputError(f"{name('threads')} must be at least {least}, not {threads}")
    return threads or None


def checked_inference(args, settings):
    """(view config, sampling params, threads) from flags, environment and config, every range checked
    before any work; an error names the flag (or variable, or config key) the bad value came from."""
    inf = settings["inference"]

    def name(key):
        return setting_name(args, settings, key)
    return view_config(inf, name), sampling_params(inf, name), thread_count(args, inf, name)


def writable_dir(path: Path) -> Path:
    """Creates `path` and writes a scratch file there, so a bad --output-dir is refused before inference."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise InputError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None
    return path


def resolve_model(settings, progress: bool = True) -> tuple[Path, Path | None]:
    """--model / DSOCR_MODEL, else the configured active entry (pulled and converted once if missing)."""
    from dsocr.runtime.errors import ModelError
    m = settings["models"]
    if m.get("model"):
        return Path(m["model"]), Path(m["mmproj"]) if m.get("mmproj") else None
    entry = settings.active_entry()
    if not entry:
        raise ModelError(f"no --model given and no models.entries.{m.get('active')} in {settings.path}")
    d = settings.models_dir()
    lm = Path(entry.get("model", "")).expanduser()
    lm = lm if lm.is_absolute() else d / lm
    mm = Path(entry["mmproj"]).expanduser() if entry.get("mmproj") else None
    mm = mm if mm is None or mm.is_absolute() else d / mm
    if lm.is_file() and (mm is None or mm.is_file()):
        return lm, mm
    return bootstrap_default_model(entry, d, lm, mm, progress)


def bootstrap_default_model(entry: dict, models_dir: Path, lm: Path, mm: Path | None, progress: bool):
    """First run: pull the checkpoint and convert it (Q8_0 language model, F16 mmproj) into models_dir."""
    from dsocr.convert import ConvertError, DEFAULT_REPO, convert_checkpoint, pull
    from dsocr.convert.hub import offline
    from dsocr.runtime.errors import ModelError
    repo = entry.get("repo", DEFAULT_REPO)
    hint = ("pass --model PATH (a language-model GGUF or a folder with the GGUF pair), or convert a local "
            "checkpoint with `dsocr convert CHECKPOINT -o MODELS_DIR`")
    if offline():
        raise ModelError(f"no model at {lm} and HF_HUB_OFFLINE is set: {hint}")
    print(f"dsocr: first run: fetching {repo} and converting it into {models_dir} (once)", file=sys.stderr)
    try:
        folder = pull(repo, progress=progress)
        files = convert_checkpoint(folder, models_dir, "q8_0", "f16", name=lm.stem.rsplit("-", 1)[0],
                                   progress=progress)
    except ConvertError as e:
        raise ModelError(f"no model at {lm} ({e}); {hint}") from None
    return files[0].path, files[1].path


class VisionProgress:
    """One progress line on stderr while the views are encoded."""

    def __init__(self, label: str):
        self.label, self.t0, self.tty = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        msg = f"dsocr: {self.label}vision {done}/{total} views, {time.perf_counter() - self.t0:.1f} s"
        print(("\r" + msg) if self.tty else msg, file=sys.stderr, end="" if self.tty and done < total else "\n",
              flush=True)


def expand_inputs(paths: list[str], pages: str | None, max_pixels: int):
    """[(label, [PIL images])]: image files go together in one request, a PDF gives one per page."""
    from dsocr.runtime.pdf import is_pdf, render_pages
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
        return [(f"page {n}", [img]) for n, img in render_pages(pdfs[0], pages, max_pixels)], True
    if pages:
        raise InputError("--pages applies to PDF input")
    return [("", [read_image_file(p, max_pixels) for p in paths])], False


def cmd_ocr(args) -> int:
    from dsocr.cli.config import ConfigError, load_settings
    from dsocr.runtime.engine import OcrEngine, OcrRequest
    from dsocr.runtime.generate import GenerationResult
    try:
        settings = load_settings(args.config, cli_overrides(args))
    except ConfigError as e:
        raise InputError(str(e)) from None
    inf = settings["inference"]
    view, sampling, threads = checked_inference(args, settings)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.prompt_file}: cannot read the prompt ({e})") from None
    docs, paged = expand_inputs(list(args.inputs) + list(args.image), args.pages, int(inf["max_pixels"]))
    outdir = writable_dir(Path(args.output_dir)) if args.output_dir else None
    lm, mm = resolve_model(settings)
    engine = OcrEngine(lm, mm, device=inf["device"], threads=threads)
    results = []
    for i, (label, images) in enumerate(docs):
        if paged and not args.json:
            print(("\n\n" if i else "") + f"<!-- {label} -->\n", end="", flush=True)
        result = GenerationResult()
        req = OcrRequest(images, prompt, view, sampling)
        progress = VisionProgress(f"{label}: " if label else "")
        for delta in engine.stream(req, result, progress=progress):
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
        results.append((label, images, result))
        if outdir:
            from dsocr.runtime.grounding import save_outputs
            save_outputs(outdir / label.replace(" ", "-") if paged else outdir, images[0], result.text)
    if not args.json:
        print()
    if paged and outdir:
        joined = "\n\n".join(f"<!-- {label} -->\n" + (outdir / label.replace(" ", "-") / "result.md").read_text()
                             for label, _, _ in results)
        (outdir / "result.md").write_text(joined, encoding="utf-8")
    if args.json:
        print(json.dumps(json_report(results, paged), ensure_ascii=False))
    return 0


def result_object(result) -> dict:
    t = result.timings
    return {"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason,
            "timings": {k: round(v, 4) for k, v in t.items()}}


def json_report(results, paged: bool) -> dict:
    if not paged:
        return result_object(results[0][2])
    pages = [{"page": int(label.split()[1]), **result_object(r)} for label, _, r in results]
    return {"text": "\n\n".join(p["text"] for p in pages), "pages": pages,
            "prompt_tokens": sum(p["prompt_tokens"] for p in pages),
            "completion_tokens": sum(p["completion_tokens"] for p in pages),
            "finish_reason": pages[-1]["finish_reason"]}
