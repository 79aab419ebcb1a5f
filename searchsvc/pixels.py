"""Content-addressed store of model-ready pixels, shared by every worker.

At ingest each image is decoded once and its preprocessed pixels (short side resized,
centre-cropped, uint8) are kept here, keyed by content hash and size. The reranker then reads
a few-KB PNG per candidate instead of decoding a full-size original per query.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from searchsvc.errors import ImageError


class PixelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, content_hash: str, size: int) -> Path:
        return self.root / "pixels" / str(size) / content_hash[:2] / f"{content_hash}.png"

    def has(self, content_hash: str, size: int) -> bool:
        return self.path_for(content_hash, size).is_file()

    def put(self, content_hash: str, pixels: np.ndarray) -> Path:
        """Store (S, S, 3) uint8 pixels; a no-op when already stored (same hash, same bytes)."""
        size = pixels.shape[0]
        target = self.path_for(content_hash, size)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        # Level 1: these files are written once per image at ingest and read per query;
        # the fastest compression keeps ingest cheap and they stay small.
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, target)  # atomic: readers never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def get(self, content_hash: str, size: int) -> np.ndarray:
        path = self.path_for(content_hash, size)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except FileNotFoundError:
            raise ImageError(path.name, "preprocessed pixels not found (re-run ingest)") from None
        except OSError as exc:
            raise ImageError(str(path), f"unreadable preprocessed pixels ({exc})") from None
        if pixels.shape != (size, size, 3):
            raise ImageError(str(path), f"stored pixels have shape {pixels.shape}")
        return pixels
