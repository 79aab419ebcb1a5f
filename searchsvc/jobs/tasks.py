"""The work that tasks do, as plain functions: JSON-able request in, JSON-able result out.

Celery workers (``workers/``) wrap these functions and nothing else; in embedded mode the
in-process dispatcher calls them directly. Either way the same code runs.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from searchsvc.core.config import Settings
from searchsvc.core.errors import ImageError
from searchsvc.core.images import content_hash, load_pixels, read_image_bytes
from searchsvc.index import IndexPoint, VectorIndex, point_id_for
from searchsvc.jobs.model_store import ActiveVersion, ModelCache
from searchsvc.models.fusion import fuse_distances
from searchsvc.storage.db import Database
from searchsvc.storage.pixels import PixelStore

EMBED_TASK = "searchsvc.embed_images"
RERANK_TASK = "searchsvc.rerank"


def encode_vector(vector: np.ndarray) -> str:
    """float32 vector -> base64 text: exact, and 4x smaller than a JSON list of floats."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


@dataclass(frozen=True)
class EmbedItem:
    image_id: int
    product_id: str
    path: str
    content_hash: str
    category: str | None = None


@dataclass(frozen=True)
class EmbedRequest:
    items: list[EmbedItem]
    embedder_version: int
    embedder_file: str
    collection: str
    write_index: bool = False
    """True: the worker upserts the points itself (Qdrant server); False: it returns vectors
    and the ingest coordinator writes them (an embedded store opens in one process only)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbedRequest:
        return cls(
            items=[EmbedItem(**item) for item in data["items"]],
            embedder_version=int(data["embedder_version"]),
            embedder_file=str(data["embedder_file"]),
            collection=str(data["collection"]),
            write_index=bool(data.get("write_index", False)),
        )


@dataclass(frozen=True)
class EmbedResult:
    image_id: int
    error: str | None = None
    vector_b64: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class EmbedResponse:
    embedder_version: int
    results: list[EmbedResult] = field(default_factory=list)
    indexed_by_worker: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbedResponse:
        return cls(
            embedder_version=int(data["embedder_version"]),
            results=[EmbedResult(**item) for item in data["results"]],
            indexed_by_worker=bool(data.get("indexed_by_worker", False)),
        )


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
    version = ActiveVersion(request.embedder_version, Path(request.embedder_file), None)
    _, embedder = ctx.models.embedder(version)
    size = embedder.info.input_size
    settings = ctx.settings

    ok_items: list[EmbedItem] = []
    pixel_rows: list[np.ndarray] = []
    results: dict[int, EmbedResult] = {}
    for item in request.items:
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
        ok_items.append(item)
        pixel_rows.append(pixels)
        results[item.image_id] = EmbedResult(item.image_id, width=width, height=height)

    if ok_items:
        # One transaction for the batch, before any point exists: a candidate the reranker
        # finds in the index always has its pixels.
        ctx.pixels.put_many(
            (item.content_hash, pixels) for item, pixels in zip(ok_items, pixel_rows, strict=True)
        )
        vectors = embedder.embed(np.stack(pixel_rows), batch_size=settings.batch_size)
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
    return EmbedResponse(
        embedder_version=request.embedder_version,
        results=[results[item.image_id] for item in request.items],
        indexed_by_worker=request.write_index,
    )


def encode_pixels(pixels: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).decode()


def decode_pixels(text: str, size: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if raw.size != size * size * 3:
        raise ValueError(f"query pixels hold {raw.size} values, expected {size}x{size}x3")
    return raw.reshape(size, size, 3)


@dataclass(frozen=True)
class RerankRequest:
    stir_version: int
    stir_file: str
    size: int
    query_pixels_b64: str
    """The query photo, preprocessed to the reranker's input (sent inline: it exists only
    in the caller's memory)."""
    candidate_hashes: list[str]
    """Content hashes of the candidate images, whose pixels the worker reads from the
    shared pixel store."""
    first_stage_distances: list[float] | None = None
    """The candidates' first-stage distances (best first), for a STIR whose file carries a
    fusion weight (:func:`searchsvc.models.fusion.fuse_distances`)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RerankRequest:
        return cls(
            stir_version=int(data["stir_version"]),
            stir_file=str(data["stir_file"]),
            size=int(data["size"]),
            query_pixels_b64=str(data["query_pixels_b64"]),
            candidate_hashes=[str(h) for h in data["candidate_hashes"]],
            first_stage_distances=(
                None
                if data.get("first_stage_distances") is None
                else [float(d) for d in data["first_stage_distances"]]
            ),
        )


@dataclass(frozen=True)
class RerankResponse:
    stir_version: int
    distances: list[float]
    timings_ms: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RerankResponse:
        return cls(
            stir_version=int(data["stir_version"]),
            distances=[float(d) for d in data["distances"]],
            timings_ms={k: float(v) for k, v in data.get("timings_ms", {}).items()},
        )


def rerank(request: RerankRequest, ctx: TaskContext) -> RerankResponse:
    """STIR distances of (query, candidate) pairs: pixels from the store, one forward.

    Requests that arrive together (a worker serving several queries) share a forward pass
    through the version's micro-batcher. A STIR calibrated with a fusion weight blends in
    the first-stage distances the request carries (it must carry them).
    """
    started = time.perf_counter()
    version = ActiveVersion(request.stir_version, Path(request.stir_file), None)
    scorer, batcher = ctx.models.stir(version)
    size = scorer.info.input_size
    if request.size != size:
        raise ValueError(f"query pixels are {request.size}px, STIR v{version.id} takes {size}px")
    query = decode_pixels(request.query_pixels_b64, size)
    candidates = [ctx.pixels.get(digest, size) for digest in request.candidate_hashes]
    loaded = time.perf_counter()
    weight = scorer.info.fusion_weight
    first = request.first_stage_distances
    if weight > 0 and (first is None or len(first) != len(candidates)):
        raise ValueError(
            f"STIR v{version.id} blends first-stage distances (fusion weight {weight:g}): the "
            f"request must carry one per candidate"
        )
    distances = [float(d) for d in batcher.run([(query, c) for c in candidates])]
    if weight > 0 and first is not None:
        distances = fuse_distances(first, distances, weight).tolist()
    done = time.perf_counter()
    return RerankResponse(
        stir_version=version.id,
        distances=[float(d) for d in distances],
        timings_ms={
            "load_pixels": (loaded - started) * 1000,
            "forward": (done - loaded) * 1000,
        },
    )


RequestT = TypeVar("RequestT", EmbedRequest, RerankRequest)


def _parse(kind: type[RequestT], payload: Any) -> RequestT:
    """A request from JSON, or a ValueError that says what is malformed (never retried:
    the same message would fail the same way)."""
    try:
        if not isinstance(payload, dict):
            raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
        return kind.from_json(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind.__name__}: {type(exc).__name__}: {exc}") from None


def task_functions(ctx: TaskContext) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """Task name -> JSON-in/JSON-out function, for the in-process dispatcher and workers."""

    def embed(payload: dict[str, Any]) -> dict[str, Any]:
        return embed_images(_parse(EmbedRequest, payload), ctx).to_json()

    def rerank_task(payload: dict[str, Any]) -> dict[str, Any]:
        return rerank(_parse(RerankRequest, payload), ctx).to_json()

    return {EMBED_TASK: embed, RERANK_TASK: rerank_task}
