"""`dsocr batch` on one PDF: pages per minute, and peak RSS by page count (it must not grow with the
number of pages: pages are rendered one at a time and at most --parallel are held).

The PDFs are made here with Pillow from the tiny fixture's page images (cycled), at 72 dpi, so each
page renders at 144 dpi to 1000x720 to 1600x2200 pixels. Each run is its own `dsocr batch` process
into a fresh output folder; its wall time includes start-up (imports, loading the model, numba's
cache), its peak RSS comes from wait4. The PDFs and the model are made in a process of their own: a
spawned process starts from its parent's peak RSS (Linux carries the high-water mark over vfork + exec),
so this one stays small. The default model is the tiny random-weight fixture (converted
here once, f32), which never stops early, so every page decodes --max-new-tokens tokens and, with
--retries 0, is tried once.

    python bench/batch_speed.py [--pages 20,200] [--model PATH] [--mode tiny] [-n 64] [--parallel 4] [--json]
    python bench/batch_speed.py --pages 20 --ray --workers 2     # through a local Ray instance started by the run

With --ray the wall time includes starting Ray and its actors, and the peak RSS is the driver's
only (the actors are the raylet's children).
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, run_measured  # noqa: E402

TINY = REPO / "tests" / "fixtures" / "tiny-dsocr"
PAGE_IMAGES = [TINY / "images" / n for n in ("small_note.png", "wide_line.png", "doc_portrait.png")]


def make_pdf(path: Path, pages: int) -> Path:
    sources = [Image.open(p).convert("RGB") for p in PAGE_IMAGES]
    images = [sources[i % len(sources)].copy() for i in range(pages)]    # copies: Pillow remembers appended pages
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


def tiny_model(folder: Path) -> Path:
    from dsocr.convert import convert_checkpoint
    return convert_checkpoint(TINY, folder, "f32", "f32", progress=False)[0].path


def prepare(folder: Path, pages: list[int], model: str | None) -> None:
    """The PDFs (doc-N.pdf) and, without `model`, the tiny model under `folder`; prints the model's path."""
    for n in pages:
        make_pdf(folder / f"doc-{n}.pdf", n)
    print(model or tiny_model(folder / "model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)     # the worker that makes the inputs
    ap.add_argument("--pages", default="20,200", help="page counts, one PDF and one run each")
    ap.add_argument("--model", help="language-model GGUF (its mmproj beside it); default: the tiny fixture")
    ap.add_argument("--mode", default="tiny")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ray", action="store_true", help="run through `--ray` (a local Ray instance)")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors with --ray")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(v) for v in args.pages.split(",")]
    if args.prepare:
        prepare(Path(args.prepare), counts, args.model)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep = [sys.executable, __file__, "--prepare", str(tmp), "--pages", args.pages]
        model = run_measured(prep + (["--model", args.model] if args.model else []))[0].strip().splitlines()[-1]
        for n in counts:
            pdf = tmp / f"doc-{n}.pdf"
            out = tmp / f"out-{n}"
            cmd = [sys.executable, "-m", "dsocr.cli.main", "batch", str(pdf), "-o", str(out), "-m", str(model),
                   "--mode", args.mode, "-n", str(args.max_new_tokens), "--parallel", str(args.parallel),
                   "--retries", "0", "-q"] + (["--ray", "--workers", str(args.workers)] if args.ray else [])
            _, _, wall_s, rss_mb = run_measured(cmd, ok_status=(0, 1))     # 1: pages at the token limit
            records = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
            if len(records) != n:
                raise SystemExit(f"{n}-page run wrote {len(records)} records")
            rows.append({"pages": n, "wall_s": round(wall_s, 2), "pages_per_min": round(n / wall_s * 60, 1),
                         "peak_rss_mb": round(rss_mb, 1)})
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # under every child's figure
    if args.json:
        print(json.dumps({"bench_process_peak_rss_mb": round(floor_mb, 1), "model": str(args.model or "tiny fixture (f32)"), "mode": args.mode,
                          "max_new_tokens": args.max_new_tokens, "parallel": args.parallel,
                          "ray_workers": args.workers if args.ray else None, "rows": rows}))
        return
    print(f"dsocr batch{' --ray --workers %d' % args.workers if args.ray else ''}, one PDF, "
          f"{args.model or 'tiny fixture (f32)'}, --mode {args.mode}, "
          f"-n {args.max_new_tokens}, --parallel {args.parallel} (wall time includes start-up; no figure is below "
          f"this process's own peak RSS, {floor_mb:.0f} MB)")
    for r in rows:
        print(f"  {r['pages']:>4} pages: {r['wall_s']:7.2f} s  {r['pages_per_min']:7.1f} pages/min  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB")
    if len(rows) > 1:
        print(f"  peak RSS {rows[-1]['pages']} vs {rows[0]['pages']} pages: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
