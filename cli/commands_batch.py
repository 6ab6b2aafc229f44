"""`dsocr batch`: whole collections of images and PDFs into one output folder, every page exactly once,
resumable after a crash (the pieces are in batch/: inputs, run, store)."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

from dsocr.cli.commands_ocr import add_inference_flags, add_prompt_flags, checked_inference, chosen_prompt, cli_overrides
from dsocr.runtime.errors import InputError

EXIT_PAGES_FAILED = 1     # the run finished; some pages are recorded as failed
EXIT_STOPPED = 2          # bad flags, inputs, model or output folder (before any page), or the run could not go on

BATCH_EXAMPLES = """\
examples:
  dsocr batch scans/ -o out                   every image and PDF under scans/; out/results.jsonl, out/<name>.md
  dsocr batch 'archive/**/*.pdf' list.txt -o out   a glob and a manifest (one path per line)
  dsocr batch scans/ -o out                   again after a crash: the pages without a record are done
  dsocr batch scans/ -o out --no-resume -q    every page again, nothing on stderr

exit status: 0 every page OCR'd, 1 some pages failed (their records say why), 2 nothing was done
(bad flags, inputs, model or output folder)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="OCR folders, globs and lists of images and PDFs into an output folder",
                       description="OCR images and PDFs, every page exactly once, into an output folder: per page\n"
                       "the files `dsocr ocr -o` writes, per document <name>.md, and results.jsonl with one record\n"
                       "per page. A rerun into the same folder resumes: pages with a record are skipped.",
                       epilog=BATCH_EXAMPLES)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, PDFs, folders (searched recursively), "
                   "globs, manifests (.txt: a path per line; .jsonl: a \"path\" per line)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="where results go (created)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the pages DIR/results.jsonl has a record of (default); --no-resume removes an "
                   "earlier run's results there first and does every page")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="tries after the first for a page that fails or stops at the token limit (default: 1)")
    p.add_argument("--retry-temperature", type=float, default=0.2, metavar="T",
                   help="added to the temperature at each retry, to get a looping page out of its loop (default: 0.2)")
    add_prompt_flags(p)
    g = p.add_argument_group("ray (pip install -e \".[ray]\")")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="OCR on Ray actors: alone, a local Ray instance started here; with an address (e.g. "
                   "ray://head:10001 or auto), that cluster. The model files and inputs must exist at the same "
                   "paths on every node")
    g.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, each holding one engine "
                   "(default: 1); each takes --threads CPUs (default: this machine's cores / N)")
    add_inference_flags(p)
    p.set_defaults(run=cmd_batch, error_status=EXIT_STOPPED)


def cmd_batch(args) -> int:
    from tqdm import tqdm

    from dsocr.batch.inputs import expand_inputs, page_units
    from dsocr.batch.run import RetryPolicy, ocr_units
    from dsocr.batch.store import OutputFolder
    from dsocr.cli.config import load_settings
    from dsocr.cli.models import resolve_model
    from dsocr.cli.output import compile_notice
    from dsocr.runtime.engine import OcrEngine, find_model_pair
    from dsocr.runtime.vision import read_layout
    settings = load_settings(args.config, cli_overrides(args))
    inf = settings["inference"]
    inference, sampling, threads = checked_inference(settings)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, not {args.workers}")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise InputError('--ray needs Ray: pip install -e ".[ray]" (or pip install ray)')
    if args.retries < 0:
        raise InputError(f"--retries must be at least 0, not {args.retries}")
    if not 0 <= args.retry_temperature < math.inf:
        raise InputError(f"--retry-temperature must be a finite number >= 0, not {args.retry_temperature}")
    prompt = chosen_prompt(args)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"dsocr: {msg}", file=sys.stderr, flush=True))
    outdir = Path(args.output_dir)
    documents = expand_inputs(args.inputs, exclude=outdir)
    units = page_units(documents)
    store = OutputFolder(outdir, documents, resume=args.resume)
    try:
        lm, mm = find_model_pair(*resolve_model(settings, progress=not args.quiet))
        view = inference.view(layout=read_layout(mm))
        model = {"lm": {"file": lm.name, "sha256": store.sha256(lm)},
                 "mmproj": {"file": mm.name, "sha256": store.sha256(mm)}}
        store.check_model(model)
        todo = store.pending(units)
        say(f"{len(units)} pages in {len(documents)} documents: {len(units) - len(todo)} done already, "
            f"{len(todo)} to do")
        if todo:
            run_args = {"model": model, "view": view, "sampling": sampling, "prompt": prompt,
                        "policy": RetryPolicy(args.retries, args.retry_temperature), "max_pixels": inf["max_pixels"]}
            with compile_notice(enabled=not args.quiet):
                if args.ray is not None:
                    from dsocr.batch.ray_run import RayCluster, ray_outcomes
                    cluster = RayCluster(args.ray or None, args.workers,
                                         threads or max(1, (os.cpu_count() or 1) // args.workers))
                    outcomes = ray_outcomes(todo, cluster, {"model": str(lm), "mmproj": str(mm), "device": inf["device"],
                                                            "parallel": inf["parallel"]}, run_args, say)
                else:
                    engine = OcrEngine(lm, mm, device=inf["device"], threads=threads, parallel=inf["parallel"])
                    outcomes = ocr_units(engine, todo, **run_args)
                failed_now = 0
                with tqdm(total=len(units), initial=len(units) - len(todo), unit="page", file=sys.stderr,
                          disable=args.quiet, dynamic_ncols=True) as bar:
                    for outcome in outcomes:
                        store.commit(outcome)
                        failed_now += outcome.record["failed"]
                        if failed_now:
                            bar.set_postfix_str(f"{failed_now} failed", refresh=False)
                        bar.update()
        failed = store.failed(units)
    finally:
        store.close()
    say(f"{len(units) - failed} pages ok, {failed} failed" + (f" (their records in {outdir / 'results.jsonl'} say "
                                                              f"why)" if failed else ""))
    return EXIT_PAGES_FAILED if failed else 0
