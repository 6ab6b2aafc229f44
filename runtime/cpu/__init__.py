"""The CPU backend: the ops of the backend contract (runtime/backend.py) on numpy arrays, through
numba kernels."""
from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np

from dsocr.quant.rows import dequantize_rows
from dsocr.runtime.backend import prefix_attention_head_dim
from dsocr.runtime.cpu import matmul as mm
from dsocr.runtime.cpu import ops, qgemm, vision_ops
from dsocr.runtime.gguf_file import Tensor
from dsocr.runtime.rope import rope_tables

QGEMM_CODES = frozenset(qgemm.CODES)
# up to this many activation rows the GEMV beats the GEMMs: dequantize + BLAS for float weights,
# the int8 GEMM for quantized ones (bench: 1280x1280, Q8_0 ties at 2 rows and wins from 3, Q4_K from 4)
GEMV_MAX_ROWS, QGEMV_MAX_ROWS = 4, 2


def gemv_rows(ws) -> int:
    """How many activation rows the GEMV takes for these weights."""
    return QGEMV_MAX_ROWS if all(w.code in QGEMM_CODES for w in ws) else GEMV_MAX_ROWS


BLAS_ATTENTION_ROWS = 8     # query rows from which causal attention goes through BLAS
# keys up to which bidirectional attention runs as one numba kernel (SAM windows, CLIP): BLAS per head
# and a numba softmax per chunk hand the cores back and forth between the two thread pools each call,
# which costs more than the products at these sizes
FUSED_ATTENTION_KEYS = 1024
NO_RELPOS = np.zeros((0, 0, 0), np.float32)


@lru_cache(maxsize=4)
def consecutive_rope_tables(pos0: int, m: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """rope_tables of positions pos0..pos0+m-1, shared (read-only) by the calls of one forward."""
    tables = rope_tables(np.arange(pos0, pos0 + m), head_dim, theta)
    for t in tables:
        t.flags.writeable = False
    return tables


def kv_floats(c: np.ndarray) -> np.ndarray:
    """KV-cache rows as float32 (the F16 cache holds fp16 bits)."""
    return c.view(np.float16).astype(np.float32) if c.dtype == np.uint16 else c


def split_heads(x: np.ndarray, n_head: int, transpose: bool) -> np.ndarray:
    """x [B, n, n_head*d] -> [B, n_head, n, d], or [B, n_head, d, n] transposed."""
    B, n, c = x.shape
    d = c // n_head
    out = np.empty((B, n_head, d, n) if transpose else (B, n_head, n, d), np.float32)
    vision_ops.split_heads(x, transpose, out)
    return out


def attend_head(q, k, v, out, buf, chunk: int, causal_pos0, softmax) -> None:
    """out = softmax(q k^T) v for one head (q [m, d], k, v [n, d]), a chunk of query rows at a time
    through BLAS, so no full score matrix is held. Causal (query rows at causal_pos0..): a chunk
    uses only the keys up to its last row. softmax(s, qh, r0) normalises a chunk in place."""
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    for r0 in range(0, q.shape[0], chunk):
        qh = np.ascontiguousarray(q[r0:r0 + chunk])
        r = qh.shape[0]
        cols = k.shape[0] if causal_pos0 is None else causal_pos0 + r0 + r
        s = buf[: r * cols].reshape(r, cols)
        np.matmul(qh, k[:cols].T, out=s)
        softmax(s, qh, r0)
        out[r0:r0 + r] = s @ v[:cols]


class CPUBackend:
    name = "cpu"

    def __init__(self, threads: int | None = None):
        if threads:
            numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        self.deq = mm.Dequantizer()

    # ---- memory
    def weight(self, t: Tensor) -> Tensor:
        return t                          # the mmap view is used as it is

    def table(self, t: Tensor) -> np.ndarray:
        """A small tensor (norm, bias, position table) as float32."""
        return np.ascontiguousarray(t.floats())

    def asarray(self, a) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_host(self, a) -> np.ndarray:
        return a

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    # ---- products
    def matmul(self, x: np.ndarray, w: Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """x [m, k] @ w[n, k]^T -> [m, n]."""
        m = x.shape[0]
        out = np.empty((m, w.shape[0]), np.float32) if out is None else out
        if m <= gemv_rows((w,)):
            mm.run_products((w.code,), (w.rows2d,), (x,), (out,), mm.products_of(1, m))
        elif w.code in QGEMM_CODES:       # int8 products, no float copy of the weights
            qgemm.qgemm(w.code, w.rows2d, np.ascontiguousarray(x), out, 8 * numba.get_num_threads())
        else:                             # float weights: dequantize a chunk, BLAS
            mm.gemm(w.code, w.rows2d, x, out, self.deq)
        return out

    def matmul_many(self, x: np.ndarray, ws, experts: np.ndarray | None = None) -> list[np.ndarray]:
        """[x @ w^T for w in ws]; a few rows in one launch (the activation quantized once). With `experts`
        (each token's routed expert ids, [m, k]) each w is a routed-experts weight: row t*k + s of its
        product is x[t] @ w[experts[t, s]]^T."""
        codes = [w.code for w in ws]
        if experts is not None:
            experts = np.asarray(experts, np.int64).reshape(x.shape[0], -1)
            tokens = np.repeat(np.arange(x.shape[0]), experts.shape[1])
            outs = [np.empty((experts.size, w.shape[1]), np.float32) for w in ws]
            mm.run_products(codes, [w.raw for w in ws], (x,), outs, mm.expert_products(len(ws), experts, tokens))
            return outs
        m = x.shape[0]
        if m > gemv_rows(ws):
            return [self.matmul(x, w) for w in ws]
        outs = [np.empty((m, w.shape[0]), np.float32) for w in ws]
        mm.run_products(codes, [w.rows2d for w in ws], (x,), outs, mm.products_of(len(ws), m))
        return outs

    def matmul_experts(self, x: np.ndarray, w: Tensor, experts: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[i] = x[i] @ w[experts.flat[i]]^T for a few rows (a decode step's routed experts)."""
        mm.gemv_experts(w.code, w.raw, experts, x, out)
        return out

    def expert_matmul(self, x: np.ndarray, w: Tensor, starts: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows grouped by routed expert: x[starts[e]:starts[e+1]] @ w[e]^T, all experts in one launch."""
        out = np.empty((x.shape[0], w.shape[1]), np.float32) if out is None else out
        if w.code in QGEMM_CODES:
            qgemm.qgemm_grouped(w.code, w.raw, np.ascontiguousarray(x), np.asarray(starts, np.int64), out,
                                8 * numba.get_num_threads())
            return out
        for e in np.flatnonzero(np.diff(starts)):       # float experts: one product each
            a, b = starts[e], starts[e + 1]
            self.matmul(x[a:b], Tensor(w.name, w.qtype, w.shape[1:], w.raw[e]), out[a:b])
        return out

    def embed(self, t: Tensor, ids: np.ndarray) -> np.ndarray:
        rows = t.rows2d[np.asarray(ids, np.int64)]
        out = np.empty((len(ids), t.shape[-1]), np.float32)
        dequantize_rows(t.code, np.ascontiguousarray(rows), out)
        return out

    # ---- row plumbing (the graphs never index activations themselves, so a device backend can keep them)
    def take_rows(self, x: np.ndarray, rows) -> np.ndarray:
        return np.ascontiguousarray(x[np.asarray(rows)])

    def rows(self, x: np.ndarray, start: int, stop: int) -> np.ndarray:
        return x[start:stop]

    def concat_rows(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b], axis=0)

    def concat_cols(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b], axis=1)

    weighted_sum_into = staticmethod(ops.weighted_sum_into)

    def route(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Softmax router, greedy top-k (no renormalisation): (expert ids [m, k], weights [m, k])."""
        idx = np.empty((logits.shape[0], k), np.int64)
        w = np.empty((logits.shape[0], k), np.float32)
        ops.topk_softmax(np.ascontiguousarray(logits, np.float32), k, idx, w)
        return idx, w

    # ---- elementwise and attention
    rmsnorm = staticmethod(ops.rmsnorm)
    layernorm = staticmethod(ops.layernorm)
    silu_mul = staticmethod(ops.silu_mul)
    gelu = staticmethod(ops.gelu)
    quick_gelu = staticmethod(ops.quick_gelu)
    softmax = staticmethod(ops.softmax_rows)
    add = staticmethod(ops.add_inplace)
    add_bias = staticmethod(ops.add_bias)
    cache_store = staticmethod(ops.cache_store)

    def attention_causal(self, q, kc, vc, pos0: int, n_head: int, out, *, chunk: int = 256) -> None:
        """q [m, n_head*d] at positions pos0..pos0+m-1 over caches holding positions 0..pos0+m-1.
        A few rows (decode) go through one numba kernel; many rows (prefill) through BLAS per head,
        where the kernel's per-element loops ran at ~0.2 GFLOP/s (12 of 28 s of a 900-token prefill)."""
        m = q.shape[0]
        if m < BLAS_ATTENTION_ROWS:
            ops.attention_causal(q, kc, vc, pos0, n_head, out)
            return
        n = pos0 + m
        k, v = kv_floats(kc[:n]), kv_floats(vc[:n])
        d = q.shape[1] // n_head
        scale = np.float32(1.0 / math.sqrt(d))
        buf = np.empty(min(chunk, m) * n, np.float32)
        for h in range(n_head):
            sl = slice(h * d, (h + 1) * d)
            attend_head(q[:, sl], k[:, sl], v[:, sl], out[:, sl], buf, chunk, pos0,
                        lambda s, qh, r0: ops.softmax_scaled(s, scale, pos0 + r0 + 1))

    def rope(self, x: np.ndarray, n_head: int, positions: np.ndarray, theta: float) -> None:
        """positions are consecutive (a chunk of the sequence), so a forward's 2 x n_layer calls share tables."""
        cos, sin = consecutive_rope_tables(int(positions[0]), len(positions), x.shape[1] // n_head, float(theta))
        ops.rope_neox(x, n_head, cos, sin)

    # ---- vision
    def conv2d(self, x: np.ndarray, w: Tensor, k: int, stride: int, pad: int, bias=None) -> np.ndarray:
        """x [H, W, Cin] (*) w [Cout, Cin, k, k] -> [Ho, Wo, Cout], through im2col + GEMM."""
        H, W, C = x.shape
        ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
        cols = np.empty((ho * wo, C * k * k), np.float32)
        vision_ops.im2col(np.ascontiguousarray(x), k, stride, pad, cols)
        y = self.matmul(cols, w)
        if bias is not None:
            ops.add_bias(y, bias)
        return y.reshape(ho, wo, -1)

    window_partition = staticmethod(vision_ops.window_partition)
    window_unpartition = staticmethod(vision_ops.window_unpartition)

    def attention(self, q, k, v, n_head: int, relpos=None, *, chunk: int = 512) -> np.ndarray:
        """Bidirectional attention per batch item and head: q, k, v [B, n, n_head*d] -> [B, n, n_head*d].
        relpos = (Rh, Rw, H, W) adds SAM's decomposed relative positions. q, k, v are split head-major
        once; up to FUSED_ATTENTION_KEYS keys one kernel does it all, longer sequences make scores a
        chunk of query rows at a time with BLAS, so no head's full score matrix is ever held."""
        B, n, c = q.shape
        d = c // n_head
        scale = np.float32(1.0 / math.sqrt(d))
        Rh, Rw, W = (relpos[0], relpos[1], relpos[3]) if relpos is not None else (NO_RELPOS, NO_RELPOS, 1)
        out = np.empty((B, n, c), np.float32)
        qh = split_heads(q, n_head, False)
        if n <= FUSED_ATTENTION_KEYS:
            kt, vt = split_heads(k, n_head, True), split_heads(v, n_head, True)
            vision_ops.attention_fused(qh, kt, vt, Rh, Rw, W, scale, out)
            return out
        kh, vh, oh = split_heads(k, n_head, False), split_heads(v, n_head, False), np.empty_like(qh)
        scores = np.empty((min(chunk, n), n), np.float32)
        for b in range(B):
            for h in range(n_head):
                for r0 in range(0, n, chunk):
                    qc = qh[b, h, r0:r0 + chunk]
                    s = scores[:qc.shape[0]]
                    np.matmul(qc, kh[b, h].T, out=s)
                    vision_ops.softmax_relpos(s, qc, r0, Rh, Rw, W, scale)
                    np.matmul(s, vh[b, h], out=oh[b, h, r0:r0 + chunk])
        vision_ops.merge_heads(oh, out)
        return out

    def attention_prefix(self, q, k, v, n_head: int, n_head_kv: int, n_prefix: int) -> np.ndarray:
        """Prefix-masked grouped-query attention (DeepSeek-OCR 2's encoder): q [n, n_head*d], k, v
        [n, n_head_kv*d] -> [n, n_head*d], rows < n_prefix over keys [0, n_prefix), row i >= n_prefix
        over keys [0, i]. Split head-major once, then one kernel (vision_ops.attention_prefix)."""
        d = prefix_attention_head_dim(q.shape, k.shape, v.shape, n_head, n_head_kv, n_prefix)
        out = np.empty(q.shape, np.float32)
        qh = split_heads(q[None], n_head, False)[0]
        kt, vt = split_heads(k[None], n_head_kv, True)[0], split_heads(v[None], n_head_kv, True)[0]
        vision_ops.attention_prefix(qh, kt, vt, n_prefix, np.float32(1.0 / math.sqrt(d)), out)
        return out

    def kv_cache(self, n_layer: int, n_ctx: int, width: int, f16: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        dtype = np.uint16 if f16 else np.float32
        return [(np.zeros((n_ctx, width), dtype), np.zeros((n_ctx, width), dtype)) for _ in range(n_layer)]

    def synchronize(self) -> None:
        pass

    def warm_up(self) -> None:
        # attention over more than FUSED_ATTENTION_KEYS keys (SAM's global blocks), with and without
        # relative positions: a 33 x 33 grid of one-wide heads
        side = 33
        x = np.zeros((1, side * side, 1), np.float32)
        rel = np.zeros((side, side, 1), np.float32)
        self.attention(x, x, x, 1, (rel, rel, side, side))
        self.attention(x, x, x, 1)
