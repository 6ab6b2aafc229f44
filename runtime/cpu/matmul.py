"""Matrix products against ggml-typed weights, for every storage type.

* One activation row (decode): `gemv`. Memory-bound, so the weights are read once, straight
  from their ggml blocks (mmap), through the per-block SIMD kernels of `simd.py`; the
  activation is quantized once per call to int8 blocks of 32 (ggml's q8 trick: integer
  products of the block, one float multiply per block). Float weights use a float dot.
  On AVX-512 VNNI hosts Q8_0, Q5_0, Q4_K and Q6_K rows go through the vpdpbusd kernels (`dot_*_vnni`,
  two blocks per instruction); elsewhere, and for the other types, the portable ones.
* Many rows of float weights (the F16 mmproj): `gemm`. Compute-bound, so weight rows are
  dequantized a chunk at a time into a reused float32 buffer and multiplied by BLAS (numpy's
  sgemm); the chunk keeps memory flat. Quantized weights take the int8 GEMM (`qgemm.py`).

Weights are 2-D uint8 arrays [rows, row_bytes] (3-D [n_expert, rows, row_bytes] for routed
experts) of blocks laid out as `dsocr.quant.layout` defines; `code` is the ggml type id.
"""
from functools import lru_cache

import numpy as np
import numba
from numba import njit, prange

from dsocr.quant.bits import bf16_to_fp32, fp16_to_fp32, load_fp16, nearest_int
from dsocr.quant.layout import (BF16, BF16_BYTES, F16, F16_BYTES, F32, F32_BYTES, Q4_0, Q4_0_BYTES, Q4_0_QS,
                                Q4_1, Q4_1_BYTES, Q4_1_M, Q4_1_QS, Q4_K, Q4_K_BYTES, Q4_K_D, Q4_K_DMIN,
                                Q4_K_QS, Q4_K_SCALES, Q5_0, Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1,
                                Q5_1_BYTES, Q5_1_M, Q5_1_QH, Q5_1_QS, Q5_K, Q5_K_BYTES, Q5_K_D, Q5_K_DMIN,
                                Q5_K_QH, Q5_K_QS, Q5_K_SCALES, Q6_K, Q6_K_BYTES, Q6_K_D, Q6_K_QH, Q6_K_QL,
                                Q6_K_SCALES, Q8_0, Q8_0_BYTES, Q8_0_D, Q8_0_QS, QK8_0, QK_K, check_code)
from dsocr.quant.rows import _load_u32, dequantize_rows, scale_min_k4
from dsocr.runtime.cpu import simd
from dsocr.runtime.cpu.features import AVX512_VNNI
from dsocr.runtime.cpu.simd import BLOCK

ACC = 32    # scratch floats per row: four 8-lane slots (two 16-lane ones for the VNNI kernels; simd.sum32)
SUB_BLOCKS = QK_K // QK8_0   # activation q8 blocks per K-quant super-block


@njit(cache=True)
def quantize_activation(x, xq, xd, xs, group=QK8_0):
    """x [k] -> quants xq [k] (int16 or int8), ggml's q8_0 per-32 scales and rounding; per group of
    `group` weights (32, or 16 for the int8 GEMM's Q6_K) its block's scale xd and xd * sum(quants)
    (for the formats that store a minimum or an offset). k is a multiple of 32."""
    per = QK8_0 // group
    for b in range(x.size // QK8_0):
        amax = np.float32(0.0)
        for j in range(QK8_0 * b, QK8_0 * b + QK8_0):
            amax = max(amax, abs(x[j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for h in range(per):
            total = 0
            for j in range(QK8_0 * b + group * h, QK8_0 * b + group * (h + 1)):
                q = nearest_int(x[j] * inv)
                xq[j] = q
                total += q
            xd[per * b + h] = d
            xs[per * b + h] = d * np.float32(total)


@njit(cache=True, inline="always")
def _reset(acc):
    for i in range(ACC):
        acc[i] = 0.0


@njit(cache=True, inline="always")
def _total(acc):
    return simd.sum32(acc)


# ---------------------------------------------------------------- one row: w . x

@njit(cache=True, fastmath=True)
def dot_f32(w, base, x, acc):
    _reset(acc)
    nb = x.size // BLOCK
    for b in range(nb):
        simd.block_f32(acc, b & 3, w, base + F32_BYTES * BLOCK * b, x, BLOCK * b, np.float32(1.0))
    s = _total(acc)
    wf = w.view(np.float32)
    for j in range(BLOCK * nb, x.size):
        s += wf[base // F32_BYTES + j] * x[j]
    return s


@njit(cache=True, fastmath=True)
def dot_f16(w, base, x, acc):
    _reset(acc)
    nb = x.size // BLOCK
    for b in range(nb):
        simd.block_f16(acc, b & 3, w, base + F16_BYTES * BLOCK * b, x, BLOCK * b, np.float32(1.0))
    s = _total(acc)
    wh = w.view(np.uint16)
    for j in range(BLOCK * nb, x.size):
        s += fp16_to_fp32(wh[base // F16_BYTES + j]) * x[j]
    return s


@njit(cache=True, fastmath=True)
def dot_bf16(w, base, x, acc):
    _reset(acc)
    nb = x.size // BLOCK
    for b in range(nb):
        simd.block_bf16(acc, b & 3, w, base + BF16_BYTES * BLOCK * b, x, BLOCK * b, np.float32(1.0))
    s = _total(acc)
    wh = w.view(np.uint16)
    for j in range(BLOCK * nb, x.size):
        s += bf16_to_fp32(wh[base // BF16_BYTES + j]) * x[j]
    return s


@njit(cache=True, fastmath=True)
def dot_q8_0(w, base, xq, xd, acc):
    _reset(acc)
    for b in range(xd.size):
        simd.block_q8_0(acc, b & 3, w, base + Q8_0_BYTES * b + Q8_0_QS, 0, 0, xq, QK8_0 * b, xd[b], xd[b])
    return _total(acc)


@njit(cache=True, fastmath=True)
def dot_q8_0_vnni(w, base, xb, xd, acc):
    """dot_q8_0 through vpdpbusd, two blocks a call (xb: the activation quants as int8)."""
    _reset(acc)
    nb = xd.size
    for p in range(nb // 2):
        b = 2 * p
        simd.block_q8_0_pair_vnni(acc, p & 1, w, base + Q8_0_BYTES * b + Q8_0_QS, xb, QK8_0 * b, xd[b], xd[b + 1])
    s = _total(acc)
    if nb & 1:     # an odd last block: scalar
        o, b = base + Q8_0_BYTES * (nb - 1), nb - 1
        t = 0
        for j in range(QK8_0):
            t += np.int64(np.int8(w[o + Q8_0_QS + j])) * np.int64(xb[QK8_0 * b + j])
        s += load_fp16(w, o + Q8_0_D) * xd[b] * np.float32(t)
    return s


@njit(cache=True, fastmath=True)
def dot_q4_0(w, base, xq, xd, acc):
    _reset(acc)
    for b in range(xd.size):
        simd.block_q4_0(acc, b & 3, w, base + Q4_0_BYTES * b + Q4_0_QS, 0, 0, xq, QK8_0 * b, xd[b], xd[b])
    return _total(acc)


@njit(cache=True, fastmath=True)
def dot_q4_1(w, base, xq, xd, xs, acc):
    _reset(acc)
    mins = np.float32(0.0)
    for b in range(xd.size):
        o = base + Q4_1_BYTES * b
        simd.block_q4_1(acc, b & 3, w, o + Q4_1_QS, 0, 0, xq, QK8_0 * b, xd[b], xd[b])
        mins += load_fp16(w, o + Q4_1_M) * xs[b]
    return _total(acc) + mins


@njit(cache=True, fastmath=True)
def dot_q5_0(w, base, xq, xd, acc):
    _reset(acc)
    for b in range(xd.size):
        o = base + Q5_0_BYTES * b
        simd.block_q5_0(acc, b & 3, w, o + Q5_0_QS, _load_u32(w, o + Q5_0_QH), 0, xq, QK8_0 * b, xd[b], xd[b])
    return _total(acc)


@njit(cache=True, fastmath=True)
def dot_q5_0_vnni(w, base, xb, xd, acc):
    """dot_q5_0 through vpdpbusd, two blocks a call (xb: the activation quants as int8)."""
    _reset(acc)
    nb = xd.size
    for p in range(nb // 2):
        b = 2 * p
        simd.block_q5_0_pair_vnni(acc, p & 1, w, base + Q5_0_BYTES * b, xb, QK8_0 * b, xd[b], xd[b + 1])
    s = _total(acc)
    if nb & 1:     # an odd last block: scalar
        b = nb - 1
        o = base + Q5_0_BYTES * b
        qh = _load_u32(w, o + Q5_0_QH)
        t = 0
        for j in range(QK8_0):
            nib = (w[o + Q5_0_QS + j % 16] >> (4 * (j // 16))) & 15
            t += (np.int64(nib | (((qh >> j) & 1) << 4)) - 16) * np.int64(xb[QK8_0 * b + j])
        s += load_fp16(w, o + Q5_0_D) * xd[b] * np.float32(t)
    return s


@njit(cache=True, fastmath=True)
def dot_q5_1(w, base, xq, xd, xs, acc):
    _reset(acc)
    mins = np.float32(0.0)
    for b in range(xd.size):
        o = base + Q5_1_BYTES * b
        simd.block_q5_1(acc, b & 3, w, o + Q5_1_QS, _load_u32(w, o + Q5_1_QH), 0, xq, QK8_0 * b, xd[b], xd[b])
        mins += load_fp16(w, o + Q5_1_M) * xs[b]
    return _total(acc) + mins


@njit(cache=True, fastmath=True)
def dot_q4_k(w, base, xq, xd, xs, acc):
    _reset(acc)
    mins = np.float32(0.0)
    for b in range(xd.size // SUB_BLOCKS):
        o = base + Q4_K_BYTES * b
        d = load_fp16(w, o + Q4_K_D)
        dmin = load_fp16(w, o + Q4_K_DMIN)
        for c in range(4):
            for half in range(2):
                sb = SUB_BLOCKS * b + 2 * c + half
                sc, m = scale_min_k4(2 * c + half, w, o + Q4_K_SCALES)
                s = d * np.float32(sc) * xd[sb]
                if half == 0:
                    simd.block_q4_k_lo(acc, sb & 3, w, o + Q4_K_QS + 32 * c, 0, 0, xq, QK8_0 * sb, s, s)
                else:
                    simd.block_q4_k_hi(acc, sb & 3, w, o + Q4_K_QS + 32 * c, 0, 0, xq, QK8_0 * sb, s, s)
                mins += dmin * np.float32(m) * xs[sb]
    return _total(acc) - mins


@njit(cache=True, fastmath=True)
def dot_q4_k_vnni(w, base, xb, xd, xs, acc):
    """dot_q4_k through vpdpbusd, a super-block a call."""
    _reset(acc)
    for b in range(xd.size // SUB_BLOCKS):
        simd.block_q4_k_vnni(acc, b & 1, w, base + Q4_K_BYTES * b, xb, xd, xs, SUB_BLOCKS * b)
    return _total(acc)


@njit(cache=True, fastmath=True)
def dot_q5_k(w, base, xq, xd, xs, acc):
    _reset(acc)
    mins = np.float32(0.0)
    for b in range(xd.size // SUB_BLOCKS):
        o = base + Q5_K_BYTES * b
        d = load_fp16(w, o + Q5_K_D)
        dmin = load_fp16(w, o + Q5_K_DMIN)
        for c in range(4):
            for half in range(2):
                sb = SUB_BLOCKS * b + 2 * c + half
                sc, m = scale_min_k4(2 * c + half, w, o + Q5_K_SCALES)
                s = d * np.float32(sc) * xd[sb]
                qs = o + Q5_K_QS + 32 * c
                if half == 0:
                    simd.block_q5_k_lo(acc, sb & 3, w, qs, o + Q5_K_QH, 2 * c, xq, QK8_0 * sb, s, s)
                else:
                    simd.block_q5_k_hi(acc, sb & 3, w, qs, o + Q5_K_QH, 2 * c + 1, xq, QK8_0 * sb, s, s)
                mins += dmin * np.float32(m) * xs[sb]
    return _total(acc) - mins


@njit(cache=True, fastmath=True)
def dot_q6_k(w, base, xq, xd, acc):
    _reset(acc)
    for b in range(xd.size // SUB_BLOCKS):
        o = base + Q6_K_BYTES * b
        d = load_fp16(w, o + Q6_K_D)
        for half in range(2):
            for k in range(4):       # 32 weights: low bits from ql (nibble k//2 of bytes 32*(k%2)..), high from qh >> 2k
                sb = SUB_BLOCKS * b + 4 * half + k
                sc = o + Q6_K_SCALES + 8 * half + 2 * k
                s0 = d * np.float32(np.int8(w[sc])) * xd[sb]
                s1 = d * np.float32(np.int8(w[sc + 1])) * xd[sb]
                ql = o + Q6_K_QL + 64 * half + 32 * (k & 1)
                qh = o + Q6_K_QH + 32 * half
                if k < 2:
                    simd.block_q6_k_lo(acc, k, w, ql, qh, 2 * k, xq, QK8_0 * sb, s0, s1)
                else:
                    simd.block_q6_k_hi(acc, k, w, ql, qh, 2 * k, xq, QK8_0 * sb, s0, s1)
    return _total(acc)


@njit(cache=True, fastmath=True)
def dot_q6_k_vnni(w, base, xb, xd, acc):
    """dot_q6_k through vpdpbusd, a super-block a call."""
    _reset(acc)
    for b in range(xd.size // SUB_BLOCKS):
        simd.block_q6_k_vnni(acc, b & 1, w, base + Q6_K_BYTES * b, xb, xd, SUB_BLOCKS * b)
    return _total(acc)


@njit(cache=True, inline="always")
def dot_row(code, w, base, x, xq, xb, xd, xs, acc):
    """w[base:] . x for one weight row of ggml type `code` starting at byte `base` of the flat weight
    bytes w (x is used as floats or through its q8 form: int16 quants xq, the same as int8 xb). An
    offset, not a row view: a view costs an atomic incref/decref pair per row, a fifth of the time
    on 1280-wide rows. Inlined into gemv_products' parallel loop, which checks the codes first (check_code): a
    raise here would serialise them, so an unknown code gets NaN, never a silent wrong type."""
    if code == Q8_0:
        if AVX512_VNNI:       # a compile-time constant: the other branch is pruned before typing
            return dot_q8_0_vnni(w, base, xb, xd, acc)
        return dot_q8_0(w, base, xq, xd, acc)
    if code == Q4_K:
        if AVX512_VNNI:
            return dot_q4_k_vnni(w, base, xb, xd, xs, acc)
        return dot_q4_k(w, base, xq, xd, xs, acc)
    if code == Q6_K:
        if AVX512_VNNI:
            return dot_q6_k_vnni(w, base, xb, xd, acc)
        return dot_q6_k(w, base, xq, xd, acc)
    if code == Q5_0:
        if AVX512_VNNI:
            return dot_q5_0_vnni(w, base, xb, xd, acc)
        return dot_q5_0(w, base, xq, xd, acc)
    if code == F16:
        return dot_f16(w, base, x, acc)
    if code == F32:
        return dot_f32(w, base, x, acc)
    if code == Q5_K:
        return dot_q5_k(w, base, xq, xd, xs, acc)
    if code == Q5_1:
        return dot_q5_1(w, base, xq, xd, xs, acc)
    if code == Q4_0:
        return dot_q4_0(w, base, xq, xd, acc)
    if code == Q4_1:
        return dot_q4_1(w, base, xq, xd, xs, acc)
    if code == BF16:
        return dot_bf16(w, base, x, acc)
    return np.float32(np.nan)


@njit(cache=True, inline="always")
def _uses_q8(code):
    return code != F32 and code != F16 and code != BF16


TASKS_PER_THREAD = 8    # GEMV tasks per thread
CACHE_LINE = 64
PREFETCH_BYTES = 1024   # how far ahead a GEMV task asks for weight bytes: Q4_K_M decode 49 -> 38 ms, 4 KB+ slower


@njit(cache=True, inline="always")
def _ceil_div(a, b):
    return -(-a // b)


@njit(cache=True, parallel=True)
def gemv_products(codes, Ws, Xs, Ys, products, tasks, prefetch_bytes):
    """Ys[yi][yr] = Ws[w][e] . Xs[xi][xr]  for each row (w, e, xi, xr, yi, yr) of `products`, all in
    one parallel launch (decode's q/k/v, gate/up, routed experts: a launch and the activation's
    quantization per call, not per product). Ws[w]: uint8 [n_mat, n, row_bytes] of ggml type
    codes[w] (a 2-D weight as [1, n, row_bytes], routed experts as they are, e the expert); Xs[xi]
    float32 [rows, k]. Each activation row is quantized once; the rows of all products are split
    into `tasks` runs of equal weight bytes, so small matrices keep every thread busy. Each row asks
    for the weight bytes `prefetch_bytes` ahead of it (same matrix)."""
    for w in range(len(Ws)):
        check_code(codes[w])
    q8 = False
    for w in range(len(Ws)):
        q8 = q8 or _uses_q8(codes[w])
    xoff = np.zeros(len(Xs) + 1, np.int64)     # each input's first quant; rows padded to whole q8 blocks
    for i in range(len(Xs)):
        xoff[i + 1] = xoff[i] + Xs[i].shape[0] * _ceil_div(Xs[i].shape[1], QK8_0) * QK8_0
    xq = np.empty(xoff[-1] if q8 else 0, np.int16)
    xd = np.empty(xoff[-1] // QK8_0, np.float32)
    xs = np.empty(xoff[-1] // QK8_0, np.float32)
    if q8:
        for i in range(len(Xs)):
            X = Xs[i]
            kq = _ceil_div(X.shape[1], QK8_0) * QK8_0
            for r in range(X.shape[0]):
                o = xoff[i] + r * kq
                blocks = slice(o // QK8_0, (o + kq) // QK8_0)
                quantize_activation(X[r], xq[o:o + kq], xd[blocks], xs[blocks])
    xb = xq.astype(np.int8)
    n_p = products.shape[0]
    cum = np.zeros(n_p + 1, np.int64)          # weight bytes before each product
    for p in range(n_p):
        W = Ws[products[p, 0]]
        cum[p + 1] = cum[p] + W.shape[1] * W.shape[2]
    total = cum[n_p]
    tasks = max(1, tasks)
    for t in prange(tasks):
        lo, hi = total * t // tasks, total * (t + 1) // tasks   # a row goes to the task holding its first byte
        acc = np.empty(ACC, np.float32)
        for p in range(n_p):
            if cum[p + 1] <= lo or cum[p] >= hi:
                continue
            w, e, xi, xr, yi, yr = products[p]
            W = Ws[w]
            n, row_bytes = W.shape[1], W.shape[2]
            x = Xs[xi][xr]
            k = x.size
            kq = _ceil_div(k, QK8_0) * QK8_0
            o = xoff[xi] + xr * kq
            qx, bx = xq[o:o + kq], xb[o:o + kq]
            dx, sx = xd[o // QK8_0:(o + k) // QK8_0], xs[o // QK8_0:(o + k) // QK8_0]
            y = Ys[yi]
            flat = W.reshape(-1)
            first = e * n * row_bytes
            end = first + n * row_bytes
            for r in range(max(0, _ceil_div(lo - cum[p], row_bytes)), min(n, _ceil_div(hi - cum[p], row_bytes))):
                base = first + r * row_bytes
                for line in range(base + prefetch_bytes, min(end, base + prefetch_bytes + row_bytes), CACHE_LINE):
                    simd.prefetch(flat, line)
                y[yr, r] = dot_row(codes[w], flat, base, x, qx, bx, dx, sx, acc)


def run_products(codes, Ws, Xs, Ys, products: np.ndarray) -> None:
    """gemv_products over tuples of weights (2-D ones given a leading axis of 1), inputs and outputs."""
    Ws = tuple(W if W.ndim == 3 else W.reshape(1, *W.shape) for W in Ws)
    gemv_products(np.asarray(codes, np.int64), Ws, tuple(Xs), tuple(Ys), products,
                  TASKS_PER_THREAD * numba.get_num_threads(), PREFETCH_BYTES)


@lru_cache(maxsize=64)
def products_of(n_weights: int, rows: int) -> np.ndarray:
    """The products table (read-only, shared) of every row of one input times each of n_weights 2-D
    weights, into output j (w = j, e = 0, xi = 0, xr = row, yi = j, yr = row)."""
    p = np.zeros((n_weights * rows, 6), np.int64)
    p[:, 0] = p[:, 4] = np.repeat(np.arange(n_weights), rows)
    p[:, 3] = p[:, 5] = np.tile(np.arange(rows), n_weights)
    p.flags.writeable = False
    return p


def expert_products(n_weights: int, experts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The products table of routed experts: row i of output j = weight j's expert experts[i] times
    input row tokens[i]. Within a weight the products are ordered by expert, so the tokens that share
    an expert run back to back and its weights come from memory once, then from the cache."""
    experts, tokens = np.asarray(experts, np.int64).reshape(-1), np.asarray(tokens, np.int64)
    order = np.argsort(experts, kind="stable")
    n = len(experts)
    p = np.empty((n_weights * n, 6), np.int64)
    p[:, 0] = p[:, 4] = np.repeat(np.arange(n_weights), n)
    p[:, 1] = np.tile(experts[order], n_weights)
    p[:, 2] = 0
    p[:, 3] = np.tile(tokens[order], n_weights)
    p[:, 5] = np.tile(order, n_weights)
    p.flags.writeable = False     # as products_of's: one array type for gemv_products
    return p


def gemv(code: int, W: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y = W . x for one activation row."""
    run_products((code,), (W,), (x[None],), (y[None],), products_of(1, 1))
    return y


def gemv_experts(code: int, W3: np.ndarray, experts: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Y[i] = W3[experts[i]] . X[i]  (experts in row-major order when 2-D: a batch's tokens' routed experts)."""
    run_products((code,), (W3,), (X,), (Y,), expert_products(1, experts, np.arange(np.size(experts))))
    return Y


# ---------------------------------------------------------------- many rows: dequantize + BLAS

CHUNK_BYTES = 4 << 20      # float32 weight rows per BLAS call


class Dequantizer:
    """A reused float32 buffer for the weight rows of one GEMM chunk (no fresh page faults)."""

    def __init__(self):
        self.buf = np.empty(0, np.float32)

    def rows(self, code: int, raw: np.ndarray, k: int) -> np.ndarray:
        n = raw.shape[0]
        if self.buf.size < n * k:
            self.buf = np.empty(n * k, np.float32)
        out = self.buf[: n * k].reshape(n, k)
        dequantize_rows(code, raw, out)
        return out


def gemm(code: int, W: np.ndarray, X: np.ndarray, out: np.ndarray, deq: Dequantizer) -> np.ndarray:
    """out[m, n] = X[m, k] @ W[n, :]^T for a many-row X."""
    k = X.shape[1]
    if code == F32:
        np.matmul(X, W.view(np.float32).reshape(W.shape[0], k).T, out=out)
        return out
    step = max(1, CHUNK_BYTES // (4 * k))
    for r in range(0, W.shape[0], step):
        e = min(W.shape[0], r + step)
        np.matmul(X, deq.rows(code, W[r:e], k).T, out=out[:, r:e])
    return out

