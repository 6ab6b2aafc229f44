"""ggml block formats against their oracles, bit for bit:
gguf.quants (numpy) for every dequantizer and for the quantizers gguf has, and ggml's own
quantizer bytes (tests/fixtures/ggml-quants) for every format, K-quants included."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.quant import layout as L
from dsocr.quant import rows
from devtools import kquant_reference as reference

from conftest import FIXTURES, RMS_BOUND

ALL = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
GGUF_QUANTIZES = [QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
KQUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
FIXTURE_NAMES = {QT.Q4_0: "q4_0", QT.Q4_1: "q4_1", QT.Q5_0: "q5_0", QT.Q5_1: "q5_1", QT.Q8_0: "q8_0",
                 QT.Q4_K: "q4_K", QT.Q5_K: "q5_K", QT.Q6_K: "q6_K"}
HALF_FIELDS = {QT.Q8_0: [L.Q8_0_D], QT.Q4_0: [L.Q4_0_D], QT.Q5_0: [L.Q5_0_D], QT.Q4_1: [L.Q4_1_D, L.Q4_1_M],
               QT.Q5_1: [L.Q5_1_D, L.Q5_1_M], QT.Q4_K: [L.Q4_K_D, L.Q4_K_DMIN], QT.Q5_K: [L.Q5_K_D, L.Q5_K_DMIN],
               QT.Q6_K: [L.Q6_K_D]}
UNKNOWN_CODES = [int(QT.Q8_1), int(QT.Q2_K), int(QT.IQ4_NL), 99]   # ggml types no kernel handles, and no type


def same_bits(a, b):
    """Equal as float32 bit patterns (NaN positions must agree too)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all((a.view(np.uint32) == b.view(np.uint32))
                                              | (np.isnan(a) & np.isnan(b))))


def edge_rows(k, rng):
    """Rows that hit the degenerate branches: zeros, constants, huge and tiny magnitudes, spikes."""
    rows = [np.zeros(k), np.full(k, 0.37), np.full(k, -1.25), rng.standard_normal(k) * 1e-9,
            rng.standard_normal(k) * 1e-6, rng.standard_normal(k) * 3e4, rng.uniform(0, 1, k),
            np.where(np.arange(k) < k // 2, 0.0, rng.standard_normal(k)),
            rng.standard_t(3, k), rng.standard_normal(k) * 10.0 ** rng.uniform(-4, 2, k // 32).repeat(32)]
    spike = rng.standard_normal(k) * 0.02
    spike[k // 3] = 8.0
    rows.append(spike)
    return np.array(rows, np.float32)


def random_blocks(qtype, n_blocks, rng):
    """Random block bytes whose fp16 fields hold finite halves (so the data is NaN-free)."""
    fmt = quant.get_format(qtype)
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    finite = lambda n: rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(n, 2)
    for off in HALF_FIELDS.get(qtype, []):
        raw[:, off:off + 2] = finite(n_blocks)
    if qtype == QT.F16:
        raw = finite(n_blocks * fmt.type_size // 2).reshape(n_blocks, -1)
    if qtype in (QT.F32, QT.BF16):   # one value per block
        vals = (rng.standard_normal(n_blocks) * 100).astype(np.float32)
        raw = vals.view(np.uint8).reshape(n_blocks, 4)
        if qtype == QT.BF16:
            raw = raw[:, 2:]
        raw = raw.copy()
    return raw


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    fmt = quant.get_format(qtype)
    raw = random_blocks(qtype, 6 * 40, rng).reshape(6, -1)   # 6 rows of 40 blocks
    got = quant.dequantize(raw, qtype)
    assert got.shape == (6, 40 * fmt.block_size)
    assert same_bits(got, gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_matches_gguf_on_quantized_edge_data(qtype):
    rng = np.random.default_rng(7)
    x = edge_rows(512, rng)
    raw = quant.quantize(x, qtype)
    assert same_bits(quant.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES, ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(11)
    x = np.concatenate([edge_rows(256, rng), rng.standard_normal((5, 256)).astype(np.float32)])
    with np.errstate(over="ignore"):  # gguf's fp16 cast of a huge block minimum overflows, as ggml's does
        want = gguf.quants.quantize(x, qtype)
    assert np.array_equal(quant.quantize(x, qtype), want)
    x3 = rng.standard_normal((3, 4, 96)).astype(np.float32)     # leading dims are kept
    assert np.array_equal(quant.quantize(x3, qtype), gguf.quants.quantize(x3, qtype))


def test_f16_quantize_matches_numpy_rounding():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    x = np.concatenate([x, np.float32([65504, 65519.99, 65520, 5.96e-8, 2.98e-8, 2.9802322e-08, -0.0])])
    x = x[: x.size // 32 * 32].reshape(-1, 32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(quant.quantize(x, QT.F16).view(np.uint16), want.view(np.uint16))


@pytest.fixture(scope="module")
def ggml_vectors():
    return np.load(FIXTURES / "ggml-quants" / "vectors.npz")


def fixture_cases(vectors_names):
    for qtype, name in FIXTURE_NAMES.items():
        for L in (256, 896, 1280, 6848):
            if f"q_{name}_{L}" in vectors_names:
                yield qtype, name, L


CASES = list(fixture_cases(set(np.load(FIXTURES / "ggml-quants" / "vectors.npz").files)))


@pytest.mark.parametrize("qtype,name,L", CASES, ids=[f"{n}-{L}" for _, n, L in CASES])
def test_quantize_matches_ggml_bytes(ggml_vectors, qtype, name, L):
    x = ggml_vectors[f"x_{L}"]
    assert np.array_equal(quant.quantize(x, qtype), ggml_vectors[f"q_{name}_{L}"])


@pytest.mark.parametrize("qtype,name,L", CASES, ids=[f"{n}-{L}" for _, n, L in CASES])
def test_dequantize_matches_ggml(ggml_vectors, qtype, name, L):
    got = quant.dequantize(ggml_vectors[f"q_{name}_{L}"], qtype)
    assert same_bits(got, ggml_vectors[f"deq_{name}_{L}"])


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquant_numpy_reference_matches_ggml_bytes(ggml_vectors, qtype):
    name = FIXTURE_NAMES[qtype]
    for L in (256, 1280):
        got = reference.REFERENCE_QUANTIZERS[int(qtype)](ggml_vectors[f"x_{L}"])
        assert np.array_equal(got, ggml_vectors[f"q_{name}_{L}"]), L


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquant_fast_path_matches_numpy_reference(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    x = np.concatenate([edge_rows(1024, rng),
                        (rng.standard_normal((24, 1024)) * rng.uniform(1e-3, 10, (24, 1))).astype(np.float32)])
    want = reference.REFERENCE_QUANTIZERS[int(qtype)](x)
    assert np.array_equal(quant.quantize(x, qtype), want)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_rows_that_do_not_fit_a_block_are_refused(qtype):
    with pytest.raises(ValueError, match="block size"):
        quant.quantize(np.zeros((2, 48), np.float32), qtype)


@pytest.mark.parametrize("qtype", list(RMS_BOUND), ids=lambda t: t.name)
def test_quantization_error_is_within_format_bound(qtype):
    """Sanity on top of bit-exactness: N(0,1) data reconstructs within the format's RMS bound."""
    x = np.random.default_rng(5).standard_normal((64, 1024)).astype(np.float32)
    err = quant.dequantize(quant.quantize(x, qtype), qtype) - x
    assert np.sqrt((err ** 2).mean()) < RMS_BOUND[qtype]


def test_software_and_native_half_conversions_agree_on_every_half():
    """Both fp16 -> fp32 paths (F16C/fcvt where the CPU has it, ggml's bit algorithm elsewhere)."""
    from numba import njit
    from dsocr.quant import bits

    @njit
    def convert_all(h, out_native, out_soft):
        for i in range(h.size):
            out_soft[i] = bits._fp16_to_fp32_soft(h[i])
            if bits.NATIVE_HALF:
                out_native[i] = bits._fp16_to_fp32_native(h[i])

    h = np.arange(65536, dtype=np.uint16)
    native, soft = np.zeros(65536, np.float32), np.zeros(65536, np.float32)
    convert_all(h, native, soft)
    want = h.view(np.float16).astype(np.float32)
    assert same_bits(soft, want)
    if bits.NATIVE_HALF:
        assert same_bits(native, want)


@pytest.mark.parametrize("qtype", list(HALF_FIELDS), ids=lambda t: t.name)
def test_layout_names_the_fp16_fields_gguf_reads(qtype):
    """quant.layout's fp16 offsets against gguf's own block split (not our kernels): a NaN half
    written at a named offset poisons the block in gguf's dequantizer; written anywhere else it
    never does (a half straddling two fields keeps both exponents, so both stay finite)."""
    base = random_blocks(qtype, 1, np.random.default_rng(int(qtype)))
    nan = np.float16(np.nan).reshape(1).view(np.uint8)
    poisoned = []
    for off in range(base.shape[1] - 1):
        raw = base.copy()
        raw[0, off:off + 2] = nan
        if np.isnan(gguf.quants.dequantize(raw, qtype)).any():
            poisoned.append(off)
    assert poisoned == sorted(HALF_FIELDS[qtype])


def test_layout_covers_exactly_the_supported_formats():
    assert sorted(int(t) for t in quant.SUPPORTED_TYPES) == sorted(L.CODES)
    for qtype in quant.SUPPORTED_TYPES:
        assert L.CODES.count(int(qtype)) == 1


@pytest.mark.parametrize("code", UNKNOWN_CODES)
def test_row_kernels_refuse_an_unknown_type_code(code):
    """Every dispatch on a type code raises for one it has no kernel for (none decodes it as another)."""
    x, raw = np.ones((2, 256), np.float32), np.zeros((2, 256), np.uint8)
    calls = {"quantize_rows": lambda: rows.quantize_rows(code, x, raw),
             "dequantize_rows": lambda: rows.dequantize_rows(code, raw, x),
             "quantize_row": lambda: rows.quantize_row(code, x[0], raw[0]),
             "dequantize_row": lambda: rows.dequantize_row(code, raw[0], x[0]),
             "check_code": lambda: L.check_code(code)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^unsupported ggml type code {code}$"):
            call()
        assert not raw.any(), name
