"""Retrieval metrics against hand-computed cases (STIR.md definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from searchsvc.learning.metrics import (
    cmc_at_k,
    map_at_k,
    precision_at_k,
    relevance_from_labels,
    retrieval_metrics,
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
    report = retrieval_metrics(rel, [2, 1], ks=(1, 3))
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
