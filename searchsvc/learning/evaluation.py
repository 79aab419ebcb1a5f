"""Retrieval quality of an embedder, alone and with a STIR reranker, as STIR.md defines it.

Metrics (all from :mod:`searchsvc.learning.metrics`): CMC@1/5/10, precision@5, mAP@5/10, for the
first stage alone (row ``embedder``) and reranked by STIR at ``top_n`` 5 and 10 (rows
``stir@5``, ``stir@10``). Relevance is by product; items are images.

Two ways to get a ranking:

- a labelled **evaluation set** (:class:`EvalSet`): the catalog's validation split, say. Its
  gallery is embedded and searched exactly (brute force, cosine), so two models are compared
  on identical items. Queries may be gallery items themselves (the SOP protocol): such a
  query is excluded from its own results and from its own ground truth;
- a labelled **query set against the live index** (:func:`evaluate_live`): each photo is
  answered by the query path itself (:class:`~searchsvc.serving.search.SearchService`, the
  one every caller uses), with the reranker the caller injects and nothing logged; items
  are then products, as a shopper sees them.

Reranking and fusion are the query path's own: :func:`searchsvc.models.fusion.rerank_order`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from searchsvc.core.errors import ImageError, SearchsvcError
from searchsvc.core.images import IMAGE_SUFFIXES, read_image_bytes
from searchsvc.learning.metrics import relevance_from_labels, retrieval_metrics
from searchsvc.learning.topk import self_positions, top_k_neighbours
from searchsvc.learning.training_data import (
    DataSplit,
    LabelledImage,
    PixelLoader,
    load_training_data,
    refs_of,
    require_val_queries,
    sample_validation,
    split_data,
    split_of,
)
from searchsvc.models.embedder import Embedder
from searchsvc.models.fusion import rerank_order
from searchsvc.models.stir import StirScorer
from searchsvc.serving.search import SearchService
from searchsvc.storage.db import Database, ModelKind
from searchsvc.storage.pixels import PixelStore
from searchsvc.storage.versions import active_version

if TYPE_CHECKING:
    from searchsvc.core.config import Settings

KS = (1, 5, 10)
REPORTED = ("cmc@1", "cmc@5", "cmc@10", "precision@5", "map@5", "map@10")
"""The metrics every report carries, in table order."""
TOP_NS = (5, 10)
"""STIR is evaluated reranking the first 5 and the first 10 results."""
PAIR_BATCH = 256

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------- pure functions


def first_stage(
    query_vectors: np.ndarray,
    gallery_vectors: np.ndarray,
    k: int,
    *,
    self_index: Sequence[int] | np.ndarray | None = None,
    chunk: int | None = None,
) -> tuple[IntArray, FloatArray]:
    """Top ``k`` gallery items per query by cosine distance (``1 - q.g`` of unit vectors,
    as the query path reports it), nearest first, ties in gallery order.

    ``self_index[q]`` is the gallery position of query ``q`` when it is a gallery item, -1
    otherwise; a query never ranks itself. Returns ``(Q, K)`` indices and distances with
    ``K = min(k, gallery size - 1 if any query is in the gallery else gallery size)``.
    Memory: ``chunk`` queries' distances at a time, never ``Q x G``
    (:func:`searchsvc.learning.topk.top_k_neighbours`).
    """
    return top_k_neighbours(query_vectors, gallery_vectors, k, self_index=self_index, chunk=chunk)


def relevant_counts(
    query_labels: Sequence[str],
    gallery_labels: Sequence[str],
    self_index: Sequence[int] | np.ndarray | None = None,
) -> IntArray:
    """Per query: gallery items with its label, not counting the query itself."""
    counts: dict[str, int] = {}
    for label in gallery_labels:
        counts[label] = counts.get(label, 0) + 1
    own = self_positions(self_index, len(query_labels), len(gallery_labels))
    return np.array(
        [counts.get(label, 0) - (1 if own[n] >= 0 else 0) for n, label in enumerate(query_labels)],
        dtype=np.int64,
    )


def relevance_at(ranked_labels: np.ndarray, query_labels: Sequence[str], k: int) -> np.ndarray:
    """``(Q, k)`` relevance of each query's ranked labels. A ranking shorter than ``k`` (a
    small gallery) is padded with misses: its "top k" is all there is."""
    ranked = np.asarray(ranked_labels, dtype=object)
    rel = relevance_from_labels(np.asarray(query_labels, dtype=object), ranked)[:, :k]
    if rel.shape[1] < k:
        rel = np.pad(rel, ((0, 0), (0, k - rel.shape[1])), constant_values=False)
    return rel


@dataclass(frozen=True)
class MetricRow:
    metrics: dict[str, float]
    n_queries: int
    n_skipped: int


def score(
    ranked_labels: np.ndarray, query_labels: Sequence[str], n_relevant: IntArray
) -> MetricRow:
    """The reported metrics of one ranking; queries with nothing relevant are skipped."""
    rel = relevance_at(ranked_labels, query_labels, max(KS))
    report = retrieval_metrics(rel, n_relevant, ks=KS)
    return MetricRow(
        {name: report.metrics[name] for name in REPORTED}, report.n_queries, report.n_skipped
    )


FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Fusion weights tried by score calibration (0: STIR alone, the paper's rule)."""

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(N, S, S, 3)`` query pixels x ``(N, S, S, 3)`` candidate pixels -> ``(N,)`` distances."""


@dataclass(frozen=True)
class Calibration:
    """How a reranker's distances are best used on a validation set, and the metrics then."""

    fusion_weight: float
    symmetric: bool
    rows: dict[str, float]

    def validation_metrics(self) -> dict[str, float]:
        """The rows plus the choices, as a validation function reports them to a trainer
        (``fusion_weight``; ``symmetric`` as 1.0 or 0.0)."""
        return {
            **self.rows,
            "fusion_weight": self.fusion_weight,
            "symmetric": float(self.symmetric),
        }


def best_calibration(options: Sequence[Calibration], metric: str = "cmc@1") -> Calibration:
    """The option that ranks best by ``metric``; a tie goes to one-way scoring (the same
    ranking at half the pairs)."""
    return max(options, key=lambda option: (option.rows[metric], not option.symmetric))


def stir_distances(
    score_pairs: PairScorer,
    query_pixels: np.ndarray,
    candidate_pixels: Callable[[np.ndarray], np.ndarray],
    candidates: np.ndarray,
    top_n: int,
    batch: int = PAIR_BATCH,
) -> FloatArray:
    """``(Q, n)`` STIR distances of each query against its first ``n = min(top_n, K)``
    candidates, scored in batches of ``batch`` pairs. ``candidate_pixels`` maps an array of
    candidate keys (gallery indices) to their pixels."""
    n = min(top_n, candidates.shape[1])
    q_idx = np.repeat(np.arange(len(candidates)), n)
    c_keys = candidates[:, :n].reshape(-1)
    out = np.empty(len(q_idx), dtype=np.float64)
    for start in range(0, len(q_idx), batch):
        end = start + batch
        out[start:end] = score_pairs(
            query_pixels[q_idx[start:end]], candidate_pixels(c_keys[start:end])
        )
    return out.reshape(len(candidates), n)


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class EvalReport:
    """Metrics rows (``embedder``, ``stir@5``, ``stir@10``) of one evaluation."""

    rows: dict[str, dict[str, float]]
    n_queries: int
    n_skipped: int
    n_gallery: int
    unreadable: int = 0
    seconds: float = 0.0
    models: dict[str, str] = field(default_factory=dict)
    """Which versions were evaluated: ``{"embedder": "v1", "stir": "v3"}``."""
    rerank_fallbacks: int = 0
    """Queries a reranker should have served and did not (live evaluation): its rows are
    then left out rather than reported as the first stage's."""

    def metric(self, name: str, row: str = "embedder") -> float:
        try:
            return self.rows[row][name]
        except KeyError:
            raise SearchsvcError(
                f"no metric {name!r} in row {row!r} (rows: {', '.join(self.rows)}; metrics: "
                f"{', '.join(REPORTED)})"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "n_queries": self.n_queries,
            "n_skipped": self.n_skipped,
            "n_gallery": self.n_gallery,
            "unreadable": self.unreadable,
            "seconds": round(self.seconds, 3),
            "models": self.models,
            "rerank_fallbacks": self.rerank_fallbacks,
        }


def format_table(reports: Mapping[str, EvalReport]) -> str:
    """One line per (report, row), metrics in percent."""
    width = max([len(f"{name} {row}") for name, r in reports.items() for row in r.rows] + [5])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{m:>11}" for m in REPORTED)]
    for name, report in reports.items():
        for row, metrics in report.rows.items():
            cells = "  ".join(f"{100 * metrics[m]:>11.2f}" for m in REPORTED)
            lines.append(f"{f'{name} {row}':<{width}}  {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation sets


@dataclass
class EvalSet:
    """A labelled gallery and labelled queries; queries may be gallery items."""

    gallery: list[LabelledImage]
    queries: list[LabelledImage]
    self_index: np.ndarray
    """``(Q,)`` gallery position of each query, -1 when it is not a gallery item."""
    loader: PixelLoader
    _pixels: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_split(cls, split: DataSplit, loader: PixelLoader, side: str = "val") -> EvalSet:
        """Gallery: the side's catalog images. Queries: every gallery image (self excluded)
        and the side's logged query photos (not gallery items: a shopper's photo is never
        a search result)."""
        items = split.val if side == "val" else split.train
        return cls.from_images(items, loader)

    @classmethod
    def from_images(cls, items: Sequence[LabelledImage], loader: PixelLoader) -> EvalSet:
        gallery = [i for i in items if i.source == "catalog"]
        photos = [i for i in items if i.source == "query"]
        self_index = np.concatenate([np.arange(len(gallery)), np.full(len(photos), -1)]).astype(
            np.int64
        )
        return cls(gallery, gallery + photos, self_index, loader)

    def pixels(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(gallery pixels, query pixels) at ``size``, decoded once per size."""
        key = ("gallery", size)
        if key not in self._pixels:
            self._pixels[key] = self.loader.many(refs_of(self.gallery), size)
            photos = [q for q, own in zip(self.queries, self.self_index, strict=True) if own < 0]
            self._pixels[("photos", size)] = self.loader.many(refs_of(photos), size)
        gallery, _ = self._pixels[key]
        photos_px, _ = self._pixels[("photos", size)]
        own = self.self_index[self.self_index >= 0]
        return gallery, np.concatenate([gallery[own], photos_px])

    def unreadable(self, size: int) -> int:
        self.pixels(size)
        return int((~self._pixels[("gallery", size)][1]).sum()) + int(
            (~self._pixels[("photos", size)][1]).sum()
        )


@dataclass(frozen=True)
class FirstStageResult:
    """An embedder's ranking of an evaluation set, kept so that rerankers can be scored on
    top of it without embedding again (STIR validation after every epoch)."""

    eval_set: EvalSet
    ranked: IntArray
    distances: FloatArray
    query_labels: list[str]
    gallery_labels: np.ndarray
    n_relevant: IntArray
    base: MetricRow

    @classmethod
    def from_ranking(
        cls, eval_set: EvalSet, ranked: IntArray, distances: FloatArray
    ) -> FirstStageResult:
        """The result of a ranking of ``eval_set`` (:func:`first_stage`'s output), scored."""
        query_labels = [q.label for q in eval_set.queries]
        gallery_labels = np.array([g.label for g in eval_set.gallery], dtype=object)
        n_relevant = relevant_counts(query_labels, list(gallery_labels), eval_set.self_index)
        base = score(gallery_labels[ranked], query_labels, n_relevant)
        return cls(eval_set, ranked, distances, query_labels, gallery_labels, n_relevant, base)

    def reranked(
        self,
        score_pairs: PairScorer,
        size: int,
        top_ns: Sequence[int] = TOP_NS,
        *,
        fusion_weight: float = 0.0,
    ) -> dict[str, dict[str, float]]:
        """Rows ``stir@<top_n>``: the ranking reranked by a pair scorer of ``size`` pixels,
        its distances blended with the first stage's by ``fusion_weight``
        (:func:`searchsvc.models.fusion.fuse_distances`; 0: STIR alone)."""
        widest = self.pair_distances(score_pairs, size, max(top_ns))
        return {
            f"stir@{top_n}": self.rerank_metrics(widest, top_n, fusion_weight) for top_n in top_ns
        }

    def pair_distances(self, score_pairs: PairScorer, size: int, top_n: int) -> FloatArray:
        """``(Q, n)`` pair distances of every query and its first ``top_n`` results."""
        gallery_px, query_px = self.eval_set.pixels(size)
        return stir_distances(
            score_pairs, query_px, lambda keys: gallery_px[keys], self.ranked, top_n
        )

    def calibrated(
        self,
        score_pairs: PairScorer,
        size: int,
        top_n: int,
        *,
        metric: str = "cmc@1",
        weights: Sequence[float] = FUSION_WEIGHTS,
        try_symmetric: bool = True,
    ) -> Calibration:
        """Score calibration: how a reranker's distances are used on this set. The best by
        ``metric`` of every fusion weight (:func:`searchsvc.models.fusion.fuse_distances`), with
        the pairs scored one way (query, candidate) and, with ``try_symmetric``, also as the
        mean of both orders (:attr:`StirConfig.symmetric`, twice the pairs at query time).
        Ties go to one-way scoring and to the larger weight (the cheaper and the safer
        choice: closer to the first stage's order)."""
        return best_calibration(
            self.calibration_options(
                score_pairs,
                size,
                top_n,
                metric=metric,
                weights=weights,
                try_symmetric=try_symmetric,
            ),
            metric,
        )

    def calibration_options(
        self,
        score_pairs: PairScorer,
        size: int,
        top_n: int,
        *,
        metric: str = "cmc@1",
        weights: Sequence[float] = FUSION_WEIGHTS,
        try_symmetric: bool = True,
    ) -> list[Calibration]:
        """The best fusion weight for one-way scoring and (``try_symmetric``) for
        symmetric scoring: one :class:`Calibration` each, one-way first."""
        one_way = self.pair_distances(score_pairs, size, top_n)
        weight, rows = self.best_fusion(one_way, top_n, metric=metric, weights=weights)
        options = [Calibration(weight, False, rows)]
        if try_symmetric:
            reverse = self.pair_distances(
                lambda queries, candidates: score_pairs(candidates, queries), size, top_n
            )
            weight, rows = self.best_fusion(
                (one_way + reverse) / 2, top_n, metric=metric, weights=weights
            )
            options.append(Calibration(weight, True, rows))
        return options

    def best_fusion(
        self,
        pair_distances: np.ndarray,
        top_n: int,
        *,
        metric: str = "cmc@1",
        weights: Sequence[float] = FUSION_WEIGHTS,
    ) -> tuple[float, dict[str, float]]:
        """:meth:`calibrated` on pair distances already computed."""
        best_weight, best_rows = 0.0, None
        for weight in sorted(weights):
            rows = self.rerank_metrics(pair_distances, top_n, weight)
            if best_rows is None or rows[metric] >= best_rows[metric]:
                best_weight, best_rows = weight, rows
        assert best_rows is not None, "no fusion weights to try"
        return best_weight, best_rows

    def rerank_metrics(
        self, pair_distances: np.ndarray, top_n: int, fusion_weight: float = 0.0
    ) -> dict[str, float]:
        """The metrics after reranking the first ``top_n`` by (fused) pair distances
        (:meth:`pair_distances`, at least ``top_n`` wide)."""
        n = min(top_n, self.ranked.shape[1])
        order = rerank_order(self.distances, pair_distances[:, :n], n, fusion_weight)
        reordered = np.take_along_axis(self.ranked, order, axis=1)
        return score(self.gallery_labels[reordered], self.query_labels, self.n_relevant).metrics


def rank_eval_set(
    eval_set: EvalSet, embedder: Embedder, *, depth: int = max(KS), batch_size: int = 64
) -> FirstStageResult:
    """Embed the set and rank its gallery for every query (brute force, exact)."""
    size = embedder.info.input_size
    gallery_px, query_px = eval_set.pixels(size)
    gallery_vec = embedder.embed(gallery_px, batch_size=batch_size)
    query_vec = embedder.embed(query_px, batch_size=batch_size)
    ranked, distances = first_stage(query_vec, gallery_vec, depth, self_index=eval_set.self_index)
    return FirstStageResult.from_ranking(eval_set, ranked, distances)


def evaluate(
    eval_set: EvalSet,
    embedder: Embedder,
    stir: StirScorer | None = None,
    *,
    top_ns: Sequence[int] = TOP_NS,
    batch_size: int = 64,
    models: Mapping[str, str] | None = None,
) -> EvalReport:
    """Embed the set, rank by brute force, score; with ``stir``, rerank at each ``top_n``."""
    started = time.perf_counter()
    result = rank_eval_set(eval_set, embedder, depth=max([*KS, *top_ns]), batch_size=batch_size)
    rows = {"embedder": result.base.metrics}
    if stir is not None:
        rows.update(
            result.reranked(
                stir.score_pairs,
                stir.info.input_size,
                top_ns,
                fusion_weight=stir.info.fusion_weight,
            )
        )
    return EvalReport(
        rows=rows,
        n_queries=result.base.n_queries,
        n_skipped=result.base.n_skipped,
        n_gallery=len(eval_set.gallery),
        unreadable=eval_set.unreadable(embedder.info.input_size),
        seconds=time.perf_counter() - started,
        models=dict(models or {}),
    )


def served_models(
    settings: Settings, db: Database
) -> tuple[Embedder, StirScorer | None, dict[str, str]]:
    """The active embedder and the active reranker (None when there is none), loaded as the
    query path loads them, and their versions (``{"embedder": "v1", "stir": "v3"}``)."""
    embedder_version = active_version(db, ModelKind.EMBEDDER)
    if embedder_version is None:
        raise SearchsvcError("no embedder yet: run 'searchsvc ingest CATALOG' first")
    stir_version = active_version(db, ModelKind.STIR)
    embedder = Embedder.from_file(
        embedder_version.file, device=settings.device, precision=settings.precision
    )
    stir = (
        StirScorer.from_file(
            stir_version.file, device=settings.device, precision=settings.precision
        )
        if stir_version is not None
        else None
    )
    models = {"embedder": f"v{embedder_version.id}"}
    if stir_version is not None:
        models["stir"] = f"v{stir_version.id}"
    return embedder, stir, models


def split_eval_set(
    settings: Settings, db: Database, pixels: PixelStore | None = None, *, side: str = "val"
) -> tuple[EvalSet, dict[str, Any]]:
    """One side of the catalog split (``SEARCHSVC_SPLIT_SEED``, ``SEARCHSVC_VAL_FRACTION``)
    as an evaluation set, and the split's record (its validation side sampled to at most
    ``SEARCHSVC_VAL_SAMPLE_IMAGES`` images)."""
    split = sample_validation(
        split_data(
            load_training_data(db), seed=settings.split_seed, val_fraction=settings.val_fraction
        ),
        settings.val_sample_images,
    )
    if side == "val":
        require_val_queries(split)
    loader = PixelLoader(settings.max_image_bytes, settings.max_image_pixels, pixels)
    eval_set = EvalSet.from_split(split, loader, side)
    if not eval_set.gallery:
        raise SearchsvcError(f"the {side} side of the split holds no catalog image")
    return eval_set, split.record


def query_photos_eval_set(
    settings: Settings,
    db: Database,
    queries: Sequence[LabelledQuery],
    pixels: PixelStore | None = None,
) -> EvalSet:
    """Labelled query photos against every indexed catalog image (brute force, by image):
    the live catalog as an evaluation set. The photos are not gallery items."""
    gallery = [i for i in load_training_data(db).images if i.source == "catalog"]
    if not gallery:
        raise SearchsvcError("no indexed catalog image: run 'searchsvc ingest CATALOG' first")
    photos = [LabelledImage(q.label, q.path, "", "query") for q in queries]
    loader = PixelLoader(settings.max_image_bytes, settings.max_image_pixels, pixels)
    return EvalSet(gallery, photos, np.full(len(photos), -1, dtype=np.int64), loader)


def evaluate_served_on_split(
    settings: Settings, db: Database, pixels: PixelStore | None = None, *, side: str = "val"
) -> tuple[EvalReport, dict[str, Any]]:
    """The active embedder (and active reranker, if any) on one side of the catalog split
    (:func:`split_eval_set`): what ``searchsvc eval`` prints without ``--queries``. Reads
    the DB and the image files; the index is not opened. Returns the report and the
    split's record."""
    eval_set, record = split_eval_set(settings, db, pixels, side=side)
    embedder, stir, models = served_models(settings, db)
    top_ns = sorted({*TOP_NS, settings.rerank_top_n})
    report = evaluate(
        eval_set, embedder, stir, top_ns=top_ns, batch_size=settings.batch_size, models=models
    )
    return report, record


# --------------------------------------------------------------------------- live index


@dataclass(frozen=True)
class LabelledQuery:
    label: str
    path: Path


def load_query_set(root: Path) -> list[LabelledQuery]:
    """Labelled query photos from a folder: either one sub-folder per product (the catalog
    layout) or files named ``<product_id>__<anything>.<ext>`` (or ``<product_id>.<ext>``),
    as ``searchsvc demo-catalog`` writes its held-out queries."""
    if not root.is_dir():
        raise SearchsvcError(f"{root}: not a folder of labelled query photos")
    queries: list[LabelledQuery] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            queries.extend(
                LabelledQuery(entry.name, f)
                for f in sorted(entry.iterdir())
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            queries.append(LabelledQuery(entry.stem.split("__")[0], entry))
    if not queries:
        raise SearchsvcError(f"{root}: no labelled query photos found")
    return queries


def queries_on_side(
    queries: Sequence[LabelledQuery], settings: Settings, side: str
) -> list[LabelledQuery]:
    """The photos whose product is on ``side`` of the catalog split (``val``: products the
    retrain never trains on). Refuses an empty result, naming the side."""
    kept = [
        q
        for q in queries
        if split_of(q.label, seed=settings.split_seed, val_fraction=settings.val_fraction) == side
    ]
    if not kept:
        raise SearchsvcError(f"none of the {len(queries)} query photos is of a {side}-side product")
    return kept


NOT_RERANKABLE = ("fewer than 2 candidates", "no reranker is active")
"""Why a query may rightly come back in first-stage order (anything else is a fallback)."""


def _points_served(search: SearchService) -> int:
    collection = search.index.resolve_alias(search.settings.collection_alias)
    return search.index.count(collection) if collection else 0


def evaluate_live(
    search: SearchService,
    queries: Sequence[LabelledQuery],
    *,
    top_ns: Sequence[int] = TOP_NS,
    max_bytes: int,
) -> EvalReport:
    """The served models on the live index, through the query path itself: each photo is
    answered by ``search`` (the embedder whose collection the alias names, then, for each
    ``top_n``, the reranker of ``search``'s rerank stage). Results are products; a query's
    relevant item is its product. Nothing is written to the query log when ``search``
    records nothing."""
    started = time.perf_counter()
    depth = max([*KS, *top_ns])
    rankings: dict[str, list[list[str]]] = {"embedder": []}
    labels: list[str] = []
    unreadable = 0
    fallbacks: dict[str, int] = {}
    models: dict[str, str] = {}
    for query in queries:
        try:
            data = read_image_bytes(query.path, max_bytes)
            plain = search.query(data, str(query.path), top_k=depth, rerank=False)
        except ImageError:
            unreadable += 1
            continue
        labels.append(query.label)
        rankings["embedder"].append([r.product_id for r in plain.results])
        models["embedder"] = f"v{plain.embedder_version}"
        for top_n in top_ns:
            answer = search.query(
                data, str(query.path), top_k=depth, rerank=True, rerank_top_n=top_n
            )
            rankings.setdefault(f"stir@{top_n}", []).append([r.product_id for r in answer.results])
            if answer.reranked:
                models["stir"] = answer.reranker or ""
            elif answer.rerank_reason not in NOT_RERANKABLE:
                fallbacks[f"stir@{top_n}"] = fallbacks.get(f"stir@{top_n}", 0) + 1
    # One relevant product per query: results are products, each listed once.
    n_relevant = np.ones(len(labels), dtype=np.int64)
    rows: dict[str, dict[str, float]] = {}
    base: MetricRow | None = None
    for name, ranked in rankings.items():
        if name != "embedder" and (fallbacks.get(name) or "stir" not in models):
            continue  # no reranker served these queries: the row would repeat the first stage
        width = max([len(r) for r in ranked] + [1])
        table = np.full((len(ranked), width), "", dtype=object)
        for n, row in enumerate(ranked):
            table[n, : len(row)] = row
        scored = score(table, labels, n_relevant)
        rows[name] = scored.metrics
        base = base or scored
    assert base is not None or not labels
    return EvalReport(
        rows=rows,
        n_queries=base.n_queries if base else 0,
        n_skipped=base.n_skipped if base else 0,
        n_gallery=_points_served(search),
        unreadable=unreadable,
        seconds=time.perf_counter() - started,
        models=models,
        rerank_fallbacks=sum(fallbacks.values()),
    )
