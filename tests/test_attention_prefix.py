"""attention_prefix, the attention of DeepSeek-OCR 2's encoder (n image tokens, then n learned
queries; image rows attend to the image rows, query row i to the image rows and the queries up to
itself; grouped kv heads): both backends against a float64 numpy reference written from the
contract's definition with an explicit additive mask, and the mask's reach checked by perturbing
one key/value row or one kv head.

Tolerance: the kernels sum in float32 in their own order, so 1e-5 relative to max |out| (as
test_cuda.py and test_kernels.py); a row or head the mask keeps out must not move at all."""
import importlib.util

import numpy as np
import pytest

from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.errors import ModelError

from conftest import rel_err

TOL = 1e-5
cpu = CPUBackend()
needs_numba_cuda = pytest.mark.skipif(importlib.util.find_spec("numba.cuda") is None,
                                      reason="numba.cuda is not importable")


def reference(q, k, v, n_head, n_head_kv, n_prefix) -> np.ndarray:
    """softmax(q k^T / sqrt d + mask) v per head in float64; mask 0 where row i may read key j
    (i < n_prefix: j < n_prefix; else j <= i), -inf elsewhere; query head h reads kv head
    h // (n_head / n_head_kv)."""
    n = q.shape[0]
    d = q.shape[1] // n_head
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = np.where(np.where(i < n_prefix, j < n_prefix, j <= i), 0.0, -np.inf)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.empty((n, n_head * d))
    for h in range(n_head):
        g = h // (n_head // n_head_kv)
        s = q[:, h * d:(h + 1) * d] @ k[:, g * d:(g + 1) * d].T / np.sqrt(d) + mask
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h * d:(h + 1) * d] = (p / p.sum(axis=1, keepdims=True)) @ v[:, g * d:(g + 1) * d]
    return out


def qkv(seed, n, n_head, n_head_kv, d, scale=2.0):
    """q [n, n_head*d], k, v [n, n_head_kv*d]; q scaled up so the softmaxes are peaked (a leaked or
    missing key moves the output)."""
    rng = np.random.default_rng(seed)
    q = (scale * rng.standard_normal((n, n_head * d))).astype(np.float32)
    k, v = rng.standard_normal((2, n, n_head_kv * d)).astype(np.float32)
    return q, k, v


# (n, n_prefix, n_head, n_head_kv, d): the encoder's n/2 split at n 16..64 (a prefix and an n that
# are not multiples of the CPU kernel's 4-row groups), plain causal (n_prefix 0) and fully
# bidirectional (n_prefix n); GQA ratios 1, 2, 7; d 8 and 64; the real sequence lengths with tiny heads
SHAPES = [(16, 8, 2, 2, 8), (22, 11, 4, 2, 8), (37, 18, 14, 2, 8), (64, 32, 7, 1, 64), (48, 24, 4, 2, 64),
          (48, 0, 4, 2, 64), (33, 0, 7, 1, 8), (40, 40, 4, 4, 8), (29, 29, 14, 2, 64),
          (288, 144, 4, 2, 8), (512, 256, 4, 2, 8)]


@pytest.mark.parametrize("n, n_prefix, n_head, n_head_kv, d", SHAPES)
def test_cpu_matches_the_float64_reference(n, n_prefix, n_head, n_head_kv, d):
    q, k, v = qkv(n + d, n, n_head, n_head_kv, d)
    got = cpu.attention_prefix(q, k, v, n_head, n_head_kv, n_prefix)
    assert got.shape == q.shape and got.dtype == np.float32
    assert rel_err(got, reference(q, k, v, n_head, n_head_kv, n_prefix)) < TOL


def test_the_two_ends_are_the_existing_causal_and_bidirectional_ops():
    # n_prefix 0 is attention_causal from position 0, n_prefix n is attention, over kv heads repeated
    n, n_head, n_head_kv, d = 20, 6, 2, 8
    q, k, v = qkv(3, n, n_head, n_head_kv, d)
    per_head = lambda a: np.ascontiguousarray(np.repeat(a.reshape(n, n_head_kv, d), n_head // n_head_kv, axis=1)
                                              .reshape(n, n_head * d))
    kr, vr = per_head(k), per_head(v)
    causal = np.empty_like(q)
    cpu.attention_causal(q, kr, vr, 0, n_head, causal)
    assert rel_err(cpu.attention_prefix(q, k, v, n_head, n_head_kv, 0), causal) < TOL
    full = cpu.attention(q[None], kr[None], vr[None], n_head)[0]
    assert rel_err(cpu.attention_prefix(q, k, v, n_head, n_head_kv, n), full) < TOL


@pytest.mark.parametrize("row", [0, 7, 8, 11, 15])
def test_a_key_row_reaches_only_the_rows_that_see_it(row):
    # 8 image rows then 8 queries: image row j's k/v reach every row; query row j's only queries >= j
    n, n_prefix, n_head, n_head_kv, d = 16, 8, 4, 2, 8
    q, k, v = qkv(5, n, n_head, n_head_kv, d)
    base = cpu.attention_prefix(q, k, v, n_head, n_head_kv, n_prefix)
    k2, v2 = k.copy(), v.copy()
    k2[row] += 3.0
    v2[row] -= 5.0
    moved = cpu.attention_prefix(q, k2, v2, n_head, n_head_kv, n_prefix)
    reached = np.arange(n) >= (0 if row < n_prefix else row)
    assert np.array_equal(moved[~reached], base[~reached])
    assert np.abs(moved[reached] - base[reached]).max(axis=1).min() > 1e-2


def test_a_kv_head_reaches_only_its_query_heads():
    # 6 query heads over 2 kv heads: kv head 1's columns feed query heads 3, 4, 5
    n, n_head, n_head_kv, d = 12, 6, 2, 8
    q, k, v = qkv(6, n, n_head, n_head_kv, d)
    base = cpu.attention_prefix(q, k, v, n_head, n_head_kv, 6)
    v2 = v.copy()
    v2[:, d:] += 1.0
    moved = (cpu.attention_prefix(q, k, v2, n_head, n_head_kv, 6) - base).reshape(n, n_head, d)
    assert np.array_equal(moved[:, :3], np.zeros((n, 3, d), np.float32))
    assert np.abs(moved[:, 3:]).min() > 0.5          # softmax weights sum to 1: every output moves by ~1


@pytest.mark.parametrize("shapes, n_head, n_head_kv, n_prefix, needle", [
    (((8, 32), (8, 16), (8, 16)), 4, 3, 4, "not a multiple"),
    (((8, 32), (8, 16), (8, 16)), 4, 2, 9, "outside 0..8"),
    (((8, 32), (8, 16), (8, 16)), 4, 2, -1, "outside 0..8"),
    (((8, 32), (8, 24), (8, 24)), 4, 2, 4, "are not"),
    (((8, 32), (7, 16), (7, 16)), 4, 2, 4, "are not"),
    (((8, 32), (8, 16), (8, 8)), 4, 2, 4, "are not"),
])
def test_shapes_outside_the_contract_are_refused(shapes, n_head, n_head_kv, n_prefix, needle):
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=needle):
        cpu.attention_prefix(q, k, v, n_head, n_head_kv, n_prefix)


# the simulator runs a Python thread per CUDA thread: a few rows and heads; 12-wide heads exceed
# its 8-thread blocks, so the strided loops over a head's columns are exercised
CUDA_SHAPES = [(10, 5, 4, 2, 4), (9, 0, 3, 1, 4), (6, 6, 2, 2, 12), (7, 3, 2, 1, 12)]


@needs_numba_cuda
@pytest.mark.parametrize("n, n_prefix, n_head, n_head_kv, d", CUDA_SHAPES)
def test_cuda_matches_cpu(be, n, n_prefix, n_head, n_head_kv, d):  # noqa: F811
    q, k, v = qkv(n * d, n, n_head, n_head_kv, d)
    want = cpu.attention_prefix(q, k, v, n_head, n_head_kv, n_prefix)
    # scratch for 3 rows: launches of 3 rows and a shorter last one
    got = be.attention_prefix(be.asarray(q), be.asarray(k), be.asarray(v), n_head, n_head_kv, n_prefix,
                              chunk_bytes=4 * n * n_head * 3)
    assert rel_err(be.to_host(got), want) < TOL


@needs_numba_cuda
def test_cuda_refuses_heads_wider_than_its_shared_copy(be):  # noqa: F811
    from dsocr.runtime.cuda.attention import HEAD_DIM_MAX
    d = HEAD_DIM_MAX + 8
    q, k, v = (be.asarray(np.zeros((2, d), np.float32)) for _ in range(3))
    with pytest.raises(ModelError, match=f"head width {d} is over {HEAD_DIM_MAX}"):
        be.attention_prefix(q, k, v, 1, 1, 1)
