"""The worker fault tests with the cluster's stores: metadata AND pixels in PostgreSQL
(``SEARCHSVC_PIXEL_STORE=postgresql``, throw-away databases on the local server), the
embed workers each with a home of their own, so they share no file with the ingest. A
worker killed with SIGKILL mid-ingest, and two ingests at once: every image indexed once,
its pixels stored once, nothing lost, nothing duplicated."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from catalog_factory import make_catalog
from test_db import PostgresServer, pg_server  # noqa: F401 (the fixture)
from test_workers_faults import finish, parse_json, redis_server, wait_until  # noqa: F401
from workers_harness import RedisServer, cli_env, searchsvc, start_worker, stop

from searchsvc.core.config import load_settings
from searchsvc.core.profiles import PROFILES
from searchsvc.index import EdgeIndex
from searchsvc.storage.db import Image, ImageStatus, StoredPixels
from searchsvc.storage.pixels import FILE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:  # noqa: F811
    try:
        yield pg_server.new_url()
    finally:
        pg_server.drop_created()


def cluster_env(home: Path, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return cli_env(
        home,
        {"SEARCHSVC_DATABASE_URL": url, "SEARCHSVC_PIXEL_STORE": "postgresql", **(extra or {})},
    )


def indexed_count(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    sa.select(sa.func.count())
                    .select_from(Image)
                    .where(Image.status == ImageStatus.INDEXED)
                ).scalar_one()
            )
    except sa.exc.SQLAlchemyError:  # the ingest has not created the schema yet
        return 0
    finally:
        engine.dispose()


def assert_stored_exactly_once(url: str, home: Path, expected: int, root: Path) -> None:
    """DB rows, points and pixel rows agree: each image once, each image's pixels once,
    no pixel row without an image, and no pixel file on any disk."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    Image.product_id,
                    Image.filename,
                    Image.point_id,
                    Image.status,
                    Image.content_hash,
                )
            ).all()
            pixel_rows = connection.execute(
                sa.select(
                    StoredPixels.content_hash, StoredPixels.size, sa.func.length(StoredPixels.data)
                )
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == expected
    assert len({(r.product_id, r.filename) for r in rows}) == expected
    assert {r.status for r in rows} == {ImageStatus.INDEXED}
    hashes = {r.content_hash for r in rows}
    assert sorted(r.content_hash for r in pixel_rows) == sorted(hashes)  # once each
    size = PROFILES[load_settings(env=cluster_env(home, url)).embedder_profile].input_size
    assert {r.size for r in pixel_rows} == {size}  # the embedder's input, as STIR reads it
    assert {r[2] for r in pixel_rows} == {size * size * 3}
    with EdgeIndex(home / "qdrant") as index:
        collection = index.resolve_alias("images")
        assert collection is not None
        points = list(index.iter_point_ids(collection))
    assert len(points) == len(set(points)) == expected
    assert set(points) == {r.point_id for r in rows}
    assert not list(root.rglob(FILE_NAME))


def test_kill_9_of_an_embed_worker_mid_ingest_with_postgresql_pixels(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    pg_url: str,
) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=300, views=3)
    total = 900
    home = tmp_path / "home"
    settings = {
        "SEARCHSVC_BROKER_URL": redis_server.url,
        "SEARCHSVC_BATCH_SIZE": "4",
        "SEARCHSVC_TASK_VISIBILITY_TIMEOUT_S": "4",
        "SEARCHSVC_EMBED_TASK_RESEND_S": "20",  # see the SQLite variant of this test
    }
    env = cluster_env(home, pg_url, settings)
    first = start_worker(cluster_env(tmp_path / "worker-a", pg_url, settings), "embed", "embed-a")
    ingest = searchsvc(env, "ingest", str(catalog.root), "--json")
    try:
        wait_until(lambda: indexed_count(pg_url) >= 8, 180, "the first embedded images")
        stop(first, signal.SIGKILL)  # mid-task, no goodbye
        assert indexed_count(pg_url) < total, "the ingest finished before the kill"
        time.sleep(1)
        second = start_worker(
            cluster_env(tmp_path / "worker-b", pg_url, settings), "embed", "embed-b"
        )
        try:
            code, output = finish(ingest, timeout=400)
        finally:
            stop(second)
    finally:
        stop(first, signal.SIGKILL)
        if ingest.poll() is None:
            stop(ingest)  # type: ignore[arg-type]
    assert code == 0, output
    assert parse_json(output)["images_embedded"] == total
    assert_stored_exactly_once(pg_url, home, total, tmp_path)


def test_two_overlapping_ingests_at_once_with_postgresql_pixels(
    tmp_path: Path, pg_url: str
) -> None:
    full = make_catalog(tmp_path / "full", products=30, views=3)
    first, second = tmp_path / "first", tmp_path / "second"
    for index, product_id in enumerate(full.product_ids):
        if index < 20:
            shutil.copytree(full.root / product_id, first / product_id)
        if index >= 10:
            shutil.copytree(full.root / product_id, second / product_id)
    home = tmp_path / "home"
    env = cluster_env(home, pg_url)
    runs = [searchsvc(env, "ingest", str(root), "--json") for root in (first, second)]
    results = [finish(run, timeout=400) for run in runs]
    for code, output in results:
        assert code == 0, output
    assert_stored_exactly_once(pg_url, home, 90, tmp_path)
    embedded = sum(parse_json(out)["images_embedded"] for _, out in results)
    assert embedded == 90  # the shared products were embedded by one ingest only
