"""The query path: photo -> embedding -> vector search -> (rerank) -> products, logged.

Every caller answers queries here: the CLI, the service and the evaluation. Reranking is
reached through an injected :class:`RerankStage` (a dispatched STIR, an in-process one, or
none) and logging through an optional :class:`QueryLog`, so this module knows nothing of
Celery or of how the reranker runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.core.images import content_hash, decode_image, resize_center_crop
from searchsvc.index import SearchHit, VectorIndex
from searchsvc.models.cache import ModelCache
from searchsvc.models.fusion import resolve_top_n
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind, Product, QueryLog
from searchsvc.storage.versions import VersionRef, active_version

# How many points to fetch per wanted product: a product has several images, and results are
# products. If the first fetch yields too few distinct products, the fetch grows.
OVERFETCH = 4
MAX_FETCH = 4096


@dataclass
class Candidate:
    """One product in a ranking, carried through the rerank stage."""

    product_id: str
    image_id: int
    score: float
    first_stage_rank: int
    stir_score: float | None = None


@dataclass(frozen=True)
class RerankOutcome:
    candidates: list[Candidate]
    reranked: bool
    reason: str | None = None
    reranker: str | None = None
    """Which reranker served (``stir-v3``), or None when the first stage's order stands."""
    reranker_version_id: int | None = None
    note: str | None = None
    """What the caller should know of how it reranked (a top_n the fusion weight was not
    calibrated at)."""
    timings_ms: dict[str, float] = field(default_factory=dict)


class QueryImage:
    """The decoded query photo; model inputs of any size are cut from it once each."""

    def __init__(self, image: PILImage.Image, content_hash: str) -> None:
        self.image = image
        self.content_hash = content_hash
        self._pixels: dict[int, np.ndarray] = {}

    def pixels(self, size: int) -> np.ndarray:
        if size not in self._pixels:
            self._pixels[size] = resize_center_crop(self.image, size)
        return self._pixels[size]


class RerankStage(Protocol):
    def __call__(
        self, query: QueryImage, candidates: list[Candidate], top_n: int
    ) -> RerankOutcome: ...


@dataclass
class ProductResult:
    rank: int
    product_id: str
    title: str | None
    category: str | None
    price: float | None
    url: str | None
    image_id: int
    image: str
    score: float
    first_stage_rank: int
    stir_score: float | None


@dataclass
class QueryResponse:
    query_id: str
    results: list[ProductResult]
    reranked: bool
    rerank_reason: str | None
    reranker: str | None
    embedder_version: int
    timings_ms: dict[str, float]
    rerank_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def group_by_product(hits: list[SearchHit], limit: int) -> list[Candidate]:
    """Best image per product, in first-stage order, at most ``limit`` products."""
    seen: set[str] = set()
    candidates: list[Candidate] = []
    for hit in hits:
        if hit.product_id in seen:
            continue
        seen.add(hit.product_id)
        candidates.append(
            Candidate(hit.product_id, hit.image_id, hit.score, first_stage_rank=len(candidates) + 1)
        )
        if len(candidates) == limit:
            break
    return candidates


def served_embedder(db: Database, index: VectorIndex, alias: str) -> VersionRef:
    """The DB's active embedder, with its collection: the one source of truth that ingest
    and removals follow too, switched in one transaction (``jobs.switch``); the alias is
    only its view for other readers, and may lag after a crash until reconciled."""
    version = active_version(db, ModelKind.EMBEDDER)
    if version is None or index.resolve_alias(alias) is None:
        raise SearchsvcError(
            f"the index has no collection '{alias}' yet: run 'searchsvc ingest CATALOG' first"
        )
    return version


RecordQuery = Callable[["QueryResponse", bytes, str, dict[str, str], int, RerankOutcome], None]
"""Where an answered query goes: (response, photo bytes, source, filters, top_k, outcome);
:class:`QueryRecorder` writes the query log."""


class QueryRecorder:
    """Keeps the shopper's photo and what was shown: the learning loop trains on both."""

    def __init__(self, db: Database, photos_dir: Path) -> None:
        self.db = db
        self.photos_dir = photos_dir

    def __call__(
        self,
        response: QueryResponse,
        data: bytes,
        source: str,
        filters: dict[str, str],
        top_k: int,
        outcome: RerankOutcome,
    ) -> None:
        digest = content_hash(data)
        folder = self.photos_dir / digest[:2]
        folder.mkdir(parents=True, exist_ok=True)
        suffix = Path(source).suffix.lower() or ".img"
        stored = folder / f"{digest}{suffix}"
        if not stored.exists():
            stored.write_bytes(data)
        with self.db.session() as session:
            session.add(
                QueryLog(
                    id=response.query_id,
                    image_hash=digest,
                    image_path=str(stored.resolve()),
                    filters=filters,
                    top_k=top_k,
                    results=[
                        {
                            "product_id": r.product_id,
                            "image_id": r.image_id,
                            "score": r.score,
                            "first_stage_rank": r.first_stage_rank,
                            "stir_score": r.stir_score,
                        }
                        for r in response.results
                    ],
                    embedder_version_id=response.embedder_version,
                    stir_version_id=outcome.reranker_version_id,
                    reranked=response.reranked,
                    rerank_reason=response.rerank_reason,
                    latency_ms=response.timings_ms["total"],
                    timings_ms=response.timings_ms,
                )
            )


class SearchService:
    """Answers queries. ``record``: where each answered query is logged (None: nowhere,
    as the evaluation wants)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        index: VectorIndex,
        models: ModelCache,
        rerank_stage: RerankStage,
        record: RecordQuery | None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.index = index
        self.models = models
        self.rerank_stage = rerank_stage
        self.record = record

    def query(
        self,
        data: bytes,
        source: str,
        *,
        top_k: int | None = None,
        filters: Mapping[str, str] | None = None,
        rerank: bool | None = None,
        rerank_top_n: int | None = None,
        price_min: float | None = None,
        price_max: float | None = None,
    ) -> QueryResponse:
        """``price_min``/``price_max``: only products whose price lies in the range (bounds
        included; a product without a price is left out when a bound is given)."""
        top_k = top_k or self.settings.top_k
        if top_k <= 0:
            raise SearchsvcError(f"--top-k must be positive, got {top_k}")
        try:
            top_n = resolve_top_n(rerank_top_n, default=self.settings.rerank_top_n, top_k=top_k)
        except ValueError:
            raise SearchsvcError(
                f"--rerank-top-n must be in 2..top_k ({top_k}), got {rerank_top_n}"
            ) from None
        filters = dict(filters or {})

        t_load = time.perf_counter()
        version = served_embedder(self.db, self.index, self.settings.collection_alias)
        embedder = self.models.embedder(version)
        started = time.perf_counter()  # stage timings exclude loading models (once a process)
        size = embedder.info.input_size
        image, _ = decode_image(
            data, source, max_pixels=self.settings.max_image_pixels, min_side=size
        )
        query_image = QueryImage(image, content_hash(data))
        vector = embedder.embed(query_image.pixels(size)[None])[0]
        t_embed = time.perf_counter()

        price_range = None if price_min is None and price_max is None else (price_min, price_max)
        candidates = self._search(version, vector, top_k, filters, price_range)
        t_search = time.perf_counter()

        use_rerank = self.settings.rerank if rerank is None else rerank
        if not use_rerank:
            outcome = RerankOutcome(candidates, reranked=False, reason="reranking turned off")
        elif len(candidates) < 2:
            outcome = RerankOutcome(candidates, reranked=False, reason="fewer than 2 candidates")
        else:
            outcome = self.rerank_stage(query_image, candidates, min(top_n, len(candidates)))
        t_rerank = time.perf_counter()

        timings = {
            "load_models": (started - t_load) * 1000,
            "decode_embed": (t_embed - started) * 1000,
            "vector_search": (t_search - t_embed) * 1000,
            "rerank": (t_rerank - t_search) * 1000,
            **{f"rerank_{k}": v for k, v in outcome.timings_ms.items()},
        }
        results = self._products(outcome.candidates)
        timings["total"] = (time.perf_counter() - started) * 1000
        response = QueryResponse(
            query_id=str(uuid.uuid4()),
            results=results,
            reranked=outcome.reranked,
            rerank_reason=outcome.reason,
            reranker=outcome.reranker,
            embedder_version=version.id,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            rerank_note=outcome.note,
        )
        if self.record is not None:
            logged = dict(filters)
            for name, bound in (("price_min", price_min), ("price_max", price_max)):
                if bound is not None:
                    logged[name] = f"{bound:g}"
            self.record(response, data, source, logged, top_k, outcome)
        return response

    def _search(
        self,
        version: VersionRef,
        vector: Any,
        top_k: int,
        filters: dict[str, str],
        price_range: tuple[float | None, float | None] | None = None,
    ) -> list[Candidate]:
        assert version.collection is not None
        limit = top_k * OVERFETCH
        while True:
            hits = self.index.search(version.collection, vector, limit=limit, filters=filters)
            # Prices live in the DB, not in the index payload: the range applies to the hits,
            # and the fetch grows (as for products with many images) until enough remain.
            kept = self._live(hits, price_range)
            candidates = group_by_product(kept, top_k)
            if len(candidates) >= top_k or len(hits) < limit or limit >= MAX_FETCH:
                return candidates
            limit = min(limit * 4, MAX_FETCH)

    def _live(
        self,
        hits: list[SearchHit],
        price_range: tuple[float | None, float | None] | None = None,
    ) -> list[SearchHit]:
        """Hits whose image and product are not marked removed (a point can outlive its
        row's removal: a sync that stopped between the DB and the index, a collection
        switched back to; a removed product is never an answer) and, with ``price_range``,
        whose product has a price within it. One query for both: it runs on every fetch."""
        if not hits:
            return hits
        live = (
            select(Image.id)
            .join(Product, Product.id == Image.product_id)
            .where(
                Image.id.in_({hit.image_id for hit in hits}),
                Image.status != ImageStatus.REMOVED,
                Product.removed.is_(False),
            )
        )
        if price_range is not None:
            low, high = price_range
            live = live.where(Product.price.is_not(None))
            if low is not None:
                live = live.where(Product.price >= low)
            if high is not None:
                live = live.where(Product.price <= high)
        with self.db.session() as session:
            kept = set(session.scalars(live))
        return [hit for hit in hits if hit.image_id in kept]

    def _products(self, candidates: list[Candidate]) -> list[ProductResult]:
        with self.db.session() as session:
            products = {
                p.id: p
                for p in session.scalars(
                    select(Product).where(Product.id.in_([c.product_id for c in candidates]))
                )
            }
            filenames = dict(
                session.execute(
                    select(Image.id, Image.filename).where(
                        Image.id.in_([c.image_id for c in candidates])
                    )
                ).all()
            )
        results = []
        for rank, candidate in enumerate(candidates, start=1):
            product = products.get(candidate.product_id)
            results.append(
                ProductResult(
                    rank=rank,
                    product_id=candidate.product_id,
                    title=product.title if product else None,
                    category=product.category if product else None,
                    price=product.price if product else None,
                    url=product.url if product else None,
                    image_id=candidate.image_id,
                    image=filenames.get(candidate.image_id, ""),
                    score=round(float(candidate.score), 6),
                    first_stage_rank=candidate.first_stage_rank,
                    stir_score=(
                        None if candidate.stir_score is None else round(candidate.stir_score, 6)
                    ),
                )
            )
        return results
