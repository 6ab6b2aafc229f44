"""Grounding output: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` spans.

Coordinates are 0-999 over the original image (the reference maps them with x/999*W).
Parsing never evaluates the text and never raises: malformed boxes are skipped, unterminated
tags are dropped from the markdown. Clean markdown replaces `image` regions by links to
their crops and removes every other span, as the reference's save_results does.

boxes.png labels are sized with the page (a fixed bitmap font is unreadable on a 300-dpi scan)
and moved along and into their box until they overlap no earlier label.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPAN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
# leftovers of spans that were cut or malformed: a ref with its label, a det with its boxes (both
# possibly unterminated at the end of the text), stray closing tags
ORPHANS = re.compile(r"<\|ref\|>.*?(?:<\|/ref\|>|$)|<\|det\|>.*?(?:<\|/det\|>|$)|<\|/ref\|>|<\|/det\|>|<\|grounding\|>",
                     re.DOTALL)
MIN_LABEL_PX = 12
LABEL_PX_PER_PAGE_PX = 1 / 80    # of the page's longer side: ~40 px (10 pt) on a 300-dpi A4 scan
LABEL_STEPS = 16                 # spots tried per row and rows per box, so a page of repeats stays quick


@dataclass
class Region:
    label: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)   # pixels, x1 < x2, y1 < y2
    span: str = ""
    model_boxes: list[list[float]] = field(default_factory=list)   # the same boxes as written, 0-999

    def records(self) -> list[dict]:
        """One {label, box, model_box} per box, for JSON output."""
        return [{"label": self.label, "box": list(px), "model_box": raw}
                for px, raw in zip(self.boxes, self.model_boxes)]


def to_pixels(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 999.0) for v in box)
    px = (int(x1 / 999 * width), int(y1 / 999 * height), int(x2 / 999 * width), int(y2 / 999 * height))
    x1, y1, x2, y2 = px
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def parse(text: str, width: int, height: int) -> list[Region]:
    regions = []
    for m in SPAN.finditer(text):
        pairs = [(to_pixels(g, width, height), [_number(v) for v in g]) for g in BOX.findall(m.group(2))]
        regions.append(Region(m.group(1).strip(), [px for px, _ in pairs if px], m.group(0),
                              [raw for px, raw in pairs if px]))
    return regions


def _number(v: str) -> float | int:
    return float(v) if "." in v else int(v)


def clean_markdown(text: str, regions: list[Region]) -> str:
    """Image regions become ![](images/N.jpg) links (numbered like their crops); the rest go."""
    out, n = text, 0
    for r in regions:
        if r.label == "image" and r.boxes:
            links = "".join(f"![](images/{n + i}.jpg)\n" for i in range(len(r.boxes)))
            n += len(r.boxes)
            out = out.replace(r.span, links, 1)
        else:
            out = out.replace(r.span, "", 1)
    out = ORPHANS.sub("", out)
    return out.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:").strip() + "\n"


def _color(label: str) -> tuple[int, int, int]:
    h = hashlib.md5(label.encode()).digest()
    return (h[0] % 200, h[1] % 200, 55 + h[2] % 200)


def label_px(size: tuple[int, int]) -> int:
    """The label font's size in pixels for a page of `size`: it grows with the page."""
    return max(MIN_LABEL_PX, round(max(size) * LABEL_PX_PER_PAGE_PX))


def place_labels(regions: list[Region], font, size: tuple[int, int]) -> list[tuple[str, tuple[int, int], tuple]]:
    """(label, text origin, background rectangle) per box. Each label takes the first spot whose
    background overlaps no earlier label: along the box's top edge just above it, left to right,
    then row by row down inside the box (a bounded search; if all are taken, the first spot)."""
    width, height = size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    taken = np.empty((0, 4), np.int64)
    placed = []
    for r in regions:
        left, top, right, bottom = measure.textbbox((0, 0), r.label, font=font)
        pad = max(2, (bottom - top) // 5)        # white around the letters, so neighbours read apart
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        for x1, y1, x2, y2 in r.boxes:
            xs = np.clip(np.arange(x1, max(x1, x2 - w) + 1, w)[:LABEL_STEPS], 0, max(width - w, 0))
            ys = np.r_[max(y1 - h, 0), np.arange(y1, max(y1, min(y2, height) - h) + 1, h)[:LABEL_STEPS]]
            spots = np.array([(x, y, x + w, y + h) for y in ys for x in xs], np.int64)
            clash = ((spots[:, None, 0] < taken[None, :, 2]) & (taken[None, :, 0] < spots[:, None, 2]) &
                     (spots[:, None, 1] < taken[None, :, 3]) & (taken[None, :, 1] < spots[:, None, 3])).any(axis=1)
            rect = spots[int(np.argmin(clash))]          # the first free spot, else the first
            taken = np.vstack([taken, rect])
            placed.append((r.label, (int(rect[0]) + pad - left, int(rect[1]) + pad - top),
                           tuple(int(v) for v in rect)))
    return placed


def draw_boxes(image: Image.Image, regions: list[Region]) -> Image.Image:
    """The page with each region's boxes outlined, lightly filled and labelled."""
    base = image.convert("RGB")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    draw = ImageDraw.Draw(base)
    px = label_px(base.size)
    font = ImageFont.load_default(size=px)      # Pillow's own font: no font files needed
    line = max(2, px // 10)
    for r in regions:
        color = _color(r.label)
        for x1, y1, x2, y2 in r.boxes:
            draw.rectangle([x1, y1, x2, y2], outline=color, width=2 * line if r.label == "title" else line)
            fill.rectangle([x1, y1, x2, y2], fill=color + (28,))
    page = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(page)
    for label, origin, rect in place_labels(regions, font, page.size):
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=(255, 255, 255))   # corners inclusive
        draw.text(origin, label, font=font, fill=_color(label))
    return page


def output_files(image: Image.Image, raw_text: str) -> dict[str, bytes]:
    """One page's result files by their path in its folder: result.mmd (raw text), result.md (clean
    markdown), boxes.png, images/N.jpg crops. As bytes, so that whoever writes them (`dsocr batch`'s
    output folder) needs neither the page nor the model."""
    regions = parse(raw_text, image.width, image.height)
    files = {"result.mmd": raw_text.encode("utf-8"), "result.md": clean_markdown(raw_text, regions).encode("utf-8"),
             "boxes.png": _encoded(draw_boxes(image, regions), "PNG")}
    crops = [box for r in regions if r.label == "image" for box in r.boxes]
    rgb = image.convert("RGB") if crops else None
    for n, box in enumerate(crops):
        files[f"images/{n}.jpg"] = _encoded(rgb.crop(box), "JPEG")
    return files


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def save_outputs(outdir: Path, image: Image.Image, raw_text: str) -> list[Path]:
    """output_files written into `outdir`; returns the files written."""
    written = []
    for name, data in output_files(image, raw_text).items():
        written.append(outdir / name)
        written[-1].parent.mkdir(parents=True, exist_ok=True)
        written[-1].write_bytes(data)
    return written
