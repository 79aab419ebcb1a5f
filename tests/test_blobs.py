"""The blob store's folder backend: idempotent writes, keys that cannot escape, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchsvc.core.errors import NotFoundError
from searchsvc.storage.blobs import BlobStoreError, FolderBlobStore


def test_round_trip_idempotent_and_deletes(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path)
    store.put("queries", "abc123", b"first")
    store.put("queries", "abc123", b"second")  # a key names one content: kept as written
    assert store.get("queries", "abc123") == b"first"
    assert store.has("queries", "abc123") and not store.has("uploads", "abc123")
    store.put("queries", "ff00", b"x")
    assert sorted(store.keys("queries")) == ["abc123", "ff00"]
    assert store.delete("queries", ["abc123", "missing"]) == 1
    assert list(store.keys("queries")) == ["ff00"]
    with pytest.raises(NotFoundError, match="queries/abc123"):
        store.get("queries", "abc123")
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("key", ["../etc", "a/b", "", ".hidden", "a" * 201, "x\x00y", "..."])
def test_keys_cannot_reach_outside_their_namespace(tmp_path: Path, key: str) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    with pytest.raises(BlobStoreError, match="blob key"):
        store.put("queries", key, b"x")
    with pytest.raises(BlobStoreError, match="blob namespace"):
        store.put("elsewhere", "abc", b"x")
    assert not (tmp_path / "etc").exists()
