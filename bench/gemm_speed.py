"""Many-row products of quantized weights, kernel by kernel: the int8 GEMM (runtime/cpu/qgemm.py)
against what it replaced (dequantize a chunk to float32 + BLAS) and against BLAS sgemm on float32
weights of the same shape (the fp32 ceiling), measured in the same run, all threads, the best of
--reps after a warm-up. Shapes are the model's: the LM's prefill products at 300 tokens, one routed
expert's share of them (6 x 300 / 64 rows), and SAM's at a 640 view (1600 tokens).

    python bench/gemm_speed.py [--types q8_0,q4_k,q6_k,q5_0] [--reps 5] [--json]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse
import json
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.runtime.cpu import matmul as mm, qgemm

SHAPES = {            # name: (m, n, k)
    "lm attn 300": (300, 1280, 1280),
    "lm expert 28": (28, 896, 1280),
    "lm expert down 28": (28, 1280, 896),
    "sam qkv 1600": (1600, 2304, 768),
    "sam mlp 1600": (1600, 3072, 768),
}


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q8_0,q4_k,q6_k,q5_0")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tasks = 8 * numba.get_num_threads()
    rows = []
    for name in a.types.split(","):
        qtype = QT[name.upper()]
        block = 256 if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
        for shape, (m, n, k) in SHAPES.items():
            if k % block:
                continue              # llama.cpp's files use a legacy type there
            w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            raw = quant.quantize(w, qtype)
            x = rng.standard_normal((m, k)).astype(np.float32)
            out = np.empty((m, n), np.float32)
            deq = mm.Dequantizer()
            flops = 2.0 * m * n * k
            t_q = best(lambda: qgemm.qgemm(int(qtype), raw, x, out, tasks), a.reps)
            t_d = best(lambda: mm.gemm(int(qtype), raw, x, out, deq), a.reps)
            t_s = best(lambda: np.matmul(x, w.T, out=out), a.reps)
            rows.append({"type": name, "shape": shape, "m": m, "n": n, "k": k,
                         "qgemm_gflops": round(flops / t_q / 1e9, 1), "dequant_blas_gflops": round(flops / t_d / 1e9, 1),
                         "sgemm_gflops": round(flops / t_s / 1e9, 1), "qgemm_vs_sgemm": round(t_s / t_q, 2),
                         "qgemm_vs_dequant_blas": round(t_d / t_q, 2)})
    if a.json:
        print(json.dumps({"threads": numba.get_num_threads(), "results": rows}))
        return
    cols = list(rows[0])
    print(f"threads {numba.get_num_threads()}")
    print("  ".join(f"{c:>21}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>21}" for c in cols))


if __name__ == "__main__":
    main()
