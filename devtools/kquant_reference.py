"""Plain-numpy reference quantizers for the K-quants (gguf.quants has only their dequantizers).

Written independently of the numba kernels in `dsocr.quant.rows`, vectorised over blocks instead of
looping over them, and in the same float32 operation order as ggml's `quantize_row_q4_K_ref`,
`quantize_row_q5_K_ref` and `quantize_row_q6_K_ref`, so both reproduce ggml's bytes.
Slow; for tests and for checking the fast path. Each block is assembled field by field in
ggml's order; only type ids and block bytes come from `dsocr.quant.layout`.
"""
import numpy as np

from dsocr.quant.layout import Q4_K, Q4_K_BYTES, Q5_K, Q5_K_BYTES, Q6_K, Q6_K_BYTES, QK_K

f32 = np.float32


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int: add 1.5*2**23 in float32 and read the low mantissa bits."""
    bits = (np.asarray(v, np.float32) + f32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF).astype(np.int64) - 0x00400000


def _to_fp16_bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(np.float16).view(np.uint16)


def _fp16_value(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants (use_mad=false) for every row of x [m, n] at once.
    Returns (scale [m], the_min [m], L [m, n])."""
    m, n = x.shape
    vmin = x[:, 0].copy()
    vmax = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        vmin = np.where(x[:, i] < vmin, x[:, i], vmin)
        vmax = np.where(x[:, i] > vmax, x[:, i], vmax)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    vmin = np.where(vmin > 0, f32(0), vmin)
    flat = vmax == vmin
    span = np.where(flat, f32(1), vmax - vmin)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(nearest_int(iscale[:, None] * (x - vmin[:, None])), 0, nmax)
    best = np.zeros(m, np.float32)
    for i in range(n):
        diff = scale * L[:, i].astype(np.float32) + vmin - x[:, i]
        best = best + w[:, i] * (diff * diff)
    for step in range(nstep + 1):
        span = np.where(flat, f32(1), vmax - vmin)  # ggml re-reads the best min every step
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        Laux = np.clip(nearest_int(iscale[:, None] * (x - vmin[:, None])), 0, nmax)
        sum_l = np.zeros(m, np.float32)
        sum_l2 = np.zeros(m, np.float32)
        sum_xl = np.zeros(m, np.float32)
        for i in range(n):
            fl = Laux[:, i].astype(np.float32)
            sum_l = sum_l + w[:, i] * fl
            sum_l2 = sum_l2 + w[:, i] * fl * fl
            sum_xl = sum_xl + w[:, i] * fl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        clamp = this_min > 0
        this_min = np.where(clamp, f32(0), this_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        err = np.zeros(m, np.float32)
        for i in range(n):
            diff = this_scale * Laux[:, i].astype(np.float32) + this_min - x[:, i]
            err = err + w[:, i] * (diff * diff)
        take = ok & (err < best) & ~flat
        L = np.where(take[:, None], Laux, L)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale)
        vmin = np.where(take, this_min, vmin)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(np.float32), (-vmin).astype(np.float32), L


def make_qx_quants_rmse1(x, nmax):
    """ggml make_qx_quants(rmse_type=1, no weights) for every row of x [m, n].
    Returns (scale [m], L [m, n]) with L in [0, 2*nmax)."""
    m, n = x.shape
    first = np.argmax(np.abs(x), axis=1)          # first index of the largest |x|, as ggml's `>` scan
    vmax = x[np.arange(m), first]
    amax = np.abs(vmax)
    zero = amax < f32(1e-15)
    vmax_s = np.where(zero, f32(1), vmax)
    ww = x * x

    def fit(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(m, np.float32)
        suml2 = np.zeros(m, np.float32)
        for i in range(n):
            fl = l[:, i].astype(np.float32)
            sumlx = sumlx + ww[:, i] * x[:, i] * fl
            suml2 = suml2 + ww[:, i] * fl * fl
        return l, sumlx, suml2

    l, sumlx, suml2 = fit(f32(-nmax) / vmax_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0)).astype(np.float32)
    best = scale * sumlx
    L = l + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        lt, slx, sl2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / vmax_s)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = slx / sl2
        L = np.where(take[:, None], lt + nmax, L)
        scale = np.where(take, new_scale, scale)
        best = np.where(take, scale * slx, best)
    return np.where(zero, f32(0), scale).astype(np.float32), np.where(zero[:, None], 0, L)


def _pack_scales_k4(ls, lm):
    """[nb, 8] 6-bit scales and mins -> [nb, 12] bytes (ggml's k4 packing)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _superblocks_k4(x, nmax, rmin, rdelta, nstep):
    """Common part of Q4_K / Q5_K: returns d bits, dmin bits, packed scales and final L [nb, QK_K]."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, np.float32)
    for l in range(32):
        sum_x2 = sum_x2 + xs[:, l] * xs[:, l]
    av_x = np.sqrt(sum_x2 / f32(32))
    weights = av_x[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, QK_K)
    max_scale = np.zeros(nb, np.float32)
    max_min = np.zeros(nb, np.float32)
    for j in range(8):
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    d = _fp16_value(max_scale / f32(63))
    dmin = _fp16_value(max_min / f32(63))
    for j in range(8):
        dj = d * ls[:, j].astype(np.float32)
        dm = dmin * lm[:, j].astype(np.float32)
        live = dj != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(nearest_int((x[:, 32 * j:32 * j + 32] + dm[:, None]) / dj[:, None]), 0, nmax)
        L[:, 32 * j:32 * j + 32] = np.where(live[:, None], q, L[:, 32 * j:32 * j + 32])
    return _to_fp16_bits(d), _to_fp16_bits(dmin), _pack_scales_k4(ls, lm), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., k/QK_K*Q4_K_BYTES]."""
    shape = x.shape
    x = np.asarray(x, np.float32).reshape(-1, QK_K)
    d, dmin, scales, L = _superblocks_k4(x, 15, -1.0, 0.1, 20)
    L4 = L.reshape(-1, 4, 2, 32)
    qs = (L4[:, :, 0, :] | (L4[:, :, 1, :] << 4)).astype(np.uint8).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          scales, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BYTES)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., k/QK_K*Q5_K_BYTES]."""
    shape = x.shape
    x = np.asarray(x, np.float32).reshape(-1, QK_K)
    d, dmin, scales, L = _superblocks_k4(x, 31, -0.5, 0.1, 15)
    L4 = L.reshape(-1, 4, 2, 32)
    low = L4 & 0xF
    high = (L4 >> 4) & 1
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).astype(np.uint8).reshape(-1, 128)
    qh = np.zeros((x.shape[0], 32), np.int64)
    for c in range(4):
        qh |= high[:, c, 0, :] << (2 * c)
        qh |= high[:, c, 1, :] << (2 * c + 1)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          scales, qh.astype(np.uint8), qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q5_K_BYTES)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., k/QK_K*Q6_K_BYTES]."""
    shape = x.shape
    x = np.asarray(x, np.float32).reshape(-1, QK_K)
    nb = x.shape[0]
    scales, L = make_qx_quants_rmse1(x.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, QK_K)
    max_scale = np.zeros(nb, np.float32)
    max_abs = np.zeros(nb, np.float32)
    for ib in range(16):
        take = np.abs(scales[:, ib]) > max_abs
        max_abs = np.where(take, np.abs(scales[:, ib]), max_abs)
        max_scale = np.where(take, scales[:, ib], max_scale)
    zero = max_abs < f32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, f32(1), f32(-128) / np.where(zero, f32(1), max_scale))
    d = _fp16_value(f32(1) / iscale)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    for j in range(16):
        dj = d * sc[:, j].astype(np.float32)
        live = dj != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(nearest_int(x[:, 16 * j:16 * j + 16] / dj[:, None]), -32, 31) + 32
        L[:, 16 * j:16 * j + 16] = np.where(live[:, None], q, L[:, 16 * j:16 * j + 16])
    L = L.reshape(nb, 2, 4, 32)  # [block, half, quarter, l]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.astype(np.uint8).reshape(nb, 128), qh.astype(np.uint8).reshape(nb, 64),
                          sc.view(np.uint8), _to_fp16_bits(d).view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BYTES)


REFERENCE_QUANTIZERS = {Q4_K: quantize_q4_k, Q5_K: quantize_q5_k, Q6_K: quantize_q6_k}
