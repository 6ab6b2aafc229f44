"""Shared by the benchmark scripts: worker processes measured with wait4, BLAS baselines. Importing it
puts the repository root on sys.path for devtools/ (the random-weight models, the numpy K-quant reference)."""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "models" / "bench"


def run_measured(cmd: list[str], ok_status: tuple[int, ...] = (0,)) -> tuple[str, str, float, float]:
    """Run cmd (cmd[0] a path) to its end: (stdout, stderr, wall seconds, its peak RSS MB from wait4).
    A command that exits with another status than `ok_status` stops the benchmark with the last lines of
    its stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        pid = os.posix_spawn(cmd[0], cmd, dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                                                          (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall_s = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) not in ok_status:
        tail = "\n  ".join(stderr.strip().splitlines()[-8:])
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n  {tail}")
    return stdout, stderr, wall_s, usage.ru_maxrss / 1024


def run_worker(script: str, args: list[str]) -> tuple[dict, float]:
    """Run `python script --worker ARGS...`; returns (its last stdout line as JSON, peak RSS MB)."""
    stdout, _, _, rss_mb = run_measured([sys.executable, script, "--worker", *args])
    return json.loads(stdout.strip().splitlines()[-1]), rss_mb


def sgemm_baseline(products) -> dict:
    """BLAS sgemm (all threads) on exactly these products [(m, k, n, count)]: seconds and GFLOP/s."""
    total_s, flops = 0.0, 0.0
    for m, k, n, count in products:
        a = np.random.default_rng(0).random((m, k), dtype=np.float32)
        b = np.random.default_rng(1).random((k, n), dtype=np.float32)
        a @ b
        reps = max(3, min(50, int(2e9 / (2 * m * k * n))))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        total_s += (time.perf_counter() - t) / reps * count
        flops += 2.0 * m * k * n * count
    return {"sgemm_s": total_s, "flops": flops, "sgemm_gflops": flops / total_s / 1e9}


def device_gemm_baseline(products, peak_gflops: float) -> dict:
    """The sgemm_baseline dict for a GPU: these products' flops at the measured device GEMM peak."""
    flops = sum(2.0 * m * k * n * count for m, k, n, count in products)
    return {"sgemm_s": flops / (peak_gflops * 1e9), "flops": flops, "sgemm_gflops": peak_gflops}


# model -> (folder with the real config.json and index, folder with a tokenizer of its special tokens)
REAL_MODELS = {"ocr1": (REPO / "tests/fixtures/real-config", REPO / "tests/fixtures/tiny-dsocr"),
               "ocr2": (REPO / "tests/fixtures/real-config-ocr2", REPO / "tests/fixtures/tiny-dsocr2")}


def random_model(models: str | Path, lm_type: str, mmproj_type: str = "f16", which=("lm",),
                 model: str = "ocr1") -> dict[str, Path]:
    """Full-size random-weight GGUF files of these types under `models`, written once and reused
    (random-DeepSeek-OCR-*.gguf, or random-DeepSeek-OCR-2-*.gguf for model "ocr2")."""
    from devtools.synthetic import write_random_gguf_pair
    return write_random_gguf_pair(Path(models), lm_type, mmproj_type, *REAL_MODELS[model], which=which,
                                  progress=sys.stderr.isatty())
