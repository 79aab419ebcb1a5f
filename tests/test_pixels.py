"""The content-addressed pixel store: exact round trip, idempotent and atomic batch writes,
several writing processes, and the first (file per image) layout still readable."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from searchsvc.core.errors import ImageError
from searchsvc.core.images import content_hash
from searchsvc.storage.pixels import SqlitePixelStore

HASH = content_hash(b"some image")


def pixels(size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def stored_rows(store: SqlitePixelStore) -> list[tuple[str, int, int]]:
    with sqlite3.connect(store.path) as connection:
        return sorted(
            connection.execute("SELECT content_hash, size, length(data) FROM pixels").fetchall()
        )


def test_round_trip_is_exact(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    original = pixels(24)
    assert not store.has(HASH, 24)
    store.put_many([(HASH, original)])
    assert store.has(HASH, 24)
    restored = SqlitePixelStore(tmp_path).get(HASH, 24)  # another instance: from the file
    assert restored.dtype == np.uint8
    assert restored.shape == (24, 24, 3)
    np.testing.assert_array_equal(restored, original)
    # One database file for every image, not a file per image.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file())[0] == "pixels.sqlite3"
    assert not (tmp_path / "pixels").exists()


def test_sizes_are_kept_apart(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    store.put_many([(HASH, pixels(8, seed=1))])
    store.put_many([(HASH, pixels(16, seed=2))])
    np.testing.assert_array_equal(store.get(HASH, 8), pixels(8, seed=1))
    np.testing.assert_array_equal(store.get(HASH, 16), pixels(16, seed=2))
    assert not store.has(HASH, 32)


def test_put_is_idempotent(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    store.put_many([(HASH, pixels(16))])
    store.put_many([(HASH, pixels(16, seed=9))])  # same key: content-addressed, kept as is
    store.put_many([(HASH, pixels(16, seed=3)), (HASH, pixels(16, seed=4))])
    assert stored_rows(store) == [(HASH, 16, 16 * 16 * 3)]
    np.testing.assert_array_equal(SqlitePixelStore(tmp_path).get(HASH, 16), pixels(16))


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    good = [(content_hash(bytes([n])), pixels(8, n)) for n in range(3)]
    with pytest.raises(ValueError, match="uint8"):
        store.put_many([*good, ("bad", pixels(8).astype(np.float32))])
    assert not any(store.has(digest, 8) for digest, _ in good)
    store.put_many(good)
    assert [row[0] for row in stored_rows(store)] == sorted(digest for digest, _ in good)


def test_a_failed_transaction_leaves_nothing_and_the_store_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = SqlitePixelStore(tmp_path)
    store.put_many([("before", pixels(8))])
    connection = store._connection()  # this thread's connection

    class Failing:
        def __getattr__(self, name: str) -> object:
            return getattr(connection, name)

        def executemany(self, *args: object) -> None:
            connection.execute(
                "INSERT INTO pixels VALUES (?, ?, ?)", ("half", 8, pixels(8).tobytes())
            )
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_connection", lambda: Failing())
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store.put_many([("after", pixels(8, 1))])
    monkeypatch.undo()
    assert [row[0] for row in stored_rows(store)] == ["before"]  # the half write rolled back
    store.put_many([("after", pixels(8, 1))])
    np.testing.assert_array_equal(store.get("after", 8), pixels(8, 1))


def _write_many(root: str, worker: int, count: int) -> None:
    store = SqlitePixelStore(Path(root))
    for n in range(count):
        store.put_many(
            [(f"w{worker}-{n}-{k}", pixels(8, worker * 1000 + n * 10 + k)) for k in range(4)]
        )
    store.close()


def test_several_processes_write_at_once(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), w, 25)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    store = SqlitePixelStore(tmp_path)
    assert len(stored_rows(store)) == 3 * 25 * 4
    np.testing.assert_array_equal(store.get("w2-24-3", 8), pixels(8, 2000 + 240 + 3))


def test_get_missing_raises_image_error(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    with pytest.raises(ImageError) as info:
        store.get(HASH, 16)
    assert "not found" in info.value.reason
    assert HASH in str(info.value)


def test_get_wrong_length_raises_image_error(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    store.put_many([(HASH, pixels(16))])
    with sqlite3.connect(store.path) as connection:  # a foreign or damaged row
        connection.execute("UPDATE pixels SET data = ? WHERE content_hash = ?", (b"x" * 17, HASH))
    with pytest.raises(ImageError, match="17 bytes, expected 16x16x3"):
        SqlitePixelStore(tmp_path).get(HASH, 16)


def test_put_refuses_pixels_that_are_not_square_uint8_rgb(tmp_path: Path):
    store = SqlitePixelStore(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        store.put_many([(HASH, pixels(8).astype(np.float32))])
    with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
        store.put_many([(HASH, np.zeros((8, 4, 3), np.uint8))])
    with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
        store.put_many([(HASH, np.zeros((8, 8), np.uint8))])


def test_recent_pixels_are_served_from_memory_within_the_byte_budget(tmp_path: Path) -> None:
    pixel_bytes = 8 * 8 * 3
    store = SqlitePixelStore(tmp_path, cache_bytes=2 * pixel_bytes)
    rng = np.random.default_rng(0)
    arrays = {
        f"{n:02d}" + "a" * 62: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in range(3)
    }
    store.put_many(arrays.items())
    first, second, third = arrays
    assert np.array_equal(store.get(first, 8), arrays[first])
    with sqlite3.connect(store.path) as connection:
        connection.execute("DELETE FROM pixels WHERE content_hash = ?", (first,))
    assert np.array_equal(store.get(first, 8), arrays[first])  # served from memory now
    store.get(second, 8)
    store.get(third, 8)  # over budget: the least recently used (first) leaves
    with pytest.raises(ImageError):
        store.get(first, 8)
    cached = store.get(third, 8)
    assert not cached.flags.writeable  # shared between callers: nobody may change it
