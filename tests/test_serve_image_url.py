"""`POST /v1/search` with a JSON ``image_url`` against a real `searchsvc serve` process and
a real image server on a loopback port: on with an allowlist, off by default."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from catalog_factory import GeneratedCatalog, make_catalog
from click.testing import CliRunner
from serve_harness import Server, running_server

from searchsvc.cli import main

pytestmark = pytest.mark.slow


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[GeneratedCatalog, Path]:
    root = tmp_path_factory.mktemp("url-shop")
    catalog = make_catalog(root / "catalog", products=6, views=2)
    home = root / "home"
    result = CliRunner().invoke(
        main, ["--home", str(home), "ingest", str(catalog.root), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return catalog, home


@pytest.fixture(scope="module")
def photo_site(shop: tuple[GeneratedCatalog, Path]) -> Iterator[str]:
    """The held-out query photos over HTTP: ``{base}/<file name>``."""
    catalog, _ = shop
    folder = next(iter(catalog.held_out.values())).parent
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def fetching(shop: tuple[GeneratedCatalog, Path], photo_site: str) -> Iterator[Server]:
    _, home = shop
    allowed = photo_site.removeprefix("http://")
    with running_server(home, {"SEARCHSVC_API_IMAGE_URL_HOSTS": allowed}) as server:
        yield server


def test_a_photo_by_url_finds_what_its_upload_finds(
    fetching: Server, shop: tuple[GeneratedCatalog, Path], photo_site: str
) -> None:
    catalog, _ = shop
    with fetching.client(key=None) as api:
        for product_id in catalog.product_ids[:3]:
            photo = catalog.held_out[product_id]
            with photo.open("rb") as handle:
                uploaded = api.post(
                    "/v1/search", params={"top_k": 3}, files={"image": (photo.name, handle)}
                )
            assert uploaded.status_code == 200, uploaded.text
            by_url = api.post(
                "/v1/search", params={"top_k": 3}, json={"image_url": f"{photo_site}/{photo.name}"}
            )
            assert by_url.status_code == 200, by_url.text
            first, second = uploaded.json()["results"], by_url.json()["results"]
            assert first[0]["product_id"] == second[0]["product_id"] == product_id
            assert [r["product_id"] for r in first] == [r["product_id"] for r in second]


def test_refused_urls_answer_422_naming_image_url(
    fetching: Server, shop: tuple[GeneratedCatalog, Path], photo_site: str
) -> None:
    catalog, _ = shop
    name = catalog.held_out[catalog.product_ids[0]].name
    port = photo_site.rsplit(":", 1)[1]
    with fetching.client(key=None) as api:
        for url, says in [
            (f"http://localhost:{port}/{name}", f"host localhost:{port} is not on"),
            (f"{photo_site}/no-such-photo.jpg", "upstream answered 404"),
            (f"file:///{name}", "only http and https"),
        ]:
            answer = api.post("/v1/search", json={"image_url": url})
            assert answer.status_code == 422, answer.text
            (error,) = answer.json()["errors"]
            assert error["field"] == "body.image_url" and says in error["reason"], error

        both = api.post(
            "/v1/search", json={"image_b64": "aGVsbG8=", "image_url": f"{photo_site}/{name}"}
        )
        assert both.status_code == 422
        assert "exactly one of image_b64 or image_url" in both.json()["errors"][0]["reason"]
        neither = api.post("/v1/search", json={})
        assert neither.status_code == 422
        assert "exactly one" in neither.json()["errors"][0]["reason"]


def test_a_url_that_is_no_image_is_named_as_image_url(fetching: Server, photo_site: str) -> None:
    # The folder listing of the photo site: HTML, not an image.
    with fetching.client(key=None) as api:
        answer = api.post("/v1/search", json={"image_url": f"{photo_site}/"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "body.image_url"


def test_fetching_is_off_by_default(
    shop: tuple[GeneratedCatalog, Path], photo_site: str, fetching: Server
) -> None:
    catalog, home = shop
    name = catalog.held_out[catalog.product_ids[0]].name
    fetching.process.send_signal(signal.SIGINT)  # one owner of the embedded store at a time
    fetching.process.wait(timeout=30)
    with running_server(home) as server, server.client(key=None) as api:
        answer = api.post("/v1/search", json={"image_url": f"{photo_site}/{name}"})
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["errors"]
    assert error["field"] == "body.image_url"
    assert "is off" in error["reason"] and "SEARCHSVC_API_IMAGE_URL_HOSTS" in error["reason"]
