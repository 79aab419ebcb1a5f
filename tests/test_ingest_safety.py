"""Ingest and ``--sync`` lose nothing that is still there (issue 17, "Ingest and sync").

Driven through the CLI a user runs, on the embedded stack. Faults that a root-run test
cannot cause for real (a folder that fails to list, a file that cannot be read, a decoder
that raises something unexpected) are injected by monkeypatching the one function the
ingest goes through for it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from catalog_factory import GeneratedCatalog, make_catalog
from click.testing import CliRunner, Result
from sqlalchemy import select

from searchsvc.cli import main
from searchsvc.core.config import load_settings
from searchsvc.index import EdgeIndex
from searchsvc.storage.db import Database, ImageStatus
from searchsvc.storage.db import Image as ImageRow


def run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def ingest_json(catalog: Path, *extra: str) -> dict[str, Any]:
    return json.loads(run("ingest", str(catalog), "--json", *extra).output)


def rows(home: Path) -> dict[str, tuple[str, str | None]]:
    """``product/filename`` -> (status, point id) of every image row."""
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            found = session.execute(
                select(ImageRow.product_id, ImageRow.filename, ImageRow.status, ImageRow.point_id)
            ).all()
            return {f"{p}/{f}": (str(s.value), point) for p, f, s, point in found}
    finally:
        db.dispose()


def index_point_ids(home: Path) -> set[str]:
    with EdgeIndex(home / "qdrant") as index:
        collection = index.resolve_alias("images")
        assert collection is not None
        return set(index.iter_point_ids(collection))


def indexed(home: Path) -> set[str]:
    return {name for name, (status, _) in rows(home).items() if status == "indexed"}


def assert_every_indexed_row_has_its_point(home: Path) -> None:
    points = index_point_ids(home)
    for name, (status, point) in rows(home).items():
        if status == "indexed":
            assert point in points, f"{name} is indexed but its point {point} is gone"


@pytest.fixture
def small(tmp_path: Path) -> GeneratedCatalog:
    return make_catalog(tmp_path / "catalog", products=4, views=2)


# ----------------------------------------------------------------------------- --sync


def test_sync_of_an_empty_mount_point_is_refused_and_names_what_it_would_remove(
    env_home: Path, small: GeneratedCatalog, tmp_path: Path
) -> None:
    ingest_json(small.root)
    before = indexed(env_home)
    assert len(before) == 8
    # The share is unmounted: the mount point is there, and empty.
    shutil.move(small.root, tmp_path / "elsewhere")
    small.root.mkdir()

    refused = run("ingest", str(small.root), "--sync", "--json", ok=False)
    assert refused.exit_code == 1
    assert "--sync refused" in refused.output and "would remove 8 of the 8" in refused.output
    assert "p000/view0.jpg" in refused.output and "--force" in refused.output
    assert indexed(env_home) == before
    assert len(index_point_ids(env_home)) == 8

    # Told so, it removes everything.
    forced = ingest_json(small.root, "--sync", "--force")
    assert forced["images_removed"] == 8
    assert indexed(env_home) == set() and index_point_ids(env_home) == set()


def test_sync_over_the_share_is_refused_and_max_delete_lets_it_through(
    env_home: Path, small: GeneratedCatalog
) -> None:
    ingest_json(small.root)
    shutil.rmtree(small.root / "p001")  # 2 of 8 images = 25%: at the default limit
    assert ingest_json(small.root, "--sync")["images_removed"] == 2

    shutil.rmtree(small.root / "p002")  # 2 of the 6 left = 33%: over it
    refused = run("ingest", str(small.root), "--sync", ok=False)
    assert refused.exit_code == 1 and "would remove 2 of the 6" in refused.output
    assert {"p002/view0.jpg", "p002/view1.png"} <= indexed(env_home)

    too_few = run("ingest", str(small.root), "--sync", "--max-delete", "1", ok=False)
    assert too_few.exit_code == 1 and "limit of 1 images" in too_few.output
    assert ingest_json(small.root, "--sync", "--max-delete", "40%")["images_removed"] == 2
    left = {f"{p}/view{v}" for p in ("p000", "p003") for v in ("0.jpg", "1.png")}
    assert indexed(env_home) == left
    assert_every_indexed_row_has_its_point(env_home)


def test_sync_limit_setting_and_bad_max_delete(
    env_home: Path, small: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_json(small.root)
    shutil.rmtree(small.root / "p001")
    shutil.rmtree(small.root / "p002")
    monkeypatch.setenv("SEARCHSVC_SYNC_MAX_DELETE_FRACTION", "0.5")
    bad = run("ingest", str(small.root), "--sync", "--max-delete", "lots", ok=False)
    assert bad.exit_code != 0 and "--max-delete" in bad.output
    assert ingest_json(small.root, "--sync")["images_removed"] == 4


def test_sync_keeps_the_images_of_a_folder_that_fails_to_list(
    env_home: Path, small: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_json(small.root)
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == "p002":
            raise OSError(5, "Input/output error")
        return real_scandir(path)

    monkeypatch.setattr("searchsvc.storage.catalog.os.scandir", scandir)
    (small.root / "p003" / "view1.png").unlink()  # and one image really is gone
    summary = ingest_json(small.root, "--sync", "--force")
    assert summary["images_removed"] == 1
    problems = {p["item"]: p["reason"] for p in summary["problems"]}
    assert "cannot list folder" in problems["p002/"]
    assert {"p002/view0.jpg", "p002/view1.png"} <= indexed(env_home)
    assert rows(env_home)["p003/view1.png"][0] == "removed"
    assert_every_indexed_row_has_its_point(env_home)


def test_sync_keeps_an_image_that_is_listed_but_cannot_be_read(
    env_home: Path, small: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from searchsvc.core.errors import ImageError
    from searchsvc.jobs import ingest as ingest_module

    ingest_json(small.root)
    real_read = ingest_module.read_image_bytes

    def read(path: Path, max_bytes: int) -> bytes:
        if path.name == "view0.jpg" and path.parent.name == "p001":
            raise ImageError(str(path), "cannot read file (Input/output error)")
        return real_read(path, max_bytes)

    monkeypatch.setattr(ingest_module, "read_image_bytes", read)
    summary = ingest_json(small.root, "--sync", "--force")
    assert summary["images_removed"] == 0
    assert "p001/view0.jpg" in indexed(env_home)


def test_sync_of_a_missing_catalog_root_is_refused(env_home: Path, small: GeneratedCatalog) -> None:
    ingest_json(small.root)
    shutil.rmtree(small.root)
    missing = run("ingest", str(small.root), "--sync", "--force", ok=False)
    assert missing.exit_code == 1 and "catalog directory not found" in missing.output
    assert len(indexed(env_home)) == 8


# ------------------------------------------------------------- same bytes, two names


def test_two_names_with_the_same_bytes_keep_their_shared_point(
    env_home: Path, small: GeneratedCatalog
) -> None:
    import numpy as np
    from catalog_factory import product_pattern, render_view

    original = small.root / "p000" / "view0.jpg"
    copy = small.root / "p000" / "copy.jpg"
    shutil.copyfile(original, copy)
    ingest_json(small.root)
    assert rows(env_home)["p000/copy.jpg"] == rows(env_home)["p000/view0.jpg"]  # one point

    # Edit the copy: the original keeps the point they shared.
    render_view(product_pattern(np.random.default_rng(7)), np.random.default_rng(7)).save(copy)
    assert ingest_json(small.root)["images_changed"] == 1
    assert {"p000/view0.jpg", "p000/copy.jpg"} <= indexed(env_home)
    assert_every_indexed_row_has_its_point(env_home)

    # Same bytes again, then delete the copy and sync: the original keeps the point.
    shutil.copyfile(original, copy)
    ingest_json(small.root)
    copy.unlink()
    assert ingest_json(small.root, "--sync", "--force")["images_removed"] == 1
    assert "p000/view0.jpg" in indexed(env_home)
    assert_every_indexed_row_has_its_point(env_home)

    # And deleting the last name of those bytes removes the point.
    point = rows(env_home)["p000/view0.jpg"][1]
    original.unlink()
    ingest_json(small.root, "--sync", "--force")
    assert point not in index_point_ids(env_home)


# ------------------------------------------------------- unexpected decoder exceptions


def test_a_decoder_raising_an_unexpected_exception_fails_only_its_image(
    env_home: Path, small: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import struct

    from PIL import Image, ImageOps

    Image.new("RGB", (70, 50), "red").save(small.root / "p001" / "struct.png")
    opened_poison = small.root / "p002" / "runtime.png"
    Image.new("RGB", (50, 70), "blue").save(opened_poison)
    poison_bytes = opened_poison.read_bytes()
    real_open, real_transpose = Image.open, ImageOps.exif_transpose

    def open_image(fp: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(fp, "getvalue") and fp.getvalue() == poison_bytes:
            raise RuntimeError("plugin state corrupted")
        return real_open(fp, *args, **kwargs)

    def exif_transpose(image: Any, **kwargs: Any) -> Any:
        if image.size == (70, 50):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_transpose(image, **kwargs)

    monkeypatch.setattr(Image, "open", open_image)
    monkeypatch.setattr(ImageOps, "exif_transpose", exif_transpose)
    summary = ingest_json(small.root)
    problems = {p["item"]: p["reason"] for p in summary["problems"]}
    assert "struct.error" in problems["p001/struct.png"]
    assert "RuntimeError" in problems["p002/runtime.png"]
    assert summary["images_failed"] == 2 and summary["images_embedded"] == 8
    assert len(indexed(env_home)) == 8
    assert rows(env_home)["p001/struct.png"][0] == "failed"


# ------------------------------------------------------------- deliveries that died


class WorkerDied(BaseException):
    """Stands for the process dying mid-task: nothing after the raise runs, as after kill -9."""


def test_an_image_whose_delivery_kills_the_worker_is_given_up_after_n(
    settings: Any, small: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the function boundary: a delivery that dies is the task function stopping
    mid-way (what a real worker's death leaves in the database is the same); the real
    worker killed by a poisoned image is ``test_a_poisoned_image_that_kills_real_workers``."""
    from searchsvc.app import App
    from searchsvc.jobs import tasks
    from searchsvc.jobs.wire import EmbedItem, EmbedRequest
    from searchsvc.storage.db import ModelKind
    from searchsvc.storage.versions import active_version

    app = App(settings)
    try:
        app.ingest(small.root)
        with app.db.session() as session:
            found = session.execute(
                select(
                    ImageRow.id, ImageRow.product_id, ImageRow.source_path, ImageRow.content_hash
                )
                .where(ImageRow.product_id.in_(["p000", "p001"]))
                .order_by(ImageRow.product_id, ImageRow.filename)
            ).all()
        items = [EmbedItem(i, p, path, h) for i, p, path, h in found]
        assert len(items) == 4
        poison = items[1]
        version = active_version(app.db, ModelKind.EMBEDDER)
        assert version is not None and version.collection
        request = EmbedRequest(items, version.id, version.collection)
        real_load = tasks.load_pixels

        def load_pixels(data: bytes, source: str, **kwargs: Any) -> Any:
            if source == poison.path:
                raise WorkerDied
            return real_load(data, source, **kwargs)

        monkeypatch.setattr(tasks, "load_pixels", load_pixels)
        ctx = app.task_context()

        def counts() -> list[int]:
            with app.db.session() as session:
                by_id = dict(session.execute(select(ImageRow.id, ImageRow.embed_deliveries)).all())
            return [by_id[item.image_id] for item in items]

        for expected in ([1, 1, 1, 1], [0, 2, 1, 1], [0, 3, 1, 1]):
            with pytest.raises(WorkerDied):
                tasks.embed_images(request, ctx)
            assert counts() == expected  # only the image under way accumulates
        response = tasks.embed_images(request, ctx)
        errors = {r.image_id: r.error for r in response.results}
        assert errors[poison.image_id] and "given up after 3" in errors[poison.image_id]
        assert [errors[item.image_id] for item in items if item != poison] == [None] * 3
        assert counts() == [0, 3, 0, 0]
        with app.db.session() as session:
            row = session.get(ImageRow, poison.image_id)
            assert row is not None and row.status == ImageStatus.FAILED
            assert row.error and "given up" in row.error
    finally:
        app.close()


@pytest.mark.slow
def test_a_poisoned_image_that_kills_real_workers_is_given_up(
    tmp_path: Path, small: GeneratedCatalog
) -> None:
    """A real prefork worker whose child dies (SIGKILL) on one image: Celery requeues the
    task each time (``task_reject_on_worker_lost``), until the image is given up."""
    from PIL import Image
    from workers_harness import RedisServer, cli_env, searchsvc, start_worker, stop

    Image.new("RGB", (70, 50), "green").save(small.root / "p001" / "poison.png")
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    home = tmp_path / "home"
    env = cli_env(home, {"SEARCHSVC_BROKER_URL": redis_server.url, "SEARCHSVC_BATCH_SIZE": "3"})
    worker_env = dict(env)
    worker_env["SEARCHSVC_TEST_POISON_SIZE"] = "70x50"
    poison_site = str(Path(__file__).parent / "poison_site")
    worker_env["PYTHONPATH"] = os.pathsep.join(
        part for part in (poison_site, env.get("PYTHONPATH", "")) if part
    )
    worker = start_worker(worker_env, "embed", "embed-poison", pool="prefork")
    try:
        ingest = searchsvc(env, "ingest", str(small.root), "--json")
        out, err = ingest.communicate(timeout=240)
        assert ingest.returncode == 0, out + err
        assert "no worker is consuming" not in err  # the worker answered the inspection
        summary = json.loads(out)
        problems = {p["item"]: p["reason"] for p in summary["problems"]}
        assert "given up after 3" in problems["p001/poison.png"], problems
        assert summary["images_embedded"] == 8 and summary["images_failed"] == 1
        assert rows(home)["p001/poison.png"][0] == "failed"
        assert len(indexed(home)) == 8
    finally:
        stop(worker)
        redis_server.stop()
    log = (home.parent / "worker-embed-poison.log").read_text()
    assert "WorkerLostError" in log or "signal 9" in log  # the worker really died


# ------------------------------------------------------------ a broker and no worker


@pytest.mark.slow
def test_an_ingest_with_no_worker_on_the_embed_queue_says_so(
    tmp_path: Path, small: GeneratedCatalog
) -> None:
    from workers_harness import RedisServer, cli_env, searchsvc

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        home = tmp_path / "home"
        base = {"SEARCHSVC_BROKER_URL": redis_server.url}

        stopping = searchsvc(
            cli_env(home, {**base, "SEARCHSVC_INGEST_WITHOUT_WORKER": "stop"}),
            "ingest",
            str(small.root),
            "--no-progress",
        )
        _, err = stopping.communicate(timeout=120)  # the bound; it stops in seconds
        assert stopping.returncode == 1, err
        assert "no worker is consuming the 'embed' queue" in err and "stopped" in err
        assert "Traceback" not in err
        assert rows(home) == {}  # nothing registered, nothing sent

        waiting = searchsvc(
            cli_env(home, {**base, "SEARCHSVC_EMBED_TASK_TIMEOUT_S": "10"}),
            "ingest",
            str(small.root),
            "--no-progress",
        )
        _, err = waiting.communicate(timeout=180)
        warned = err.find("warning: no worker is consuming the 'embed' queue")
        timed_out = err.find("no embed worker finished a task within 10 s")
        assert 0 <= warned < timed_out, err  # said at once, then waited as configured
        assert waiting.returncode == 1
        assert set(status for status, _ in rows(home).values()) == {"pending"}
    finally:
        redis_server.stop()
