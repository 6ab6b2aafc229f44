"""numba.cuda products against ggml-typed weights (the CPU's runtime/cpu/matmul.py). Weights stay
in their ggml blocks on the device and every product decodes them through `decode.weight_at`:
a GEMV with one block of threads per weight row for a few activation rows, a tiled GEMM for more.
"""
from numba import cuda, float32

from dsocr.runtime.cuda.decode import weight_at
from dsocr.runtime.cuda.ops import THREADS, block_sum

TILE = 16          # GEMM output tile edge
MAX_ROWS = 4       # activation rows a GEMV launch takes; more go to the tiled GEMM


@cuda.jit
def gemv(W, code, X, Y):
    # Y[i, n] = W[n, :] . X[i] for the few rows of X (<= MAX_ROWS): one block of threads per
    # weight row, strided over k, so each weight is decoded once for all rows; tree reduction
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    m = X.shape[0]
    part = cuda.shared.array((MAX_ROWS, THREADS), float32)
    acc = cuda.local.array(MAX_ROWS, float32)
    for i in range(m):
        acc[i] = float32(0.0)
    for j in range(t, X.shape[1], cuda.blockDim.x):
        w = weight_at(W, r, j, code)
        for i in range(m):
            acc[i] += w * X[i, j]
    for i in range(m):
        part[i, t] = acc[i]
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            for i in range(m):
                part[i, t] += part[i, t + s]
        cuda.syncthreads()
        s //= 2
    for i in range(t, m, cuda.blockDim.x):
        Y[i, r] = part[i, 0]


@cuda.jit
def gemv_experts(W3, code, experts, X, Y):
    # Y[i, n] = W3[experts[i], n, :] . X[i] ; grid (n, n_routed)
    r = cuda.blockIdx.x
    i = cuda.blockIdx.y
    t = cuda.threadIdx.x
    W = W3[experts[i]]
    part = cuda.shared.array(THREADS, float32)
    acc = float32(0.0)
    for j in range(t, X.shape[1], cuda.blockDim.x):
        acc += weight_at(W, r, j, code) * X[i, j]
    part[t] = acc
    total = block_sum(part, t)
    if t == 0:
        Y[i, r] = total


@cuda.jit
def gemm(W, code, X, Y):
    # Y[m, n] = X[m, k] @ W[n, k]^T ; TILE x TILE output tile per block, weights decoded into shared memory
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    row = cuda.blockIdx.y * TILE + ty
    col = cuda.blockIdx.x * TILE + tx
    xs = cuda.shared.array((TILE, TILE), float32)
    ws = cuda.shared.array((TILE, TILE), float32)
    m, k = X.shape
    n = Y.shape[1]
    acc = float32(0.0)
    for k0 in range(0, k, TILE):
        xs[ty, tx] = X[row, k0 + tx] if row < m and k0 + tx < k else float32(0.0)
        wr = cuda.blockIdx.x * TILE + ty
        ws[ty, tx] = weight_at(W, wr, k0 + tx, code) if wr < n and k0 + tx < k else float32(0.0)
        cuda.syncthreads()
        for kk in range(TILE):
            acc += xs[ty, kk] * ws[tx, kk]
        cuda.syncthreads()
    if row < m and col < n:
        Y[row, col] = acc


@cuda.jit
def embed_rows(W, code, ids, out):
    # out[i, :] = dequantized row ids[i] of W
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[i, j] = weight_at(W, ids[i], j, code)
