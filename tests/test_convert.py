"""HF checkpoint -> GGUF pair: llama.cpp's layout (checked against files its own converter
made), every outtype read back with gguf.GGUFReader, values against the safetensors source,
re-quantization, `dsocr info --json`, and bad input."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.convert import ConvertError, LM_OUTTYPES, MMPROJ_OUTTYPES, convert_checkpoint, requantize
from dsocr.convert.checkpoint import Checkpoint
from dsocr.convert.deepseek_ocr import plan_lm, plan_mmproj
from dsocr.convert.policy import lm_tensor_type

from conftest import FIXTURES, RMS_BOUND, TINY

# Our deliberate departures from llama.cpp's files: extra keys, and the CLIP FFN width that
# llama.cpp writes as heads*4 (a converter slip its C++ never reads).
OUR_EXTRA_KEYS = {"tokenizer.huggingface.json", "dsocr.vision.sam.global_attn_indexes", "dsocr.vision.sam.image_size",
                  "dsocr.vision.sam.patch_size", "dsocr.vision.clip.layer_norm_epsilon", "dsocr.vision.base_size",
                  "dsocr.vision.tile_size"}
CORRECTED_KEYS = {"clip.vision.feed_forward_length"}


def tensor_bytes(t):
    return np.asarray(t.data).view(np.uint8).tobytes()


def fields(reader):
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("ours_idx,theirs", [(0, "tiny-dsocr-lm-f16.gguf"), (1, "tiny-dsocr-mmproj-f16.gguf")])
def test_f16_files_match_llamacpp_converter(converted, llamacpp_file, ours_idx, theirs):
    ours = gguf.GGUFReader(converted("f16", "f16")[ours_idx])
    ref = gguf.GGUFReader(llamacpp_file(theirs))
    fo, fr = fields(ours), fields(ref)
    assert set(fo) - set(fr) <= OUR_EXTRA_KEYS and set(fr) <= set(fo)
    assert [k for k in fo if k in fr] == list(fr)                       # same key order
    for k in fr:
        if k not in CORRECTED_KEYS:
            assert fo[k] == fr[k], k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]  # same tensor order
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert tensor_bytes(a) == tensor_bytes(b), a.name


def test_corrected_clip_ffn_width_is_the_real_one(converted):
    r = gguf.GGUFReader(converted("f16", "f16")[1])
    ffn = r.get_tensor([t.name for t in r.tensors].index("v.blk.0.ffn_up.weight"))
    assert r.get_field("clip.vision.feed_forward_length").contents() == int(ffn.shape[1]) == 512


def test_f32_language_model_matches_llamacpp(converted, llamacpp_file):
    ours = gguf.GGUFReader(converted("f32", "f32")[0])
    ref = gguf.GGUFReader(llamacpp_file("tiny-dsocr-lm-f32.gguf"))
    assert [(t.name, t.tensor_type, tensor_bytes(t)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, tensor_bytes(t)) for t in ref.tensors]


def source_array(ckpt, plan_tensor):
    return np.concatenate([s.read_rows(0, s.rows) for s in plan_tensor.sources]).reshape(plan_tensor.shape)


def check_values(name, qtype, got, want):
    """Dequantized value against the bf16 source: exact for F32/BF16, f16 rounding for F16,
    the format's error bound (and ggml's own quantizer bytes) for quantized types."""
    if qtype in (QT.F32, QT.BF16):
        assert np.array_equal(got, want), name
    elif qtype == QT.F16:
        assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
    else:
        rel = np.sqrt(((got - want) ** 2).mean() / max((want ** 2).mean(), 1e-30))
        assert rel < RMS_BOUND[qtype], (name, qtype.name, rel)


@pytest.mark.parametrize("outtype", list(LM_OUTTYPES))
def test_language_model_every_outtype(converted, outtype):
    lm_path, _ = converted(outtype, "f16")
    reader = gguf.GGUFReader(lm_path)
    ckpt = Checkpoint(TINY)
    plan = {t.name: t for t in plan_lm(ckpt, LM_OUTTYPES[outtype])}
    assert reader.get_field("general.architecture").contents() == "deepseek2-ocr"
    assert reader.get_field("general.file_type").contents() == int(LM_OUTTYPES[outtype].ftype)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "leading_dense_block_count",
                "expert_count", "expert_used_count", "expert_shared_count", "expert_feed_forward_length",
                "vocab_size", "context_length"):
        assert reader.get_field(f"deepseek2-ocr.{key}") is not None, key
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.huggingface.json"):
        assert reader.get_field(key) is not None, key
    assert {t.name for t in reader.tensors} == set(plan)
    for t in reader.tensors:
        p = plan[t.name]
        assert tuple(reversed([int(d) for d in t.shape])) == p.shape
        assert t.tensor_type == p.qtype
        want = source_array(ckpt, p)
        got = quant.dequantize(np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1]), t.tensor_type)
        check_values(t.name, t.tensor_type, got.reshape(p.shape), want)
        if t.tensor_type not in (QT.F32, QT.F16, QT.BF16):   # quant bytes are ggml's quantizer of the source
            assert np.array_equal(np.asarray(t.data).reshape(-1), quant.quantize(want, t.tensor_type).reshape(-1))


@pytest.mark.parametrize("outtype", list(MMPROJ_OUTTYPES))
def test_mmproj_every_outtype(converted, outtype):
    _, mm_path = converted("f16", outtype)
    reader = gguf.GGUFReader(mm_path)
    ckpt = Checkpoint(TINY)
    plan = {t.name: t for t in plan_mmproj(ckpt, MMPROJ_OUTTYPES[outtype])}
    assert reader.get_field("clip.projector_type").contents() == "deepseekocr"
    assert reader.get_field("dsocr.vision.sam.global_attn_indexes").contents() == [1, 3]
    assert {t.name for t in reader.tensors} == set(plan)
    forced_f32 = ("v.sam.pos_embd.weight", "v.sam.blk.0.attn.pos_h.weight", "v.sam.neck.2.weight",
                  "v.sam.net_3.weight", "v.position_embd.weight", "v.view_seperator", "v.blk.0.ln1.weight")
    for t in reader.tensors:
        p = plan[t.name]
        if t.name in forced_f32:
            assert t.tensor_type == QT.F32, t.name
        got = quant.dequantize(np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1]), t.tensor_type)
        check_values(t.name, t.tensor_type, got.reshape(p.shape), source_array(ckpt, p))


def test_q4_k_m_mix_on_real_shapes_matches_llama_quantize():
    """llama-quantize's Q4_K_M / Q5_K_M assignment for the real 12-layer, 64-expert model
    (the table in tests/fixtures/ggml-quants/README.md, checked there against llama-quantize)."""
    more = {0, 3, 6, 9, 10, 11}
    for mix, base, fb in (("q4_k_m", QT.Q4_K, QT.Q5_0), ("q5_k_m", QT.Q5_K, QT.Q5_1)):
        out = LM_OUTTYPES[mix]
        t = lambda name, shape: lm_tensor_type(name, shape, out, 12, 64)[0]
        assert t("token_embd.weight", (129280, 1280)) == base
        assert t("output.weight", (129280, 1280)) == QT.Q6_K
        assert t("blk.0.ffn_down.weight", (1280, 6848)) == QT.Q8_0
        assert t("blk.0.ffn_gate.weight", (6848, 1280)) == base
        assert t("blk.1.ffn_gate_inp.weight", (64, 1280)) == QT.F32
        for layer in range(12):
            assert t(f"blk.{layer}.attn_v.weight", (1280, 1280)) == (QT.Q6_K if layer in more else base)
            assert t(f"blk.{layer}.attn_q.weight", (1280, 1280)) == base
            assert t(f"blk.{layer}.attn_output.weight", (1280, 1280)) == base
        for layer in range(1, 12):
            assert t(f"blk.{layer}.ffn_down_exps.weight", (64, 1280, 896)) == (QT.Q8_0 if layer in more else fb)
            assert t(f"blk.{layer}.ffn_down_shexp.weight", (1280, 1792)) == (QT.Q6_K if layer in more else base)
            assert t(f"blk.{layer}.ffn_up_exps.weight", (64, 896, 1280)) == base


def test_requantize_f32_to_q8_0_equals_direct_conversion(converted, tmp_path):
    f32_lm, f32_mm = converted("f32", "f32")
    out = requantize(f32_lm, tmp_path / "lm-q8.gguf", "q8_0", progress=False)
    direct = gguf.GGUFReader(converted("q8_0", "q8_0")[0])
    mine = gguf.GGUFReader(out.path)
    assert [(t.name, t.tensor_type, tensor_bytes(t)) for t in mine.tensors] == \
        [(t.name, t.tensor_type, tensor_bytes(t)) for t in direct.tensors]
    assert mine.get_field("general.file_type").contents() == int(LM_OUTTYPES["q8_0"].ftype)
    mm = requantize(f32_mm, tmp_path / "mm-q8.gguf", "q8_0", progress=False)
    direct_mm = gguf.GGUFReader(converted("q8_0", "q8_0")[1])
    assert [(t.name, t.tensor_type, tensor_bytes(t)) for t in gguf.GGUFReader(mm.path).tensors] == \
        [(t.name, t.tensor_type, tensor_bytes(t)) for t in direct_mm.tensors]


def test_requantize_from_q8_0_and_refusals(converted, tmp_path):
    q8_lm, _ = converted("q8_0", "q8_0")
    out = requantize(q8_lm, tmp_path / "lm-q4km.gguf", "q4_k_m", progress=False)
    assert out.types["F32"] == 9 and sum(out.types.values()) == 38
    with pytest.raises(ConvertError, match="re-quantize from an F32, F16, BF16 or Q8_0"):
        requantize(out.path, tmp_path / "again.gguf", "q8_0", progress=False)
    with pytest.raises(ConvertError, match="unknown mmproj output type"):
        requantize(converted("q8_0", "q8_0")[1], tmp_path / "mm.gguf", "q4_k_m", progress=False)
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "again.gguf").exists()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dsocr.cli.main", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_info_json_round_trip(converted):
    lm, _ = converted("q8_0", "q8_0")
    r = run_cli("info", lm, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    reader = gguf.GGUFReader(lm)
    assert info["architecture"] == "deepseek2-ocr"
    assert info["metadata"]["deepseek2-ocr.expert_count"] == 8
    assert [(t["name"], t["type"], t["shape"]) for t in info["tensors"]] == \
        [(t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors]
    assert info["file_size"] == lm.stat().st_size


def test_cli_convert_and_quantize_write_the_summary(tmp_path):
    r = run_cli("convert", TINY, "-o", tmp_path, "--outtype", "q5_k_m", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "tiny-dsocr-Q5_K_M.gguf" in r.stdout and "fell back" in r.stdout and "Q5_K -> Q5_1" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-tiny-dsocr-F16.gguf", "tiny-dsocr-Q5_K_M.gguf"]
    r = run_cli("quantize", tmp_path / "mmproj-tiny-dsocr-F16.gguf", tmp_path / "mm-q8.gguf", "q8_0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Q8_0" in r.stdout


# ---------------------------------------------------------------- bad input

def copy_tiny(tmp_path):
    import shutil
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY, dst)
    return dst


def assert_clean_failure(r, outdir, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsocr: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if outdir.exists():
        assert not [p for p in outdir.rglob("*") if p.suffix in (".gguf", ".part")], list(outdir.rglob("*"))


def test_missing_folder(tmp_path):
    assert_clean_failure(run_cli("convert", tmp_path / "nope", "-o", tmp_path / "out"), tmp_path / "out",
                         "no such checkpoint folder")


def test_missing_config_and_tokenizer(tmp_path):
    ck = copy_tiny(tmp_path)
    (ck / "tokenizer.json").unlink()
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out", "tokenizer.json is missing")
    (ck / "config.json").unlink()
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out", "config.json is missing")


def test_wrong_architecture_is_named(tmp_path):
    ck = copy_tiny(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out",
                         "LlamaForCausalLM", "is not DeepSeek-OCR")


def test_truncated_safetensors_names_the_file(tmp_path):
    ck = copy_tiny(tmp_path)
    shard = ck / "model-00001-of-000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out",
                         "model-00001-of-000001.safetensors", "truncated")


def test_corrupt_safetensors_header(tmp_path):
    ck = copy_tiny(tmp_path)
    shard = ck / "model-00001-of-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out",
                         "model-00001-of-000001.safetensors", "corrupt")


def rewrite_names(ck, rename):
    """Rewrite the shard's header with some tensors renamed (data untouched)."""
    import struct
    shard = ck / "model-00001-of-000001.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header = {rename.get(k, k): v for k, v in header.items() if rename.get(k, k) is not None}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])   # offsets are relative to the data
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if rename.get(k, k) == k}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))


def test_unknown_tensor_names_are_listed(tmp_path):
    ck = copy_tiny(tmp_path)
    rewrite_names(ck, {"model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.upp_proj.weight"})
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out",
                         "unknown language-model tensor", "model.layers.0.mlp.upp_proj.weight")


def test_missing_tensor_names_are_listed(tmp_path):
    ck = copy_tiny(tmp_path)
    rewrite_names(ck, {"model.sam_model.net_3.weight": None})
    assert_clean_failure(run_cli("convert", ck, "-o", tmp_path / "out"), tmp_path / "out",
                         "lacks vision tensor", "v.sam.net_3.weight")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_clean_failure(run_cli("convert", TINY, "-o", blocker / "sub"), tmp_path / "nothing", "cannot write")


def test_bad_type(tmp_path):
    assert_clean_failure(run_cli("convert", TINY, "-o", tmp_path / "out", "--outtype", "q3_k"),
                         tmp_path / "out", "unknown language-model output type 'q3_k'")
    assert_clean_failure(run_cli("convert", TINY, "-o", tmp_path / "out", "--mmproj-outtype", "q4_k"),
                         tmp_path / "out", "unknown mmproj output type 'q4_k'")


def test_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    """The disk filling up halfway through the second file removes both files."""
    import errno
    from dsocr.convert import gguf_out
    calls = {"n": 0}
    real = gguf_out._raw_rows

    def filling(*args):
        calls["n"] += 1
        if calls["n"] > 45:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)
    monkeypatch.setattr(gguf_out, "_raw_rows", filling)
    with pytest.raises(ConvertError, match="no space left"):
        convert_checkpoint(TINY, tmp_path, "q8_0", "f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_without_cache_says_how_to_proceed(tmp_path):
    r = run_cli("convert", "deepseek-ai/DeepSeek-OCR", "-o", tmp_path / "out",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_failure(r, tmp_path / "out", "not in the local Hugging Face cache", "local checkpoint folder")


def test_hub_checksums_are_verified(tmp_path):
    """verify_snapshot against hub-style metadata: sha256 for LFS files, git blob sha1 otherwise."""
    import hashlib
    from types import SimpleNamespace as NS
    from dsocr.convert.hub import verify_snapshot
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "w.safetensors").write_bytes(b"\x01" * 1000)
    cfg = (tmp_path / "config.json").read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()
    sha = hashlib.sha256(b"\x01" * 1000).hexdigest()
    good = [NS(rfilename="config.json", lfs=None, blob_id=blob),
            NS(rfilename="w.safetensors", lfs=NS(sha256=sha), blob_id="x")]
    assert verify_snapshot(tmp_path, good) == 2
    (tmp_path / "w.safetensors").write_bytes(b"\x02" * 1000)
    with pytest.raises(ConvertError, match="w.safetensors: checksum mismatch"):
        verify_snapshot(tmp_path, good)
