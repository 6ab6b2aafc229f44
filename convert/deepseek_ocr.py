"""DeepSeek-OCR's two GGUF files as llama.cpp's convert_hf_to_gguf.py lays them out.

The language model goes to `general.architecture = deepseek2-ocr`, the vision tower and
projector to an mmproj (`clip`, projector `deepseekocr`, or `deepseekocr2` for DeepSeek-OCR 2,
whose language model is laid out as DeepSeek-OCR's). Names come from gguf's own TensorNameMap
(DeepSeek-OCR 2's Qwen2 encoder: from one table here where the installed gguf lacks them), keys from
gguf.constants, tensor order is llama.cpp's (each shard's names sorted, routed experts merged into
3-D tensors where their last piece is reached).

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
from dsocr.runtime.language import LMParams
from dsocr.runtime.tensor_specs import (Shape, as_number, lm_params_problem, lm_shapes, resolve_widths,
                                        shape_problem, vision_params_problem, vision_shapes)
from dsocr.runtime.vision import (KEY_ENCODER_ROPE_THETA, KEY_VISION_HEAD_COUNT_KV, PROJECTOR_OCR2,
                                  QWEN2_ROPE_THETA, VisionParams, ocr2_queries)

# Vision settings the reference code hard-codes (the tiny configs write some of them); the second
# encoder's are under its vision_config.width entry: CLIP-L (DeepSeek-OCR) or Qwen2 (DeepSeek-OCR 2)
REAL_SAM = dict(width=768, layers=12, heads=12, global_attn_indexes=[2, 5, 8, 11], out_chans=256,
                downsample_channels=[512, 1024], window_size=14, mlp_ratio=4, patch_size=16, image_size=1024)
REAL_CLIP = dict(width=1024, layers=24, heads=16, ffn_hidden_size=4096, image_size=224, patch_size=14)
REAL_QWEN2 = dict(dim=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864, rms_norm_eps=1e-6,
                  rope_theta=QWEN2_ROPE_THETA)    # build_qwen2_decoder_as_encoder()'s defaults
CLIP_ENTRY, QWEN2_ENTRY = "clip-l-14-224", "qwen2-0-5b"
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{m['content']}}{% endfor %}"

KEY_SAM_GLOBAL_ATTN = "dsocr.vision.sam.global_attn_indexes"
KEY_SAM_IMAGE_SIZE = "dsocr.vision.sam.image_size"
KEY_SAM_PATCH_SIZE = "dsocr.vision.sam.patch_size"
KEY_CLIP_LN_EPS = "dsocr.vision.clip.layer_norm_epsilon"
KEY_BASE_SIZE = "dsocr.vision.base_size"
KEY_TILE_SIZE = "dsocr.vision.tile_size"

# DeepSeek-OCR 2's Qwen2 encoder as llama.cpp names it (gguf-py's tensor_mapping.py maps these since
# after the PyPI gguf 0.19.0 this project installs; used where gguf's TensorNameMap knows no name)
_QWEN2_LAYER = re.compile(r"model\.qwen2_model\.model\.model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")
_QWEN2_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "self_attn.o_proj": "attn_out", "input_layernorm": "ln1", "post_attention_layernorm": "ln2",
                      "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QWEN2_NAMES = {"model.qwen2_model.model.model.norm.weight": "v.post_ln.weight",
                "model.qwen2_model.query_768.weight": "v.resample_query_768.weight",
                "model.qwen2_model.query_1024.weight": "v.resample_query_1024.weight"}

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


def is_ocr2(config: dict) -> bool:
    """DeepSeek-OCR 2: its vision config is the deepencoderv2 (SAM, then a Qwen2 encoder)."""
    vision = config.get("vision_config", {})
    return vision.get("model_name") == "deepencoderv2" or QWEN2_ENTRY in vision.get("width", {})


def vision_hparams(config: dict) -> tuple[dict, dict]:
    """SAM's settings and the second encoder's (CLIP-L's, or DeepSeek-OCR 2's Qwen2's), over the real defaults."""
    widths = config.get("vision_config", {}).get("width", {})
    sam = {**REAL_SAM, **widths.get("sam_vit_b", {})}
    if is_ocr2(config):
        return sam, {**REAL_QWEN2, **widths.get(QWEN2_ENTRY, {})}
    return sam, {**REAL_CLIP, **widths.get(CLIP_ENTRY, {})}


def _setting(ckpt: Checkpoint, what: str, value, kind=int):
    """A config.json value as int or float, else a ConvertError naming it."""
    try:
        return as_number(value, kind)
    except ValueError as e:
        raise ConvertError(f"{ckpt.folder / 'config.json'}: {what}: {e}") from None


def _settings(ckpt: Checkpoint, settings: dict, prefix: str = ""):
    """get(key, default=None, kind=int) over `settings`; a null counts as absent, as in HF's configs."""
    def get(key: str, default=None, kind=int):
        value = settings.get(key)
        return _setting(ckpt, prefix + key, default if value is None else value, kind)
    return get


def _refuse_problem(ckpt: Checkpoint, problem: str | None) -> None:
    if problem:
        raise ConvertError(f"{ckpt.folder / 'config.json'}: {problem}")


def lm_params(ckpt: Checkpoint) -> LMParams:
    """The language settings as the runtime reads them from the GGUF, refused unless they make sense."""
    hp = lm_hparams(ckpt.config)
    k = _settings(ckpt, hp)
    p = LMParams(n_layer=k("num_hidden_layers"), n_embd=k("hidden_size"), n_head=k("num_attention_heads"),
                 n_head_kv=k("num_key_value_heads", k("num_attention_heads")), n_ff=k("intermediate_size"),
                 n_dense=k("first_k_dense_replace", 1), n_expert=k("n_routed_experts"),
                 n_expert_used=k("num_experts_per_tok"), n_ff_exp=k("moe_intermediate_size"),
                 n_shared=k("n_shared_experts"), vocab_size=k("vocab_size"),
                 n_ctx_train=k("max_position_embeddings", 8192), eps=k("rms_norm_eps", 1e-6, float),
                 rope_theta=k("rope_theta", 10000.0, float), expert_scale=k("routed_scaling_factor", 1.0, float),
                 expert_norm=bool(hp.get("norm_topk_prob")))
    _refuse_problem(ckpt, lm_params_problem(p, len(ckpt.tensors)))
    return p


def vision_params(ckpt: Checkpoint) -> VisionParams:
    """The vision settings as the runtime reads them from the mmproj, refused unless they make sense."""
    sam, enc = vision_hparams(ckpt.config)
    s = _settings(ckpt, sam, "sam_vit_b ")
    glob = sam["global_attn_indexes"]
    common = dict(sam_layers=s("layers"), sam_width=s("width"), sam_heads=s("heads"),
                  sam_global=tuple(_setting(ckpt, "sam_vit_b global_attn_indexes", i)
                                   for i in (glob if isinstance(glob, list) else [glob])),
                  window=s("window_size"), sam_patch=s("patch_size"), sam_image=s("image_size"), sam_eps=1e-6,
                  n_embd=lm_params(ckpt).n_embd)
    if is_ocr2(ckpt.config):
        e = _settings(ckpt, enc, QWEN2_ENTRY + " ")
        p = VisionParams(projector=PROJECTOR_OCR2, **common, enc_layers=e("layers"), enc_width=e("dim"),
                         enc_heads=e("heads"), enc_eps=e("rms_norm_eps", kind=float), enc_heads_kv=e("kv_heads"),
                         enc_rope_theta=e("rope_theta", kind=float), queries=ocr2_queries(common["sam_patch"]))
    else:
        c = _settings(ckpt, enc, CLIP_ENTRY + " ")
        p = VisionParams(projector=gguf.VisionProjectorType.DEEPSEEKOCR, **common, enc_layers=c("layers"),
                         enc_width=c("width"), enc_heads=c("heads"), enc_eps=1e-5, clip_image=c("image_size"),
                         clip_patch=c("patch_size"))
    _refuse_problem(ckpt, vision_params_problem(p, len(ckpt.tensors)))
    return p


def _lm_gguf_name(tmap, hf_name: str) -> str | None:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def plan_lm(ckpt: Checkpoint, out: OutType) -> list[OutTensor]:
    """The language-model tensors; routed experts become one [n_expert, out, in] tensor each."""
    params = lm_params(ckpt)
    n_layer, n_expert = params.n_layer, params.n_expert
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
    _check_plan(plan, lm_shapes(params), "language-model")
    return plan


def _qwen2_encoder_name(hf: str) -> str | None:
    m = _QWEN2_LAYER.match(hf)
    if m and m.group(2) in _QWEN2_LAYER_NAMES:
        return f"v.blk.{m.group(1)}.{_QWEN2_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return _QWEN2_NAMES.get(hf)


def plan_mmproj(ckpt: Checkpoint, out: OutType) -> list[OutTensor]:
    p = vision_params(ckpt)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(p.sam_layers, p.enc_layers))
    plan: list[OutTensor] = []
    unknown = []
    for hf in ckpt.ordered_names():
        if hf.startswith(_LM_PREFIXES):
            continue
        entry = ckpt.tensors[hf]
        key = hf + ".weight" if hf.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")) else hf
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None and p.projector == PROJECTOR_OCR2:
            name = _qwen2_encoder_name(hf)
        if name is None:
            unknown.append(hf)
            continue
        shape = (1, entry.shape[0]) if name == "v.view_seperator" else entry.shape  # llama.cpp's [n_embd, 1]
        qtype, requested = mmproj_tensor_type(name, shape, out)
        plan.append(OutTensor(name, shape, qtype, [entry], requested))
    if unknown:
        raise ConvertError(f"unknown vision tensor(s): {', '.join(unknown[:8])}"
                           + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    _check_plan(plan, vision_shapes(p), "vision")
    return plan


def _check_plan(plan: list[OutTensor], table: dict[str, Shape], what: str) -> None:
    """Every tensor the runtime reads is planned, each of the shape its table (runtime.tensor_specs)
    expects; a merged expert tensor is checked piece by piece, so the error names the HF tensor."""
    missing = sorted(set(table) - {t.name for t in plan})
    if missing:
        raise ConvertError(f"checkpoint lacks {what} tensor(s): {', '.join(missing[:8])}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    shapes = resolve_widths(table, {t.name: t.shape for t in plan})
    for t in plan:
        if t.name not in shapes:   # read by nobody (llama.cpp's files keep CLIP's patch conv too)
            continue
        pieces = [(s, (len(t.sources), *s.shape)) for s in t.sources] if len(t.sources) > 1 else \
            [(t.sources[0], t.shape)]
        for source, shape in pieces:
            problem = shape_problem(t.name, shape, shapes[t.name])
            if problem:
                raise ConvertError(f"{source.name}: {problem}")


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
    hp, p = lm_hparams(ckpt.config), lm_params(ckpt)
    writer.add_chat_template(PLAIN_CHAT_TEMPLATE)
    _metadata(ckpt, writer, name, gguf.GGUFType.MODEL)
    writer.add_block_count(p.n_layer)
    writer.add_context_length(p.n_ctx_train)
    writer.add_embedding_length(p.n_embd)
    writer.add_feed_forward_length(p.n_ff)
    writer.add_head_count(p.n_head)
    writer.add_head_count_kv(p.n_head_kv)
    writer.add_layer_norm_rms_eps(p.eps)
    writer.add_expert_count(p.n_expert)
    writer.add_expert_used_count(p.n_expert_used)
    writer.add_expert_group_count(hp.get("n_group", 1))
    writer.add_expert_group_used_count(hp.get("topk_group", 1))
    writer.add_file_type(out.ftype)
    writer.add_leading_dense_block_count(p.n_dense)
    writer.add_vocab_size(p.vocab_size)
    writer.add_expert_feed_forward_length(p.n_ff_exp)
    writer.add_expert_shared_count(p.n_shared)
    if hp.get("routed_scaling_factor") is not None:   # llama.cpp writes the key only when the config has it
        writer.add_expert_weights_scale(p.expert_scale)
    if p.expert_norm:
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(hp.get("qk_rope_head_dim", 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(ckpt, writer, p.vocab_size)


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
    if reverse and max(reverse) >= vocab_size:   # the runtime needs one token per embedding row
        raise ConvertError(f"{path}: token id {max(reverse)} is past the vocabulary size {vocab_size}")
    added = {a["id"]: a for a in json.loads(text).get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
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
    """llama.cpp's keys, in its order, then the dsocr.vision.* ones."""
    _, enc = vision_hparams(ckpt.config)
    p = vision_params(ckpt)
    ocr2 = p.projector == PROJECTOR_OCR2
    proc = ckpt.optional_json("processor_config.json")
    _metadata(ckpt, writer, name, gguf.GGUFType.MMPROJ)
    writer.add_file_type(out.ftype)
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_vision_projection_dim(p.n_embd)
    # llama.cpp's C++ overrides DeepSeek-OCR 2's image/patch size with SAM's
    writer.add_vision_image_size(p.sam_image if ocr2 else p.clip_image)
    writer.add_vision_patch_size(p.sam_patch if ocr2 else p.clip_patch)
    writer.add_vision_embedding_length(p.enc_width)
    entry, ffn = (QWEN2_ENTRY, "intermediate_size") if ocr2 else (CLIP_ENTRY, "ffn_hidden_size")
    writer.add_vision_feed_forward_length(_setting(ckpt, f"{entry} {ffn}", enc[ffn]))
    writer.add_vision_block_count(p.enc_layers)
    writer.add_vision_head_count(p.enc_heads)
    writer.add_vision_image_mean(proc.get("image_mean", [0.5, 0.5, 0.5]))
    writer.add_vision_image_std(proc.get("image_std", [0.5, 0.5, 0.5]))
    writer.add_clip_projector_type(p.projector)
    # the norms' epsilon the C++ reads: the Qwen2 encoder's (v2), SAM's (v1; CLIP's goes under dsocr.vision)
    writer.add_vision_attention_layernorm_eps(p.enc_eps if ocr2 else p.sam_eps)
    writer.add_vision_use_gelu(True)
    if not ocr2:
        writer.add_vision_projector_scale_factor(1)
    writer.add_vision_window_size(p.window)
    writer.add_vision_preproc_min_tiles(p.layout.min_crops)
    writer.add_vision_preproc_max_tiles(p.layout.max_crops)
    writer.add_vision_sam_layers_count(p.sam_layers)
    writer.add_vision_sam_embedding_length(p.sam_width)
    writer.add_vision_sam_head_count(p.sam_heads)
    if ocr2:
        writer.add_uint32(KEY_VISION_HEAD_COUNT_KV, p.enc_heads_kv)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_array(KEY_SAM_GLOBAL_ATTN, list(p.sam_global))
    writer.add_uint32(KEY_SAM_IMAGE_SIZE, p.sam_image)
    writer.add_uint32(KEY_SAM_PATCH_SIZE, p.sam_patch)
    if ocr2:
        writer.add_float32(KEY_ENCODER_ROPE_THETA, p.enc_rope_theta)
    else:
        writer.add_float32(KEY_CLIP_LN_EPS, p.enc_eps)
    base, tile, _ = p.layout.modes["gundam"]     # crop mode's global view and tiles
    writer.add_uint32(KEY_BASE_SIZE, base)
    writer.add_uint32(KEY_TILE_SIZE, tile)


def default_name(ckpt: Checkpoint) -> str:
    """The file-name stem, e.g. DeepSeek-OCR for the real checkpoint."""
    ref = ckpt.config.get("_name_or_path") or ckpt.folder.name
    return Path(str(ref)).name or "model"
