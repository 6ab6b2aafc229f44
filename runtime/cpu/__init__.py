"""The CPU backend: the ops of the backend contract (runtime/backend.py) on numpy arrays, through
numba kernels."""
from __future__ import annotations

import math

import numba
import numpy as np

from dsocr.quant.rows import dequantize_rows
from dsocr.runtime.cpu import matmul as mm
from dsocr.runtime.cpu import ops, vision_ops
from dsocr.runtime.gguf_file import Tensor
from dsocr.runtime.rope import rope_tables

GEMV_MAX_ROWS = 4     # up to this many activation rows, one GEMV per row beats dequantize + BLAS


BLAS_ATTENTION_ROWS = 8     # query rows from which causal attention goes through BLAS


def kv_floats(c: np.ndarray) -> np.ndarray:
    """KV-cache rows as float32 (the F16 cache holds fp16 bits)."""
    return c.view(np.float16).astype(np.float32) if c.dtype == np.uint16 else c


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
        if m <= GEMV_MAX_ROWS:
            for i in range(m):
                mm.gemv(w.code, w.rows2d, x[i], out[i])
        else:
            mm.gemm(w.code, w.rows2d, x, out, self.deq)
        return out

    def matmul_experts(self, x: np.ndarray, w: Tensor, experts: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[i] = x[i] @ w[experts[i]]^T for a few rows (one token's routed experts)."""
        mm.gemv_experts(w.code, w.raw, experts, x, out)
        return out

    def expert_matmul(self, x: np.ndarray, w: Tensor, e: int, out: np.ndarray | None = None) -> np.ndarray:
        """x [m, k] @ w[e]^T: one routed expert applied to the rows routed to it."""
        sub = Tensor(w.name, w.qtype, w.shape[1:], w.raw[e])
        return self.matmul(x, sub, out)

    def embed(self, t: Tensor, ids: np.ndarray) -> np.ndarray:
        rows = t.rows2d[np.asarray(ids, np.int64)]
        out = np.empty((len(ids), t.shape[-1]), np.float32)
        dequantize_rows(t.code, np.ascontiguousarray(rows), out)
        return out

    # ---- row plumbing (the graphs never index activations themselves, so a device backend can keep them)
    def take_rows(self, x: np.ndarray, rows) -> np.ndarray:
        return np.ascontiguousarray(x[np.asarray(rows)])

    def repeat_rows(self, x: np.ndarray, k: int) -> np.ndarray:
        return np.repeat(x, k, axis=0)

    def concat_rows(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b], axis=0)

    def concat_cols(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b], axis=1)

    def weighted_sum_into(self, out: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        """out[0] += sum_k w[k] y[k]  (a token's routed experts)."""
        out[0] += (np.asarray(w)[:, None] * y).sum(axis=0)

    def scatter_add_rows(self, out: np.ndarray, rows: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        """out[rows[i]] += w[i] y[i]  (an expert's outputs back to its tokens)."""
        out[rows] += w[:, None] * y

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
        cos, sin = rope_tables(positions, x.shape[1] // n_head, theta)
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
        relpos = (Rh, Rw, H, W) adds SAM's decomposed relative positions. Scores are made a chunk of
        query rows at a time with BLAS, so no head's full score matrix is ever held."""
        B, n, c = q.shape
        d = c // n_head
        scale = np.float32(1.0 / math.sqrt(d))
        out = np.empty((B, n, c), np.float32)
        buf = np.empty(min(chunk, n) * n, np.float32)
        if relpos is None:
            def softmax(s, qh, r0):
                ops.softmax_scaled(s, scale, n)
        else:
            def softmax(s, qh, r0):
                vision_ops.softmax_relpos(s, qh, r0, *relpos, scale)
        for b in range(B):
            for h in range(n_head):
                sl = slice(h * d, (h + 1) * d)
                attend_head(q[b, :, sl], k[b, :, sl], v[b, :, sl], out[b, :, sl], buf, chunk, None, softmax)
        return out

    def kv_cache(self, n_layer: int, n_ctx: int, width: int, f16: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        dtype = np.uint16 if f16 else np.float32
        return [(np.zeros((n_ctx, width), dtype), np.zeros((n_ctx, width), dtype)) for _ in range(n_layer)]

    def synchronize(self) -> None:
        pass
