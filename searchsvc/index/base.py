"""The vector index's interface: points, hits, the ``VectorIndex`` protocol, point ids.

Collections hold one embedder version's vectors each; an alias names the active one, so a
new embedder can be filled in the background and switched to in one step. Point ids are
derived from the image's content (see :func:`point_id_for`), which makes upserts idempotent:
re-ingesting the same image writes the same point.

Scores are cosine similarities (higher is closer), for every backend. The backends, one
module each: :mod:`searchsvc.index.edge` (embedded, in-process) and
:mod:`searchsvc.index.server` (a Qdrant server through qdrant-client).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from searchsvc.core.errors import IndexBackendError

# Fixed namespace: point ids must be the same on every machine and every run.
_POINT_NAMESPACE = uuid.UUID("5f0c1a8e-2b7d-4e1c-9a53-3c4d2e6b7f10")

# Payload fields that get a keyword index (filters run inside Qdrant, not after).
INDEXED_PAYLOAD_FIELDS = ("product_id", "category")


def point_id_for(product_id: str, content_hash: str) -> str:
    """Deterministic point id of one product image.

    The product is part of the key because two products may share identical image bytes
    (a colour variant photographed once); each must still have its own point.
    """
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{product_id}\x00{content_hash}"))


@dataclass(frozen=True)
class IndexPoint:
    point_id: str
    vector: np.ndarray  # float32, shape (dim,), L2-normalised
    product_id: str
    image_id: int
    category: str | None = None


@dataclass(frozen=True)
class SearchHit:
    point_id: str
    score: float  # cosine similarity
    product_id: str
    image_id: int
    category: str | None = None


class VectorIndex(Protocol):
    """What searchsvc needs from a vector store. Implementations: EdgeIndex, QdrantServerIndex."""

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection (cosine, ``dim``) with payload indexes if it does not exist.
        Raises IndexBackendError if it exists with another dimension."""

    def drop_collection(self, name: str) -> None: ...

    def collections(self) -> list[str]: ...

    def upsert(self, collection: str, points: Sequence[IndexPoint]) -> None: ...

    def delete(self, collection: str, point_ids: Sequence[str]) -> None: ...

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        limit: int,
        filters: Mapping[str, str] | None = None,
    ) -> list[SearchHit]:
        """Nearest points by cosine similarity, best first; ``filters`` are exact payload
        matches (``{"category": "shoes"}``), applied inside the engine."""

    def count(self, collection: str) -> int: ...

    def iter_point_ids(self, collection: str) -> Iterator[str]: ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` in one step (readers never see no alias)."""

    def resolve_alias(self, alias: str) -> str | None: ...

    def optimize(self, collection: str) -> None:
        """Build search structures after a bulk load (a no-op where the engine does it)."""

    def close(self) -> None: ...


SCROLL_PAGE = 1024
"""Point ids per page when listing a collection."""


def points_matrix(points: Sequence[IndexPoint], collection: str) -> np.ndarray:
    """Stack the points' vectors into one C-contiguous float32 ``(n, dim)`` array."""
    try:
        matrix = np.stack([np.asarray(p.vector, dtype=np.float32).reshape(-1) for p in points])
    except ValueError as exc:
        raise IndexBackendError(
            f"collection {collection!r}: points to upsert have vectors of different lengths ({exc})"
        ) from None
    return np.ascontiguousarray(matrix, dtype=np.float32)


def point_payload(point: IndexPoint) -> dict[str, Any]:
    payload: dict[str, Any] = {"product_id": point.product_id, "image_id": int(point.image_id)}
    if point.category is not None:
        payload["category"] = point.category
    return payload


def filter_conditions(collection: str, filters: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """Filters as ``(field, value)`` pairs; only indexed fields may be filtered on (a typo
    such as ``categroy`` would otherwise silently match nothing)."""
    if not filters:
        return []
    unknown = sorted(set(filters) - set(INDEXED_PAYLOAD_FIELDS))
    if unknown:
        raise IndexBackendError(
            f"collection {collection!r}: cannot filter on {', '.join(map(repr, unknown))}; "
            f"filterable fields are {', '.join(INDEXED_PAYLOAD_FIELDS)}"
        )
    return [(key, str(value)) for key, value in filters.items()]


def search_hit(point_id: object, score: float, payload: Mapping[str, Any] | None) -> SearchHit:
    payload = payload or {}
    category = payload.get("category")
    return SearchHit(
        point_id=str(point_id),
        score=float(score),
        product_id=str(payload.get("product_id", "")),
        image_id=int(payload.get("image_id", -1)),
        category=None if category is None else str(category),
    )
