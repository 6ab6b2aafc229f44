"""The CPU backend's vision kernels against float64 numpy twins: exact GELU (vectorised erfc) and
quick GELU over the whole float range that matters, LayerNorm, and bidirectional attention with and
without SAM's decomposed relative positions, through both of its paths (one fused kernel up to
FUSED_ATTENTION_KEYS keys, BLAS chunks above), odd sizes and a ragged last row group included.

Tolerances: GELU per element 1e-6 of the value plus 1e-7 of |x| (erfc's fit is good to 1.2e-7;
the float32 rounding of x^2/2 carries into the negative tail, where the value is below 1e-2 and
falls to 0); quick GELU and LayerNorm 1e-5 relative to the output's magnitude; attention 1e-5
relative to the output's magnitude (float32 summation order)."""
import math

import numpy as np
import pytest

from dsocr.runtime.cpu import FUSED_ATTENTION_KEYS, CPUBackend, ops
from dsocr.runtime.vision import relative_table

from conftest import rel_err

erf = np.vectorize(math.erf)


def test_gelu_is_exact_gelu_over_the_float_range():
    # every float32 exponent from 2^-20 to 2^5, both signs, plus zero and the far tails
    x = np.concatenate([np.geomspace(2.0 ** -20, 32.0, 20001), [0.0, 1e-30, 60.0, 1e4]])
    x = np.concatenate([x, -x]).astype(np.float32).reshape(2, -1)
    out = np.empty_like(x)
    ops.gelu(x, out)
    xd = x.astype(np.float64)
    want = 0.5 * xd * (1.0 + erf(xd / math.sqrt(2.0)))
    assert np.all(np.abs(out - want) <= 1e-6 * np.abs(want) + 1e-7 * np.abs(xd))
    assert np.all(out[xd > 12] == x[xd > 12])


def test_quick_gelu_over_the_float_range():
    x = (np.random.default_rng(3).standard_normal((7, 301)) * 20).astype(np.float32)
    out = np.empty_like(x)
    ops.quick_gelu(x, out)
    xd = x.astype(np.float64)
    assert rel_err(out, xd / (1 + np.exp(-1.702 * xd))) < 1e-5


def test_layernorm_with_an_offset_mean():
    # a large common offset is where a float32 one-pass variance would lose digits
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((9, 768)) + 100.0).astype(np.float32)
    w, b = rng.standard_normal(768).astype(np.float32), rng.standard_normal(768).astype(np.float32)
    out = np.empty_like(x)
    ops.layernorm(x, w, b, 1e-6, out)
    xd = x.astype(np.float64)
    mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    assert rel_err(out, (xd - mu) / np.sqrt(var + 1e-6) * w + b) < 1e-5


def attention_twin(q, k, v, n_head, relpos):
    """float64 numpy: softmax(q k^T / sqrt d + q.Rh[hq, kh] + q.Rw[wq, kw]) v per item and head."""
    B, n, c = q.shape
    d = c // n_head
    split = lambda x: x.astype(np.float64).reshape(B, n, n_head, d).transpose(0, 2, 1, 3)
    qh, kh, vh = split(q), split(k), split(v)
    s = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(d)
    if relpos is not None:
        Rh, Rw, H, W = relpos
        qg = qh.reshape(B, n_head, H, W, d)
        rel_h = np.einsum("bnhwc,hkc->bnhwk", qg, Rh.astype(np.float64))
        rel_w = np.einsum("bnhwc,wkc->bnhwk", qg, Rw.astype(np.float64))
        s = s + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, n_head, n, n)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(B, n, c)


@pytest.mark.parametrize("B,size,n_head,d,relpos", [
    (3, 5, 2, 16, True),        # fused kernel, 25 rows: a last group of one row
    (2, 14, 3, 64, True),       # fused, SAM's window shape
    (1, 7, 4, 8, False),        # fused, CLIP-like (no bias), 49 rows
    (1, 33, 2, 16, True),       # BLAS chunks: 1089 keys, a short last chunk
    (1, 33, 2, 16, False),
])
def test_attention_matches_numpy(B, size, n_head, d, relpos):
    rng = np.random.default_rng(size * n_head + d)
    n, c = size * size, n_head * d
    qkv = rng.standard_normal((B, n, 3, c)).astype(np.float32)     # strided q, k, v views as the graph passes
    rp = None
    if relpos:
        tab = lambda: (rng.standard_normal((2 * size - 1, d)) * 0.3).astype(np.float32)
        rp = (relative_table(tab(), size), relative_table(tab(), size), size, size)
    assert (n <= FUSED_ATTENTION_KEYS) == (size < 33)
    got = CPUBackend().attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], n_head, rp, chunk=256)
    assert rel_err(got, attention_twin(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], n_head, rp)) < 1e-5
