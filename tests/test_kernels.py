"""CPU kernels against independent numpy twins on random inputs, odd sizes included.

Tolerances: float kernels 1e-5 relative to the output's magnitude (float32 summation-order
differences); the quantized GEMV is compared with float64 numpy on the *same* int8 activation
(the kernel quantizes x to q8 blocks, as ggml does), so it is exact up to float32 rounding:
2e-5 relative. On AVX-512 VNNI hosts gemv runs the vpdpbusd kernels for Q8_0 and Q4_K, and
test_vnni_dots_equal_portable_and_numpy also compares them with the portable ones; the int8 GEMM
(qgemm) is held to the GEMV's tolerance, and test_portable_kernels_without_vnni runs the portable
paths of both in a process that hides VNNI."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.runtime.cpu import CPUBackend, matmul as mm, ops, qgemm
from dsocr.runtime.cpu.features import AVX512_VNNI
from dsocr.runtime.gguf_file import Tensor

from conftest import rel_err

FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
QUANT_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def q8_activation(x):
    """numpy twin of quantize_activation: per 32 block d = amax/127, q = round-half-even(x/d)."""
    xb = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(xb).max(axis=1) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, None])
    return (q * d[:, None]).reshape(-1).astype(np.float64), q.astype(np.int16).reshape(-1), d


def weights(qtype, n, k, rng):
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    raw = quant.quantize(w, qtype)
    return raw, quant.dequantize(raw, qtype).astype(np.float64)


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k", [(1, 256), (37, 512), (130, 1280)])
def test_gemv_every_type(qtype, n, k):
    rng = np.random.default_rng(n + k + int(qtype))
    raw, wd = weights(qtype, n, k, rng)
    x = rng.standard_normal(k).astype(np.float32)
    y = np.empty(n, np.float32)
    mm.gemv(int(qtype), raw, x, y)
    xx = x.astype(np.float64) if qtype in FLOAT_TYPES else q8_activation(x)[0]
    assert rel_err(y, wd @ xx) < 2e-5


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_gemv_float_odd_row_length(qtype):
    rng = np.random.default_rng(9)
    raw, wd = weights(qtype, 11, 77, rng)
    x = rng.standard_normal(77).astype(np.float32)
    y = np.empty(11, np.float32)
    mm.gemv(int(qtype), raw, x, y)
    assert rel_err(y, wd @ x.astype(np.float64)) < 1e-5


def test_quantize_activation_matches_numpy():
    x = np.random.default_rng(1).standard_normal(320).astype(np.float32) * 3
    xq, xd, xs = np.empty(320, np.int16), np.empty(10, np.float32), np.empty(10, np.float32)
    mm.quantize_activation(x, xq, xd, xs)
    _, q, d = q8_activation(x)
    assert np.array_equal(xq, q) and np.array_equal(xd, d)
    assert np.allclose(xs, d * q.reshape(10, 32).sum(1), rtol=1e-6)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.F16], ids=lambda t: t.name)
def test_gemv_experts(qtype):
    rng = np.random.default_rng(3)
    n_exp, n, k = 5, 64, 256
    w = (rng.standard_normal((n_exp, n, k)) * 0.05).astype(np.float32)
    raw = quant.quantize(w, qtype)
    wd = quant.dequantize(raw, qtype).astype(np.float64)
    experts = np.array([3, 0, 4], np.int64)
    X = rng.standard_normal((3, k)).astype(np.float32)
    Y = np.empty((3, n), np.float32)
    mm.gemv_experts(int(qtype), raw, experts, X, Y)
    for i, e in enumerate(experts):
        xx = X[i].astype(np.float64) if qtype == QT.F16 else q8_activation(X[i])[0]
        assert rel_err(Y[i], wd[e] @ xx) < 2e-5


@pytest.mark.skipif(not AVX512_VNNI, reason="host has no AVX-512 VNNI")
@pytest.mark.parametrize("qtype,k", [(QT.Q8_0, 1280), (QT.Q8_0, 1312), (QT.Q5_0, 896), (QT.Q5_0, 928),
                                     (QT.Q4_K, 1280), (QT.Q6_K, 1280)],
                         ids=["Q8_0", "Q8_0-odd-blocks", "Q5_0", "Q5_0-odd-blocks", "Q4_K", "Q6_K"])
def test_vnni_dots_equal_portable_and_numpy(qtype, k):
    """The vpdpbusd row dots (two blocks per instruction, int8 activation) against the portable ones on
    the same rows, and gguf dequantize + numpy. Their integer block sums are exact, so they differ from
    the portable kernels only by float32 summation order: 2e-6 of the output's magnitude. Q8_0 rows
    include the quant -128 (|w| = 128 as an unsigned byte in the sign trick)."""
    rng = np.random.default_rng(k + int(qtype))
    n = 37
    raw = quant.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    if qtype == QT.Q8_0:
        qs = raw.reshape(n, -1, 34)[:, :, 2:]
        qs[rng.random(qs.shape) < 0.05] = 0x80
    wd = quant.dequantize(raw, qtype).astype(np.float64)
    x = rng.standard_normal(k).astype(np.float32)
    xq, xd, xs = np.empty(k, np.int16), np.empty(k // 32, np.float32), np.empty(k // 32, np.float32)
    mm.quantize_activation(x, xq, xd, xs)
    xb, acc, flat = xq.astype(np.int8), np.empty(mm.ACC, np.float32), raw.reshape(-1)
    rows = range(0, raw.nbytes, raw.shape[1])
    if qtype == QT.Q8_0:
        got = [mm.dot_q8_0_vnni(flat, r, xb, xd, acc) for r in rows]
        portable = [mm.dot_q8_0(flat, r, xq, xd, acc) for r in rows]
    elif qtype == QT.Q5_0:
        got = [mm.dot_q5_0_vnni(flat, r, xb, xd, acc) for r in rows]
        portable = [mm.dot_q5_0(flat, r, xq, xd, acc) for r in rows]
    elif qtype == QT.Q4_K:
        got = [mm.dot_q4_k_vnni(flat, r, xb, xd, xs, acc) for r in rows]
        portable = [mm.dot_q4_k(flat, r, xq, xd, xs, acc) for r in rows]
    else:
        got = [mm.dot_q6_k_vnni(flat, r, xb, xd, acc) for r in rows]
        portable = [mm.dot_q6_k(flat, r, xq, xd, acc) for r in rows]
    assert rel_err(got, np.asarray(portable, np.float64)) < 2e-6
    assert rel_err(got, wd @ q8_activation(x)[0]) < 2e-5


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES, ids=lambda t: t.name)
def test_gemm_every_type(qtype):
    rng = np.random.default_rng(int(qtype) + 50)
    raw, wd = weights(qtype, 300, 512, rng)
    X = rng.standard_normal((23, 512)).astype(np.float32)
    out = np.empty((23, 300), np.float32)
    mm.gemm(int(qtype), raw, X, out, mm.Dequantizer())
    assert rel_err(out, X.astype(np.float64) @ wd.T) < 1e-5


def test_backend_matmul_switches_between_gemv_and_gemm():
    rng = np.random.default_rng(4)
    raw, wd = weights(QT.F16, 40, 256, rng)
    t = Tensor("w", QT.F16, (40, 256), raw)
    be = CPUBackend()
    for m in (1, 3, 9):
        X = rng.standard_normal((m, 256)).astype(np.float32)
        assert rel_err(be.matmul(X, t), X.astype(np.float64) @ wd.T) < 1e-5


@pytest.mark.parametrize("m,c", [(1, 64), (7, 1280), (3, 33)])
def test_norms(m, c):
    rng = np.random.default_rng(m * c)
    x = rng.standard_normal((m, c)).astype(np.float32) * 3
    w = rng.standard_normal(c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-6, out)
    xd = x.astype(np.float64)
    assert rel_err(out, xd / np.sqrt((xd ** 2).mean(1, keepdims=True) + 1e-6) * w) < 1e-5
    ops.layernorm(x, w, b, 1e-5, out)
    mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    assert rel_err(out, (xd - mu) / np.sqrt(var + 1e-5) * w + b) < 1e-5


def test_activations_and_softmax():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 77)) * 4).astype(np.float32)
    y = rng.standard_normal((5, 77)).astype(np.float32)
    xd = x.astype(np.float64)
    out = np.empty_like(x)
    ops.silu_mul(x, y, out)
    assert rel_err(out, xd / (1 + np.exp(-xd)) * y) < 1e-5
    ops.gelu(x, out)
    erf = np.vectorize(math.erf)
    assert rel_err(out, 0.5 * xd * (1 + erf(xd / math.sqrt(2)))) < 1e-6
    ops.quick_gelu(x, out)
    assert rel_err(out, xd / (1 + np.exp(-1.702 * xd))) < 1e-5
    ops.softmax_rows(x, out)
    e = np.exp(xd - xd.max(1, keepdims=True))
    assert rel_err(out, e / e.sum(1, keepdims=True)) < 1e-5


def test_rope_neox_rotates_half():
    rng = np.random.default_rng(2)
    n_head, d, m = 3, 16, 5
    x = rng.standard_normal((m, n_head * d)).astype(np.float32)
    pos = np.arange(7, 7 + m)
    want = x.astype(np.float64).reshape(m, n_head, d).copy()
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = want[..., : d // 2].copy(), want[..., d // 2:].copy()
    want[..., : d // 2], want[..., d // 2:] = a * c - b * s, b * c + a * s
    CPUBackend().rope(x, n_head, pos, 10000.0)
    assert rel_err(x.reshape(m, n_head, d), want) < 1e-5


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("m", [1, 5, 37])     # decode kernel; BLAS path over chunks of 16 query rows
def test_attention_causal_over_cache(f16, m):
    rng = np.random.default_rng(6)
    n_head, d, pos0 = 4, 16, 9
    k = rng.standard_normal((pos0 + m, n_head * d)).astype(np.float32)
    v = rng.standard_normal((pos0 + m, n_head * d)).astype(np.float32)
    q = rng.standard_normal((m, n_head * d)).astype(np.float32)
    be = CPUBackend()
    kc, vc = be.kv_cache(1, 64, n_head * d, f16)[0]
    be.cache_store(k, kc, 0)
    be.cache_store(v, vc, 0)
    out = np.empty_like(q)
    be.attention_causal(q, kc, vc, pos0, n_head, out, chunk=16)
    if f16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    want = np.empty((m, n_head, d))
    for i in range(m):
        n = pos0 + i + 1
        for h in range(n_head):
            sl = slice(h * d, (h + 1) * d)
            s = k[:n, sl].astype(np.float64) @ q[i, sl].astype(np.float64) / math.sqrt(d)
            p = np.exp(s - s.max())
            want[i, h] = (p / p.sum()) @ v[:n, sl].astype(np.float64)
    assert rel_err(out.reshape(m, n_head, d), want) < 1e-5


def test_topk_softmax_greedy_without_renormalisation():
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((6, 64)).astype(np.float32) * 2
    idx, w = np.empty((6, 6), np.int64), np.empty((6, 6), np.float32)
    ops.topk_softmax(logits, 6, idx, w)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.argsort(-p, axis=1, kind="stable")[:, :6]
    assert np.array_equal(idx, want)
    assert rel_err(w, np.take_along_axis(p, want, 1)) < 1e-6
    assert (w.sum(1) < 1).all()


@pytest.mark.parametrize("code", [int(QT.Q8_1), int(QT.Q2_K), 99])
def test_products_refuse_an_unknown_type_code(code):
    """GEMV (one row, routed experts) and GEMM raise for a type code they have no kernel for, where
    the GEMV used to read any unknown code as BF16."""
    W = np.full((4, 512), 0x3F, np.uint8)
    x = np.ones((2, 256), np.float32)
    y = np.zeros((2, 4), np.float32)
    calls = {"gemv": lambda: mm.gemv(code, W, x[0], y[0]),
             "gemv_experts": lambda: mm.gemv_experts(code, W.reshape(2, 2, 512), np.array([1, 0]), x, y[:, :2]),
             "gemm": lambda: mm.gemm(code, W, np.ones((9, 256), np.float32), np.zeros((9, 4), np.float32),
                                     mm.Dequantizer())}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^unsupported ggml type code {code}$"):
            call()
        assert not y.any(), name


def _qgemm_case(qtype, m, n, k, rng):
    raw, wd = weights(qtype, n, k, rng)
    if qtype == QT.Q8_0:                                  # the quant -128 is a code (0) like any other
        qs = raw.reshape(n, -1, 34)[:, :, 2:]
        qs[rng.random(qs.shape) < 0.05] = 0x80
        wd = quant.dequantize(raw, qtype).astype(np.float64)
    X = rng.standard_normal((m, k)).astype(np.float32)
    want = np.stack([wd @ q8_activation(X[i])[0] for i in range(m)])
    return raw, X, want


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(5, 37, 256), (7, 130, 512), (13, 64, 1280), (1, 33, 256)])
def test_qgemm_every_type(qtype, m, n, k):
    """The int8 GEMM (tiles of 32 weight rows x 1-4 activation rows, row counts that leave partial
    tiles) against gguf dequantize + float64 numpy on the same q8 activation: its group sums are
    exact integers, so only float32 rounding differs (2e-5 of the output's magnitude, as the GEMV)."""
    rng = np.random.default_rng(m * n + k + int(qtype))
    raw, X, want = _qgemm_case(qtype, m, n, k, rng)
    out = np.full((m, n), np.nan, np.float32)
    qgemm.qgemm(int(qtype), raw, X, out, 3)
    assert rel_err(out, want) < 2e-5


def test_qgemm_refuses_float_weights():
    raw = quant.quantize(np.ones((4, 32), np.float32), QT.F16)
    with pytest.raises(ValueError, match="does not take ggml type 1"):
        qgemm.qgemm(int(QT.F16), raw, np.ones((5, 32), np.float32), np.empty((5, 4), np.float32), 1)


PORTABLE_CHECK = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from gguf import GGMLQuantizationType as QT
from dsocr.runtime.cpu import features, matmul as mm, qgemm
from test_kernels import QUANT_TYPES, _qgemm_case, q8_activation, rel_err, weights
assert not features.AVX512_VNNI
worst = 0.0
for qtype in QUANT_TYPES:
    rng = np.random.default_rng(int(qtype))
    raw, X, want = _qgemm_case(qtype, 6, 40, 512, rng)
    out = np.empty((6, 40), np.float32)
    qgemm.qgemm(int(qtype), raw, X, out, 2)
    y = np.empty(40, np.float32)
    mm.gemv(int(qtype), raw, X[0], y)
    worst = max(worst, rel_err(out, want), rel_err(y, want[0]))
print(worst)
"""


@pytest.mark.skipif(not AVX512_VNNI, reason="the host runs the portable kernels anyway")
def test_portable_kernels_without_vnni(tmp_path):
    """The paths a host without AVX-512 VNNI runs (portable vector IR for the GEMM tile's vpdpbusd
    and the GEMV dots), in a process that hides the feature, with a numba cache of its own."""
    env = dict(os.environ, DSOCR_CPU_FEATURES_OFF="avx512vnni", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    code = PORTABLE_CHECK.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 2e-5
