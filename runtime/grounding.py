"""Grounding output: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` spans.

Coordinates are 0-999 over the original image (the reference maps them with x/999*W).
Parsing never evaluates the text and never raises: malformed boxes are skipped, unterminated
tags are dropped from the markdown. Clean markdown replaces `image` regions by links to
their crops and removes every other span, as the reference's save_results does.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SPAN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
# leftovers of spans that were cut or malformed: a ref with its label, a det with its boxes (both
# possibly unterminated at the end of the text), stray closing tags
ORPHANS = re.compile(r"<\|ref\|>.*?(?:<\|/ref\|>|$)|<\|det\|>.*?(?:<\|/det\|>|$)|<\|/ref\|>|<\|/det\|>|<\|grounding\|>",
                     re.DOTALL)


@dataclass
class Region:
    label: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)   # pixels, x1 < x2, y1 < y2
    span: str = ""


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
        boxes = [b for b in (to_pixels(g, width, height) for g in BOX.findall(m.group(2))) if b]
        regions.append(Region(m.group(1).strip(), boxes, m.group(0)))
    return regions


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


def draw_boxes(image: Image.Image, regions: list[Region]) -> Image.Image:
    """The page with each region's boxes outlined, lightly filled and labelled."""
    base = image.convert("RGB")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    draw = ImageDraw.Draw(base)
    font = ImageFont.load_default()
    for r in regions:
        color = _color(r.label)
        for x1, y1, x2, y2 in r.boxes:
            draw.rectangle([x1, y1, x2, y2], outline=color, width=4 if r.label == "title" else 2)
            fill.rectangle([x1, y1, x2, y2], fill=color + (28,))
            ty = max(0, y1 - 15)
            tb = draw.textbbox((x1, ty), r.label, font=font)
            draw.rectangle(tb, fill=(255, 255, 255))
            draw.text((x1, ty), r.label, font=font, fill=color)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def save_outputs(outdir: Path, image: Image.Image, raw_text: str) -> dict:
    """result.mmd (raw text), result.md (clean markdown), boxes.png, images/N.jpg crops."""
    outdir.mkdir(parents=True, exist_ok=True)
    regions = parse(raw_text, image.width, image.height)
    (outdir / "result.mmd").write_text(raw_text, encoding="utf-8")
    (outdir / "result.md").write_text(clean_markdown(raw_text, regions), encoding="utf-8")
    draw_boxes(image, regions).save(outdir / "boxes.png")
    crops = []
    n = 0
    for r in regions:
        if r.label != "image":
            continue
        for box in r.boxes:
            (outdir / "images").mkdir(exist_ok=True)
            path = outdir / "images" / f"{n}.jpg"
            image.convert("RGB").crop(box).save(path)
            crops.append(str(path))
            n += 1
    return {"regions": len(regions), "boxes": sum(len(r.boxes) for r in regions), "crops": crops}
