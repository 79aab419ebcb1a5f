"""Loaded models, once per process: the embedder and the STIR scorer of a given version.

Callers say which version they want (its id and file, from the registry); the cache loads it
on first use and again when another version is asked for, so a promotion needs no restart.
It is keyed by id AND file: a request naming a known id with another file cannot hand later
callers that file's model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from searchsvc.core.errors import ModelError
from searchsvc.models.batcher import MicroBatcher
from searchsvc.models.embedder import Embedder, load_embedding_net
from searchsvc.models.runtime import Precision
from searchsvc.models.stir import StirScorer, load_stir

Pair = tuple[np.ndarray, np.ndarray]


class ModelFile(Protocol):
    """What the cache needs to know of a version (``storage.versions.VersionRef`` is one)."""

    @property
    def id(self) -> int: ...

    @property
    def file(self) -> Path: ...


class ModelCache:
    """The last embedder and the last STIR asked for, loaded once each.

    ``rerank_max_batch_pairs`` and ``rerank_batch_wait_s`` shape the STIR's cross-request
    batcher (:class:`MicroBatcher`): requests of several threads share one forward.
    """

    def __init__(
        self,
        *,
        device: str = "auto",
        precision: Precision = "auto",
        rerank_max_batch_pairs: int = 256,
        rerank_batch_wait_s: float = 0.0,
    ) -> None:
        self._device = device
        self._precision = precision
        self._max_pairs = rerank_max_batch_pairs
        self._wait_s = rerank_batch_wait_s
        self._lock = threading.Lock()
        self._embedder: tuple[tuple[int, str], Embedder] | None = None
        self._stir: tuple[tuple[int, str], StirScorer, MicroBatcher[Pair, float]] | None = None

    def embedder(self, version: ModelFile) -> Embedder:
        """The embedder of ``version``, loading it if it is not the one held."""
        key = (version.id, str(version.file))
        with self._lock:
            if self._embedder is None or self._embedder[0] != key:
                try:
                    net = load_embedding_net(version.file)
                except ModelError as exc:
                    raise ModelError(f"embedder version {version.id}: {exc}") from None
                embedder = Embedder(net, device=self._device, precision=self._precision)
                embedder.warm_up()
                self._embedder = (key, embedder)
            return self._embedder[1]

    def stir(self, version: ModelFile) -> tuple[StirScorer, MicroBatcher[Pair, float]]:
        """The STIR scorer of ``version`` and its cross-request batcher, loaded once."""
        key = (version.id, str(version.file))
        with self._lock:
            if self._stir is None or self._stir[0] != key:
                try:
                    net = load_stir(version.file)
                except ModelError as exc:
                    raise ModelError(f"reranker version {version.id}: {exc}") from None
                scorer = StirScorer(net, device=self._device, precision=self._precision)
                size = scorer.info.input_size
                # One throw-away forward: kernel selection must not land on a first query.
                scorer.score(
                    np.zeros((size, size, 3), np.uint8), np.zeros((2, size, size, 3), np.uint8)
                )

                def score_batch(pairs: list[Pair]) -> list[float]:
                    queries = np.stack([query for query, _ in pairs])
                    candidates = np.stack([candidate for _, candidate in pairs])
                    return [float(d) for d in scorer.score_pairs(queries, candidates)]

                if self._stir is not None:
                    self._stir[2].close()
                batcher: MicroBatcher[Pair, float] = MicroBatcher(
                    score_batch, max_items=self._max_pairs, max_wait_s=self._wait_s
                )
                self._stir = (key, scorer, batcher)
            return self._stir[1], self._stir[2]

    def close(self) -> None:
        with self._lock:
            if self._stir is not None:
                self._stir[2].close()
                self._stir = None
