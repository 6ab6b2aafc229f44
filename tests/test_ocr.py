"""The OCR pipeline on the four fixture cases: preprocessing bit for bit, the vision tower and the
whole prompt against the PyTorch goldens, `dsocr ocr --json` reproducing the golden ids (our
files and llama.cpp's), grounding output, PDF pages and bad input.

Tolerances: SAM, CLIP, projector, image rows, inputs_embeds and logits within 1e-4 of the golden
arrays relative to their largest magnitude (measured ~2e-6); pixels and ids exactly equal."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from PIL import Image

from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError, ModelError
from dsocr.runtime.generate import SamplingParams
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.grounding import clean_markdown, draw_boxes, parse, save_outputs
from dsocr.runtime.pdf import parse_pages
from dsocr.runtime.preprocess import (V1, ViewConfig, build_prompt_ids, candidate_grids, choose_grid, prepare_image,
                                      read_image_file)
from dsocr.runtime.tap import Recorder
from dsocr.runtime.vision import VisionModel

from conftest import CASES, TINY, check_near_ties, rel_err, teacher_forced_deviation

TOL = 1e-4
README_ORDER = [(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3),
                (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1)]
Q8_DEVIATION = 0.5   # see test_language: Q8_0 moves this tiny model's logits by up to ~0.3


def case(name):
    meta = json.loads((TINY / "golden" / f"{name}.json").read_text())
    return meta, np.load(TINY / "golden" / f"{name}.npz")


def bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def view_of(meta):
    return ViewConfig(meta["base_size"], meta["image_size"], meta["crop_mode"])


def test_candidate_grids_keep_the_references_order():
    assert candidate_grids() == README_ORDER


@pytest.mark.parametrize("name", CASES)
def test_preprocessing_is_bit_exact(name):
    meta, z = case(name)
    img = prepare_image(read_image_file(TINY / meta["image"]), view_of(meta))
    assert list(img.grid) == list(z["images_spatial_crop"][0])
    assert np.array_equal(img.global_view, bf16(z["pixel_values_global_bf16"])[0])
    if "pixel_values_crops_bf16" in z.files:
        crops = bf16(z["pixel_values_crops_bf16"])
        assert len(img.tiles) == len(crops)
        assert all(np.array_equal(a, b) for a, b in zip(img.tiles, crops))
    else:
        assert img.tiles == []
    assert img.n_tokens == meta["num_image_tokens"]


@pytest.fixture(scope="module")
def tokenizer(converted):
    from dsocr.runtime.tokenizer import TextTokenizer
    return TextTokenizer.from_gguf(GGUFFile(converted("f32", "f32")[0]))


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_and_image_mask(tokenizer, name):
    meta, z = case(name)
    img = prepare_image(read_image_file(TINY / meta["image"]), view_of(meta))
    ids, mask = build_prompt_ids(tokenizer, meta["prompt"], [img], V1)
    assert ids == list(z["input_ids"]) and np.array_equal(mask, z["images_seq_mask"])


@pytest.fixture(scope="module")
def vision(converted):
    return VisionModel(GGUFFile(converted("f32", "f32")[1]), CPUBackend())


def sam_rows(a):
    """[n, C, g, g] golden SAM features -> [n, g*g, C] rows in (y, x) order."""
    return a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 2, 1)


@pytest.mark.parametrize("name", CASES)
def test_vision_tower_matches_goldens(vision, name):
    meta, z = case(name)
    img = prepare_image(read_image_file(TINY / meta["image"]), view_of(meta))
    rec = Recorder("sam.out", "clip.out", "projector.out")
    rows = vision.image_embeddings(img, rec)
    sam, clip, projector = (rec.values[stage] for stage in ("sam.out", "clip.out", "projector.out"))
    n = len(img.tiles)
    assert rel_err(sam[n], sam_rows(z["sam_features_global"])[0]) < TOL
    assert rel_err(clip[n], z["clip_features_global"][0]) < TOL
    assert rel_err(projector[n], z["projector_global"][0]) < TOL
    for i in range(n):
        assert rel_err(sam[i], sam_rows(z["sam_features_crops"])[i]) < TOL
        assert rel_err(clip[i], z["clip_features_crops"][i]) < TOL
        assert rel_err(projector[i], z["projector_crops"][i]) < TOL
    assert rel_err(rows, z["inputs_embeds"][z["images_seq_mask"]]) < TOL


@pytest.fixture(scope="module")
def engine(converted):
    lm, mm = converted("f32", "f32")
    return OcrEngine(lm, mm)


@pytest.mark.parametrize("name", CASES)
def test_whole_prompt_embeddings_and_logits(engine, name):
    meta, z = case(name)
    req = OcrRequest([read_image_file(TINY / meta["image"])], meta["prompt"], view_of(meta))
    embeds, ids = engine.prepare(req, {})
    assert ids == list(z["input_ids"])
    assert rel_err(embeds, z["inputs_embeds"]) < TOL
    logits = engine.lm.forward(embeds, 0, engine.lm.new_cache(len(ids), f16=False), logits_rows=z["logits_rows"])
    assert rel_err(logits, z["logits"]) < TOL


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dsocr.cli.main", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "DSOCR_CONFIG": os.devnull + ".toml", **(env or {})})


def ocr_json(lm, mm, name, *extra):
    meta, _ = case(name)
    r = run_cli("ocr", TINY / meta["image"], "--model", lm, "--mmproj", mm, "--prompt", meta["prompt"],
                "--base-size", meta["base_size"], "--image-size", meta["image_size"],
                "--crop-mode", str(meta["crop_mode"]).lower(), "--max-new-tokens", 16, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", CASES)
def test_cli_json_reproduces_golden_ids(converted, name):
    meta, z = case(name)
    out = ocr_json(*converted("f32", "f32"), name)
    assert out["token_ids"] == list(z["generated_ids"])
    assert out["prompt_tokens"] == meta["seq_len"] and out["completion_tokens"] == 16
    assert out["finish_reason"] == "length" and set(out["timings"]) >= {"preprocess_s", "vision_s", "prefill_s",
                                                                         "decode_s", "prefill_tok_s", "decode_tok_s"}


@pytest.mark.parametrize("name", CASES)
def test_llamacpp_files_reproduce_golden_ids(llamacpp_file, name):
    """llama.cpp's F32 language model with its `-sam12` mmproj: no global-attention key, CLIP's
    224/14 as image/patch size, 12 SAM blocks; the real defaults fill in what is missing."""
    _, z = case(name)
    out = ocr_json(llamacpp_file("tiny-dsocr-lm-f32.gguf"), llamacpp_file("tiny-dsocr-mmproj-f32-sam12.gguf"), name)
    assert out["token_ids"] == list(z["generated_ids"])


def test_f16_mmproj_with_q8_0_model_follows_goldens_up_to_near_ties(converted):
    lm, _ = converted("q8_0", "q8_0")
    _, mm = converted("f16", "f16")
    eng = OcrEngine(lm, mm)
    goldens, results, deviation = {}, {}, 0.0
    for name in CASES:
        meta, goldens[name] = case(name)
        req = OcrRequest([read_image_file(TINY / meta["image"])], meta["prompt"], view_of(meta),
                         SamplingParams(max_new_tokens=16))
        results[name] = eng.run(req).token_ids
        deviation = max(deviation, teacher_forced_deviation(eng.lm, eng.prepare(req, {})[0], goldens[name]))
    assert deviation < Q8_DEVIATION
    check_near_ties(results, goldens, deviation)


# ---------------------------------------------------------------- grounding

GROUNDED = ("<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Report\n\n"
            "<|ref|>image<|/ref|><|det|>[[0, 200, 499, 600], [500, 200, 999, 600]]<|/det|>\n"
            "<|ref|>text<|/ref|><|det|>[[100, 700, 900, 800]]<|/det|>\nBody \\coloneqq text.\n"
            "<|ref|>table<|/ref|><|det|>[[1, 2, bad]]<|/det|>\n<|ref|>cut<|/ref|><|det|>[[10, 10")


def test_grounding_parse_and_clean_markdown():
    regions = parse(GROUNDED, 1000, 2000)
    assert [r.label for r in regions] == ["title", "image", "text", "table"]
    assert regions[0].boxes == [(100, 100, 900, 240)]
    assert regions[1].boxes == [(0, 400, 499, 1201), (500, 400, 1000, 1201)]
    assert regions[3].boxes == []                                   # malformed box skipped
    md = clean_markdown(GROUNDED, regions)
    assert md == "# Report\n\n![](images/0.jpg)\n![](images/1.jpg)\n\n\nBody := text.\n"
    for garbage in ["<|ref|>", "<|det|>[[", "<|ref|>a<|/ref|><|det|>[[1,2,3,4]", "]]<|/det|>", "", "<|/ref|>x"]:
        clean_markdown(garbage, parse(garbage, 10, 10))             # never raises


def test_grounding_outputs_on_a_crafted_page(tmp_path):
    page = Image.new("RGB", (1000, 2000), (255, 255, 255))
    save_outputs(tmp_path, page, GROUNDED)
    assert (tmp_path / "result.mmd").read_text() == GROUNDED
    assert "![](images/1.jpg)" in (tmp_path / "result.md").read_text()
    crops = sorted((tmp_path / "images").iterdir())
    assert [Image.open(c).size for c in crops] == [(499, 801), (500, 801)]
    boxes = np.asarray(Image.open(tmp_path / "boxes.png"))
    assert (boxes[100, 100:900] != 255).any() and (boxes[1900, 10] == 255).all()   # title edge drawn, margin clean
    assert draw_boxes(page, []).size == page.size


# ---------------------------------------------------------------- PDF and bad input

def test_page_ranges():
    assert parse_pages("1-3,7", 9) == [0, 1, 2, 6]
    assert parse_pages(None, 3) == [0, 1, 2]
    assert parse_pages("2-", 4) == [1, 2, 3]
    for bad in ["0", "5", "3-2", "x", "1-9"]:
        with pytest.raises(InputError):
            parse_pages(bad, 4)
    with pytest.raises(InputError, match="no pages"):
        parse_pages(None, 0)


@pytest.fixture(scope="module")
def three_page_pdf(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdf") / "doc.pdf"
    src = Image.open(TINY / "images" / "small_note.png").convert("RGB")
    pages = [src, src.rotate(90, expand=True), src.resize((300, 200))]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
    return path


def test_pdf_pages_are_ocred_in_order(converted, three_page_pdf, tmp_path):
    lm, mm = converted("f32", "f32")
    r = run_cli("ocr", three_page_pdf, "--model", lm, "--mmproj", mm, "--pages", "2-3", "--max-new-tokens", 4,
                "--json", "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p["page"] for p in out["pages"]] == [2, 3] and all(p["completion_tokens"] == 4 for p in out["pages"])
    assert (tmp_path / "out" / "page-2" / "boxes.png").is_file() and (tmp_path / "out" / "result.md").is_file()
    r = run_cli("ocr", three_page_pdf, "--model", lm, "--mmproj", mm, "--max-new-tokens", 2)
    assert r.returncode == 0 and r.stdout.count("<!-- page ") == 3


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("dsocr: error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def test_bad_inputs(converted, three_page_pdf, tmp_path):
    lm, mm = converted("f32", "f32")
    model = ["--model", lm, "--mmproj", mm]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "text.png").write_text("not an image")
    img = TINY / "images" / "small_note.png"
    assert_one_line_error(run_cli("ocr", tmp_path / "missing.png", *model), "no such file")
    assert_one_line_error(run_cli("ocr", tmp_path / "empty.png", *model), "empty file")
    assert_one_line_error(run_cli("ocr", tmp_path / "corrupt.png", *model), "corrupt.png")
    assert_one_line_error(run_cli("ocr", tmp_path / "text.png", *model), "not a readable image")
    assert_one_line_error(run_cli("ocr", img, *model, "--max-pixels", 1000), "pixel limit")
    assert_one_line_error(run_cli("ocr", img, *model, "--prompt", "<image><image> two"), "2 <image> marker(s) for 1")
    assert_one_line_error(run_cli("ocr", three_page_pdf, *model, "--pages", "4"), "outside 1-3")
    assert_one_line_error(run_cli("ocr", img, "--model", mm, "--mmproj", mm), "not a DeepSeek-OCR language model")
    assert_one_line_error(run_cli("ocr", img, "--model", lm, "--mmproj", lm), "not a DeepSeek-OCR mmproj")
    assert_one_line_error(run_cli("ocr", img, *model, "--mode", "gundam", "--image-size", 512), "640")
    assert_one_line_error(run_cli("ocr", img, "--model", tmp_path / "nope.gguf"), "no such model")
    if not os.path.exists("/dev/nvidiactl"):     # outside the simulator, no GPU is a plain error
        assert_one_line_error(run_cli("ocr", img, *model, "--device", "cuda", env={"NUMBA_ENABLE_CUDASIM": "0"}),
                              "--device cuda: no usable NVIDIA GPU")


def narrow_mmproj(src, dst, width):
    """A copy of an mmproj whose projector maps to `width` (a mismatched pair for the LM)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "clip")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name in ("mm.model.fc.weight", "mm.model.fc.bias", "v.image_newline"):
            data = data[..., :width] if t.name == "v.image_newline" else data[:width]
        elif t.name == "v.view_seperator":
            data = data[:, :width]
        w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mismatched_pair_is_refused(converted, tmp_path):
    lm, mm = converted("f32", "f32")
    narrow_mmproj(mm, tmp_path / "mmproj-narrow.gguf", 32)
    with pytest.raises(ModelError, match="width 32 .* width 64"):
        OcrEngine(lm, tmp_path / "mmproj-narrow.gguf")
    r = run_cli("ocr", TINY / "images" / "small_note.png", "--model", lm, "--mmproj", tmp_path / "mmproj-narrow.gguf")
    assert_one_line_error(r, "not a matching pair")
