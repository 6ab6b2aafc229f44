"""What `dsocr batch` reads: the command line's inputs -> documents -> page units, the unit of work.

An input is a file (an image, a PDF, or a manifest: `.txt` with one path per line, `#` comments, or
`.jsonl` with a "path" per line), a folder (searched recursively for images and PDFs, hidden files and
folders skipped), or a glob. A manifest's relative paths are relative to its folder. A document's name,
which names its outputs and its records, is its path relative to the deepest folder holding every
input (the suffix kept: report.pdf and report.png of one folder stay apart, and no name is another's
page folder). Pages are counted without rendering; each is rendered when it is about to run.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dsocr.runtime.errors import InputError
from dsocr.runtime.pdf import is_pdf, open_pdf, parse_pages, render_document
from dsocr.runtime.preprocess import IMAGE_FORMATS, read_image_file

MANIFESTS = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    path: Path         # absolute, as found
    name: str          # relative to the inputs' common folder, "/"-separated, suffix kept
    pdf: bool
    pages: int         # 1 for an image; a PDF that cannot be opened counts 1, its record says why


@dataclass(frozen=True)
class PageUnit:
    document: Document
    page: int          # 1-based

    @property
    def key(self) -> tuple[str, int]:
        return self.document.name, self.page


def expand_inputs(inputs: list[str], exclude: Path | None = None) -> list[Document]:
    """The documents of `inputs`, each once, by name; files under `exclude` (the output folder) are
    never inputs."""
    if not inputs:
        raise InputError("no input given (dsocr batch FILE|FOLDER|GLOB|MANIFEST ... -o DIR)")
    files: list[Path] = []
    bases: list[Path] = []
    skip = exclude.resolve() if exclude is not None else None
    for spec in inputs:
        _expand(spec, Path.cwd(), files, bases, skip, manifest=None)
    unique = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    if not unique:
        raise InputError(f"no images or PDFs in {', '.join(inputs)}")
    root = Path(os.path.commonpath(bases))
    return sorted((_document(f, root) for f in unique.values()), key=lambda d: d.name)


def _document(path: Path, root: Path) -> Document:
    pdf = is_pdf(path)
    return Document(path, path.relative_to(root).as_posix(), pdf, pdf_page_count(path) if pdf else 1)


def page_units(documents: list[Document]) -> list[PageUnit]:
    return [PageUnit(d, page) for d in documents for page in range(1, d.pages + 1)]


def pdf_page_count(path: Path) -> int:
    try:
        doc = open_pdf(path)
    except InputError:
        return 1          # one unit stands for it; rendering it records why it is unreadable
    try:
        return max(len(doc), 1)
    finally:
        doc.close()


def _expand(spec: str, cwd: Path, files: list[Path], bases: list[Path], skip: Path | None,
            manifest: Path | None) -> None:
    path = Path(os.path.abspath(cwd / os.path.expanduser(spec)))
    where = f" (listed in {manifest})" if manifest else ""
    if path.is_dir():
        bases.append(path)
        files += _walk(path, skip)
    elif path.is_file():
        if path.suffix.lower() in MANIFESTS:       # its own folder is no base: its entries' are
            if manifest:
                raise InputError(f"{manifest}: lists another manifest, {spec}")
            for entry in manifest_entries(path):
                _expand(entry, path.parent, files, bases, skip, path)
        elif is_document(path, sniff=True):
            bases.append(path.parent)
            files += [] if _under(path, skip) else [path]
        else:
            raise InputError(f"{spec}{where}: not an image, a PDF or a manifest ({', '.join(MANIFESTS)})")
    elif glob.escape(spec) != spec:
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"{spec}{where}: no file matches")
        bases.append(Path(*_leading_plain_parts(path)))
        for m in matches:
            files += _walk(m, skip) if m.is_dir() else [m] if is_document(m) and not _under(m, skip) else []
    else:
        raise InputError(f"{spec}{where}: no such file or folder")


def _leading_plain_parts(pattern: Path) -> list[str]:
    parts = []
    for part in pattern.parts:
        if glob.escape(part) != part:
            break
        parts.append(part)
    return parts


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    if _under(folder, skip):
        return []
    found = []
    for top, dirs, names in os.walk(folder):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _under(here / d, skip))
        found += [here / n for n in sorted(names) if not n.startswith(".") and is_document(here / n)]
    return found


def is_document(path: Path, sniff: bool = False) -> bool:
    """An image or a PDF by its suffix; with `sniff` (a file named on the command line or in a manifest)
    also by its contents."""
    suffix = path.suffix.lower()
    if suffix == ".pdf" or Image.registered_extensions().get(suffix) in IMAGE_FORMATS:
        return True
    if not sniff:
        return False
    if is_pdf(path):
        return True
    try:
        with Image.open(path, formats=IMAGE_FORMATS):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):     # what Pillow raises on a non-image
        return False


def manifest_entries(path: Path) -> list[str]:
    """The paths a manifest lists, in order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the manifest ({e})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or (path.suffix.lower() == ".txt" and line.startswith("#")):
            continue
        if path.suffix.lower() == ".txt":
            entries.append(line)
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise InputError(f"{path} line {n}: not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
            raise InputError(f'{path} line {n}: no "path" string')
        entries.append(obj["path"])
    return entries


class PageImages:
    """Renders units one at a time, when asked, keeping the last PDF open for its next page (PDFium is
    not thread-safe: one PageImages per thread)."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.pdf_path: Path | None = None
        self.pdf = None

    def load(self, unit: PageUnit) -> Image.Image:
        doc = unit.document
        if not doc.pdf:
            return read_image_file(doc.path, self.max_pixels)
        if self.pdf_path != doc.path:
            self.close()
            self.pdf = open_pdf(doc.path, doc.name)
            self.pdf_path = doc.path
        pages = parse_pages(str(unit.page), len(self.pdf))
        return next(render_document(self.pdf, doc.name, pages, self.max_pixels))[1]

    def close(self) -> None:
        if self.pdf is not None:
            self.pdf.close()
        self.pdf = self.pdf_path = None
