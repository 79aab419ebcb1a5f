"""The vector index on a Qdrant server, through qdrant-client (also its local mode)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from grpc import RpcError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import (
    ApiException,
    ResponseHandlingException,
    UnexpectedResponse,
)

from searchsvc.core.config import redact_secrets, redact_url, url_password
from searchsvc.core.errors import IndexBackendError
from searchsvc.index.base import (
    INDEXED_PAYLOAD_FIELDS,
    SCROLL_PAGE,
    IndexPoint,
    SearchHit,
    filter_conditions,
    point_payload,
    points_matrix,
    search_hit,
)

_BATCH = 512
"""Points per request: bounds the memory of one request without slowing bulk loads."""


def _describe_client(client: QdrantClient) -> str:
    options = getattr(client, "init_options", None) or {}
    for key in ("url", "host", "path", "location"):
        value = options.get(key)
        if value:
            return f"local mode ({value})" if key in ("path", "location") else str(value)
    return "the Qdrant server"


class QdrantServerIndex:
    """Vector index on a Qdrant server through ``qdrant_client``.

    Works unchanged on qdrant-client's local mode (``QdrantClient(location=":memory:")``),
    which the tests use; local mode accepts but ignores keyword payload indexes (filters
    are then evaluated by scanning), a server uses them.
    """

    def __init__(self, client: QdrantClient, *, where: str | None = None) -> None:
        self.client = client
        self.where = where or _describe_client(client)

    @classmethod
    def from_url(
        cls, url: str, api_key: str | None = None, timeout: float = 10
    ) -> QdrantServerIndex:
        """Connect to ``url`` and check it answers; IndexBackendError naming the URL if not."""
        try:
            client = QdrantClient(
                url=url,
                api_key=api_key or None,
                timeout=max(1, math.ceil(timeout)),
                check_compatibility=False,
            )
        except (ValueError, TypeError) as exc:
            reason = redact_secrets(str(exc), [url_password(url), api_key or ""])
            raise IndexBackendError(
                f"SEARCHSVC_QDRANT_URL: invalid URL {redact_url(url)!r} ({reason})"
            ) from None
        index = cls(client, where=redact_url(url))
        with index._errors("list collections", None):
            client.get_collections()
        return index

    @contextmanager
    def _errors(self, action: str, collection: str | None) -> Iterator[None]:
        target = f" collection {collection!r}" if collection else ""
        try:
            yield
        except ResponseHandlingException as exc:
            raise IndexBackendError(
                f"cannot reach the Qdrant server at {self.where} (trying to {action}{target}): "
                f"{exc.source if getattr(exc, 'source', None) else exc}"
            ) from None
        except UnexpectedResponse as exc:
            detail = exc.content.decode("utf-8", "replace")[:300] if exc.content else ""
            raise IndexBackendError(
                f"Qdrant at {self.where} refused to {action}{target}: "
                f"HTTP {exc.status_code} {exc.reason_phrase} {detail}".rstrip()
            ) from None
        except (ApiException, RpcError, ValueError, KeyError) as exc:
            # local mode raises ValueError/KeyError ("Collection x not found", dimension errors)
            raise IndexBackendError(
                f"Qdrant at {self.where} failed to {action}{target}: {exc}"
            ) from None

    def _create_payload_indexes(self, name: str, existing: set[str]) -> None:
        for field in INDEXED_PAYLOAD_FIELDS:
            if field in existing:
                continue
            with warnings.catch_warnings():
                # Local mode warns that payload indexes have no effect there; a server uses them.
                warnings.filterwarnings("ignore", message="Payload indexes have no effect")
                self.client.create_payload_index(
                    name, field, models.PayloadSchemaType.KEYWORD, wait=True
                )

    def ensure_collection(self, name: str, dim: int) -> None:
        if dim <= 0:
            raise IndexBackendError(f"collection {name!r}: dimension must be positive, got {dim}")
        with self._errors("create", name):
            if not self.client.collection_exists(name):
                try:
                    self.client.create_collection(
                        name,
                        vectors_config=models.VectorParams(
                            size=dim, distance=models.Distance.COSINE
                        ),
                    )
                except (UnexpectedResponse, ValueError):
                    # Another process may have created it meanwhile; then check it below.
                    if not self.client.collection_exists(name):
                        raise
            info = self.client.get_collection(name)
            params = info.config.params.vectors
            if not isinstance(params, models.VectorParams):
                raise IndexBackendError(
                    f"collection {name!r} at {self.where} uses named vectors; "
                    "searchsvc needs a single unnamed vector"
                )
            if params.size != dim or params.distance != models.Distance.COSINE:
                raise IndexBackendError(
                    f"collection {name!r} at {self.where} exists with dimension {params.size} "
                    f"and distance {params.distance.value}, not {dim} and Cosine"
                )
            self._create_payload_indexes(name, set(info.payload_schema or {}))

    def drop_collection(self, name: str) -> None:
        with self._errors("delete", name):
            self.client.delete_collection(name)

    def collections(self) -> list[str]:
        with self._errors("list collections", None):
            return sorted(c.name for c in self.client.get_collections().collections)

    def upsert(self, collection: str, points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        matrix = points_matrix(points, collection)
        with self._errors("upsert into", collection):
            for start in range(0, len(points), _BATCH):
                chunk = points[start : start + _BATCH]
                batch = models.Batch(
                    ids=[p.point_id for p in chunk],
                    vectors=matrix[start : start + _BATCH].tolist(),
                    payloads=[point_payload(p) for p in chunk],
                )
                self.client.upsert(collection, points=batch, wait=True)

    def delete(self, collection: str, point_ids: Sequence[str]) -> None:
        if not point_ids:
            return
        ids: list[models.ExtendedPointId] = list(point_ids)
        with self._errors("delete points from", collection):
            self.client.delete(
                collection, points_selector=models.PointIdsList(points=ids), wait=True
            )

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        limit: int,
        filters: Mapping[str, str] | None = None,
    ) -> list[SearchHit]:
        conditions = filter_conditions(collection, filters)
        if limit <= 0:
            return []
        query_filter = (
            models.Filter(
                must=[
                    models.FieldCondition(key=key, match=models.MatchValue(value=value))
                    for key, value in conditions
                ]
            )
            if conditions
            else None
        )
        query = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        with self._errors("search", collection):
            response = self.client.query_points(
                collection,
                query=query,
                limit=limit,
                query_filter=query_filter,
                with_payload=True,
                with_vectors=False,
            )
        return [search_hit(p.id, p.score, p.payload) for p in response.points]

    def count(self, collection: str) -> int:
        with self._errors("count", collection):
            return int(self.client.count(collection, exact=True).count)

    def iter_point_ids(self, collection: str) -> Iterator[str]:
        offset: models.ExtendedPointId | None = None
        while True:
            with self._errors("scroll", collection):
                records, offset = self.client.scroll(
                    collection,
                    limit=SCROLL_PAGE,
                    offset=offset,
                    with_payload=False,
                    with_vectors=False,
                )
            for record in records:
                yield str(record.id)
            if offset is None:
                return

    def set_alias(self, alias: str, collection: str) -> None:
        """Delete and create in one request: Qdrant applies both under one lock, so readers
        see the old or the new target, never no alias."""
        with self._errors(f"point alias {alias!r} at", collection):
            self.client.update_collection_aliases(
                change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)),
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(
                            collection_name=collection, alias_name=alias
                        )
                    ),
                ]
            )

    def resolve_alias(self, alias: str) -> str | None:
        with self._errors(f"resolve alias {alias!r}", None):
            aliases = self.client.get_aliases().aliases
        for description in aliases:
            if description.alias_name == alias:
                return description.collection_name
        return None

    def optimize(self, collection: str) -> None:
        """No-op: the server's optimizers build HNSW in the background."""

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> QdrantServerIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
