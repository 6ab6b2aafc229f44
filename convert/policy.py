"""Which ggml type each tensor gets, as llama.cpp chooses it.

* Which tensors stay float32: convert_hf_to_gguf.py's rules (1-D tensors, norms, the MoE
  router, names not ending in ".weight"; for the mmproj also DeepseekOCRVisionModel's
  position tables, relative-position tables, neck and net_* convs, and the patch
  embeddings and DeepSeek-OCR 2's learned query tables at F16 only in an F16 file).
* Single output types (f16, q8_0, q4_k, ...) put every other tensor in that type, as
  convert_hf_to_gguf.py --outtype and llama-quantize --pure do.
* The q4_k_m / q5_k_m mixes follow llama-quantize's llama_tensor_get_type for this
  architecture, including its bumps for 8-expert models (which the tiny test model is).
* A row length the type's block does not divide falls back as tensor_type_fallback does.

Rules are written on GGUF names so re-quantizing an existing file uses them too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType as FT


@dataclass(frozen=True)
class OutType:
    name: str
    ftype: FT
    base: QT
    mix: bool = False


LM_OUTTYPES = {o.name: o for o in [
    OutType("f32", FT.ALL_F32, QT.F32), OutType("f16", FT.MOSTLY_F16, QT.F16),
    OutType("bf16", FT.MOSTLY_BF16, QT.BF16), OutType("q8_0", FT.MOSTLY_Q8_0, QT.Q8_0),
    OutType("q4_0", FT.MOSTLY_Q4_0, QT.Q4_0), OutType("q4_1", FT.MOSTLY_Q4_1, QT.Q4_1),
    OutType("q5_0", FT.MOSTLY_Q5_0, QT.Q5_0), OutType("q5_1", FT.MOSTLY_Q5_1, QT.Q5_1),
    OutType("q4_k", FT.MOSTLY_Q4_K_S, QT.Q4_K), OutType("q5_k", FT.MOSTLY_Q5_K_S, QT.Q5_K),
    OutType("q6_k", FT.MOSTLY_Q6_K, QT.Q6_K),
    OutType("q4_k_m", FT.MOSTLY_Q4_K_M, QT.Q4_K, mix=True),
    OutType("q5_k_m", FT.MOSTLY_Q5_K_M, QT.Q5_K, mix=True),
]}
MMPROJ_OUTTYPES = {n: LM_OUTTYPES[n] for n in ("f32", "f16", "q8_0")}

# tensor_type_fallback: a type whose block does not divide the row length falls back to these
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}

_MMPROJ_F32 = re.compile(r"^v\.(class_embd|patch_embd|position_embd|sam\.pos_embd|sam\.neck\.|sam\.net_)"
                         r"|\.attn\.pos_[hw]\.")
# F16 where llama.cpp's F16 file has them, never quantized: SAM's patch conv, and the query tables,
# which are the encoder's input rows (llama.cpp casts them to the activations' type)
_MMPROJ_F16_ONLY = re.compile(r"^v\.(sam\.patch_embd|resample_query_\d+)\.weight$")


def fits(qtype: QT, row_length: int) -> bool:
    return row_length % GGML_QUANT_SIZES[qtype][0] == 0


def fallback(qtype: QT, row_length: int) -> QT:
    """llama.cpp's tensor_type_fallback."""
    if fits(qtype, row_length):
        return qtype
    alt = _FALLBACK.get(qtype, qtype)
    return alt if fits(alt, row_length) else QT.F16


def _stays_f32(name: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
            or not name.endswith(".weight"))


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _mix_type(name: str, row_length: int, out: OutType, n_layer: int, n_expert: int) -> QT:
    """llama_tensor_get_type_impl for Q4_K_M / Q5_K_M (attn_v's running index is its layer here)."""
    t = out.base
    if name == "output.weight":
        t = QT.Q8_0 if not fits(t, row_length) else (QT.Q6_K if t != QT.Q8_0 else t)
    elif ".attn_v." in name:
        if _use_more_bits(_layer(name), n_layer):
            t = QT.Q6_K
        if n_expert == 8:
            t = QT.Q8_0
    elif ".attn_k." in name:
        if n_expert == 8:
            t = QT.Q8_0
    elif ".ffn_down" in name:
        if _use_more_bits(_layer(name), n_layer):
            t = QT.Q6_K
    elif ".attn_output." in name:
        if n_expert == 8 and out.ftype == FT.MOSTLY_Q4_K_M:
            t = QT.Q5_K
    return t


def lm_tensor_type(name: str, shape: tuple[int, ...], out: OutType, n_layer: int, n_expert: int
                   ) -> tuple[QT, QT | None]:
    """(type, requested) for a language-model tensor; `requested` is set when it fell back."""
    if _stays_f32(name, shape):
        return QT.F32, None
    want = _mix_type(name, shape[-1], out, n_layer, n_expert) if out.mix else out.base
    got = fallback(want, shape[-1])
    return got, (want if got != want else None)


def mmproj_tensor_type(name: str, shape: tuple[int, ...], out: OutType) -> tuple[QT, QT | None]:
    if _stays_f32(name, shape) or _MMPROJ_F32.search(name):
        return QT.F32, None
    if _MMPROJ_F16_ONLY.match(name):
        return (QT.F16 if out.base == QT.F16 else QT.F32), None
    got = fallback(out.base, shape[-1])
    return got, (out.base if got != out.base else None)
