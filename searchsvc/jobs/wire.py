"""What tasks carry: JSON-able requests and results, the one definition on both sides.

A request names model versions by id only: the worker resolves the file (and, for
embedders, the collection) from the registry, so a message can name no file of its own.
Vectors and pixels travel as base64 text: exact, and about 4x smaller than JSON lists.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

EMBED_TASK = "searchsvc.embed_images"
RERANK_TASK = "searchsvc.rerank"
EMBED_QUEUE = "embed"
RERANK_QUEUE = "rerank"


def encode_vector(vector: np.ndarray) -> str:
    """float32 vector -> base64 text."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


def encode_pixels(pixels: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).decode()


def decode_pixels(text: str, size: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if raw.size != size * size * 3:
        raise ValueError(f"query pixels hold {raw.size} values, expected {size}x{size}x3")
    return raw.reshape(size, size, 3)


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
    collection: str
    """Must be the version's own collection (the worker checks it against the registry)."""
    write_index: bool = False
    """True: the worker upserts the points itself (Qdrant server); False: it returns vectors
    and the caller writes them (an embedded store opens in one process only)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbedRequest:
        return cls(
            items=[EmbedItem(**item) for item in data["items"]],
            embedder_version=int(data["embedder_version"]),
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


@dataclass(frozen=True)
class RerankRequest:
    stir_version: int
    size: int
    query_pixels_b64: str
    """The query photo, preprocessed to the reranker's input (sent inline: it exists only
    in the caller's memory)."""
    candidate_hashes: list[str]
    """Content hashes of the candidate images, whose pixels the worker reads from the
    shared pixel store."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RerankRequest:
        return cls(
            stir_version=int(data["stir_version"]),
            size=int(data["size"]),
            query_pixels_b64=str(data["query_pixels_b64"]),
            candidate_hashes=[str(h) for h in data["candidate_hashes"]],
        )


@dataclass(frozen=True)
class RerankResponse:
    stir_version: int
    distances: list[float]
    """STIR's own distance of each (query, candidate) pair, in ``[0, 1]``; how they combine
    with the first stage is the caller's rerank plan."""
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


RequestT = TypeVar("RequestT", EmbedRequest, RerankRequest)


def parse_request(kind: type[RequestT], payload: Any) -> RequestT:
    """A request from JSON, or a ValueError that says what is malformed (never retried:
    the same message would fail the same way)."""
    try:
        if not isinstance(payload, dict):
            raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
        return kind.from_json(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind.__name__}: {type(exc).__name__}: {exc}") from None
