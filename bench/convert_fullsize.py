"""Full-size conversion: peak RSS and wall time of `dsocr convert` per output type on a
checkpoint with the real shapes (3.3 B parameters, 6.7 GB bf16) and random weights.

The checkpoint is generated once under models/bench/fullsize-hf (shapes from the real
config.json and all 2710 names of the real index; --model ocr2: DeepSeek-OCR-2's 2707 under
models/bench/fullsize-ocr2-hf, 3.4 B parameters). Each conversion runs in its own process;
its peak RSS comes from wait4(). Target: peak RSS <= 1.5 GB.

    python bench/convert_fullsize.py [--model ocr1|ocr2] [--outtypes f16,q8_0,q4_k_m] [--json] [--keep]
"""
import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_MODELS, REPO  # noqa: E402  (and devtools/ on sys.path)


def ensure_checkpoint(folder: Path, model: str) -> float:
    """Generate the random full-size checkpoint if needed; returns seconds spent."""
    if (folder / "model.safetensors.index.json").is_file():
        return 0.0
    from devtools.synthetic import write_random_checkpoint
    t = time.perf_counter()
    write_random_checkpoint(folder, *REAL_MODELS[model], seed=0)
    return time.perf_counter() - t


def convert_child(src: Path, outdir: Path, outtype: str) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MB) of one `dsocr convert` in its own process."""
    cmd = [sys.executable, "-m", "dsocr.cli.main", "convert", str(src), "-o", str(outdir),
           "--outtype", outtype, "--mmproj-outtype", "f16" if outtype != "q8_0" else "q8_0", "--no-progress"]
    t = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, dict(os.environ),
                         file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(REAL_MODELS), default="ocr1",
                    help="DeepSeek-OCR (ocr1) or DeepSeek-OCR-2 (ocr2)")
    ap.add_argument("--outtypes", default="f16,q8_0,q4_k_m")
    ap.add_argument("--models", default=str(REPO / "models" / "bench"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the converted files")
    args = ap.parse_args()
    models = Path(args.models)
    prefix = "fullsize" if args.model == "ocr1" else f"fullsize-{args.model}"
    src = models / f"{prefix}-hf"
    gen_s = ensure_checkpoint(src, args.model)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    results = []
    for outtype in args.outtypes.split(","):
        outdir = models / f"{prefix}-{outtype}"
        shutil.rmtree(outdir, ignore_errors=True)
        rc, wall, rss = convert_child(src, outdir, outtype)
        files = {p.name: p.stat().st_size for p in outdir.glob("*.gguf")} if rc == 0 else {}
        results.append({"outtype": outtype, "ok": rc == 0, "wall_s": round(wall, 1), "peak_rss_mb": round(rss),
                        "rss_target_mb": 1536, "files": files,
                        "mb_per_s": round(size / 2 ** 20 / wall, 1)})
        if not args.keep:
            shutil.rmtree(outdir, ignore_errors=True)
    out = {"checkpoint_bytes": size, "generated_in_s": round(gen_s, 1), "results": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"full-size random checkpoint: {size / 2**30:.2f} GiB bf16 (generated in {gen_s:.0f} s this run)")
    print(f"{'outtype':8} {'ok':3} {'wall s':>7} {'MB/s in':>8} {'peak RSS MB':>12}  files")
    for r in results:
        names = ", ".join(f"{n} {s / 2**30:.2f} GiB" for n, s in r["files"].items())
        print(f"{r['outtype']:8} {'yes' if r['ok'] else 'NO':3} {r['wall_s']:7.1f} {r['mb_per_s']:8.1f} "
              f"{r['peak_rss_mb']:12d}  {names}")


if __name__ == "__main__":
    main()
