"""The HTTP API of ``searchsvc serve``: FastAPI over the one query path.

:func:`create_api` takes its collaborators (a :class:`ServiceBackend`, which the
composition root's ``App`` is) and builds nothing of its own: every search is
:meth:`SearchService.query`, every catalog update the ingest coordinator's run.

Models load in a background thread after the socket is open, so ``/healthz`` answers at
once and ``/readyz`` says (503) what is still missing; searches wait for nothing: they are
refused with 503 until the service is ready.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at
# definition time, and they name dependencies local to create_api.

import base64
import binascii
import concurrent.futures
import dataclasses
import hmac
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image as PILImage
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select, text
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from searchsvc.core.config import Settings
from searchsvc.core.errors import (
    CatalogError,
    ImageError,
    IndexBackendError,
    NotFoundError,
    SearchsvcError,
)
from searchsvc.core.images import read_image_bytes
from searchsvc.index import IndexMode, VectorIndex
from searchsvc.jobs.ingest import DeleteLimit, IngestSummary, SyncRefused, parse_delete_limit
from searchsvc.jobs.products import product_view, remove_product, stage_product
from searchsvc.jobs.switch import SwapReport
from searchsvc.models.cache import ModelCache
from searchsvc.serving.feedback import record_feedback
from searchsvc.serving.http.fetch import FetchError, ImageFetcher
from searchsvc.serving.http.metrics import ApiMetrics
from searchsvc.serving.http.models import (
    BatchItem,
    BatchJson,
    BatchResponse,
    ErrorBody,
    ErrorItem,
    FeedbackIn,
    FeedbackOut,
    IngestIn,
    Problem,
    ProductDeleteOut,
    ProductIn,
    ProductOut,
    ProductUpdateOut,
    Readiness,
    SearchJson,
    SwitchIn,
)
from searchsvc.serving.search import QueryResponse, RerankStage, SearchService, served_embedder
from searchsvc.storage.catalog import ProductRecord, check_product_id
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind
from searchsvc.storage.versions import active_version

log = logging.getLogger(__name__)

MAX_TOP_K = 200
MAX_OFFSET = 1000
PAGE = Path(__file__).with_name("page.html")
DOCS_ASSETS = "/docs-assets"
QUERY_JSON = TypeAdapter(QueryResponse)
_SUFFIX_MEDIA = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}


class ServiceBackend(Protocol):
    """What the API needs of the composition root (``searchsvc.app.App`` is one)."""

    settings: Settings
    db: Database
    models: ModelCache

    def index(self, mode: IndexMode) -> VectorIndex: ...

    def search_service(
        self, rerank_stage: RerankStage | None = None, *, record_queries: bool = True
    ) -> SearchService: ...

    def ingest(
        self, root: Path, *, sync: bool = False, max_delete: DeleteLimit | None = None
    ) -> IngestSummary: ...

    def status(self) -> dict[str, Any]: ...

    def check_broker(self) -> None: ...

    def switch_embedder(self, version_id: int) -> SwapReport: ...


class ApiError(Exception):
    def __init__(self, status: int, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.field = field
        self.reason = reason


class BodyTooLarge(Exception):
    pass


def _error(status: int, field: str | None, reason: str) -> JSONResponse:
    body = ErrorBody(errors=[ErrorItem(field=field, reason=reason)])
    return JSONResponse(body.model_dump(), status_code=status)


class BodyLimit:
    """Refuse (413) a body over ``limit`` bytes: from Content-Length before reading it,
    and while reading a body sent without one."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _error(400, "Content-Length", "not a byte count")(scope, receive, send)
                    return
                if declared > self.limit:
                    reason = f"request body is {declared} bytes, over the limit of {self.limit}"
                    await _error(413, "body", reason)(scope, receive, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body is over the limit of {self.limit} bytes")
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:
            # Raised inside the app's body read (wherever a middleware reads it from).
            if started:
                raise
            await _error(413, "body", str(exc))(scope, receive, send)


class Observe:
    """Request counts, latency by route and requests in flight (a plain ASGI middleware:
    exceptions pass through it unwrapped)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.in_flight.dec()
            label = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)


@dataclass
class SearchParams:
    top_k: int
    offset: int
    filters: dict[str, str]
    price_min: float | None
    price_max: float | None
    rerank: bool | None
    rerank_top_n: int | None


class ServiceState:
    """What the warm-up thread has made ready, and what is still missing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.missing: list[str] = ["models: loading"]
        self.search: SearchService | None = None
        self.similar: SearchService | None = None
        self.index: VectorIndex | None = None
        self.stop = threading.Event()

    def services(self) -> tuple[SearchService, SearchService]:
        with self.lock:
            if self.search is None or self.similar is None:
                raise ApiError(503, None, "not ready: " + "; ".join(self.missing))
            return self.search, self.similar


def _photo_bytes(data: str, field: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, field, "not valid base64") from None
    if not raw:
        raise ApiError(422, field, "the image is empty")
    return raw


def create_api(backend: ServiceBackend, *, local_ingest: bool = False) -> FastAPI:
    """The ASGI app. ``local_ingest``: accept ``POST /v1/ingest`` of a folder on this
    machine (the embedded store's owner, bound to the loopback interface, only)."""
    settings = backend.settings
    db = backend.db
    metrics = ApiMetrics()
    state = ServiceState()
    write_lock = threading.Lock()  # catalog writes one at a time; searches never wait on it
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)
    }

    def warm_up() -> None:
        broker = bool(settings.broker_url)
        while not state.stop.is_set():
            missing: list[str] = []
            try:
                with db.session() as session:
                    session.execute(text("SELECT 1"))
            except Exception as exc:  # any driver error: readiness reports, never raises
                missing.append(f"database: {type(exc).__name__}: {exc}")
            index = None
            with state.lock:
                state.missing = missing + ["index: opening (waits for another holder)"]
            try:
                index = backend.index("write")  # embedded: this process becomes its owner
            except SearchsvcError as exc:
                missing.append(f"index: {exc}")
            if index is not None:
                try:
                    version = served_embedder(db, index, settings.collection_alias)
                    backend.models.embedder(version)
                    stir = active_version(db, ModelKind.STIR)
                    if stir is not None and not broker:
                        backend.models.stir(stir)  # this process's task threads rerank
                except IndexBackendError as exc:
                    missing.append(f"index: {exc}")
                except SearchsvcError as exc:
                    missing.append(f"models: {exc}")
            if broker:
                try:
                    backend.check_broker()
                except SearchsvcError as exc:
                    missing.append(f"broker: {exc}")
            if not missing:
                with state.lock:
                    state.index = index
                    state.search = backend.search_service()
                    state.similar = backend.search_service(record_queries=False)
                    state.missing = []
                log.info("searchsvc API ready")
                return
            with state.lock:
                state.missing = missing
            state.stop.wait(1.0)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=warm_up, name="searchsvc-warm-up", daemon=True)
        thread.start()
        try:
            yield
        finally:
            state.stop.set()

    app = FastAPI(
        title="searchsvc",
        version="1",
        summary="Image search for product catalogs: upload a photo, get the products.",
        lifespan=lifespan,
        docs_url=None,  # served below from the installed swagger-ui files, not a CDN
        redoc_url=None,
    )

    keys = settings.api_key_scopes  # parsed once: settings do not change while serving

    def require(scope_needed: str) -> Callable[..., Awaitable[None]]:
        # async: cheap checks run on the event loop, not a hop to a worker thread each.
        async def check(request: Request, key: str | None = Depends(key_header)) -> None:
            if not keys:
                return
            if not key:
                bearer = request.headers.get("authorization", "")
                key = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
            if not key:
                raise ApiError(401, "X-API-Key", "an API key is required")
            given = key.encode("utf-8", "surrogateescape")
            scope = next(
                (s for k, s in keys.items() if hmac.compare_digest(k.encode(), given)), None
            )
            if scope is None:
                raise ApiError(401, "X-API-Key", "unknown API key")
            if scope_needed == "write" and scope != "write":
                raise ApiError(403, "X-API-Key", "this key may read, not write")

        return check

    read = [Depends(require("read"))]
    write = [Depends(require("write"))]

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.field, exc.reason)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, "body", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        items = [
            ErrorItem(field=".".join(str(part) for part in e.get("loc", ())), reason=e["msg"])
            for e in exc.errors()
        ]
        return JSONResponse(ErrorBody(errors=items).model_dump(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 400 is the framework's answer to a body it cannot parse (malformed JSON or form).
        return _error(exc.status_code, "body" if exc.status_code == 400 else None, str(exc.detail))

    # ------------------------------------------------------------------ middleware
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.api_cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
        )
    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.api_max_request_bytes)

    # ------------------------------------------------------------------ helpers
    async def in_thread(function: Callable[[], Any], *, timeout: bool = True) -> Any:
        """Run blocking work off the event loop; over the time limit, answer 408 (the work
        itself finishes in its thread: a product update may still land, and may be sent
        again, being idempotent)."""
        if not timeout:
            return await anyio.to_thread.run_sync(function)
        try:
            with anyio.fail_after(settings.api_request_timeout_s):
                return await anyio.to_thread.run_sync(function, abandon_on_cancel=True)
        except TimeoutError:
            raise ApiError(
                408,
                None,
                f"not answered within SEARCHSVC_API_REQUEST_TIMEOUT_S "
                f"({settings.api_request_timeout_s:g} s)",
            ) from None

    def check_photo(data: bytes, field: str) -> None:
        if len(data) > settings.max_image_bytes:
            raise ApiError(
                413,
                field,
                f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}",
            )
        try:
            with PILImage.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:  # not an image: the query path's decoder names the reason
            return
        if width * height > settings.max_image_pixels:
            raise ApiError(
                413,
                field,
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{settings.max_image_pixels}",
            )

    fetcher = (
        ImageFetcher(
            settings.api_image_url_allowlist,
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.api_image_url_timeout_s,
        )
        if settings.api_image_url_allowlist
        else None
    )

    async def fetched(url: str) -> bytes:
        """The photo at ``url`` (blocking: fetched in a thread, within the request's time)."""
        if fetcher is None:
            raise ApiError(
                422,
                "body.image_url",
                "fetching photos by URL is off: SEARCHSVC_API_IMAGE_URL_HOSTS names the "
                "hosts it may fetch from (send the photo as multipart 'image' or image_b64)",
            )
        state.services()  # 503 before any fetch while the service is not ready

        def run() -> bytes:
            try:
                return fetcher.fetch(url)
            except FetchError as exc:
                raise ApiError(exc.status, "body.image_url", exc.reason) from None

        data: bytes = await in_thread(run)
        return data

    async def photos_of(request: Request, *, many: bool) -> list[tuple[str, bytes]]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        field = "images" if many else "image"
        if content_type == "multipart/form-data":
            limit = settings.api_max_batch_images if many else 1
            form = await request.form(max_files=limit + 1, max_fields=limit + 16)
            uploads = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
            if not uploads:
                raise ApiError(422, field, "expected a file upload in this multipart field")
            if len(uploads) > limit:
                raise ApiError(422, field, f"at most {limit} file(s) per request")
            photos = [(upload.filename or field, await upload.read()) for upload in uploads]
            for name, data in photos:
                if not data:
                    raise ApiError(422, field, f"{name}: the uploaded file is empty")
            return photos
        if content_type == "application/json":
            body = await request.body()
            try:
                if many:
                    batch = BatchJson.model_validate_json(body)
                    encoded = batch.images_b64
                else:
                    one = SearchJson.model_validate_json(body)
                    if one.image_url is not None:
                        return [("image_url", await fetched(one.image_url))]
                    assert one.image_b64 is not None  # exactly one of the two: validated
                    encoded = [one.image_b64]
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = first.get("loc", ())
                # A search field's loc may go on with the arm of its Optional ("str").
                parts = loc if many else loc[:1]
                where = ".".join(str(part) for part in parts) or "body"
                raise ApiError(422, f"body.{where}", first["msg"]) from None
            if many and len(encoded) > settings.api_max_batch_images:
                raise ApiError(
                    422, "body.images_b64", f"at most {settings.api_max_batch_images} images"
                )
            name = "images_b64" if many else "image_b64"
            return [
                (f"{name}[{i}]" if many else name, _photo_bytes(text_, f"body.{name}"))
                for i, text_ in enumerate(encoded)
            ]
        raise ApiError(
            415,
            "Content-Type",
            f"expected multipart/form-data (field {field!r}) or application/json, "
            f"got {content_type or 'none'}",
        )

    def make_params(
        top_k: int | None,
        offset: int,
        filters: dict[str, str],
        price_min: float | None,
        price_max: float | None,
        rerank: bool | None,
        rerank_top_n: int | None,
    ) -> SearchParams:
        wanted = top_k or settings.top_k
        if price_min is not None and price_max is not None and price_min > price_max:
            raise ApiError(422, "query.price_min", "must not be above price_max")
        if rerank_top_n is not None and rerank_top_n > offset + wanted:
            raise ApiError(
                422, "query.rerank_top_n", f"must be at most offset + top_k ({offset + wanted})"
            )
        return SearchParams(wanted, offset, filters, price_min, price_max, rerank, rerank_top_n)

    async def similar_params(
        top_k: int | None = Query(None, ge=1, le=MAX_TOP_K, description="Products to return."),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Skip this many (pagination)."),
        category: str | None = Query(None, min_length=1, max_length=255),
        price_min: float | None = Query(None, ge=0, allow_inf_nan=False),
        price_max: float | None = Query(None, ge=0, allow_inf_nan=False),
        rerank: bool | None = Query(None, description="STIR on or off (default: the setting)."),
        rerank_top_n: int | None = Query(None, ge=2, le=MAX_TOP_K + MAX_OFFSET),
    ) -> SearchParams:
        filters = {"category": category} if category else {}
        return make_params(top_k, offset, filters, price_min, price_max, rerank, rerank_top_n)

    async def search_params(
        top_k: int | None = Query(None, ge=1, le=MAX_TOP_K, description="Products to return."),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Skip this many (pagination)."),
        category: str | None = Query(None, min_length=1, max_length=255),
        product_id: str | None = Query(None, min_length=1, max_length=255),
        price_min: float | None = Query(None, ge=0, allow_inf_nan=False),
        price_max: float | None = Query(None, ge=0, allow_inf_nan=False),
        rerank: bool | None = Query(None, description="STIR on or off (default: the setting)."),
        rerank_top_n: int | None = Query(None, ge=2, le=MAX_TOP_K + MAX_OFFSET),
    ) -> SearchParams:
        filters = {k: v for k, v in (("category", category), ("product_id", product_id)) if v}
        return make_params(top_k, offset, filters, price_min, price_max, rerank, rerank_top_n)

    def as_json(response: QueryResponse) -> Response:
        # The answer is built by our own code, typed: serialized as it is, not validated
        # again against its own model as FastAPI does with a returned object (the schema
        # still comes from response_model).
        return Response(QUERY_JSON.dump_json(response), media_type="application/json")

    def answer(
        service: SearchService, data: bytes, source: str, p: SearchParams, field: str
    ) -> QueryResponse:
        check_photo(data, field)
        try:
            response = service.query(
                data,
                source,
                top_k=p.offset + p.top_k,
                filters=p.filters,
                rerank=p.rerank,
                rerank_top_n=p.rerank_top_n,
                price_min=p.price_min,
                price_max=p.price_max,
            )
        except ImageError as exc:
            raise ApiError(422, field, exc.reason) from None
        except IndexBackendError as exc:
            raise ApiError(503, None, str(exc)) from None
        except SearchsvcError as exc:
            raise ApiError(422, None, str(exc)) from None
        response.results = response.results[p.offset :]
        metrics.observe_query(response)
        return response

    search_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}},
                    }
                },
                "application/json": {"schema": SearchJson.model_json_schema()},
            },
        }
    }
    batch_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                "application/json": {"schema": BatchJson.model_json_schema()},
            },
        }
    }

    # ------------------------------------------------------------------ search
    @app.post(
        "/v1/search",
        response_model=QueryResponse,
        responses=errors,
        dependencies=read,
        openapi_extra=search_body,
        summary="Products matching a photo (multipart 'image', JSON image_b64 or image_url)",
    )
    async def search(
        request: Request, p: Annotated[SearchParams, Depends(search_params)]
    ) -> Response:
        photos = await photos_of(request, many=False)
        service, _ = state.services()
        name, data = photos[0]
        field = "body.image_url" if name == "image_url" else "image"
        return await in_thread(lambda: as_json(answer(service, data, name, p, field)))

    @app.post(
        "/v1/search/batch",
        response_model=BatchResponse,
        responses=errors,
        dependencies=read,
        openapi_extra=batch_body,
        summary="Several photos at once (multipart 'images', or JSON images_b64; no URLs)",
    )
    async def search_batch(
        request: Request, p: Annotated[SearchParams, Depends(search_params)]
    ) -> BatchResponse:
        photos = await photos_of(request, many=True)
        service, _ = state.services()

        def one(position: int, name: str, data: bytes) -> BatchItem:
            try:
                return BatchItem(index=position, response=answer(service, data, name, p, name))
            except ApiError as exc:
                return BatchItem(
                    index=position, error=ErrorItem(field=exc.field, reason=exc.reason)
                )

        def run_all() -> list[BatchItem]:
            # Side by side: their reranks reach the STIR batcher together and share forwards.
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(photos)) as pool:
                futures = [pool.submit(one, i, n, d) for i, (n, d) in enumerate(photos)]
                return [f.result() for f in futures]

        items = await in_thread(run_all)
        return BatchResponse(
            items=items,
            rerank_note=(
                "photos searched concurrently; reranks that meet in the STIR batcher share "
                "a forward (up to SEARCHSVC_RERANK_MAX_BATCH_PAIRS pairs)"
            ),
        )

    @app.get(
        "/v1/products/{product_id}/similar",
        response_model=QueryResponse,
        responses=errors,
        dependencies=read,
        summary="More like this: products similar to an indexed product's first photo",
    )
    async def similar(
        product_id: str, p: Annotated[SearchParams, Depends(similar_params)]
    ) -> Response:
        _, service = state.services()

        def run() -> Response:
            with db.session() as session:
                row = session.scalars(
                    select(Image)
                    .where(Image.product_id == product_id, Image.status == ImageStatus.INDEXED)
                    .order_by(Image.id)
                ).first()
                source = None if row is None else Path(row.source_path)
            if source is None:
                raise ApiError(404, "product_id", f"product {product_id!r} has no indexed image")
            try:
                data = read_image_bytes(source, settings.max_image_bytes)
            except ImageError as exc:
                raise ApiError(
                    404, "product_id", f"its photo cannot be read: {exc.reason}"
                ) from None
            # One more than asked: the product itself comes first and is left out.
            wider = SearchParams(**{**p.__dict__, "top_k": p.top_k + 1})
            response = answer(service, data, str(source), wider, "product_id")
            others = [r for r in response.results if r.product_id != product_id][: p.top_k]
            response.results = [
                dataclasses.replace(r, rank=p.offset + position)
                for position, r in enumerate(others, start=1)
            ]
            return as_json(response)

        return await in_thread(run)

    @app.post("/v1/feedback", response_model=FeedbackOut, responses=errors, dependencies=read)
    async def feedback(body: FeedbackIn) -> FeedbackOut:
        def run() -> FeedbackOut:
            try:
                feedback_id = record_feedback(
                    db, body.query_id, body.product_id, positive=body.positive
                )
            except NotFoundError as exc:
                field = "body.query_id" if str(exc).startswith("query") else "body.product_id"
                raise ApiError(404, field, str(exc)) from None
            return FeedbackOut(
                feedback_id=feedback_id,
                query_id=body.query_id,
                product_id=body.product_id,
                positive=body.positive,
            )

        return await in_thread(run)

    # ------------------------------------------------------------------ products
    def checked_id(product_id: str) -> str:
        problem = check_product_id(product_id)
        if problem is None and product_id.startswith("."):
            problem = "product_id must not start with '.'"
        if problem:
            raise ApiError(422, "path.product_id", problem)
        return product_id

    @app.put(
        "/v1/products/{product_id}",
        response_model=ProductUpdateOut,
        responses=errors,
        dependencies=write,
        summary="Create or replace a product (metadata + images); searchable on return",
    )
    async def put_product(product_id: str, body: ProductIn) -> ProductUpdateOut:
        checked_id(product_id)
        reserved = sorted(
            {"product_id", "title", "category", "price", "url"} & body.attributes.keys()
        )
        if reserved:
            raise ApiError(
                422, f"body.attributes.{reserved[0]}", "a reserved name: set it directly"
            )
        images = [
            (
                image.name or f"images[{i}]",
                _photo_bytes(image.data_b64, f"body.images[{i}].data_b64"),
            )
            for i, image in enumerate(body.images)
        ]
        record = ProductRecord(
            product_id=product_id,
            title=body.title,
            category=body.category,
            price=body.price,
            url=body.url,
            attributes=dict(body.attributes),
        )

        def run() -> ProductUpdateOut:
            with write_lock:
                staged = stage_product(
                    settings.home, record, images, max_pixels=settings.max_image_pixels
                )
                if not staged.filenames:
                    raise ApiError(
                        422,
                        "body.images",
                        "no image could be used: "
                        + "; ".join(f"{p.item}: {p.reason}" for p in staged.problems),
                    )
                # The staged root holds this one product: its sync removes only the photos
                # the request dropped, which is what a PUT means, so no share limit applies.
                summary = backend.ingest(staged.root, sync=True, max_delete=DeleteLimit())
            metrics.observe_ingest(summary.counts())
            view = product_view(db, product_id)
            if view is None:  # every image failed to embed
                raise ApiError(
                    422,
                    "body.images",
                    "; ".join(f"{p.item}: {p.reason}" for p in summary.problems)
                    or "no image was indexed",
                )
            return ProductUpdateOut(
                product=ProductOut(**view),
                images_embedded=summary.images_embedded,
                images_unchanged=summary.images_unchanged,
                images_removed=summary.images_removed,
                problems=[
                    Problem(item=p.item, reason=p.reason)
                    for p in [*staged.problems, *summary.problems]
                ],
            )

        return await in_thread(run)

    @app.get(
        "/v1/products/{product_id}", response_model=ProductOut, responses=errors, dependencies=read
    )
    async def get_product(product_id: str) -> ProductOut:
        view = await in_thread(lambda: product_view(db, product_id))
        if view is None:
            raise ApiError(404, "path.product_id", f"no product {product_id!r}")
        return ProductOut(**view)

    @app.delete(
        "/v1/products/{product_id}",
        response_model=ProductDeleteOut,
        responses=errors,
        dependencies=write,
        summary="Take a product out of search; gone on return",
    )
    async def delete_product(product_id: str) -> ProductDeleteOut:
        if product_view(db, product_id) is None:
            raise ApiError(404, "path.product_id", f"no product {product_id!r}")

        def run() -> int:
            with write_lock:
                index = backend.index("write")
                collection = index.resolve_alias(settings.collection_alias)
                return remove_product(settings.home, db, index, collection, product_id)

        removed = await in_thread(run)
        return ProductDeleteOut(product_id=product_id, images_removed=removed)

    @app.get(
        "/v1/images/{image_id}",
        responses={**errors, 200: {"content": {"image/*": {}}}},
        dependencies=read,
        summary="A catalog image's file (the page's thumbnails)",
    )
    async def image_file(
        image_id: Annotated[int, PathParam(ge=1, le=2**63 - 1)],
    ) -> Response:
        def run() -> tuple[bytes, str]:
            with db.session() as session:
                row = session.get(Image, image_id)
                path = None if row is None or row.status == ImageStatus.REMOVED else row.source_path
            if path is None:
                raise ApiError(404, "path.image_id", f"no image {image_id}")
            try:
                data = read_image_bytes(Path(path), settings.max_image_bytes)
            except ImageError as exc:
                raise ApiError(404, "path.image_id", exc.reason) from None
            return data, _SUFFIX_MEDIA.get(Path(path).suffix.lower(), "application/octet-stream")

        data, media = await in_thread(run)
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ operations
    @app.get("/v1/status", response_model=dict[str, Any], responses=errors, dependencies=read)
    async def status() -> dict[str, Any]:
        state.services()  # 503 until the index is open
        return await in_thread(backend.status)

    @app.post("/v1/ingest", response_model=dict[str, Any], responses=errors, dependencies=write)
    async def ingest(body: IngestIn) -> dict[str, Any]:
        """Ingest a catalog folder on this machine (the embedded store's owner only): what
        ``searchsvc ingest`` sends while a server holds the store."""
        if not local_ingest:
            raise ApiError(
                403,
                None,
                "folder ingests go through this server only when it owns an embedded "
                "store on the loopback interface",
            )

        try:
            limit = (
                DeleteLimit()
                if body.force
                else parse_delete_limit(body.max_delete)
                if body.max_delete
                else None
            )
        except ValueError as exc:
            raise ApiError(422, "body.max_delete", str(exc)) from None

        def run() -> dict[str, Any]:
            with write_lock:
                try:
                    summary = backend.ingest(Path(body.catalog), sync=body.sync, max_delete=limit)
                except CatalogError as exc:
                    raise ApiError(422, "body.catalog", str(exc)) from None
                except SyncRefused as exc:
                    raise ApiError(409, "body.sync", str(exc)) from None
            metrics.observe_ingest(summary.counts())
            return {
                "run_id": summary.run_id,
                **summary.counts(),
                "problems": [{"item": p.item, "reason": p.reason} for p in summary.problems],
            }

        return await in_thread(run, timeout=False)

    @app.post(
        "/v1/admin/switch-embedder",
        response_model=dict[str, Any],
        responses=errors,
        dependencies=write,
        summary="Re-embed the catalog with an embedder version and move queries to it",
    )
    async def switch(body: SwitchIn) -> dict[str, Any]:
        """What a retrain's promotion sends while this server owns the embedded store: the
        switch runs here, queries go on being answered by the old pair until the alias
        moves."""
        if not local_ingest:
            raise ApiError(
                403,
                None,
                "switches go through this server only when it owns an embedded store on the "
                "loopback interface",
            )

        def run() -> dict[str, Any]:
            with write_lock:
                try:
                    return backend.switch_embedder(body.version_id).to_json()
                except NotFoundError as exc:
                    raise ApiError(404, "body.version_id", str(exc)) from None
                except SearchsvcError as exc:
                    raise ApiError(422, "body.version_id", str(exc)) from None

        return await in_thread(run, timeout=False)

    @app.get("/healthz", response_model=dict[str, str])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> Response:
        with state.lock:
            missing = list(state.missing)
            index = state.index
        if not missing and index is not None:
            missing = await in_thread(lambda: live_check(index))
        body = Readiness(ready=not missing, missing=missing)
        return JSONResponse(body.model_dump(), status_code=200 if not missing else 503)

    def live_check(index: VectorIndex) -> list[str]:
        missing = []
        try:
            with db.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error is a readiness answer
            missing.append(f"database: {type(exc).__name__}: {exc}")
        try:
            if index.resolve_alias(settings.collection_alias) is None:
                missing.append(f"index: no collection '{settings.collection_alias}'")
        except SearchsvcError as exc:
            missing.append(f"index: {exc}")
        if settings.broker_url:
            try:
                backend.check_broker()
            except SearchsvcError as exc:
                missing.append(f"broker: {exc}")
        return missing

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics_page() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    # The API's docs page opens offline (a shop's backend often has no internet): its
    # scripts come from the swagger-ui-bundle package, not from a CDN.
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="searchsvc API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    app.state.service_state = state
    app.state.metrics = metrics
    return app
