"""DeepSeek-OCR's vision towers from an mmproj GGUF, top to bottom. Projector `deepseekocr` (v1):

    view [3, S, S] -> SAM ViT-B: 16-px patch conv + position table (resized for S != 1024)
                      -> blocks: LN, attention in 14x14 windows (zero padded) or global, with
                         decomposed relative positions; LN, MLP (exact GELU)
                      -> neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d; net_2, net_3 (3x3, /2)
                      = sam [g*g, C_sam]  (g = S/64)
                   -> CLIP-L on SAM's features as patches: class token + position table (its
                      16x16 grid resized for g != 16), pre-LN, blocks (fused qkv, quick GELU)
                      = clip [1 + g*g, C_clip]
                   -> projector: Linear(concat(clip[1:], sam))   [g*g, H]
    image rows: tiles tiled into one grid, rows + image_newline; then the global grid, rows +
    image_newline; then view_seperator.

Projector `deepseekocr2` (DeepSeek-OCR 2): the same SAM (net_3 projects to the encoder's width), then

                   -> Qwen2 decoder as an encoder over [sam; learned queries] [2n, C] (the query table
                      of n = g*g rows), positions 0..2n-1, NEOX RoPE: blocks (RMSNorm, q/k/v with bias,
                      GQA attention with image rows bidirectional and queries causal after them
                      (backend.attention_prefix), RMSNorm, SiLU MLP), final RMSNorm of the query rows
                      = [n, C]
                   -> projector: Linear   [n, H]
    image rows: each tile's rows in order, the global view's, view_seperator (no newlines).

Keys llama.cpp's mmproj does not carry (SAM's global-attention blocks, SAM image and patch
size, CLIP's LayerNorm epsilon, the Qwen2 encoder's RoPE base) are read from `dsocr.vision.*`
when present and default to the real model's values, as llama.cpp's C++ hard-codes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.preprocess import LAYOUTS, V2, Layout, PreparedImage
from dsocr.runtime.tap import Callback, Tap, callback
from dsocr.runtime.tensor_specs import read_key, resolve_widths, vision_params_problem, vision_shapes


# DeepSeek-OCR 2's projector type and the encoder's GQA key: llama.cpp's names (gguf-py's constants.py
# has them since after the PyPI gguf 0.19.0 this project installs, which lacks them)
PROJECTOR_OCR2 = getattr(gguf.VisionProjectorType, "DEEPSEEKOCR2", "deepseekocr2")
KEY_VISION_HEAD_COUNT_KV = getattr(gguf.Keys.ClipVision.Attention, "HEAD_COUNT_KV",
                                   "clip.vision.attention.head_count_kv")
KEY_ENCODER_ROPE_THETA = "dsocr.vision.encoder.rope_freq_base"
QWEN2_ROPE_THETA = 1e6          # DeepSeek-OCR 2's qwen2_d2e.py (llama.cpp's C++ hard-codes it)


@dataclass
class VisionParams:
    """SAM ViT-B, then the second encoder: CLIP-L (projector `deepseekocr`) or a Qwen2 decoder used as an
    encoder (`deepseekocr2`); enc_* are that encoder's. A field of the other model only is 0."""
    projector: str
    sam_layers: int
    sam_width: int
    sam_heads: int
    sam_global: tuple[int, ...]
    window: int
    sam_patch: int
    sam_image: int
    sam_eps: float
    enc_layers: int
    enc_width: int
    enc_heads: int
    enc_eps: float
    n_embd: int
    clip_image: int = 0      # v1: CLIP-L's own 224 / 14, its position table's grid
    clip_patch: int = 0
    enc_heads_kv: int = 0    # v2: grouped-query attention
    enc_rope_theta: float = 0.0
    queries: dict = field(default_factory=dict)    # v2: view side -> its learned query rows (= its SAM rows)

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.projector]

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> VisionParams:
        """The hparams, refused (ModelError) unless they make sense for the file's tensors."""
        projector = projector_type(f)
        k = lambda key, default=None, kind=int: read_key(f, key, default, kind)
        sam = dict(projector=projector, sam_layers=k("clip.vision.sam.block_count"),
                   sam_width=k("clip.vision.sam.embedding_length"), sam_heads=k("clip.vision.sam.head_count"),
                   sam_global=k("dsocr.vision.sam.global_attn_indexes", [2, 5, 8, 11], tuple),
                   window=k("clip.vision.window_size", 14), sam_patch=k("dsocr.vision.sam.patch_size", 16),
                   sam_image=k("dsocr.vision.sam.image_size", 1024), sam_eps=1e-6,
                   enc_layers=k("clip.vision.block_count"), enc_width=k("clip.vision.embedding_length"),
                   enc_heads=k("clip.vision.attention.head_count"),
                   # the LM width is the projector's rows, as llama.cpp reads it (vision_shapes checks the rest)
                   n_embd=f.tensor("mm.model.fc.weight", (None, None)).shape[0])
        if projector == PROJECTOR_OCR2:
            p = cls(**sam, enc_eps=k("clip.vision.attention.layer_norm_epsilon", 1e-6, float),
                    enc_heads_kv=k(KEY_VISION_HEAD_COUNT_KV), enc_rope_theta=k(KEY_ENCODER_ROPE_THETA,
                                                                                 QWEN2_ROPE_THETA, float),
                    queries=ocr2_queries(sam["sam_patch"]))
        else:
            p = cls(**sam, enc_eps=k("dsocr.vision.clip.layer_norm_epsilon", 1e-5, float),
                    clip_image=k("clip.vision.image_size", 224), clip_patch=k("clip.vision.patch_size", 14))
        problem = vision_params_problem(p, len(f.tensors))
        if problem:
            raise ModelError(f"{f.path}: {problem}")
        return p


def ocr2_queries(sam_patch: int) -> dict[int, int]:
    """DeepSeek-OCR 2's learned query tables, by view side: one query per SAM output row (16x down)."""
    return {size: (size // sam_patch // 4) ** 2 for size in (V2.tile, V2.fixed_sizes[0])}


def projector_type(f: GGUFFile) -> str:
    """`deepseekocr` or `deepseekocr2`; ModelError for any other file."""
    projector = f.get("clip.projector_type")
    if f.architecture != "clip" or projector not in LAYOUTS:
        raise ModelError(f"{f.path}: not a DeepSeek-OCR mmproj (architecture {f.architecture!r}, "
                         f"projector {projector!r})")
    return projector


def read_layout(mmproj: str | Path) -> Layout:
    """The view layout of an mmproj, from its header (its weights stay unread, memory-mapped)."""
    return LAYOUTS[projector_type(GGUFFile(mmproj))]


# ---------------------------------------------------------------- table resizing (host, cached)

def run_steps(steps):
    """Runs a generator of steps to its end and returns its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _aa_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's antialiased bicubic (F.interpolate(..., antialias=True), align_corners=False) as an
    [n_out, n_in] matrix: Keys cubic a=-0.5, support widened by the scale when downsampling."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0

    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1.0:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2.0:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.array([cubic((j - center + 0.5) * invscale) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return m


def resize_grid_bicubic_aa(grid: np.ndarray, n_out: int) -> np.ndarray:
    """[n, n, C] -> [n_out, n_out, C]: width first, then height, as PyTorch's separable kernel."""
    m = _aa_bicubic_weights(grid.shape[0], n_out)
    x = np.einsum("ow,hwc->hoc", m, grid.astype(np.float64)).astype(np.float32)
    return np.einsum("oh,hwc->owc", m, x.astype(np.float64)).astype(np.float32)


def resize_linear(table: np.ndarray, n_out: int) -> np.ndarray:
    """F.interpolate(mode="linear", align_corners=False) along the first axis: [n, d] -> [n_out, d]."""
    n = table.shape[0]
    scale = n / n_out
    out = np.empty((n_out, table.shape[1]), np.float32)
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + (1 if i0 < n - 1 else 0)
        l1 = src - i0
        out[i] = ((1.0 - l1) * table[i0].astype(np.float64) + l1 * table[i1].astype(np.float64)).astype(np.float32)
    return out


def relative_table(rel_pos: np.ndarray, size: int) -> np.ndarray:
    """get_rel_pos for q = k = `size`: R[i, j] = table[i - j + size - 1] (table resized to 2*size-1)."""
    if rel_pos.shape[0] != 2 * size - 1:
        rel_pos = resize_linear(rel_pos, 2 * size - 1)
    idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
    return np.ascontiguousarray(rel_pos[idx])


# ---------------------------------------------------------------- the model

class SamBlock:
    def __init__(self, t, be, i: int):
        # t(name): the tensor, its shape checked against the table (runtime.tensor_specs)
        p = f"v.sam.blk.{i}."
        self.ln1_w, self.ln1_b = be.table(t(p + "pre_ln.weight")), be.table(t(p + "pre_ln.bias"))
        self.ln2_w, self.ln2_b = be.table(t(p + "post_ln.weight")), be.table(t(p + "post_ln.bias"))
        self.qkv, self.qkv_b = be.weight(t(p + "attn.qkv.weight")), be.table(t(p + "attn.qkv.bias"))
        self.out, self.out_b = be.weight(t(p + "attn.out.weight")), be.table(t(p + "attn.out.bias"))
        self.fc1, self.fc1_b = be.weight(t(p + "mlp.lin1.weight")), be.table(t(p + "mlp.lin1.bias"))
        self.fc2, self.fc2_b = be.weight(t(p + "mlp.lin2.weight")), be.table(t(p + "mlp.lin2.bias"))
        self.rel_h = t(p + "attn.pos_h.weight").floats()
        self.rel_w = t(p + "attn.pos_w.weight").floats()


class ClipBlock:
    def __init__(self, t, be, i: int):
        p = f"v.blk.{i}."
        self.ln1_w, self.ln1_b = be.table(t(p + "ln1.weight")), be.table(t(p + "ln1.bias"))
        self.ln2_w, self.ln2_b = be.table(t(p + "ln2.weight")), be.table(t(p + "ln2.bias"))
        self.qkv, self.qkv_b = be.weight(t(p + "attn_qkv.weight")), be.table(t(p + "attn_qkv.bias"))
        self.out, self.out_b = be.weight(t(p + "attn_out.weight")), be.table(t(p + "attn_out.bias"))
        self.fc1, self.fc1_b = be.weight(t(p + "ffn_up.weight")), be.table(t(p + "ffn_up.bias"))
        self.fc2, self.fc2_b = be.weight(t(p + "ffn_down.weight")), be.table(t(p + "ffn_down.bias"))


class Qwen2Block:
    def __init__(self, t, be, i: int):
        p = f"v.blk.{i}."
        self.ln1, self.ln2 = be.table(t(p + "ln1.weight")), be.table(t(p + "ln2.weight"))
        self.q, self.q_b = be.weight(t(p + "attn_q.weight")), be.table(t(p + "attn_q.bias"))
        self.k, self.k_b = be.weight(t(p + "attn_k.weight")), be.table(t(p + "attn_k.bias"))
        self.v, self.v_b = be.weight(t(p + "attn_v.weight")), be.table(t(p + "attn_v.bias"))
        self.out = be.weight(t(p + "attn_out.weight"))
        self.gate, self.up = be.weight(t(p + "ffn_gate.weight")), be.weight(t(p + "ffn_up.weight"))
        self.down = be.weight(t(p + "ffn_down.weight"))


class VisionModel:
    def __init__(self, f: GGUFFile, backend):
        self.file, self.be = f, backend
        # per-model caches of the size-dependent tables (lru_cache on the methods would be one cache
        # for the class, keeping every model ever loaded alive)
        for name, size in (("sam_pos_table", 8), ("clip_pos_table", 8), ("device_table", 16), ("rel_tables", 64)):
            setattr(self, name, lru_cache(maxsize=size)(getattr(self, name)))
        self.p = p = VisionParams.from_gguf(f)
        be = backend
        shapes = resolve_widths(vision_shapes(p), {name: x.shape for name, x in f.tensors.items()})
        t = lambda name: f.tensor(name, shapes[name])
        self.patch_w, self.patch_b = be.weight(t("v.sam.patch_embd.weight")), be.table(t("v.sam.patch_embd.bias"))
        self.sam_pos = t("v.sam.pos_embd.weight").floats()[0]                   # [n, n, C]
        self.sam_blocks = [SamBlock(t, be, i) for i in range(p.sam_layers)]
        self.neck0, self.neck2 = be.weight(t("v.sam.neck.0.weight")), be.weight(t("v.sam.neck.2.weight"))
        self.neck1 = (be.table(t("v.sam.neck.1.weight")), be.table(t("v.sam.neck.1.bias")))
        self.neck3 = (be.table(t("v.sam.neck.3.weight")), be.table(t("v.sam.neck.3.bias")))
        self.net2, self.net3 = be.weight(t("v.sam.net_2.weight")), be.weight(t("v.sam.net_3.weight"))
        self.proj_w, self.proj_b = be.weight(t("mm.model.fc.weight")), be.table(t("mm.model.fc.bias"))
        self.separator = t("v.view_seperator").floats().reshape(-1)
        self.patch_k = int(t("v.sam.patch_embd.weight").shape[-1])
        if p.projector == PROJECTOR_OCR2:
            self.enc_blocks = [Qwen2Block(t, be, i) for i in range(p.enc_layers)]
            self.queries = {p.queries[size]: be.table(t(f"v.resample_query_{size}.weight")) for size in p.queries}
            self.post_ln = be.table(t("v.post_ln.weight"))
        else:
            self.class_embd = t("v.class_embd").floats()
            self.clip_pos = t("v.position_embd.weight").floats()
            self.pre_ln = (be.table(t("v.pre_ln.weight")), be.table(t("v.pre_ln.bias")))
            self.enc_blocks = [ClipBlock(t, be, i) for i in range(p.enc_layers)]
            self.newline = t("v.image_newline").floats().reshape(-1)

    # ---- tables for a grid size (computed once per size, cached per model: see __init__)
    def sam_pos_table(self, g: int) -> np.ndarray:
        return self.sam_pos if self.sam_pos.shape[0] == g else resize_grid_bicubic_aa(self.sam_pos, g)

    def clip_pos_table(self, g: int) -> np.ndarray:
        src = int(math.isqrt(self.clip_pos.shape[0] - 1))
        if src == g:
            return self.clip_pos
        grid = resize_grid_bicubic_aa(self.clip_pos[1:].reshape(src, src, -1), g).reshape(g * g, -1)
        return np.concatenate([self.clip_pos[:1], grid])

    def device_table(self, which: str, g: int):
        """Position tables for grid g (and the class row) on the backend, made once per size."""
        if which == "sam_pos":
            return self.be.asarray(self.sam_pos_table(g).reshape(g * g, self.p.sam_width))
        if which == "clip_pos":
            return self.be.asarray(self.clip_pos_table(g))
        return self.be.asarray(self.class_embd[None, :])

    def rel_tables(self, block: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.sam_blocks[block]
        return relative_table(b.rel_h, size), relative_table(b.rel_w, size)

    # ---- SAM
    def sam(self, pixels: np.ndarray, cb: Callback):
        """[3, S, S] -> [(S/64)^2, C_out] features, rows in (y, x) order. A generator (as clip): it
        yields after each block, so a scheduler can run other work between blocks, and returns the
        features."""
        be, p = self.be, self.p
        S = pixels.shape[-1]
        k = self.patch_k
        g = S // k
        x = be.conv2d(be.asarray(pixels.transpose(1, 2, 0)), self.patch_w, k, k, 0, self.patch_b)   # [g, g, C]
        x = x.reshape(g * g, p.sam_width)
        be.add(x, self.device_table("sam_pos", g))
        cb(x, "sam.inp_embd")
        h = be.empty(x.shape)
        for i, blk in enumerate(self.sam_blocks):
            be.layernorm(x, blk.ln1_w, blk.ln1_b, p.sam_eps, h)
            if i in p.sam_global:
                a = self.sam_attention(h.reshape(1, g * g, p.sam_width), blk, i, g).reshape(g * g, p.sam_width)
            else:
                ws = p.window
                nwin = ((g + ws - 1) // ws) ** 2
                win = be.empty((nwin, ws * ws, p.sam_width))
                be.window_partition(h.reshape(g, g, p.sam_width), ws, win)
                win = self.sam_attention(win, blk, i, ws)
                a = be.empty((g, g, p.sam_width))
                be.window_unpartition(win, ws, a)
                a = a.reshape(g * g, p.sam_width)
            be.add(x, a)
            be.layernorm(x, blk.ln2_w, blk.ln2_b, p.sam_eps, h)
            m = be.matmul(h, blk.fc1)
            be.add_bias(m, blk.fc1_b)
            be.gelu(m, m)
            m2 = be.matmul(m, blk.fc2)
            be.add_bias(m2, blk.fc2_b)
            be.add(x, m2)
            cb(x, "sam.l_out", i)
            yield
        # neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no biases, no activation), then /2, /2
        y = be.matmul(x, self.neck0)                                          # [g*g, C_neck]
        be.layernorm(y, self.neck1[0], self.neck1[1], p.sam_eps, y)
        y = be.conv2d(y.reshape(g, g, -1), self.neck2, 3, 1, 1)
        yy = y.reshape(g * g, -1)
        be.layernorm(yy, self.neck3[0], self.neck3[1], p.sam_eps, yy)
        cb(yy, "sam.neck")
        y = be.conv2d(y, self.net2, 3, 2, 1)
        y = be.conv2d(y, self.net3, 3, 2, 1)
        out = y.reshape(y.shape[0] * y.shape[1], y.shape[2])
        cb(out, "sam.out")
        return out

    def sam_attention(self, x: np.ndarray, blk: SamBlock, i: int, size: int) -> np.ndarray:
        # x [B, size*size, C] (windows, or the whole grid) -> [B, size*size, C]
        be, p = self.be, self.p
        B, n, c = x.shape
        qkv = be.matmul(x.reshape(B * n, c), blk.qkv)
        be.add_bias(qkv, blk.qkv_b)
        qkv = qkv.reshape(B, n, 3, c)
        Rh, Rw = self.rel_tables(i, size)
        o = be.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], p.sam_heads, relpos=(Rh, Rw, size, size))
        out = be.matmul(o.reshape(B * n, c), blk.out)
        be.add_bias(out, blk.out_b)
        return out.reshape(B, n, c)

    # ---- CLIP
    def clip(self, feats: np.ndarray, cb: Callback):
        """[g*g, C_clip] SAM features as patches -> [1 + g*g, C_clip]; yields after each block."""
        be, p = self.be, self.p
        g = int(math.isqrt(feats.shape[0]))
        x = be.concat_rows(self.device_table("class", 0), feats)
        be.add(x, self.device_table("clip_pos", g))
        be.layernorm(x, self.pre_ln[0], self.pre_ln[1], p.enc_eps, x)
        cb(x, "clip.inp_embd")
        h = be.empty(x.shape)
        n, c = x.shape
        for i, blk in enumerate(self.enc_blocks):
            be.layernorm(x, blk.ln1_w, blk.ln1_b, p.enc_eps, h)
            qkv = be.matmul(h, blk.qkv)
            be.add_bias(qkv, blk.qkv_b)
            qkv = qkv.reshape(1, n, 3, c)
            o = be.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], p.enc_heads)
            a = be.matmul(o.reshape(n, c), blk.out)
            be.add_bias(a, blk.out_b)
            be.add(x, a)
            be.layernorm(x, blk.ln2_w, blk.ln2_b, p.enc_eps, h)
            m = be.matmul(h, blk.fc1)
            be.add_bias(m, blk.fc1_b)
            be.quick_gelu(m, m)
            m2 = be.matmul(m, blk.fc2)
            be.add_bias(m2, blk.fc2_b)
            be.add(x, m2)
            cb(x, "clip.l_out", i)
            yield
        cb(x, "clip.out")
        return x

    # ---- Qwen2 encoder (DeepSeek-OCR 2)
    def query_table(self, n: int):
        """The learned queries for a view of n SAM rows (the reference picks the table by that count)."""
        if n not in self.queries:
            raise ModelError(f"the Qwen2 encoder has learned queries for {sorted(self.queries)} SAM rows, not {n}")
        return self.queries[n]

    def qwen2(self, feats, queries, cb: Callback):
        """[n, C] SAM features, [n, C] learned queries -> [n, C] the queries' outputs; yields after each
        block. The sequence is [image rows; queries] at positions 0..2n-1: image rows attend to the image
        rows only, each query to every image row and to the queries up to itself."""
        be, p = self.be, self.p
        n = feats.shape[0]
        x = be.concat_rows(feats, queries)                                   # [2n, C]
        positions = np.arange(2 * n)
        cb(x, "qwen2.inp_embd")
        h = be.empty(x.shape)
        for i, blk in enumerate(self.enc_blocks):
            be.rmsnorm(x, blk.ln1, p.enc_eps, h)
            q, k, v = be.matmul(h, blk.q), be.matmul(h, blk.k), be.matmul(h, blk.v)
            be.add_bias(q, blk.q_b)
            be.add_bias(k, blk.k_b)
            be.add_bias(v, blk.v_b)
            be.rope(q, p.enc_heads, positions, p.enc_rope_theta)
            be.rope(k, p.enc_heads_kv, positions, p.enc_rope_theta)
            o = be.attention_prefix(q, k, v, p.enc_heads, p.enc_heads_kv, n)
            be.add(x, be.matmul(o, blk.out))
            be.rmsnorm(x, blk.ln2, p.enc_eps, h)
            g = be.matmul(h, blk.gate)
            be.silu_mul(g, be.matmul(h, blk.up), g)
            be.add(x, be.matmul(g, blk.down))
            cb(x, "qwen2.l_out", i)
            yield
        out = be.rows(x, n, 2 * n)
        y = be.empty(out.shape)
        be.rmsnorm(out, self.post_ln, p.enc_eps, y)
        cb(y, "qwen2.out")
        return y

    def encode_view(self, pixels: np.ndarray, tap: Tap | None = None) -> np.ndarray:
        """One view -> projected features [n, H] (its rows in order). `tap` is handed the named
        intermediates (runtime.tap lists them)."""
        return run_steps(self.encode_view_steps(pixels, tap))

    def encode_view_steps(self, pixels: np.ndarray, tap: Tap | None = None):
        """encode_view as a generator that yields after each SAM and encoder block."""
        be = self.be
        cb = callback(tap, be)
        sam = yield from self.sam(pixels, cb)
        if self.p.projector == PROJECTOR_OCR2:
            feats = yield from self.qwen2(sam, self.query_table(sam.shape[0]), cb)
        else:
            clip = yield from self.clip(sam, cb)
            feats = be.concat_cols(be.take_rows(clip, np.arange(1, clip.shape[0])), sam)
        out = be.matmul(feats, self.proj_w)
        be.add_bias(out, self.proj_b)
        cb(out, "projector.out")
        return be.to_host(out)

    def warm_up(self) -> None:
        """Encodes the smallest view (one SAM feature row: a 64-px square), compiling every kernel a real
        view runs. DeepSeek-OCR 2's encoder takes only its query tables' sizes, so there its first query
        stands in for the table."""
        be = self.be
        view = np.zeros((3, 64, 64), np.float32)
        sam = run_steps(self.sam(view, callback(None, be)))
        if self.p.projector == PROJECTOR_OCR2:
            first_query = be.take_rows(next(iter(self.queries.values())), np.arange(1))
            run_steps(self.qwen2(sam, first_query, callback(None, be)))
        else:
            run_steps(self.encode_view_steps(view))

    def image_embeddings(self, img: PreparedImage, tap: Tap | None = None, progress=None) -> np.ndarray:
        """The rows an image's <image> tokens take (the layout's order: the tiles', the global view's, the
        separator). `tap` sees each view's intermediates, the tiles' first."""
        return run_steps(self.image_embedding_steps(img, tap, progress))

    def image_embedding_steps(self, img: PreparedImage, tap: Tap | None = None, progress=None):
        """image_embeddings as a generator that yields after each vision block. v1 merges the tiles into one
        grid and ends each grid row with image_newline; v2 keeps each view's rows in order, no newline."""
        newlines = self.p.layout.newlines
        rows = []
        if img.tiles:
            feats = []
            for i, t in enumerate(img.tiles):
                feats.append((yield from self.encode_view_steps(t, tap)))
                if progress:
                    progress(i + 1, len(img.tiles) + 1)
            if newlines:
                q = int(math.isqrt(feats[0].shape[0]))
                w, h = img.grid
                grid = np.stack(feats).reshape(h, w, q, q, -1).transpose(0, 2, 1, 3, 4).reshape(h * q, w * q, -1)
                rows.append(self._with_newlines(grid))
            else:
                rows += feats
        glob = yield from self.encode_view_steps(img.global_view, tap)
        if progress:
            progress(len(img.tiles) + 1, len(img.tiles) + 1)
        q = int(math.isqrt(glob.shape[0]))
        rows.append(self._with_newlines(glob.reshape(q, q, -1)) if newlines else glob)
        rows.append(self.separator[None, :])
        out = np.concatenate(rows).astype(np.float32)
        if out.shape[0] != img.n_tokens:
            raise ModelError(f"image layout gives {out.shape[0]} rows for {img.n_tokens} image tokens")
        return out

    def _with_newlines(self, grid: np.ndarray) -> np.ndarray:
        h, w, c = grid.shape
        nl = np.broadcast_to(self.newline, (h, 1, c))
        return np.concatenate([grid, nl], axis=1).reshape(h * (w + 1), c)
