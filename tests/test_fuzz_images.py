"""Image decoding, the path the CLI and the server share (preprocess.load_image, then prepare_image):
every mode Pillow opens ends as a faithful 8-bit RGB image, and damaged files (truncated, bytes
changed) give an InputError or a valid image, never another exception, quickly and within the
pixel limit."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import PreparedImage, ViewConfig, load_image, prepare_image

# a gray gradient with structure in both directions, 8-bit; every other mode is derived from it
GRAY8 = ((np.arange(48)[:, None] * 5 + np.arange(64)[None, :] * 3) % 256).astype(np.uint8)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def loaded(data: bytes, max_pixels: int = 1_000_000) -> np.ndarray:
    img = load_image(io.BytesIO(data), max_pixels, label="fuzz")
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def gray_rgb() -> np.ndarray:
    return np.repeat(GRAY8[..., None], 3, axis=2).astype(int)


# ---------------------------------------------------------------- modes

@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("widen", ["x257", "shift8"])
def test_16_bit_gray_is_scaled_not_clipped(fmt, widen):
    """The same picture at 16 bits reads within 1 of its 8-bit version (convert("RGB") made 99 % white)."""
    v = GRAY8.astype(np.uint16)
    img = Image.fromarray(v * 257 if widen == "x257" else v << 8)
    assert img.mode == "I;16"
    assert np.abs(loaded(encoded(img, fmt)) - gray_rgb()).max() <= 1


def test_16_bit_big_endian_and_32_bit_int_tiffs():
    v = GRAY8.astype(np.uint16) * 257
    big = Image.fromarray(v.astype(">u2"))
    wide = Image.fromarray(v.astype(np.int32))
    assert (big.mode, wide.mode) == ("I;16B", "I")
    for img in (big, wide):
        data = encoded(img, "TIFF")
        assert Image.open(io.BytesIO(data)).mode == img.mode
        assert np.abs(loaded(data) - gray_rgb()).max() <= 1


@pytest.mark.parametrize("scale", [1 / 255, 1.0])
def test_float_tiffs(scale):
    """F samples in 0..1 (the usual float convention) or 0..255 both read as the 8-bit picture."""
    data = encoded(Image.fromarray(GRAY8.astype(np.float32) * np.float32(scale)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.abs(loaded(data) - gray_rgb()).max() <= 1


def test_alpha_is_flattened_on_white():
    """Transparent pixels read as white paper, not as the colour hidden under alpha 0 (often black)."""
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[10:20, 10:30] = (0, 0, 0, 255)                  # opaque black text
    rgba[30:40, 10:30] = (0, 0, 0, 128)                  # half-transparent black: mid gray
    out = loaded(encoded(Image.fromarray(rgba), "PNG"))
    assert (out[:5] == 255).all() and (out[10:20, 10:30] == 0).all()
    assert np.abs(out[30:40, 10:30] - 127).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert np.array_equal(loaded(encoded(la, "PNG")), out)


def test_palette_with_transparency():
    pal = Image.fromarray(GRAY8 // 64, "P")               # indices 0..3
    pal.putpalette([0, 0, 0, 80, 80, 80, 160, 160, 160, 240, 240, 240])
    data = encoded(pal, "PNG", transparency=0)           # index 0 (black) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = loaded(data)
    expect = np.array([255, 80, 160, 240])[GRAY8 // 64]
    assert np.array_equal(out, np.repeat(expect[..., None], 3, axis=2))


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "TIFF"), ("CMYK", "JPEG"),
                                       ("RGB", "PNG")])
def test_opaque_modes_convert_as_pillow_does(mode, fmt):
    img = Image.fromarray(GRAY8).convert(mode)
    data = encoded(img, fmt)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == mode
    assert np.array_equal(loaded(data), np.asarray(opened.convert("RGB")).astype(int))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says width x height (CRC fixed up)."""
    png = encoded(Image.fromarray(GRAY8), "PNG")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_formats_that_run_external_programs_are_not_opened():
    """Pillow's EPS plugin hands the file to Ghostscript; only raster formats are decoded."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InputError, match="not a readable image"):
        loaded(eps)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    """Headers claiming 25 and 900 Mpx on a few bytes of data: refused from the header alone, by our
    limit and by Pillow's decompression-bomb limit above it, each with its reason."""
    t = time.perf_counter()
    with pytest.raises(InputError, match="5000x5000 is over the 1,000,000-pixel limit"):
        loaded(png_claiming(5000, 5000))
    with pytest.raises(InputError, match=r"^fuzz: Image size \(900000000 pixels\) exceeds limit"):
        loaded(png_claiming(30000, 30000), max_pixels=10**12)
    assert time.perf_counter() - t < 0.5
    white = encoded(Image.new("L", (2000, 1000), 255), "PNG")   # a real one: 2 Mpx in ~2 KB
    with pytest.raises(InputError, match="pixel limit"):
        loaded(white)


# ---------------------------------------------------------------- fuzzing

def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.repeat(GRAY8[..., None], 3, axis=2)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))


SEEDS = {
    "png": encoded(_picture(), "PNG"),
    "jpeg": encoded(_picture(), "JPEG", quality=80),
    "gif": encoded(_picture(), "GIF"),
    "webp": encoded(_picture(), "WEBP", quality=80),
    "tiff": encoded(_picture(), "TIFF", compression="tiff_lzw"),
    "png16": encoded(Image.fromarray(GRAY8.astype(np.uint16) * 257), "PNG"),
}
VIEWS = [ViewConfig(64, 64, False), ViewConfig(64, 640, True)]
MAX_PIXELS = 1_000_000
FUZZ = settings(derandomize=True, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_decodes_or_refuses(data: bytes) -> None:
    """The property: InputError, or an RGB image within the limit whose views are valid."""
    t = time.perf_counter()
    try:
        img = load_image(io.BytesIO(data), MAX_PIXELS, label="fuzz")
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        event("refused")
    else:
        event("decoded")
        assert img.mode == "RGB" and 0 < img.width * img.height <= MAX_PIXELS
        for view in VIEWS:
            p = prepare_image(img, view)
            side = view.base_size if view.crop_mode else view.image_size
            assert isinstance(p, PreparedImage) and p.global_view.shape == (3, side, side)
            assert np.isfinite(p.global_view).all() and all(t.shape == (3, 640, 640) for t in p.tiles)
    assert time.perf_counter() - t < 2.0


def test_the_seeds_decode():
    for name, data in SEEDS.items():
        assert loaded(data).shape == (48, 64, 3), name


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_truncated_images(name, data):
    seed = SEEDS[name]
    check_decodes_or_refuses(seed[:data.draw(st.integers(0, len(seed) - 1), label="length")])


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_mutated_images(name, data):
    buf = bytearray(SEEDS[name])
    # most changes land in the headers (sizes, modes, chunk lengths), where parsers branch
    spans = st.one_of(st.integers(0, min(len(buf), 128) - 1), st.integers(0, len(buf) - 1))
    edits = data.draw(st.lists(st.tuples(spans, st.integers(0, 255)), min_size=1, max_size=8), label="edits")
    for i, b in edits:
        buf[i] = b
    check_decodes_or_refuses(bytes(buf))
