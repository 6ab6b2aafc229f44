"""The CUDA backend against its CPU twin, op by op on small shapes, and the tiny language model
decoding the golden ids on the device. Without a GPU (CI) this runs under numba's CUDA simulator
(conftest sets NUMBA_ENABLE_CUDASIM=1 when no NVIDIA device is present); with one, on the GPU.

Tolerances: the CUDA kernels compute in float32 in a different summation order from the CPU
kernels and from float64 numpy, so 1e-5 relative to the output's magnitude, as in
test_kernels.py; matmuls are compared with float64 products of the CPU-dequantized weights
(the CPU GEMV quantizes its activation to q8 blocks as ggml does, the CUDA one does not).
Row plumbing (copies, gathers, routing ids) must be exact.
"""


import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.runtime.cpu import CPUBackend, matmul as mm
from dsocr.runtime.gguf_file import Tensor

from conftest import SIMULATED, TINY, rel_err

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]


cpu = CPUBackend()


def tensor(qtype, shape, rng, scale=0.05):
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    raw = quant.quantize(w, qtype)
    return Tensor("w", qtype, shape, raw), quant.dequantize(raw, qtype).reshape(shape).astype(np.float64)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_gemv_and_embed_every_type(be, qtype):
    rng = np.random.default_rng(int(qtype))
    t, wd = tensor(qtype, (5, 256), rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)     # one launch decodes each weight once for all rows
    w = be.weight(t)
    assert rel_err(be.to_host(be.matmul(be.asarray(x), w)), x @ wd.T) < 1e-5
    ids = np.array([4, 0, 4])
    assert np.array_equal(be.to_host(be.embed(w, ids)), cpu.embed(t, ids))


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_tiled_gemm(be, qtype):
    # 7 x 20 outputs: two column tiles, the second partial; k = 256 is 16 row tiles. The device
    # keeps the activation in float, so its CPU twin is the float GEMM (the CPU's own many-row
    # product of quantized weights is the int8 one, test_kernels.py::test_qgemm_every_type)
    rng = np.random.default_rng(int(qtype) + 1)
    t, wd = tensor(qtype, (20, 256), rng)
    x = rng.standard_normal((7, 256)).astype(np.float32)
    got = be.to_host(be.matmul(be.asarray(x), be.weight(t)))
    assert rel_err(got, x @ wd.T) < 1e-5
    assert rel_err(got, mm.gemm(int(qtype), t.rows2d, x, np.empty((7, 20), np.float32), mm.Dequantizer())) < 1e-5


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_grouped_experts(be, qtype):
    rng = np.random.default_rng(5)
    t, wd = tensor(qtype, (4, 6, 256), rng)
    w = be.weight(t)
    experts = np.array([3, 0, 3])
    x = rng.standard_normal((3, 256)).astype(np.float32)
    got = be.to_host(be.matmul_experts(be.asarray(x), w, experts, be.empty((3, 6))))
    assert rel_err(got, np.stack([wd[e] @ x[i] for i, e in enumerate(experts)])) < 1e-5
    x6 = np.tile(x, (2, 1))                      # rows 0-1 to expert 0, 2-4 to expert 2, 5 to expert 3
    starts = np.array([0, 2, 2, 5, 6])
    got = be.to_host(be.expert_matmul(be.asarray(x6), w, starts))
    want = np.stack([wd[e] @ x6[i] for i, e in enumerate([0, 0, 2, 2, 2, 3])])
    assert rel_err(got, want) < 1e-5


def test_matmul_many(be):
    """Several weights of one activation (q/k/v, router + shared gate/up), and routed experts' gate/up
    from one token's row."""
    rng = np.random.default_rng(6)
    (a, ad), (b, bd) = tensor(QT.F32, (5, 256), rng), tensor(QT.Q8_0, (7, 256), rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ya, yb = be.matmul_many(be.asarray(x), (be.weight(a), be.weight(b)))
    assert rel_err(be.to_host(ya), x @ ad.T) < 1e-5 and rel_err(be.to_host(yb), x @ bd.T) < 1e-5
    (g, gd), (u, ud) = tensor(QT.Q4_K, (4, 6, 256), rng), tensor(QT.Q4_K, (4, 6, 256), rng)
    experts = np.array([3, 0, 3])
    yg, yu = be.matmul_many(be.asarray(x[:1]), (be.weight(g), be.weight(u)), experts)
    for y, wd in ((yg, gd), (yu, ud)):
        assert rel_err(be.to_host(y), np.stack([wd[e] @ x[0] for e in experts])) < 1e-5
    experts = np.array([[1, 3], [3, 2]])          # a batch's decode step: row t*k + s is token t, slot s
    yg, = be.matmul_many(be.asarray(x), (be.weight(g),), experts)
    assert rel_err(be.to_host(yg), np.stack([gd[e] @ x[t] for t in range(2) for e in experts[t]])) < 1e-5


def test_route_topk(be):
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((5, 8)) * 2).astype(np.float32)
    logits[0, 5] = logits[0, 2]            # a tie: the lower id first, as the CPU and torch.topk
    idx, w = be.route(be.asarray(logits), 3)
    cidx, cw = cpu.route(logits, 3)
    assert np.array_equal(be.to_host(idx), cidx)
    assert rel_err(be.to_host(w), cw) < 1e-6


@pytest.mark.parametrize("m,c", [(1, 64), (3, 37)])
def test_norms(be, m, c):
    rng = np.random.default_rng(m * c)
    x = rng.standard_normal((m, c)).astype(np.float32) * 3
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    out, want = be.empty((m, c)), np.empty((m, c), np.float32)
    be.rmsnorm(be.asarray(x), be.asarray(w), 1e-6, out)
    cpu.rmsnorm(x, w, 1e-6, want)
    assert rel_err(be.to_host(out), want) < 1e-5
    be.layernorm(be.asarray(x), be.asarray(w), be.asarray(b), 1e-5, out)
    cpu.layernorm(x, w, b, 1e-5, want)
    assert rel_err(be.to_host(out), want) < 1e-5


def test_activations_softmax_and_adds(be):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3, 19)) * 4).astype(np.float32)
    y = rng.standard_normal((3, 19)).astype(np.float32)
    b = rng.standard_normal(19).astype(np.float32)
    want = np.empty_like(x)
    for op in ("gelu", "quick_gelu", "softmax"):
        out = be.empty(x.shape)
        getattr(be, op)(be.asarray(x), out)
        getattr(cpu, op)(x, want)
        assert rel_err(be.to_host(out), want) < 1e-5, op
    out = be.empty(x.shape)
    be.silu_mul(be.asarray(x), be.asarray(y), out)
    cpu.silu_mul(x, y, want)
    assert rel_err(be.to_host(out), want) < 1e-5
    d = be.asarray(x)
    be.add(d, be.asarray(y))
    be.add_bias(d, be.asarray(b))
    assert rel_err(be.to_host(d), x.astype(np.float64) + y + b) < 1e-6


def test_rope(be):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2 * 8)).astype(np.float32)
    pos = np.arange(7, 10)
    d = be.asarray(x)
    be.rope(d, 2, pos, 10000.0)
    cpu.rope(x, 2, pos, 10000.0)
    assert rel_err(be.to_host(d), x) < 1e-5


def test_row_plumbing_is_exact(be):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 5)).astype(np.float32)
    c = rng.standard_normal((4, 3)).astype(np.float32)
    da, db, dc = be.asarray(a), be.asarray(b), be.asarray(c)
    assert np.array_equal(be.to_host(be.take_rows(da, [3, 1, 3])), a[[3, 1, 3]])
    view = be.rows(da, 1, 3)                     # a view: a write through it lands in the array
    assert np.array_equal(be.to_host(view), a[1:3])
    be.add(view, be.asarray(np.ones((2, 5), np.float32)))
    assert np.array_equal(be.to_host(da)[1:3], a[1:3] + 1) and np.array_equal(be.to_host(da)[[0, 3]], a[[0, 3]])
    da = be.asarray(a)
    assert np.array_equal(be.to_host(be.concat_rows(da, db)), np.concatenate([a, b]))
    assert np.array_equal(be.to_host(be.concat_cols(da, dc)), np.concatenate([a, c], 1))
    cache = be.zeros((9, 5))
    be.cache_store(db, cache, 6)
    want = np.zeros((9, 5), np.float32)
    want[6:8] = b
    assert np.array_equal(be.to_host(cache), want)


def test_expert_accumulation(be):
    rng = np.random.default_rng(4)
    out = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.standard_normal((12, 6)).astype(np.float32)     # 4 tokens x 3 routed experts
    w = rng.random((4, 3)).astype(np.float32)
    d = be.asarray(out)
    be.weighted_sum_into(d, be.asarray(y), w)
    want = out.copy()
    cpu.weighted_sum_into(want, y, w)
    assert rel_err(be.to_host(d), want) < 1e-6
    assert rel_err(want, out + np.einsum("ts,tsj->tj", w, y.reshape(4, 3, 6))) < 1e-6


def test_attention_causal_over_device_cache(be):
    rng = np.random.default_rng(6)
    n_head, d, pos0, m = 2, 4, 5, 3
    k, v = (rng.standard_normal((2, pos0 + m, n_head * d)).astype(np.float32))
    q = rng.standard_normal((m, n_head * d)).astype(np.float32)
    kc, vc = be.kv_cache(1, 12, n_head * d, True)[0]
    be.cache_store(be.asarray(k), kc, 0)
    be.cache_store(be.asarray(v), vc, 0)
    out = be.empty(q.shape)
    be.attention_causal(be.asarray(q), kc, vc, pos0, n_head, out)
    ck, cv = cpu.kv_cache(1, 12, n_head * d, False)[0]
    cpu.cache_store(k, ck, 0)
    cpu.cache_store(v, cv, 0)
    want = np.empty_like(q)
    cpu.attention_causal(q, ck, cv, pos0, n_head, want)
    assert rel_err(be.to_host(out), want) < 1e-5


@pytest.mark.parametrize("relpos", [False, True])
def test_attention_bidirectional(be, relpos):
    # CLIP: 2 views of 6 tokens; SAM: a 3x3 window with decomposed relative positions
    rng = np.random.default_rng(7)
    n_head, d = 2, 4
    B, n = (1, 9) if relpos else (2, 6)
    qkv = rng.standard_normal((B, n, 3, n_head * d)).astype(np.float32)
    rel = None
    if relpos:
        rel = (rng.standard_normal((3, 3, d)).astype(np.float32), rng.standard_normal((3, 3, d)).astype(np.float32), 3, 3)
    want = cpu.attention(*(np.ascontiguousarray(qkv[:, :, i]) for i in range(3)), n_head, rel)
    dq = be.asarray(qkv)
    got = be.attention(dq[:, :, 0], dq[:, :, 1], dq[:, :, 2], n_head, rel, chunk_bytes=4 * 4 * n * n_head * B)
    assert rel_err(be.to_host(got), want) < 1e-5


def test_conv_and_windows(be):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 5, 3)).astype(np.float32)
    t, _ = tensor(QT.F16, (4, 3, 3, 3), rng, scale=0.3)
    bias = rng.standard_normal(4).astype(np.float32)
    got = be.conv2d(be.asarray(x), be.weight(t), 3, 2, 1, be.asarray(bias))
    assert rel_err(be.to_host(got), cpu.conv2d(x, t, 3, 2, 1, bias)) < 1e-5
    win, want = be.empty((4, 9, 3)), np.empty((4, 9, 3), np.float32)
    be.window_partition(be.asarray(x), 3, win)
    cpu.window_partition(x, 3, want)
    assert np.array_equal(be.to_host(win), want)
    back = be.empty((5, 5, 3))
    be.window_unpartition(win, 3, back)
    assert np.array_equal(be.to_host(back), x)


def test_tiny_language_model_decodes_the_golden_ids(be, converted):
    """Greedy decoding of the golden ids on the device. On a GPU: the whole prompt, then 16 steps.
    The simulator needs ~100 us per weight read, so there the CPU backend runs the first 118 prompt
    rows and their KV cache is uploaded; the device runs the last 2 prompt rows with golden ids
    0..13 as one 16-row prefill chunk (one GEMM row tile, grouped experts, causal attention at an
    offset): by causality, each row's argmax naming the next golden id is exactly greedy decoding
    of ids 0..14. The last id is then decoded as a single step (GEMV, expert GEMV on device-side
    routing). The chunk's prompt rows are also held to the golden logits."""
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.language import LanguageModel
    z = np.load(TINY / "golden" / "doc_portrait_nocrop_640.npz")
    golden = [int(i) for i in z["generated_ids"]]
    f = GGUFFile(converted("bf16", "f32")[0])      # the checkpoint's own bf16 values, exactly
    if SIMULATED:
        be = type(be)(threads_per_block=2)         # the op tests cover 8; this keeps the reductions
    lm = LanguageModel(f, be)
    x = z["inputs_embeds"]
    n = x.shape[0]
    split, forced = (n - 2, 14) if SIMULATED else (0, 0)
    host = LanguageModel(f, cpu)
    hcache = host.new_cache(n + len(golden), f16=False)
    if split:
        host.forward(np.ascontiguousarray(x[:split]), 0, hcache)
    cache = [(be.asarray(k), be.asarray(v)) for k, v in hcache]
    chunk = be.concat_rows(be.asarray(x[split:]), lm.embed(golden[:forced])) if forced else be.asarray(x)
    logits = be.to_host(lm.forward(chunk, split, cache, logits_rows="all"))
    rows = z["logits_rows"] >= split
    gl = z["logits"][rows]
    assert np.abs(logits[z["logits_rows"][rows] - split] - gl).max() / np.abs(gl).max() < 1e-4
    ids = [int(i) for i in np.argmax(logits[n - split - 1:], axis=1)]
    pos = n + forced
    while len(ids) < len(golden):
        ids.append(int(np.argmax(be.to_host(lm.forward(lm.embed([ids[-1]]), pos, cache))[-1])))
        pos += 1
    assert ids == golden


def test_vision_graph_runs_unchanged_on_the_device(be, converted):
    """SAM (a windowed and a global block, the neck convolutions), CLIP and the projector on the
    device against the CPU backend, same file and same graph code. For the simulator the tiny
    encoder is cut to its first two SAM blocks and one CLIP block, windows of 2 on a 64-px view
    (4x4 patches, padded windows included): every op of the real graph, a hundredth of the work."""
    import dataclasses
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.tap import Recorder
    from dsocr.runtime.vision import VisionModel
    f = GGUFFile(converted("bf16", "f32")[1])

    def encoder(backend):
        v = VisionModel(f, backend)
        if SIMULATED:
            v.sam_blocks, v.enc_blocks = v.sam_blocks[:2], v.enc_blocks[:1]
            v.p = dataclasses.replace(v.p, window=2, sam_layers=2, enc_layers=1)
        return v
    size = 64 if SIMULATED else 640
    pixels = np.random.default_rng(0).standard_normal((3, size, size)).astype(np.float32)
    want_stages, got_stages = Recorder("*.out"), Recorder("*.out")
    want = encoder(cpu).encode_view(pixels, tap=want_stages)
    device = type(be)(threads_per_block=2) if SIMULATED else be
    assert rel_err(encoder(device).encode_view(pixels, tap=got_stages), want) < 1e-5
    for stage in ("sam.out", "clip.out"):          # the tap brings the device's intermediates to the host
        assert rel_err(got_stages.values[stage][0], want_stages.values[stage][0]) < 1e-5, stage


def test_ocr2_encoder_runs_unchanged_on_the_device(be, converted2):
    """DeepSeek-OCR 2's Qwen2 encoder and projector on the device against the CPU backend (SAM is the
    test above's): RoPE, GQA attention_prefix, RMSNorm, SiLU MLP, the final norm of the query rows. Its
    input is random SAM rows: for the simulator 4 rows and 4 queries (both parts of the mask), one block;
    on a GPU a 768 tile's 144 rows through every block."""
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.tap import Recorder, callback
    from dsocr.runtime.vision import VisionModel, run_steps
    f = GGUFFile(converted2("f32", "f32")[1])
    n = 4 if SIMULATED else 144
    rows = np.random.default_rng(0).standard_normal((n, VisionModel(f, cpu).p.enc_width)).astype(np.float32)

    def encode(backend, tap):
        v = VisionModel(f, backend)
        if SIMULATED:
            v.enc_blocks = v.enc_blocks[:1]
        queries = backend.take_rows(v.queries[max(v.queries)], np.arange(n)) if SIMULATED else v.query_table(n)
        out = run_steps(v.qwen2(backend.asarray(rows), queries, callback(tap, backend)))
        return backend.to_host(backend.matmul(out, v.proj_w))
    want_stages, got_stages = Recorder("qwen2.*"), Recorder("qwen2.*")
    want = encode(cpu, want_stages)
    device = type(be)(threads_per_block=2) if SIMULATED else be
    assert rel_err(encode(device, got_stages), want) < 1e-5
    for stage in ("qwen2.l_out-0", "qwen2.out"):
        assert rel_err(got_stages.values[stage][0], want_stages.values[stage][0]) < 1e-5, stage


@pytest.mark.parametrize("code", [int(QT.Q8_1), int(QT.Q2_K), 99])
def test_unknown_type_codes_never_decode_as_another_type(be, code):
    """Device code cannot raise, so the backend refuses the tensor at upload; were one to reach a
    kernel anyway, its weights read as NaN (weight_at used to decode any unknown code as Q6_K)."""
    raw = np.full((2, 210), 0x11, np.uint8)
    with pytest.raises(ValueError, match=f"^unsupported ggml type code {code}$"):
        be.weight(Tensor("w", code, (2, 256), raw))
    out = be.empty((2, 256))
    be.mm.embed_rows[2, be.tpb](be.cuda.to_device(raw), code, be.cuda.to_device(np.array([1, 0])), out)
    assert np.isnan(be.to_host(out)).all()
