"""numba.cuda kernels for the CUDA backend's row ops (the CPU's runtime/cpu/ops.py and
vision_ops.py): one block of threads per row for reductions (norms, softmax), grid-stride loops
for elementwise work and the vision layout (the grid is capped, so a launch costs the same few
blocks whatever its size), and the row plumbing that keeps activations on the device.
"""
import math

from numba import cuda, float32

THREADS = 128      # shared scratch size; launches use up to this many threads per block


# ---------------------------------------------------------------- block reductions

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


# ---------------------------------------------------------------- rows

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
def copy_cols(src, dst, col0):
    i = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, src.shape[1], cuda.blockDim.x):
        dst[i, col0 + j] = src[i, j]


@cuda.jit
def weighted_sum_into(out, y, w):
    # a block per token t: out[t, j] += sum_s w[t, s] y[t*k + s, j]
    t, k = cuda.blockIdx.x, w.shape[1]
    for j in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        acc = float32(0.0)
        for s in range(k):
            acc += w[t, s] * y[t * k + s, j]
        out[t, j] += acc


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
