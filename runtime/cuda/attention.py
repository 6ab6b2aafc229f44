"""numba.cuda attention kernels (the CPU's attention in runtime/cpu): one block of threads per
(query row, head), scores in global scratch, the softmax through ops.softmax_numerators.
"""
import math

from numba import cuda, float32

from dsocr.runtime.cuda.ops import THREADS, softmax_numerators

HEAD_DIM_MAX = 128   # attention_prefix's shared copy of a query head


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


@cuda.jit
def attention_prefix(q, k, v, n_head, n_head_kv, n_prefix, row0, scores, out):
    # prefix-masked grouped-query attention: block per (query row row0+i, head); q, out [n, n_head*d],
    # k, v [n, n_head_kv*d], head h reading kv head h // (n_head / n_head_kv); row qi sees keys
    # [0, n_prefix) when qi < n_prefix, else [0, qi]. The query head is kept scaled in shared memory
    # (d <= HEAD_DIM_MAX); scores [rows*n_head, n] scratch
    i, h = cuda.blockIdx.x, cuda.blockIdx.y
    t = cuda.threadIdx.x
    d = q.shape[1] // n_head
    o = h * d
    kv_col = (h // (n_head // n_head_kv)) * d     # the first column of its kv head
    qi = row0 + i
    n_keys = n_prefix if qi < n_prefix else qi + 1
    row = h * cuda.gridDim.x + i
    scale = float32(1.0) / math.sqrt(float32(d))
    qs = cuda.shared.array(HEAD_DIM_MAX, float32)
    part = cuda.shared.array(THREADS, float32)
    for c in range(t, d, cuda.blockDim.x):
        qs[c] = q[qi, o + c] * scale
    cuda.syncthreads()
    mx = float32(-math.inf)
    for s in range(t, n_keys, cuda.blockDim.x):
        acc = float32(0.0)
        for c in range(d):
            acc += qs[c] * k[s, kv_col + c]
        scores[row, s] = acc
        mx = max(mx, acc)
    total = softmax_numerators(scores, scores, row, n_keys, mx, part, t)
    for c in range(t, d, cuda.blockDim.x):
        acc = float32(0.0)
        for s in range(n_keys):
            acc += scores[row, s] * v[s, kv_col + c]
        out[qi, o + c] = acc / total
