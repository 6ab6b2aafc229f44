"""Quantize / dequantize throughput per ggml format: dsocr's numba path against the numpy
reference (gguf.quants, or devtools/kquant_reference.py for the K-quant quantizers gguf lacks),
measured in the same run on the same N(0,1) rows of 4096 weights. MB/s counts float32 bytes.
The numba path writes into a reused buffer, as the runtime does: a fresh 64 MB array costs
more in first-touch page faults (about 3 us a page on a VM) than the conversion itself.

    python bench/quant_speed.py [--mb 64] [--json]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from dsocr import quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (devtools/ on sys.path)
from devtools import kquant_reference as reference  # noqa: E402

FORMATS = [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def numpy_quantize(qtype):
    if qtype == QT.F16:
        return lambda x: x.astype(np.float16)
    if int(qtype) in reference.REFERENCE_QUANTIZERS:
        return reference.REFERENCE_QUANTIZERS[int(qtype)]
    return lambda x: gguf.quants.quantize(x, qtype)


def best_rate(fn, arg, mbytes, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t)
    return mbytes / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64, help="MB of float32 per numba measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = max(1, int(args.mb * 2 ** 20 / 4 / 4096))
    x = rng.standard_normal((rows, 4096), dtype=np.float32)
    x_ref = x[: max(1, rows // 16)]          # the numpy references are slow: a sixteenth of the data
    mb, mb_ref = x.nbytes / 2 ** 20, x_ref.nbytes / 2 ** 20
    t = time.perf_counter()
    for q in FORMATS:                        # compile (or load from cache) outside the timings
        quant.dequantize(quant.quantize(x[:1], q), q)
    jit_s = time.perf_counter() - t
    results = []
    for q in FORMATS:
        raw = quant.quantize(x, q)
        raw_ref = raw[: x_ref.shape[0]]
        back = np.empty_like(x)
        row = {"type": q.name,
               "quantize_mb_s": best_rate(lambda a: quant.quantize(a, q, out=raw), x, mb, 3),
               "quantize_ref_mb_s": best_rate(numpy_quantize(q), x_ref, mb_ref, 2),
               "dequantize_mb_s": best_rate(lambda a: quant.dequantize(a, q, out=back), raw, mb, 3),
               "dequantize_ref_mb_s": best_rate(lambda a: gguf.quants.dequantize(a, q), raw_ref, mb_ref, 2)}
        row["quantize_speedup"] = row["quantize_mb_s"] / row["quantize_ref_mb_s"]
        row["dequantize_speedup"] = row["dequantize_mb_s"] / row["dequantize_ref_mb_s"]
        results.append(row)
    import numba
    out = {"threads": numba.get_num_threads(), "mb": mb, "jit_or_cache_load_s": jit_s, "results": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{numba.get_num_threads()} threads, {mb:.0f} MB float32 per run; first call (JIT or cache load) {jit_s:.2f} s")
    print(f"{'type':6} {'quant MB/s':>11} {'numpy ref':>10} {'x':>6}   {'dequant MB/s':>12} {'numpy ref':>10} {'x':>6}")
    for r in results:
        print(f"{r['type']:6} {r['quantize_mb_s']:11.0f} {r['quantize_ref_mb_s']:10.1f} {r['quantize_speedup']:6.1f}   "
              f"{r['dequantize_mb_s']:12.0f} {r['dequantize_ref_mb_s']:10.0f} {r['dequantize_speedup']:6.1f}")


if __name__ == "__main__":
    main()
