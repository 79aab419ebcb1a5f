"""The safe bytes -> pixels path: formats, modes, orientation, limits, failures."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchsvc.core.errors import ImageError
from searchsvc.core.images import (
    _to_rgb,
    content_hash,
    decode_image,
    load_pixels,
    read_image_bytes,
    resize_center_crop,
)

BIG = 10**8
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(
    data: bytes, *, max_pixels: int = BIG, min_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    image, size = decode_image(data, "img", max_pixels=max_pixels, min_side=min_side)
    assert image.mode == "RGB"
    return np.asarray(image), size


def reason_of(data: bytes, *, max_pixels: int = BIG) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, "the-source", max_pixels=max_pixels)
    assert info.value.source == "the-source"
    assert str(info.value).startswith("the-source: ")
    return info.value.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header that claims a huge RGB image."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# --- orientation and frames --------------------------------------------------------------


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = RED  # left half red, right half blue
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)

    decoded, stored = decode(data)
    assert stored == (40, 20)  # the header's size, as stored
    assert decoded.shape == (40, 20, 3)  # displayed: width and height swapped
    # A clockwise turn brings the left half to the top.
    assert np.abs(decoded[5, 10].astype(int) - RED).max() < 12
    assert np.abs(decoded[35, 10].astype(int) - BLUE).max() < 12


def test_exif_orientation_is_applied_on_the_draft_path():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise_rgb(400, 200), "JPEG", exif=exif.tobytes())
    image, stored = decode_image(data, "img", max_pixels=BIG, min_side=50)
    assert stored == (400, 200)
    width, height = image.size
    assert height > width  # portrait after orientation
    assert min(width, height) >= 50


def test_image_without_exif_keeps_its_size():
    decoded, stored = decode(encode(noise_rgb(40, 20), "JPEG"))
    assert stored == (40, 20)
    assert decoded.shape == (20, 40, 3)


def test_gif_returns_the_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded, _ = decode(data)
    assert (decoded == RED).all()


# --- every mode becomes RGB --------------------------------------------------------------


def test_grey_l_becomes_grey_rgb():
    grey = Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8), "L")
    decoded, _ = decode(encode(grey, "PNG"))
    assert decoded.shape == (2, 2, 3)
    assert decoded[:, :, 0].tolist() == [[0, 100], [200, 255]]
    assert (decoded[:, :, 0] == decoded[:, :, 1]).all()
    assert (decoded[:, :, 1] == decoded[:, :, 2]).all()


def test_bilevel_becomes_black_and_white():
    bits = Image.new("1", (4, 2), 0)
    bits.putpixel((3, 1), 1)
    decoded, _ = decode(encode(bits, "PNG"))
    assert decoded[0, 0].tolist() == [0, 0, 0]
    assert decoded[1, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_on_white(fmt: str):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    data = encode(image, fmt, transparency=0)  # index 0 (black) is transparent
    decoded, _ = decode(data)
    assert decoded[0, 0].tolist() == list(WHITE)  # not black
    assert decoded[1, 1].tolist() == list(RED)


def test_palette_without_transparency_keeps_its_colours():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    decoded, _ = decode(encode(image, "PNG"))
    assert decoded[0].tolist() == [[0, 0, 0], [10, 20, 30]]


def test_rgba_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    rgba[0, 2] = (255, 0, 0, 128)  # half-transparent red -> pink
    decoded, _ = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded[0, 0].tolist() == list(WHITE)
    assert decoded[0, 1].tolist() == list(BLUE)
    r, g, b = decoded[0, 2].tolist()
    assert r == 255 and 120 <= g <= 135 and g == b


def test_grey_with_alpha_is_composited_on_white():
    la = np.array([[[0, 0], [0, 255], [200, 255]]], np.uint8)
    decoded, _ = decode(encode(Image.fromarray(la, "LA"), "PNG"))
    assert decoded[0].tolist() == [[255] * 3, [0] * 3, [200] * 3]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 0, 0, 255), (0, 0, 4, 8))  # left half full black ink
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded, _ = decode(data)
    assert decoded[4, 1].max() < 10
    assert decoded[4, 6].min() > 245


def test_sixteen_bit_grey_png_is_scaled_to_eight_bits():
    values = np.array([[0, 1000, 30000, 65535]], np.uint16)
    image = Image.fromarray(values.astype(np.int32)).convert("I;16")
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded, _ = decode(data)
    channel = decoded[0, :, 0].tolist()
    assert channel[0] == 0 and channel[-1] == 255
    assert channel == sorted(channel) and channel[1] < channel[2]
    assert (decoded[..., 0] == decoded[..., 2]).all()


@pytest.mark.parametrize(
    ("mode", "values"),
    [("I", [-5, 100_000, 500_000, 1_000_000]), ("F", [-1.5, 0.0, 0.25, 3.0])],
)
def test_integer_and_float_modes_are_scaled_to_eight_bits(mode: str, values: list[float]):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array([values], dtype=dtype), mode)
    assert image.mode == mode
    out = np.asarray(_to_rgb(image, "img"))
    assert out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 3].tolist() == [255, 255, 255]
    assert out[0, 1, 0] < out[0, 2, 0]


class _OddModeImage:
    mode = "X;99"


def test_unsupported_mode_names_the_mode():
    with pytest.raises(ImageError, match=r"unsupported image mode X;99"):
        _to_rgb(_OddModeImage(), "img")  # type: ignore[arg-type]


# --- limits and failures -------------------------------------------------------------------


def test_decompression_bomb_refused_from_the_header(monkeypatch: pytest.MonkeyPatch):
    data = png_claiming(100_000, 100_000)
    assert len(data) < 200  # small on disk, huge once decoded

    def no_decode(self: Image.Image, *args: object) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    reason = reason_of(data, max_pixels=1_000_000)
    assert "100000x100000" in reason
    assert "10000000000" in reason
    assert "1000000" in reason


def test_image_exactly_at_the_pixel_limit_is_accepted():
    decoded, _ = decode(encode(noise_rgb(10, 10), "PNG"), max_pixels=100)
    assert decoded.shape == (10, 10, 3)
    assert "101" not in reason_of(encode(noise_rgb(10, 10), "PNG"), max_pixels=99)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_reported_as_truncated(fmt: str):
    data = encode(noise_rgb(120, 80), fmt)
    reason = reason_of(data[: len(data) // 2])
    assert "truncated" in reason


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "not a recognised image" in reason_of(data)


def test_empty_bytes_are_not_an_image():
    assert "not a recognised image" in reason_of(b"")


@pytest.mark.parametrize("fmt", ["TIFF", "PPM"])
def test_format_outside_the_allowed_set_is_refused(fmt: str):
    reason = reason_of(encode(noise_rgb(8, 8), fmt))
    assert fmt in reason
    assert "not accepted" in reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt: str):
    decoded, stored = decode(encode(noise_rgb(12, 9), fmt))
    assert stored == (12, 9)
    assert decoded.shape == (9, 12, 3)


def test_content_hash_is_sha256_hex():
    assert content_hash(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- reading files -----------------------------------------------------------------------


def test_read_image_bytes_returns_the_content(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    assert read_image_bytes(path, max_bytes=5) == b"12345"


def test_read_missing_file(tmp_path: Path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageError) as info:
        read_image_bytes(path, max_bytes=100)
    assert info.value.source == str(path)
    assert "not found" in info.value.reason


def test_read_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError, match="empty"):
        read_image_bytes(path, max_bytes=100)


def test_read_oversized_file_is_refused_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "huge.jpg"
    with path.open("wb") as handle:
        handle.truncate(10 * 1024 * 1024)  # sparse: costs nothing on disk

    def no_read(self: Path) -> bytes:
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    monkeypatch.setattr(Path, "open", no_read)
    with pytest.raises(ImageError) as info:
        read_image_bytes(path, max_bytes=1024)
    assert str(10 * 1024 * 1024) in info.value.reason
    assert "1024" in info.value.reason


@pytest.mark.parametrize("max_bytes", [1, 10**9])
def test_read_directory_is_refused_as_a_directory(tmp_path: Path, max_bytes: int):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageError) as info:
        read_image_bytes(folder, max_bytes=max_bytes)
    assert "directory" in info.value.reason


# --- resize and crop ---------------------------------------------------------------------


def test_resize_center_crop_shape_and_dtype():
    out = resize_center_crop(noise_rgb(37, 53), 16)
    assert out.shape == (16, 16, 3)
    assert out.dtype == np.uint8


def test_resize_center_crop_keeps_the_centre_of_a_wide_image():
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, :40] = RED  # left third
    pixels[:, 40:80] = GREEN  # centre third
    pixels[:, 80:] = BLUE  # right third
    out = resize_center_crop(Image.fromarray(pixels), 20)
    assert out.shape == (20, 20, 3)
    assert (out[:, 1:-1] == GREEN).all()  # edges cropped away, away from bicubic seams


def test_resize_center_crop_keeps_the_centre_of_a_tall_image():
    pixels = np.zeros((90, 30, 3), np.uint8)
    pixels[:30] = RED
    pixels[30:60] = GREEN
    pixels[60:] = BLUE
    out = resize_center_crop(Image.fromarray(pixels), 30)  # no resize: pure crop
    assert (out == GREEN).all()


def test_resize_center_crop_upscales_a_small_image():
    out = resize_center_crop(Image.new("RGB", (4, 6), BLUE), 12)
    assert out.shape == (12, 12, 3)
    assert (out == BLUE).all()


def test_load_pixels_draft_path_matches_a_full_decode():
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    photo = Image.fromarray(coarse).resize((1600, 1200), Image.Resampling.BILINEAR)
    data = encode(photo, "JPEG", quality=90)

    drafted, _ = decode_image(data, "img", max_pixels=BIG, min_side=64)
    assert drafted.size[0] < 1600  # the draft path really decoded at a reduced scale
    assert min(drafted.size) >= 64

    fast, original = load_pixels(data, "img", size=64, max_pixels=BIG)
    full_image, _ = decode_image(data, "img", max_pixels=BIG)
    full = resize_center_crop(full_image, 64)
    assert original == (1600, 1200)
    assert fast.shape == full.shape == (64, 64, 3)
    assert fast.dtype == np.uint8
    difference = np.abs(fast.astype(int) - full.astype(int))
    assert difference.mean() < 3
    assert difference.max() < 40


def test_load_pixels_on_a_grey_jpeg_gives_rgb():
    grey = Image.fromarray(np.full((300, 200), 77, np.uint8), "L")
    pixels, original = load_pixels(encode(grey, "JPEG"), "img", size=32, max_pixels=BIG)
    assert original == (200, 300)
    assert pixels.shape == (32, 32, 3)
    assert np.abs(pixels.astype(int) - 77).max() <= 2
