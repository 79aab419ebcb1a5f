"""`searchsvc serve` as a real process on a loopback port: every endpoint through HTTP."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from catalog_factory import GeneratedCatalog, make_catalog, product_pattern, render_view
from click.testing import CliRunner
from PIL import Image
from serve_harness import READ_KEY, WRITE_KEY, Server, running_server
from sqlalchemy import select

from searchsvc.cli import main
from searchsvc.core.config import load_settings
from searchsvc.index import EdgeIndex
from searchsvc.serving.search import QueryResponse
from searchsvc.storage.db import Database, Feedback

pytestmark = pytest.mark.slow
MAX_REQUEST_BYTES = 1_000_000
MAX_PIXELS = 1_000_000


def ingest(home: Path, catalog: Path) -> None:
    result = CliRunner().invoke(
        main, ["--home", str(home), "ingest", str(catalog), "--no-progress"]
    )
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[GeneratedCatalog, Path]:
    root = tmp_path_factory.mktemp("shop")
    catalog = make_catalog(root / "catalog", products=12, views=3)
    home = root / "home"
    ingest(home, catalog.root)
    return catalog, home


@pytest.fixture(scope="module")
def server(shop: tuple[GeneratedCatalog, Path]) -> Iterator[Server]:
    _, home = shop
    extra = {
        "SEARCHSVC_API_KEYS": f"{READ_KEY}:read,{WRITE_KEY}:write",
        "SEARCHSVC_API_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "SEARCHSVC_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
    }
    with running_server(home, extra) as running:
        yield running


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def upload(client: httpx.Client, photo: Path, **params: Any) -> httpx.Response:
    with photo.open("rb") as handle:
        return client.post("/v1/search", params=params, files={"image": (photo.name, handle)})


def ids(answer: dict[str, Any]) -> list[str]:
    return [r["product_id"] for r in answer["results"]]


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_upload_and_base64_answer_as_query_json_does(
    api: httpx.Client, shop: tuple[GeneratedCatalog, Path]
) -> None:
    catalog, _ = shop
    for product_id in catalog.product_ids[:4]:
        photo = catalog.held_out[product_id]
        by_upload = upload(api, photo, top_k=5)
        assert by_upload.status_code == 200, by_upload.text
        by_json = api.post("/v1/search", params={"top_k": 5}, json={"image_b64": b64(photo)})
        assert by_json.status_code == 200, by_json.text
        first, second = by_upload.json(), by_json.json()
        # The fields `searchsvc query --json` prints, no more, no fewer.
        assert set(first) == {f.name for f in dataclasses.fields(QueryResponse)}
        assert ids(first) == ids(second)
        assert first["query_id"] != second["query_id"]  # each is a logged query of its own
        top = first["results"][0]
        assert top["product_id"] == product_id
        assert top["category"] == catalog.categories[product_id]
        assert top["title"] == f"Product {int(product_id[1:])}"
        assert [r["rank"] for r in first["results"]] == [1, 2, 3, 4, 5]
        assert first["reranked"] is False and first["rerank_reason"] == "no reranker is active"


def test_batch_answers_each_photo_and_names_the_bad_one(
    api: httpx.Client, shop: tuple[GeneratedCatalog, Path]
) -> None:
    catalog, _ = shop
    photos = [catalog.held_out[p] for p in ("p001", "p002")]
    bad = base64.b64encode(b"not an image at all").decode()
    answer = api.post(
        "/v1/search/batch",
        params={"top_k": 3},
        json={"images_b64": [b64(photos[0]), bad, b64(photos[1])]},
    )
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert [item["index"] for item in items] == [0, 1, 2]
    assert ids(items[0]["response"])[0] == "p001"
    assert ids(items[2]["response"])[0] == "p002"
    assert items[1]["response"] is None
    assert items[1]["error"]["field"] == "images_b64[1]"
    assert "not a recognised image" in items[1]["error"]["reason"]

    with photos[0].open("rb") as one, photos[1].open("rb") as two:
        multipart = api.post(
            "/v1/search/batch",
            params={"top_k": 3},
            files=[("images", ("a.jpg", one)), ("images", ("b.jpg", two))],
        )
    assert multipart.status_code == 200, multipart.text
    got = [ids(item["response"]) for item in multipart.json()["items"]]
    assert got == [ids(items[0]["response"]), ids(items[2]["response"])]


def test_similar_leaves_the_product_itself_out(api: httpx.Client) -> None:
    answer = api.get("/v1/products/p003/similar", params={"top_k": 4})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 4 and "p003" not in ids(answer.json())
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    missing = api.get("/v1/products/nope/similar")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["field"] == "product_id"


def test_pagination_continues_the_same_ranking(
    api: httpx.Client, shop: tuple[GeneratedCatalog, Path]
) -> None:
    catalog, _ = shop
    photo = catalog.held_out["p005"]
    whole = upload(api, photo, top_k=8, rerank="false").json()
    first = upload(api, photo, top_k=4, offset=0, rerank="false").json()
    second = upload(api, photo, top_k=4, offset=4, rerank="false").json()
    assert ids(first) + ids(second) == ids(whole)
    assert [r["rank"] for r in second["results"]] == [5, 6, 7, 8]
    assert first["rerank_reason"] == "reranking turned off"


def test_filters_category_product_and_price(
    api: httpx.Client, shop: tuple[GeneratedCatalog, Path]
) -> None:
    catalog, _ = shop
    photo = catalog.held_out["p000"]
    bags = upload(api, photo, top_k=10, category="bags").json()["results"]
    assert bags and all(r["category"] == "bags" for r in bags)
    assert {r["product_id"] for r in bags} == {
        p for p, c in catalog.categories.items() if c == "bags"
    }
    only = upload(api, photo, product_id="p007").json()
    assert ids(only) == ["p007"]
    # Prices are 10.5 + n: the range [12, 15] holds p002..p004.
    priced = upload(api, photo, top_k=10, price_min=12, price_max=15).json()["results"]
    assert sorted(r["product_id"] for r in priced) == ["p002", "p003", "p004"]
    assert all(12 <= r["price"] <= 15 for r in priced)
    wrong = upload(api, photo, price_min=20, price_max=10)
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "query.price_min"


def test_feedback_is_recorded(api: httpx.Client, shop: tuple[GeneratedCatalog, Path]) -> None:
    catalog, home = shop
    answer = upload(api, catalog.held_out["p006"], top_k=3).json()
    given = api.post(
        "/v1/feedback",
        json={"query_id": answer["query_id"], "product_id": "p006", "positive": True},
    )
    assert given.status_code == 200, given.text
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            row = session.get(Feedback, given.json()["feedback_id"])
            assert row is not None and row.query_id == answer["query_id"] and row.positive
            assert session.scalars(select(Feedback)).first() is not None
    finally:
        db.dispose()
    unknown = api.post("/v1/feedback", json={"query_id": "nope", "product_id": "p006"})
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["field"] == "body.query_id"


def test_product_upsert_and_delete_are_seen_by_the_next_search(api: httpx.Client) -> None:
    rng = np.random.default_rng(99)
    pattern = product_pattern(rng)
    views = [png_bytes(render_view(pattern, rng)) for _ in range(2)]
    query = png_bytes(render_view(pattern, rng))
    body = {
        "title": "Fresh arrival",
        "category": "hats",
        "price": 42.0,
        "attributes": {"colour": "mixed"},
        "images": [{"data_b64": base64.b64encode(v).decode()} for v in views]
        + [{"data_b64": base64.b64encode(b"GIF89a broken").decode(), "name": "broken.gif"}],
    }
    put = api.put("/v1/products/fresh-1", json=body)
    assert put.status_code == 200, put.text
    answer = put.json()
    assert answer["images_embedded"] == 2
    assert [p["item"] for p in answer["problems"]] == ["broken.gif"]
    assert {i["status"] for i in answer["product"]["images"]} == {"indexed"}

    def search_hats() -> list[str]:
        response = api.post(
            "/v1/search",
            params={"category": "hats", "top_k": 3},
            json={"image_b64": base64.b64encode(query).decode()},
        )
        assert response.status_code == 200, response.text
        return ids(response.json())

    assert search_hats() == ["fresh-1"]
    again = api.put("/v1/products/fresh-1", json=body).json()
    assert again["images_embedded"] == 0 and again["images_unchanged"] == 2
    fetched = api.get("/v1/products/fresh-1").json()
    assert fetched["title"] == "Fresh arrival" and fetched["price"] == 42.0
    assert fetched["attributes"] == {"colour": "mixed"}
    # One photo fewer: the one left out leaves the index.
    smaller = api.put("/v1/products/fresh-1", json={**body, "images": body["images"][:1]}).json()
    assert smaller["images_removed"] == 1 and len(smaller["product"]["images"]) == 1

    gone = api.delete("/v1/products/fresh-1")
    assert gone.status_code == 200 and gone.json()["images_removed"] == 1
    assert search_hats() == []
    assert api.get("/v1/products/fresh-1").status_code == 404
    assert api.delete("/v1/products/fresh-1").status_code == 404
    only_bad = api.put("/v1/products/fresh-2", json={**body, "images": body["images"][2:]})
    assert only_bad.status_code == 422
    assert "broken.gif" in only_bad.json()["errors"][0]["reason"]


def test_keys_and_scopes(server: Server, shop: tuple[GeneratedCatalog, Path]) -> None:
    catalog, _ = shop
    photo = catalog.held_out["p001"]
    with server.client(key=None) as anonymous:
        assert upload(anonymous, photo).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
    with server.client(key="x" * 30) as stranger:
        refused = upload(stranger, photo)
        assert refused.status_code == 401
        assert refused.json()["errors"][0] == {"field": "X-API-Key", "reason": "unknown API key"}
    with server.client(key=READ_KEY) as reader:
        assert upload(reader, photo).status_code == 200
        refused = reader.delete("/v1/products/p001")
        assert refused.status_code == 403
        assert reader.get("/v1/products/p001").status_code == 200  # still there
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}
    ) as bearer:
        assert upload(bearer, photo).status_code == 200


def test_limits_and_bad_input_get_json_errors_naming_the_field(
    api: httpx.Client, shop: tuple[GeneratedCatalog, Path]
) -> None:
    catalog, _ = shop
    big_body = api.post(
        "/v1/search", content=b"x" * (MAX_REQUEST_BYTES + 1), headers={"content-type": "image/jpeg"}
    )
    assert big_body.status_code == 413 and big_body.json()["errors"][0]["field"] == "body"
    chunked = api.post(
        "/v1/search",
        content=iter([b"{" + b" " * 600_000, b" " * 600_000]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413
    many_pixels = png_bytes(Image.new("RGB", (1100, 1000), (200, 10, 10)))
    refused = api.post("/v1/search", files={"image": ("huge.png", many_pixels)})
    assert refused.status_code == 413
    assert refused.json()["errors"][0]["field"] == "image"
    assert "pixels" in refused.json()["errors"][0]["reason"]
    wrong_type = api.post("/v1/search", content=b"abc", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    not_b64 = api.post("/v1/search", json={"image_b64": "***"})
    assert not_b64.status_code == 422
    assert not_b64.json()["errors"][0]["field"] == "body.image_b64"
    not_image = api.post("/v1/search", files={"image": ("x.jpg", b"plain text")})
    assert not_image.status_code == 422
    assert not_image.json()["errors"][0] == {
        "field": "image",
        "reason": "not a recognised image file",
    }
    bad_k = upload(api, catalog.held_out["p001"], top_k=0)
    assert bad_k.status_code == 422 and bad_k.json()["errors"][0]["field"] == "query.top_k"
    bad_n = upload(api, catalog.held_out["p001"], top_k=3, rerank_top_n=9)
    assert bad_n.status_code == 422
    assert bad_n.json()["errors"][0]["field"] == "query.rerank_top_n"
    extra = api.post("/v1/search", json={"image_b64": b64(catalog.held_out["p001"]), "x": 1})
    assert extra.status_code == 422 and extra.json()["errors"][0]["field"] == "body.x"
    no_folder = api.post("/v1/ingest", json={"catalog": "/nonexistent/catalog"})
    assert no_folder.status_code == 422
    assert no_folder.json()["errors"][0]["field"] == "body.catalog"
    no_version = api.post("/v1/admin/switch-embedder", json={"version_id": 999})
    assert no_version.status_code == 404
    assert no_version.json()["errors"][0]["field"] == "body.version_id"


def test_metrics_openapi_and_page(api: httpx.Client, shop: tuple[GeneratedCatalog, Path]) -> None:
    catalog, _ = shop
    assert upload(api, catalog.held_out["p002"]).status_code == 200
    text = api.get("/metrics").text
    assert 'searchsvc_queries_total{reranked="false"}' in text
    assert 'searchsvc_query_stage_seconds_bucket{le="0.002",stage="decode_embed"}' in text
    assert 'searchsvc_rerank_fallbacks_total{reason="no reranker is active"}' in text
    assert 'searchsvc_serving_model_version{kind="embedder"} 1.0' in text
    assert "searchsvc_http_in_flight_requests" in text
    schema = api.get("/openapi.json").json()
    assert {
        "/v1/search",
        "/v1/search/batch",
        "/v1/products/{product_id}/similar",
        "/v1/feedback",
        "/v1/products/{product_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(schema["paths"])
    page = api.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text


def test_docs_page_loads_its_scripts_from_the_server(api: httpx.Client) -> None:
    docs = api.get("/docs")
    assert docs.status_code == 200
    # Every script and stylesheet the page names is on this server: it opens offline.
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        asset = api.get(source)
        assert asset.status_code == 200 and len(asset.content) > 500, source
    assert "/openapi.json" in docs.text


def test_readiness_during_start_up_and_the_time_limit(tmp_path: Path) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=4, views=2)
    home = tmp_path / "home"
    ingest(home, catalog.root)
    slow_photo = png_bytes(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (1800, 1800, 3), np.uint8))
    )
    # Another process's hold on the embedded store keeps the server from opening it.
    holder = EdgeIndex(home / "qdrant")
    try:
        extra = {"SEARCHSVC_API_REQUEST_TIMEOUT_S": "0.002"}
        with running_server(home, extra, ready=False) as server, server.client() as client:
            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["ready"] is False
            assert any(m.startswith("index") for m in not_ready.json()["missing"])
            assert client.get("/healthz").status_code == 200
            early = client.post(
                "/v1/search", files={"image": ("a.jpg", catalog.held_out["p001"].read_bytes())}
            )
            assert early.status_code == 503
            assert "not ready" in early.json()["errors"][0]["reason"]
            holder.close()
            server.wait_ready()
            slow = client.post("/v1/search", files={"image": ("big.png", slow_photo)})
            assert slow.status_code == 408, slow.text
            assert "SEARCHSVC_API_REQUEST_TIMEOUT_S" in slow.json()["errors"][0]["reason"]
    finally:
        holder.close()
