"""The one safe path from image bytes to pixels, shared by ingest, query, rerank and training.

Every failure raises :class:`ImageError` naming the source and the reason: a missing or
oversized file, bytes that are not an image of an allowed format, a truncated file, an image
over the pixel limit (a decompression bomb, checked from the header *before* decoding), a
mode we cannot turn into RGB, or any other exception a decoder plugin raises (a crafted file
can reach code paths that raise ``struct.error``, ``RuntimeError``...: it fails alone).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from searchsvc.core.errors import ImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

# PIL's own global bomb check is process-wide and warns below 2x its limit; we enforce our
# limit per call from the header, so its global check is kept only as a backstop.
Image.MAX_IMAGE_PIXELS = None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a regular file, refusing one larger than ``max_bytes`` before reading it.

    Opened non-blocking and checked on the open descriptor: a named pipe (which would block
    a plain open until a writer comes) or a device put where an image was is refused, not
    waited on, even if it replaced the file after the catalog was listed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(str(path), "file not found") from None
    except IsADirectoryError:
        raise ImageError(str(path), "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(str(path), "permission denied") from None
    except OSError as exc:
        raise ImageError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):  # before the size checks: its size means nothing
            raise ImageError(str(path), "is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(str(path), "not a regular file (a pipe or a device); not read")
        size = info.st_size
        if size > max_bytes:
            raise ImageError(str(path), f"file is {size} bytes, over the limit of {max_bytes}")
        if size == 0:
            raise ImageError(str(path), "file is empty")
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        try:
            data = _read_at_most(handle, max_bytes + 1)
        except OSError as exc:
            raise ImageError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # it grew after the check
        raise ImageError(str(path), f"file is over the limit of {max_bytes} bytes")
    if not data:
        raise ImageError(str(path), "file is empty")
    return data


def _read_at_most(handle: io.RawIOBase, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def decode_image(
    data: bytes, source: str, *, max_pixels: int, min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` to an RGB image with EXIF orientation applied.

    Returns the image and its stored (width, height), read from the header.

    ``min_side``: the caller will shrink the image to this short side anyway, so JPEGs are
    decoded at a reduced scale (DCT scaling), which is several times faster on photos.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(source, "not a recognised image file") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as exc:
        raise ImageError(source, _failure_reason("cannot open image", exc)) from None
    except Exception as exc:  # noqa: BLE001 - a plugin's own bug (struct.error, ...) is this file's
        raise ImageError(source, _unexpected("opening", exc)) from None

    if image.format not in ALLOWED_FORMATS:
        raise ImageError(source, f"image format {image.format} is not accepted")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(source, "image has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            source,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )

    try:
        if image.format == "GIF" or getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # first frame only
        if min_side is not None and image.format in {"JPEG", "MPO"}:
            image.draft("RGB", (min_side, min_side))
        image.load()
        oriented: Image.Image = ImageOps.exif_transpose(image) or image
        return _to_rgb(oriented, source), (width, height)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(source, _failure_reason("cannot decode image", exc)) from None
    except Exception as exc:  # noqa: BLE001 - see above: it fails this image, not its batch
        raise ImageError(source, _unexpected("decoding", exc)) from None


def _unexpected(step: str, exc: Exception) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"the decoder failed while {step} ({name}: {exc})"


def _failure_reason(default: str, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    lowered = detail.lower()
    if isinstance(exc, EOFError) or "truncat" in lowered or "broken" in lowered:
        return f"truncated or corrupt image data ({detail})"
    return f"{default} ({detail})"


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"L", "1", "CMYK", "YCbCr", "LAB", "HSV"}:
        return image.convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "RGBa", "La"}:
        # Transparent product cut-outs are shown on white in every shop.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in {"I", "I;16", "I;16B", "I;16L", "F"}:
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    raise ImageError(source, f"unsupported image mode {mode}")


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic), centre-crop to a square.

    Returns uint8 pixels of shape (size, size, 3), the input of both models.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def load_pixels(
    data: bytes, source: str, *, size: int, max_pixels: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> model-ready uint8 pixels (size, size, 3) and the original (width, height)."""
    image, original_size = decode_image(data, source, max_pixels=max_pixels, min_side=size)
    return resize_center_crop(image, size), original_size
