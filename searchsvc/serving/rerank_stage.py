"""The rerank stage of the query path: STIR through a dispatched task, with a deadline.

Any failure (no active reranker, no worker, a timeout, a bad model file, missing pixels)
returns the first-stage ranking, flagged ``reranked: false`` with the reason, and is logged:
a query never hangs on its reranker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from sqlalchemy import select

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.jobs.dispatch import RERANK_QUEUE, Dispatcher
from searchsvc.jobs.model_store import ActiveVersion, active_version
from searchsvc.jobs.tasks import RERANK_TASK, RerankRequest, RerankResponse, encode_pixels
from searchsvc.models.checkpoint import config_path_for
from searchsvc.models.fusion import merge_reranked
from searchsvc.serving.search import Candidate, QueryImage, RerankOutcome
from searchsvc.storage.db import Database, Image, ModelKind

log = logging.getLogger(__name__)


def stir_input_size(version: ActiveVersion) -> int:
    """Per-image input size of a STIR file, from its JSON config (no weights loaded)."""
    try:
        config = json.loads(config_path_for(version.file).read_text(encoding="utf-8"))
        return int(config["stir"]["spec"]["input_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SearchsvcError(f"reranker version {version.id}: unreadable config ({exc})") from None


class StirRerankStage:
    def __init__(
        self, settings: Settings, db: Database, dispatcher: Callable[[], Dispatcher]
    ) -> None:
        self.settings = settings
        self.db = db
        self._dispatcher = dispatcher

    def __call__(self, query: QueryImage, candidates: list[Candidate], top_n: int) -> RerankOutcome:
        started = time.perf_counter()
        deadline = started + self.settings.rerank_timeout_s
        version = active_version(self.db, ModelKind.STIR)
        if version is None:
            return RerankOutcome(candidates, reranked=False, reason="no reranker is active")
        try:
            return self._rerank(query, candidates, top_n, version, started, deadline)
        except TimeoutError:
            reason = f"reranker timed out after {self.settings.rerank_timeout_s:g} s"
        except SearchsvcError as exc:
            reason = f"reranker failed: {exc}"
        except (OSError, ValueError, RuntimeError) as exc:
            reason = f"reranker failed: {type(exc).__name__}: {exc}"
        log.warning("query answered by the first stage: %s", reason)
        return RerankOutcome(
            candidates,
            reranked=False,
            reason=reason,
            timings_ms={"total": (time.perf_counter() - started) * 1000},
        )

    def _rerank(
        self,
        query: QueryImage,
        candidates: list[Candidate],
        top_n: int,
        version: ActiveVersion,
        started: float,
        deadline: float,
    ) -> RerankOutcome:
        head = candidates[:top_n]
        with self.db.session() as session:
            hashes = dict(
                session.execute(
                    select(Image.id, Image.content_hash).where(
                        Image.id.in_([c.image_id for c in head])
                    )
                ).all()
            )
        size = stir_input_size(version)
        request = RerankRequest(
            stir_version=version.id,
            stir_file=str(version.file),
            size=size,
            query_pixels_b64=encode_pixels(query.pixels(size)),
            candidate_hashes=[hashes[c.image_id] for c in head],
            first_stage_distances=[1.0 - c.score for c in head],
        )
        prepared = time.perf_counter()
        dispatcher = self._dispatcher()
        handle = dispatcher.submit(
            RERANK_TASK, request.to_json(), queue=RERANK_QUEUE, expires_s=deadline - prepared
        )
        response = RerankResponse.from_json(
            handle.result(timeout=max(0.0, deadline - time.perf_counter()))
        )
        if len(response.distances) != len(head):
            raise SearchsvcError(
                f"reranker returned {len(response.distances)} scores for {len(head)} candidates"
            )
        merged = merge_reranked([1.0 - c.score for c in candidates], response.distances, top_n)
        stir_by_index = dict(enumerate(response.distances))
        reordered = []
        for index in merged.order:
            candidate = candidates[index]
            candidate.stir_score = stir_by_index.get(index)
            reordered.append(candidate)
        finished = time.perf_counter()
        return RerankOutcome(
            reordered,
            reranked=True,
            reranker=f"stir-v{version.id}",
            reranker_version_id=version.id,
            timings_ms={
                "prepare": (prepared - started) * 1000,
                "task": (finished - prepared) * 1000,
                **{f"worker_{k}": v for k, v in response.timings_ms.items()},
            },
        )
