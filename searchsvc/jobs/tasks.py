"""The work that tasks do, as plain functions: a request in, a JSON-able result out.

Celery workers (``workers/``) wrap these functions and nothing else; in embedded mode the
in-process dispatcher calls them directly. Either way the same code runs.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from searchsvc.core.config import Settings
from searchsvc.core.errors import ImageError, SearchsvcError
from searchsvc.core.images import content_hash, load_pixels, read_image_bytes
from searchsvc.index import IndexPoint, VectorIndex, point_id_for
from searchsvc.jobs.boundary import check_candidate_hashes, registered_items
from searchsvc.jobs.deliveries import DeliveryLedger
from searchsvc.jobs.wire import (
    EMBED_TASK,
    RERANK_TASK,
    EmbedItem,
    EmbedRequest,
    EmbedResponse,
    EmbedResult,
    RerankRequest,
    RerankResponse,
    decode_pixels,
    encode_vector,
    parse_request,
)
from searchsvc.models.cache import ModelCache
from searchsvc.models.embedder import Embedder
from searchsvc.storage.db import Database, ModelKind
from searchsvc.storage.pixels import PixelStore
from searchsvc.storage.versions import version as registered_version


class TaskTimeLimitExceeded(SearchsvcError):
    """A task ran past its own deadline (SEARCHSVC_TASK_TIME_LIMIT_S, or the rerank
    timeout): it stops, in any pool, and its work is left for a re-run."""


@dataclass
class TaskContext:
    """What a process needs to run tasks: built once per process (worker or CLI)."""

    settings: Settings
    db: Database
    models: ModelCache
    pixels: PixelStore
    index_factory: Callable[[], VectorIndex] | None = None
    _index: VectorIndex | None = None

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            if self.index_factory is None:
                raise RuntimeError("this process has no vector index to write to")
            self._index = self.index_factory()
        return self._index


def embed_images(request: EmbedRequest, ctx: TaskContext) -> EmbedResponse:
    """Read, check, decode and embed a batch of catalog images.

    Each image that cannot be used gets an error naming the file and the reason; the others
    are embedded. The preprocessed pixels are kept for the reranker.
    """
    version = registered_version(ctx.db, request.embedder_version, ModelKind.EMBEDDER)
    if request.collection != version.collection:
        raise SearchsvcError(
            f"embedder version {version.id} writes collection {version.collection}, "
            f"not {request.collection}"
        )
    settings = ctx.settings
    deadline = time.monotonic() + settings.task_time_limit_s

    def check_deadline(doing: str) -> None:
        if time.monotonic() > deadline:
            raise TaskTimeLimitExceeded(
                f"embed task past its time limit of {settings.task_time_limit_s:g} s while "
                f"{doing} (SEARCHSVC_TASK_TIME_LIMIT_S); its images stay pending"
            )

    embedder = ctx.models.embedder(version)
    ledger = DeliveryLedger(ctx.db, ctx.settings.embed_max_deliveries)
    unfinished = ledger.unfinished(request.items)
    results: dict[int, EmbedResult] = {}

    def delivered(items: list[EmbedItem]) -> dict[int, EmbedResult]:
        ledger.started(items)
        try:
            done = _embed_items(request, items, ctx, embedder, check_deadline)
        except TaskTimeLimitExceeded:
            ledger.finished(items)  # out of time is not a delivery that died
            raise
        ledger.finished(items)
        return done

    if not any(unfinished.values()):
        results = delivered(request.items)
    else:
        # An earlier delivery of these images died: one image at a time, each counted
        # alone, so that only the one under way when a worker dies is held against it.
        for item in request.items:
            deliveries = unfinished.get(item.image_id, 0)
            if deliveries >= ledger.max_deliveries:
                reason = ledger.give_up(item, deliveries, request.embedder_version)
                results[item.image_id] = EmbedResult(item.image_id, error=reason)
                continue
            results.update(delivered([item]))
    return EmbedResponse(
        embedder_version=request.embedder_version,
        results=[results[item.image_id] for item in request.items],
        indexed_by_worker=request.write_index,
    )


def _embed_items(
    request: EmbedRequest,
    items: list[EmbedItem],
    ctx: TaskContext,
    embedder: Embedder,
    check_deadline: Callable[[str], None],
) -> dict[int, EmbedResult]:
    size = embedder.info.input_size
    settings = ctx.settings

    ok_items: list[EmbedItem] = []
    pixel_rows: list[np.ndarray] = []
    results: dict[int, EmbedResult] = {}
    # The files, products and hashes are the database's, not the message's (boundary).
    checked = registered_items(ctx.db, items)
    for image_id, reason in checked.refused.items():
        results[image_id] = EmbedResult(image_id, error=reason)
    for item in checked.items.values():
        check_deadline(f"reading {item.path}")
        try:
            data = read_image_bytes(Path(item.path), settings.max_image_bytes)
            if content_hash(data) != item.content_hash:
                raise ImageError(item.path, "file changed since it was registered; re-run ingest")
            pixels, (width, height) = load_pixels(
                data, item.path, size=size, max_pixels=settings.max_image_pixels
            )
        except ImageError as exc:
            results[item.image_id] = EmbedResult(item.image_id, error=exc.reason)
            continue
        except Exception as exc:  # noqa: BLE001 - one image's surprise must not fail its batch
            reason = f"unexpected error reading the image ({type(exc).__name__}: {exc})"
            results[item.image_id] = EmbedResult(item.image_id, error=reason)
            continue
        ok_items.append(item)
        pixel_rows.append(pixels)
        results[item.image_id] = EmbedResult(item.image_id, width=width, height=height)

    if ok_items:
        # One transaction for the batch, before any point exists: a candidate the reranker
        # finds in the index always has its pixels.
        ctx.pixels.put_many(
            (item.content_hash, pixels) for item, pixels in zip(ok_items, pixel_rows, strict=True)
        )
        check_deadline("about to embed")
        vectors = embedder.embed(np.stack(pixel_rows), batch_size=settings.batch_size)
        check_deadline("embedding")  # the caller has given up on it: write nothing
        if request.write_index:
            ctx.index.upsert(
                request.collection,
                [
                    IndexPoint(
                        point_id=point_id_for(item.product_id, item.content_hash),
                        vector=vector,
                        product_id=item.product_id,
                        image_id=item.image_id,
                        category=item.category,
                    )
                    for item, vector in zip(ok_items, vectors, strict=True)
                ],
            )
        for item, vector in zip(ok_items, vectors, strict=True):
            done = results[item.image_id]
            results[item.image_id] = EmbedResult(
                item.image_id,
                vector_b64=None if request.write_index else encode_vector(vector),
                width=done.width,
                height=done.height,
            )
    return results


def rerank(request: RerankRequest, ctx: TaskContext) -> RerankResponse:
    """STIR distances of (query, candidate) pairs: pixels from the store, one forward.

    Requests that arrive together (a worker serving several queries) share a forward pass
    through the version's micro-batcher.
    """
    started = time.perf_counter()
    version = registered_version(ctx.db, request.stir_version, ModelKind.STIR)
    scorer, batcher = ctx.models.stir(version)
    size = scorer.info.input_size
    if request.size != size:
        raise ValueError(f"query pixels are {request.size}px, STIR v{version.id} takes {size}px")
    query = decode_pixels(request.query_pixels_b64, size)
    check_candidate_hashes(request.candidate_hashes, ctx.settings.rerank_max_batch_pairs)
    candidates = [ctx.pixels.get(digest, size) for digest in request.candidate_hashes]
    loaded = time.perf_counter()
    # The caller stops waiting after its rerank timeout (and answers from the first
    # stage); the task stops waiting on the shared forward too, in any pool, instead of
    # holding a thread. (Loading a model, once per process, is not counted against it.)
    future = batcher.submit([(query, c) for c in candidates])
    try:
        scores = future.result(timeout=ctx.settings.rerank_timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()  # not scored if its forward has not begun
        raise TaskTimeLimitExceeded(
            f"rerank past its deadline of {ctx.settings.rerank_timeout_s:g} s "
            "(SEARCHSVC_RERANK_TIMEOUT_S)"
        ) from None
    distances = [float(d) for d in scores]
    done = time.perf_counter()
    return RerankResponse(
        stir_version=version.id,
        distances=distances,
        timings_ms={
            "load_pixels": (loaded - started) * 1000,
            "forward": (done - loaded) * 1000,
        },
    )


def task_functions(ctx: TaskContext) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """Task name -> JSON-in/JSON-out function, for the in-process dispatcher and workers."""

    def embed(payload: dict[str, Any]) -> dict[str, Any]:
        return embed_images(parse_request(EmbedRequest, payload), ctx).to_json()

    def rerank_task(payload: dict[str, Any]) -> dict[str, Any]:
        return rerank(parse_request(RerankRequest, payload), ctx).to_json()

    return {EMBED_TASK: embed, RERANK_TASK: rerank_task}
