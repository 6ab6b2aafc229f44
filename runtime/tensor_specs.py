"""What a DeepSeek-OCR GGUF pair must hold: hyperparameters that make sense, and tensors of the
shapes they imply. One table per file, used when a file is loaded (runtime.language,
runtime.vision) and when the converter plans one (convert.deepseek_ocr). The kernels index by
these widths without checking them, so a tensor that does not match is refused before any
kernel sees it.

Shapes are in numpy order, (..., rows, row_length), as runtime.gguf_file.Tensor.shape. A
dimension is an int; or a str naming a width no key carries (llama.cpp writes none for SAM's MLP
and neck widths or CLIP's FFN width: its C++ reads them from the tensors), taken from the first
tensor in the table that has it and then required of every other; or None, any length (SAM's
relative-position tables, which the runtime resizes to each attention size as the reference does).

Types need no rule here: every kernel dispatches on the ggml type and tables are dequantized;
the file's reader refuses unsupported types and rows that the type's block does not divide.
"""
from __future__ import annotations

import math
import numbers

from dsocr.runtime.errors import ModelError

Dim = int | str | None
Shape = tuple[Dim, ...]

SAM_MLP, SAM_NECK, SAM_NET2, CLIP_FFN = "SAM MLP width", "SAM neck width", "SAM net_2 width", "CLIP FFN width"


def as_number(value, kind: type = int):
    """A key's (or config setting's) value as `kind` (int or float); ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            kind is int and not (math.isfinite(value) and value == int(value))):
        raise ValueError(f"{value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def read_key(f, key: str, default=None, kind: type = int):
    """Key `key` of GGUFFile `f` as int, float or (kind=tuple) a tuple of ints; required unless a
    default is given."""
    value = f.get(key, default) if default is not None else f.require(key)
    try:
        return tuple(as_number(v) for v in value) if kind is tuple else as_number(value, kind)
    except (TypeError, ValueError) as e:   # TypeError: a scalar where a list belongs
        raise ModelError(f"{f.path}: key {key}: {e}") from None


# ---------------------------------------------------------------- the language model

def lm_params_problem(p, n_tensors: int) -> str | None:
    """What makes LMParams `p` unusable, or None. `n_tensors` (the file's or checkpoint's) bounds
    the layer count before anything loops over it."""
    counts = {"layers": p.n_layer, "width": p.n_embd, "attention heads": p.n_head, "FFN width": p.n_ff,
              "experts": p.n_expert, "experts used per token": p.n_expert_used, "expert FFN width": p.n_ff_exp,
              "shared experts": p.n_shared, "vocabulary size": p.vocab_size, "training context": p.n_ctx_train}
    bad = next((k for k, v in counts.items() if v < 1), None)
    if bad:
        return f"{bad} is {counts[bad]}, not a positive number"
    if p.n_layer > n_tensors:
        return f"{p.n_layer} layers cannot fit in {n_tensors} tensors"
    if p.n_embd % p.n_head or (p.n_embd // p.n_head) % 2:
        return f"{p.n_head} attention heads do not split the width {p.n_embd} into even head sizes (RoPE halves)"
    if p.n_head_kv != p.n_head:
        return f"grouped-query attention ({p.n_head_kv} kv heads) is not DeepSeek-OCR"
    if not 0 <= p.n_dense <= p.n_layer:
        return f"{p.n_dense} leading dense layers for {p.n_layer} layers"
    if p.n_expert_used > p.n_expert:
        return f"{p.n_expert_used} experts used per token out of {p.n_expert}"
    for what, v in (("RMS norm epsilon", p.eps), ("RoPE base", p.rope_theta)):
        if not (math.isfinite(v) and v > 0):
            return f"{what} is {v}, not a positive number"
    if not math.isfinite(p.expert_scale):
        return f"expert weights scale is {p.expert_scale}"
    return None


def lm_shapes(p) -> dict[str, Shape]:
    """Every tensor runtime.language reads. Attention is multi-head with n_head * head_dim = H."""
    H, V = p.n_embd, p.vocab_size
    shapes: dict[str, Shape] = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for i in range(p.n_layer):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (H,), b + "attn_q.weight": (H, H), b + "attn_k.weight": (H, H),
                   b + "attn_v.weight": (H, H), b + "attn_output.weight": (H, H), b + "ffn_norm.weight": (H,)}
        if i < p.n_dense:
            F = p.n_ff
            shapes |= {b + "ffn_gate.weight": (F, H), b + "ffn_up.weight": (F, H), b + "ffn_down.weight": (H, F)}
        else:
            E, F, S = p.n_expert, p.n_ff_exp, p.n_shared * p.n_ff_exp   # shared experts: one MLP S wide
            shapes |= {b + "ffn_gate_inp.weight": (E, H), b + "ffn_gate_exps.weight": (E, F, H),
                       b + "ffn_up_exps.weight": (E, F, H), b + "ffn_down_exps.weight": (E, H, F),
                       b + "ffn_gate_shexp.weight": (S, H), b + "ffn_up_shexp.weight": (S, H),
                       b + "ffn_down_shexp.weight": (H, S)}
    return shapes


# ---------------------------------------------------------------- the vision tower and projector

def vision_params_problem(p, n_tensors: int) -> str | None:
    """What makes VisionParams `p` unusable, or None (`n_tensors` as for lm_params_problem)."""
    counts = {"SAM layers": p.sam_layers, "SAM width": p.sam_width, "SAM heads": p.sam_heads,
              "SAM window": p.window, "SAM patch size": p.sam_patch, "SAM image size": p.sam_image,
              "CLIP layers": p.clip_layers, "CLIP width": p.clip_width, "CLIP heads": p.clip_heads,
              "CLIP patch size": p.clip_patch, "CLIP image size": p.clip_image, "projection width": p.n_embd}
    bad = next((k for k, v in counts.items() if v < 1), None)
    if bad:
        return f"{bad} is {counts[bad]}, not a positive number"
    if p.sam_layers > n_tensors or p.clip_layers > n_tensors:
        return f"{p.sam_layers} SAM and {p.clip_layers} CLIP layers cannot fit in {n_tensors} tensors"
    for what, width, heads in (("SAM", p.sam_width, p.sam_heads), ("CLIP", p.clip_width, p.clip_heads)):
        if width % heads:
            return f"{heads} {what} heads do not divide the {what} width {width}"
    for what, image, patch in (("SAM", p.sam_image, p.sam_patch), ("CLIP", p.clip_image, p.clip_patch)):
        if image % patch:
            return f"{what} patch size {patch} does not divide its image size {image}"
    if p.window > p.sam_image // p.sam_patch:
        return f"SAM window {p.window} is larger than its {p.sam_image // p.sam_patch}-patch grid"
    for what, v in (("SAM LayerNorm epsilon", p.sam_eps), ("CLIP LayerNorm epsilon", p.clip_eps)):
        if not (math.isfinite(v) and v > 0):
            return f"{what} is {v}, not a positive number"
    return None


def vision_shapes(p) -> dict[str, Shape]:
    """Every tensor runtime.vision reads (the unused CLIP patch conv v.patch_embd is not one)."""
    C, Cc, H = p.sam_width, p.clip_width, p.n_embd
    n, k = p.sam_image // p.sam_patch, p.sam_patch
    head = C // p.sam_heads
    g = p.clip_image // p.clip_patch
    shapes: dict[str, Shape] = {"v.sam.patch_embd.weight": (C, 3, k, k), "v.sam.patch_embd.bias": (C,),
                                "v.sam.pos_embd.weight": (1, n, n, C)}
    for i in range(p.sam_layers):
        b = f"v.sam.blk.{i}."
        shapes |= {b + "pre_ln.weight": (C,), b + "pre_ln.bias": (C,), b + "post_ln.weight": (C,),
                   b + "post_ln.bias": (C,), b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                   b + "attn.out.weight": (C, C), b + "attn.out.bias": (C,),
                   b + "attn.pos_h.weight": (None, head), b + "attn.pos_w.weight": (None, head),
                   b + "mlp.lin1.weight": (SAM_MLP, C), b + "mlp.lin1.bias": (SAM_MLP,),
                   b + "mlp.lin2.weight": (C, SAM_MLP), b + "mlp.lin2.bias": (C,)}
    # neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d; net_2, net_3 (3x3): SAM's features are CLIP's patches
    shapes |= {"v.sam.neck.0.weight": (SAM_NECK, C, 1, 1), "v.sam.neck.1.weight": (SAM_NECK,),
               "v.sam.neck.1.bias": (SAM_NECK,), "v.sam.neck.2.weight": (SAM_NECK, SAM_NECK, 3, 3),
               "v.sam.neck.3.weight": (SAM_NECK,), "v.sam.neck.3.bias": (SAM_NECK,),
               "v.sam.net_2.weight": (SAM_NET2, SAM_NECK, 3, 3), "v.sam.net_3.weight": (Cc, SAM_NET2, 3, 3),
               "v.class_embd": (Cc,), "v.position_embd.weight": (1 + g * g, Cc),
               "v.pre_ln.weight": (Cc,), "v.pre_ln.bias": (Cc,)}
    for i in range(p.clip_layers):
        b = f"v.blk.{i}."
        shapes |= {b + "ln1.weight": (Cc,), b + "ln1.bias": (Cc,), b + "ln2.weight": (Cc,), b + "ln2.bias": (Cc,),
                   b + "attn_qkv.weight": (3 * Cc, Cc), b + "attn_qkv.bias": (3 * Cc,),
                   b + "attn_out.weight": (Cc, Cc), b + "attn_out.bias": (Cc,),
                   b + "ffn_up.weight": (CLIP_FFN, Cc), b + "ffn_up.bias": (CLIP_FFN,),
                   b + "ffn_down.weight": (Cc, CLIP_FFN), b + "ffn_down.bias": (Cc,)}
    # projector: Linear(concat(CLIP rows, SAM rows)); the image rows' newline and the views' separator
    shapes |= {"mm.model.fc.weight": (H, 2 * Cc), "mm.model.fc.bias": (H,), "v.image_newline": (H,),
               "v.view_seperator": (1, H)}
    return shapes


# ---------------------------------------------------------------- matching

def resolve_widths(table: dict[str, Shape], actual: dict[str, tuple[int, ...]]) -> dict[str, Shape]:
    """The table with each named width replaced by its length in the first tensor of `actual`
    (name -> shape) that has it."""
    widths: dict[str, int] = {}
    for name, want in table.items():
        got = actual.get(name)
        if got is not None and len(got) == len(want):
            for w, d in zip(want, got):
                if isinstance(w, str):
                    widths.setdefault(w, d)
    return {name: tuple(widths.get(w, w) if isinstance(w, str) else w for w in want) for name, want in table.items()}


def shape_problem(name: str, shape: tuple[int, ...], expected: Shape) -> str | None:
    """None when `shape` matches `expected` (resolved), else the one-line complaint."""
    if len(shape) == len(expected) and all(d >= 1 and w in (None, d) for d, w in zip(shape, expected)):
        return None
    return f"tensor {name} has shape {shape_text(shape)}, expected {shape_text(expected)}"


def shape_text(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
