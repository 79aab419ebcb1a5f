"""Every pixel store backend against a real server: the SQLite file and the PostgreSQL
table (throw-away databases on the local server, as tests/test_db.py makes them): exact
round trip, idempotent writes, streamed keys, deletes, several processes writing
overlapping keys at once; and a worker with another home that reads pixels only through
the PostgreSQL store."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from catalog_factory import make_catalog
from test_db import PostgresServer, pg_server  # noqa: F401 (the fixture)

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.core.errors import ConfigError, ImageError
from searchsvc.storage.db import Database, Image, ImageStatus
from searchsvc.storage.pixels import (
    FILE_NAME,
    DatabasePixelStore,
    PixelStore,
    SqlitePixelStore,
    StoredKey,
    open_pixel_store,
)

ROOT = Path(__file__).resolve().parents[1]


def pixels(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:  # noqa: F811
    try:
        yield pg_server.new_url()
    finally:
        pg_server.drop_created()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Callable[[], PixelStore], str]]:
    """(backend, a factory of stores on one shared location, that location as a string)."""
    opened: list[PixelStore] = []
    databases: list[Database] = []
    if request.param == "sqlite":
        location = str(tmp_path / "media")

        def make() -> PixelStore:
            opened.append(SqlitePixelStore(Path(location)))
            return opened[-1]
    else:
        location = request.getfixturevalue("pg_url")
        Database(location).dispose()  # migrated once, before any process races to it

        def make() -> PixelStore:
            databases.append(Database(location))
            opened.append(DatabasePixelStore(databases[-1].engine))
            return opened[-1]

    yield str(request.param), make, location
    for store in opened:
        store.close()
    for db in databases:
        db.dispose()


def test_round_trip_idempotence_keys_and_delete(store_factory) -> None:  # type: ignore[no-untyped-def]
    _, make, _ = store_factory
    store, other = make(), make()
    store.put_many([("a", pixels(8, 1)), ("b", pixels(8, 2)), ("b", pixels(8, 2))])
    store.put_many([("a", pixels(16, 3))])
    store.put_many([("a", pixels(8, 99))])  # a stored key keeps its first pixels
    assert other.has("a", 8) and other.has("a", 16) and not other.has("a", 4)
    np.testing.assert_array_equal(other.get("a", 8), pixels(8, 1))
    np.testing.assert_array_equal(other.get("a", 16), pixels(16, 3))
    assert sorted(other.keys()) == [
        StoredKey("a", 8, 192),
        StoredKey("a", 16, 768),
        StoredKey("b", 8, 192),
    ]
    assert store.get("b", 8).flags.writeable is False  # the cache's copy is shared
    assert store.delete(["a", "missing"]) == 2
    assert [k.content_hash for k in other.keys()] == ["b"]
    with pytest.raises(ImageError, match="not found"):
        store.get("a", 8)  # removed from the cache too
    with pytest.raises(ValueError, match="uint8"):
        store.put_many([("c", pixels(8, 0).astype(np.int16))])
    store.put_many([])


def test_keys_are_streamed_in_pages_past_the_page_size(store_factory) -> None:  # type: ignore[no-untyped-def]
    backend, make, _ = store_factory
    store = make()
    if isinstance(store, DatabasePixelStore):
        store.KEYS_PAGE = 7  # type: ignore[misc]
    store.put_many([(f"k{n:03d}", pixels(4, n)) for n in range(30)])
    keys = list(store.keys())
    assert sorted(k.content_hash for k in keys) == [f"k{n:03d}" for n in range(30)]
    assert len(keys) == 30, backend


def _write_overlapping(backend: str, location: str, worker: int, rounds: int) -> None:
    if backend == "sqlite":
        store: PixelStore = SqlitePixelStore(Path(location))
        db = None
    else:
        db = Database(location)
        store = DatabasePixelStore(db.engine)
    for n in range(rounds):
        # Keys shared by every worker (written in different orders) and keys of its own.
        shared = [
            (f"shared-{(n + k * worker) % 12}", pixels(8, (n + k * worker) % 12)) for k in range(4)
        ]
        own = [(f"own-{worker}-{n}", pixels(8, 1000 + worker * 100 + n))]
        store.put_many(shared[::-1] if worker % 2 else shared)
        store.put_many(own)
    store.close()
    if db is not None:
        db.dispose()


def test_several_processes_write_overlapping_keys_at_once(store_factory) -> None:  # type: ignore[no-untyped-def]
    backend, make, location = store_factory
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_write_overlapping, args=(backend, location, w, 20))
        for w in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    store = make()
    keys = sorted(k.content_hash for k in store.keys())
    expected = sorted(
        [f"shared-{n}" for n in range(12)] + [f"own-{w}-{n}" for w in range(4) for n in range(20)]
    )
    assert keys == expected  # each key once: nothing lost, nothing duplicated
    for n in range(12):
        np.testing.assert_array_equal(store.get(f"shared-{n}", 8), pixels(8, n))
    np.testing.assert_array_equal(store.get("own-3-19", 8), pixels(8, 1000 + 300 + 19))


def test_the_setting_chooses_the_backend(tmp_path: Path) -> None:
    settings = load_settings(env={"SEARCHSVC_HOME": str(tmp_path)})
    assert settings.pixel_store == "sqlite"
    db = Database(settings.sqlalchemy_url)
    try:
        assert isinstance(open_pixel_store(settings, db), SqlitePixelStore)
        with pytest.raises(ConfigError, match="PostgreSQL"):
            DatabasePixelStore(db.engine)
    finally:
        db.dispose()
    with pytest.raises(ConfigError, match="SEARCHSVC_PIXEL_STORE"):
        load_settings(env={"SEARCHSVC_HOME": str(tmp_path), "SEARCHSVC_PIXEL_STORE": "postgresql"})
    with pytest.raises(ConfigError, match="SEARCHSVC_PIXEL_STORE"):
        load_settings(env={"SEARCHSVC_PIXEL_STORE": "nfs"})


READER = """
import json, sys
from searchsvc.app import build_task_context
from searchsvc.core.config import load_settings
ctx = build_task_context(load_settings())
wanted = json.loads(sys.argv[1])
print(json.dumps({h: ctx.pixels.get(h, s).tobytes().hex()[:64] for h, s in wanted}))
"""


@pytest.mark.postgres
def test_a_worker_with_another_home_reads_pixels_only_through_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    env = {
        "SEARCHSVC_HOME": str(tmp_path / "coordinator"),
        "SEARCHSVC_DATABASE_URL": pg_url,
        "SEARCHSVC_PIXEL_STORE": "postgresql",
    }
    settings = load_settings(env=env)
    catalog = make_catalog(tmp_path / "catalog", products=4, views=2)
    app = App(settings)
    try:
        summary = app.ingest(catalog.root)
        assert summary.images_embedded == 8
        with app.db.session() as session:
            hashes = sorted(
                session.scalars(
                    sa.select(Image.content_hash).where(Image.status == ImageStatus.INDEXED)
                ).all()
            )
        stored = {k.content_hash: k.size for k in app.pixels.keys()}
        assert sorted(stored) == hashes  # every indexed image's pixels are in the table
        local = {h: app.pixels.get(h, s).tobytes().hex()[:64] for h, s in stored.items()}
    finally:
        app.close()
    worker_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")},
        **env,
        "SEARCHSVC_HOME": str(tmp_path / "worker"),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", READER, json.dumps(sorted(stored.items()))],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == local
    # No pixel file on either host's disk: the table is the only copy.
    assert not list(tmp_path.rglob(FILE_NAME))
