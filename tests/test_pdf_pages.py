"""PDF pages are rendered as they are needed, not all before page 1 starts (a page is ≈ 7 MB of pixels
at 144 dpi; a 500-page book was 3.5 GB): PdfPages checks every page when opened and renders one per
step of its iteration; `dsocr ocr` and Engine.ocr_pages keep `parallel` pages submitted, so those
decode together, and render page i + parallel only once page i is done."""
import json

import pypdfium2 as pdfium
import pytest
from PIL import Image

import dsocr
from dsocr.cli.main import main
from dsocr.runtime import scheduler
from dsocr.runtime.errors import InputError
from dsocr.runtime.pdf import PdfPages, render_pages

from conftest import TINY

NOTE = TINY / "images" / "small_note.png"


def write_pdf(path, sizes):
    """A PDF of pages of these pixel sizes at 72 dpi (each renders at twice its size)."""
    src = Image.open(NOTE).convert("RGB")
    pages = [src.resize(size) for size in sizes]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
    return path


@pytest.fixture
def events(monkeypatch):
    """What happens, in order: "render" as PDFium renders a page, "end" as a sequence of a scheduler ends."""
    seen = []
    render, end = pdfium.PdfPage.render, scheduler.Scheduler._end
    monkeypatch.setattr(pdfium.PdfPage, "render", lambda page, *a, **k: (seen.append("render"),
                                                                          render(page, *a, **k))[1])
    monkeypatch.setattr(scheduler.Scheduler, "_end", lambda self, seq, reason=None: (seen.append("end"),
                                                                                     end(self, seq, reason))[1])
    return seen


def assert_rendered_only_when_needed(events, parallel):
    """The k-th page renders only once k - parallel pages have ended."""
    renders = ends = 0
    for e in events:
        if e == "render":
            renders += 1
            assert renders - ends <= parallel, events
        else:
            ends += 1


def test_pdf_pages_checks_every_page_then_renders_one_per_step(tmp_path, events):
    pdf = write_pdf(tmp_path / "doc.pdf", [(300, 200)] * 5)
    with PdfPages(pdf, "2-4") as pages:
        assert len(pages) == 3 and events == []
        it = iter(pages)
        assert [next(it)[0], next(it)[0]] == [2, 3] and events == ["render"] * 2
    it = render_pages(pdf)
    assert next(it)[1].size == (600, 400) and events == ["render"] * 3
    it.close()


def test_a_bad_page_is_refused_before_any_page_renders(tmp_path, events):
    pdf = write_pdf(tmp_path / "doc.pdf", [(300, 200), (300, 200), (2000, 2000)])    # page 3: 4000x4000
    with pytest.raises(InputError, match="page 3 renders over the 10,000,000-pixel limit"):
        next(render_pages(pdf, None, 10_000_000))
    assert events == []
    with PdfPages(pdf, "1-2", 10_000_000) as pages:     # the pages not asked for are not checked
        assert [n for n, _ in pages] == [1, 2]


def test_dsocr_ocr_renders_a_page_once_the_one_parallel_before_it_is_done(converted, tmp_path, monkeypatch,
                                                                          capsys, events):
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    pdf = write_pdf(tmp_path / "doc.pdf", [(500, 360), (360, 500), (300, 200), (200, 300), (400, 400)])
    lm, mm = converted("f32", "f32")
    sizes, step = [], scheduler.Scheduler._decode_step
    monkeypatch.setattr(scheduler.Scheduler, "_decode_step", lambda self, seqs: (sizes.append(len(seqs)),
                                                                                 step(self, seqs)))
    args = ["ocr", str(pdf), "--model", str(lm), "--mmproj", str(mm), "--mode", "tiny", "-n", "40", "-q",
            "--parallel", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert [text.index(f"<!-- page {n} -->") for n in range(1, 6)] == sorted(text.index(f"<!-- page {n} -->")
                                                                            for n in range(1, 6))
    assert events.count("render") == 5 and max(sizes) == 2
    assert_rendered_only_when_needed(events, 2)
    events.clear()
    assert main(args + ["--json", "--pages", "5,1"]) == 0
    assert [p["page"] for p in json.loads(capsys.readouterr().out)["pages"]] == [5, 1]
    assert_rendered_only_when_needed(events, 2)


def test_ocr_pages_renders_as_needed_and_stopping_cancels_the_rest(converted, tmp_path, events):
    lm, mm = converted("f32", "f32")
    (tmp_path / "config.toml").write_text("")
    engine = dsocr.load(lm, mm, parallel=2, config=tmp_path / "config.toml")
    pdf = write_pdf(tmp_path / "doc.pdf", [(500, 360), (360, 500), (300, 200), (200, 300)])
    assert [p.page for p in engine.ocr_pages(pdf, mode="tiny", max_new_tokens=8)] == [1, 2, 3, 4]
    assert events.count("render") == 4
    assert_rendered_only_when_needed(events, 2)
    events.clear()
    pages = engine.ocr_pages(pdf, mode="tiny", max_new_tokens=8)
    first = next(pages)
    assert first.page == 1 and events.count("render") == 2
    running = engine.ocr_engine.scheduler.slots[0]          # page 2, decoding or admitted
    pages.close()
    assert events.count("render") == 2 and running.result.finish_reason == "cancelled"
    assert engine.ocr_engine.scheduler.idle
