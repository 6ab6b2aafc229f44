"""DeepSeek-OCR 2 checkpoint -> GGUF pair: llama.cpp's layout (checked against the files its own converter made
from tests/fixtures/tiny-dsocr2), every outtype against the safetensors source, the runtime reading back what
was written, the real config and all 2707 names of the real index, and bad settings.

llama.cpp's mmproj fixtures are the `-sam6` files only: its SAM blocks are re-laid (tiny blocks 0-3 at
positions 0, 2, 3, 5, byte for byte; identity blocks at 1 and 4; `clip.vision.sam.block_count` 6), every
other key and tensor as its converter wrote them (tests/fixtures/tiny-dsocr2-llamacpp/README.md)."""
import json
import re
import shutil
from dataclasses import replace

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.convert import LM_OUTTYPES, MMPROJ_OUTTYPES, convert_checkpoint, requantize
from dsocr.convert.checkpoint import Checkpoint
from dsocr.convert.deepseek_ocr import (MMPROJ_ARCH, is_ocr2, plan_lm, plan_mmproj, vision_params,
                                        write_mmproj_keys)
from dsocr.convert.gguf_out import write_gguf
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.vision import VisionParams

from conftest import FIXTURES, TINY2, one_line_error
from test_convert import check_values, fields, run_cli, source_array, tensor_bytes

REAL2 = FIXTURES / "real-config-ocr2"
# What dsocr adds to llama.cpp's keys: the original tokenizer, and what llama.cpp's C++ hard-codes
OUR_EXTRA_LM_KEYS = {"tokenizer.huggingface.json"}
OUR_EXTRA_MMPROJ_KEYS = {"dsocr.vision.sam.global_attn_indexes", "dsocr.vision.sam.image_size",
                         "dsocr.vision.sam.patch_size", "dsocr.vision.encoder.rope_freq_base",
                         "dsocr.vision.base_size", "dsocr.vision.tile_size"}
SAM6_POSITION = {0: 0, 1: 2, 2: 3, 3: 5}      # tiny SAM block -> its place in the -sam6 files
SAM_BLOCK = re.compile(r"^v\.sam\.blk\.(\d+)\.(.+)$")
# the real model: 12 LM layers (dense layer 0: 9 tensors, 11 MoE: 13 each) + 3; SAM 3 + 12 x 14 + neck 6
# + net 2, Qwen2 24 x 12 + norm + 2 query tables, projector 2, view separator 1
REAL_LM_TENSORS = 3 + 9 + 11 * 13
REAL_MMPROJ_TENSORS = 3 + 12 * 14 + 6 + 2 + 24 * 12 + 1 + 2 + 2 + 1


def tensors(reader):
    return [(t.name, t.tensor_type, list(t.shape), tensor_bytes(t)) for t in reader.tensors]


def test_f32_language_model_matches_llamacpp(converted2, llamacpp2_file):
    ours = gguf.GGUFReader(converted2("f32", "f32")[0])
    assert tensors(ours) == tensors(gguf.GGUFReader(llamacpp2_file("tiny-dsocr2-lm-f32.gguf")))


def test_f16_language_model_matches_llamacpp(converted2, llamacpp2_file):
    ours = gguf.GGUFReader(converted2("f16", "f16")[0])
    ref = gguf.GGUFReader(llamacpp2_file("tiny-dsocr2-lm-f16.gguf"))
    fo, fr = fields(ours), fields(ref)
    assert set(fo) - set(fr) == OUR_EXTRA_LM_KEYS and set(fr) <= set(fo)
    assert [k for k in fo if k in fr] == list(fr)                       # same key order
    assert all(fo[k] == fr[k] for k in fr), [k for k in fr if fo[k] != fr[k]]
    assert tensors(ours) == tensors(ref)


def without_sam_blocks(reader):
    return [t for t in tensors(reader) if not SAM_BLOCK.match(t[0])]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_mmproj_matches_llamacpp(converted2, llamacpp2_file, outtype):
    ours = gguf.GGUFReader(converted2(outtype, outtype)[1])
    ref = gguf.GGUFReader(llamacpp2_file(f"tiny-dsocr2-mmproj-{outtype}-sam6.gguf"))
    fo, fr = fields(ours), fields(ref)
    assert set(fo) - set(fr) == OUR_EXTRA_MMPROJ_KEYS and set(fr) <= set(fo)
    assert [k for k in fo if k in fr] == list(fr)
    assert [k for k in fr if fo[k] != fr[k]] == ["clip.vision.sam.block_count"]     # the re-lay's 6
    assert fo["clip.vision.sam.block_count"][1] == 4
    assert fo["clip.projector_type"][1] == "deepseekocr2"
    # every tensor but the SAM blocks in llama.cpp's order, types and bytes; each SAM block where -sam6 put it
    assert without_sam_blocks(ours) == without_sam_blocks(ref)
    theirs = {t[0]: t[1:] for t in tensors(ref)}
    sam = [(SAM_BLOCK.match(t[0]), t[1:]) for t in tensors(ours) if SAM_BLOCK.match(t[0])]
    assert len(sam) == 4 * 14
    for m, t in sam:
        assert t == theirs[f"v.sam.blk.{SAM6_POSITION[int(m.group(1))]}.{m.group(2)}"], m.group(0)


def test_ocr2_is_told_by_its_vision_config():
    cfg = json.loads((TINY2 / "config.json").read_text())
    assert is_ocr2(cfg)
    del cfg["vision_config"]["model_name"]
    assert is_ocr2(cfg)                      # the Qwen2 width entry alone
    cfg["vision_config"]["model_name"] = "deepencoderv2"
    del cfg["vision_config"]["width"]["qwen2-0-5b"]
    assert is_ocr2(cfg)                      # the encoder's name alone
    assert not is_ocr2(json.loads((FIXTURES / "tiny-dsocr" / "config.json").read_text()))


@pytest.mark.parametrize("outtype", list(LM_OUTTYPES))
def test_language_model_every_outtype(converted2, outtype):
    reader = gguf.GGUFReader(converted2(outtype, "f16")[0])
    ckpt = Checkpoint(TINY2)
    plan = {t.name: t for t in plan_lm(ckpt, LM_OUTTYPES[outtype])}
    assert reader.get_field("general.architecture").contents() == "deepseek2-ocr"
    assert reader.get_field("general.file_type").contents() == int(LM_OUTTYPES[outtype].ftype)
    assert [t.name for t in reader.tensors] == list(plan)
    for t in reader.tensors:
        p = plan[t.name]
        assert (tuple(reversed([int(d) for d in t.shape])), t.tensor_type) == (p.shape, p.qtype), t.name
        got = quant.dequantize(np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1]), t.tensor_type)
        check_values(t.name, t.tensor_type, got.reshape(p.shape), source_array(ckpt, p))


@pytest.mark.parametrize("outtype", list(MMPROJ_OUTTYPES))
def test_mmproj_every_outtype(converted2, outtype):
    reader = gguf.GGUFReader(converted2("f16", outtype)[1])
    ckpt = Checkpoint(TINY2)
    plan = {t.name: t for t in plan_mmproj(ckpt, MMPROJ_OUTTYPES[outtype])}
    assert [t.name for t in reader.tensors] == list(plan)
    base = MMPROJ_OUTTYPES[outtype].base
    always_f32 = ("v.sam.pos_embd.weight", "v.sam.blk.1.attn.pos_h.weight", "v.sam.neck.2.weight",
                  "v.sam.net_3.weight", "v.view_seperator", "v.blk.0.ln1.weight", "v.blk.0.attn_k.bias",
                  "v.post_ln.weight", "mm.model.fc.bias")
    # the encoder's input rows: llama.cpp's F16 in an F16 file, never quantized
    f16_only = ("v.resample_query_768.weight", "v.resample_query_1024.weight", "v.sam.patch_embd.weight")
    for t in reader.tensors:
        p = plan[t.name]
        if t.name in always_f32:
            assert t.tensor_type == QT.F32, t.name
        elif t.name in f16_only:
            assert t.tensor_type == (QT.F16 if base == QT.F16 else QT.F32), t.name
        elif t.name in ("v.blk.1.attn_q.weight", "v.blk.0.ffn_down.weight", "mm.model.fc.weight"):
            assert t.tensor_type == base, t.name
        got = quant.dequantize(np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1]), t.tensor_type)
        check_values(t.name, t.tensor_type, got.reshape(p.shape), source_array(ckpt, p))


def test_runtime_reads_the_settings_back(converted2):
    """What the runtime reads from the mmproj is what the converter took from the config (float32 epsilon)."""
    p = vision_params(Checkpoint(TINY2))
    assert (p.enc_layers, p.enc_width, p.enc_heads, p.enc_heads_kv, p.sam_global, p.queries) == \
        (2, 32, 4, 2, (1, 3), {768: 144, 1024: 256})
    back = VisionParams.from_gguf(GGUFFile(converted2("f16", "q8_0")[1]))
    assert back == replace(p, enc_eps=float(np.float32(p.enc_eps)))


def test_requantize_f32_mmproj_equals_direct_conversion(converted2, tmp_path):
    mm = requantize(converted2("f32", "f32")[1], tmp_path / "mm-q8.gguf", "q8_0", progress=False)
    assert tensors(gguf.GGUFReader(mm.path)) == tensors(gguf.GGUFReader(converted2("f16", "q8_0")[1]))


def test_cli_converts_ocr2(tmp_path):
    r = run_cli("convert", TINY2, "-o", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-tiny-dsocr2-F16.gguf", "tiny-dsocr2-Q8_0.gguf"]


# ---------------------------------------------------------------- the real config, all 2707 real names

def real_checkpoint(tmp_path):
    from devtools.synthetic import RandomCheckpoint
    return RandomCheckpoint(REAL2, TINY2, tmp_path / "src")


def test_real_config_plans_every_real_tensor(tmp_path):
    """The real config plans the 2707 real names into the real model's tensors (shapes from the sizes the
    official code hard-codes: the config has only the Qwen2 width); no weights are read."""
    ckpt = real_checkpoint(tmp_path)
    assert len(ckpt.tensors) == 2707
    p = vision_params(ckpt)
    assert (p.projector, p.sam_layers, p.sam_width, p.sam_heads, p.sam_global) == ("deepseekocr2", 12, 768, 12,
                                                                                    (2, 5, 8, 11))
    assert (p.enc_layers, p.enc_width, p.enc_heads, p.enc_heads_kv, p.enc_eps, p.enc_rope_theta) == \
        (24, 896, 14, 2, 1e-6, 1e6)
    assert (p.queries, p.n_embd) == ({768: 144, 1024: 256}, 1280)
    lm, mm = plan_lm(ckpt, LM_OUTTYPES["q8_0"]), plan_mmproj(ckpt, MMPROJ_OUTTYPES["f16"])
    assert (len(lm), len(mm)) == (REAL_LM_TENSORS, REAL_MMPROJ_TENSORS)
    shapes = {t.name: t.shape for t in mm}
    assert shapes["v.sam.net_3.weight"] == (896, 512, 3, 3)
    assert (shapes["v.resample_query_768.weight"], shapes["v.resample_query_1024.weight"]) == ((144, 896), (256, 896))
    assert (shapes["v.blk.23.attn_k.weight"], shapes["v.blk.23.ffn_up.weight"]) == ((128, 896), (4864, 896))
    assert (shapes["mm.model.fc.weight"], shapes["v.view_seperator"]) == ((1280, 896), (1, 1280))
    assert sum(t.qtype == QT.F16 for t in mm) == 12 * 4 + 1 + 24 * 7 + 2 + 1


def test_real_config_keys_are_llamacpps(tmp_path):
    """The real config's mmproj keys: the values llama.cpp's converter writes for the real model."""
    ckpt = real_checkpoint(tmp_path)
    out = MMPROJ_OUTTYPES["f16"]
    path = write_gguf(tmp_path / "keys.gguf", MMPROJ_ARCH, [], lambda w: write_mmproj_keys(ckpt, w, out, None),
                      progress=False).path
    keys = {k: v[1] for k, v in fields(gguf.GGUFReader(path)).items()}
    want = {"clip.projector_type": "deepseekocr2", "clip.vision.embedding_length": 896,
            "clip.vision.block_count": 24, "clip.vision.attention.head_count": 14,
            "clip.vision.attention.head_count_kv": 2, "clip.vision.feed_forward_length": 4864,
            "clip.vision.projection_dim": 1280, "clip.vision.image_size": 1024, "clip.vision.patch_size": 16,
            "clip.vision.window_size": 14, "clip.vision.preproc_min_tiles": 2, "clip.vision.preproc_max_tiles": 6,
            "clip.vision.sam.block_count": 12, "clip.vision.sam.embedding_length": 768,
            "clip.vision.sam.head_count": 12, "clip.use_gelu": True, "clip.vision.image_mean": [0.5] * 3,
            "clip.vision.image_std": [0.5] * 3, "dsocr.vision.sam.global_attn_indexes": [2, 5, 8, 11],
            "dsocr.vision.encoder.rope_freq_base": 1e6, "dsocr.vision.base_size": 1024,
            "dsocr.vision.tile_size": 768, "dsocr.vision.sam.image_size": 1024, "dsocr.vision.sam.patch_size": 16}
    assert {k: keys[k] for k in want} == want
    assert keys["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert "clip.vision.projector.scale_factor" not in keys and "dsocr.vision.clip.layer_norm_epsilon" not in keys


def scaled_real_config(folder):
    """The real config and index with tiny widths (the real depths, experts and names): a config folder."""
    cfg = json.loads((REAL2 / "config.json").read_text())
    tiny = json.loads((TINY2 / "config.json").read_text())
    for c, t in ((cfg, tiny), (cfg["language_config"], tiny["language_config"])):
        for k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size"):
            c[k] = t[k]
    widths = tiny["vision_config"]["width"]
    cfg["vision_config"]["width"] = {
        "qwen2-0-5b": {**widths["qwen2-0-5b"], "layers": 24},
        "sam_vit_b": {**widths["sam_vit_b"], "layers": 12, "global_attn_indexes": [2, 5, 8, 11]}}
    cfg["projector_config"] = tiny["projector_config"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(REAL2 / "model.safetensors.index.json", folder)
    return folder


def test_random_checkpoint_of_the_real_layout_converts(tmp_path):
    """devtools.synthetic writes every real OCR 2 name (at tiny widths here) and its checkpoint converts;
    its shape rules agree with the tiny checkpoint's tensors."""
    from devtools.synthetic import tensor_shape, write_random_checkpoint, write_random_gguf_pair
    tiny = Checkpoint(TINY2)
    assert {n: tensor_shape(n, tiny.config) for n in tiny.tensors} == {n: e.shape for n, e in tiny.tensors.items()}
    config = scaled_real_config(tmp_path / "config")
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config, TINY2)
    lm, mm = convert_checkpoint(ckpt, tmp_path / "out", "q8_0", "f16", progress=False)
    assert (len(lm.tensors), len(mm.tensors)) == (REAL_LM_TENSORS, REAL_MMPROJ_TENSORS)
    assert (lm.path.name, mm.path.name) == ("DeepSeek-OCR-2-Q8_0.gguf", "mmproj-DeepSeek-OCR-2-F16.gguf")
    pair = write_random_gguf_pair(tmp_path / "bench", "q8_0", "f16", config, TINY2, progress=False)
    assert [p.name for p in pair.values()] == ["random-DeepSeek-OCR-2-Q8_0.gguf",
                                               "mmproj-random-DeepSeek-OCR-2-F16.gguf"]
    assert [t.name for t in gguf.GGUFReader(pair["mmproj"]).tensors] == [t.name for t in mm.tensors]


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize("setting,value,needle", [
    ("kv_heads", 3, "config.json: 3 Qwen2 encoder kv heads do not divide its 4 heads"),
    ("heads", 5, "config.json: 5 Qwen2 encoder heads do not divide the Qwen2 encoder width 32"),
    ("layers", "two", "config.json: qwen2-0-5b layers"),
    ("rope_theta", -1.0, "Qwen2 encoder RoPE base is -1.0"),
])
def test_broken_qwen2_settings_are_refused(tmp_path, setting, value, needle):
    ck = tmp_path / "ckpt"
    shutil.copytree(TINY2, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vision_config"]["width"]["qwen2-0-5b"][setting] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    one_line_error(run_cli("convert", ck, "-o", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
