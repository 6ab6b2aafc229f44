"""Shared paths for the tests. Everything they read lives under tests/fixtures."""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
TINY = FIXTURES / "tiny-dsocr"
REPO = TESTS.parent

sys.path.insert(0, str(TESTS))

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
CASES = ["doc_portrait_crop", "wide_free_ocr_crop", "small_cropmode_noslices", "doc_portrait_nocrop_640"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(outtype, mmproj_outtype) -> (lm_path, mmproj_path): the tiny fixture converted once per pair."""
    from dsocr.convert import convert_checkpoint
    cache: dict = {}

    def get(outtype: str = "f32", mmproj_outtype: str = "f32"):
        key = (outtype, mmproj_outtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{outtype}-{mmproj_outtype}")
            files = convert_checkpoint(TINY, out, outtype, mmproj_outtype, progress=False)
            cache[key] = (files[0].path, files[1].path)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def llamacpp_file(tmp_path_factory):
    """llamacpp_file(name) -> path of the decompressed llama.cpp-made GGUF."""
    folder = tmp_path_factory.mktemp("llamacpp")

    def get(name: str):
        path = folder / name
        if not path.exists():
            with gzip.open(LLAMACPP / (name + ".gz"), "rb") as f, open(path, "wb") as g:
                shutil.copyfileobj(f, g)
        return path
    return get
