"""Shared paths for the tests. Everything they read lives under tests/fixtures."""
import os

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)
# No NVIDIA device (CI): the CUDA backend's tests run in numba's simulator. Read when numba loads.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
TINY = FIXTURES / "tiny-dsocr"
TINY2 = FIXTURES / "tiny-dsocr2"          # DeepSeek-OCR 2
REPO = TESTS.parent

sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO))      # devtools/: the tests' own helpers, not installed

# Relative RMS reconstruction error allowed for N(0, 1) weights, per format: a uniform quantizer
# with step s has RMS error s/sqrt(12); s is amax/127 for Q8_0 (amax ~ 2.1 sigma over 32 weights),
# amax/8 for Q4_0, (max-min)/15 for Q4_1 and Q4_K, amax/16 and (max-min)/31 for the 5-bit types,
# amax/32 over 16 weights for Q6_K, 2**-11 relative for F16 and 2**-8 for BF16. The bound is twice
# that, leaving room for the rounding of the block scales.
from gguf import GGMLQuantizationType as _QT  # noqa: E402

RMS_BOUND = {_QT.F16: 6e-4, _QT.BF16: 5e-3, _QT.Q8_0: 0.01, _QT.Q6_K: 0.035, _QT.Q5_0: 0.08,
             _QT.Q5_1: 0.08, _QT.Q5_K: 0.08, _QT.Q4_0: 0.16, _QT.Q4_1: 0.16, _QT.Q4_K: 0.16}

import gzip  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

LLAMACPP = FIXTURES / "tiny-dsocr-llamacpp"
LLAMACPP2 = FIXTURES / "tiny-dsocr2-llamacpp"
CASES = ["doc_portrait_crop", "wide_free_ocr_crop", "small_cropmode_noslices", "doc_portrait_nocrop_640"]


def _converter(tmp_path_factory, checkpoint, prefix):
    from dsocr.convert import convert_checkpoint
    cache: dict = {}

    def get(outtype: str = "f32", mmproj_outtype: str = "f32"):
        key = (outtype, mmproj_outtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{prefix}-{outtype}-{mmproj_outtype}")
            files = convert_checkpoint(checkpoint, out, outtype, mmproj_outtype, progress=False)
            cache[key] = (files[0].path, files[1].path)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(outtype, mmproj_outtype) -> (lm_path, mmproj_path): the tiny fixture converted once per pair."""
    return _converter(tmp_path_factory, TINY, "tiny")


@pytest.fixture(scope="session")
def converted2(tmp_path_factory):
    """converted2(outtype, mmproj_outtype) -> (lm_path, mmproj_path): tiny-dsocr2 (OCR 2) converted once per pair."""
    return _converter(tmp_path_factory, TINY2, "tiny2")


def _gunzipper(tmp_path_factory, source):
    folder = tmp_path_factory.mktemp(source.name)

    def get(name: str):
        path = folder / name
        if not path.exists():
            with gzip.open(source / (name + ".gz"), "rb") as f, open(path, "wb") as g:
                shutil.copyfileobj(f, g)
        return path
    return get


@pytest.fixture(scope="session")
def llamacpp_file(tmp_path_factory):
    """llamacpp_file(name) -> path of the decompressed llama.cpp-made GGUF."""
    return _gunzipper(tmp_path_factory, LLAMACPP)


@pytest.fixture(scope="session")
def llamacpp2_file(tmp_path_factory):
    """llamacpp2_file(name) -> path of the decompressed llama.cpp-made DeepSeek-OCR 2 GGUF."""
    return _gunzipper(tmp_path_factory, LLAMACPP2)


def teacher_forced_deviation(lm, embeds, z) -> float:
    """Largest |logit - golden| over the 16 golden decode steps, feeding the golden ids (so a
    quantized model's own choices do not compound): the noise level of that model."""
    import numpy as np
    n = embeds.shape[0]
    cache = lm.new_cache(n + 17)
    last = lm.forward(embeds, 0, cache)[-1]
    worst = 0.0
    for s in range(16):
        worst = max(worst, float(np.abs(last - z["step_logits"][s]).max()))
        last = lm.forward(lm.embed([int(z["generated_ids"][s])]), n + s, cache)[-1]
    return worst


def check_near_ties(results: dict, goldens: dict, deviation: float, max_diverged: int = 1) -> dict:
    """results: case -> generated ids. Each divergence from the golden ids must happen at a step
    whose golden top-2 margin is below `deviation`; returns {case: (step, margin)}."""
    import numpy as np
    diverged = {}
    for name, ids in results.items():
        z = goldens[name]
        first = next((s for s, (a, b) in enumerate(zip(ids, z["generated_ids"])) if a != b), None)
        if first is not None:
            top2 = np.sort(z["step_logits"][first])[-2:]
            diverged[name] = (first, float(top2[1] - top2[0]))
            assert top2[1] - top2[0] < deviation, (name, first, top2, deviation)
    assert len(diverged) <= max_diverged, diverged
    return diverged


def one_line_error(result, *needles) -> str:
    """The stderr line of a failed `dsocr` run (a CompletedProcess, or (rc, stdout, stderr) from
    cli.main in-process): exit 1, exactly one line `dsocr: error: ...`, no traceback, each needle in it."""
    rc, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else (result[0], result[2])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("dsocr: error: ") and "Traceback" not in err, \
        err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def rel_err(got, want) -> float:
    """Largest |got - want| relative to the largest |want| (float64)."""
    import numpy as np
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


# ---------------------------------------------------------------- the CUDA backend (simulated without a GPU)

from numba import config as _numba_config  # noqa: E402  (after NUMBA_ENABLE_CUDASIM is set above)

SIMULATED = bool(_numba_config.ENABLE_CUDASIM)


@pytest.fixture(scope="module")
def be():
    from dsocr.runtime.cuda import CUDABackend
    if not SIMULATED:
        yield CUDABackend()
        return
    # The simulator runs a Python thread per CUDA thread and polls them: a short GIL switch
    # interval keeps it from idling 5 ms at every hand-over. It also creates a shared array on
    # first use with an unlocked get-then-set, so two threads of a block can each make their own
    # (and read the other's uninitialised memory): an atomic setdefault closes that race.
    import numpy as np
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np.numpy_support import as_dtype
    racy = FakeCUDAShared.array

    def shared_array(self, shape, dtype):
        site = sys._getframe(1)            # the kernel line, as the simulator keys it
        key = (site.f_code.co_filename, site.f_lineno)
        return self._allocations.setdefault(key, np.empty(shape, as_dtype(dtype)))
    old_interval = sys.getswitchinterval()
    FakeCUDAShared.array = shared_array
    sys.setswitchinterval(1e-5)
    yield CUDABackend(threads_per_block=8)
    sys.setswitchinterval(old_interval)
    FakeCUDAShared.array = racy
