"""Vector index backends: EdgeIndex (qdrant-edge, embedded) and QdrantServerIndex.

QdrantServerIndex runs against qdrant-client's local mode (``location=":memory:"``), which
speaks the same client API as a server: collections, aliases, filters, scroll and count are
real there; keyword payload indexes are accepted but have no effect (filters still run
inside the engine, by scanning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from searchsvc.core.config import Settings
from searchsvc.core.errors import IndexBackendError
from searchsvc.index import (
    EdgeIndex,
    IndexPoint,
    QdrantServerIndex,
    VectorIndex,
    open_index,
    point_id_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def make_points(
    vectors: np.ndarray, category: str | None = "shoes", prefix: str = "p", start: int = 0
) -> list[IndexPoint]:
    return [
        IndexPoint(
            point_id=point_id_for(f"{prefix}{start + i}", f"hash{start + i}"),
            vector=vectors[i].astype(np.float32),
            product_id=f"{prefix}{start + i}",
            image_id=start + i,
            category=category,
        )
        for i in range(len(vectors))
    ]


def cosine(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    return (matrix @ query) / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))


@pytest.fixture(params=["edge", "server"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    backend: VectorIndex
    if request.param == "edge":
        backend = EdgeIndex(tmp_path / "qdrant")
    else:
        backend = QdrantServerIndex(QdrantClient(location=":memory:"))
    yield backend
    backend.close()


# -- shared behaviour ------------------------------------------------------------------------


def test_search_returns_nearest_first_with_cosine_scores(index: VectorIndex) -> None:
    rng = np.random.default_rng(1)
    # Deliberately not normalised, with very different norms: a dot-product or Euclidean
    # ranking would differ from the cosine one.
    vectors = rng.standard_normal((60, DIM)).astype(np.float32) * rng.uniform(
        0.1, 10, size=(60, 1)
    ).astype(np.float32)
    points = make_points(vectors)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)
    query = rng.standard_normal(DIM).astype(np.float32) * 3

    hits = index.search("c", query, limit=5)

    expected = cosine(vectors, query)
    order = np.argsort(-expected)[:5]
    assert [h.point_id for h in hits] == [points[i].point_id for i in order]
    np.testing.assert_allclose([h.score for h in hits], expected[order], atol=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    best = points[order[0]]
    assert (hits[0].product_id, hits[0].image_id, hits[0].category) == (
        best.product_id,
        best.image_id,
        "shoes",
    )


def test_search_of_a_stored_vector_finds_itself_with_score_one(index: VectorIndex) -> None:
    vectors = np.random.default_rng(2).standard_normal((20, DIM)).astype(np.float32)
    points = make_points(vectors, category=None)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)

    hits = index.search("c", vectors[7] * 5, limit=1)

    assert hits[0].point_id == points[7].point_id
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].category is None


def test_upsert_is_idempotent_and_updates_in_place(index: VectorIndex) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((30, DIM)).astype(np.float32)
    points = make_points(vectors)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)
    index.upsert("c", points)
    assert index.count("c") == 30

    # Same id, new vector: the point is replaced, not duplicated.
    moved = rng.standard_normal(DIM).astype(np.float32)
    old = points[4]
    index.upsert("c", [IndexPoint(old.point_id, moved, old.product_id, old.image_id, "boots")])
    assert index.count("c") == 30
    hit = index.search("c", moved, limit=1)[0]
    assert (hit.point_id, hit.category) == (old.point_id, "boots")
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_delete_removes_points(index: VectorIndex) -> None:
    vectors = np.random.default_rng(4).standard_normal((25, DIM)).astype(np.float32)
    points = make_points(vectors)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)
    gone = [points[0].point_id, points[1].point_id]

    index.delete("c", gone)

    assert index.count("c") == 23
    assert set(gone).isdisjoint(index.iter_point_ids("c"))
    hits = index.search("c", vectors[0], limit=25)
    assert len(hits) == 23
    assert points[0].point_id not in {h.point_id for h in hits}
    index.delete("c", [])  # no-op
    assert index.count("c") == 23


def test_filters_narrow_results_inside_the_engine(index: VectorIndex) -> None:
    rng = np.random.default_rng(5)
    query = rng.standard_normal(DIM).astype(np.float32)
    # 80 "shoes" points right around the query, 10 "hats" points far from it.
    near = query + 0.05 * rng.standard_normal((80, DIM)).astype(np.float32)
    far = rng.standard_normal((10, DIM)).astype(np.float32) - query
    index.ensure_collection("c", DIM)
    index.upsert("c", make_points(near, "shoes", prefix="s"))
    hats = make_points(far, "hats", prefix="h")
    index.upsert("c", hats)

    unfiltered = index.search("c", query, limit=20)
    assert {h.category for h in unfiltered} == {"shoes"}  # post-filtering would find none

    filtered = index.search("c", query, limit=5, filters={"category": "hats"})

    assert len(filtered) == 5
    assert {h.category for h in filtered} == {"hats"}
    expected = cosine(far, query)
    assert [h.point_id for h in filtered] == [hats[i].point_id for i in np.argsort(-expected)[:5]]
    by_product = index.search("c", query, limit=5, filters={"product_id": "h3"})
    assert [h.point_id for h in by_product] == [hats[3].point_id]
    assert index.search("c", query, limit=5, filters={"category": "socks"}) == []


def test_filter_on_unindexed_field_is_refused(index: VectorIndex) -> None:
    index.ensure_collection("c", DIM)
    with pytest.raises(IndexBackendError, match="categroy"):
        index.search("c", np.ones(DIM, dtype=np.float32), limit=3, filters={"categroy": "x"})


def test_alias_set_resolve_and_move(index: VectorIndex) -> None:
    rng = np.random.default_rng(6)
    index.ensure_collection("v1", DIM)
    index.ensure_collection("v2", DIM)
    index.upsert("v1", make_points(rng.standard_normal((3, DIM))))
    index.upsert("v2", make_points(rng.standard_normal((5, DIM))))
    assert index.resolve_alias("images") is None

    index.set_alias("images", "v1")
    assert index.resolve_alias("images") == "v1"
    assert index.count("images") == 3  # data operations follow the alias

    index.set_alias("images", "v2")
    assert index.resolve_alias("images") == "v2"
    assert index.count("images") == 5
    assert len(index.search("images", np.ones(DIM, dtype=np.float32), limit=10)) == 5
    assert index.resolve_alias("v1") is None  # collections are not aliases


def test_alias_to_missing_collection_raises(index: VectorIndex) -> None:
    with pytest.raises(IndexBackendError, match="missing"):
        index.set_alias("images", "missing")
    assert index.resolve_alias("images") is None


def test_drop_collection_removes_it_and_its_aliases(index: VectorIndex) -> None:
    index.ensure_collection("a", DIM)
    index.ensure_collection("b", DIM)
    index.set_alias("images", "a")
    assert index.collections() == ["a", "b"]

    index.drop_collection("a")

    assert index.collections() == ["b"]
    assert index.resolve_alias("images") is None
    index.drop_collection("a")  # dropping a missing collection is a no-op
    index.ensure_collection("a", 2 * DIM)  # the name is free again, any dimension
    assert index.count("a") == 0


def test_ensure_collection_with_another_dimension_raises(index: VectorIndex) -> None:
    index.ensure_collection("c", DIM)
    index.ensure_collection("c", DIM)  # same dimension: fine, idempotent
    with pytest.raises(IndexBackendError, match=r"'c'.*dimension"):
        index.ensure_collection("c", DIM * 2)


def test_operations_on_missing_collection_name_it(index: VectorIndex) -> None:
    with pytest.raises(IndexBackendError, match="nowhere"):
        index.search("nowhere", np.ones(DIM, dtype=np.float32), limit=3)
    with pytest.raises(IndexBackendError, match="nowhere"):
        index.count("nowhere")


def test_upsert_of_wrong_dimension_raises(index: VectorIndex) -> None:
    index.ensure_collection("c", DIM)
    with pytest.raises(IndexBackendError, match="'c'"):
        index.upsert("c", make_points(np.ones((2, DIM + 1), dtype=np.float32)))


def test_iter_point_ids_returns_exactly_the_stored_ids(index: VectorIndex) -> None:
    # More than one scroll page (1024), so paging is exercised.
    vectors = np.random.default_rng(7).standard_normal((2500, DIM)).astype(np.float32)
    points = make_points(vectors)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)
    index.delete("c", [points[10].point_id])

    ids = list(index.iter_point_ids("c"))

    assert len(ids) == 2499  # no duplicates across pages
    assert set(ids) == {p.point_id for p in points} - {points[10].point_id}
    index.ensure_collection("empty", DIM)
    assert list(index.iter_point_ids("empty")) == []


def test_optimize_keeps_results(index: VectorIndex) -> None:
    vectors = np.random.default_rng(8).standard_normal((300, DIM)).astype(np.float32)
    points = make_points(vectors)
    index.ensure_collection("c", DIM)
    index.upsert("c", points)
    index.optimize("c")
    assert index.count("c") == 300
    assert index.search("c", vectors[42], limit=1)[0].point_id == points[42].point_id


# -- point ids -------------------------------------------------------------------------------


def test_point_id_for_is_deterministic_and_differs_by_product() -> None:
    a = point_id_for("prod-1", "abc123")
    assert a == point_id_for("prod-1", "abc123")
    assert uuid.UUID(a).version == 5
    assert a != point_id_for("prod-2", "abc123")  # same bytes, other product
    assert a != point_id_for("prod-1", "abc124")
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert point_id_for("ab", "c") != point_id_for("a", "bc")
    # Pinned value: ids must not change between releases or machines.
    assert a == str(
        uuid.uuid5(uuid.UUID("5f0c1a8e-2b7d-4e1c-9a53-3c4d2e6b7f10"), "prod-1\x00abc123")
    )


# -- EdgeIndex only --------------------------------------------------------------------------


def test_edge_data_survives_close_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    vectors = np.random.default_rng(9).standard_normal((40, DIM)).astype(np.float32)
    points = make_points(vectors)
    with EdgeIndex(root) as index:
        index.ensure_collection("v1", DIM)
        index.upsert("v1", points)
        index.delete("v1", [points[0].point_id])
        index.set_alias("images", "v1")

    with EdgeIndex(root) as index:
        assert index.collections() == ["v1"]
        assert index.resolve_alias("images") == "v1"
        assert index.count("images") == 39
        hit = index.search("v1", vectors[5], limit=1)[0]
        assert (hit.point_id, hit.product_id, hit.image_id) == (points[5].point_id, "p5", 5)
        index.ensure_collection("v1", DIM)
        with pytest.raises(IndexBackendError, match="dimension"):
            index.ensure_collection("v1", DIM + 1)

    # The dimension check also holds when the shard was not opened before the check.
    with EdgeIndex(root) as index, pytest.raises(IndexBackendError, match="'v1'"):
        index.ensure_collection("v1", DIM + 1)


_WRITE_AND_DIE = """
import os, sys
from pathlib import Path
import numpy as np
import searchsvc.index
from searchsvc.index import EdgeIndex, IndexPoint, point_id_for
searchsvc.index._FLUSH_INTERVAL_S = 1e9  # only the first upsert flushes
index = EdgeIndex(Path(sys.argv[1]))
index.ensure_collection("v1", 16)
vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
for start in (0, 100, 200):
    index.upsert("v1", [IndexPoint(point_id_for(f"p{i}", "h"), vectors[i], f"p{i}", i)
                        for i in range(start, start + 100)])
os._exit(0)  # no close(), no flush: as if the process were killed
"""


def test_edge_updates_survive_the_process_dying_without_close(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    child = _run_child(_WRITE_AND_DIE, root)
    assert child.returncode == 0, child.stdout + child.stderr
    with EdgeIndex(root) as index:  # the dead process's lock is gone with it
        assert index.count("v1") == 300
        ids = set(index.iter_point_ids("v1"))
    assert ids == {point_id_for(f"p{i}", "h") for i in range(300)}


def test_edge_alias_file_is_plain_json_and_left_complete(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path) as index:
        index.ensure_collection("v1", DIM)
        index.ensure_collection("v2", DIM)
        index.set_alias("images", "v1")
        index.set_alias("images", "v2")
    assert json.loads((tmp_path / "aliases.json").read_text()) == {"images": "v2"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_edge_rejects_names_outside_its_root(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path / "qdrant") as index:
        for bad in ("../escape", "a/b", ".hidden", "", "aliases.json"):
            with pytest.raises(IndexBackendError, match="invalid name"):
                index.ensure_collection(bad, DIM)
    assert not (tmp_path / "escape").exists()


_OPEN_IN_CHILD = """
import sys
from pathlib import Path
from searchsvc.core.errors import IndexBackendError
from searchsvc.index import EdgeIndex
try:
    EdgeIndex(Path(sys.argv[1])).close()
except IndexBackendError as exc:
    print(exc)
    sys.exit(3)
print("opened")
"""


def _open_in_another_process(root: Path) -> subprocess.CompletedProcess[str]:
    return _run_child(_OPEN_IN_CHILD, root)


def _run_child(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, str(root)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_edge_second_process_gets_clear_error_while_first_holds_it(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    first = EdgeIndex(root)
    try:
        first.ensure_collection("v1", DIM)
        child = _open_in_another_process(root)
        assert child.returncode == 3, child.stdout + child.stderr
        message = child.stdout.strip()
        assert str(root) in message
        assert "another process" in message
        assert f"pid {os.getpid()}" in message
        assert "SEARCHSVC_QDRANT_URL" in message
        # The first holder is unaffected.
        assert first.collections() == ["v1"]
    finally:
        first.close()

    child = _open_in_another_process(root)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.strip() == "opened"


def test_edge_lock_is_per_open_index_and_released_on_close(tmp_path: Path) -> None:
    with EdgeIndex(tmp_path) as index:
        with pytest.raises(IndexBackendError, match="this process .*another open EdgeIndex"):
            EdgeIndex(tmp_path)
        index.ensure_collection("c", DIM)
    with pytest.raises(IndexBackendError, match="closed"):
        index.count("c")
    index.close()  # closing twice is harmless
    with EdgeIndex(tmp_path) as again:
        assert again.collections() == ["c"]


# -- QdrantServerIndex and the factory --------------------------------------------------------


def test_server_unreachable_url_is_named() -> None:
    url = "http://127.0.0.1:9"  # discard port: connection refused
    with pytest.raises(IndexBackendError, match=r"127\.0\.0\.1:9"):
        QdrantServerIndex.from_url(url, timeout=2)


def test_open_index_picks_backend_from_settings(tmp_path: Path) -> None:
    index = open_index(Settings(home=tmp_path), "read")
    try:
        assert isinstance(index, EdgeIndex)
        assert index.root == tmp_path / "qdrant"
    finally:
        index.close()
    url = "http://127.0.0.1:9"
    with pytest.raises(IndexBackendError, match=r"127\.0\.0\.1:9"):
        open_index(Settings(home=tmp_path, qdrant_url=url), "read")
