"""Image decoding: per-call pixel limits without touching Pillow's process-global bomb guard, and bombs rejected from
their header, before any pixel is decoded."""

from __future__ import annotations

import io
import random
import struct
import sys
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from components.data import images
from components.data.images import (
    DataError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    decode_mask,
    image_size,
)

PILLOW_DEFAULT = Image.MAX_IMAGE_PIXELS  # about 89.5 M; Image.open raises above twice that


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_claiming(w: int, h: int, idat: bytes | None = None, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose header says w x h; its IDAT is whatever we pass (a few bytes by default)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real 16x16 JPEG whose SOF0 header is rewritten to say w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def webp_claiming(w: int, h: int) -> bytes:
    """A WebP (VP8X) header whose canvas is w x h."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def real_png(w: int, h: int, seed: int = 0) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_formats_decode_to_float_rgb():
    arr = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        out = decode_image(buf.getvalue(), name=f"x.{fmt.lower()}")
        assert out.shape == (30, 40, 3) and out.dtype == np.float32, fmt
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert decode_mask(images.encode_mask_png(np.eye(8, dtype=np.uint8))).tolist() == np.eye(8).tolist()
    with pytest.raises(UnsupportedImageError, match="not a readable image"):
        decode_image(b"plain text, not an image", name="t.txt")
    with pytest.raises(DataError, match="empty file"):
        decode_image(b"", name="e.png")


def test_limit_is_checked_on_the_header_before_any_pixel_is_decoded():
    # A real decompression bomb: 48 kB of valid PNG that decodes to 20000 x 20000 = 400 M pixels.
    bomb = png_claiming(20000, 20000, zlib.compress(b"\0" * ((20000 // 8 + 1) * 20000), 9), bit_depth=1)
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="20000x20000 = 400,000,000 pixels, above the limit of 64,000,000"):
        decode_image(bomb, name="bomb.png")
    with pytest.raises(ImageTooLargeError):
        decode_mask(bomb, name="bomb.png")
    # The same header over pixel data that cannot be decoded: decoding would fail as "damaged" (DataError), so an
    # ImageTooLargeError proves the limit was applied before decoding started.
    damaged = png_claiming(20000, 20000, b"\x00not zlib at all")
    with pytest.raises(ImageTooLargeError, match="above the limit of 1,000,000"):
        decode_image(damaged, name="damaged.png", max_pixels=1_000_000)
    with pytest.raises(DataError, match="truncated or damaged") as small:
        decode_image(png_claiming(20, 20, b"\x00not zlib at all"), name="damaged-small.png")
    assert not isinstance(small.value, ImageTooLargeError)
    # JPEG and WebP headers that claim billions / hundreds of millions of pixels in a few hundred bytes.
    jpeg = jpeg_claiming(65000, 65000)
    assert len(jpeg) < 2000
    with pytest.raises(ImageTooLargeError, match="65000x65000"):
        decode_image(jpeg, name="bomb.jpg")
    with pytest.raises(ImageTooLargeError, match="16000x16000 = 256,000,000 pixels, above the limit of 1,000,000"):
        decode_image(webp_claiming(16000, 16000), name="bomb.webp", max_pixels=1_000_000)


def test_limits_above_pillows_default_work_per_call():
    # Pillow's Image.open warns above MAX_IMAGE_PIXELS and raises above twice it; our limit replaces both.
    above = png_claiming(10000, 10000)  # 100 M > Pillow's default
    far_above = png_claiming(15000, 15000)  # 225 M > twice Pillow's default
    assert PILLOW_DEFAULT < 10000 * 10000 and 2 * PILLOW_DEFAULT < 15000 * 15000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert image_size(above, max_pixels=150_000_000) == (10000, 10000)
        assert image_size(far_above, max_pixels=300_000_000) == (15000, 15000)
        assert image_size(jpeg_claiming(20000, 20000), max_pixels=500_000_000) == (20000, 20000)
    with pytest.raises(ImageTooLargeError, match="above the limit of 99,999,999"):
        image_size(above, max_pixels=99_999_999)
    # WebP's plugin checks Pillow's global itself while opening: above twice it, the error is still ours.
    with pytest.raises(ImageTooLargeError, match="decompression-bomb limit"):
        image_size(webp_claiming(16000, 16000), max_pixels=300_000_000)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT


def test_concurrent_decodes_never_touch_the_global_and_enforce_each_calls_limit():
    """16 threads decode at once with different limits (some above Pillow's default) while a watcher samples
    Pillow's global guard; the old implementation set it to None around every open and lost it in a race."""
    small, small_rgba = real_png(40, 30, seed=2), real_png(24, 24, seed=3)
    above, far_above, jpeg_huge = png_claiming(10000, 10000), png_claiming(15000, 15000), jpeg_claiming(20000, 20000)
    cases = [  # (function, data, max_pixels, expected result or exception class)
        (decode_image, small, 10_000, (30, 40, 3)),
        (decode_image, small, 1_199, ImageTooLargeError),
        (decode_image, small_rgba, 576, (24, 24, 3)),
        (decode_image, small_rgba, 575, ImageTooLargeError),
        (image_size, above, 100_000_000, (10000, 10000)),
        (image_size, above, 50_000_000, ImageTooLargeError),
        (image_size, far_above, 225_000_000, (15000, 15000)),
        (image_size, far_above, 224_999_999, ImageTooLargeError),
        (image_size, jpeg_huge, 400_000_000, (20000, 20000)),
        (image_size, jpeg_huge, PILLOW_DEFAULT, ImageTooLargeError),
    ]
    original, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    seen: set = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    def work(seed: int) -> list[str]:
        rng, errors = random.Random(seed), []
        for _ in range(60):
            fn, data, limit, expected = rng.choice(cases)
            try:
                out = fn(data, name="t", max_pixels=limit)
                got = out.shape if isinstance(out, np.ndarray) else out
            except ImageTooLargeError as e:
                got = type(e)
            if got != expected:
                errors.append(f"{fn.__name__} limit {limit}: expected {expected}, got {got}")
        return errors

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so an unsafe swap would interleave
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watcher.start()
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(work, range(16)))
    finally:
        stop.set()
        watcher.join(10)
        sys.setswitchinterval(switch)
    assert [e for errs in results for e in errs] == []
    assert seen == {original} == {Image.MAX_IMAGE_PIXELS}  # never changed, not even for a moment
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before


def test_damaged_files_only_ever_raise_data_errors():
    """Mutated and truncated files of many formats: every failure is a DataError (400/415 at the endpoint), never
    a bare Pillow/struct exception (a 500)."""
    rng = random.Random(0)
    seeds = []
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "ICO", "TGA", "DDS", "QOI"):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(4).random((16, 16, 3)) * 255).astype(np.uint8)).save(buf, format=fmt)
        seeds.append(buf.getvalue())
    with pytest.raises(UnsupportedImageError):
        decode_image(b"(")  # too short for the DIB header check that Image.open runs inside its try
    escaped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TIFF metadata warnings
        for _ in range(1500):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[:rng.randrange(1, len(data))]
            try:
                decode_image(bytes(data), max_pixels=1_000_000)
            except DataError:
                pass
            except Exception as e:  # collecting what escapes is the point
                escaped.append(f"{type(e).__name__}: {e}")
    assert escaped == []
