"""The content-addressed pixel store: exact round trip, idempotent and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchsvc.errors import ImageError
from searchsvc.images import content_hash
from searchsvc.pixels import PixelStore

HASH = content_hash(b"some image")


def pixels(size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def all_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_round_trip_is_exact(tmp_path: Path):
    store = PixelStore(tmp_path)
    original = pixels(24)
    path = store.put(HASH, original)
    assert path == store.path_for(HASH, 24)
    assert path == tmp_path / "pixels" / "24" / HASH[:2] / f"{HASH}.rgb"
    assert store.has(HASH, 24)
    restored = store.get(HASH, 24)
    assert restored.dtype == np.uint8
    assert restored.shape == (24, 24, 3)
    np.testing.assert_array_equal(restored, original)


def test_sizes_are_kept_apart(tmp_path: Path):
    store = PixelStore(tmp_path)
    store.put(HASH, pixels(8, seed=1))
    store.put(HASH, pixels(16, seed=2))
    np.testing.assert_array_equal(store.get(HASH, 8), pixels(8, seed=1))
    np.testing.assert_array_equal(store.get(HASH, 16), pixels(16, seed=2))
    assert not store.has(HASH, 32)


def test_put_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = PixelStore(tmp_path)
    first = store.put(HASH, pixels(16))
    before = first.read_bytes()

    def no_encode(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image already stored was encoded again")

    monkeypatch.setattr(Image.Image, "save", no_encode)
    second = store.put(HASH, pixels(16, seed=9))  # same key: content-addressed, kept as is
    assert second == first
    assert first.read_bytes() == before
    assert all_files(tmp_path) == [first]


def test_put_leaves_no_temporary_files(tmp_path: Path):
    store = PixelStore(tmp_path)
    for seed in range(3):
        store.put(content_hash(bytes([seed])), pixels(8, seed))
    files = all_files(tmp_path)
    assert len(files) == 3
    assert all(path.suffix == ".rgb" and not path.name.startswith(".") for path in files)


def test_failed_write_leaves_neither_target_nor_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = PixelStore(tmp_path)

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put(HASH, pixels(8))
    assert not store.has(HASH, 8)
    assert all_files(tmp_path) == []


def test_file_appears_only_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Until the rename, the target path does not exist: readers never see half a file."""
    store = PixelStore(tmp_path)
    target = store.path_for(HASH, 8)
    seen: list[tuple[bool, int]] = []
    real_replace = os.replace

    def watching_replace(src: str, dst: str) -> None:
        seen.append((target.exists(), Path(src).stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    store.put(HASH, pixels(8))
    assert seen == [(False, target.stat().st_size)]


def test_get_missing_raises_image_error(tmp_path: Path):
    store = PixelStore(tmp_path)
    with pytest.raises(ImageError) as info:
        store.get(HASH, 16)
    assert "not found" in info.value.reason
    assert HASH in str(info.value)


def test_get_corrupt_file_raises_image_error(tmp_path: Path):
    store = PixelStore(tmp_path)
    path = store.path_for(HASH, 16)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not pixels at all")  # truncated or foreign content: wrong length
    with pytest.raises(ImageError, match="17 bytes, expected 16x16x3"):
        store.get(HASH, 16)


def test_get_wrong_size_raises_image_error(tmp_path: Path):
    store = PixelStore(tmp_path)
    path = store.path_for(HASH, 16)
    path.parent.mkdir(parents=True)
    path.write_bytes(pixels(8).tobytes())  # an 8x8 image where 16x16 belongs
    with pytest.raises(ImageError, match="expected 16x16x3"):
        store.get(HASH, 16)


def test_put_refuses_pixels_that_are_not_square_uint8_rgb(tmp_path: Path):
    store = PixelStore(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        store.put(HASH, pixels(8).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
        store.put(HASH, np.zeros((8, 4, 3), np.uint8))


def test_recent_pixels_are_served_from_memory_within_the_byte_budget(tmp_path: Path) -> None:
    pixel_bytes = 8 * 8 * 3
    store = PixelStore(tmp_path, cache_bytes=2 * pixel_bytes)
    rng = np.random.default_rng(0)
    arrays = {
        f"{n:02d}" + "a" * 62: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in range(3)
    }
    for digest, pixels in arrays.items():
        store.put(digest, pixels)
    first, second, third = arrays
    assert np.array_equal(store.get(first, 8), arrays[first])
    store.path_for(first, 8).unlink()  # served from memory now
    assert np.array_equal(store.get(first, 8), arrays[first])
    store.get(second, 8)
    store.get(third, 8)  # over budget: the least recently used (first) leaves
    with pytest.raises(ImageError):
        store.get(first, 8)
    cached = store.get(third, 8)
    assert not cached.flags.writeable  # shared between callers: nobody may change it
