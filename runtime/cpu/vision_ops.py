"""Vision-encoder kernels for the CPU backend (numba): im2col for the convolutions, SAM's window
partition with zero padding, and softmax with SAM's decomposed relative-position bias.
Attention products go through BLAS in row chunks (see CPUBackend.attention), so even SAM's
4096-token global attention never holds more than one chunk of one head's scores."""
import numpy as np
from numba import njit, prange

from dsocr.runtime.cpu.ops import exp_normalize


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


@njit(cache=True, parallel=True, fastmath=True)
def softmax_relpos(scores, q, row0, Rh, Rw, H, W, scale):
    # scores [r, H*W] in place for query rows row0..row0+r-1 of one head (q [r, d], unscaled):
    # softmax(scores*scale + q.Rh[hq, kh] + q.Rw[wq, kw])  - SAM's decomposed relative positions
    r, n = scores.shape
    d = q.shape[1]
    for i in prange(r):
        qi = row0 + i
        hq, wq = qi // W, qi % W
        rel_h = np.empty(H, np.float32)
        rel_w = np.empty(W, np.float32)
        for kh in range(H):
            s = np.float32(0.0)
            for c in range(d):
                s += q[i, c] * Rh[hq, kh, c]
            rel_h[kh] = s
        for kw in range(W):
            s = np.float32(0.0)
            for c in range(d):
                s += q[i, c] * Rw[wq, kw, c]
            rel_w[kw] = s
        mx = np.float32(-np.inf)
        for kh in range(H):
            for kw in range(W):
                v = scores[i, kh * W + kw] * scale + rel_h[kh] + rel_w[kw]
                scores[i, kh * W + kw] = v
                mx = max(mx, v)
        exp_normalize(scores[i], n, mx)
