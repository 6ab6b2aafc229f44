"""Language-model speed at full size: decode and prefill tokens/s against rooflines measured in
the same run, and peak RSS.

A full-size language model with random weights (real hparams: 12 layers, 64 experts) is written
once per type under models/bench/ by the converter's own code. Each type then runs in its own
process (peak RSS from wait4): load by mmap, warm up (JIT cache, page faults), prefill a
300-token prompt, decode 32 tokens.

Baselines measured here, in this run:
* read bandwidth: the best of numpy sgemv with all threads over >= 1 GB of float32 weights and a
  numba prange reduction over a >= 1 GB array; roofline tok/s = bandwidth / active weight bytes
  per token (attention, the dense FFN, router + 6 routed + shared experts, the output row block);
* BLAS sgemm on exactly the prefill's matrix products (all threads); prefill_ratio is the time
  BLAS alone needs for them divided by our whole prefill time.
With --device cuda the model runs on the GPU and the baselines are the device's: bandwidth from a
copy kernel, and the products' flops at the FP32 peak of a register-tiled SGEMM (bench/cuda_baselines.py).

    python bench/lm_speed.py [--types q8_0,q4_k_m,f16] [--device cpu|cuda] [--json]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, device_gemm_baseline, random_model, run_worker, sgemm_baseline  # noqa: E402

PROMPT, DECODE, WARM = 300, 32, 8


def read_bandwidth() -> dict:
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def stream_sum(a):
        s = 0.0
        for i in prange(a.shape[0]):
            acc = np.float32(0.0)
            for j in range(a.shape[1]):
                acc += a[i, j]
            s += acc
        return s

    big = np.ones((256, 1 << 20), np.float32)                     # 1 GiB
    stream_sum(big)
    best_numba = 0.0
    for _ in range(3):
        t = time.perf_counter()
        stream_sum(big)
        best_numba = max(best_numba, big.nbytes / (time.perf_counter() - t) / 1e9)
    del big
    mats = [np.random.default_rng(i).random((6848, 1280), dtype=np.float32) for i in range(32)]   # 1.1 GB
    x = np.ones(1280, np.float32)
    for w in mats:
        w @ x
    best_gemv = 0.0
    for _ in range(2):
        t = time.perf_counter()
        for w in mats:
            w @ x
        best_gemv = max(best_gemv, sum(w.nbytes for w in mats) / (time.perf_counter() - t) / 1e9)
    return {"numba_stream_gb_s": best_numba, "numpy_sgemv_gb_s": best_gemv, "gb_s": max(best_numba, best_gemv)}


def prefill_products(n_tok: int):
    """(m, k, n, count) of every weight product in a prefill of n_tok tokens (real model)."""
    per_expert = max(1, round(n_tok * 6 / 64))
    return [(n_tok, 1280, 1280, 48), (n_tok, 1280, 6848, 2), (n_tok, 6848, 1280, 1), (n_tok, 1280, 64, 11),
            (n_tok, 1280, 1792, 22), (n_tok, 1792, 1280, 11), (per_expert, 1280, 896, 2 * 64 * 11),
            (per_expert, 896, 1280, 64 * 11), (1, 1280, 129280, 1)]


def active_bytes(f) -> int:
    """Weight bytes one decoded token reads."""
    n_exp, used = f.get("deepseek2-ocr.expert_count"), f.get("deepseek2-ocr.expert_used_count")
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight":
            total += t.raw.nbytes // t.shape[0]
        elif "_exps." in name:
            total += t.raw.nbytes * used // n_exp
        else:
            total += t.raw.nbytes
    return total


def worker(path: str, device: str, decode: int = DECODE) -> None:
    t0 = time.perf_counter()
    from dsocr.runtime.engine import make_backend
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.language import LanguageModel
    f = GGUFFile(path)
    be = make_backend(device)
    lm = LanguageModel(f, be)
    be.synchronize()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 900, PROMPT)
    t = time.perf_counter()
    scratch = lm.new_cache(PROMPT + decode + 2 * WARM)
    be.to_host(lm.forward(lm.embed(ids[:WARM]), 0, scratch))
    first_kernels_s = time.perf_counter() - t          # JIT from cache + first page faults
    for i in range(WARM):                              # warm the decode path
        lm.forward(lm.embed(ids[i:i + 1]), WARM + i, scratch)
    lm.forward(lm.embed(ids), 0, scratch)              # touch every expert once (page cache -> mapping)
    cache = lm.new_cache(PROMPT + decode + 1)
    t = time.perf_counter()
    logits = lm.forward(lm.embed(ids), 0, cache)
    tok = int(np.argmax(be.to_host(logits)[-1]))       # logits come back: the device is done
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(decode):
        tok = int(np.argmax(be.to_host(lm.forward(lm.embed([tok]), PROMPT + i, cache))[-1]))
    decode_s = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "first_kernels_s": first_kernels_s, "prefill_s": prefill_s,
                      "decode_s": decode_s, "active_bytes": active_bytes(f), "file_bytes": Path(path).stat().st_size}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q8_0,q4_k_m,f16")
    ap.add_argument("--models", default=str(MODELS))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)   # path device [decode tokens]
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker[:2], *map(int, args.worker[2:]))
    files = {t: random_model(args.models, t)["lm"] for t in args.types.split(",")}
    if args.device == "cuda":
        import cuda_baselines
        bw = {"copy_kernel_gb_s": cuda_baselines.copy_bandwidth()}
        bw["gb_s"] = bw["copy_kernel_gb_s"]
        gemm = device_gemm_baseline(prefill_products(PROMPT), cuda_baselines.sgemm_peak())
    else:
        bw = read_bandwidth()
        gemm = sgemm_baseline(prefill_products(PROMPT))
    results = []
    for t, path in files.items():
        m, rss = run_worker(__file__, [str(path), args.device])
        decode_tok_s = DECODE / m["decode_s"]
        roofline = bw["gb_s"] * 1e9 / m["active_bytes"]
        results.append({
            "type": t, "decode_tok_s": round(decode_tok_s, 2), "roofline_tok_s": round(roofline, 2),
            "decode_ratio": round(decode_tok_s / roofline, 3), "prefill_tok_s": round(PROMPT / m["prefill_s"], 1),
            "prefill_gflops": round(gemm["flops"] / m["prefill_s"] / 1e9, 1),
            "sgemm_gflops": round(gemm["sgemm_gflops"], 1), "prefill_ratio": round(gemm["sgemm_s"] / m["prefill_s"], 3),
            "peak_rss_mb": round(rss), "file_mb": round(m["file_bytes"] / 2 ** 20),
            "rss_over_file_mb": round(rss - m["file_bytes"] / 2 ** 20), "active_mb": round(m["active_bytes"] / 2 ** 20),
            "load_s": round(m["load_s"], 2), "first_kernels_s": round(m["first_kernels_s"], 2)})
    out = {"device": args.device, "bandwidth": {k: round(v, 2) for k, v in bw.items()}, "prompt_tokens": PROMPT, "decode_tokens": DECODE,
           "results": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{args.device}: bandwidth {bw['gb_s']:.1f} GB/s ({', '.join(f'{k} {v:.1f}' for k, v in bw.items() if k != 'gb_s')}); "
          f"GEMM baseline on the prefill products {gemm['sgemm_gflops']:.0f} GFLOP/s")
    cols = ["type", "decode_tok_s", "roofline_tok_s", "decode_ratio", "prefill_tok_s", "prefill_gflops",
            "sgemm_gflops", "prefill_ratio", "peak_rss_mb", "file_mb", "load_s", "first_kernels_s"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>14}" for c in cols))


if __name__ == "__main__":
    main()
