"""The query path on its own: SearchService with an in-memory index, a fake embedder and
fake rerank stages or dispatchers (no Celery, no model file, no server)."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from searchsvc.core.config import Settings, load_settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.index import SearchHit
from searchsvc.jobs.dispatch import Payload, TaskFailed
from searchsvc.jobs.wire import RERANK_QUEUE, RERANK_TASK, RerankRequest
from searchsvc.serving.rerank_stage import StirRerankStage
from searchsvc.serving.search import (
    MAX_FETCH,
    OVERFETCH,
    Candidate,
    QueryImage,
    QueryRecorder,
    RerankOutcome,
    SearchService,
)
from searchsvc.storage.db import Database, ImageStatus, ModelKind, ModelVersion, Product, QueryLog
from searchsvc.storage.db import Image as ImageRow

COLLECTION = "images_v1"


@dataclass
class MemoryIndex:
    """Hits in a fixed order (best first); records each search's limit."""

    hits: list[SearchHit]
    limits: list[int] = field(default_factory=list)

    def resolve_alias(self, alias: str) -> str | None:
        return COLLECTION

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        limit: int,
        filters: Mapping[str, str] | None = None,
    ) -> list[SearchHit]:
        assert collection == COLLECTION
        self.limits.append(limit)
        wanted = [h for h in self.hits if not filters or h.category == filters.get("category")]
        return wanted[:limit]


@dataclass
class FakeEmbedder:
    input_size: int = 8

    @property
    def info(self) -> Any:
        return self

    def embed(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        assert pixels.shape[1:] == (self.input_size, self.input_size, 3)
        return np.ones((len(pixels), 4), np.float32) / 2


class FakeModels:
    def __init__(self) -> None:
        self.embedder_calls: list[int] = []

    def embedder(self, version: Any) -> FakeEmbedder:
        self.embedder_calls.append(version.id)
        return FakeEmbedder()


def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={"SEARCHSVC_HOME": str(tmp_path / "home")})


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        session.add(
            ModelVersion(
                id=1,
                kind=ModelKind.EMBEDDER,
                arch="fake",
                file="e.safetensors",
                active=True,
                collection=COLLECTION,
                config={},
            )
        )
        for p in range(40):
            session.add(Product(id=f"p{p:02d}", title=f"Product {p}", attributes={}))
        session.flush()
        for p in range(40):
            for view in range(4):
                session.add(
                    ImageRow(
                        id=p * 4 + view + 1,
                        product_id=f"p{p:02d}",
                        filename=f"v{view}.jpg",
                        source_path=f"/c/p{p:02d}/v{view}.jpg",
                        content_hash=f"{p:02d}{view}" * 16,
                        size_bytes=1,
                        status=ImageStatus.INDEXED,
                    )
                )
    yield database  # type: ignore[misc]
    database.dispose()


def hits_of(products: Sequence[int], per_product: int = 4) -> list[SearchHit]:
    """``per_product`` points of each product in turn, best first (its 4 images, cycled)."""
    out = []
    for p in products:
        for n in range(per_product):
            score = 1.0 - len(out) / 10_000
            out.append(SearchHit(f"pt{p}-{n}", score, f"p{p:02d}", p * 4 + n % 4 + 1))
    return out


@dataclass
class RecordingStage:
    """Reverses the block it is given; records the top_n it was asked for."""

    top_ns: list[int] = field(default_factory=list)

    def __call__(self, query: QueryImage, candidates: list[Candidate], top_n: int) -> RerankOutcome:
        self.top_ns.append(top_n)
        block = candidates[:top_n][::-1]
        for n, c in enumerate(block):
            c.stir_score = n / 10
        return RerankOutcome(block + candidates[top_n:], reranked=True, reranker="fake")


def service(
    settings: Settings, db: Database, index: MemoryIndex, stage: Any, *, record: bool = False
) -> SearchService:
    recorder = QueryRecorder(db, settings.query_images_dir) if record else None
    return SearchService(settings, db, index, FakeModels(), stage, recorder)  # type: ignore[arg-type]


def test_results_are_products_not_images_and_the_fetch_grows_until_enough(
    settings: Settings, db: Database
) -> None:
    # 16 points per product: the first fetch (top_k * OVERFETCH points) holds only 3
    # products, so the fetch grows until it holds top_k.
    index = MemoryIndex(hits_of(range(40), per_product=16))
    answer = service(settings, db, index, RecordingStage()).query(
        photo(), "q.png", top_k=10, rerank=False
    )
    assert [r.product_id for r in answer.results] == [f"p{p:02d}" for p in range(10)]
    assert [r.first_stage_rank for r in answer.results] == list(range(1, 11))
    assert index.limits == [10 * OVERFETCH, 10 * OVERFETCH * 4]
    assert answer.results[0].title == "Product 0" and answer.results[0].image == "v0.jpg"
    # Enough products in the first page: one fetch.
    four_each = MemoryIndex(hits_of(range(40)))
    service(settings, db, four_each, RecordingStage()).query(photo(), "q.png", top_k=10)
    assert four_each.limits == [10 * OVERFETCH]


def test_the_fetch_stops_at_the_end_of_the_index_or_its_ceiling(
    settings: Settings, db: Database
) -> None:
    index = MemoryIndex(hits_of(range(3)))  # 12 points: fewer than top_k products at all
    answer = service(settings, db, index, RecordingStage()).query(
        photo(), "q.png", top_k=10, rerank=False
    )
    assert len(answer.results) == 3 and index.limits == [40]  # a short page: no second try
    one_product = MemoryIndex([SearchHit(f"x{i}", 1.0, "p00", 1) for i in range(MAX_FETCH * 2)])
    service(settings, db, one_product, RecordingStage()).query(
        photo(), "q.png", top_k=3, rerank=False
    )
    assert one_product.limits[-1] == MAX_FETCH


def test_the_stage_reranks_the_top_n_and_the_default_shrinks_to_top_k(
    settings: Settings, db: Database
) -> None:
    stage = RecordingStage()
    search = service(settings, db, MemoryIndex(hits_of(range(40))), stage)
    answer = search.query(photo(), "q.png", top_k=8)
    assert stage.top_ns == [settings.rerank_top_n]
    assert [r.first_stage_rank for r in answer.results][:5] == [5, 4, 3, 2, 1]
    assert answer.reranked and answer.reranker == "fake"
    search.query(photo(), "q.png", top_k=3)
    assert stage.top_ns[-1] == 3  # the configured 5 shrinks to a smaller top_k
    search.query(photo(), "q.png", top_k=8, rerank_top_n=7)
    assert stage.top_ns[-1] == 7
    with pytest.raises(SearchsvcError, match="rerank-top-n must be in 2..top_k"):
        search.query(photo(), "q.png", top_k=8, rerank_top_n=9)
    # Fewer than two candidates: nothing to reorder, the stage is not asked.
    single = service(settings, db, MemoryIndex(hits_of([0])), stage)
    calls = len(stage.top_ns)
    alone = single.query(photo(), "q.png", top_k=5)
    assert not alone.reranked and alone.rerank_reason == "fewer than 2 candidates"
    assert len(stage.top_ns) == calls
    off = search.query(photo(), "q.png", top_k=5, rerank=False)
    assert off.rerank_reason == "reranking turned off" and len(stage.top_ns) == calls


def test_queries_are_logged_only_where_a_recorder_is_given(
    settings: Settings, db: Database
) -> None:
    index = MemoryIndex(hits_of(range(10)))

    def logged() -> int:
        with db.session() as session:
            return int(session.scalar(select(func.count()).select_from(QueryLog)) or 0)

    service(settings, db, index, RecordingStage()).query(photo(), "q.png", top_k=5)
    assert logged() == 0
    answer = service(settings, db, index, RecordingStage(), record=True).query(
        photo(), "q.png", top_k=5
    )
    assert logged() == 1
    with db.session() as session:
        row = session.get(QueryLog, answer.query_id)
        assert row is not None and Path(row.image_path or "").is_file()
        assert [r["product_id"] for r in row.results] == [r.product_id for r in answer.results]


# ------------------------------------------------------------------ the STIR stage's fallbacks


class Handle:
    def __init__(self, result: Payload | BaseException, delay: float = 0.0) -> None:
        self._result = result
        self._delay = delay

    def ready(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Payload:
        if self._delay:
            if timeout is not None and timeout < self._delay:
                time.sleep(timeout)
                raise TimeoutError("late")
            time.sleep(self._delay)
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


@dataclass
class FakeDispatcher:
    answer: Any
    sent: list[tuple[str, Payload, str, float | None]] = field(default_factory=list)

    def submit(
        self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
    ) -> Handle:
        self.sent.append((task_name, payload, queue, expires_s))
        answer = self.answer(RerankRequest.from_json(payload))
        return answer if isinstance(answer, Handle) else Handle(answer)

    def close(self) -> None:
        pass


def activate_stir(db: Database, *, fusion_weight: float = 0.0, calibrated: int | None = 5) -> None:
    with db.session() as session:
        session.add(
            ModelVersion(
                id=2,
                kind=ModelKind.STIR,
                arch="stir:fake",
                file="s.safetensors",
                active=True,
                config={
                    "stir": {
                        "spec": {"input_size": 8},
                        "fusion_weight": fusion_weight,
                        "calibrated_top_n": calibrated,
                    }
                },
            )
        )


def stir_answer(distances: list[float]) -> Any:
    return lambda request: {"stir_version": 2, "distances": distances, "timings_ms": {}}


def test_the_stir_stage_sends_the_plan_and_reorders_by_stir(
    settings: Settings, db: Database
) -> None:
    activate_stir(db)
    dispatcher = FakeDispatcher(stir_answer([0.9, 0.1, 0.5, 0.3, 0.7]))
    stage = StirRerankStage(db, lambda: dispatcher, timeout_s=2.0)
    answer = service(settings, db, MemoryIndex(hits_of(range(40))), stage).query(
        photo(), "q.png", top_k=8
    )
    assert answer.reranked and answer.reranker == "stir-v2" and answer.rerank_note is None
    assert [r.first_stage_rank for r in answer.results] == [2, 4, 3, 5, 1, 6, 7, 8]
    assert [r.stir_score for r in answer.results[:5]] == [0.1, 0.3, 0.5, 0.7, 0.9]
    task, payload, queue, expires = dispatcher.sent[0]
    assert (task, queue) == (RERANK_TASK, RERANK_QUEUE)
    assert expires is not None and 0 < expires <= 2.0  # dropped, not run late, past the deadline
    request = RerankRequest.from_json(payload)
    assert request.stir_version == 2 and request.size == 8 and len(request.candidate_hashes) == 5
    assert set(payload) == {"stir_version", "size", "query_pixels_b64", "candidate_hashes"}


def test_a_fusion_weight_blends_the_first_stage_in_and_another_top_n_is_reported(
    settings: Settings, db: Database
) -> None:
    activate_stir(db, fusion_weight=1e6, calibrated=5)
    stage = StirRerankStage(db, lambda: FakeDispatcher(stir_answer([0.9, 0.1, 0.5])), timeout_s=2)
    search = service(settings, db, MemoryIndex(hits_of(range(40))), stage)
    answer = search.query(photo(), "q.png", top_k=8, rerank_top_n=3)
    # A huge weight keeps the first stage's order although STIR served.
    assert answer.reranked and [r.first_stage_rank for r in answer.results[:3]] == [1, 2, 3]
    assert answer.rerank_note == (
        "fusion weight 1e+06 was calibrated at top_n 5, applied at top_n 3"
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda r: Handle(TaskFailed("RuntimeError: CUDA out of memory")), "CUDA out of memory"),
        (stir_answer([0.1, 0.2]), "returned 2 scores for 5 candidates"),
        (lambda r: Handle(ConnectionError("broker gone")), "ConnectionError"),
    ],
)
def test_a_failing_reranker_leaves_the_first_stage_with_the_reason(
    settings: Settings, db: Database, answer: Any, reason: str
) -> None:
    activate_stir(db)
    stage = StirRerankStage(db, lambda: FakeDispatcher(answer), timeout_s=2.0)
    try:
        result = service(settings, db, MemoryIndex(hits_of(range(40))), stage).query(
            photo(), "q.png", top_k=8
        )
    except ConnectionError:
        pytest.fail("a dead reranker must not fail the query")
    assert not result.reranked and reason in (result.rerank_reason or "")
    assert [r.first_stage_rank for r in result.results] == list(range(1, 9))


def test_a_late_reranker_is_cut_at_the_deadline(settings: Settings, db: Database) -> None:
    activate_stir(db)
    late = FakeDispatcher(lambda r: Handle({"stir_version": 2, "distances": [0.0] * 5}, 5.0))
    stage = StirRerankStage(db, lambda: late, timeout_s=0.2)
    started = time.perf_counter()
    answer = service(settings, db, MemoryIndex(hits_of(range(40))), stage).query(
        photo(), "q.png", top_k=8
    )
    assert time.perf_counter() - started < 2.0
    assert not answer.reranked and answer.rerank_reason == "reranker timed out after 0.2 s"
    assert [r.first_stage_rank for r in answer.results] == list(range(1, 9))


def test_no_active_reranker_is_a_reason_not_an_error(settings: Settings, db: Database) -> None:
    stage = StirRerankStage(db, lambda: FakeDispatcher(stir_answer([])), timeout_s=2.0)
    answer = service(settings, db, MemoryIndex(hits_of(range(40))), stage).query(
        photo(), "q.png", top_k=8
    )
    assert not answer.reranked and answer.rerank_reason == "no reranker is active"
