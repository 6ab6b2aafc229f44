"""Where one decoded token's time goes on the CPU: the weight GEMVs (by op, type and shape, with the
bandwidth each reaches) against everything else (the other backend ops, the graph's own Python).

The language model runs on a backend wrapped in a timer that clocks every backend call, so the
split is per call as the graph makes it (dispatch and parallel launch included in the op that
pays them). "other" is the time no backend op accounts for: forward's Python between the calls.
A plain (untimed) decode runs alongside, alternating token batches, so the timer's own cost shows
as the difference of the two totals. Also printed: the cost of one empty numba parallel launch.

    python bench/decode_profile.py models/bench/random-DeepSeek-OCR-Q8_0.gguf [--tokens 32] [--reps 5]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


PROMPT = 300
GEMV_OPS = ("matmul", "matmul_many", "matmul_experts")     # the backend ops that read weights


class TimedBackend:
    """The backend with every method call clocked into `seconds[key]` and counted in `calls[key]`;
    the weight products are keyed by (op, type, shape, rows) and their weight bytes kept."""

    def __init__(self, be):
        self.be = be
        self.seconds, self.calls, self.bytes = defaultdict(float), defaultdict(int), defaultdict(int)

    def reset(self):
        self.seconds.clear()
        self.calls.clear()
        self.bytes.clear()

    def __getattr__(self, name):
        fn = getattr(self.be, name)
        if not callable(fn):
            return fn

        def timed(*args, **kw):
            t = time.perf_counter()
            r = fn(*args, **kw)
            dt = time.perf_counter() - t
            key = name
            if name in GEMV_OPS:
                x, ws = args[0], args[1] if name == "matmul_many" else [args[1]]
                experts = args[2] if name == "matmul_experts" or len(args) > 2 and args[2] is not None else None
                key = (name, "+".join(w.qtype.name for w in ws), "+".join("x".join(map(str, w.shape)) for w in ws),
                       x.shape[0] if experts is None else len(experts))
                self.bytes[key] += sum(w.raw.nbytes if experts is None else w.raw.nbytes // w.shape[0] * len(experts)
                                       for w in ws)
            self.seconds[key] += dt
            self.calls[key] += 1
            return r
        return timed


def parallel_launch_us() -> float:
    """One call of an empty two-task numba prange kernel, in µs (dispatch + fork/join)."""
    from numba import njit, prange

    @njit(parallel=True)
    def touch(a):
        for i in prange(a.size):
            a[i] += 1.0

    a = np.zeros(2, np.float32)
    touch(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(1000):
            touch(a)
        best = min(best, (time.perf_counter() - t) / 1000)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="a deepseek2-ocr language-model GGUF (models/bench/random-DeepSeek-OCR-Q8_0.gguf)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (plain and timed alternate)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from dsocr.runtime.cpu import CPUBackend
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.language import LanguageModel
    be = CPUBackend(args.threads)
    lm = LanguageModel(GGUFFile(args.gguf), be)
    timed = TimedBackend(be)
    ids = np.random.default_rng(0).integers(3, 900, PROMPT)
    warm = 4
    cache = lm.new_cache(PROMPT + warm + args.tokens)
    lm.forward(lm.embed(ids), 0, cache)             # JIT from cache, the experts' pages mapped

    def decode(pos0: int, n: int) -> list[float]:
        """Seconds of each of n greedy tokens from position pos0 on."""
        tok, out = int(ids[-1]), []
        for pos in range(pos0, pos0 + n):
            t = time.perf_counter()
            tok = int(np.argmax(lm.forward(lm.embed([tok]), pos, cache)[-1]))
            out.append(time.perf_counter() - t)
        return out

    decode(PROMPT, warm)                            # warm the decode path
    plain, profiled, per_rep = [], [], []
    for _ in range(args.reps):                      # the KV cache is rewound: every run sees the same context
        lm.be = be
        plain.append(statistics.median(decode(PROMPT + warm, args.tokens)))
        lm.be = timed
        timed.reset()
        t = time.perf_counter()
        decode(PROMPT + warm, args.tokens)
        profiled.append((time.perf_counter() - t) / args.tokens)
        per_rep.append(({k: v / args.tokens for k, v in timed.seconds.items()}, dict(timed.calls),
                        dict(timed.bytes)))
    lm.be = be

    keys = per_rep[-1][0].keys()
    med = {k: statistics.median(r[0].get(k, 0.0) for r in per_rep) for k in keys}
    calls = {k: per_rep[-1][1][k] / args.tokens for k in keys}
    nbytes = {k: per_rep[-1][2].get(k, 0) / args.tokens for k in keys}
    total_ms, plain_ms = statistics.median(profiled) * 1e3, statistics.median(plain) * 1e3
    gemv_ms = sum(v for k, v in med.items() if isinstance(k, tuple)) * 1e3
    ops_ms = sum(v for k, v in med.items() if not isinstance(k, tuple)) * 1e3
    graph_ms = total_ms - gemv_ms - ops_ms
    launches = sum(c for c in calls.values())

    print(f"{Path(args.gguf).name}: {args.reps} reps x {args.tokens} tokens at context ~{PROMPT}, medians")
    print(f"  plain decode   {plain_ms:7.2f} ms/token ({1e3 / plain_ms:.1f} tok/s)")
    print(f"  timed decode   {total_ms:7.2f} ms/token (timer cost {total_ms - plain_ms:+.2f} ms)")
    print(f"  weight GEMVs   {gemv_ms:7.2f} ms  {sum(nbytes.values()) / gemv_ms / 1e6:5.1f} GB/s over "
          f"{sum(nbytes.values()) / 1e6:.0f} MB")
    print(f"  other ops      {ops_ms:7.2f} ms")
    print(f"  graph Python   {graph_ms:7.2f} ms")
    print(f"  outside GEMVs  {total_ms - gemv_ms:7.2f} ms = {100 * (total_ms - gemv_ms) / total_ms:.1f} % of a token; "
          f"{launches:.0f} backend calls/token, an empty parallel launch {parallel_launch_us():.1f} µs")
    print(f"  {'op':<72} {'calls':>6} {'ms/tok':>8} {'µs/call':>8} {'GB/s':>6}")
    for k in sorted(keys, key=lambda k: -med[k]):
        name = " ".join(map(str, k)) if isinstance(k, tuple) else k
        gbs = f"{nbytes[k] / med[k] / 1e9:6.1f}" if nbytes[k] else ""
        print(f"  {name:<72} {calls[k]:6.0f} {med[k] * 1e3:8.3f} {med[k] / calls[k] * 1e6:8.1f} {gbs:>6}")


if __name__ == "__main__":
    main()
