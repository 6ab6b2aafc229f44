"""What a DeepSeek-OCR GGUF pair must hold: hyperparameters that make sense, and tensors of the
shapes they imply. One table per file, used when a file is loaded (runtime.language,
runtime.vision) and when the converter plans one (convert.deepseek_ocr). The kernels index by
these widths without checking them, so a tensor that does not match is refused before any
kernel sees it.

Shapes are in numpy order, (..., rows, row_length), as runtime.gguf_file.Tensor.shape. A
dimension is an int; or a str naming a width no key carries (llama.cpp writes none for SAM's MLP
and neck widths or the second encoder's FFN width: its C++ reads them from the tensors), taken from the first
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

SAM_MLP, SAM_NECK, SAM_NET2, ENC_FFN = "SAM MLP width", "SAM neck width", "SAM net_2 width", "encoder FFN width"


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
    """What makes vision params `p` (runtime.vision: SAM and its second encoder) unusable, or None
    (`n_tensors` as for lm_params_problem)."""
    clip = p.projector == "deepseekocr"
    enc = "CLIP" if clip else "Qwen2 encoder"
    counts = {"SAM layers": p.sam_layers, "SAM width": p.sam_width, "SAM heads": p.sam_heads,
              "SAM window": p.window, "SAM patch size": p.sam_patch, "SAM image size": p.sam_image,
              f"{enc} layers": p.enc_layers, f"{enc} width": p.enc_width, f"{enc} heads": p.enc_heads,
              "projection width": p.n_embd}
    if clip:
        counts |= {"CLIP patch size": p.clip_patch, "CLIP image size": p.clip_image}
    else:
        counts |= {"Qwen2 encoder kv heads": p.enc_heads_kv}
    bad = next((k for k, v in counts.items() if v < 1), None)
    if bad:
        return f"{bad} is {counts[bad]}, not a positive number"
    if p.sam_layers > n_tensors or p.enc_layers > n_tensors:
        return f"{p.sam_layers} SAM and {p.enc_layers} {enc} layers cannot fit in {n_tensors} tensors"
    for what, width, heads in (("SAM", p.sam_width, p.sam_heads), (enc, p.enc_width, p.enc_heads)):
        if width % heads:
            return f"{heads} {what} heads do not divide the {what} width {width}"
    if not clip:
        if p.enc_heads % p.enc_heads_kv:
            return f"{p.enc_heads_kv} Qwen2 encoder kv heads do not divide its {p.enc_heads} heads"
        if (p.enc_width // p.enc_heads) % 2:
            return f"the Qwen2 encoder's head size {p.enc_width // p.enc_heads} is odd (RoPE halves it)"
    sizes = (("SAM", p.sam_image, p.sam_patch),) + ((("CLIP", p.clip_image, p.clip_patch),) if clip else ())
    for what, image, patch in sizes:
        if image % patch:
            return f"{what} patch size {patch} does not divide its image size {image}"
    if p.window > p.sam_image // p.sam_patch:
        return f"SAM window {p.window} is larger than its {p.sam_image // p.sam_patch}-patch grid"
    floats = {"SAM LayerNorm epsilon": p.sam_eps, f"{enc} norm epsilon": p.enc_eps}
    if not clip:
        floats["Qwen2 encoder RoPE base"] = p.enc_rope_theta
    for what, v in floats.items():
        if not (math.isfinite(v) and v > 0):
            return f"{what} is {v}, not a positive number"
    return None


def vision_shapes(p) -> dict[str, Shape]:
    """Every tensor runtime.vision reads (the unused CLIP patch conv v.patch_embd is not one)."""
    C, Ce, H = p.sam_width, p.enc_width, p.n_embd
    n, k = p.sam_image // p.sam_patch, p.sam_patch
    head = C // p.sam_heads
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
    # neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d; net_2, net_3 (3x3): SAM's features are the
    # second encoder's input rows
    shapes |= {"v.sam.neck.0.weight": (SAM_NECK, C, 1, 1), "v.sam.neck.1.weight": (SAM_NECK,),
               "v.sam.neck.1.bias": (SAM_NECK,), "v.sam.neck.2.weight": (SAM_NECK, SAM_NECK, 3, 3),
               "v.sam.neck.3.weight": (SAM_NECK,), "v.sam.neck.3.bias": (SAM_NECK,),
               "v.sam.net_2.weight": (SAM_NET2, SAM_NECK, 3, 3), "v.sam.net_3.weight": (Ce, SAM_NET2, 3, 3),
               "v.view_seperator": (1, H)}
    if p.projector == "deepseekocr":
        g = p.clip_image // p.clip_patch
        shapes |= {"v.class_embd": (Ce,), "v.position_embd.weight": (1 + g * g, Ce),
                   "v.pre_ln.weight": (Ce,), "v.pre_ln.bias": (Ce,)}
        for i in range(p.enc_layers):
            b = f"v.blk.{i}."
            shapes |= {b + "ln1.weight": (Ce,), b + "ln1.bias": (Ce,), b + "ln2.weight": (Ce,), b + "ln2.bias": (Ce,),
                       b + "attn_qkv.weight": (3 * Ce, Ce), b + "attn_qkv.bias": (3 * Ce,),
                       b + "attn_out.weight": (Ce, Ce), b + "attn_out.bias": (Ce,),
                       b + "ffn_up.weight": (ENC_FFN, Ce), b + "ffn_up.bias": (ENC_FFN,),
                       b + "ffn_down.weight": (Ce, ENC_FFN), b + "ffn_down.bias": (Ce,)}
        # projector: Linear(concat(CLIP rows, SAM rows)); the image rows' newline
        return shapes | {"mm.model.fc.weight": (H, 2 * Ce), "mm.model.fc.bias": (H,), "v.image_newline": (H,)}
    kv = Ce // p.enc_heads * p.enc_heads_kv
    for i in range(p.enc_layers):
        b = f"v.blk.{i}."
        shapes |= {b + "ln1.weight": (Ce,), b + "attn_q.weight": (Ce, Ce), b + "attn_q.bias": (Ce,),
                   b + "attn_k.weight": (kv, Ce), b + "attn_k.bias": (kv,), b + "attn_v.weight": (kv, Ce),
                   b + "attn_v.bias": (kv,), b + "attn_out.weight": (Ce, Ce), b + "ln2.weight": (Ce,),
                   b + "ffn_gate.weight": (ENC_FFN, Ce), b + "ffn_up.weight": (ENC_FFN, Ce),
                   b + "ffn_down.weight": (Ce, ENC_FFN)}
    # learned queries per view size (their rows: the view's SAM rows), final norm; projector: Linear
    shapes |= {f"v.resample_query_{size}.weight": (rows, Ce) for size, rows in p.queries.items()}
    return shapes | {"v.post_ln.weight": (Ce,), "mm.model.fc.weight": (H, Ce), "mm.model.fc.bias": (H,)}


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
