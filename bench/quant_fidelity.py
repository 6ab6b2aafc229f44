"""How far each weight type moves the language model's output from F32, at full size.

The full-size random-weight language model (real hparams; the same weights for every type, drawn
once by devtools/synthetic.py) is written in F32 and in each type under models/bench/. Each file runs
the same 128-token prompt in its own process, logits at every position; the figures compare them
with F32's: the largest |logit difference|, its RMS relative to the spread of F32's logits, the mean
KL divergence KL(F32 || type) over positions (nats), and how often the top token agrees.

(The tiny fixture cannot answer this: its 64-wide rows do not fit a K-quant block, so Q4_K and Q6_K
fall back to Q5_0 and Q8_0 there, as llama.cpp's converter falls back.)

    python bench/quant_fidelity.py [--types q8_0,q6_k,q4_k,q4_k_m] [--json]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, random_model, run_worker  # noqa: E402

PROMPT = 128


def worker(path: str, out: str) -> None:
    from dsocr.runtime.cpu import CPUBackend
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.language import LanguageModel
    lm = LanguageModel(GGUFFile(path), CPUBackend())
    ids = np.random.default_rng(0).integers(3, lm.p.vocab_size, PROMPT)
    logits = lm.forward(lm.embed(ids), 0, lm.new_cache(PROMPT), logits_rows="all")
    np.save(out, np.asarray(logits, np.float32))
    print(json.dumps({"rows": int(logits.shape[0])}))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def compare(ref: np.ndarray, q: np.ndarray) -> dict:
    lp, lq = log_softmax(ref), log_softmax(q)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    d = q.astype(np.float64) - ref
    return {"max_abs_err": float(np.abs(d).max()), "rms_rel": float(np.sqrt((d ** 2).mean()) / ref.std()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agree": float((q.argmax(axis=1) == ref.argmax(axis=1)).mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q8_0,q6_k,q4_k,q4_k_m")
    ap.add_argument("--models", default=str(MODELS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    types = ["f32"] + args.types.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        logits = {}
        for t in types:
            path = random_model(args.models, t)["lm"]
            out = str(Path(tmp) / f"{t}.npy")
            run_worker(__file__, [str(path), out])
            logits[t] = np.load(out)
    ref = logits["f32"]
    results = [{"type": t, **{k: round(v, 6) for k, v in compare(ref, logits[t]).items()}} for t in types[1:]]
    if args.json:
        print(json.dumps({"prompt_tokens": PROMPT, "reference": "f32", "results": results}, indent=1))
        return
    print(f"{PROMPT} positions, logits compared with F32 (logit std {ref.std():.3f})")
    cols = ["type", "max_abs_err", "rms_rel", "mean_kl", "max_kl", "top1_agree"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()
