"""ggml block formats, one row at a time, in numba: the `quantize_row_<t>_ref` and
`dequantize_row_<t>` functions of ggml-quants.c, operation for operation in float32 so the
bytes are ggml's.

A row is a 1-D float32 array of k weights or the 1-D uint8 array of its blocks, laid out as
`dsocr.quant.layout` defines. The type code is ggml's type id (gguf.GGMLQuantizationType);
`quantize_row` / `dequantize_row` dispatch on it, and `quantize_rows` / `dequantize_rows` run
them in parallel over rows. Dispatching on an integer (rather than passing kernels around)
keeps numba's on-disk cache usable.
"""
import numpy as np
from numba import njit, prange

from dsocr.quant.bits import bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, load_fp16, nearest_int, store_fp16
from dsocr.quant.layout import (BF16, F16, F32, K_SCALE_SIZE, Q4_0, Q4_0_BYTES, Q4_0_D, Q4_0_QS, Q4_1,
                                Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K, Q4_K_BYTES, Q4_K_D, Q4_K_DMIN,
                                Q4_K_QS, Q4_K_SCALES, Q5_0, Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1,
                                Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, Q5_K, Q5_K_BYTES, Q5_K_D,
                                Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES, Q6_K, Q6_K_BYTES, Q6_K_D, Q6_K_QH,
                                Q6_K_QL, Q6_K_SCALES, Q8_0, Q8_0_BYTES, Q8_0_D, Q8_0_QS, QK4_0, QK4_1, QK5_0,
                                QK5_1, QK8_0, QK_K, check_code)

_0 = np.float32(0.0)
_1 = np.float32(1.0)
_HALF = np.float32(0.5)
_FLT_MAX = np.float32(3.4028234663852886e38)
_GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, inline="always")
def roundf(v):
    """C roundf: half away from zero (v - trunc(v) is exact in float32)."""
    t = np.trunc(v)
    if abs(v - t) >= _HALF:
        t += np.float32(1.0) if v > 0 else np.float32(-1.0)
    return t


# ---------------------------------------------------------------- F16 / BF16

@njit(cache=True)
def quantize_row_f16(x, out):
    for j in range(x.size):
        store_fp16(out, 2 * j, x[j])


@njit(cache=True)
def dequantize_row_f16(raw, out):
    h = raw.view(np.uint16)
    for j in range(out.size):
        out[j] = fp16_to_fp32(h[j])


@njit(cache=True)
def quantize_row_bf16(x, out):
    for j in range(x.size):
        h = fp32_to_bf16(x[j])
        out[2 * j] = np.uint8(h & 0xFF)
        out[2 * j + 1] = np.uint8(h >> 8)


@njit(cache=True)
def dequantize_row_bf16(raw, out):
    h = raw.view(np.uint16)
    for j in range(out.size):
        out[j] = bf16_to_fp32(h[j])


# ---------------------------------------------------------------- 32-weight blocks

@njit(cache=True, inline="always")
def _signed_absmax(x, start, n):
    """First value of largest magnitude, as ggml's q4_0/q5_0 search it."""
    amax = _0
    vmax = _0
    for j in range(start, start + n):
        if amax < abs(x[j]):
            amax = abs(x[j])
            vmax = x[j]
    return vmax


@njit(cache=True, inline="always")
def _min_max(x, start, n):
    vmin = _FLT_MAX
    vmax = -_FLT_MAX
    for j in range(start, start + n):
        if x[j] < vmin:
            vmin = x[j]
        if x[j] > vmax:
            vmax = x[j]
    return vmin, vmax


@njit(cache=True)
def quantize_row_q8_0(x, out):
    for b in range(x.size // QK8_0):
        o = b * Q8_0_BYTES
        amax = _0
        for j in range(b * QK8_0, b * QK8_0 + QK8_0):
            amax = max(amax, abs(x[j]))
        d = amax / np.float32(127.0)
        idd = _1 / d if d != _0 else _0
        store_fp16(out, o + Q8_0_D, d)
        for j in range(QK8_0):
            out[o + Q8_0_QS + j] = np.uint8(np.int64(roundf(x[b * QK8_0 + j] * idd)) & 0xFF)


@njit(cache=True)
def dequantize_row_q8_0(raw, out):
    for b in range(out.size // QK8_0):
        o = b * Q8_0_BYTES
        d = load_fp16(raw, o + Q8_0_D)
        for j in range(QK8_0):
            out[b * QK8_0 + j] = np.float32(np.int8(raw[o + Q8_0_QS + j])) * d


@njit(cache=True)
def quantize_row_q4_0(x, out):
    # qs byte j: low nibble = weight j, high nibble = weight j + QK4_0/2
    half = QK4_0 // 2
    for b in range(x.size // QK4_0):
        o = b * Q4_0_BYTES
        d = _signed_absmax(x, b * QK4_0, QK4_0) / np.float32(-8.0)
        idd = _1 / d if d != _0 else _0
        store_fp16(out, o + Q4_0_D, d)
        for j in range(half):
            q0 = min(15, np.int64(x[b * QK4_0 + j] * idd + np.float32(8.5)))
            q1 = min(15, np.int64(x[b * QK4_0 + half + j] * idd + np.float32(8.5)))
            out[o + Q4_0_QS + j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True)
def dequantize_row_q4_0(raw, out):
    half = QK4_0 // 2
    for b in range(out.size // QK4_0):
        o = b * Q4_0_BYTES
        d = load_fp16(raw, o + Q4_0_D)
        for j in range(half):
            q = raw[o + Q4_0_QS + j]
            out[b * QK4_0 + j] = np.float32(np.int64(q & 0xF) - 8) * d
            out[b * QK4_0 + half + j] = np.float32(np.int64(q >> 4) - 8) * d


@njit(cache=True)
def quantize_row_q4_1(x, out):
    half = QK4_1 // 2
    for b in range(x.size // QK4_1):
        o = b * Q4_1_BYTES
        vmin, vmax = _min_max(x, b * QK4_1, QK4_1)
        d = (vmax - vmin) / np.float32(15.0)
        idd = _1 / d if d != _0 else _0
        store_fp16(out, o + Q4_1_D, d)
        store_fp16(out, o + Q4_1_M, vmin)
        for j in range(half):
            q0 = min(15, np.int64((x[b * QK4_1 + j] - vmin) * idd + _HALF))
            q1 = min(15, np.int64((x[b * QK4_1 + half + j] - vmin) * idd + _HALF))
            out[o + Q4_1_QS + j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True)
def dequantize_row_q4_1(raw, out):
    half = QK4_1 // 2
    for b in range(out.size // QK4_1):
        o = b * Q4_1_BYTES
        d = load_fp16(raw, o + Q4_1_D)
        m = load_fp16(raw, o + Q4_1_M)
        for j in range(half):
            q = raw[o + Q4_1_QS + j]
            out[b * QK4_1 + j] = np.float32(q & 0xF) * d + m
            out[b * QK4_1 + half + j] = np.float32(q >> 4) * d + m


@njit(cache=True, inline="always")
def _store_q5(out, o, q0, q1, j, qh):
    """Pack weights j and j+16 of a 5-bit block (qs at out[o:]); returns qh with their 5th bits set."""
    out[o + j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
    return qh | ((q0 >> 4) << j) | ((q1 >> 4) << (j + 16))


@njit(cache=True, inline="always")
def _store_u32(out, o, v):
    for i in range(4):
        out[o + i] = np.uint8((v >> (8 * i)) & 0xFF)


@njit(cache=True, inline="always")
def _load_u32(raw, o):
    return (np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8) | (np.int64(raw[o + 2]) << 16)
            | (np.int64(raw[o + 3]) << 24))


@njit(cache=True)
def quantize_row_q5_0(x, out):
    half = QK5_0 // 2
    for b in range(x.size // QK5_0):
        o = b * Q5_0_BYTES
        d = _signed_absmax(x, b * QK5_0, QK5_0) / np.float32(-16.0)
        idd = _1 / d if d != _0 else _0
        store_fp16(out, o + Q5_0_D, d)
        qh = 0
        for j in range(half):
            q0 = min(31, np.int64(x[b * QK5_0 + j] * idd + np.float32(16.5)))
            q1 = min(31, np.int64(x[b * QK5_0 + half + j] * idd + np.float32(16.5)))
            qh = _store_q5(out, o + Q5_0_QS, q0, q1, j, qh)
        _store_u32(out, o + Q5_0_QH, qh)


@njit(cache=True)
def dequantize_row_q5_0(raw, out):
    half = QK5_0 // 2
    for b in range(out.size // QK5_0):
        o = b * Q5_0_BYTES
        d = load_fp16(raw, o + Q5_0_D)
        qh = _load_u32(raw, o + Q5_0_QH)
        for j in range(half):
            q = raw[o + Q5_0_QS + j]
            q0 = np.int64(q & 0xF) | (((qh >> j) & 1) << 4)
            q1 = np.int64(q >> 4) | (((qh >> (j + half)) & 1) << 4)
            out[b * QK5_0 + j] = np.float32(q0 - 16) * d
            out[b * QK5_0 + half + j] = np.float32(q1 - 16) * d


@njit(cache=True)
def quantize_row_q5_1(x, out):
    half = QK5_1 // 2
    for b in range(x.size // QK5_1):
        o = b * Q5_1_BYTES
        vmin, vmax = _min_max(x, b * QK5_1, QK5_1)
        d = (vmax - vmin) / np.float32(31.0)
        idd = _1 / d if d != _0 else _0
        store_fp16(out, o + Q5_1_D, d)
        store_fp16(out, o + Q5_1_M, vmin)
        qh = 0
        for j in range(half):
            q0 = min(31, np.int64((x[b * QK5_1 + j] - vmin) * idd + _HALF))
            q1 = min(31, np.int64((x[b * QK5_1 + half + j] - vmin) * idd + _HALF))
            qh = _store_q5(out, o + Q5_1_QS, q0, q1, j, qh)
        _store_u32(out, o + Q5_1_QH, qh)


@njit(cache=True)
def dequantize_row_q5_1(raw, out):
    half = QK5_1 // 2
    for b in range(out.size // QK5_1):
        o = b * Q5_1_BYTES
        d = load_fp16(raw, o + Q5_1_D)
        m = load_fp16(raw, o + Q5_1_M)
        qh = _load_u32(raw, o + Q5_1_QH)
        for j in range(half):
            q = raw[o + Q5_1_QS + j]
            q0 = np.int64(q & 0xF) | (((qh >> j) & 1) << 4)
            q1 = np.int64(q >> 4) | (((qh >> (j + half)) & 1) << 4)
            out[b * QK5_1 + j] = np.float32(q0) * d + m
            out[b * QK5_1 + half + j] = np.float32(q1) * d + m


# ---------------------------------------------------------------- K-quants (256-weight super-blocks)

@njit(cache=True)
def make_qkx2_quants(x, weights, L, Laux, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants with use_mad=false: fit x ~ scale*L - min, L in [0, nmax].
    Returns (scale, the_min)."""
    n = x.size
    fmax_q = np.float32(nmax)
    vmin = x[0]
    vmax = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < vmin:
            vmin = x[i]
        if x[i] > vmax:
            vmax = x[i]
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if vmin > _0:
        vmin = _0
    if vmax == vmin:
        for i in range(n):
            L[i] = 0
        return _0, -vmin
    iscale = fmax_q / (vmax - vmin)
    scale = _1 / iscale
    best_error = _0
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - vmin))))
        L[i] = l
        diff = scale * np.float32(l) + vmin - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax_q) / (vmax - vmin)
        sum_l = _0
        sum_l2 = _0
        sum_xl = _0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - vmin))))
            Laux[i] = l
            fl = np.float32(l)
            w = weights[i]
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _0:
                this_min = _0
                this_scale = sum_xl / sum_l2
            cur_error = _0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@njit(cache=True)
def make_qx_quants_rmse1(x, L, nmax):
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): symmetric fit, L in [0, 2*nmax)."""
    n = x.size
    vmax = _0
    amax = _0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < _GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _0
    fnmax = np.float32(nmax)
    iscale = np.float32(-nmax) / vmax
    sumlx = _0
    suml2 = _0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    scale = sumlx / suml2 if suml2 != _0 else _0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(step)) / vmax
        sumlx = _0
        suml2 = _0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            sumlx += w * x[i] * np.float32(l)
            suml2 += w * np.float32(l) * np.float32(l)
        if suml2 > _0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, inline="always")
def scale_min_k4(j, raw, o):
    """get_scale_min_k4: the 6-bit scale and min of sub-block j from the 12 packed bytes at raw[o:]."""
    if j < 4:
        return np.int64(raw[o + j] & 63), np.int64(raw[o + j + 4] & 63)
    sc = np.int64(raw[o + j + 4] & 0xF) | (np.int64(raw[o + j - 4] >> 6) << 4)
    m = np.int64(raw[o + j + 4] >> 4) | (np.int64(raw[o + j] >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _pack_scales_k4(out, o, j, ls, lm):
    if j < 4:
        out[o + j] = np.uint8(ls)
        out[o + j + 4] = np.uint8(lm)
    else:
        out[o + j + 4] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
        out[o + j - 4] |= np.uint8((ls >> 4) << 6)
        out[o + j] |= np.uint8((lm >> 4) << 6)


@njit(cache=True, inline="always")
def _quantize_superblock_k4(xb, out, o, L, nmax, rmin, rdelta, nstep):
    """Shared head of quantize_row_q4_K_ref / q5_K_ref: sub-block fits, packed 6-bit scales/mins,
    d/dmin, and the final L (weights re-quantized against the stored scales). The two formats
    share the offsets of d, dmin and scales (Q4_K's names are used; quant.layout checks them equal)."""
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    weights = np.empty(32, np.float32)
    Laux = np.empty(32, np.int64)
    max_scale = _0
    max_min = _0
    for j in range(8):
        xs = xb[32 * j:32 * j + 32]
        sum_x2 = _0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(xs, weights, L[32 * j:32 * j + 32], Laux,
                                              nmax, rmin, rdelta, nstep)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(63.0) / max_scale if max_scale > _0 else _0
    inv_min = np.float32(63.0) / max_min if max_min > _0 else _0
    for i in range(K_SCALE_SIZE):
        out[o + Q4_K_SCALES + i] = 0
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        _pack_scales_k4(out, o + Q4_K_SCALES, j, ls, lm)
    store_fp16(out, o + Q4_K_D, max_scale / np.float32(63.0))
    store_fp16(out, o + Q4_K_DMIN, max_min / np.float32(63.0))
    d_all = load_fp16(out, o + Q4_K_D)
    dmin_all = load_fp16(out, o + Q4_K_DMIN)
    for j in range(8):
        sc, m = scale_min_k4(j, out, o + Q4_K_SCALES)
        d = d_all * np.float32(sc)
        if d == _0:
            continue
        dm = dmin_all * np.float32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((xb[32 * j + ii] + dm) / d)))


@njit(cache=True)
def quantize_row_q4_k(x, out):
    L = np.empty(QK_K, np.int64)
    for b in range(x.size // QK_K):
        o = b * Q4_K_BYTES
        _quantize_superblock_k4(x[b * QK_K:(b + 1) * QK_K], out, o, L, 15,
                                np.float32(-1.0), np.float32(0.1), 20)
        for c in range(4):  # 64 weights per 32 bytes: low nibble l, high nibble l+32
            for l in range(32):
                out[o + Q4_K_QS + 32 * c + l] = np.uint8(L[64 * c + l] | (L[64 * c + l + 32] << 4))


@njit(cache=True)
def dequantize_row_q4_k(raw, out):
    for b in range(out.size // QK_K):
        o = b * Q4_K_BYTES
        d = load_fp16(raw, o + Q4_K_D)
        dmin = load_fp16(raw, o + Q4_K_DMIN)
        for c in range(4):
            sc, m = scale_min_k4(2 * c, raw, o + Q4_K_SCALES)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            sc, m = scale_min_k4(2 * c + 1, raw, o + Q4_K_SCALES)
            d2 = d * np.float32(sc)
            m2 = dmin * np.float32(m)
            for l in range(32):
                q = raw[o + Q4_K_QS + 32 * c + l]
                out[b * QK_K + 64 * c + l] = d1 * np.float32(q & 0xF) - m1
                out[b * QK_K + 64 * c + 32 + l] = d2 * np.float32(q >> 4) - m2


@njit(cache=True)
def quantize_row_q5_k(x, out):
    L = np.empty(QK_K, np.int64)
    for b in range(x.size // QK_K):
        o = b * Q5_K_BYTES
        _quantize_superblock_k4(x[b * QK_K:(b + 1) * QK_K], out, o, L, 31,
                                np.float32(-0.5), np.float32(0.1), 15)
        for l in range(QK_K // 8):
            out[o + Q5_K_QH + l] = 0
        for c in range(4):
            m1 = 1 << (2 * c)
            for j in range(32):
                l1 = L[64 * c + j]
                if l1 > 15:
                    l1 -= 16
                    out[o + Q5_K_QH + j] |= np.uint8(m1)
                l2 = L[64 * c + j + 32]
                if l2 > 15:
                    l2 -= 16
                    out[o + Q5_K_QH + j] |= np.uint8(m1 << 1)
                out[o + Q5_K_QS + 32 * c + j] = np.uint8(l1 | (l2 << 4))


@njit(cache=True)
def dequantize_row_q5_k(raw, out):
    for b in range(out.size // QK_K):
        o = b * Q5_K_BYTES
        d = load_fp16(raw, o + Q5_K_D)
        dmin = load_fp16(raw, o + Q5_K_DMIN)
        for c in range(4):
            sc, m = scale_min_k4(2 * c, raw, o + Q5_K_SCALES)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            sc, m = scale_min_k4(2 * c + 1, raw, o + Q5_K_SCALES)
            d2 = d * np.float32(sc)
            m2 = dmin * np.float32(m)
            for l in range(32):
                q = raw[o + Q5_K_QS + 32 * c + l]
                h = raw[o + Q5_K_QH + l] >> (2 * c)
                out[b * QK_K + 64 * c + l] = d1 * np.float32((q & 0xF) + ((h & 1) << 4)) - m1
                out[b * QK_K + 64 * c + 32 + l] = d2 * np.float32((q >> 4) + ((h & 2) << 3)) - m2


@njit(cache=True)
def quantize_row_q6_k(x, out):
    # ql: low 4 bits, qh: high 2 bits, scales: int8 per 16 weights; w = d*sc*(q-32)
    L = np.empty(QK_K, np.int64)
    scales = np.empty(16, np.float32)
    for b in range(x.size // QK_K):
        o = b * Q6_K_BYTES
        xb = x[b * QK_K:(b + 1) * QK_K]
        max_scale = _0
        max_abs_scale = _0
        for ib in range(16):
            scales[ib] = make_qx_quants_rmse1(xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 32)
            if abs(scales[ib]) > max_abs_scale:
                max_abs_scale = abs(scales[ib])
                max_scale = scales[ib]
        if max_abs_scale < _GROUP_MAX_EPS:
            for i in range(Q6_K_BYTES):
                out[o + i] = 0
            continue
        iscale = np.float32(-128.0) / max_scale
        store_fp16(out, o + Q6_K_D, _1 / iscale)
        for ib in range(16):
            out[o + Q6_K_SCALES + ib] = np.uint8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)
        d_all = load_fp16(out, o + Q6_K_D)
        for j in range(16):
            d = d_all * np.float32(np.int8(out[o + Q6_K_SCALES + j]))
            if d == _0:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-32, min(31, nearest_int(xb[16 * j + ii] / d))) + 32
        for half in range(2):
            ql = o + Q6_K_QL + 64 * half
            qh = o + Q6_K_QH + 32 * half
            Lh = L[128 * half:128 * half + 128]
            for l in range(32):
                out[ql + l] = np.uint8((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4))
                out[ql + l + 32] = np.uint8((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4))
                out[qh + l] = np.uint8((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2)
                                       | ((Lh[l + 64] >> 4) << 4) | ((Lh[l + 96] >> 4) << 6))


@njit(cache=True)
def dequantize_row_q6_k(raw, out):
    for b in range(out.size // QK_K):
        o = b * Q6_K_BYTES
        d = load_fp16(raw, o + Q6_K_D)
        for half in range(2):
            ql = o + Q6_K_QL + 64 * half
            qh = o + Q6_K_QH + 32 * half
            sc = o + Q6_K_SCALES + 8 * half
            y = b * QK_K + 128 * half
            for l in range(32):
                isc = l // 16
                h = np.int64(raw[qh + l])
                q1 = (np.int64(raw[ql + l] & 0xF) | ((h & 3) << 4)) - 32
                q2 = (np.int64(raw[ql + l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
                q3 = (np.int64(raw[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = (np.int64(raw[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                out[y + l] = d * np.float32(np.int8(raw[sc + isc])) * np.float32(q1)
                out[y + l + 32] = d * np.float32(np.int8(raw[sc + isc + 2])) * np.float32(q2)
                out[y + l + 64] = d * np.float32(np.int8(raw[sc + isc + 4])) * np.float32(q3)
                out[y + l + 96] = d * np.float32(np.int8(raw[sc + isc + 6])) * np.float32(q4)


# ---------------------------------------------------------------- dispatch

@njit(cache=True)
def quantize_row(code, x, out):
    """Quantize one float32 row into `out` (uint8 blocks) as ggml type `code`. Not inlined, so the
    raise for an unknown code stays out of quantize_rows' parallel loop (which checks first)."""
    if code == F32:
        out[:] = x.view(np.uint8)
    elif code == F16:
        quantize_row_f16(x, out)
    elif code == BF16:
        quantize_row_bf16(x, out)
    elif code == Q8_0:
        quantize_row_q8_0(x, out)
    elif code == Q4_0:
        quantize_row_q4_0(x, out)
    elif code == Q4_1:
        quantize_row_q4_1(x, out)
    elif code == Q5_0:
        quantize_row_q5_0(x, out)
    elif code == Q5_1:
        quantize_row_q5_1(x, out)
    elif code == Q4_K:
        quantize_row_q4_k(x, out)
    elif code == Q5_K:
        quantize_row_q5_k(x, out)
    elif code == Q6_K:
        quantize_row_q6_k(x, out)
    else:
        raise ValueError("unsupported ggml type code " + str(code))


@njit(cache=True)
def dequantize_row(code, raw, out):
    """Dequantize one row of ggml type `code` (uint8 blocks) into float32 `out` (not inlined: see
    quantize_row)."""
    if code == F32:
        out[:] = raw.view(np.float32)
    elif code == F16:
        dequantize_row_f16(raw, out)
    elif code == BF16:
        dequantize_row_bf16(raw, out)
    elif code == Q8_0:
        dequantize_row_q8_0(raw, out)
    elif code == Q4_0:
        dequantize_row_q4_0(raw, out)
    elif code == Q4_1:
        dequantize_row_q4_1(raw, out)
    elif code == Q5_0:
        dequantize_row_q5_0(raw, out)
    elif code == Q5_1:
        dequantize_row_q5_1(raw, out)
    elif code == Q4_K:
        dequantize_row_q4_k(raw, out)
    elif code == Q5_K:
        dequantize_row_q5_k(raw, out)
    elif code == Q6_K:
        dequantize_row_q6_k(raw, out)
    else:
        raise ValueError("unsupported ggml type code " + str(code))


@njit(cache=True, parallel=True)
def quantize_rows(code, x, out):
    """x: float32 [n, k] -> out: uint8 [n, row_bytes], rows in parallel."""
    check_code(code)
    for i in prange(x.shape[0]):
        quantize_row(code, x[i], out[i])


@njit(cache=True, parallel=True)
def dequantize_rows(code, raw, out):
    """raw: uint8 [n, row_bytes] -> out: float32 [n, k], rows in parallel."""
    check_code(code)
    for i in prange(raw.shape[0]):
        dequantize_row(code, raw[i], out[i])
