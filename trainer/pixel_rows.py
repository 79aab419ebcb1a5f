"""Training pixels on disk, read a batch at a time by index.

A retrain used to hold every training image's pixels in memory (N x L x L x 3 bytes: about
160 GB for the training split of a million images at ViT-S/16's load size). Here they are
decoded once into a flat file of fixed-size rows in the run folder and each batch reads
its rows with ``pread``: the file's pages live in the kernel's page cache, which the
system may evict, not in the process's memory (a memory map would count every page it
touched in the process's resident set).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from searchsvc.core.errors import ImageError
from searchsvc.learning.training_data import PixelLoader

WRITE_ROWS = 256
"""Rows buffered per write while the file is made."""


class PixelRows:
    """``(N, S, S, 3)`` uint8 rows in a file, indexed like an array: ``rows[indices]`` and
    ``rows[start:stop]`` return in-memory arrays of just those rows."""

    def __init__(self, path: Path, count: int, size: int) -> None:
        self.path = path
        self.size = size
        self.row_bytes = size * size * 3
        expected = count * self.row_bytes
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(f"{path}: {actual} bytes, expected {count} rows of {self.row_bytes}")
        self.shape = (count, size, size, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._fd: int | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self.shape[0]

    def _handle(self) -> int:
        # A process forked after the file was opened opens its own (DataLoader workers).
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": 0}

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read_range(start, max(start, stop))
            index = np.arange(start, stop, step)
        positions = np.asarray(index, dtype=np.int64)
        if positions.ndim == 0:
            return self[positions.reshape(1)][0]
        flat = positions.reshape(-1)
        if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        flat = np.where(flat < 0, flat + len(self), flat)
        out = np.empty((len(flat), self.size, self.size, 3), dtype=np.uint8)
        for n, row in enumerate(flat.tolist()):
            self._read_into(out[n : n + 1], row)
        return out.reshape(*positions.shape, self.size, self.size, 3)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.size, self.size, 3), dtype=np.uint8)
        if len(out):
            self._read_into(out, start)
        return out

    def _read_into(self, out: np.ndarray, first_row: int) -> None:
        """Fill ``out`` (contiguous rows) from row ``first_row`` on, straight from the file."""
        view = out.data.cast("B")
        offset, done = first_row * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self._handle(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: file ended at byte {offset + done}")
            done += got

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def write_pixel_rows(
    path: Path,
    loader: PixelLoader,
    refs: Sequence[tuple[Path, str]],
    size: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[PixelRows, np.ndarray]:
    """Decode ``refs`` at ``size`` into ``path``, the images that could be read only, in
    order; returns the rows and the ``(N,)`` mask of those read. Memory: one write buffer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = np.zeros(len(refs), dtype=bool)
    temporary = path.with_name(path.name + ".part")
    buffer: list[bytes] = []
    with temporary.open("wb") as out:
        for n, (image_path, digest) in enumerate(refs):
            try:
                pixels = loader.one(image_path, digest, size)
            except ImageError:
                pixels = None
            if pixels is not None:
                buffer.append(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
                ok[n] = True
            if len(buffer) >= WRITE_ROWS:
                out.write(b"".join(buffer))
                buffer.clear()
            if progress is not None:
                progress(n + 1)
        out.write(b"".join(buffer))
    temporary.replace(path)
    return PixelRows(path, int(ok.sum()), size), ok
