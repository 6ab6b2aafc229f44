"""Element decoding for the CUDA kernels: `weight_at` reads one element of any storage type
from its ggml blocks (laid out as `dsocr.quant.layout` defines) with exact float arithmetic and
no bit casts, so the kernels also run under numba's CUDA simulator.
"""
import math

from numba import cuda, float32, int32, int64

from dsocr.quant.layout import (BF16, F16, F32, F32_BYTES, F16_BYTES, BF16_BYTES, Q4_0, Q4_0_BYTES, Q4_0_D,
                                Q4_0_QS, Q4_1, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS, Q4_K, Q4_K_BYTES, Q4_K_D,
                                Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q5_0, Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS,
                                Q5_1, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, Q5_K, Q5_K_BYTES, Q5_K_D,
                                Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES, Q6_K, Q6_K_BYTES, Q6_K_D, Q6_K_QH,
                                Q6_K_QL, Q6_K_SCALES, Q8_0, Q8_0_BYTES, Q8_0_D, Q8_0_QS, QK4_0, QK4_1, QK5_0,
                                QK5_1, QK8_0, QK_K)


@cuda.jit(device=True)
def float_from_bits(b, n_mant, n_exp):
    """IEEE binary float with n_mant mantissa and n_exp exponent bits, given as an integer, as float32."""
    e = (b >> n_mant) & ((1 << n_exp) - 1)
    m = b & ((1 << n_mant) - 1)
    shift = (1 << (n_exp - 1)) - 1 + n_mant       # exponent bias + mantissa bits
    if e == 0:
        v = float32(m) * float32(2.0 ** (1 - shift))
    elif e == (1 << n_exp) - 1:
        v = float32(math.inf) if m == 0 else float32(math.nan)
    else:
        v = float32(m + (1 << n_mant)) * float32(2.0 ** (e - shift))
    return -v if (b >> (n_mant + n_exp)) & 1 else v


@cuda.jit(device=True)
def u16_at(W, r, o):
    return int64(W[r, o]) | (int64(W[r, o + 1]) << 8)


@cuda.jit(device=True)
def u32_at(W, r, o):
    return int64(W[r, o]) | (int64(W[r, o + 1]) << 8) | (int64(W[r, o + 2]) << 16) | (int64(W[r, o + 3]) << 24)


@cuda.jit(device=True)
def half_at(W, r, o):
    """IEEE half at bytes W[r, o:o+2] (little endian) as float32."""
    return float_from_bits(u16_at(W, r, o), 10, 5)


@cuda.jit(device=True)
def scale_min_k4(j, W, r, o):
    if j < 4:
        return int32(W[r, o + j]) & 63, int32(W[r, o + j + 4]) & 63
    sc = (int32(W[r, o + j + 4]) & 15) | ((int32(W[r, o + j - 4]) >> 6) << 4)
    m = (int32(W[r, o + j + 4]) >> 4) | ((int32(W[r, o + j]) >> 6) << 4)
    return sc, m


@cuda.jit(device=True)
def nibble(W, r, o, t, half):
    """Weight t of a block whose qs bytes start at W[r, o]: byte t % half, low nibble for t < half."""
    q = int32(W[r, o + t % half])
    return (q & 15) if t < half else (q >> 4)


@cuda.jit(device=True)
def q8_0_at(W, r, j):
    o, t = Q8_0_BYTES * (j // QK8_0), j % QK8_0
    v = int32(W[r, o + Q8_0_QS + t])
    return half_at(W, r, o + Q8_0_D) * float32(v - 256 if v > 127 else v)


@cuda.jit(device=True)
def q4_0_at(W, r, j):
    o, t = Q4_0_BYTES * (j // QK4_0), j % QK4_0
    q = nibble(W, r, o + Q4_0_QS, t, QK4_0 // 2)
    return half_at(W, r, o + Q4_0_D) * float32(q - 8)


@cuda.jit(device=True)
def q4_1_at(W, r, j):
    o, t = Q4_1_BYTES * (j // QK4_1), j % QK4_1
    q = nibble(W, r, o + Q4_1_QS, t, QK4_1 // 2)
    return half_at(W, r, o + Q4_1_D) * float32(q) + half_at(W, r, o + Q4_1_M)


@cuda.jit(device=True)
def q5_0_at(W, r, j):
    o, t = Q5_0_BYTES * (j // QK5_0), j % QK5_0
    q = nibble(W, r, o + Q5_0_QS, t, QK5_0 // 2) | (int32((u32_at(W, r, o + Q5_0_QH) >> t) & 1) << 4)
    return half_at(W, r, o + Q5_0_D) * float32(q - 16)


@cuda.jit(device=True)
def q5_1_at(W, r, j):
    o, t = Q5_1_BYTES * (j // QK5_1), j % QK5_1
    q = nibble(W, r, o + Q5_1_QS, t, QK5_1 // 2) | (int32((u32_at(W, r, o + Q5_1_QH) >> t) & 1) << 4)
    return half_at(W, r, o + Q5_1_D) * float32(q) + half_at(W, r, o + Q5_1_M)


@cuda.jit(device=True)
def q4_k_at(W, r, j):
    # weight w of a super-block: 64-weight chunk c, low (half 0) or high nibbles of its 32 bytes
    o, w = Q4_K_BYTES * (j // QK_K), j % QK_K
    c, half, l = w // 64, (w % 64) // 32, w % 32
    sc, m = scale_min_k4(2 * c + half, W, r, o + Q4_K_SCALES)
    q = int32(W[r, o + Q4_K_QS + 32 * c + l])
    q = (q & 15) if half == 0 else (q >> 4)
    return half_at(W, r, o + Q4_K_D) * float32(sc) * float32(q) - half_at(W, r, o + Q4_K_DMIN) * float32(m)


@cuda.jit(device=True)
def q5_k_at(W, r, j):
    # as Q4_K, plus bit 2c+half of qh byte l as the 5th bit
    o, w = Q5_K_BYTES * (j // QK_K), j % QK_K
    c, half, l = w // 64, (w % 64) // 32, w % 32
    sc, m = scale_min_k4(2 * c + half, W, r, o + Q5_K_SCALES)
    q = int32(W[r, o + Q5_K_QS + 32 * c + l])
    q = (q & 15) if half == 0 else (q >> 4)
    q |= ((int32(W[r, o + Q5_K_QH + l]) >> (2 * c + half)) & 1) << 4
    return half_at(W, r, o + Q5_K_D) * float32(sc) * float32(q) - half_at(W, r, o + Q5_K_DMIN) * float32(m)


@cuda.jit(device=True)
def q6_k_at(W, r, j):
    # 128-weight half h, quarter k: low 4 bits from ql (nibble k // 2), high 2 bits from qh >> 2k
    o, w = Q6_K_BYTES * (j // QK_K), j % QK_K
    h, k, l = w // 128, (w % 128) // 32, w % 32
    ql = int32(W[r, o + Q6_K_QL + 64 * h + 32 * (k & 1) + l])
    ql = (ql & 15) if k < 2 else (ql >> 4)
    qh = (int32(W[r, o + Q6_K_QH + 32 * h + l]) >> (2 * k)) & 3
    sc = int32(W[r, o + Q6_K_SCALES + 8 * h + 2 * k + l // 16])
    sc = sc - 256 if sc > 127 else sc
    return half_at(W, r, o + Q6_K_D) * float32(sc) * float32((ql | (qh << 4)) - 32)


@cuda.jit(device=True)
def weight_at(W, r, j, code):
    """Element j of row r of a ggml-typed weight stored as uint8 [rows, row_bytes]. Device code
    cannot raise (numba reports kernel exceptions only in debug builds), so an unknown code reads
    as NaN; CUDABackend.weight refuses such a tensor before it reaches a kernel."""
    if code == F32:
        return float_from_bits(u32_at(W, r, F32_BYTES * j), 23, 8)
    if code == F16:
        return half_at(W, r, F16_BYTES * j)
    if code == BF16:
        return float_from_bits(u16_at(W, r, BF16_BYTES * j), 7, 8)
    if code == Q8_0:
        return q8_0_at(W, r, j)
    if code == Q4_0:
        return q4_0_at(W, r, j)
    if code == Q4_1:
        return q4_1_at(W, r, j)
    if code == Q5_0:
        return q5_0_at(W, r, j)
    if code == Q5_1:
        return q5_1_at(W, r, j)
    if code == Q4_K:
        return q4_k_at(W, r, j)
    if code == Q5_K:
        return q5_k_at(W, r, j)
    if code == Q6_K:
        return q6_k_at(W, r, j)
    return float32(math.nan)
