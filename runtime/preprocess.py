"""Image -> normalised views and prompt layout, exactly as DeepSeek-OCR's reference `infer` does it.

* EXIF transpose, RGB.
* Crop mode (gundam): 640-px tiles when a side exceeds 640, on the grid the reference picks
  (candidates w*h in [2, 9] ordered as Python's sorted() leaves them; closest aspect ratio;
  on an exact tie the later candidate wins only if the image area exceeds half the grid's);
  the global view is ImageOps.pad to base_size (aspect kept, bicubic, gray 127).
* Without crop mode: image_size <= 640 is resized straight to a square (aspect not kept),
  larger sizes are padded like the global view.
* Pixels: x/255, (x - 0.5)/0.5 in float32, then rounded to bfloat16 as the reference does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dsocr.runtime.errors import InputError

TILE = 640
PAD_COLOR = (127, 127, 127)          # tuple(int(0.5 * 255) for _ in range(3))
DEFAULT_MAX_PIXELS = 64_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # 16-bit PNG/TIFF/PGM samples (I: 32-bit signed)
# the raster formats Pillow may decode; others (EPS and PDF through Ghostscript, fonts, ...) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000")

MODES = {                            # name: (base_size, image_size, crop_mode)
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}


@dataclass
class ViewConfig:
    base_size: int = 1024
    image_size: int = 640
    crop_mode: bool = True

    @classmethod
    def from_mode(cls, mode: str) -> ViewConfig:
        try:
            return cls(*MODES[mode])
        except KeyError:
            raise InputError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}") from None

    def validate(self) -> None:
        for name, v in (("base size", self.base_size), ("image size", self.image_size)):
            if v < 16 or v % 16 or v > 4096:
                raise InputError(f"{name} {v} must be a multiple of 16 between 16 and 4096")
        if self.crop_mode and self.image_size != TILE:
            raise InputError(f"crop mode cuts {TILE}-px tiles: use --image-size {TILE} with it")


@dataclass
class PreparedImage:
    """One image's views (float32 [3, S, S], bf16-rounded) and its place in the prompt."""
    global_view: np.ndarray
    tiles: list[np.ndarray] = field(default_factory=list)
    grid: tuple[int, int] = (1, 1)          # (w_crops, h_crops)
    size: tuple[int, int] = (0, 0)          # original (width, height) after EXIF transpose
    n_tokens: int = 0


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, label: str | None = None) -> Image.Image:
    """Open an image file (or file-like / PIL image) as RGB with EXIF orientation applied;
    `label` names it in error messages (default: its file name)."""
    if isinstance(source, Image.Image):
        img = source
    else:
        name = label or getattr(source, "name", source)
        try:
            img = Image.open(source, formats=IMAGE_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"{name}: {w}x{h} is over the {max_pixels:,}-pixel limit (raise --max-pixels to allow it)")
            img.load()
        except InputError:
            raise
        except Image.DecompressionBombError as e:   # Pillow's own limit, above any --max-pixels
            raise InputError(f"{name}: {e}") from None
        except UnidentifiedImageError as e:
            raise InputError(f"{name}: not a readable image ({type(e).__name__})") from None
        except FileNotFoundError:
            raise InputError(f"{name}: no such file") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{name}: corrupt or unreadable image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise InputError("the image has zero size")
    if img.width * img.height > max_pixels:
        raise InputError(f"{img.width}x{img.height} is over the {max_pixels:,}-pixel limit")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: keep the pixels, as the reference does
        pass
    try:
        return to_rgb(img)
    except ValueError as e:     # a mode Pillow reads but cannot convert (e.g. La)
        raise InputError(f"image mode {img.mode} is not supported ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode Pillow opens -> 8-bit RGB. convert("RGB") alone clips 16-bit samples (a 16-bit gray
    page turns white) and drops alpha (a transparent page's hidden colour, often black, shows), so:
    16-bit samples are scaled to 8 bits, float samples read as 0..1 when they fit there (else 0..255,
    as convert() takes them), and transparency is flattened onto white."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = img.convert("I").point(lambda v: v / 257)
    elif img.mode == "F" and img.getextrema()[1] <= 1.0:
        img = img.point(lambda v: v * 255)
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def candidate_grids(min_num: int = 2, max_num: int = 9) -> list[tuple[int, int]]:
    """The reference's `sorted(set(...), key=w*h)`: the set's iteration order decides ties."""
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, tile: int = TILE) -> tuple[int, int]:
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for w, h in candidate_grids():
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * w * h:
            best = (w, h)
    return best


def view_grid(width: int, height: int, cfg: ViewConfig) -> tuple[int, int]:
    """The (w_crops, h_crops) tile grid prepare_image cuts; (1, 1) is the global view alone."""
    if cfg.crop_mode and (width > TILE or height > TILE):
        return choose_grid(width, height)
    return (1, 1)


def normalize(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 [3, H, W]: ((x/255) - 0.5)/0.5, rounded to bfloat16."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    u = x.view(np.uint32)
    u = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16) << 16
    return np.ascontiguousarray(u.view(np.float32).transpose(2, 0, 1))


def queries(size: int) -> int:
    """Feature-grid side after SAM's 16-px patches and 4x downsampling."""
    return math.ceil((size // 16) / 4)


def image_token_count(cfg: ViewConfig, grid: tuple[int, int]) -> int:
    if cfg.crop_mode:
        qb, q = queries(cfg.base_size), queries(cfg.image_size)
        n = (qb + 1) * qb + 1
        if grid[0] > 1 or grid[1] > 1:
            n += (q * grid[0] + 1) * (q * grid[1])
        return n
    q = queries(cfg.image_size)
    return (q + 1) * q + 1


def prepare_image(img: Image.Image, cfg: ViewConfig) -> PreparedImage:
    cfg.validate()
    size = img.size
    grid, tiles = view_grid(img.width, img.height, cfg), []
    if cfg.crop_mode:
        if grid != (1, 1):
            resized = img.resize((TILE * grid[0], TILE * grid[1]))
            for k in range(grid[0] * grid[1]):
                x, y = (k % grid[0]) * TILE, (k // grid[0]) * TILE
                tiles.append(normalize(resized.crop((x, y, x + TILE, y + TILE))))
        global_view = normalize(ImageOps.pad(img, (cfg.base_size, cfg.base_size), color=PAD_COLOR))
    else:
        if cfg.image_size <= TILE:
            img = img.resize((cfg.image_size, cfg.image_size))
        global_view = normalize(ImageOps.pad(img, (cfg.image_size, cfg.image_size), color=PAD_COLOR))
    return PreparedImage(global_view, tiles, grid, size, image_token_count(cfg, grid))


def build_prompt_ids(tokenizer, prompt: str, images: list[PreparedImage], image_token: str = "<image>") -> tuple[list[int], np.ndarray]:
    """bos + text pieces around `<image>` markers, each marker expanded to its image's token count.
    Returns (ids, is_image_position). The prompt is stripped, as the `plain` template does."""
    return layout_prompt_ids(tokenizer, prompt, [img.n_tokens for img in images], image_token)


def layout_prompt_ids(tokenizer, prompt: str, image_tokens: list[int], image_token: str = "<image>"
                      ) -> tuple[list[int], np.ndarray]:
    """build_prompt_ids from the images' token counts alone (what the context check needs)."""
    pieces = prompt.strip().split(image_token)
    if len(pieces) - 1 != len(image_tokens):
        raise InputError(f"the prompt has {len(pieces) - 1} {image_token} marker(s) for {len(image_tokens)} image(s)")
    image_id = tokenizer.token_id(image_token)
    ids, mask = [tokenizer.bos_id], [False]
    for i, piece in enumerate(pieces):
        t = tokenizer.encode(piece)
        ids += t
        mask += [False] * len(t)
        if i < len(image_tokens):
            ids += [image_id] * image_tokens[i]
            mask += [True] * image_tokens[i]
    return ids, np.array(mask)


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    return load_image(path, max_pixels)
