"""The rerank stage of the query path: STIR through a dispatched task, with a deadline.

The active STIR version's recorded config (the registry, not its file) says what the
reranker takes and how its distances combine with the first stage (a
:class:`~searchsvc.models.fusion.RerankPlan`); the task returns STIR's own distances and
the plan reorders the list here, in one place.

Any failure (no active reranker, no worker, a timeout, a bad model file, missing pixels)
returns the first-stage ranking, flagged ``reranked: false`` with the reason, and is logged:
a query never hangs on its reranker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select

from searchsvc.core.errors import SearchsvcError
from searchsvc.jobs.dispatch import Dispatcher
from searchsvc.jobs.wire import (
    RERANK_QUEUE,
    RERANK_TASK,
    RerankRequest,
    RerankResponse,
    encode_pixels,
)
from searchsvc.models.fusion import RerankPlan
from searchsvc.serving.search import Candidate, QueryImage, RerankOutcome
from searchsvc.storage.db import Database, Image, ModelKind
from searchsvc.storage.versions import VersionRef, active_version

log = logging.getLogger(__name__)


def stir_plan(version: VersionRef, top_n: int) -> tuple[int, RerankPlan]:
    """A STIR version's per-image input size and its plan at ``top_n``, from its config."""
    try:
        stir = version.config["stir"]
        size = int(stir["spec"]["input_size"])
        calibrated = stir.get("calibrated_top_n")
        plan = RerankPlan(
            top_n=top_n,
            fusion_weight=float(stir.get("fusion_weight", 0.0)),
            calibrated_top_n=None if calibrated is None else int(calibrated),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SearchsvcError(f"reranker version {version.id}: unreadable config ({exc})") from None
    return size, plan


class StirRerankStage:
    """``timeout_s``: the rerank's deadline, after which the first stage answers (None:
    wait for it, as an evaluation does)."""

    def __init__(
        self, db: Database, dispatcher: Callable[[], Dispatcher], *, timeout_s: float | None
    ) -> None:
        self.db = db
        self._dispatcher = dispatcher
        self.timeout_s = timeout_s

    def __call__(self, query: QueryImage, candidates: list[Candidate], top_n: int) -> RerankOutcome:
        started = time.perf_counter()
        version = active_version(self.db, ModelKind.STIR)
        if version is None:
            return RerankOutcome(candidates, reranked=False, reason="no reranker is active")
        try:
            return self._rerank(query, candidates, top_n, version, started)
        except TimeoutError:
            reason = f"reranker timed out after {self.timeout_s:g} s"
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
        version: VersionRef,
        started: float,
    ) -> RerankOutcome:
        deadline = None if self.timeout_s is None else started + self.timeout_s
        head = candidates[:top_n]
        with self.db.session() as session:
            hashes = dict(
                session.execute(
                    select(Image.id, Image.content_hash).where(
                        Image.id.in_([c.image_id for c in head])
                    )
                ).all()
            )
        size, plan = stir_plan(version, top_n)
        request = RerankRequest(
            stir_version=version.id,
            size=size,
            query_pixels_b64=encode_pixels(query.pixels(size)),
            candidate_hashes=[hashes[c.image_id] for c in head],
        )
        prepared = time.perf_counter()
        handle = self._dispatcher().submit(
            RERANK_TASK,
            request.to_json(),
            queue=RERANK_QUEUE,
            expires_s=None if deadline is None else deadline - prepared,
        )
        response = RerankResponse.from_json(
            handle.result(
                timeout=None if deadline is None else max(0.0, deadline - time.perf_counter())
            )
        )
        if len(response.distances) != len(head):
            raise SearchsvcError(
                f"reranker returned {len(response.distances)} scores for {len(head)} candidates"
            )
        merged, keys = plan.apply([1.0 - c.score for c in candidates], response.distances)
        reordered = []
        for index in merged.order:
            candidate = candidates[index]
            candidate.stir_score = keys[index] if index < len(keys) else None
            reordered.append(candidate)
        finished = time.perf_counter()
        return RerankOutcome(
            reordered,
            reranked=True,
            reranker=f"stir-v{version.id}",
            reranker_version_id=version.id,
            note=plan.note,
            timings_ms={
                "prepare": (prepared - started) * 1000,
                "task": (finished - prepared) * 1000,
                **{f"worker_{k}": v for k, v in response.timings_ms.items()},
            },
        )
