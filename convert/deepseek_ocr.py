"""DeepSeek-OCR's two GGUF files as llama.cpp's convert_hf_to_gguf.py lays them out.

The language model goes to `general.architecture = deepseek2-ocr`, the vision tower and
projector to an mmproj (`clip`, projector `deepseekocr`). Names come from gguf's own
TensorNameMap, keys from gguf.constants, tensor order is llama.cpp's (each shard's names
sorted, routed experts merged into 3-D tensors where their last piece is reached).

llama.cpp writes no key for some vision settings its C++ hard-codes; those go under
`dsocr.vision.*` so a runtime need not guess, and a file without them still loads with the
real model's values (see dsocr.runtime).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as QT, Keys

from dsocr.convert.checkpoint import Checkpoint, ConvertError, TensorEntry
from dsocr.convert.gguf_out import OutTensor
from dsocr.convert.policy import OutType, lm_tensor_type, mmproj_tensor_type

# Vision settings the reference code hard-codes (the tiny config writes some of them)
REAL_SAM = dict(width=768, layers=12, heads=12, global_attn_indexes=[2, 5, 8, 11], out_chans=256,
                downsample_channels=[512, 1024], window_size=14, mlp_ratio=4, patch_size=16, image_size=1024)
REAL_CLIP = dict(width=1024, layers=24, heads=16, ffn_hidden_size=4096, image_size=224, patch_size=14)
BASE_SIZE, TILE_SIZE = 1024, 640
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{m['content']}}{% endfor %}"

KEY_SAM_GLOBAL_ATTN = "dsocr.vision.sam.global_attn_indexes"
KEY_SAM_IMAGE_SIZE = "dsocr.vision.sam.image_size"
KEY_SAM_PATCH_SIZE = "dsocr.vision.sam.patch_size"
KEY_CLIP_LN_EPS = "dsocr.vision.clip.layer_norm_epsilon"
KEY_BASE_SIZE = "dsocr.vision.base_size"
KEY_TILE_SIZE = "dsocr.vision.tile_size"

_LM_PREFIXES = ("lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.")


LM_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2OCR]
MMPROJ_ARCH = "clip"


def lm_hparams(config: dict) -> dict:
    """The language settings (the top level repeats language_config; the model reads the top level)."""
    c = {**config.get("language_config", {}), **{k: v for k, v in config.items() if not isinstance(v, dict)}}
    need = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
            "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts"]
    missing = [k for k in need if k not in c]
    if missing:
        raise ConvertError(f"config.json lacks language settings: {', '.join(missing)}")
    return c


def vision_hparams(config: dict) -> tuple[dict, dict]:
    widths = config.get("vision_config", {}).get("width", {})
    sam = {**REAL_SAM, **widths.get("sam_vit_b", {})}
    clip = {**REAL_CLIP, **widths.get("clip-l-14-224", {})}
    return sam, clip


def _lm_gguf_name(tmap, hf_name: str) -> str | None:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def plan_lm(ckpt: Checkpoint, out: OutType) -> list[OutTensor]:
    """The language-model tensors; routed experts become one [n_expert, out, in] tensor each."""
    hp = lm_hparams(ckpt.config)
    n_layer, n_expert = hp["num_hidden_layers"], hp["n_routed_experts"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2OCR, n_layer)
    plan: list[OutTensor] = []
    pending: dict[tuple[int, str], dict[int, TensorEntry]] = {}
    unknown = []

    def add(name, shape, sources):
        qtype, requested = lm_tensor_type(name, shape, out, n_layer, n_expert)
        plan.append(OutTensor(name, shape, qtype, sources, requested))

    for hf in ckpt.ordered_names():
        if not hf.startswith(_LM_PREFIXES):
            continue
        entry = ckpt.tensors[hf]
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", hf)
        if m:
            bid, xid, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            group = pending.setdefault((bid, proj), {})
            group[xid] = entry
            if sum(len(g) for (b, _), g in pending.items() if b == bid) == 3 * n_expert:
                for p in ("down_proj", "gate_proj", "up_proj"):   # llama.cpp's merge order
                    experts = pending.pop((bid, p), {})
                    if sorted(experts) != list(range(n_expert)):
                        raise ConvertError(f"layer {bid}: routed experts of {p} are incomplete")
                    name = _lm_gguf_name(tmap, f"model.layers.{bid}.mlp.experts.{p}.weight")
                    add(name, (n_expert, *experts[0].shape), [experts[x] for x in range(n_expert)])
            continue
        name = _lm_gguf_name(tmap, hf)
        if name is None:
            unknown.append(hf)
            continue
        add(name, entry.shape, [entry])
    if unknown:
        raise ConvertError(f"unknown language-model tensor(s): {', '.join(unknown[:8])}"
                           + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    if pending:
        left = sorted({b for b, _ in pending})
        raise ConvertError(f"routed experts incomplete in layer(s) {left}")
    _check_complete(plan, _expected_lm_names(hp), "language-model")
    return plan


def plan_mmproj(ckpt: Checkpoint, out: OutType) -> list[OutTensor]:
    sam, clip = vision_hparams(ckpt.config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(sam["layers"], clip["layers"]))
    plan: list[OutTensor] = []
    unknown = []
    for hf in ckpt.ordered_names():
        if hf.startswith(_LM_PREFIXES):
            continue
        entry = ckpt.tensors[hf]
        key = hf + ".weight" if hf.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")) else hf
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf)
            continue
        shape = (1, entry.shape[0]) if name == "v.view_seperator" else entry.shape  # llama.cpp's [n_embd, 1]
        qtype, requested = mmproj_tensor_type(name, shape, out)
        plan.append(OutTensor(name, shape, qtype, [entry], requested))
    if unknown:
        raise ConvertError(f"unknown vision tensor(s): {', '.join(unknown[:8])}"
                           + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    _check_complete(plan, _expected_mmproj_names(sam, clip), "vision")
    return plan


def _expected_lm_names(hp: dict) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for b in range(hp["num_hidden_layers"]):
        names |= {f"blk.{b}.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")}
        if b < hp.get("first_k_dense_replace", 1):
            names |= {f"blk.{b}.{t}.weight" for t in ("ffn_gate", "ffn_up", "ffn_down")}
        else:
            names |= {f"blk.{b}.{t}.weight" for t in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                                                       "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")}
    return names


def _expected_mmproj_names(sam: dict, clip: dict) -> set[str]:
    names = {"v.sam.pos_embd.weight", "v.sam.patch_embd.weight", "v.sam.patch_embd.bias", "v.sam.neck.0.weight",
             "v.sam.neck.1.weight", "v.sam.neck.1.bias", "v.sam.neck.2.weight", "v.sam.neck.3.weight",
             "v.sam.neck.3.bias", "v.sam.net_2.weight", "v.sam.net_3.weight", "v.class_embd",
             "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias", "mm.model.fc.weight",
             "mm.model.fc.bias", "v.image_newline", "v.view_seperator"}
    for b in range(sam["layers"]):
        names |= {f"v.sam.blk.{b}.{t}" for t in ("attn.pos_h.weight", "attn.pos_w.weight")}
        names |= {f"v.sam.blk.{b}.{t}.{s}" for t in ("pre_ln", "post_ln", "attn.qkv", "attn.out", "mlp.lin1",
                                                    "mlp.lin2") for s in ("weight", "bias")}
    for b in range(clip["layers"]):
        names |= {f"v.blk.{b}.{t}.{s}" for t in ("ln1", "ln2", "attn_qkv", "attn_out", "ffn_up", "ffn_down")
                  for s in ("weight", "bias")}
    return names


def _check_complete(plan: list[OutTensor], expected: set[str], what: str) -> None:
    missing = sorted(expected - {t.name for t in plan})
    if missing:
        raise ConvertError(f"checkpoint lacks {what} tensor(s): {', '.join(missing[:8])}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _metadata(ckpt: Checkpoint, writer: gguf.GGUFWriter, name: str | None, type_name: str) -> None:
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.folder, name, total)
    if meta.name is None:
        meta.name = ckpt.folder.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(type_name)
    meta.set_gguf_meta_model(writer)


def write_lm_keys(ckpt: Checkpoint, writer: gguf.GGUFWriter, out: OutType, name: str | None) -> None:
    hp = lm_hparams(ckpt.config)
    writer.add_chat_template(PLAIN_CHAT_TEMPLATE)
    _metadata(ckpt, writer, name, gguf.GGUFType.MODEL)
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp.get("max_position_embeddings", 8192))
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    writer.add_expert_count(hp["n_routed_experts"])
    writer.add_expert_used_count(hp["num_experts_per_tok"])
    writer.add_expert_group_count(hp.get("n_group", 1))
    writer.add_expert_group_used_count(hp.get("topk_group", 1))
    writer.add_file_type(out.ftype)
    writer.add_leading_dense_block_count(hp.get("first_k_dense_replace", 1))
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    writer.add_expert_shared_count(hp["n_shared_experts"])
    if hp.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(hp["routed_scaling_factor"])
    if hp.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(hp.get("qk_rope_head_dim", 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(ckpt, writer, hp["vocab_size"])


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def write_tokenizer(ckpt: Checkpoint, writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """gpt2-style BPE as llama.cpp's _set_vocab_gpt2 writes it, plus the original tokenizer.json."""
    from tokenizers import Tokenizer

    path = ckpt.folder / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConvertError(f"{path}: cannot load the tokenizer ({e})") from None
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a for a in json.loads(text).get("added_tokens", [])}
    tokens, types = [], []
    for i in range(max(vocab_size, len(reverse))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].get("normalized", True):
                token = tok.decode([i], skip_special_tokens=False) or token
            if added[i].get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-v3")   # llama.cpp's name for DeepSeek-OCR's (= DeepSeek-V3's) splitter
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(ckpt.folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    writer.add_string(Keys.Tokenizer.HF_JSON, text)


def write_mmproj_keys(ckpt: Checkpoint, writer: gguf.GGUFWriter, out: OutType, name: str | None) -> None:
    sam, clip = vision_hparams(ckpt.config)
    hp = lm_hparams(ckpt.config)
    proc = ckpt.optional_json("processor_config.json")
    _metadata(ckpt, writer, name, gguf.GGUFType.MMPROJ)
    writer.add_file_type(out.ftype)
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_vision_projection_dim(hp["hidden_size"])
    writer.add_vision_image_size(clip["image_size"])
    writer.add_vision_patch_size(clip["patch_size"])
    writer.add_vision_embedding_length(clip["width"])
    writer.add_vision_feed_forward_length(clip["ffn_hidden_size"])
    writer.add_vision_block_count(clip["layers"])
    writer.add_vision_head_count(clip["heads"])
    writer.add_vision_image_mean(proc.get("image_mean", [0.5, 0.5, 0.5]))
    writer.add_vision_image_std(proc.get("image_std", [0.5, 0.5, 0.5]))
    writer.add_clip_projector_type(gguf.VisionProjectorType.DEEPSEEKOCR)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_use_gelu(True)
    writer.add_vision_projector_scale_factor(1)
    writer.add_vision_window_size(sam["window_size"])
    writer.add_vision_preproc_min_tiles(2)
    writer.add_vision_preproc_max_tiles(9)
    writer.add_vision_sam_layers_count(sam["layers"])
    writer.add_vision_sam_embedding_length(sam["width"])
    writer.add_vision_sam_head_count(sam["heads"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_array(KEY_SAM_GLOBAL_ATTN, [int(i) for i in sam["global_attn_indexes"]])
    writer.add_uint32(KEY_SAM_IMAGE_SIZE, sam["image_size"])
    writer.add_uint32(KEY_SAM_PATCH_SIZE, sam["patch_size"])
    writer.add_float32(KEY_CLIP_LN_EPS, 1e-5)
    writer.add_uint32(KEY_BASE_SIZE, BASE_SIZE)
    writer.add_uint32(KEY_TILE_SIZE, TILE_SIZE)


def default_name(ckpt: Checkpoint) -> str:
    """The file-name stem, e.g. DeepSeek-OCR for the real checkpoint."""
    ref = ckpt.config.get("_name_or_path") or ckpt.folder.name
    return Path(str(ref)).name or "model"
