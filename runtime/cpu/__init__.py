"""The CPU backend: the ops the model graph calls, on numpy arrays, through numba kernels."""
from __future__ import annotations

import numba
import numpy as np

from dsocr.quant.rows import dequantize_rows
from dsocr.runtime.cpu import matmul as mm
from dsocr.runtime.cpu import ops
from dsocr.runtime.gguf_file import Tensor

GEMV_MAX_ROWS = 4     # up to this many activation rows, one GEMV per row beats dequantize + BLAS


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
        out = np.empty((m, w.shape[-2]), np.float32) if out is None else out
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
    attention_causal = staticmethod(ops.attention_causal)
    topk_softmax = staticmethod(ops.topk_softmax)

    def rope(self, x: np.ndarray, n_head: int, positions: np.ndarray, theta: float) -> None:
        cos, sin = ops.rope_tables(positions, x.shape[1] // n_head, theta)
        ops.rope_neox(x, n_head, cos, sin)

    def kv_cache(self, n_layer: int, n_ctx: int, width: int, f16: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        dtype = np.uint16 if f16 else np.float32
        return [(np.zeros((n_ctx, width), dtype), np.zeros((n_ctx, width), dtype)) for _ in range(n_layer)]

    def synchronize(self) -> None:
        pass
