"""PDF pages as images (pypdfium2, 144 dpi) and page-range parsing ("1-3,7", 1-based).

A PDF is opened from a file (the CLI, the Python API) or from its bytes (the server); both render
through `render_document`, one page at a time as the caller asks for it: a page is ≈ 7 MB of pixels at
144 dpi, so a 500-page book is never held whole. PDFium is not thread-safe: one thread at a time may use it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

from PIL import Image

from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import DEFAULT_MAX_PIXELS

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
    # PDFium refuses a document with an empty page tree without setting its last error, which keeps
    # whatever an earlier call left: a failed open of a path that cannot exist leaves FPDF_ERR_FILE,
    # which nothing below can set (the file goes in as a Python file object, the bytes as memory)
    pdfium.raw.FPDF_LoadDocument(b"/nonexistent/dsocr-probe.pdf", None)
    try:
        return pdfium.PdfDocument(source if isinstance(source, bytes) else open(source, "rb"), autoclose=True)
    except pdfium.PdfiumError as e:
        if e.err_code == pdfium.raw.FPDF_ERR_FILE:
            raise InputError(f"{label}: the PDF has no pages") from None
        raise InputError(f"{label}: not a readable PDF ({e})") from None
    except OSError as e:
        raise InputError(f"{label}: cannot read it ({e.strerror or e})") from None


def checked_page(doc, label: str, i: int, max_pixels: int):
    """Page `i` (0-based) of an open document, refused (InputError) when PDFium cannot read it or it would
    render over `max_pixels`; nothing is rendered. The caller closes it."""
    import pypdfium2 as pdfium
    try:
        page = doc[i]
        w, h = page.get_size()
    except pdfium.PdfiumError as e:   # a page tree that lists pages it does not hold
        raise InputError(f"{label}: page {i + 1} is not readable ({e})") from None
    if math.ceil(w * DPI / 72) * math.ceil(h * DPI / 72) > max_pixels:     # the size render() makes
        page.close()
        raise InputError(f"{label}: page {i + 1} renders over the {max_pixels:,}-pixel limit")
    return page


def render_document(doc, label: str, pages: list[int], max_pixels: int) -> Iterator[tuple[int, Image.Image]]:
    """(page number, RGB image) for `pages` (0-based) of an open document, in order, each rendered when
    the caller asks for it; a page that would render over `max_pixels` is refused before it renders."""
    import pypdfium2 as pdfium
    for i in pages:
        page = checked_page(doc, label, i, max_pixels)
        try:
            image = page.render(scale=DPI / 72).to_pil().convert("RGB")
        except pdfium.PdfiumError as e:   # a page of no area
            raise InputError(f"{label}: page {i + 1} is not readable ({e})") from None
        finally:
            page.close()
        yield i + 1, image


class PdfPages:
    """The pages `spec` selects ("1-3,7", None: all) of the PDF file at `path`. Opening checks each of
    them (readable, under `max_pixels`) without rendering it, so a bad page or range is refused before
    any work; iterating renders them, in order, one as each is asked for: (page number, RGB image).
    Close it (or use `with`) when done."""

    def __init__(self, path: str | Path, spec: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        self.label, self.max_pixels = str(path), max_pixels
        self.doc = open_pdf(path)
        try:
            self.indices = parse_pages(spec, len(self.doc))
            for i in self.indices:
                checked_page(self.doc, self.label, i, max_pixels).close()
        except BaseException:
            self.doc.close()
            raise

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, Image.Image]]:
        return render_document(self.doc, self.label, self.indices, self.max_pixels)

    def close(self) -> None:
        self.doc.close()

    def __enter__(self) -> PdfPages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_pages(path: str | Path, spec: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> Iterator[tuple[int, Image.Image]]:
    """(page number, RGB image) for the selected pages of the PDF file at `path`, in order, each rendered
    as it is asked for (PdfPages, closed at the end)."""
    with PdfPages(path, spec, max_pixels) as pdf:
        yield from pdf
