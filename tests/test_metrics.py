"""Retrieval metrics against hand-computed cases (STIR.md definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from searchsvc.learning.metrics import (
    cmc_at_k,
    map_at_k,
    metrics_for_labels,
    precision_at_k,
    ranked_indices,
    relevance_from_labels,
    retrieval_metrics,
    self_excluded_relevance,
)

# Three queries, five ranked results each (1 = relevant):
#   q0: 1 0 1 0 0   n_relevant = 2
#   q1: 0 0 0 1 1   n_relevant = 3
#   q2: 0 0 0 0 0   n_relevant = 1
REL = np.array(
    [
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0],
    ],
    dtype=bool,
)
N_REL = np.array([2, 3, 1])


def test_cmc() -> None:
    # k=1: q0 hit at rank 1 -> 1; q1 -> 0; q2 -> 0
    assert cmc_at_k(REL, N_REL, 1).tolist() == [1.0, 0.0, 0.0]
    # k=3: q0 1; q1 first hit at rank 4 -> 0; q2 0
    assert cmc_at_k(REL, N_REL, 3).tolist() == [1.0, 0.0, 0.0]
    # k=4: q1 now hits -> 1
    assert cmc_at_k(REL, N_REL, 4).tolist() == [1.0, 1.0, 0.0]


def test_precision() -> None:
    # k=1: q0 1/min(1,2)=1; q1 0/1=0; q2 0/1=0
    assert precision_at_k(REL, N_REL, 1).tolist() == [1.0, 0.0, 0.0]
    # k=3: q0 hits {1,3} = 2 / min(3,2)=2 -> 1.0; q1 0/3 = 0; q2 0/1 = 0
    assert precision_at_k(REL, N_REL, 3).tolist() == [1.0, 0.0, 0.0]
    # k=5: q0 2/min(5,2) = 1.0; q1 hits {4,5} = 2/min(5,3)=2/3; q2 0/1 = 0
    np.testing.assert_allclose(precision_at_k(REL, N_REL, 5), [1.0, 2 / 3, 0.0])


def test_map() -> None:
    # q0, k=5: rel at ranks 1 and 3; n_1 = 1, n_3 = 2; n_k = 2
    #   (1/2) * (1/1 + 2/3) = (1/2) * (5/3) = 5/6
    # q1, k=5: rel at ranks 4 and 5; n_4 = 1, n_5 = 2; n_k = 2
    #   (1/2) * (1/4 + 2/5) = (1/2) * (13/20) = 13/40
    # q2: n_k = 0 -> 0
    np.testing.assert_allclose(map_at_k(REL, N_REL, 5), [5 / 6, 13 / 40, 0.0])
    # k=2: q0 rel at rank 1 only: (1/1) * (1/1) = 1; q1 no hit -> 0
    np.testing.assert_allclose(map_at_k(REL, N_REL, 2), [1.0, 0.0, 0.0])
    # k=3 normalises by hits found (n_k = 2), not by min(k, n_relevant): same 5/6 for q0
    assert map_at_k(REL, N_REL, 3)[0] == pytest.approx(5 / 6)


def test_map_divides_by_hits_found_not_by_relevant_count() -> None:
    # one hit at rank 2 of 3 relevant: (1/1) * (1/2) = 0.5 (a recall-normalised AP would be 1/6)
    assert map_at_k([[0, 1, 0]], [3], 3).tolist() == [0.5]


def test_retrieval_metrics_means_and_skips_queries_without_relevant_items() -> None:
    rel = np.vstack([REL, np.zeros((1, 5), dtype=bool)])
    n_rel = np.append(N_REL, 0)  # the 4th query has nothing relevant in the gallery
    report = retrieval_metrics(rel, n_rel, ks=(1, 5))
    assert report.n_queries == 3 and report.n_skipped == 1
    # means over q0..q2 of the hand values above
    assert report.metrics["cmc@1"] == pytest.approx(1 / 3)
    assert report.metrics["cmc@5"] == pytest.approx(2 / 3)
    assert report.metrics["precision@5"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report.metrics["map@5"] == pytest.approx((5 / 6 + 13 / 40 + 0) / 3)


def test_labels_interface() -> None:
    # query labels a, b; ranked gallery labels below; relevant counts 2 and 1
    #   q "a": a x a -> rel 1 0 1; q "b": x x b -> rel 0 0 1
    rel = relevance_from_labels(["a", "b"], [["a", "x", "a"], ["x", "x", "b"]])
    assert rel.tolist() == [[True, False, True], [False, False, True]]
    report = metrics_for_labels(["a", "b"], [["a", "x", "a"], ["x", "x", "b"]], [2, 1], ks=(1, 3))
    # cmc@1 = (1 + 0)/2; precision@3 = (2/2 + 1/1)/2 = 1; map@3 = ((1/1 + 2/3)/2 + (1/3)/1)/2
    assert report.metrics["cmc@1"] == pytest.approx(0.5)
    assert report.metrics["precision@3"] == pytest.approx(1.0)
    assert report.metrics["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_validation() -> None:
    with pytest.raises(ValueError, match="k=6 exceeds the 5 ranked positions"):
        cmc_at_k(REL, N_REL, 6)
    with pytest.raises(ValueError, match="no relevant item"):
        precision_at_k(REL, [2, 3, 0], 1)
    with pytest.raises(ValueError, match="n_relevant=1"):
        cmc_at_k([[1, 1, 0]], [1], 1)  # two hits cannot come from one relevant item


def test_self_excluded_protocol_by_hand() -> None:
    # Items 0..4 with labels A A B B A; queries = the gallery.
    labels = np.array(["A", "A", "B", "B", "A"])
    # 1-D positions; distance = |x_i - x_j|
    x = np.array([0.0, 1.0, 1.2, 5.0, 3.0])
    distances = np.abs(x[:, None] - x[None, :])
    ranked_full = ranked_indices(distances, 5)  # the query itself comes first (distance 0)
    assert ranked_full[:, 0].tolist() == [0, 1, 2, 3, 4]
    rel, n_rel = self_excluded_relevance(labels, ranked_full, k=3)
    # Nearest others (self removed):
    #   q0 (A, x=0):   1 (A, d1), 2 (B, d1.2), 4 (A, d3)     -> 1 0 1
    #   q1 (A, x=1):   2 (B, d.2), 0 (A, d1), 4 (A, d2)      -> 0 1 1
    #   q2 (B, x=1.2): 1 (A, d.2), 0 (A, d1.2), 4 (A, d1.8)  -> 0 0 0
    #   q3 (B, x=5):   4 (A, d2), 2 (B, d3.8), 1 (A, d4)      -> 0 1 0
    #   q4 (A, x=3):   2 (B, d1.8), 1 (A, d2), 3 (B, d2)      -> 0 1 0  (tie 1 vs 3: index order)
    assert rel.astype(int).tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 1, 0], [0, 1, 0]]
    # ground truth without the query itself: A has 3 items -> 2 others; B has 2 -> 1 other
    assert n_rel.tolist() == [2, 2, 1, 1, 2]
    # CMC@1: only q0 -> 1/5. precision@3: q0 2/2, q1 2/2, q2 0/1, q3 1/1, q4 1/2 -> 3.5/5
    # mAP@3: q0 (1/1 + 2/3)/2 = 5/6; q1 (1/2 + 2/3)/2 = 7/12; q2 0; q3 (1/2)/1 = 1/2;
    #        q4 (1/2)/1 = 1/2
    report = retrieval_metrics(rel, n_rel, ks=(1, 3))
    assert report.metrics["cmc@1"] == pytest.approx(1 / 5)
    assert report.metrics["precision@3"] == pytest.approx(3.5 / 5)
    assert report.metrics["map@3"] == pytest.approx((5 / 6 + 7 / 12 + 0 + 1 / 2 + 1 / 2) / 5)
    # excluding the query at ranking time gives the same relevance
    ranked_excl = ranked_indices(distances, 3, exclude_self=True)
    rel2, n_rel2 = self_excluded_relevance(labels, ranked_excl, k=3)
    assert rel2.tolist() == rel.tolist() and n_rel2.tolist() == n_rel.tolist()


def test_self_excluded_query_anywhere_in_its_row() -> None:
    labels = [0, 0, 1]
    # q0's row has itself in the middle; q1's row lacks itself; q2's row has itself last
    ranked = [[1, 0, 2], [0, 2, 1], [1, 0, 2]]
    rel, n_rel = self_excluded_relevance(labels, ranked, k=2)
    # q0: [1, 2] -> 1 0; q1: [0, 2] -> 1 0; q2: [1, 0] -> 0 0
    assert rel.astype(int).tolist() == [[1, 0], [1, 0], [0, 0]]
    assert n_rel.tolist() == [1, 1, 0]  # label 1 is a singleton: nothing to find
    report = retrieval_metrics(rel, n_rel, ks=(1,))
    assert report.n_skipped == 1 and report.metrics["cmc@1"] == 1.0
    with pytest.raises(ValueError, match="k=3"):
        self_excluded_relevance(labels, ranked, k=3)
