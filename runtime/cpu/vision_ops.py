"""Vision-encoder kernels for the CPU backend (numba): im2col for the convolutions, SAM's window
partition with zero padding, q/k/v split into heads, and attention with SAM's decomposed
relative-position bias.

Attention (see CPUBackend.attention) takes q/k/v split head-major once, so no kernel reads a
strided head slice. Short sequences (SAM's 196-token windows, CLIP's 257 tokens) run in one
kernel, scores of four query rows at a time held in cache (attention_fused); long ones (SAM's
global blocks) make scores a chunk of rows at a time with BLAS and softmax them here
(softmax_relpos), so even the 4096-token attention never holds more than one chunk of one head.

DeepSeek-OCR 2's encoder (image tokens, then learned queries) attends with a prefix mask and
grouped kv heads (attention_prefix): ROWS query rows at a time as attention_fused, over only
the keys the group's last row sees."""
import numpy as np
from numba import njit, prange

from dsocr.runtime.cpu.ops import exp_f32, exp_normalize


@njit(cache=True, parallel=True)
def im2col(x, k, stride, pad, out):
    # x [H, W, C] -> out [Ho*Wo, C*k*k], columns ordered (c, ky, kx) like a [Cout, Cin, k, k] weight
    H, W, C = x.shape
    Ho = (H + 2 * pad - k) // stride + 1
    Wo = (W + 2 * pad - k) // stride + 1
    for oy in prange(Ho):
        for ox in range(Wo):
            r = oy * Wo + ox
            for c in range(C):
                for ky in range(k):
                    iy = oy * stride - pad + ky
                    for kx in range(k):
                        ix = ox * stride - pad + kx
                        v = np.float32(0.0)
                        if 0 <= iy < H and 0 <= ix < W:
                            v = x[iy, ix, c]
                        out[r, (c * k + ky) * k + kx] = v


@njit(cache=True, parallel=True)
def window_partition(x, ws, out):
    # x [H, W, C] -> out [nh*nw, ws*ws, C], zero padded to multiples of ws, windows row-major
    H, W, C = x.shape
    nw = (W + ws - 1) // ws
    for w in prange(out.shape[0]):
        wy, wx = w // nw, w % nw
        for i in range(ws):
            for j in range(ws):
                y, xx = wy * ws + i, wx * ws + j
                for c in range(C):
                    out[w, i * ws + j, c] = x[y, xx, c] if (y < H and xx < W) else np.float32(0.0)


@njit(cache=True, parallel=True)
def window_unpartition(win, ws, out):
    # win [nh*nw, ws*ws, C] -> out [H, W, C] (the padding is dropped)
    H, W, C = out.shape
    nw = (W + ws - 1) // ws
    for y in prange(H):
        for xx in range(W):
            w = (y // ws) * nw + xx // ws
            r = (y % ws) * ws + xx % ws
            for c in range(C):
                out[y, xx, c] = win[w, r, c]


@njit(cache=True, parallel=True)
def split_heads(x, transpose, out):
    # x [B, n, H*d] (any strides: a q/k/v view of the fused qkv rows) -> out [B, H, n, d],
    # or [B, H, d, n] when transposed (keys and values of the fused kernel)
    B, n = x.shape[0], x.shape[1]
    nh = out.shape[1]
    d = x.shape[2] // nh
    for t in prange(B * nh):
        b, h = t // nh, t % nh
        for i in range(n):
            for j in range(d):
                if transpose:
                    out[b, h, j, i] = x[b, i, h * d + j]
                else:
                    out[b, h, i, j] = x[b, i, h * d + j]


@njit(cache=True, parallel=True)
def merge_heads(x, out):
    # x [B, H, n, d] -> out [B, n, H*d]
    B, nh, n, d = x.shape
    for t in prange(B * n):
        b, i = t // n, t % n
        for h in range(nh):
            for j in range(d):
                out[b, i, h * d + j] = x[b, h, i, j]


@njit(cache=True, inline="always", fastmath=True)
def biased_exp_row(row, q, i, Rh, Rw, W, scale, rel_h, rel_w):
    """row [n] (query i's raw scores q.k) in place -> exp(row*scale + bias - max), returning its sum.
    bias: SAM's decomposed relative positions q.Rh[i // W, kh] + q.Rw[i % W, kw] for key (kh, kw),
    q unscaled; none when Rh is empty (CLIP). rel_h, rel_w: scratch of Rh's and Rw's key counts."""
    n = row.shape[0]
    d = q.shape[0]
    if Rh.shape[0] > 0:
        hq, wq = i // W, i % W
        for kh in range(Rh.shape[1]):
            s = np.float32(0.0)
            for c in range(d):
                s += q[c] * Rh[hq, kh, c]
            rel_h[kh] = s
        for kw in range(W):
            s = np.float32(0.0)
            for c in range(d):
                s += q[c] * Rw[wq, kw, c]
            rel_w[kw] = s
        for kh in range(Rh.shape[1]):
            for kw in range(W):
                row[kh * W + kw] = row[kh * W + kw] * scale + rel_h[kh] + rel_w[kw]
    else:
        for j in range(n):
            row[j] *= scale
    mx = np.float32(-np.inf)
    for j in range(n):
        mx = max(mx, row[j])
    total = np.float32(0.0)
    for j in range(n):
        e = exp_f32(row[j] - mx)
        row[j] = e
        total += e
    return total


@njit(cache=True, parallel=True, fastmath=True)
def softmax_relpos(scores, q, row0, Rh, Rw, W, scale):
    # scores [r, n] in place for query rows row0..row0+r-1 of one head (q [r, d], unscaled):
    # softmax(scores*scale + q.Rh[hq, kh] + q.Rw[wq, kw])  - SAM's decomposed relative positions
    r = scores.shape[0]
    for i in prange(r):
        rel_h = np.empty(Rh.shape[1], np.float32)
        rel_w = np.empty(Rw.shape[1], np.float32)
        inv = np.float32(1.0) / biased_exp_row(scores[i], q[i], row0 + i, Rh, Rw, W, scale, rel_h, rel_w)
        for j in range(scores.shape[1]):
            scores[i, j] *= inv


ROWS = 4    # query rows of attention_fused that share each key and value load


@njit(cache=True, parallel=True, fastmath=True)
def attention_fused(q, kt, vt, Rh, Rw, W, scale, out):
    # q [B, H, n, d], kt, vt [B, H, d, n] -> out [B, n, H*d]: softmax(q k^T * scale + bias) v per
    # head (bias as biased_exp_row), ROWS query rows at a time: their scores [ROWS, n] stay in cache.
    # QK^T accumulates key rows into the scores (vectorised over keys); PV is a dot per value
    # column (vectorised over keys). A last short group repeats the last row and drops it.
    B, nh, n, d = q.shape
    groups = (n + ROWS - 1) // ROWS
    for task in prange(B * nh * groups):
        b, h, g0 = task // (nh * groups), (task // groups) % nh, (task % groups) * ROWS
        s = np.empty((ROWS, n), np.float32)
        inv = np.empty(ROWS, np.float32)
        rel_h = np.empty(Rh.shape[1], np.float32)
        rel_w = np.empty(Rw.shape[1], np.float32)
        i0, i1, i2, i3 = g0, min(g0 + 1, n - 1), min(g0 + 2, n - 1), min(g0 + 3, n - 1)
        s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        s[:] = 0.0
        for c in range(d):
            a0, a1, a2, a3 = q[b, h, i0, c], q[b, h, i1, c], q[b, h, i2, c], q[b, h, i3, c]
            kr = kt[b, h, c]
            for j in range(n):
                kj = kr[j]
                s0[j] += a0 * kj
                s1[j] += a1 * kj
                s2[j] += a2 * kj
                s3[j] += a3 * kj
        for r in range(ROWS):
            i = min(g0 + r, n - 1)
            inv[r] = np.float32(1.0) / biased_exp_row(s[r], q[b, h, i], i, Rh, Rw, W, scale, rel_h, rel_w)
        for c in range(d):
            vr = vt[b, h, c]
            t0 = t1 = t2 = t3 = np.float32(0.0)
            for j in range(n):
                vj = vr[j]
                t0 += s0[j] * vj
                t1 += s1[j] * vj
                t2 += s2[j] * vj
                t3 += s3[j] * vj
            col = h * d + c
            out[b, i0, col] = t0 * inv[0]
            if g0 + 1 < n:
                out[b, i1, col] = t1 * inv[1]
            if g0 + 2 < n:
                out[b, i2, col] = t2 * inv[2]
            if g0 + 3 < n:
                out[b, i3, col] = t3 * inv[3]


@njit(cache=True, inline="always")
def prefix_keys(i, n_prefix):
    # how many keys query row i sees under the prefix mask: the whole prefix, or causally up to itself
    return n_prefix if i < n_prefix else i + 1


@njit(cache=True, parallel=True, fastmath=True)
def attention_prefix(q, kt, vt, n_prefix, scale, out):
    # q [H, n, d], kt, vt [H_kv, d, n] -> out [n, H*d]: softmax(q k^T * scale) v per head, query head
    # h reading kv head h // (H / H_kv), row i over keys [0, prefix_keys(i)). ROWS rows at a time
    # (a last short group repeats the last row and drops it); the group's products run over the
    # keys its last row sees, which the others' softmax zeroes past their own (prefix_keys grows
    # with i).
    nh, n, d = q.shape
    per_kv = nh // kt.shape[0]
    groups = (n + ROWS - 1) // ROWS
    for task in prange(nh * groups):
        h, g0 = task // groups, (task % groups) * ROWS
        kv = h // per_kv
        i0, i1, i2, i3 = g0, min(g0 + 1, n - 1), min(g0 + 2, n - 1), min(g0 + 3, n - 1)
        cols = prefix_keys(i3, n_prefix)
        s = np.zeros((ROWS, cols), np.float32)
        s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        for c in range(d):
            a0, a1, a2 = q[h, i0, c] * scale, q[h, i1, c] * scale, q[h, i2, c] * scale
            a3 = q[h, i3, c] * scale
            kr = kt[kv, c]
            for j in range(cols):
                kj = kr[j]
                s0[j] += a0 * kj
                s1[j] += a1 * kj
                s2[j] += a2 * kj
                s3[j] += a3 * kj
        for r in range(ROWS):
            keys = prefix_keys(min(g0 + r, n - 1), n_prefix)
            row = s[r]
            mx = np.float32(-np.inf)
            for j in range(keys):
                mx = max(mx, row[j])
            exp_normalize(row, keys, mx)
            for j in range(keys, cols):
                row[j] = 0.0
        for c in range(d):
            vr = vt[kv, c]
            t0 = t1 = t2 = t3 = np.float32(0.0)
            for j in range(cols):
                vj = vr[j]
                t0 += s0[j] * vj
                t1 += s1[j] * vj
                t2 += s2[j] * vj
                t3 += s3[j] * vj
            col = h * d + c
            out[i0, col] = t0
            if g0 + 1 < n:
                out[i1, col] = t1
            if g0 + 2 < n:
                out[i2, col] = t2
            if g0 + 3 < n:
                out[i3, col] = t3
