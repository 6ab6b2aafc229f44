"""Image -> normalised views and prompt layout, exactly as each model's reference code does it.

The projector type of the mmproj picks the Layout: DeepSeek-OCR (`deepseekocr`, its `infer`) or
DeepSeek-OCR 2 (`deepseekocr2`, its vLLM `image_process.py`). Both:
* EXIF transpose, RGB.
* Crop mode (gundam): tiles of the layout's side when a side of the image exceeds it, on the grid the
  reference picks (candidates w*h in [min_crops, max_crops] ordered as Python's sorted() leaves
  them; closest aspect ratio; on an exact tie the later candidate wins only if the image area exceeds
  half the grid's); the image is resized to the grid (bicubic, aspect not kept) and cut row-major; the
  global view is ImageOps.pad to base_size (aspect kept, bicubic, gray 127, offset rounded half to even).
* Without crop mode: an image_size no larger than a tile is resized straight to a square (aspect not
  kept), then padded: to image_size (v1), to base_size (v2, so its 768 square is scaled up to 1024).
* Pixels: x/255, (x - 0.5)/0.5 in float32, then rounded to bfloat16 as the reference does.
The token layout per view: v1 merges the tiles into one feature grid and ends each grid row with
image_newline; v2 keeps each view's rows as its encoder orders them, with no newline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dsocr.runtime.errors import InputError

PAD_COLOR = (127, 127, 127)          # tuple(int(0.5 * 255) for _ in range(3))
DEFAULT_MAX_PIXELS = 64_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # 16-bit PNG/TIFF/PGM samples (I: 32-bit signed)
# the raster formats Pillow may decode; others (EPS and PDF through Ghostscript, fonts, ...) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000")


@dataclass(frozen=True)
class Layout:
    """How one model cuts an image into views and lays their rows out, and its decoding recipe (its
    reference's constants)."""
    projector: str                # the mmproj's clip.projector_type
    model: str                    # its name in messages
    tile: int                     # tile side, and the size above which crop mode cuts tiles
    min_crops: int
    max_crops: int
    newlines: bool                # v1: tiles merged into one grid, image_newline after every grid row
    strip_prompt: bool            # v1's `plain` template strips the prompt; v2's vLLM path takes it as it is
    nocrop_pad_to_base: bool      # v2: without crop mode the image_size square is padded to base_size
    fixed_sizes: tuple[int, int] | None    # (base, tile) an encoder's learned tables fix (v2's query tables)
    modes: dict                   # name: (base_size, image_size, crop_mode)
    ngram_size: int               # its official n-gram blocking (over the last 90 tokens, <td> </td> exempt)


V1 = Layout("deepseekocr", "DeepSeek-OCR", tile=640, min_crops=2, max_crops=9, newlines=True, strip_prompt=True,
            nocrop_pad_to_base=False, fixed_sizes=None,
            modes={"tiny": (512, 512, False), "small": (640, 640, False), "base": (1024, 1024, False),
                   "large": (1280, 1280, False), "gundam": (1024, 640, True)},
            ngram_size=30)                                   # DeepSeek-OCR's vLLM recipe
V2 = Layout("deepseekocr2", "DeepSeek-OCR 2", tile=768, min_crops=2, max_crops=6, newlines=False, strip_prompt=False,
            nocrop_pad_to_base=True, fixed_sizes=(1024, 768),
            modes={"gundam": (1024, 768, True), "global": (1024, 768, False)},
            ngram_size=20)                                   # run_dpsk_ocr2_image.py
LAYOUTS = {layout.projector: layout for layout in (V1, V2)}
MODE_NAMES = tuple(dict.fromkeys(m for layout in LAYOUTS.values() for m in layout.modes))
DEFAULT_MODE = "gundam"


def check_mode_name(mode: str) -> None:
    """A mode some model has (which one runs is known once its mmproj is)."""
    if mode not in MODE_NAMES:
        raise InputError(f"unknown mode {mode!r}; choose one of: {modes_text()}")


def modes_text() -> str:
    return "; ".join(f"{', '.join(layout.modes)} ({layout.model})" for layout in LAYOUTS.values())


@dataclass
class ViewConfig:
    base_size: int = 1024
    image_size: int = 640
    crop_mode: bool = True
    layout: Layout = V1

    @classmethod
    def from_mode(cls, mode: str, layout: Layout = V1) -> ViewConfig:
        if mode not in layout.modes:
            raise InputError(f"unknown mode {mode!r} for {layout.model}; choose one of: {', '.join(layout.modes)}")
        return cls(*layout.modes[mode], layout=layout)

    def validate(self) -> None:
        for name, v in (("base size", self.base_size), ("image size", self.image_size)):
            if v < 16 or v % 16 or v > 4096:
                raise InputError(f"{name} {v} must be a multiple of 16 between 16 and 4096")
        tile = self.layout.tile
        if self.crop_mode and self.image_size != tile:
            raise InputError(f"crop mode cuts {tile}-px tiles: use --image-size {tile} with it")
        fixed = self.layout.fixed_sizes
        if fixed and (self.base_size, self.image_size) != fixed:
            raise InputError(f"{self.layout.model}'s encoder has learned queries for a {fixed[0]}-px global view "
                             f"and {fixed[1]}-px tiles only: --base-size {fixed[0]} --image-size {fixed[1]}")


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


def candidate_grids(min_num: int = V1.min_crops, max_num: int = V1.max_crops) -> list[tuple[int, int]]:
    """The reference's `sorted(set(...), key=w*h)`: the set's iteration order decides ties."""
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, layout: Layout = V1) -> tuple[int, int]:
    aspect, tile = width / height, layout.tile
    best, best_diff = (1, 1), float("inf")
    for w, h in candidate_grids(layout.min_crops, layout.max_crops):
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * w * h:
            best = (w, h)
    return best


def view_grid(width: int, height: int, cfg: ViewConfig) -> tuple[int, int]:
    """The (w_crops, h_crops) tile grid prepare_image cuts; (1, 1) is the global view alone."""
    if cfg.crop_mode and (width > cfg.layout.tile or height > cfg.layout.tile):
        return choose_grid(width, height, cfg.layout)
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


def global_size(cfg: ViewConfig) -> int:
    """The global view's side."""
    return cfg.base_size if cfg.crop_mode or cfg.layout.nocrop_pad_to_base else cfg.image_size


def image_token_count(cfg: ViewConfig, grid: tuple[int, int]) -> int:
    """The <image> tokens of one image: the global view's rows (+ a newline per row in v1), the
    separator, and the tiles' (v1: merged into one grid, a newline per grid row)."""
    nl = 1 if cfg.layout.newlines else 0
    qg = queries(global_size(cfg))
    n = (qg + nl) * qg + 1
    if grid[0] > 1 or grid[1] > 1:
        q = queries(cfg.image_size)
        n += (q * grid[0] + nl) * (q * grid[1])
    return n


def prepare_image(img: Image.Image, cfg: ViewConfig) -> PreparedImage:
    cfg.validate()
    size = img.size
    grid, tiles, tile = view_grid(img.width, img.height, cfg), [], cfg.layout.tile
    if cfg.crop_mode:
        if grid != (1, 1):
            resized = img.resize((tile * grid[0], tile * grid[1]))
            for k in range(grid[0] * grid[1]):
                x, y = (k % grid[0]) * tile, (k // grid[0]) * tile
                tiles.append(normalize(resized.crop((x, y, x + tile, y + tile))))
    elif cfg.image_size <= tile:
        img = img.resize((cfg.image_size, cfg.image_size))
    side = global_size(cfg)
    global_view = normalize(ImageOps.pad(img, (side, side), color=PAD_COLOR))
    return PreparedImage(global_view, tiles, grid, size, image_token_count(cfg, grid))


def build_prompt_ids(tokenizer, prompt: str, images: list[PreparedImage], layout: Layout,
                     image_token: str = "<image>") -> tuple[list[int], np.ndarray]:
    """bos + text pieces around `<image>` markers, each marker expanded to its image's token count.
    Returns (ids, is_image_position). The prompt is stripped where the layout's reference does."""
    return layout_prompt_ids(tokenizer, prompt, [img.n_tokens for img in images], layout, image_token)


def layout_prompt_ids(tokenizer, prompt: str, image_tokens: list[int], layout: Layout, image_token: str = "<image>"
                      ) -> tuple[list[int], np.ndarray]:
    """build_prompt_ids from the images' token counts alone (what the context check needs)."""
    pieces = (prompt.strip() if layout.strip_prompt else prompt).split(image_token)
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
