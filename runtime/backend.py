"""The backend contract: the op set a backend gives the model graphs (runtime/language.py,
runtime/vision.py) and their drivers (runtime/generate.py, runtime/engine.py), written down once.

CPUBackend (runtime/cpu) and CUDABackend (runtime/cuda) both satisfy it; tests/test_backend.py
holds their signatures to it (same parameter names, kinds and defaults) and the graphs to calling
nothing outside it. A backend may add keyword-only tuning parameters with defaults (CPU chunk
sizes, CUDA scratch bytes): the graphs never pass them.

Conventions. An "array" is the backend's own (numpy on the CPU, a numba device array on CUDA),
float32 and C-contiguous; shapes are written [rows, cols]. A "weight" is what `weight` returns:
a GGUF tensor still in its ggml blocks, [n, k] for a matrix (n output rows of k weights),
[n_expert, n, k] for routed experts, [Cout, Cin, k, k] for a convolution. Ops that take `out`
write their result into it (it may be an input, for in-place use) and return None unless said.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from dsocr.runtime.gguf_file import Tensor

Array = Any     # the backend's array type
Weight = Any    # the backend's weight type (what `weight` returns)


class Backend(Protocol):
    name: str
    """The backend's name: "cpu" or "cuda"."""

    # ---- memory
    def weight(self, t: Tensor) -> Weight:
        """A GGUF tensor as a matmul / embed / conv2d operand, kept in its ggml blocks."""

    def table(self, t: Tensor) -> Array:
        """A small tensor (norm weight, bias, position table) as a float32 array."""

    def asarray(self, a) -> Array:
        """A host array as a float32 backend array (a backend array is returned as it is)."""

    def to_host(self, a) -> np.ndarray:
        """A backend array as a numpy array."""

    def empty(self, shape, dtype=np.float32) -> Array:
        """An uninitialised array."""

    def zeros(self, shape, dtype=np.float32) -> Array:
        """A zero-filled array."""

    # ---- products
    def matmul(self, x: Array, w: Weight, out: Array | None = None) -> Array:
        """x [m, k] @ w[n, k]^T -> [m, n] (into `out` when given), returned."""

    def matmul_many(self, x: Array, ws, experts=None) -> list[Array]:
        """[x @ w^T for w in ws], which a backend may run together (one CPU launch for a few rows); with
        `experts` (each token's routed expert ids [m, k], may stay on the backend) each w is a
        routed-experts weight and row t*k + s of its product is x[t] @ w[experts[t, s]]^T."""

    def matmul_experts(self, x: Array, w: Weight, experts, out: Array) -> Array:
        """out[i] = x[i] @ w[experts.flat[i]]^T for a decode step's routed experts (ids [m, k] in row-major
        order, may stay on the backend)."""

    def expert_matmul(self, x: Array, w: Weight, starts: np.ndarray, out: Array | None = None) -> Array:
        """Rows grouped by routed expert: x[starts[e]:starts[e+1]] @ w[e]^T for every e (starts: host
        int64 [n_expert + 1]) -> [m, n], returned."""

    def embed(self, t: Weight, ids: np.ndarray) -> Array:
        """Rows `ids` of an embedding table, dequantized: [len(ids), n]."""

    # ---- row plumbing (the graphs never index activations themselves)
    def take_rows(self, x: Array, rows) -> Array:
        """x[rows] as a new array."""

    def rows(self, x: Array, start: int, stop: int) -> Array:
        """x[start:stop] as a view: what is written to it lands in x (one sequence's rows of a batch)."""

    def concat_rows(self, a: Array, b: Array) -> Array:
        """[a; b] along rows."""

    def concat_cols(self, a: Array, b: Array) -> Array:
        """[a, b] along columns."""

    def weighted_sum_into(self, out: Array, y: Array, w) -> None:
        """out[t] += sum_s w[t, s] y[t*k + s] for w [m, k] (each token's k routed experts' outputs)."""

    def route(self, logits: Array, k: int) -> tuple[Array, Array]:
        """Softmax router, greedy top-k without renormalisation: (expert ids [m, k] int64, weights [m, k])."""

    # ---- elementwise
    def rmsnorm(self, x: Array, w: Array, eps: float, out: Array) -> None:
        """out = x / sqrt(mean(x^2) + eps) * w, per row."""

    def layernorm(self, x: Array, w: Array, b: Array, eps: float, out: Array) -> None:
        """out = (x - mean) / sqrt(var + eps) * w + b, per row."""

    def silu_mul(self, gate: Array, up: Array, out: Array) -> None:
        """out = silu(gate) * up."""

    def gelu(self, x: Array, out: Array) -> None:
        """out = exact (erf) GELU of x."""

    def quick_gelu(self, x: Array, out: Array) -> None:
        """out = x * sigmoid(1.702 x)."""

    def softmax(self, x: Array, out: Array) -> None:
        """out = softmax of each row of x."""

    def add(self, x: Array, y: Array) -> None:
        """x += y."""

    def add_bias(self, x: Array, b: Array) -> None:
        """x [m, c] += b [c]."""

    def rope(self, x: Array, n_head: int, positions: np.ndarray, theta: float) -> None:
        """NEOX rotary embedding of x [m, n_head*d] in place, row i at positions[i] (consecutive)."""

    # ---- attention and KV cache
    def kv_cache(self, n_layer: int, n_ctx: int, width: int, f16: bool) -> list[tuple[Array, Array]]:
        """Zeroed (k, v) caches [n_ctx, width] per layer; f16 asks for half precision where the backend keeps it."""

    def cache_store(self, src: Array, cache: Array, pos0: int) -> None:
        """cache[pos0:pos0+m] = src [m, width]."""

    def attention_causal(self, q: Array, kc: Array, vc: Array, pos0: int, n_head: int, out: Array) -> None:
        """out = causal softmax(q k^T / sqrt d) v per head, q [m, n_head*d] at positions pos0.., over the caches."""

    def attention(self, q: Array, k: Array, v: Array, n_head: int, relpos=None) -> Array:
        """Bidirectional attention, q, k, v [B, n, n_head*d] -> [B, n, n_head*d]; relpos = (Rh, Rw, H, W)
        adds SAM's decomposed relative positions."""

    def attention_prefix(self, q: Array, k: Array, v: Array, n_head: int, n_head_kv: int, n_prefix: int) -> Array:
        """q [n, n_head*d], k, v [n, n_head_kv*d] -> [n, n_head*d]: softmax(q k^T / sqrt d) v per head, query head h
        reading kv head h // (n_head / n_head_kv); rows < n_prefix see keys [0, n_prefix) (bidirectional), row
        i >= n_prefix sees keys [0, i] (causal after the prefix)."""

    # ---- vision layout
    def conv2d(self, x: Array, w: Weight, k: int, stride: int, pad: int, bias=None) -> Array:
        """x [H, W, Cin] (*) w [Cout, Cin, k, k] (+ bias [Cout]) -> [Ho, Wo, Cout]."""

    def window_partition(self, x: Array, ws: int, out: Array) -> None:
        """x [H, W, C] -> out [n_windows, ws*ws, C], zero padded to multiples of ws."""

    def window_unpartition(self, win: Array, ws: int, out: Array) -> None:
        """win [n_windows, ws*ws, C] -> out [H, W, C], the padding dropped."""

    def synchronize(self) -> None:
        """Wait for queued work (for timing)."""

    def warm_up(self) -> None:
        """Run (compile, or load from the cache) the kernels of paths that the engine's small warm-up
        page does not reach, so that no real request waits for a compile."""


def prefix_attention_head_dim(q_shape, k_shape, v_shape, n_head: int, n_head_kv: int, n_prefix: int) -> int:
    """attention_prefix's shape rule, checked before a kernel indexes by it: the head width d, or a
    ValueError saying which of q [n, n_head*d], k and v [n, n_head_kv*d], n_prefix in [0, n] does not hold."""
    if n_head_kv < 1 or n_head % n_head_kv:
        raise ValueError(f"attention_prefix: {n_head} query heads are not a multiple of {n_head_kv} kv heads")
    (n, q_width), (n_kv, kv_width) = q_shape, k_shape
    d = q_width // n_head
    if tuple(v_shape) != tuple(k_shape) or n_kv != n or d < 1 or d * n_head != q_width or d * n_head_kv != kv_width:
        raise ValueError(f"attention_prefix: q {list(q_shape)}, k {list(k_shape)}, v {list(v_shape)} are not "
                         f"[n, {n_head}*d], [n, {n_head_kv}*d], [n, {n_head_kv}*d]")
    if not 0 <= n_prefix <= n:
        raise ValueError(f"attention_prefix: a prefix of {n_prefix} rows is outside 0..{n}")
    return d
