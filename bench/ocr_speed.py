"""One page through the whole pipeline at full size: vision seconds and GFLOP/s against BLAS sgemm
on the same products (measured in this run), prefill and decode tokens/s, peak RSS.

Full-size random-weight files (real shapes) are written once under models/bench/: the mmproj in
F16 and Q8_0 beside the Q8_0 language model (and Q4_K_M for the low-memory row). The page is a
synthetic 1600x1200 document: base mode encodes one 1024 view; gundam encodes the 1024 global
view plus 3x2 = 6 tiles of 640. --model ocr2 runs DeepSeek-OCR 2's pair instead (its modes:
gundam, the 1024 global view plus 3x2 = 6 tiles of 768 through SAM and the Qwen2 encoder; global,
one 1024 view). Each row runs in its own process (peak RSS from wait4).
With --device cuda the page runs on the GPU and vision is compared with the FP32 peak of a
register-tiled SGEMM measured on the device (bench/cuda_baselines.py).

    python bench/ocr_speed.py [--model ocr1|ocr2] [--rows base:q8_0:f16,gundam:q8_0:f16,...] [--device cpu|cuda] [--json]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, device_gemm_baseline, random_model, run_worker, sgemm_baseline  # noqa: E402

DECODE = 32


def sam_products(side: int, out_width: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of SAM ViT-B's matrix products on one side x side view (real model), its
    net_3 projecting to `out_width` (CLIP's 1024, or OCR 2's encoder's 896)."""
    g = side // 16
    n = g * g
    nw = ((g + 13) // 14) ** 2
    prods = [(n, 768, 768, 1), (n, 768, 2304, 12), (n, 768, 768, 12), (n, 768, 3072, 12), (n, 3072, 768, 12),
             (n, 768, 256, 1), (n, 2304, 256, 1), (n // 4, 2304, 512, 1), (n // 16, 4608, out_width, 1)]
    # attention: windowed blocks (8) over nw windows of 196, global blocks (4) over all n; 12 heads of 64
    return prods + [(196, 64, 196, 2 * 12 * nw * 8), (n, 64, n, 2 * 12 * 4)]


def view_products(side: int) -> list[tuple[int, int, int, int]]:
    """Every product encoding one view of DeepSeek-OCR: SAM, CLIP-L over 1 + n/16 rows, projector."""
    c = (side // 64) ** 2 + 1
    return sam_products(side, 1024) + [(c, 1024, 3072, 24), (c, 1024, 1024, 24), (c, 1024, 4096, 24),
                                       (c, 4096, 1024, 24), (c, 64, c, 2 * 16 * 24), (c - 1, 2048, 1280, 1)]


def ocr2_view_products(side: int) -> list[tuple[int, int, int, int]]:
    """Every product encoding one view of DeepSeek-OCR 2: SAM, the Qwen2 encoder over 2n rows (n SAM rows
    + n queries), projector."""
    n = (side // 64) ** 2
    s = 2 * n
    return sam_products(side, 896) + [(s, 896, 896, 24), (s, 896, 128, 2 * 24), (s, 896, 896, 24),
                                      (s, 896, 4864, 2 * 24), (s, 4864, 896, 24), (s, 64, s, 2 * 14 * 24),
                                      (n, 896, 1280, 1)]


def page_products(mode: str, model: str) -> list:
    if model == "ocr2":
        return ocr2_view_products(1024) + (ocr2_view_products(768) * 6 if mode == "gundam" else [])
    return view_products(1024) + (view_products(640) * 6 if mode == "gundam" else [])


def synthetic_page(size=(1600, 1200)):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for i in range(30):
        d.text((60, 40 + 36 * i), f"Line {i}: the quick brown fox jumps over the lazy dog " * 2, fill="black")
    return img


def worker(mode: str, lm: str, mm: str, device: str) -> None:
    from dsocr.runtime.engine import OcrEngine, OcrRequest
    from dsocr.runtime.generate import GenerationResult, SamplingParams
    from dsocr.runtime.preprocess import ViewConfig
    t = time.perf_counter()
    eng = OcrEngine(lm, mm, device=device)
    load_s = time.perf_counter() - t
    view = ViewConfig.from_mode(mode, eng.layout)
    page = synthetic_page()
    eng.warm_up()                                            # JIT cache, first page faults
    res = GenerationResult()
    req = OcrRequest([page], view=view, sampling=SamplingParams(max_new_tokens=DECODE, ngram_mode="off"))
    for _ in eng.stream(req, res):
        pass
    t = res.timings
    print(json.dumps({"load_s": load_s, "vision_s": t["vision_s"], "preprocess_s": t["preprocess_s"],
                      "prefill_tok_s": t["prefill_tok_s"], "decode_tok_s": t["decode_tok_s"],
                      "prompt_tokens": res.prompt_tokens,
                      "file_bytes": Path(lm).stat().st_size + Path(mm).stat().st_size}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="base:q8_0:f16,gundam:q8_0:f16,gundam:q8_0:q8_0,gundam:q4_k_m:q8_0",
                    help="mode:lm_type:mmproj_type, comma separated")
    ap.add_argument("--models", default=str(MODELS))
    ap.add_argument("--model", choices=("ocr1", "ocr2"), default="ocr1", help="DeepSeek-OCR or DeepSeek-OCR 2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    rows = [r.split(":") for r in args.rows.split(",")]
    paths = {(lt, mt): random_model(args.models, lt, mt, which=("lm", "mmproj"), model=args.model) for _, lt, mt in rows}
    if args.device == "cuda":
        import cuda_baselines
        peak = cuda_baselines.sgemm_peak()
        baselines = {mode: device_gemm_baseline(page_products(mode, args.model), peak) for mode in {r[0] for r in rows}}
    else:
        baselines = {mode: sgemm_baseline(page_products(mode, args.model)) for mode in {r[0] for r in rows}}
    results = []
    for mode, lt, mt in rows:
        lm, mm = paths[(lt, mt)]["lm"], paths[(lt, mt)]["mmproj"]
        m, rss = run_worker(__file__, [mode, str(lm), str(mm), args.device])
        b = baselines[mode]
        results.append({"model": args.model, "mode": mode, "lm": lt, "mmproj": mt, "vision_s": round(m["vision_s"], 2),
                        "vision_gflops": round(b["flops"] / m["vision_s"] / 1e9, 1),
                        "sgemm_gflops": round(b["sgemm_gflops"], 1), "vision_ratio": round(b["sgemm_s"] / m["vision_s"], 3),
                        "prefill_tok_s": round(m["prefill_tok_s"], 1), "decode_tok_s": round(m["decode_tok_s"], 2),
                        "prompt_tokens": m["prompt_tokens"], "peak_rss_mb": round(rss),
                        "files_mb": round(m["file_bytes"] / 2 ** 20), "load_s": round(m["load_s"], 2)})
    if args.json:
        print(json.dumps({"device": args.device, "results": results}, indent=1))
        return
    cols = ["model", "mode", "lm", "mmproj", "vision_s", "vision_gflops", "sgemm_gflops", "vision_ratio", "prefill_tok_s",
            "decode_tok_s", "prompt_tokens", "peak_rss_mb", "files_mb"]
    print("  ".join(f"{c:>13}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>13}" for c in cols))


if __name__ == "__main__":
    main()
