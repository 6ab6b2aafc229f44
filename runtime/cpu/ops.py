"""The CPU backend's elementwise and attention kernels (numba, parallel over rows).

Each kernel is a plain loop nest with its shapes in a comment, llm.c style; activations are
float32, C-contiguous. Reductions keep fastmath off where the reference's summation order
matters for 1e-4 agreement (norms) and use it where they are plain dot products.
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from dsocr.quant.bits import bits_f32, fp16_to_fp32, fp32_to_fp16

_SQRT1_2 = 0.7071067811865476


@njit(cache=True, parallel=True)
def rmsnorm(x, w, eps, out):
    # x [m, c], w [c] -> out [m, c]: x / sqrt(mean(x^2) + eps) * w
    m, c = x.shape
    for i in prange(m):
        ss = 0.0
        for j in range(c):
            ss += np.float64(x[i, j]) * x[i, j]
        r = np.float32(1.0 / math.sqrt(ss / c + eps))
        for j in range(c):
            out[i, j] = (x[i, j] * r) * w[j]


@njit(cache=True, parallel=True, fastmath=True)
def layernorm(x, w, b, eps, out):
    # x [m, c], w [c], b [c] -> out [m, c]: (x - mean) / sqrt(var + eps) * w + b. The sums are
    # float64, so fastmath's reordering (vector lanes) stays far inside float32's rounding.
    m, c = x.shape
    for i in prange(m):
        mean = 0.0
        for j in range(c):
            mean += x[i, j]
        mean /= c
        var = 0.0
        for j in range(c):
            d = x[i, j] - mean
            var += d * d
        r = 1.0 / math.sqrt(var / c + eps)
        for j in range(c):
            out[i, j] = np.float32((x[i, j] - mean) * r) * w[j] + b[j]


@njit(cache=True, parallel=True)
def silu_mul(gate, up, out):
    # gate [m, c], up [m, c] -> out [m, c]: silu(gate) * up
    m, c = gate.shape
    for i in prange(m):
        for j in range(c):
            g = gate[i, j]
            out[i, j] = g / (np.float32(1.0) + np.exp(-g)) * up[i, j]


@njit(cache=True, parallel=True)
def weighted_sum_into(out, y, w):
    # out [m, n] += sum_s w[t, s] y[t*k + s] for w [m, k] (each token's routed experts), the products
    # summed in slot order before the add, as numpy's (w[:, :, None] * y).sum(1) does
    m, k = w.shape
    n = out.shape[1]
    for t in prange(m):
        acc = np.zeros(n, np.float32)
        for s in range(k):
            ws = w[t, s]
            for j in range(n):
                acc[j] += ws * y[t * k + s, j]
        for j in range(n):
            out[t, j] += acc[j]


@njit(cache=True, parallel=True)
def softmax_rows(x, out):
    # x [m, c] -> out [m, c], float32 like torch.softmax(dtype=float32)
    m, c = x.shape
    for i in prange(m):
        mx = x[i, 0]
        for j in range(1, c):
            mx = max(mx, x[i, j])
        s = np.float32(0.0)
        for j in range(c):
            e = np.exp(x[i, j] - mx)
            out[i, j] = e
            s += e
        for j in range(c):
            out[i, j] /= s


@njit(cache=True, parallel=True)
def add_inplace(x, y):
    # x [m, c] += y [m, c]
    m, c = x.shape
    for i in prange(m):
        for j in range(c):
            x[i, j] += y[i, j]


@njit(cache=True, parallel=True)
def add_bias(x, b):
    # x [m, c] += b [c]
    m, c = x.shape
    for i in prange(m):
        for j in range(c):
            x[i, j] += b[j]


@njit(cache=True, parallel=True)
def rope_neox(x, n_head, cos, sin):
    # x [m, n_head*d] in place: per head, (x1, x2) halves -> (x1 cos - x2 sin, x2 cos + x1 sin)
    m = x.shape[0]
    d = x.shape[1] // n_head
    half = d // 2
    for i in prange(m):
        for h in range(n_head):
            o = h * d
            for j in range(half):
                a = x[i, o + j]
                b = x[i, o + half + j]
                x[i, o + j] = a * cos[i, j] - b * sin[i, j]
                x[i, o + half + j] = b * cos[i, j] + a * sin[i, j]


def kv_value(v):
    """A KV-cache element as float32: caches hold float32, or fp16 bits as uint16."""


@overload(kv_value, inline="always")
def _kv_value(v):
    if v == types.uint16:
        return lambda v: fp16_to_fp32(v)
    return lambda v: v


def kv_element(x, like):
    """float32 x as a KV-cache element of the same type as `like` (fp16 bits or float32)."""


@overload(kv_element, inline="always")
def _kv_element(x, like):
    if like == types.uint16:
        return lambda x, like: fp32_to_fp16(x)
    return lambda x, like: x


@njit(cache=True, parallel=True)
def cache_store(src, cache, pos0):
    # src [m, c] -> cache[pos0:pos0+m, :] (float32, or fp16 bits when the cache is uint16)
    m, c = src.shape
    for i in prange(m):
        for j in range(c):
            cache[pos0 + i, j] = kv_element(src[i, j], cache[0, 0])


@njit(cache=True, inline="always", fastmath=True)
def exp_f32(x):
    """e**x in plain float32 arithmetic that LLVM vectorises (numba's exp is a scalar libm call
    without SVML): Cephes' expf, 2**n * p(r) with |r| <= ln2/2, within 2 ulp of libm."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * bits_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(cache=True, inline="always", fastmath=True)
def erfc_f32(z):
    """erfc(z) for z >= 0 in float32 arithmetic that LLVM vectorises (numba's math.erf is a scalar
    libm call): Numerical Recipes' erfcc, a Chebyshev fit of erfc(z) e^(z^2) in t = 1/(1 + z/2),
    fractional error below 1.2e-7 for every z >= 0."""
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
    p = np.float32(0.17087277)
    p = p * t + np.float32(-0.82215223)
    p = p * t + np.float32(1.48851587)
    p = p * t + np.float32(-1.13520398)
    p = p * t + np.float32(0.27886807)
    p = p * t + np.float32(-0.18628806)
    p = p * t + np.float32(0.09678418)
    p = p * t + np.float32(0.37409196)
    p = p * t + np.float32(1.00002368)
    p = p * t + np.float32(-1.26551223)
    return t * exp_f32(p - z * z)


@njit(cache=True, parallel=True, fastmath=True)
def gelu(x, out):
    # x [m, c] -> out [m, c]: exact GELU, x * (1 + erf(x / sqrt 2)) / 2 = x - x erfc(|x| / sqrt 2) / 2
    # for x >= 0, x erfc(|x| / sqrt 2) / 2 below (no cancellation in the negative tail)
    m, c = x.shape
    for i in prange(m):
        for j in range(c):
            v = x[i, j]
            e = np.float32(0.5) * v * erfc_f32(abs(v) * np.float32(_SQRT1_2))
            out[i, j] = v - e if v >= 0 else e


@njit(cache=True, parallel=True, fastmath=True)
def quick_gelu(x, out):
    # x [m, c] -> out [m, c]: x * sigmoid(1.702 x)
    m, c = x.shape
    for i in prange(m):
        for j in range(c):
            v = x[i, j]
            out[i, j] = v / (np.float32(1.0) + exp_f32(np.float32(-1.702) * v))


@njit(cache=True, inline="always", fastmath=True)
def exp_normalize(row, n, mx):
    # row[:n] in place -> exp(row - mx) / sum: the second half of a softmax, given the row's max
    s = np.float32(0.0)
    for j in range(n):
        e = exp_f32(row[j] - mx)
        row[j] = e
        s += e
    inv = np.float32(1.0) / s
    for j in range(n):
        row[j] *= inv


@njit(cache=True, parallel=True, fastmath=True)
def softmax_scaled(scores, scale, n0):
    # scores [r, c] in place: row i -> softmax(scores[i, :n] * scale) with n = min(c, n0 + i), zeros
    # after it (n0 >= c: plain softmax; n0 = the first row's position + 1: the causal mask)
    r, c = scores.shape
    for i in prange(r):
        n = min(c, n0 + i)
        mx = np.float32(-np.inf)
        for j in range(n):
            scores[i, j] *= scale
            mx = max(mx, scores[i, j])
        exp_normalize(scores[i], n, mx)
        for j in range(n, c):
            scores[i, j] = 0.0


@njit(cache=True, parallel=True, fastmath=True)
def attention_causal(q, kcache, vcache, pos0, n_head, out):
    # q [m, n_head*d] at positions pos0..pos0+m-1, caches [n_ctx, n_head*d] (float32 or fp16 bits)
    # holding positions 0..pos0+m-1 -> out [m, n_head*d]; softmax(q k^T / sqrt d) v, causal.
    # The caches are read flat with unsigned indices: numba wraps a signed index that might be
    # negative (base + j), and that select kept LLVM to scalar fp16 loads (10x slower per token).
    m = q.shape[0]
    width = kcache.shape[1]
    d = width // n_head
    scale = np.float32(1.0 / math.sqrt(d))
    kf, vf = kcache.reshape(-1), vcache.reshape(-1)
    for task in prange(m * n_head):
        i, h = task // n_head, task % n_head
        o = h * d
        n = pos0 + i + 1
        qh = np.empty(d, np.float32)
        for j in range(d):
            qh[j] = q[i, o + j]
        scores = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for t in range(n):
            base = t * width + o
            s = np.float32(0.0)
            for j in range(d):
                s += qh[j] * kv_value(kf[np.uint64(base + j)])
            s *= scale
            scores[t] = s
            mx = max(mx, s)
        total = np.float32(0.0)
        for t in range(n):
            e = np.exp(scores[t] - mx)
            scores[t] = e
            total += e
        acc = np.zeros(d, np.float32)
        for t in range(n):
            base = t * width + o
            p = scores[t]
            for j in range(d):
                acc[j] += p * kv_value(vf[np.uint64(base + j)])
        inv = np.float32(1.0) / total
        for j in range(d):
            out[i, o + j] = acc[j] * inv


@njit(cache=True)
def topk_softmax(logits, k, idx, weights):
    # router logits [m, e] -> softmax probabilities, then greedy top-k per row (no renormalisation):
    # idx [m, k], weights [m, k], sorted by weight descending (ties: lower expert first)
    m, e = logits.shape
    p = np.empty(e, np.float32)
    for i in range(m):
        mx = logits[i, 0]
        for j in range(1, e):
            mx = max(mx, logits[i, j])
        s = np.float32(0.0)
        for j in range(e):
            p[j] = np.exp(logits[i, j] - mx)
            s += p[j]
        for j in range(e):
            p[j] /= s
        order = np.argsort(-p, kind="mergesort")
        for r in range(k):
            idx[i, r] = order[r]
            weights[i, r] = p[order[r]]
