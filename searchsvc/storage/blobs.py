"""Blobs every process of a deployment must see: bytes under a key, in a namespace.

What a cluster shares goes through a service every host reaches, never a file on a shared
folder: logged query photos, product images uploaded through the API, model files. This
module is the one interface (:class:`BlobStore`) with a backend per deployment: a local
folder for the embedded defaults (:class:`FolderBlobStore`); network backends live beside
it and are chosen by :func:`open_blob_store`.

Keys are content hashes or names made of ``[A-Za-z0-9._-]`` (no separators, no ``..``), so
a key can never reach outside its namespace, whichever backend stores it. Writes are
idempotent: a key names one content.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from searchsvc.core.errors import NotFoundError, SearchsvcError

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
NAMESPACES = frozenset({"queries", "uploads", "models"})
"""``queries``: logged query photos; ``uploads``: images received through the API;
``models``: model files (weights and their JSON)."""


class BlobStoreError(SearchsvcError):
    """A blob could not be written or read; the message names the namespace and key."""


def check_key(namespace: str, key: str) -> None:
    if namespace not in NAMESPACES:
        raise BlobStoreError(f"blob namespace {namespace!r}: expected one of {sorted(NAMESPACES)}")
    if not _KEY.match(key) or ".." in key:
        raise BlobStoreError(f"blob key {key!r}: letters, digits, '.', '_' and '-' only")


class BlobStore(Protocol):
    """Bytes by (namespace, key); every method is safe to call from several threads."""

    def put(self, namespace: str, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (a no-op when the key is already there)."""

    def get(self, namespace: str, key: str) -> bytes:
        """The bytes under ``key``; NotFoundError when there are none."""

    def has(self, namespace: str, key: str) -> bool: ...

    def delete(self, namespace: str, keys: Iterable[str]) -> int:
        """Remove ``keys`` (missing ones are skipped); returns how many were removed."""

    def keys(self, namespace: str) -> Iterator[str]:
        """Every key of ``namespace``, streamed (memory does not grow with the count)."""

    def describe(self) -> str:
        """Where the blobs live, for messages and ``searchsvc status`` (no credentials)."""

    def close(self) -> None: ...


class FolderBlobStore:
    """Blobs as files under ``root/<namespace>/<key[:2]>/<key>``, written atomically (a
    temporary file renamed into place: a reader sees all of a blob or none)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, namespace: str, key: str) -> Path:
        check_key(namespace, key)
        return self.root / namespace / key[:2] / key

    def put(self, namespace: str, key: str, data: bytes) -> None:
        path = self._path(namespace, key)
        if path.is_file():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise BlobStoreError(
                f"{namespace}/{key}: cannot write under {self.root} ({exc})"
            ) from None

    def get(self, namespace: str, key: str) -> bytes:
        path = self._path(namespace, key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{namespace}/{key}: no such blob in {self.root}") from None
        except OSError as exc:
            raise BlobStoreError(f"{namespace}/{key}: cannot read ({exc})") from None

    def has(self, namespace: str, key: str) -> bool:
        return self._path(namespace, key).is_file()

    def delete(self, namespace: str, keys: Iterable[str]) -> int:
        removed = 0
        for key in keys:
            try:
                self._path(namespace, key).unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def keys(self, namespace: str) -> Iterator[str]:
        check_key(namespace, "x")
        folder = self.root / namespace
        if not folder.is_dir():
            return
        for shard in sorted(os.scandir(folder), key=lambda e: e.name):
            if not shard.is_dir():
                continue
            with os.scandir(shard.path) as entries:
                for entry in entries:
                    if not entry.name.startswith(".") and entry.is_file():
                        yield entry.name

    def describe(self) -> str:
        return f"folder:{self.root.resolve()}"

    def close(self) -> None:
        pass


def open_blob_store(root: Path) -> BlobStore:
    """The deployment's blob store. Embedded defaults: a folder (``root``)."""
    return FolderBlobStore(root)
