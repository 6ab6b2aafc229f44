"""PDF pages as images (pypdfium2, 144 dpi) and page-range parsing ("1-3,7", 1-based).

A PDF is opened from a file (the CLI) or from its bytes (the server); both render through
`render_document`. PDFium is not thread-safe: one thread at a time may use it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

from PIL import Image

from dsocr.runtime.errors import InputError

DPI = 144
PAGE_SEPARATOR = "\n\n"          # between the texts of a PDF's pages, where they are joined


def page_heading(number: int) -> str:
    """What precedes page `number` (1-based) of a PDF where its pages' texts are shown together."""
    return f"<!-- page {number} -->\n"


def is_pdf_data(head: bytes) -> bool:
    """Whether bytes (a file's first ones will do) are a PDF's: they begin with its header."""
    return head[:5] == b"%PDF-"


def is_pdf(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".pdf":
        return True
    try:
        with open(p, "rb") as f:
            return is_pdf_data(f.read(5))
    except OSError:
        return False


def parse_pages(spec: str | None, n_pages: int) -> list[int]:
    """'1-3,7' -> [0, 1, 2, 6]; None -> every page. Pages are 1-based in the spec."""
    if n_pages == 0:
        raise InputError("the PDF has no pages")
    if not spec:
        return list(range(n_pages))
    pages: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b) if b.strip() else None    # "3-": to the last page
            else:
                lo = hi = int(part)
        except ValueError:
            raise InputError(f"bad page range {spec!r} (use e.g. 1-3,7)") from None
        if hi is not None and hi < lo:
            raise InputError(f"page range {part!r} is reversed (write {hi}-{lo})")
        hi = n_pages if hi is None else hi
        if lo < 1 or hi < lo or hi > n_pages:
            raise InputError(f"page range {part!r} is outside 1-{n_pages}")
        pages += [p for p in range(lo - 1, hi) if p not in pages]
    return pages


def open_pdf(source: str | Path | bytes, label: str | None = None):
    """A PDFium document from a file's path or a PDF's bytes; `label` names it in errors (default: the path)."""
    import pypdfium2 as pdfium
    label = label or ("the PDF" if isinstance(source, bytes) else str(source))
    try:
        return pdfium.PdfDocument(source if isinstance(source, bytes) else str(source))
    except pdfium.PdfiumError as e:
        # PDFium refuses a document with an empty page tree without naming an error ("PDFium: Success")
        if e.err_code == pdfium.raw.FPDF_ERR_SUCCESS:
            raise InputError(f"{label}: the PDF has no pages") from None
        raise InputError(f"{label}: not a readable PDF ({e})") from None


def render_document(doc, label: str, pages: list[int], max_pixels: int) -> Iterator[tuple[int, Image.Image]]:
    """(page number, RGB image) for `pages` (0-based) of an open document, in order; a page that would
    render over `max_pixels` is refused before it renders."""
    import pypdfium2 as pdfium
    for i in pages:
        try:
            page = doc[i]
            w, h = page.get_size()
            if math.ceil(w * DPI / 72) * math.ceil(h * DPI / 72) > max_pixels:     # the size render() makes
                raise InputError(f"{label}: page {i + 1} renders over the {max_pixels:,}-pixel limit")
            image = page.render(scale=DPI / 72).to_pil().convert("RGB")
        except pdfium.PdfiumError as e:   # a page tree that lists pages it does not hold, a page of no area
            raise InputError(f"{label}: page {i + 1} is not readable ({e})") from None
        yield i + 1, image


def render_pages(path: str | Path, spec: str | None = None, max_pixels: int = 64_000_000
                 ) -> Iterator[tuple[int, Image.Image]]:
    """(page number, RGB image) for the selected pages of the PDF file at `path`, in order."""
    doc = open_pdf(path)
    try:
        yield from render_document(doc, str(path), parse_pages(spec, len(doc)), max_pixels)
    finally:
        doc.close()
