"""The CUDA backend (numba.cuda; the optional `numba-cuda` package on real GPUs): the ops of the
backend contract (runtime/backend.py), as the CPU backend, so the model graphs run unchanged.
Weights are uploaded once, still in their ggml blocks; activations stay on the device between
ops; in decode only the token id goes up and the logits row comes back (routing stays on the
device too).

Under NUMBA_ENABLE_CUDASIM=1 the kernels run in numba's simulator (one Python thread per CUDA
thread), which is how the tests check them without a GPU: blocks are kept small there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsocr.quant.layout import check_code
from dsocr.runtime.backend import prefix_attention_head_dim
from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import Tensor
from dsocr.runtime.rope import rope_tables


@dataclass
class DeviceTensor:
    name: str
    qtype: object
    shape: tuple[int, ...]
    raw: object                  # device uint8 [rows, row_bytes] (or [n_expert, rows, row_bytes])

    @property
    def code(self) -> int:
        return int(self.qtype)


class CUDABackend:
    name = "cuda"

    def __init__(self, threads_per_block: int | None = None):
        from numba import config, cuda
        try:
            available = cuda.is_available()
        except Exception:  # a broken driver install raises rather than answering False
            available = False
        if not available:
            raise ModelError("--device cuda: no usable NVIDIA GPU or CUDA driver was found "
                             "(install the driver and `pip install -e '.[cuda]'` in the dsocr checkout, or use --device cpu)")
        from dsocr.runtime.cuda import attention, matmul, ops
        self.cuda, self.mm, self.ops, self.attn = cuda, matmul, ops, attention
        self.simulated = bool(config.ENABLE_CUDASIM)
        self.tpb = threads_per_block or (8 if self.simulated else ops.THREADS)
        self.max_blocks = 8 if self.simulated else 4096     # grid-stride kernels: enough to fill the GPU
        self._rope: dict = {}

    def _grid(self, n: int) -> int:
        return max(1, min(self.max_blocks, (n + self.tpb - 1) // self.tpb))

    # ---- memory
    @staticmethod
    def _is_device(a) -> bool:
        return hasattr(a, "copy_to_host")     # numba's device arrays, real or simulated

    def weight(self, t: Tensor) -> DeviceTensor:
        check_code(t.code)      # the kernels' weight_at cannot raise on the device
        raw = t.raw.reshape(t.raw.shape[0], t.raw.shape[1], -1) if t.raw.ndim == 3 else t.rows2d
        return DeviceTensor(t.name, t.qtype, t.shape, self.cuda.to_device(np.ascontiguousarray(raw)))

    def table(self, t: Tensor):
        return self.cuda.to_device(np.ascontiguousarray(t.floats(), np.float32))

    def asarray(self, a):
        return a if self._is_device(a) else self.cuda.to_device(np.ascontiguousarray(a, np.float32))

    def to_host(self, a):
        return a.copy_to_host() if self._is_device(a) else a

    def empty(self, shape, dtype=np.float32):
        return self.cuda.device_array(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        return self.cuda.to_device(np.zeros(shape, dtype))

    def _ints(self, a):
        return a if self._is_device(a) else self.cuda.to_device(np.ascontiguousarray(a, np.int64))

    # ---- products
    def matmul(self, x, w: DeviceTensor, out=None):
        m, k = x.shape
        n = w.shape[0]
        out = self.empty((m, n)) if out is None else out
        if m <= self.mm.MAX_ROWS:
            self.mm.gemv[n, self.tpb](w.raw, w.code, x, out)
        else:
            t = self.mm.TILE
            self.mm.gemm[((n + t - 1) // t, (m + t - 1) // t), (t, t)](w.raw, w.code, x, out)
        return out

    def matmul_many(self, x, ws, experts=None):
        if experts is None:
            return [self.matmul(x, w) for w in ws]
        m, k = x.shape[0], experts.size // x.shape[0]
        xk = self.take_rows(x, np.repeat(np.arange(m), k))
        return [self.matmul_experts(xk, w, experts, self.empty((m * k, w.shape[1]))) for w in ws]

    def matmul_experts(self, x, w: DeviceTensor, experts, out):
        ids = self._ints(experts).reshape(experts.size)
        self.mm.gemv_experts[(w.shape[1], x.shape[0]), self.tpb](w.raw, w.code, ids, x, out)
        return out

    def expert_matmul(self, x, w: DeviceTensor, starts, out=None):
        out = self.empty((x.shape[0], w.shape[1])) if out is None else out
        for e in np.flatnonzero(np.diff(starts)):
            a, b = int(starts[e]), int(starts[e + 1])
            self.matmul(x[a:b], DeviceTensor(w.name, w.qtype, w.shape[1:], w.raw[e]), out[a:b])
        return out

    def embed(self, t: DeviceTensor, ids):
        out = self.empty((len(ids), t.shape[-1]))
        self.mm.embed_rows[len(ids), self.tpb](t.raw, t.code, self._ints(np.asarray(ids)), out)
        return out

    # ---- row plumbing
    def take_rows(self, x, rows):
        rows = np.asarray(rows, np.int64)
        out = self.empty((len(rows), x.shape[1]))
        self.ops.copy_rows[len(rows), self.tpb](x, self._ints(rows), out, 0)
        return out

    def rows(self, x, start: int, stop: int):
        return x[start:stop]

    def concat_rows(self, a, b):
        out = self.empty((a.shape[0] + b.shape[0], a.shape[1]))
        self.ops.copy_range[a.shape[0], self.tpb](a, out, 0)
        self.ops.copy_range[b.shape[0], self.tpb](b, out, a.shape[0])
        return out

    def concat_cols(self, a, b):
        out = self.empty((a.shape[0], a.shape[1] + b.shape[1]))
        self.ops.copy_cols[a.shape[0], self.tpb](a, out, 0)
        self.ops.copy_cols[b.shape[0], self.tpb](b, out, a.shape[1])
        return out

    def weighted_sum_into(self, out, y, w) -> None:
        self.ops.weighted_sum_into[out.shape[0], self.tpb](out, y, self.asarray(w))

    def route(self, logits, k: int):
        m = logits.shape[0]
        idx, w = self.cuda.device_array((m, k), np.int64), self.empty((m, k))
        self.ops.route_topk[self._grid(m), self.tpb](logits, k, idx, w)
        return idx, w

    # ---- elementwise
    def _elementwise(self, code, a, b, out) -> None:
        n = out.size
        self.ops.elementwise[self._grid(n), self.tpb](code, a.reshape(n), b.reshape(n), out.reshape(n))

    def rmsnorm(self, x, w, eps, out):
        self.ops.rmsnorm[x.shape[0], self.tpb](x, w, np.float32(eps), out)

    def layernorm(self, x, w, b, eps, out):
        self.ops.layernorm[x.shape[0], self.tpb](x, w, b, np.float32(eps), out)

    def silu_mul(self, gate, up, out):
        self._elementwise(0, gate, up, out)

    def gelu(self, x, out):
        self._elementwise(1, x, x, out)

    def quick_gelu(self, x, out):
        self._elementwise(2, x, x, out)

    def add(self, x, y):
        self._elementwise(3, x, y, x)

    def add_bias(self, x, b):
        self.ops.add_bias[self._grid(x.shape[0] * x.shape[1]), self.tpb](x, b)

    def softmax(self, x, out):
        self.ops.softmax_rows[x.shape[0], self.tpb](x, out)

    def rope(self, x, n_head: int, positions, theta: float) -> None:
        """positions are consecutive (a chunk of the sequence): the kernel indexes device tables."""
        pos0, d = int(positions[0]), x.shape[1] // n_head
        cos, sin = self._rope_tables(d, float(theta), pos0 + x.shape[0])
        n = x.shape[0] * x.shape[1] // 2
        self.ops.rope_neox[self._grid(n), self.tpb](x, n_head, cos, sin, pos0)

    def _rope_tables(self, d: int, theta: float, n_pos: int):
        # made once and regrown by doubling, so decode steps upload nothing
        have = self._rope.get((d, theta))
        if have is None or have[0].shape[0] < n_pos:
            cos, sin = rope_tables(np.arange(max(4096, 2 * n_pos)), d, theta)
            have = self._rope[(d, theta)] = (self.asarray(cos), self.asarray(sin))
        return have

    # ---- attention and cache
    def kv_cache(self, n_layer: int, n_ctx: int, width: int, f16: bool):
        """float32 on the device (F16 halves the CPU's memory; the GPU keeps exact float32)."""
        return [(self.zeros((n_ctx, width)), self.zeros((n_ctx, width))) for _ in range(n_layer)]

    def cache_store(self, src, cache, pos0: int) -> None:
        self.ops.copy_range[src.shape[0], self.tpb](src, cache, pos0)

    def attention_causal(self, q, kc, vc, pos0: int, n_head: int, out) -> None:
        m = q.shape[0]
        scores = self.empty((m * n_head, pos0 + m))
        self.attn.attention_causal[(m, n_head), self.tpb](q, kc, vc, pos0, n_head, scores, out)

    @staticmethod
    def _score_rows(n: int, blocks_per_row: int, chunk_bytes: int) -> int:
        """Query rows per launch of a kernel with a float32 scratch row of n scores per block, so the
        scratch stays within chunk_bytes."""
        return max(1, min(n, chunk_bytes // (4 * n * blocks_per_row)))

    def attention(self, q, k, v, n_head: int, relpos=None, *, chunk_bytes: int = 256 << 20):
        B, n, c = q.shape
        out = self.empty((B, n, c))
        if relpos is None:
            Rh = Rw = self.zeros((1, 1, 1))
            H = W = 1
        else:
            Rh, Rw, H, W = relpos
            if max(H, W) > self.ops.THREADS:
                raise ModelError(f"relative-position grid {H}x{W} is over {self.ops.THREADS} on the CUDA backend")
            Rh, Rw = self.asarray(Rh), self.asarray(Rw)
        rows = self._score_rows(n, n_head * B, chunk_bytes)
        scores = self.empty((rows * n_head * B, n))
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            self.attn.attention_full[(r, n_head, B), self.tpb](q, k, v, n_head, Rh, Rw, H, W, relpos is not None, r0,
                                                             scores, out)
        return out

    def attention_prefix(self, q, k, v, n_head: int, n_head_kv: int, n_prefix: int, *, chunk_bytes: int = 256 << 20):
        d = prefix_attention_head_dim(q.shape, k.shape, v.shape, n_head, n_head_kv, n_prefix)
        if d > self.attn.HEAD_DIM_MAX:
            raise ModelError(f"attention head width {d} is over {self.attn.HEAD_DIM_MAX} on the CUDA backend")
        n = q.shape[0]
        out = self.empty(q.shape)
        rows = self._score_rows(n, n_head, chunk_bytes)
        scores = self.empty((rows * n_head, n))
        for r0 in range(0, n, rows):
            self.attn.attention_prefix[(min(rows, n - r0), n_head), self.tpb](q, k, v, n_head, n_head_kv, n_prefix, r0,
                                                                            scores, out)
        return out

    # ---- vision layout
    def conv2d(self, x, w: DeviceTensor, k: int, stride: int, pad: int, bias=None):
        H, W, C = x.shape
        ho, wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
        cols = self.empty((ho * wo, C * k * k))
        self.ops.im2col[self._grid(cols.size), self.tpb](self.asarray(x), k, stride, pad, cols)
        y = self.matmul(cols, w)
        if bias is not None:
            self.add_bias(y, bias)
        return y.reshape(ho, wo, w.shape[0])

    def window_partition(self, x, ws: int, out) -> None:
        self.ops.window_partition[self._grid(out.size), self.tpb](x, ws, out)

    def window_unpartition(self, win, ws: int, out) -> None:
        self.ops.window_unpartition[self._grid(out.size), self.tpb](win, ws, out)

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def warm_up(self) -> None:
        pass    # not yet: the relative-position path for grids wider than ops.THREADS is compiled on first use
