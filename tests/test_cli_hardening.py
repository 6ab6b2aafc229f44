"""Bad requests refused early and in one line: prompts over the context (counted before any vision
work, exactly as prepare() lays them out), decoding values out of range (from flags, environment
or config, before the model loads), top_p 0 as greedy decoding, an unwritable --output-dir, a PDF
without pages."""
import json
import math
import time

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from dsocr.cli.main import main
from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import Sampler, SamplingParams
from dsocr.runtime.pdf import render_pages
from dsocr.runtime.preprocess import V1, ViewConfig
from dsocr.runtime.vision import VisionModel

from conftest import TINY, one_line_error

NOTE = TINY / "images" / "small_note.png"
N_CTX = 8192          # the tiny model's context (max_position_embeddings)
# sizes that take each path of the layout: no tiles, tiles on several grids, an extreme aspect, exact 640
SIZES = [(500, 360), (1400, 500), (800, 1100), (641, 300), (30, 2000), (640, 640), (2000, 1990)]


@pytest.fixture(scope="module")
def engine(converted):
    return OcrEngine(*converted("f32", "f32"))


def read_note():
    return Image.open(NOTE).convert("RGB")


def vision_must_not_run(*args, **kwargs):
    pytest.fail("the vision tower ran for a request that should have been refused first")


@pytest.fixture
def rows_without_vision(engine, monkeypatch):
    """The vision tower replaced by zero rows of the right count, so prepare() builds its ids quickly."""
    def zero_rows(p, progress=None):
        yield from ()
        return np.zeros((p.n_tokens, engine.lm.p.n_embd), np.float32)
    monkeypatch.setattr(engine.vision, "image_embedding_steps", zero_rows)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `dsocr` run in this process on a fresh config."""
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))

    def run(*argv):
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


# ---------------------------------------------------------------- the context check (item 6)

@pytest.mark.parametrize("mode", sorted(V1.modes))
def test_context_count_is_the_length_of_the_ids_prepare_builds(engine, rows_without_vision, mode):
    view = ViewConfig.from_mode(mode)
    requests = [([size], "<image>\n<|grounding|>Convert the document to markdown.") for size in SIZES]
    requests += [(SIZES[:3], " <image>a <image>\nb\n\n<image> Free OCR. "), ([(500, 360)], "no marker: one is added")]
    for sizes, prompt in requests:
        images = [Image.new("RGB", size, "white") for size in sizes]
        _, ids = engine.prepare(OcrRequest(images, prompt, view), {})
        assert engine.check_context(prompt, sizes, view) == len(ids), (sizes, prompt)


def test_ninety_images_over_the_context_are_refused_before_vision(engine, monkeypatch):
    """90 images in "small" mode (111 tokens each) make a ~10,000-token prompt: refused at once, the
    encoder never runs."""
    monkeypatch.setattr(engine.vision, "image_embedding_steps", vision_must_not_run)
    images = [Image.new("RGB", (64, 64), "white")] * 90
    n = 1 + 90 * 111 + len(engine.tokenizer.encode("Free OCR."))
    t = time.perf_counter()
    with pytest.raises(InputError, match=f"^the prompt is {n} tokens; the model's context is {N_CTX} "):
        engine.prepare(OcrRequest(images, "<image>" * 90 + "Free OCR.", ViewConfig.from_mode("small")), {})
    assert time.perf_counter() - t < 1.0


def test_the_prompt_and_one_new_token_must_fit(engine, monkeypatch):
    view = ViewConfig.from_mode("small")
    req = OcrRequest([read_note()], "<image>\nFree OCR.", view, SamplingParams(max_new_tokens=5))
    n = engine.check_context(req.prompt, [req.images[0].size], view)
    monkeypatch.setattr(engine.lm.p, "n_ctx_train", n + 1)
    result = engine.run(req)
    assert len(result.token_ids) == 1 and result.finish_reason == "length" and result.prompt_tokens == n
    monkeypatch.setattr(engine.lm.p, "n_ctx_train", n)
    monkeypatch.setattr(engine.vision, "image_embedding_steps", vision_must_not_run)
    with pytest.raises(InputError, match=f"^the prompt is {n} tokens; the model's context is {n} "):
        engine.run(req)


def test_cli_prompt_file_over_the_context(converted, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(VisionModel, "image_embedding_steps", vision_must_not_run)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("<image>\n" + "lorem ipsum dolor sit amet " * 4000)
    lm, mm = converted("f32", "f32")
    err = one_line_error(cli("ocr", NOTE, "--model", lm, "--mmproj", mm, "--prompt-file", prompt),
                         f"tokens; the model's context is {N_CTX}")
    assert int(err.split("the prompt is ")[1].split()[0]) > N_CTX


# ---------------------------------------------------------------- sampling values (items 8, 12)

def test_top_p_zero_and_tiny_temperatures_are_greedy(engine):
    rng = np.random.default_rng(0)
    for params in (SamplingParams(temperature=0.8, top_p=0.0, seed=1, ngram_mode="off"),
                   SamplingParams(temperature=1e-320, top_k=5, seed=1, ngram_mode="off")):
        sampler = Sampler(params, engine.tokenizer, [])
        for _ in range(20):
            logits = rng.normal(scale=10, size=200)
            assert sampler(logits, []) == int(np.argmax(logits))


def test_cli_top_p_zero_decodes_as_temperature_zero(converted, cli):
    lm, mm = converted("f32", "f32")
    base = ("ocr", NOTE, "--model", lm, "--mmproj", mm, "--mode", "small", "--max-new-tokens", 6, "--json")
    runs = [cli(*base, *extra) for extra in (["--temperature", 0], ["--temperature", 0.9, "--top-p", 0, "--seed", 3])]
    assert all(rc == 0 for rc, _, _ in runs), runs
    greedy, top_p0 = (json.loads(out)["token_ids"] for _, out, _ in runs)
    assert len(greedy) == 6 and top_p0 == greedy


BAD_FLAGS = [("--max-new-tokens", "0"), ("--max-new-tokens", "-5"), ("--threads", "0"), ("--threads", "-2"),
             ("--temperature", "-0.1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "1.5"),
             ("--top-p", "-0.1"), ("--top-p", "nan"), ("--top-k", "-1"), ("--no-repeat-ngram-size", "-1"),
             ("--ngram-window", "-1")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_out_of_range_flags_are_refused_before_the_model_loads(cli, tmp_path, flag, value):
    """The range error comes before anything else: here the model path does not even exist."""
    one_line_error(cli("ocr", NOTE, "--model", tmp_path / "nope.gguf", flag, value), f"{flag} must be", value)


def test_out_of_range_values_from_config_and_environment_name_their_source(cli, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    nope = tmp_path / "nope.gguf"
    for line, needle in [("top_k = -3", "inference.top_k in"),
                         ('temperature = "warm"', "inference.temperature: Input should be a valid number (got 'warm')"),
                         ("threads = -1", "inference.threads in"), ("top_p = nan", "inference.top_p in")]:
        config.write_text(f"[inference]\n{line}\n")
        one_line_error(cli("ocr", NOTE, "--model", nope, "--config", config), needle, str(config))
    config.write_text("[inference]\nthreads = 0\n")        # the config's 0 means all cores
    one_line_error(cli("ocr", NOTE, "--model", nope, "--config", config), "no such model")
    monkeypatch.setenv("DSOCR_MAX_NEW_TOKENS", "0")
    one_line_error(cli("ocr", NOTE, "--model", nope, "--config", config), "DSOCR_MAX_NEW_TOKENS must be at least 1")


def test_sampling_ranges_are_checked_on_the_library_path(engine, monkeypatch):
    """What the server's request path reaches: prepare() refuses bad values by field name, before vision."""
    monkeypatch.setattr(engine.vision, "image_embedding_steps", vision_must_not_run)
    for field, value in [("temperature", math.nan), ("top_p", 2.0), ("max_new_tokens", 0), ("seed", -1),
                         ("ngram_mode", "sometimes")]:
        req = OcrRequest([read_note()], "Free OCR.", ViewConfig.from_mode("tiny"), SamplingParams(**{field: value}))
        with pytest.raises(InputError, match=f"^{field} must be"):
            engine.prepare(req, {})
    SamplingParams(temperature=0, top_p=0, top_k=0, no_repeat_ngram_size=0, ngram_window=0).validate()


# ---------------------------------------------------------------- output dir, PDF (items 12, 14)

def test_an_unwritable_output_dir_is_refused_before_the_model_loads(cli, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        one_line_error(cli("ocr", NOTE, "--model", tmp_path / "nope.gguf", "--output-dir", out),
                       f"--output-dir {out}: cannot write there")


def test_a_pdf_without_pages(cli, tmp_path):
    path = tmp_path / "empty.pdf"
    doc = pdfium.PdfDocument.new()
    doc.save(path)
    doc.close()
    with pytest.raises(InputError, match="the PDF has no pages"):
        list(render_pages(path))
    err = one_line_error(cli("ocr", path, "--model", tmp_path / "nope.gguf"), "the PDF has no pages")
    assert "PDFium" not in err
    # a page tree that counts a page it does not hold (same length: the xref offsets stay right)
    liar = tmp_path / "liar.pdf"
    liar.write_bytes(path.read_bytes().replace(b"/Count 0", b"/Count 1"))
    one_line_error(cli("ocr", liar, "--model", tmp_path / "nope.gguf"), "page 1 is not readable")
