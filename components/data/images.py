"""Image and mask decoding with a pixel-count limit.

Every image that enters defectflow goes through :func:`decode_image`: grayscale, palette, RGBA, 16-bit and float
inputs all come out as float32 RGB in [0, 1] (H, W, 3). Masks come out as uint8 {0, 1} (H, W). Unreadable or huge
inputs raise :class:`DataError` naming the file, never a bare PIL exception.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, WebPImagePlugin

from components.errors import DataError


class UnsupportedImageError(DataError):
    """The bytes are not an image format Pillow can identify."""


class ImageTooLargeError(DataError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; configurable per call

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_COMMON_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # tried first, whatever order plugins registered in
# What Pillow's plugins raise on malformed input (found by fuzzing); all become DataError, never a bare exception.
_PLUGIN_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, NotImplementedError)


def _identify(data: bytes) -> Image.Image | None:
    """``Image.open``'s format loop (header parse only, no pixels) without its decompression-bomb check.

    ``Image.open`` compares every image against the process-global ``Image.MAX_IMAGE_PIXELS`` (a warning above it,
    ``DecompressionBombError`` above twice it). A per-call limit cannot be had by swapping that global: decodes run
    in threads (the endpoint, Ray Data), and a swap races -- it can leave the guard off for the whole process. So the
    global is never touched: the plugins' header parsers are called directly and :func:`_open` applies the caller's
    limit. Plugins that check the global themselves still raise ``DecompressionBombError`` above twice it (WebP);
    WebP's canvas size is read from its header first, because its decoder allocates the canvas on open.
    """
    Image.init()  # registers every format plugin (once; imports are serialised by the import lock)
    prefix = data[:16]
    fp = io.BytesIO(data)
    registered = tuple(Image.ID)
    for fmt in (*_COMMON_FORMATS, *(f for f in registered if f not in _COMMON_FORMATS)):
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        factory, accept = entry
        try:
            if accept is not None:
                ok = accept(prefix)
                if not ok or isinstance(ok, str):  # a str is "recognised but support not installed"
                    continue
            fp.seek(0)
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open treats as "not this format"
            continue
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size of formats whose plugin allocates it while opening (WebP), read from the header."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        get_size = getattr(WebPImagePlugin, "_get_size", None)
        return get_size(data[:30]) if get_size is not None else None
    return None


def _too_large(name: str, w: int, h: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{name}: image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}",
                              "downscale it, or raise data.max_image_pixels")


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Identify the image and check ``max_pixels`` on its header size, before any pixel is decoded."""
    if not data:
        raise DataError(f"{name}: empty file", "remove it or replace it with a valid image")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _too_large(name, size[0], size[1], max_pixels)
    try:
        img = _identify(data)
    except Image.DecompressionBombError as e:  # a plugin's own check of the global limit (2x MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(f"{name}: image is above Pillow's decompression-bomb limit ({e})",
                                 "downscale it") from e
    except _PLUGIN_ERRORS as e:
        raise UnsupportedImageError(f"{name}: not a readable image ({e})",
                                    "check the file; supported: PNG, JPEG, BMP, TIFF, WebP") from e
    if img is None:
        raise UnsupportedImageError(f"{name}: not a readable image (cannot identify image file)",
                                    "check the file; supported: PNG, JPEG, BMP, TIFF, WebP")
    w, h = img.size
    if w * h > max_pixels:
        raise _too_large(name, w, h, max_pixels)
    if w == 0 or h == 0:
        raise DataError(f"{name}: image has zero size", "remove it")
    return img


def _to_array(img: Image.Image, name: str) -> np.ndarray:
    try:
        img.load()
    except _PLUGIN_ERRORS as e:
        raise DataError(f"{name}: image data is truncated or damaged ({e})", "re-export or remove the file") from e
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
        return arr
    if mode == "I":
        arr = np.asarray(img, dtype=np.int64).astype(np.float64)
        peak = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        return np.clip(arr / peak, 0, 1).astype(np.float32)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max(initial=0))
        return np.clip(arr / hi if hi > 1.0 else arr, 0, 1).astype(np.float32)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            # composite on black: transparent regions carry no surface
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
        mode = "RGB"
    if mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def decode_image(data: bytes, name: str = "<image>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of any supported image -> float32 RGB array (H, W, 3) in [0, 1]."""
    img = _open(data, name, max_pixels)
    arr = _to_array(img, name)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{name}: unexpected image shape {arr.shape}", "convert it to RGB or grayscale")
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_mask(data: bytes, name: str = "<mask>", max_pixels: int = DEFAULT_MAX_PIXELS,
                threshold: float = 0.0) -> np.ndarray:
    """Bytes of a mask image -> uint8 array (H, W) with 1 = defect. Colour masks count any channel > threshold."""
    img = _open(data, name, max_pixels)
    arr = _to_array(img, name)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > threshold).astype(np.uint8)


def image_size(data: bytes, name: str = "<image>", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    return _open(data, name, max_pixels).size


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array, or float in [0, 1], -> PNG bytes."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """{0,1} mask -> 8-bit PNG with 0/255 (viewable, and decode_mask reads it back exactly)."""
    return encode_png((np.asarray(mask) > 0).astype(np.uint8) * 255)


def resize_image(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float RGB (H, W, 3) -> (size[0]=H, size[1]=W) with bilinear (antialiased) resampling."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    chans = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
             for c in range(arr.shape[2])]
    return np.clip(np.stack(chans, axis=2), 0, 1).astype(np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 {0,1} mask -> (H, W) with nearest-neighbour resampling (labels stay binary)."""
    h, w = size
    if mask.shape[:2] == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.uint8)
