"""Where one page's vision encode spends its time on the CPU backend, op by op.

Every backend op the vision graph calls is timed, and so are the kernels and numpy calls inside
them (im2col, window partition, the softmaxes, attention's BLAS products and copies); each op's
time is its own, its inner calls' time taken out, so the rows add up to the whole encode. The
page is the synthetic document of ocr_speed.py resized to --page; gundam mode on 1024x1024 is
the global 1024 view plus 2x2 tiles of 640 (5 views). Each repetition is timed separately;
the table shows the median per op, and the medians of the whole encode.

    python bench/vision_profile.py [--mmproj models/bench/mmproj-random-DeepSeek-OCR-F16.gguf]
                                   [--page 1024x1024] [--mode gundam] [--reps 3]
"""

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS  # noqa: E402
from ocr_speed import synthetic_page  # noqa: E402

# inner calls timed on their own: (module, attribute, label)
KERNELS = [("dsocr.runtime.cpu.vision_ops", name, name) for name in
           ("im2col", "window_partition", "window_unpartition", "softmax_relpos", "split_heads", "merge_heads",
            "attention_fused")]
KERNELS += [("dsocr.runtime.cpu.ops", "softmax_scaled", "softmax_scaled")]
# numpy calls inside runtime/cpu/__init__.py (attention's per-head products and copies)
NUMPY_CALLS = {"matmul": "attention BLAS products (QK, PV)", "ascontiguousarray": "contiguous copies"}


class OpTimer:
    """Exclusive wall time per label: a call's time less the time of the timed calls inside it."""

    def __init__(self):
        self.seconds, self.calls, self.stack = defaultdict(float), defaultdict(int), []

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                name = label(*args, **kwargs) if callable(label) else label
                self.seconds[name] += dt - self.stack.pop()
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1] += dt
        return timed


def attention_label(q, k, v, n_head, relpos=None, **_):
    if relpos is None:
        return "attention (CLIP) rest"
    return f"attention (SAM {'window' if q.shape[0] > 1 else 'global'}) rest"


class TimedBackend:
    """The backend with each op timed; the graph sees the same op set."""

    def __init__(self, be, timer: OpTimer):
        self._be, self._timer = be, timer
        # conv2d calls its own matmul: time it there too
        be.matmul = timer.wrap("weight GEMMs", type(be).matmul.__get__(be))

    def __getattr__(self, name):
        attr = getattr(self._be, name)
        if not callable(attr) or name in ("weight", "table"):
            return attr
        label = {"attention": attention_label, "matmul": "weight GEMMs"}.get(name, name)
        return self._timer.wrap(label, attr)


def instrument(timer: OpTimer):
    import importlib
    import dsocr.runtime.cpu as cpu
    for mod, attr, label in KERNELS:
        m = importlib.import_module(mod)
        if hasattr(m, attr):
            setattr(m, attr, timer.wrap(label, getattr(m, attr)))
    timed_np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    for name, label in NUMPY_CALLS.items():
        setattr(timed_np, name, timer.wrap(label, getattr(np, name)))
    cpu.np = timed_np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmproj", default=str(MODELS / "mmproj-random-DeepSeek-OCR-F16.gguf"))
    ap.add_argument("--page", default="1024x1024", help="WxH of the synthetic page")
    ap.add_argument("--mode", default="gundam")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from dsocr.runtime.cpu import CPUBackend
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.preprocess import ViewConfig, prepare_image
    from dsocr.runtime.vision import VisionModel

    w, h = (int(s) for s in args.page.lower().split("x"))
    img = prepare_image(synthetic_page().resize((w, h)), ViewConfig.from_mode(args.mode))
    timer = OpTimer()
    instrument(timer)
    model = VisionModel(GGUFFile(args.mmproj), TimedBackend(CPUBackend(args.threads), timer))
    model.image_embeddings(img)                     # compile / fault in the weights
    runs, totals = [], []
    for _ in range(args.reps):
        timer.seconds.clear()
        timer.calls.clear()
        t = time.perf_counter()
        model.image_embeddings(img)
        totals.append(time.perf_counter() - t)
        runs.append((dict(timer.seconds), dict(timer.calls)))
    total = statistics.median(totals)
    labels = sorted({k for s, _ in runs for k in s}, key=lambda k: -statistics.median(s.get(k, 0) for s, _ in runs))
    views = len(img.tiles) + 1
    print(f"{args.mmproj}  page {w}x{h} {args.mode}: {views} views ({len(img.tiles)} tiles), "
          f"median of {args.reps}: {total:.2f} s  (all: {', '.join(f'{t:.2f}' for t in totals)})")
    print(f"{'op':<34}{'seconds':>9}{'share':>8}{'calls':>8}")
    accounted = 0.0
    for k in labels:
        s = statistics.median(r.get(k, 0.0) for r, _ in runs)
        accounted += s
        print(f"{k:<34}{s:>9.3f}{100 * s / total:>7.1f}%{runs[0][1].get(k, 0):>8}")
    print(f"{'graph (untimed python, tables)':<34}{total - accounted:>9.3f}{100 * (total - accounted) / total:>7.1f}%")


if __name__ == "__main__":
    main()
