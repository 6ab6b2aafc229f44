"""Random-weight checkpoints in the exact layout of deepseek-ai/DeepSeek-OCR or DeepSeek-OCR-2, for
measuring conversion and inference at full size where the real weights cannot be downloaded.

Shapes follow from config.json and the tensor names (the real indexes list all 2710 / 2707), with the
real sizes the reference code hard-codes where the config lacks them (convert.deepseek_ocr's REAL_*);
values follow the tiny fixtures' recipe: N(0, 1/fan_in) for linear and conv weights, 1 + 0.1 N for
norm weights, small biases, N(0, 1) embeddings and query tables, 0.5 N position tables; stored as bf16.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from dsocr.convert.deepseek_ocr import is_ocr2, lm_hparams, vision_hparams
from dsocr.runtime.vision import ocr2_queries


def _encoder_shapes(config: dict) -> tuple[int, int, dict[str, tuple[int, ...]]]:
    """(width, projector input width, shapes) of the encoder after SAM: CLIP-L, or OCR 2's Qwen2."""
    sam, enc = vision_hparams(config)
    if is_ocr2(config):
        C, ff = enc["dim"], enc["intermediate_size"]
        kv = C // enc["heads"] * enc["kv_heads"]
        b = "model.qwen2_model.model.model.layers.N."
        shapes = {b + "input_layernorm.weight": (C,), b + "post_attention_layernorm.weight": (C,),
                  b + "self_attn.q_proj.weight": (C, C), b + "self_attn.q_proj.bias": (C,),
                  b + "self_attn.k_proj.weight": (kv, C), b + "self_attn.k_proj.bias": (kv,),
                  b + "self_attn.v_proj.weight": (kv, C), b + "self_attn.v_proj.bias": (kv,),
                  b + "self_attn.o_proj.weight": (C, C), b + "mlp.gate_proj.weight": (ff, C),
                  b + "mlp.up_proj.weight": (ff, C), b + "mlp.down_proj.weight": (C, ff),
                  "model.qwen2_model.model.model.norm.weight": (C,)}
        shapes |= {f"model.qwen2_model.query_{size}.weight": (rows, C)
                   for size, rows in ocr2_queries(sam["patch_size"]).items()}
        return C, C, shapes
    C, ff = enc["width"], enc["ffn_hidden_size"]
    b = "model.vision_model.transformer.layers.N."
    shapes = {"model.vision_model.embeddings.class_embedding": (C,),
              "model.vision_model.embeddings.patch_embedding.weight": (C, 3, enc["patch_size"], enc["patch_size"]),
              "model.vision_model.embeddings.position_embedding.weight":
                  ((enc["image_size"] // enc["patch_size"]) ** 2 + 1, C),
              "model.vision_model.pre_layrnorm.weight": (C,), "model.vision_model.pre_layrnorm.bias": (C,),
              b + "layer_norm1.weight": (C,), b + "layer_norm1.bias": (C,), b + "layer_norm2.weight": (C,),
              b + "layer_norm2.bias": (C,), b + "self_attn.qkv_proj.weight": (3 * C, C),
              b + "self_attn.qkv_proj.bias": (3 * C,), b + "self_attn.out_proj.weight": (C, C),
              b + "self_attn.out_proj.bias": (C,), b + "mlp.fc1.weight": (ff, C), b + "mlp.fc1.bias": (ff,),
              b + "mlp.fc2.weight": (C, ff), b + "mlp.fc2.bias": (C,)}
    return C, 2 * C, shapes     # the projector reads CLIP's and SAM's rows side by side


def tensor_shape(name: str, config: dict) -> tuple[int, ...]:
    """The shape of one HF tensor of DeepSeek-OCR (or -OCR-2) under `config`."""
    hp = lm_hparams(config)
    sam, _ = vision_hparams(config)
    Ce, proj_in, encoder = _encoder_shapes(config)
    proj = config.get("projector_config", {})
    H, V = hp["hidden_size"], hp["vocab_size"]
    Cs = sam["width"]
    hd = Cs // sam["heads"]
    grid = sam["image_size"] // sam["patch_size"]
    shared = hp["moe_intermediate_size"] * hp["n_shared_experts"]
    n = re.sub(r"(layers|blocks|experts)\.\d+\.", r"\1.N.", name)
    fixed = {
        "lm_head.weight": (V, H), "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
        "model.layers.N.input_layernorm.weight": (H,), "model.layers.N.post_attention_layernorm.weight": (H,),
        "model.layers.N.self_attn.q_proj.weight": (H, H), "model.layers.N.self_attn.k_proj.weight": (H, H),
        "model.layers.N.self_attn.v_proj.weight": (H, H), "model.layers.N.self_attn.o_proj.weight": (H, H),
        "model.layers.N.mlp.gate_proj.weight": (hp["intermediate_size"], H),
        "model.layers.N.mlp.up_proj.weight": (hp["intermediate_size"], H),
        "model.layers.N.mlp.down_proj.weight": (H, hp["intermediate_size"]),
        "model.layers.N.mlp.gate.weight": (hp["n_routed_experts"], H),
        "model.layers.N.mlp.experts.N.gate_proj.weight": (hp["moe_intermediate_size"], H),
        "model.layers.N.mlp.experts.N.up_proj.weight": (hp["moe_intermediate_size"], H),
        "model.layers.N.mlp.experts.N.down_proj.weight": (H, hp["moe_intermediate_size"]),
        "model.layers.N.mlp.shared_experts.gate_proj.weight": (shared, H),
        "model.layers.N.mlp.shared_experts.up_proj.weight": (shared, H),
        "model.layers.N.mlp.shared_experts.down_proj.weight": (H, shared),
        "model.image_newline": (H,), "model.view_seperator": (H,),
        "model.projector.layers.weight": (proj.get("n_embed", H), proj.get("input_dim", proj_in)),
        "model.projector.layers.bias": (proj.get("n_embed", H),),
        "model.sam_model.pos_embed": (1, grid, grid, Cs),
        "model.sam_model.patch_embed.proj.weight": (Cs, 3, sam["patch_size"], sam["patch_size"]),
        "model.sam_model.patch_embed.proj.bias": (Cs,),
        "model.sam_model.blocks.N.norm1.weight": (Cs,), "model.sam_model.blocks.N.norm1.bias": (Cs,),
        "model.sam_model.blocks.N.norm2.weight": (Cs,), "model.sam_model.blocks.N.norm2.bias": (Cs,),
        "model.sam_model.blocks.N.attn.qkv.weight": (3 * Cs, Cs), "model.sam_model.blocks.N.attn.qkv.bias": (3 * Cs,),
        "model.sam_model.blocks.N.attn.proj.weight": (Cs, Cs), "model.sam_model.blocks.N.attn.proj.bias": (Cs,),
        "model.sam_model.blocks.N.mlp.lin1.weight": (sam["mlp_ratio"] * Cs, Cs),
        "model.sam_model.blocks.N.mlp.lin1.bias": (sam["mlp_ratio"] * Cs,),
        "model.sam_model.blocks.N.mlp.lin2.weight": (Cs, sam["mlp_ratio"] * Cs),
        "model.sam_model.blocks.N.mlp.lin2.bias": (Cs,),
        "model.sam_model.neck.0.weight": (sam["out_chans"], Cs, 1, 1),
        "model.sam_model.neck.1.weight": (sam["out_chans"],), "model.sam_model.neck.1.bias": (sam["out_chans"],),
        "model.sam_model.neck.2.weight": (sam["out_chans"], sam["out_chans"], 3, 3),
        "model.sam_model.neck.3.weight": (sam["out_chans"],), "model.sam_model.neck.3.bias": (sam["out_chans"],),
        "model.sam_model.net_2.weight": (sam["downsample_channels"][0], sam["out_chans"], 3, 3),
        # net_3 projects to the next encoder's width (OCR 2's config says 1024 for the 896 its code builds)
        "model.sam_model.net_3.weight": (Ce, sam["downsample_channels"][0], 3, 3),
        **encoder,
    }
    if n in fixed:
        return fixed[n]
    m = re.match(r"model\.sam_model\.blocks\.(\d+)\.attn\.rel_pos_[hw]$", name)
    if m:
        size = grid if int(m.group(1)) in sam["global_attn_indexes"] else sam["window_size"]
        return (2 * size - 1, hd)
    raise KeyError(f"no shape rule for {name}")


def _init(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random values of one tensor."""
    if re.search(r"(norm\d?|layernorm|pre_layrnorm|neck\.[13])\.weight$", name):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.02
    if re.search(r"(embed_tokens\.weight|class_embedding|image_newline|view_seperator|query_\d+\.weight)$", name):
        return 0.0, 1.0
    if re.search(r"(pos_embed|position_embedding\.weight|rel_pos_[hw])$", name):
        return 0.0, 0.5
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    scale = 2.0 if name == "lm_head.weight" else (2.0 if name.endswith("mlp.gate.weight") else 1.0)
    return 0.0, scale / math.sqrt(fan_in)


def _bf16_bytes(x: np.ndarray) -> bytes:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16).tobytes()


def write_random_checkpoint(folder: Path, config_folder: Path, tokenizer_folder: Path, names: list[str] | None = None,
                            seed: int = 0) -> Path:
    """A single-shard bf16 checkpoint with random weights for every name of `config_folder`'s index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(config_folder) / "config.json").read_text())
    if names is None:
        names = list(json.loads((Path(config_folder) / "model.safetensors.index.json").read_text())["weight_map"])
    names = sorted(names)
    shapes = {n: tensor_shape(n, config) for n in names}
    header, offset = {}, 0
    for n in names:
        nbytes = math.prod(shapes[n]) * 2
        header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    shard = "model-00001-of-000001.safetensors"
    part = folder / (shard + ".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            mean, std = _init(n, shapes[n])
            count = math.prod(shapes[n])
            for start in range(0, count, 1 << 23):
                k = min(1 << 23, count - start)
                f.write(_bf16_bytes(rng.standard_normal(k, dtype=np.float32) * np.float32(std) + np.float32(mean)))
    part.rename(folder / shard)
    index = {"metadata": {"total_size": offset}, "weight_map": {n: shard for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    shutil.copy(Path(config_folder) / "config.json", folder / "config.json")
    for f in ("processor_config.json", "special_tokens_map.json"):
        if (Path(config_folder) / f).is_file():
            shutil.copy(Path(config_folder) / f, folder / f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_folder) / f, folder / f)
    return folder


class RandomTensor:
    """A checkpoint tensor whose rows are generated on demand (same recipe as the files above)."""

    def __init__(self, name: str, shape: tuple[int, ...], seed: int):
        self.name, self.shape, self.seed = name, tuple(shape), seed
        self.rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        self.row_length = shape[-1]
        self.mean, self.std = _init(name, self.shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        x = rng.standard_normal((stop - start, self.row_length), dtype=np.float32)
        return x * np.float32(self.std) + np.float32(self.mean)


class RandomCheckpoint:
    """Stands in for a Checkpoint (config, tensors, tokenizer folder) with random weights, so the
    converter's own planning and writing produce full-size GGUFs without a 6.7 GB detour."""

    def __init__(self, config_folder: Path, tokenizer_folder: Path, workdir: Path, seed: int = 0):
        self.folder = Path(workdir)
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "processor_config.json"):
            if (Path(config_folder) / f).is_file():
                shutil.copy(Path(config_folder) / f, self.folder / f)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_folder) / f, self.folder / f)
        self.config = json.loads((self.folder / "config.json").read_text())
        names = sorted(json.loads((Path(config_folder) / "model.safetensors.index.json").read_text())["weight_map"])
        self.tensors = {n: RandomTensor(n, tensor_shape(n, self.config), seed * 100003 + i) for i, n in enumerate(names)}

    def ordered_names(self) -> list[str]:
        return sorted(self.tensors)

    def optional_json(self, name: str) -> dict:
        p = self.folder / name
        return json.loads(p.read_text()) if p.is_file() else {}


def write_random_gguf_pair(outdir: Path, outtype: str, mmproj_outtype: str, config_folder: Path,
                           tokenizer_folder: Path, which=("lm", "mmproj"), seed: int = 0,
                           progress: bool = True) -> dict[str, Path]:
    """Full-size random-weight GGUF files written directly (cached: existing files are kept), named after the
    config's model: random-DeepSeek-OCR-Q8_0.gguf, mmproj-random-DeepSeek-OCR-2-F16.gguf, ..."""
    from dsocr.convert import deepseek_ocr as dso, output_names
    from dsocr.convert.gguf_out import write_gguf
    from dsocr.convert.policy import LM_OUTTYPES, MMPROJ_OUTTYPES
    outdir = Path(outdir)
    ckpt = RandomCheckpoint(config_folder, tokenizer_folder, outdir / "random-src", seed)
    name = "random-" + dso.default_name(ckpt)
    lm_out, mm_out = LM_OUTTYPES[outtype], MMPROJ_OUTTYPES[mmproj_outtype]
    paths = dict(zip(("lm", "mmproj"), (outdir / n for n in output_names(name, outtype, mmproj_outtype))))
    if "lm" in which and not paths["lm"].exists():
        write_gguf(paths["lm"], dso.LM_ARCH, dso.plan_lm(ckpt, lm_out),
                   lambda w: dso.write_lm_keys(ckpt, w, lm_out, name), progress=progress)
    if "mmproj" in which and not paths["mmproj"].exists():
        write_gguf(paths["mmproj"], dso.MMPROJ_ARCH, dso.plan_mmproj(ckpt, mm_out),
                   lambda w: dso.write_mmproj_keys(ckpt, w, mm_out, name), progress=progress)
    return {k: v for k, v in paths.items() if k in which}
