"""Evaluation against hand-computed cases (STIR.md definitions), reranking, the gate, and
the labelled query set formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchsvc.core.errors import SearchsvcError
from searchsvc.core.profiles import PROFILES
from searchsvc.learning.evaluation import (
    FUSION_WEIGHTS,
    EvalReport,
    EvalSet,
    FirstStageResult,
    first_stage,
    format_table,
    load_query_set,
    rank_eval_set,
    relevance_at,
    relevant_counts,
    score,
)
from searchsvc.learning.gate import Gate, decide
from searchsvc.learning.metrics import retrieval_metrics
from searchsvc.learning.training_data import LabelledImage, PixelLoader
from searchsvc.models.embedder import Embedder, EmbeddingNet
from searchsvc.models.fusion import rerank_order


def unit(angles_deg: list[float]) -> np.ndarray:
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_queries_in_the_gallery_exclude_themselves_hand_computed() -> None:
    # Gallery on a circle: A at 0 and 10 deg, B at 25 and 200 deg, C at 100 deg.
    gallery = unit([0, 10, 25, 200, 100])
    labels = ["A", "A", "B", "B", "C"]
    own = np.arange(5)  # every gallery item is also a query (SOP protocol)
    ranked, distances = first_stage(gallery, gallery, 10, self_index=own)
    assert ranked.shape == (5, 4)  # k capped at gallery size - 1: self never ranked
    assert not (ranked == own[:, None]).any()
    # query 0 (A at 0): 10 (A), 25 (B), 100 (C), 200 (B)
    assert ranked[0].tolist() == [1, 2, 4, 3]
    np.testing.assert_allclose(distances[0, 0], 1 - np.cos(np.radians(10)))
    # query 2 (B at 25): 10 (A), 0 (A), 100 (C), 200 (B): its only positive is last
    assert ranked[2].tolist() == [1, 0, 4, 3]
    n_rel = relevant_counts(labels, labels, own)
    assert n_rel.tolist() == [1, 1, 1, 1, 0]  # C has no other image: skipped
    row = score(np.array(labels, dtype=object)[ranked], labels, n_rel)
    assert row.n_queries == 4 and row.n_skipped == 1
    # CMC@1: q0 hit, q1 hit (0 is closest to 10), q2 miss, q3 (200 deg: 100 first) miss
    assert row.metrics["cmc@1"] == pytest.approx(2 / 4)
    # CMC@5 (the whole list): every query finds its positive
    assert row.metrics["cmc@5"] == pytest.approx(1.0)
    # precision@5 = hits / min(5, n_rel) = 1 for all four
    assert row.metrics["precision@5"] == pytest.approx(1.0)
    # mAP@5 with one hit at rank r is 1/r: q0 1, q1 1, q2 1/4; q3 (200 deg) ranks
    # 100 (C, 100 deg away), 0 (160), 10 (170), 25 (B, 175) -> 1/4
    assert ranked[3].tolist() == [4, 0, 1, 2]
    assert row.metrics["map@5"] == pytest.approx((1 + 1 + 1 / 4 + 1 / 4) / 4)


def test_sop_protocol_by_hand_with_ties_in_gallery_order() -> None:
    # Exact coordinates, so that equal distances are equal to the last bit.
    vectors = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = ["A", "B", "A", "B", "A"]
    own = np.arange(5)
    ranked, _ = first_stage(vectors, vectors, 4, self_index=own)
    # q0: 1 and 2 tie (same vector): gallery order; q3: 0 and 4 tie at distance 1.
    assert ranked.tolist() == [[1, 2, 3, 4], [2, 3, 0, 4], [1, 3, 0, 4], [1, 2, 0, 4], [3, 1, 2, 0]]
    n_rel = relevant_counts(labels, labels, own)
    assert n_rel.tolist() == [2, 1, 2, 1, 2]  # the query itself is not its own ground truth
    rel = relevance_at(np.array(labels, dtype=object)[ranked], labels, 4)
    assert rel.astype(int).tolist() == [
        [0, 1, 0, 1],
        [0, 1, 0, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 0],
        [0, 0, 1, 1],
    ]
    report = retrieval_metrics(rel, n_rel, ks=(1, 3))
    assert report.metrics["cmc@1"] == pytest.approx(1 / 5)
    # precision@3: q0 1/2, q1 1/1, q2 1/2, q3 1/1, q4 1/2
    assert report.metrics["precision@3"] == pytest.approx((0.5 + 1 + 0.5 + 1 + 0.5) / 5)
    # mAP@3 (one hit in the top 3 at rank r is 1/r): q0 1/2, q1 1/2, q2 1/3, q3 1, q4 1/3
    assert report.metrics["map@3"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 + 1 / 3) / 5)


def test_a_singleton_query_has_nothing_to_find_and_is_skipped() -> None:
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = ["a", "a", "b"]
    own = np.arange(3)
    ranked, _ = first_stage(vectors, vectors, 2, self_index=own)
    n_rel = relevant_counts(labels, labels, own)
    assert n_rel.tolist() == [1, 1, 0]
    row = score(np.array(labels, dtype=object)[ranked], labels, n_rel)
    assert row.n_skipped == 1 and row.n_queries == 2 and row.metrics["cmc@1"] == 1.0


def test_a_short_ranking_is_padded_with_misses() -> None:
    # 3 ranked results but k = 10: the "top 10" is all there is.
    rel = relevance_at(np.array([["a", "b", "a"]], dtype=object), ["a"], 10)
    assert rel.shape == (1, 10) and rel.tolist()[0][:3] == [True, False, True]
    row = score(np.array([["a", "b", "a"]], dtype=object), ["a"], np.array([2]))
    assert row.metrics["cmc@10"] == 1.0
    assert row.metrics["precision@5"] == pytest.approx(2 / 2)
    assert row.metrics["map@10"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_rerank_reorders_the_first_top_n_only() -> None:
    distances = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    stir = np.array([[0.9, 0.8, 0.1, 0.5, 0.7]])
    order = rerank_order(distances, stir, 5)
    assert order.tolist() == [[2, 3, 4, 1, 0, 5]]
    assert rerank_order(distances, stir[:, :2], 2).tolist() == [[1, 0, 2, 3, 4, 5]]


def _solid(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (40, 40), colour).save(path)
    return path


def test_a_perfect_reranker_lifts_cmc1_to_the_first_stage_cmc_at_top_n(tmp_path: Path) -> None:
    """An oracle STIR (0 for the same product, 1 otherwise) at top_n 5 must score CMC@1
    equal to the first stage's CMC@5."""
    rng = np.random.default_rng(1)
    colours = {f"p{n}": tuple(int(c) for c in rng.integers(0, 255, 3)) for n in range(8)}
    gallery = []
    for label, colour in colours.items():
        for view in range(2):
            tint = tuple(int(np.clip(c + rng.integers(-40, 40), 0, 255)) for c in colour)
            path = _solid(tmp_path / f"{label}-{view}.png", tint)  # type: ignore[arg-type]
            gallery.append(LabelledImage(label, path, f"{label}{view}", "catalog"))
    eval_set = EvalSet.from_images(gallery, PixelLoader(10**7, 10**8))
    net = EmbeddingNet(PROFILES["small"])
    result = rank_eval_set(eval_set, Embedder(net, device="cpu", precision="fp32"))
    labels_by_pixel = {
        tuple(px[0, 0]): g.label
        for px, g in zip(eval_set.pixels(32)[0], eval_set.gallery, strict=True)
    }

    def oracle(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.array(
            [
                0.0 if labels_by_pixel[tuple(q[0, 0])] == labels_by_pixel[tuple(c[0, 0])] else 1.0
                for q, c in zip(queries, candidates, strict=True)
            ]
        )

    rows = result.reranked(oracle, 32, [5, 10])
    assert rows["stir@5"]["cmc@1"] == pytest.approx(result.base.metrics["cmc@5"])
    assert rows["stir@10"]["cmc@1"] == pytest.approx(result.base.metrics["cmc@10"])
    assert rows["stir@5"]["cmc@10"] == pytest.approx(result.base.metrics["cmc@10"])
    report = EvalReport({"embedder": result.base.metrics, **rows}, 16, 0, 16)
    text = format_table({"x": report})
    assert "x stir@5" in text and "cmc@1" in text


def test_the_gate() -> None:
    gate = Gate("cmc@1", 0.02)
    assert decide(gate, 0.50, 0.47, what="embedder").passed
    assert not decide(gate, 0.48, 0.47, what="embedder").passed  # below the margin
    refused = decide(gate, 0.40, 0.47, what="embedder")
    assert not refused.passed and "kept out of service" in refused.reason
    assert not decide(Gate("cmc@1", 0.0), 0.47, 0.47, what="x").passed  # ties never win
    assert decide(Gate("map@5", 0.0), 0.48, 0.47, what="x").passed
    with pytest.raises(SearchsvcError, match="gate metric"):
        Gate("recall@1", 0.0)
    with pytest.raises(SearchsvcError, match="margin"):
        Gate("cmc@1", -0.1)


def test_labelled_query_sets_in_both_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid(flat / "fm00012__0.jpg", (1, 2, 3))
    _solid(flat / "p007.png", (1, 2, 3))
    (flat / "notes.txt").write_text("not an image")
    assert [(q.label, q.path.name) for q in load_query_set(flat)] == [
        ("fm00012", "fm00012__0.jpg"),
        ("p007", "p007.png"),
    ]
    nested = tmp_path / "nested"
    (nested / "p1").mkdir(parents=True)
    _solid(nested / "p1" / "a.jpg", (1, 2, 3))
    _solid(nested / "p1" / ".hidden.jpg", (1, 2, 3))
    assert [(q.label, q.path.name) for q in load_query_set(nested)] == [("p1", "a.jpg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchsvcError, match="no labelled query photos"):
        load_query_set(tmp_path / "empty")


def test_calibration_picks_the_fusion_weight_that_ranks_best_ties_to_the_larger() -> None:
    """Two queries whose match sits at first-stage rank 2. A pair scorer that is right
    about query 0 and wrong about query 1 helps only when blended with the first stage
    at a small weight; a scorer that knows nothing calibrates to the largest weight."""
    eval_set = EvalSet(
        gallery=[LabelledImage(lab, Path(), "", "catalog") for lab in ("a", "x", "b", "y")],
        queries=[LabelledImage(lab, Path(), "", "query") for lab in ("a", "b")],
        self_index=np.array([-1, -1]),
        loader=PixelLoader(0, 0),
    )
    ranked = np.array([[1, 0, 3], [3, 2, 1]])
    distances = np.array([[0.10, 0.12, 0.50], [0.10, 0.40, 0.50]])
    labels = np.array(["a", "x", "b", "y"], dtype=object)
    result = FirstStageResult(
        eval_set,
        ranked,
        distances,
        ["a", "b"],
        labels,
        np.array([1, 1]),
        score(labels[ranked], ["a", "b"], np.array([1, 1])),
    )
    assert result.base.metrics["cmc@1"] == 0.0
    # query 0: the scorer prefers its match clearly (0.2 vs 0.6); query 1: it prefers the
    # match too, but the first stage's gap (0.10 vs 0.40, relative 0 vs 0.75) is large.
    pair = np.array([[0.6, 0.2, 0.9], [0.6, 0.3, 0.9]])
    alone = result.rerank_metrics(pair, 3, 0.0)
    assert alone["cmc@1"] == 1.0
    fused = result.rerank_metrics(pair, 3, 1.0)  # q1: (0.6+0)/2=0.3 < (0.3+0.75)/2
    assert fused["cmc@1"] == 0.5
    # w = 0 and 0.25 both rank both matches first: the tie goes to the larger weight
    weight, rows = result.best_fusion(pair, 3)
    assert weight == 0.25 and rows["cmc@1"] == 1.0
    weight, rows = result.best_fusion(np.full((2, 3), 0.5), 3)
    assert weight == max(FUSION_WEIGHTS) and rows["cmc@1"] == 0.0  # no signal: the largest


def _two_query_result(
    gallery_values: list[int], query_values: list[int]
) -> tuple[FirstStageResult, dict[int, str]]:
    """The ranking of the test above, with 1x1 pixels whose value names each image (for a
    pair scorer that looks images up by name)."""
    gallery = [LabelledImage(lab, Path(), "", "catalog") for lab in ("a", "x", "b", "y")]
    eval_set = EvalSet(
        gallery=gallery,
        queries=[LabelledImage(lab, Path(), "", "query") for lab in ("a", "b")],
        self_index=np.array([-1, -1]),
        loader=PixelLoader(0, 0),
    )

    def as_pixels(values: list[int]) -> np.ndarray:
        return np.array(values, np.uint8)[:, None, None, None].repeat(3, -1)

    eval_set._pixels[("gallery", 1)] = (as_pixels(gallery_values), np.ones(4, bool))
    eval_set._pixels[("photos", 1)] = (as_pixels(query_values), np.ones(2, bool))
    ranked = np.array([[1, 0, 3], [3, 2, 1]])
    labels = np.array(["a", "x", "b", "y"], dtype=object)
    result = FirstStageResult(
        eval_set,
        ranked,
        np.array([[0.10, 0.12, 0.50], [0.10, 0.40, 0.50]]),
        ["a", "b"],
        labels,
        np.array([1, 1]),
        score(labels[ranked], ["a", "b"], np.array([1, 1])),
    )
    names = {v: f"g{i}" for i, v in enumerate(gallery_values)}
    names.update({v: f"q{i}" for i, v in enumerate(query_values)})
    return result, names


def _table_scorer(
    names: dict[int, str], table: dict[tuple[str, str], float]
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def score_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return np.array(
            [
                table[(names[int(f[0, 0, 0])], names[int(s[0, 0, 0])])]
                for f, s in zip(first, second, strict=True)
            ]
        )

    return score_pairs


def test_calibration_scores_both_pair_orders_when_that_ranks_better() -> None:
    """One way, the scorer ranks query 1's match (g2) below g3; the other way round it is
    sure of it: only the mean of both orders ranks both matches first."""
    result, names = _two_query_result([10, 11, 12, 13], [20, 21])
    one_way = {("q0", "g1"): 0.6, ("q0", "g0"): 0.2, ("q0", "g3"): 0.9}
    one_way |= {("q1", "g3"): 0.3, ("q1", "g2"): 0.5, ("q1", "g1"): 0.9}
    reverse = {(c, q): d for (q, c), d in one_way.items()}
    reverse |= {("g3", "q1"): 0.7, ("g2", "q1"): 0.1}
    scorer = _table_scorer(names, one_way | reverse)

    options = result.calibration_options(scorer, 1, 3)
    assert [o.symmetric for o in options] == [False, True]
    assert options[0].rows["cmc@1"] == 0.5 and options[1].rows["cmc@1"] == 1.0
    chosen = result.calibrated(scorer, 1, 3)
    assert chosen.symmetric and chosen.fusion_weight == 0.25  # ties go to the larger weight
    assert chosen.validation_metrics()["symmetric"] == 1.0
    assert not result.calibrated(scorer, 1, 3, try_symmetric=False).symmetric


def test_calibration_keeps_one_way_scoring_when_both_orders_tie() -> None:
    result, names = _two_query_result([10, 11, 12, 13], [20, 21])
    one_way = {("q0", "g1"): 0.6, ("q0", "g0"): 0.2, ("q0", "g3"): 0.9}
    one_way |= {("q1", "g3"): 0.6, ("q1", "g2"): 0.3, ("q1", "g1"): 0.9}
    scorer = _table_scorer(names, one_way | {(c, q): d for (q, c), d in one_way.items()})
    chosen = result.calibrated(scorer, 1, 3)
    assert chosen.rows["cmc@1"] == 1.0
    assert not chosen.symmetric  # the same ranking at half the pairs
    assert chosen.validation_metrics()["symmetric"] == 0.0
