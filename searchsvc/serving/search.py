"""The query path: photo -> embedding -> vector search -> (rerank) -> products, logged.

Reranking is reached through an injected :class:`RerankStage`, so this module knows nothing
of Celery or of how the reranker runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from searchsvc.core.config import Settings
from searchsvc.core.errors import NotFoundError, SearchsvcError
from searchsvc.core.images import content_hash, decode_image, resize_center_crop
from searchsvc.index import SearchHit, VectorIndex
from searchsvc.jobs.model_store import ActiveVersion, ModelCache, served_embedder
from searchsvc.storage.db import Database, Feedback, Image, Product, QueryLog

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


def no_rerank(reason: str) -> RerankStage:
    def stage(query: QueryImage, candidates: list[Candidate], top_n: int) -> RerankOutcome:
        return RerankOutcome(candidates, reranked=False, reason=reason)

    return stage


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


class SearchService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        index: VectorIndex,
        models: ModelCache,
        rerank_stage: RerankStage,
    ) -> None:
        self.settings = settings
        self.db = db
        self.index = index
        self.models = models
        self.rerank_stage = rerank_stage

    def query(
        self,
        data: bytes,
        source: str,
        *,
        top_k: int | None = None,
        filters: Mapping[str, str] | None = None,
        rerank: bool | None = None,
        rerank_top_n: int | None = None,
    ) -> QueryResponse:
        top_k = top_k or self.settings.top_k
        if top_k <= 0:
            raise SearchsvcError(f"--top-k must be positive, got {top_k}")
        # The configured default shrinks to a smaller --top-k; an explicit value must fit.
        top_n = rerank_top_n or min(self.settings.rerank_top_n, max(top_k, 2))
        if top_n < 2 or top_n > max(top_k, 2):
            raise SearchsvcError(f"--rerank-top-n must be in 2..top_k ({top_k}), got {top_n}")
        filters = dict(filters or {})

        t_load = time.perf_counter()
        version, embedder = self.models.embedder(
            served_embedder(self.db, self.index, self.settings.collection_alias)
        )
        started = time.perf_counter()  # stage timings exclude loading models (once a process)
        digest = content_hash(data)
        size = embedder.info.input_size
        image, _ = decode_image(
            data, source, max_pixels=self.settings.max_image_pixels, min_side=size
        )
        query_image = QueryImage(image, digest)
        vector = embedder.embed(query_image.pixels(size)[None])[0]
        t_embed = time.perf_counter()

        candidates = self._search(version, vector, top_k, filters)
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
        query_id = str(uuid.uuid4())
        response = QueryResponse(
            query_id=query_id,
            results=results,
            reranked=outcome.reranked,
            rerank_reason=outcome.reason,
            reranker=outcome.reranker,
            embedder_version=version.id,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
        )
        self._log(response, data, digest, source, filters, top_k, outcome)
        return response

    def _search(
        self, version: ActiveVersion, vector: Any, top_k: int, filters: dict[str, str]
    ) -> list[Candidate]:
        assert version.collection is not None
        limit = top_k * OVERFETCH
        while True:
            hits = self.index.search(version.collection, vector, limit=limit, filters=filters)
            candidates = group_by_product(hits, top_k)
            if len(candidates) >= top_k or len(hits) < limit or limit >= MAX_FETCH:
                return candidates
            limit = min(limit * 4, MAX_FETCH)

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

    def _log(
        self,
        response: QueryResponse,
        data: bytes,
        digest: str,
        source: str,
        filters: dict[str, str],
        top_k: int,
        outcome: RerankOutcome,
    ) -> None:
        """Keep the shopper's photo and what was shown: the learning loop trains on both."""
        folder = self.settings.query_images_dir / digest[:2]
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


def record_feedback(db: Database, query_id: str, product_id: str, *, positive: bool) -> int:
    """Log which result was right (or wrong) for a query; returns the feedback id."""
    with db.session() as session:
        query = session.get(QueryLog, query_id)
        if query is None:
            raise NotFoundError(f"query {query_id}: no such query in the log")
        if session.get(Product, product_id) is None:
            raise NotFoundError(f"product {product_id}: no such product")
        row = Feedback(query_id=query_id, product_id=product_id, positive=positive)
        session.add(row)
        session.flush()
        return row.id
