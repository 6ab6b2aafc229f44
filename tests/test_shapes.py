"""Wrong tensor shapes and insane hyperparameters are refused with one line, at load and at
conversion (runtime.tensor_specs): real GGUF files rewritten with gguf's writer and real
checkpoints rewritten with safetensors, through the `dsocr` command."""
import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from safetensors.numpy import save_file

from dsocr.convert import ConvertError, convert_checkpoint
from dsocr.convert.checkpoint import Checkpoint
from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.language import LanguageModel
from dsocr.runtime.vision import VisionModel

from conftest import TINY, one_line_error
from test_convert import assert_clean_failure, copy_tiny
from test_ocr import run_cli

IMAGE = TINY / "images" / "small_note.png"
SHARD = "model-00001-of-000001.safetensors"


def rewrite_gguf(src, dst, tensors=(), keys=()):
    """src (an all-F32 file) rewritten with some tensors replaced (name -> float32 array, or
    (data, raw_shape, raw_dtype) for gguf's add_tensor) and some keys set (key -> (value, type))."""
    tensors, keys = dict(tensors), dict(keys)
    r = gguf.GGUFReader(src)
    assert set(tensors) <= {t.name for t in r.tensors} and set(keys) <= set(r.fields)
    w = gguf.GGUFWriter(dst, r.get_field("general.architecture").contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in keys:
            w.add_key_value(key, *keys[key])
        else:
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == VT.ARRAY else None)
    for t in r.tensors:
        new = tensors.get(t.name, np.asarray(t.data))
        w.add_tensor(t.name, *new) if isinstance(new, tuple) else w.add_tensor(t.name, new)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def random(shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def ocr(lm, mm):
    return run_cli("ocr", IMAGE, "--model", lm, "--mmproj", mm, "--max-new-tokens", 2)


@pytest.fixture(scope="module")
def pair(converted):
    return converted("f32", "f32")


def test_unchanged_rewrite_still_reads(pair, tmp_path):
    """The rewriter itself keeps a file valid: the failures below are the changed tensor's."""
    lm, mm = rewrite_gguf(pair[0], tmp_path / "lm.gguf"), rewrite_gguf(pair[1], tmp_path / "mm.gguf")
    r = ocr(lm, mm)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize("which,name,shape,expected", [
    (0, "blk.0.attn_norm.weight", (32,), "(64)"),
    (0, "blk.0.attn_q.weight", (32, 64), "(64, 64)"),
    (0, "token_embd.weight", (1000, 64), "(1024, 64)"),
    (0, "blk.1.ffn_up_exps.weight", (7, 32, 64), "(8, 32, 64)"),
    (0, "blk.2.ffn_down_exps.weight", (8, 64, 16), "(8, 64, 32)"),
    (1, "mm.model.fc.weight", (64, 200), "(64, 256)"),
    (1, "v.sam.blk.0.attn.qkv.weight", (144, 40), "(144, 48)"),
    (1, "v.sam.pos_embd.weight", (1, 32, 32, 48), "(1, 64, 64, 48)"),
    (1, "v.blk.1.ffn_up.bias", (500,), "(512)"),
    (1, "v.sam.blk.2.mlp.lin1.weight", (100, 48), "(192, 48)"),   # a width no key names: block 0's
])
def test_wrong_shape_is_named_at_load(pair, tmp_path, which, name, shape, expected):
    files = list(pair)
    files[which] = rewrite_gguf(pair[which], tmp_path / "bad.gguf", {name: random(shape)})
    line = one_line_error(ocr(*files))
    got = "(" + ", ".join(map(str, shape)) + ")"
    assert f"tensor {name} has shape {got}, expected {expected}" in line and "bad.gguf" in line


def test_row_length_the_type_block_does_not_divide(pair, tmp_path):
    """A Q4_K norm of 64 weights (Q4_K blocks hold 256): refused when the file is opened."""
    bad = rewrite_gguf(pair[0], tmp_path / "bad.gguf",
                       {"blk.0.attn_norm.weight": (np.zeros(36, np.float32), (64,), QT.Q4_K)})
    assert "Q4_K" in one_line_error(ocr(bad, pair[1]))


@pytest.mark.parametrize("which,key,value,vtype,needle", [
    (0, "deepseek2-ocr.attention.head_count", 0, VT.UINT32, "attention heads is 0, not a positive number"),
    (0, "deepseek2-ocr.attention.head_count", 3, VT.UINT32, "3 attention heads do not split the width 64"),
    (0, "deepseek2-ocr.expert_used_count", 9, VT.UINT32, "9 experts used per token out of 8"),
    (0, "deepseek2-ocr.block_count", 2**31, VT.UINT32, "2147483648 layers cannot fit in 38 tensors"),
    (0, "deepseek2-ocr.embedding_length", "wide", VT.STRING,
     "key deepseek2-ocr.embedding_length: 'wide' is not an integer"),
    (0, "deepseek2-ocr.vocab_size", 1000, VT.UINT32, "the tokenizer has 1024 tokens for a vocabulary of 1000"),
    (0, "deepseek2-ocr.attention.layer_norm_rms_epsilon", -1.0, VT.FLOAT32, "RMS norm epsilon is -1.0"),
    (1, "clip.vision.attention.head_count", 5, VT.UINT32, "5 CLIP heads do not divide the CLIP width 128"),
    (1, "clip.vision.window_size", 0, VT.UINT32, "SAM window is 0, not a positive number"),
    (1, "clip.vision.window_size", 100, VT.UINT32, "SAM window 100 is larger than its 64-patch grid"),
])
def test_insane_hparams_are_named_at_load(pair, tmp_path, which, key, value, vtype, needle):
    files = list(pair)
    files[which] = rewrite_gguf(pair[which], tmp_path / "bad.gguf", keys={key: (value, vtype)})
    line = one_line_error(ocr(*files))
    assert needle in line, line


def test_llamacpp_files_pass_the_checks(llamacpp_file):
    """llama.cpp's conventions: no projector keys for SAM, 27-row rel-pos tables in the blocks
    it treats as global (sam12), the unused CLIP patch conv, its default global blocks past 4."""
    be = CPUBackend()
    for name in ("tiny-dsocr-lm-f16.gguf", "tiny-dsocr-lm-f32.gguf"):
        assert LanguageModel(GGUFFile(llamacpp_file(name)), be).p.n_layer == 3
    for name in ("tiny-dsocr-mmproj-f16.gguf", "tiny-dsocr-mmproj-f32-sam12.gguf"):
        assert VisionModel(GGUFFile(llamacpp_file(name)), be).p.n_embd == 64


# ---------------------------------------------------------------- conversion

def replace_checkpoint_tensor(ck, name, shape):
    """The copied checkpoint's shard rewritten (as F32) with tensor `name` of `shape`."""
    arrays = {n: e.read() for n, e in Checkpoint(ck).tensors.items()}
    assert name in arrays
    arrays[name] = random(shape)
    save_file(arrays, str(ck / SHARD), metadata={"format": "pt"})


def test_wrong_checkpoint_shape_is_named_before_writing(tmp_path):
    ck = copy_tiny(tmp_path)
    replace_checkpoint_tensor(ck, "model.layers.0.self_attn.q_proj.weight", (32, 64))
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--no-progress"), tmp_path / "out",
                         "model.layers.0.self_attn.q_proj.weight", "tensor blk.0.attn_q.weight has shape (32, 64), "
                         "expected (64, 64)")


@pytest.mark.parametrize("name,shape,needle", [
    ("model.layers.1.mlp.experts.5.up_proj.weight", (32, 60),
     "tensor blk.1.ffn_up_exps.weight has shape (8, 32, 60), expected (8, 32, 64)"),
    ("model.embed_tokens.weight", (1000, 64), "tensor token_embd.weight has shape (1000, 64), expected (1024, 64)"),
    ("model.sam_model.blocks.0.attn.qkv.weight", (144, 40),
     "tensor v.sam.blk.0.attn.qkv.weight has shape (144, 40), expected (144, 48)"),
])
def test_wrong_checkpoint_shapes_name_the_hf_tensor(tmp_path, name, shape, needle):
    ck = copy_tiny(tmp_path)
    replace_checkpoint_tensor(ck, name, shape)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(ck, tmp_path / "out", "f16", "f16", progress=False)
    assert str(e.value).startswith(name + ": ") and needle in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section,key,value,needle", [
    # unchecked, gguf's name map for 10**5 blocks alone takes seconds (10**9: all memory)
    ("language_config", "num_hidden_layers", 10**5, "100000 layers cannot fit in"),
    ("language_config", "num_attention_heads", 0, "attention heads is 0, not a positive number"),
    ("language_config", "hidden_size", "64", "hidden_size: '64' is not an integer"),
    ("language_config", "num_experts_per_tok", 9, "9 experts used per token out of 8"),
    ("sam_vit_b", "heads", 5, "5 SAM heads do not divide the SAM width 48"),
    ("clip-l-14-224", "patch_size", 0, "CLIP patch size is 0, not a positive number"),
])
def test_insane_config_is_refused_before_writing(tmp_path, section, key, value, needle):
    ck = copy_tiny(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    if section == "language_config":     # the converter reads the top level, which repeats language_config
        cfg[key] = cfg[section][key] = value
    else:
        cfg["vision_config"]["width"][section][key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="config.json: ") as e:
        convert_checkpoint(ck, tmp_path / "out", "f16", "f16", progress=False)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
