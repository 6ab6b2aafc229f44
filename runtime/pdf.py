"""PDF pages as images (pypdfium2, 144 dpi) and page-range parsing ("1-3,7", 1-based)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from PIL import Image

from dsocr.runtime.errors import InputError

DPI = 144


def is_pdf(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".pdf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(5) == b"%PDF-"
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


def open_pdf(path: str | Path):
    import pypdfium2 as pdfium
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        # PDFium refuses a document with an empty page tree without naming an error ("PDFium: Success")
        if e.err_code == pdfium.raw.FPDF_ERR_SUCCESS:
            raise InputError(f"{path}: the PDF has no pages") from None
        raise InputError(f"{path}: not a readable PDF ({e})") from None


def render_pages(path: str | Path, spec: str | None = None, max_pixels: int = 64_000_000
                 ) -> Iterator[tuple[int, Image.Image]]:
    """(page number, RGB image) for the selected pages, in order."""
    import pypdfium2 as pdfium
    doc = open_pdf(path)
    try:
        for i in parse_pages(spec, len(doc)):
            try:
                page = doc[i]
                w, h = page.get_size()
            except pdfium.PdfiumError as e:   # a page tree that lists pages it does not hold
                raise InputError(f"{path}: page {i + 1} is not readable ({e})") from None
            if (w * DPI / 72) * (h * DPI / 72) > max_pixels:
                raise InputError(f"{path}: page {i + 1} renders over the {max_pixels:,}-pixel limit")
            yield i + 1, page.render(scale=DPI / 72).to_pil().convert("RGB")
    finally:
        doc.close()
