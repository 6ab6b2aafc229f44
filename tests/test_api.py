"""The Python API through its public surface only: `import dsocr`, dsocr.load(), Engine.ocr(),
Engine.ocr_pages(), the OcrResult they give, dsocr.PROMPTS and the exceptions."""
import importlib.metadata

import pypdfium2 as pdfium
import pytest
from PIL import Image

import dsocr

from conftest import TINY

NOTE = TINY / "images" / "small_note.png"        # 500x360
FAST = {"mode": "tiny", "max_new_tokens": 12}
PAGE_SIZES = [(500, 360), (360, 500), (300, 200)]


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-config") / "config.toml"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def engine(converted, empty_config):
    lm, mm = converted("f32", "f32")
    return dsocr.load(lm, mm, parallel=3, config=empty_config)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    """Three pages of different sizes (72 dpi: a pixel is a point, so each renders at twice its size)."""
    path = tmp_path_factory.mktemp("api-pdf") / "doc.pdf"
    src = Image.open(NOTE).convert("RGB")
    pages = [src, src.rotate(90, expand=True), src.resize(PAGE_SIZES[2])]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
    return path


def test_version_is_the_installed_distribution_s():
    assert dsocr.__version__ == importlib.metadata.version("dsocr")


def test_ocr_takes_a_pil_image_or_a_path(engine):
    by_path = engine.ocr(NOTE, **FAST)
    by_image = engine.ocr(Image.open(NOTE), **FAST)
    assert isinstance(by_path, dsocr.OcrResult)
    assert by_path.token_ids == by_image.token_ids and by_path.text == by_image.text
    assert 0 < by_path.completion_tokens == len(by_path.token_ids) <= 12
    assert by_path.finish_reason in ("stop", "length") and by_path.prompt_tokens > 12
    assert by_path.image_size == (500, 360) and by_path.page is None
    assert "<|ref|>" not in by_path.markdown and "<|det|>" not in by_path.markdown
    assert all(set(r) == {"label", "box", "model_box"} for r in by_path.regions)
    assert {"preprocess_s", "vision_s", "prefill_s", "decode_s"} <= set(by_path.timings)
    assert by_path.record()["token_ids"] == by_path.token_ids


def test_a_task_is_its_official_prompt(engine):
    free = engine.ocr(NOTE, task="free", **FAST)
    assert engine.ocr(NOTE, prompt=dsocr.PROMPTS["free"], **FAST).token_ids == free.token_ids
    # the default (the markdown prompt) is longer than "Free OCR."
    assert engine.ocr(NOTE, **FAST).prompt_tokens > free.prompt_tokens
    assert engine.ocr(NOTE, prompt="Free OCR.", **FAST).prompt_tokens == free.prompt_tokens   # <image> put first


def test_ocr_pages_gives_each_page_as_it_is_alone_in_page_order(engine, pdf):
    pages = list(engine.ocr_pages(pdf, **FAST))                  # the three decode together (parallel=3)
    assert [p.page for p in pages] == [1, 2, 3]
    assert [p.image_size for p in pages] == [(2 * w, 2 * h) for w, h in PAGE_SIZES]     # 144 dpi
    for p in pages:
        [alone] = engine.ocr_pages(pdf, pages=str(p.page), **FAST)
        assert alone.page == p.page and alone.token_ids == p.token_ids
    # a page through ocr(): PDFium's rendering at 144 dpi, the same image ocr_pages read
    doc = pdfium.PdfDocument(str(pdf))
    rendered = doc[1].render(scale=2).to_pil()
    assert engine.ocr(rendered, **FAST).token_ids == pages[1].token_ids
    doc.close()
    assert [p.page for p in engine.ocr_pages(pdf, pages="3,1-2", **FAST)] == [3, 1, 2]


def test_load_without_a_model_uses_the_configured_one(converted, tmp_path, engine):
    lm, mm = converted("f32", "f32")
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\nmodel = "{lm}"\nmmproj = "{mm}"\n')
    configured = dsocr.load(config=config)
    assert (configured.lm_path, configured.mmproj_path) == (lm, mm)
    assert configured.ocr(NOTE, **FAST).token_ids == engine.ocr(NOTE, **FAST).token_ids


def test_bad_input_is_an_input_error_in_one_line(engine, pdf, tmp_path, converted, empty_config):
    def refused(call, error, needle):
        with pytest.raises(error, match=needle) as e:
            call()
        assert "\n" not in str(e.value)

    refused(lambda: engine.ocr(tmp_path / "missing.png"), dsocr.InputError, "missing.png: no such file")
    refused(lambda: engine.ocr(pdf), dsocr.InputError, "a PDF; ocr_pages")
    refused(lambda: list(engine.ocr_pages(tmp_path / "missing.pdf")), dsocr.InputError, "no such file")
    refused(lambda: list(engine.ocr_pages(NOTE)), dsocr.InputError, "not a readable PDF")
    refused(lambda: list(engine.ocr_pages(pdf, pages="4")), dsocr.InputError, "outside 1-3")
    refused(lambda: engine.ocr(NOTE, task="poem"), dsocr.InputError, "unknown task 'poem'")
    refused(lambda: engine.ocr(NOTE, task="free", prompt="Free OCR."), dsocr.InputError, "not both")
    refused(lambda: engine.ocr(NOTE, mode="huge"), dsocr.InputError, "unknown mode 'huge'")
    refused(lambda: engine.ocr(NOTE, max_new_tokens=0), dsocr.InputError, "max_new_tokens must be")
    refused(lambda: engine.ocr(NOTE, temprature=0.5), TypeError, "temprature")
    refused(lambda: engine.ocr(b"\x89PNG"), TypeError, "PIL image or a file's path")
    lm, mm = converted("f32", "f32")
    refused(lambda: dsocr.load(tmp_path / "nope.gguf", config=empty_config), dsocr.ModelError, "no such model")
    refused(lambda: dsocr.load(lm, mm, config=tmp_path / "absent.toml"), dsocr.InputError, "no such config file")
    refused(lambda: dsocr.load(lm, mm, parallel=0, config=empty_config), dsocr.InputError, "parallel")
