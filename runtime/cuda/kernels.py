"""numba.cuda kernels for the CUDA backend (the same ops as runtime/cpu): one block per row for
products and reductions, grid-stride loops for elementwise work (the grid is capped, so a launch
costs the same few blocks whatever its size). Weights stay in their ggml blocks on the device; `weight_at`
decodes one element of any storage type with exact float arithmetic (no bit casts), so every
kernel also runs under numba's CUDA simulator, where the tests compare it with its CPU twin.
"""
import math

from numba import cuda, float32, int32, int64

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
THREADS = 128      # shared scratch size; launches use up to this many threads per block
TILE = 16          # GEMM output tile edge
MAX_ROWS = 4       # activation rows a GEMV launch takes; more go to the tiled GEMM


# ---------------------------------------------------------------- element decoding

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
def weight_at(W, r, j, code):
    """Element j of row r of a ggml-typed weight stored as uint8 [rows, row_bytes]."""
    if code == F32:
        return float_from_bits(u32_at(W, r, 4 * j), 23, 8)
    if code == F16:
        return half_at(W, r, 2 * j)
    if code == BF16:
        return float_from_bits(u16_at(W, r, 2 * j), 7, 8)
    b = j // 32
    t = j % 32
    if code == Q8_0:
        v = int32(W[r, 34 * b + 2 + t])
        return half_at(W, r, 34 * b) * float32(v - 256 if v > 127 else v)
    if code == Q4_0 or code == Q4_1:
        size = 18 if code == Q4_0 else 20
        q = int32(W[r, size * b + size - 16 + t % 16])
        q = (q & 15) if t < 16 else (q >> 4)
        if code == Q4_0:
            return half_at(W, r, 18 * b) * float32(q - 8)
        return half_at(W, r, 20 * b) * float32(q) + half_at(W, r, 20 * b + 2)
    if code == Q5_0 or code == Q5_1:
        size = 22 if code == Q5_0 else 24
        q = int32(W[r, size * b + size - 16 + t % 16])
        q = (q & 15) if t < 16 else (q >> 4)
        q |= int32((u32_at(W, r, size * b + size - 20) >> t) & 1) << 4
        if code == Q5_0:
            return half_at(W, r, 22 * b) * float32(q - 16)
        return half_at(W, r, 24 * b) * float32(q) + half_at(W, r, 24 * b + 2)
    sb = j // 256
    w = j % 256
    if code == Q4_K or code == Q5_K:
        size = 144 if code == Q4_K else 176
        o = size * sb
        c = w // 64
        half = (w % 64) // 32
        l = w % 32
        sc, m = scale_min_k4(2 * c + half, W, r, o + 4)
        qs = o + 16 + 32 * c + l if code == Q4_K else o + 48 + 32 * c + l
        q = int32(W[r, qs])
        q = (q & 15) if half == 0 else (q >> 4)
        if code == Q5_K:
            q |= ((int32(W[r, o + 16 + l]) >> (2 * c + half)) & 1) << 4
        return half_at(W, r, o) * float32(sc) * float32(q) - half_at(W, r, o + 2) * float32(m)
    # Q6_K
    o = 210 * sb
    h = w // 128
    k = (w % 128) // 32
    l = w % 32
    ql = int32(W[r, o + 64 * h + 32 * (k & 1) + l])
    ql = (ql & 15) if k < 2 else (ql >> 4)
    qh = (int32(W[r, o + 128 + 32 * h + l]) >> (2 * k)) & 3
    sc = int32(W[r, o + 192 + 8 * h + 2 * k + l // 16])
    sc = sc - 256 if sc > 127 else sc
    return half_at(W, r, o + 208) * float32(sc) * float32((ql | (qh << 4)) - 32)


# ---------------------------------------------------------------- products

@cuda.jit(device=True)
def block_sum(part, t):
    # sum of part[:blockDim] (a power of two) over the block, returned to every thread
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            part[t] += part[t + s]
        cuda.syncthreads()
        s //= 2
    v = part[0]
    cuda.syncthreads()
    return v


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


# ---------------------------------------------------------------- rows

@cuda.jit(device=True)
def softmax_numerators(src, dst, row, n, mx, part, t):
    # dst[row, :n] = exp(src[row, :n] - max), given each thread's partial max; returns their sum
    part[t] = mx
    cuda.syncthreads()
    st = cuda.blockDim.x // 2
    while st > 0:
        if t < st:
            part[t] = max(part[t], part[t + st])
        cuda.syncthreads()
        st //= 2
    mx = part[0]
    cuda.syncthreads()
    acc = float32(0.0)
    for s in range(t, n, cuda.blockDim.x):
        e = math.exp(src[row, s] - mx)
        dst[row, s] = e
        acc += e
    part[t] = acc
    return block_sum(part, t)


@cuda.jit
def rmsnorm(x, w, eps, out):
    i, t = cuda.blockIdx.x, cuda.threadIdx.x
    part = cuda.shared.array(THREADS, float32)
    acc = float32(0.0)
    for j in range(t, x.shape[1], cuda.blockDim.x):
        acc += x[i, j] * x[i, j]
    part[t] = acc
    r = float32(1.0) / math.sqrt(block_sum(part, t) / x.shape[1] + eps)
    for j in range(t, x.shape[1], cuda.blockDim.x):
        out[i, j] = (x[i, j] * r) * w[j]


@cuda.jit
def layernorm(x, w, b, eps, out):
    i, t = cuda.blockIdx.x, cuda.threadIdx.x
    c = x.shape[1]
    part = cuda.shared.array(THREADS, float32)
    acc = float32(0.0)
    for j in range(t, c, cuda.blockDim.x):
        acc += x[i, j]
    part[t] = acc
    mean = block_sum(part, t) / c
    acc = float32(0.0)
    for j in range(t, c, cuda.blockDim.x):
        d = x[i, j] - mean
        acc += d * d
    part[t] = acc
    r = float32(1.0) / math.sqrt(block_sum(part, t) / c + eps)
    for j in range(t, c, cuda.blockDim.x):
        out[i, j] = ((x[i, j] - mean) * r) * w[j] + b[j]


@cuda.jit
def softmax_rows(x, out):
    i, t = cuda.blockIdx.x, cuda.threadIdx.x
    part = cuda.shared.array(THREADS, float32)
    mx = float32(-math.inf)
    for j in range(t, x.shape[1], cuda.blockDim.x):
        mx = max(mx, x[i, j])
    total = softmax_numerators(x, out, i, x.shape[1], mx, part, t)
    for j in range(t, x.shape[1], cuda.blockDim.x):
        out[i, j] /= total


@cuda.jit
def elementwise(code, a, b, out):
    # 0: silu(a)*b  1: gelu(a)  2: quick_gelu(a)  3: a+b  (flat arrays)
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = a[i]
        if code == 0:
            out[i] = v / (float32(1.0) + math.exp(-v)) * b[i]
        elif code == 1:
            out[i] = float32(0.5) * v * (float32(1.0) + math.erf(v * float32(0.7071067811865476)))
        elif code == 2:
            out[i] = v / (float32(1.0) + math.exp(float32(-1.702) * v))
        else:
            out[i] = v + b[i]


@cuda.jit
def add_bias(x, b):
    # x [m, c] += b [c], grid-stride over the elements
    for i in range(cuda.grid(1), x.shape[0] * x.shape[1], cuda.gridsize(1)):
        r, c = i // x.shape[1], i % x.shape[1]
        x[r, c] += b[c]


@cuda.jit
def rope_neox(x, n_head, cos, sin, pos0):
    # x [m, n_head*d] at positions pos0.. in place, grid-stride over (row, head, pair); cos, sin
    # [n_pos, d/2] tables indexed by position
    d = x.shape[1] // n_head
    half = d // 2
    for i in range(cuda.grid(1), x.shape[0] * n_head * half, cuda.gridsize(1)):
        r = i // (n_head * half)
        h = (i // half) % n_head
        j = i % half
        o = h * d
        a = x[r, o + j]
        b = x[r, o + half + j]
        c, sn = cos[pos0 + r, j], sin[pos0 + r, j]
        x[r, o + j] = a * c - b * sn
        x[r, o + half + j] = b * c + a * sn


@cuda.jit
def copy_rows(src, rows, dst, dst_row0):
    # dst[dst_row0 + i] = src[rows[i]]
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, dst.shape[1], cuda.blockDim.x):
        dst[dst_row0 + i, j] = src[rows[i], j]


@cuda.jit
def copy_range(src, dst, dst_row0):
    # dst[dst_row0 + i] = src[i]
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, dst.shape[1], cuda.blockDim.x):
        dst[dst_row0 + i, j] = src[i, j]


@cuda.jit
def repeat_row(src, dst):
    # dst[i] = src[0]
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, dst.shape[1], cuda.blockDim.x):
        dst[i, j] = src[0, j]


@cuda.jit
def copy_cols(src, dst, col0):
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, src.shape[1], cuda.blockDim.x):
        dst[i, col0 + j] = src[i, j]


@cuda.jit
def weighted_sum_into(out, y, w):
    # out[0, j] += sum_k w[k] y[k, j]
    for j in range(cuda.grid(1), out.shape[1], cuda.gridsize(1)):
        acc = float32(0.0)
        for k in range(y.shape[0]):
            acc += w[k] * y[k, j]
        out[0, j] += acc


@cuda.jit
def scatter_add_rows(out, rows, y, w):
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, y.shape[1], cuda.blockDim.x):
        out[rows[i], j] += w[i] * y[i, j]


@cuda.jit
def route_topk(logits, k, idx, wout):
    # a thread per row: softmax over experts, greedy top-k, sorted descending, ties to the lower id
    for i in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        e = logits.shape[1]
        mx = logits[i, 0]
        for j in range(1, e):
            mx = max(mx, logits[i, j])
        total = float32(0.0)
        for j in range(e):
            total += math.exp(logits[i, j] - mx)
        for r in range(k):
            best = -1
            bv = float32(-1.0)
            for j in range(e):
                taken = False
                for q in range(r):
                    if idx[i, q] == j:
                        taken = True
                p = math.exp(logits[i, j] - mx) / total
                if not taken and p > bv:
                    best, bv = j, p
            idx[i, r] = best
            wout[i, r] = bv


# ---------------------------------------------------------------- attention

@cuda.jit
def attention_causal(q, kc, vc, pos0, n_head, scores, out):
    # block per (query row, head); scores [m*n_head, n_ctx] global scratch
    i, h = cuda.blockIdx.x, cuda.blockIdx.y
    t = cuda.threadIdx.x
    d = q.shape[1] // n_head
    o = h * d
    n = pos0 + i + 1
    row = i * n_head + h
    scale = float32(1.0) / math.sqrt(float32(d))
    part = cuda.shared.array(THREADS, float32)
    mx = float32(-math.inf)
    for s in range(t, n, cuda.blockDim.x):
        acc = float32(0.0)
        for j in range(d):
            acc += q[i, o + j] * kc[s, o + j]
        acc *= scale
        scores[row, s] = acc
        mx = max(mx, acc)
    total = softmax_numerators(scores, scores, row, n, mx, part, t)
    for j in range(t, d, cuda.blockDim.x):
        acc = float32(0.0)
        for s in range(n):
            acc += scores[row, s] * vc[s, o + j]
        out[i, o + j] = acc / total


@cuda.jit
def attention_full(q, k, v, n_head, Rh, Rw, H, W, use_rel, row0, scores, out):
    # bidirectional: block per (query row row0+i, head, batch item); q, k, v, out [B, n, n_head*d];
    # optional SAM relative positions (H, W <= THREADS); scores [rows*n_head*B, n] scratch
    i, h, bb = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    t = cuda.threadIdx.x
    n = k.shape[1]
    d = q.shape[2] // n_head
    o = h * d
    qi = row0 + i
    row = (bb * n_head + h) * cuda.gridDim.x + i
    scale = float32(1.0) / math.sqrt(float32(d))
    relh = cuda.shared.array(THREADS, float32)
    relw = cuda.shared.array(THREADS, float32)
    part = cuda.shared.array(THREADS, float32)
    if use_rel:
        hq, wq = qi // W, qi % W
        for kh in range(t, H, cuda.blockDim.x):
            acc = float32(0.0)
            for c in range(d):
                acc += q[bb, qi, o + c] * Rh[hq, kh, c]
            relh[kh] = acc
        for kw in range(t, W, cuda.blockDim.x):
            acc = float32(0.0)
            for c in range(d):
                acc += q[bb, qi, o + c] * Rw[wq, kw, c]
            relw[kw] = acc
    cuda.syncthreads()
    mx = float32(-math.inf)
    for s in range(t, n, cuda.blockDim.x):
        acc = float32(0.0)
        for c in range(d):
            acc += q[bb, qi, o + c] * k[bb, s, o + c]
        acc *= scale
        if use_rel:
            acc += relh[s // W] + relw[s % W]
        scores[row, s] = acc
        mx = max(mx, acc)
    total = softmax_numerators(scores, scores, row, n, mx, part, t)
    for c in range(t, d, cuda.blockDim.x):
        acc = float32(0.0)
        for s in range(n):
            acc += scores[row, s] * v[bb, s, o + c]
        out[bb, qi, o + c] = acc / total


# ---------------------------------------------------------------- vision layout

@cuda.jit
def im2col(x, k, stride, pad, out):
    # x [H, W, C] -> out [Ho*Wo, C*k*k], columns (c, ky, kx); grid-stride over its elements
    H, W, C = x.shape
    Wo = (W + 2 * pad - k) // stride + 1
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        r, col = i // out.shape[1], i % out.shape[1]
        oy, ox = r // Wo, r % Wo
        c, rem = col // (k * k), col % (k * k)
        iy, ix = oy * stride - pad + rem // k, ox * stride - pad + rem % k
        out[r, col] = x[iy, ix, c] if (0 <= iy < H and 0 <= ix < W) else float32(0.0)


@cuda.jit
def window_partition(x, ws, out):
    H, W, C = x.shape
    nw = (W + ws - 1) // ws
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        w, rem = i // (ws * ws * C), i % (ws * ws * C)
        p, c = rem // C, rem % C
        y, xx = (w // nw) * ws + p // ws, (w % nw) * ws + p % ws
        out[w, p, c] = x[y, xx, c] if (y < H and xx < W) else float32(0.0)


@cuda.jit
def window_unpartition(win, ws, out):
    H, W, C = out.shape
    nw = (W + ws - 1) // ws
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        y, rem = i // (W * C), i % (W * C)
        xx, c = rem // C, rem % C
        out[y, xx, c] = win[(y // ws) * nw + xx // ws, (y % ws) * ws + xx % ws, c]
