"""Embedded defaults, one owner: while `searchsvc serve` holds the store, the CLI's
commands in other processes go through it, and queries keep being answered during an
ingest."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from catalog_factory import make_catalog
from serve_harness import cli, running_server

pytestmark = pytest.mark.slow


def test_cli_commands_reach_the_server_and_queries_never_fail_during_an_ingest(
    tmp_path: Path,
) -> None:
    first = make_catalog(tmp_path / "first", products=8, views=2)
    second = make_catalog(tmp_path / "second", products=40, views=3, seed=1)
    home = tmp_path / "home"
    cli(home, "ingest", str(first.root), "--no-progress")

    with running_server(home) as server, server.client() as api:
        photo = first.held_out["p003"]
        by_cli = json.loads(cli(home, "query", str(photo), "--json", "--top-k", "4"))
        with photo.open("rb") as handle:
            by_api = api.post("/v1/search", params={"top_k": 4}, files={"image": handle}).json()
        assert [r["product_id"] for r in by_cli["results"]] == [
            r["product_id"] for r in by_api["results"]
        ]
        assert by_cli["results"][0]["product_id"] == "p003"
        table = cli(home, "query", str(photo), "--top-k", "2").splitlines()
        assert table[0].startswith("query ") and "p003" in table[2]
        assert json.loads(cli(home, "status", "--json"))["products"] == 8
        assert "feedback" in cli(home, "feedback", by_cli["query_id"], "p003")

        answered: list[float] = []
        failures: list[str] = []
        ingesting = threading.Event()
        stop = threading.Event()

        def shopper(photo: Path) -> None:
            data = photo.read_bytes()
            with server.client() as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        response = client.post(
                            "/v1/search", params={"top_k": 5}, files={"image": ("q.jpg", data)}
                        )
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if response.status_code != 200 or not response.json()["results"]:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                    elif ingesting.is_set():
                        answered.append(time.perf_counter() - started)

        shoppers = [
            threading.Thread(target=shopper, args=(first.held_out[p],))
            for p in ("p000", "p001", "p002", "p005")
        ]
        for thread in shoppers:
            thread.start()
        try:
            ingesting.set()
            summary = json.loads(cli(home, "ingest", str(second.root), "--json"))
            ingesting.clear()
        finally:
            stop.set()
            for thread in shoppers:
                thread.join()
        assert summary["images_embedded"] == 120 and summary["images_failed"] == 0
        assert failures == []
        assert len(answered) >= 4, "no query ran during the ingest"

        status = json.loads(cli(home, "status", "--json"))
        assert status["products"] == 40 and status["indexed_points"] >= 120
        found = json.loads(cli(home, "query", str(second.held_out["p030"]), "--json"))
        assert found["results"][0]["product_id"] == "p030"


def test_a_retrains_switch_goes_through_the_server_and_queries_keep_answering(
    tmp_path: Path,
) -> None:
    from searchsvc.app import App
    from searchsvc.core.config import load_settings
    from searchsvc.jobs.model_files import register_version
    from searchsvc.storage.db import ModelKind
    from searchsvc.storage.versions import active_version
    from trainer.retrain import RetrainServices

    catalog = make_catalog(tmp_path / "catalog", products=30, views=3)
    home = tmp_path / "home"
    cli(home, "ingest", str(catalog.root), "--no-progress")
    settings = load_settings(env={"SEARCHSVC_HOME": str(home)})

    with running_server(home) as server:
        app = App(settings)  # the retrain's own: DB and pixels, never the index
        try:
            serving = active_version(app.db, ModelKind.EMBEDDER)
            assert serving is not None
            # A new version with the same weights: the promotion's switch is under test.
            candidate = register_version(app.db, settings, ModelKind.EMBEDDER, serving.file)
            services = RetrainServices.of(app)
            versions: list[int] = []
            failures: list[str] = []
            stop = threading.Event()

            def shopper() -> None:
                data = catalog.held_out["p004"].read_bytes()
                with server.client() as client:
                    while not stop.is_set():
                        response = client.post("/v1/search", files={"image": ("q.jpg", data)})
                        if response.status_code != 200:
                            failures.append(f"{response.status_code}: {response.text[:200]}")
                        else:
                            versions.append(response.json()["embedder_version"])

            threads = [threading.Thread(target=shopper) for _ in range(3)]
            for thread in threads:
                thread.start()
            try:
                while len(versions) < 3 and not failures:
                    time.sleep(0.05)
                swap = services.switch_embedder(candidate, None)
                after = len(versions)
                while len(versions) < after + 3 and not failures:
                    time.sleep(0.05)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
        finally:
            app.close()
        assert failures == []
        assert swap.version_id == candidate and swap.images_embedded == 90
        assert versions[0] == serving.id and versions[-1] == candidate
        assert set(versions) == {serving.id, candidate}
        status = json.loads(cli(home, "status", "--json"))
        assert status["collection"] == f"images_v{candidate}"
