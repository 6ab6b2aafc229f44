"""The quantized GEMM: out[m, n] = X[m, k] @ W[n, :]^T for many activation rows (prefill, routed
experts, vision) without dequantizing to float32.

ggml's way: the activation is quantized once to int8 blocks of 32 (q8_0), the weights are
decoded a tile of TILE_N rows at a time into their unsigned integer codes, interleaved 16 rows
by 4 bytes (the "repack" layout of ggml's CPU backend, built per tile, so no second copy of the
model is ever held), with one float scale and one float offset per group of G weights:

    w = scale * u - beta,  u in 0..255

(Q8_0: u = q + 128, beta = 128 d; Q4_0 / Q5_0: the stored nibbles, beta = 8 d / 16 d;
Q4_1 / Q5_1: beta = -m; Q4_K / Q5_K: scale = d sc, beta = dmin m per 32; Q6_K: groups of 16,
scale = d sc, beta = 32 d sc). `tile.py`'s micro-kernel then does the integer products with
vpdpbusd and one conversion and two FMAs per group. A decoded tile (TILE_N x k bytes) stays in
L1/L2 while every activation row passes over it, so the decode is paid once per weight per call.
"""
import numpy as np
from numba import njit, prange

from dsocr.quant.bits import load_fp16
from dsocr.quant.layout import (Q4_0, Q4_0_BYTES, Q4_0_D, Q4_0_QS, Q4_1, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS,
                                Q4_K, Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q5_0, Q5_0_BYTES,
                                Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS,
                                Q5_K, Q5_K_BYTES, Q5_K_QH, Q5_K_QS, Q6_K, Q6_K_BYTES, Q6_K_D, Q6_K_QH,
                                Q6_K_QL, Q6_K_SCALES, Q8_0, Q8_0_BYTES, Q8_0_D, Q8_0_QS, QK8_0, QK_K)
from dsocr.quant.rows import scale_min_k4
from dsocr.runtime.cpu.matmul import quantize_activation
from dsocr.runtime.cpu.tile import LANES, MR_MAX, NRG, STEP, TILE_N, load_u32, tile16, tile32

CODES = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
"""The weight types the quantized GEMM takes (float weights stay with BLAS)."""

# SPREAD[n]: bit b of the 4-bit n moved to bit 4 of byte b (Q5_0/Q5_1's fifth bits, 4 weights at a time)
SPREAD = np.array([sum(0x10 << (8 * b) for b in range(4) if n >> b & 1) for n in range(16)], np.int64)


@njit(cache=True)
def supported(code):
    for known in CODES:
        if code == known:
            return True
    return False


@njit(cache=True, inline="always")
def group_of(code):
    """Weights per scale group: Q6_K's sub-blocks are 16, every other type's 32."""
    return 16 if code == Q6_K else 32


# ---------------------------------------------------------------- 16 weight rows into the panel
# Each decoder fills row vector rg of the panel from the rows at byte offsets off[0..15]: for every
# (group, step) the 16 rows' 4 codes as 16 contiguous uint32 (lanes innermost, so the loop vectorizes
# into gathers where the host has them), and per (group, row) the scale and offset.

U4 = np.uint32(4)
LOW4 = np.uint32(0x0F0F0F0F)          # the low nibble of each of 4 bytes
BIT0 = np.uint32(0x01010101)
BITS01 = np.uint32(0x03030303)
SIGN = np.uint32(0x80808080)           # int8 -> its unsigned code (q + 128)


@njit(cache=True, inline="always")
def _slot(g, rg, s, steps):
    return ((g * NRG + rg) * steps + s) * LANES


@njit(cache=True, inline="always")
def _scale_slot(g, rg):
    return (g * NRG + rg) * LANES


@njit(cache=True)
def _decode_q8_0(w, k, rg, off, codes, scales, betas):
    for b in range(k // QK8_0):
        at = _scale_slot(b, rg)
        for lane in range(LANES):
            d = load_fp16(w, off[lane] + Q8_0_BYTES * b + Q8_0_D)
            scales[at + lane], betas[at + lane] = d, np.float32(128.0) * d
        for s in range(8):
            at = _slot(b, rg, s, 8)
            for lane in range(LANES):
                codes[at + lane] = load_u32(w, off[lane] + Q8_0_BYTES * b + Q8_0_QS + 4 * s) ^ SIGN


@njit(cache=True)
def _decode_q4(w, k, rg, off, codes, scales, betas, size, d_at, m_at, qs, qh_at):
    """Q4_0 / Q4_1 (qh_at < 0) and Q5_0 / Q5_1: low nibbles are weights 0-15, high ones 16-31, qh's
    bit j weight j's fifth bit; beta = 8 d (16 d) without a stored minimum (m_at < 0), else -m."""
    for b in range(k // QK8_0):
        at = _scale_slot(b, rg)
        for lane in range(LANES):
            o = off[lane] + size * b
            d = load_fp16(w, o + d_at)
            scales[at + lane] = d
            betas[at + lane] = -load_fp16(w, o + m_at) if m_at >= 0 else np.float32(8.0 if qh_at < 0 else 16.0) * d
        for s in range(4):
            lo, hi = _slot(b, rg, s, 8), _slot(b, rg, s + 4, 8)
            for lane in range(LANES):
                o = off[lane] + size * b
                v = load_u32(w, o + qs + 4 * s)
                codes[lo + lane] = v & LOW4
                codes[hi + lane] = (v >> U4) & LOW4
            if qh_at >= 0:
                for lane in range(LANES):
                    qh = load_u32(w, off[lane] + size * b + qh_at)
                    codes[lo + lane] |= np.uint32(SPREAD[(qh >> np.uint32(4 * s)) & np.uint32(15)])
                    codes[hi + lane] |= np.uint32(SPREAD[(qh >> np.uint32(16 + 4 * s)) & np.uint32(15)])


@njit(cache=True)
def _decode_k4(w, k, rg, off, codes, scales, betas, size, qs, five):
    """Q4_K / Q5_K: 32-byte chunk c holds sub-blocks 2c (low nibbles) and 2c+1 (high); Q5_K's qh bit
    2c (2c+1) of byte l is the fifth bit of their weight l."""
    for b in range(k // QK_K):
        for lane in range(LANES):
            o = off[lane] + size * b
            d, dmin = load_fp16(w, o + Q4_K_D), load_fp16(w, o + Q4_K_DMIN)   # Q5_K's head is Q4_K's
            for j in range(8):
                sc, m = scale_min_k4(j, w, o + Q4_K_SCALES)
                at = _scale_slot(8 * b + j, rg) + lane
                scales[at], betas[at] = d * np.float32(sc), dmin * np.float32(m)
        for c in range(4):
            for s in range(8):
                lo, hi = _slot(8 * b + 2 * c, rg, s, 8), _slot(8 * b + 2 * c + 1, rg, s, 8)
                for lane in range(LANES):
                    v = load_u32(w, off[lane] + size * b + qs + 32 * c + 4 * s)
                    codes[lo + lane] = v & LOW4
                    codes[hi + lane] = (v >> U4) & LOW4
                if five:
                    for lane in range(LANES):
                        h = load_u32(w, off[lane] + size * b + Q5_K_QH + 4 * s)
                        codes[lo + lane] |= ((h >> np.uint32(2 * c)) & BIT0) << U4
                        codes[hi + lane] |= ((h >> np.uint32(2 * c + 1)) & BIT0) << U4


@njit(cache=True)
def _decode_q6_k(w, k, rg, off, codes, scales, betas):
    """Q6_K, groups of 16: weight 32kk + l of half h: ql nibble kk//2 of byte 64h + 32(kk%2) + l,
    high bits (qh[32h + l] >> 2kk) & 3, scale byte 8h + 2kk + l//16."""
    for b in range(k // QK_K):
        for lane in range(LANES):
            o = off[lane] + Q6_K_BYTES * b
            d = load_fp16(w, o + Q6_K_D)
            for sub in range(16):
                scale = d * np.float32(np.int8(w[o + Q6_K_SCALES + sub]))
                at = _scale_slot(16 * b + sub, rg) + lane
                scales[at], betas[at] = scale, np.float32(32.0) * scale
        for half in range(2):
            for kk in range(4):
                for l4 in range(8):
                    at = _slot(16 * b + 8 * half + 2 * kk + l4 // 4, rg, l4 % 4, 4)
                    for lane in range(LANES):
                        o = off[lane] + Q6_K_BYTES * b
                        v = load_u32(w, o + Q6_K_QL + 64 * half + 32 * (kk & 1) + 4 * l4)
                        h = load_u32(w, o + Q6_K_QH + 32 * half + 4 * l4)
                        codes[at + lane] = ((v >> np.uint32(4 * (kk >> 1))) & LOW4) \
                            | (((h >> np.uint32(2 * kk)) & BITS01) << U4)


@njit(cache=True)
def decode_tile(code, w, first, row_bytes, rows, k, codes, scales, betas, off):
    """Weight rows first..first+rows-1 (row r at byte (first + r) * row_bytes of the flat weights w,
    k weights of ggml type `code`) into the panel; a partial tile's missing rows repeat its last row
    with zero scale and offset, so they add nothing."""
    for rg in range(NRG):
        for lane in range(LANES):
            off[lane] = (first + min(rg * LANES + lane, rows - 1)) * row_bytes
        if code == Q8_0:
            _decode_q8_0(w, k, rg, off, codes, scales, betas)
        elif code == Q4_0:
            _decode_q4(w, k, rg, off, codes, scales, betas, Q4_0_BYTES, Q4_0_D, -1, Q4_0_QS, -1)
        elif code == Q4_1:
            _decode_q4(w, k, rg, off, codes, scales, betas, Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS, -1)
        elif code == Q5_0:
            _decode_q4(w, k, rg, off, codes, scales, betas, Q5_0_BYTES, Q5_0_D, -1, Q5_0_QS, Q5_0_QH)
        elif code == Q5_1:
            _decode_q4(w, k, rg, off, codes, scales, betas, Q5_1_BYTES, Q5_1_D, Q5_1_M, Q5_1_QS, Q5_1_QH)
        elif code == Q4_K:
            _decode_k4(w, k, rg, off, codes, scales, betas, Q4_K_BYTES, Q4_K_QS, False)
        elif code == Q5_K:
            _decode_k4(w, k, rg, off, codes, scales, betas, Q5_K_BYTES, Q5_K_QS, True)
        else:
            _decode_q6_k(w, k, rg, off, codes, scales, betas)
    if rows < TILE_N:
        for g in range(scales.size // TILE_N):
            for r in range(rows, TILE_N):
                at = _scale_slot(g, r // LANES) + r % LANES
                scales[at], betas[at] = 0.0, 0.0


# ---------------------------------------------------------------- the GEMM

@njit(cache=True, parallel=True)
def qgemm_grouped(code, W3, X, starts, out, tasks):
    """out[i] = X[i] @ W3[e, :, :]^T for the rows starts[e] <= i < starts[e+1] of each e (W3: uint8
    [n_w, n, row_bytes] of a type in CODES; X float32 [m, k]), in one launch: the activation is
    quantized once, and each (weight matrix, tile of TILE_N rows) is one work item, split into
    `tasks` parallel tasks. A plain GEMM is one group (n_w = 1, starts = [0, m])."""
    if not supported(code):
        raise ValueError("the quantized GEMM does not take ggml type " + str(code))
    m, k = X.shape
    n, row_bytes = W3.shape[1], W3.shape[2]
    group = group_of(code)
    groups, steps = k // group, group // STEP
    xq = np.empty(m * k, np.int8)
    xd = np.empty(m * groups, np.float32)
    xs = np.empty(m * groups, np.float32)
    for i in prange(m):
        quantize_activation(X[i], xq[i * k:(i + 1) * k], xd[i * groups:(i + 1) * groups],
                        xs[i * groups:(i + 1) * groups], group)
    flat = W3.reshape(-1)
    used = np.nonzero(starts[1:] > starts[:-1])[0]       # weight matrices with rows routed to them
    n_tiles = (n + TILE_N - 1) // TILE_N
    items = used.size * n_tiles
    tasks = max(1, min(tasks, items))
    for t in prange(tasks):
        codes = np.empty(groups * NRG * steps * LANES, np.uint32)
        scales = np.empty(groups * NRG * LANES, np.float32)
        betas = np.empty(groups * NRG * LANES, np.float32)
        off = np.empty(LANES, np.int64)
        acc = np.empty(MR_MAX * TILE_N, np.float32)
        for item in range(t * items // tasks, (t + 1) * items // tasks):
            e, r0 = used[item // n_tiles], (item % n_tiles) * TILE_N
            rows = min(TILE_N, n - r0)
            decode_tile(code, flat, e * n + r0, row_bytes, rows, k, codes, scales, betas, off)
            for i0 in range(starts[e], starts[e + 1], MR_MAX):
                mr = min(MR_MAX, starts[e + 1] - i0)
                if group == 32:
                    tile32(codes, scales, betas, xq, xd, xs, i0, groups, k, acc, mr)
                else:
                    tile16(codes, scales, betas, xq, xd, xs, i0, groups, k, acc, mr)
                for i in range(mr):
                    for r in range(rows):
                        out[i0 + i, r0 + r] = acc[i * TILE_N + r]
    return out


def qgemm(code: int, W: np.ndarray, X: np.ndarray, out: np.ndarray, tasks: int) -> np.ndarray:
    """out[m, n] = X[m, k] @ W[n, :]^T  (W: uint8 [n, row_bytes] of a type in CODES, X float32)."""
    return qgemm_grouped(code, W[None], X, np.array([0, X.shape[0]], np.int64), out, tasks)
