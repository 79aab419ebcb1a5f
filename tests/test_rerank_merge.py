"""Invariants of the STIR merge rule (in the spirit of open-metric-learning's tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from searchsvc.models.fusion import MergeResult, fuse_distances, merge_reranked, validate_top_n

FIRST = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70]


def test_constant_scorer_keeps_the_first_stage_order() -> None:
    result = merge_reranked(FIRST, [0.5] * 5, top_n=5)
    assert result.order == list(range(7))


def test_oracle_scorer_puts_every_true_match_of_top_n_first() -> None:
    is_match = [False, True, False, True, False, True, True]  # matches at 1, 3 (in top 5), 5, 6
    oracle = [0.0 if is_match[i] else 1.0 for i in range(5)]
    result = merge_reranked(FIRST, oracle, top_n=5)
    assert result.order == [1, 3, 0, 2, 4, 5, 6]
    assert all(is_match[i] for i in result.order[:2])


def test_top_n_equal_to_k_reorders_everything() -> None:
    stir = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    result = merge_reranked(FIRST, stir, top_n=7)
    assert result.order == [6, 5, 4, 3, 2, 1, 0]
    # nothing follows: the block maps onto [d_1, d_k] = [0.1, 0.7]: 0.1 + 0.6 * s
    assert result.distances == pytest.approx([0.1 + 0.6 * s for s in sorted(stir)])


def test_ties_are_stable() -> None:
    result = merge_reranked(FIRST, [0.3, 0.1, 0.3, 0.1, 0.3], top_n=5)
    assert result.order == [1, 3, 0, 2, 4, 5, 6]


def test_items_after_top_n_never_move_and_keep_their_distances() -> None:
    result = merge_reranked(FIRST, [0.9, 0.1, 0.5], top_n=3)
    assert result.order[3:] == [3, 4, 5, 6]
    assert result.distances[3:] == FIRST[3:]


def test_reported_distances_rescaled_strictly_below_the_next_item() -> None:
    # lo = d_1 = 0.1, hi = d_4 = 0.4: reported = 0.1 + 0.3 * s, capped below 0.4
    result = merge_reranked(FIRST, [0.9, 0.0, 1.0], top_n=3)
    assert result.order[:3] == [1, 0, 2]
    assert result.distances[0] == pytest.approx(0.1)
    assert result.distances[1] == pytest.approx(0.1 + 0.3 * 0.9)
    assert result.distances[2] < 0.4  # s = 1 would land on 0.4: clamped strictly below
    assert result.distances[2] == math.nextafter(0.4, -math.inf)


def test_all_tied_first_stage_distances_still_monotone() -> None:
    result = merge_reranked([0.5, 0.5, 0.5, 0.5], [0.7, 0.2], top_n=2)
    assert result.order == [1, 0, 2, 3]
    assert all(d < 0.5 for d in result.distances[:2])
    assert result.distances == sorted(result.distances)


@pytest.mark.parametrize(("top_n", "k"), [(1, 5), (0, 5), (6, 5)])
def test_top_n_out_of_range_names_the_values(top_n: int, k: int) -> None:
    with pytest.raises(ValueError, match=f"top_n={top_n}, k={k}"):
        merge_reranked([0.1 * i for i in range(k)], [0.5] * max(top_n, 0), top_n=top_n)
    with pytest.raises(ValueError, match=f"top_n={top_n}"):
        validate_top_n(top_n, k)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected 3 STIR distances"):
        merge_reranked(FIRST, [0.1, 0.2], top_n=3)
    with pytest.raises(ValueError, match="not in"):
        merge_reranked(FIRST, [0.1, float("nan"), 0.2], top_n=3)
    with pytest.raises(ValueError, match="non-decreasing"):
        merge_reranked([0.2, 0.1, 0.3], [0.1, 0.2], top_n=2)


def test_apply_reorders_items() -> None:
    result = merge_reranked([0.1, 0.2, 0.3], [0.9, 0.1], top_n=2)
    assert result.apply(["a", "b", "c"]) == ["b", "a", "c"]
    with pytest.raises(ValueError):
        MergeResult(order=[0, 1], distances=[0.0, 0.0]).apply(["a"])


@st.composite
def rankings(draw: st.DrawFn) -> tuple[list[float], list[float], int]:
    k = draw(st.integers(min_value=2, max_value=30))
    top_n = draw(st.integers(min_value=2, max_value=k))
    values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False)
    first = sorted(draw(st.lists(values, min_size=k, max_size=k)))
    # few distinct STIR values: ties are common
    stir = draw(
        st.lists(
            st.sampled_from([0.0, 0.25, 0.5, 0.999, 1.0]) | st.floats(0, 1),
            min_size=top_n,
            max_size=top_n,
        )
    )
    return first, stir, top_n


@settings(max_examples=300, deadline=None)
@given(rankings())
def test_merge_properties(case: tuple[list[float], list[float], int]) -> None:
    first, stir, top_n = case
    k = len(first)
    result = merge_reranked(first, stir, top_n)
    # a permutation whose tail is untouched
    assert sorted(result.order) == list(range(k))
    assert result.order[top_n:] == list(range(top_n, k))
    assert result.distances[top_n:] == first[top_n:]
    # the block is sorted by STIR distance, ties in first-stage order
    block = result.order[:top_n]
    assert [(stir[i], i) for i in block] == sorted((stir[i], i) for i in range(top_n))
    # reported distances: non-decreasing, within [d_1, ...], strictly below d_(top_n+1)
    assert all(a <= b for a, b in zip(result.distances, result.distances[1:], strict=False))
    if top_n < k and first[0] < first[top_n]:
        assert all(first[0] <= d < first[top_n] for d in result.distances[:top_n])
    elif top_n < k:
        assert all(d < first[top_n] for d in result.distances[:top_n])
    else:
        assert all(first[0] <= d <= first[-1] for d in result.distances)
    # reported distances of the block follow the STIR distances
    for a, b in zip(block, block[1:], strict=False):
        assert stir[a] <= stir[b]


@settings(max_examples=100, deadline=None)
@given(rankings())
def test_constant_and_oracle_scorers_property(case: tuple[list[float], list[float], int]) -> None:
    first, stir, top_n = case
    assert merge_reranked(first, [0.3] * top_n, top_n).order == list(range(len(first)))
    is_match = [s < 0.5 for s in stir]  # use the drawn values as a random ground truth
    oracle = [0.0 if m else 1.0 for m in is_match]
    order = merge_reranked(first, oracle, top_n).order
    n_match = sum(is_match)
    assert all(is_match[i] for i in order[:n_match])
    assert order[:n_match] == [i for i in range(top_n) if is_match[i]]


def test_fusion_weight_zero_is_the_papers_rule() -> None:
    stir = [0.9, 0.2, 0.5]
    assert fuse_distances(FIRST[:3], stir, 0.0).tolist() == stir


def test_fusion_blends_stir_with_the_rescaled_first_stage_distance() -> None:
    # first block 0.1, 0.2, 0.3 -> relative 0, 0.5, 1; w = 1: (s + r) / 2
    fused = fuse_distances([0.1, 0.2, 0.3], [0.6, 0.2, 0.0], 1.0)
    assert fused == pytest.approx([0.3, 0.35, 0.5])
    # STIR alone would put item 2 first; the blend keeps item 0 there.
    assert merge_reranked(FIRST, fused.tolist(), top_n=3).order[:3] == [0, 1, 2]
    assert merge_reranked(FIRST, [0.6, 0.2, 0.0], top_n=3).order[:3] == [2, 1, 0]


def test_a_large_fusion_weight_keeps_the_first_stage_order() -> None:
    stir = [0.99, 0.5, 0.01, 0.3, 0.7]
    fused = fuse_distances(FIRST[:5], stir, 1e6)
    assert merge_reranked(FIRST, fused.tolist(), top_n=5).order == list(range(7))


def test_fusion_is_scale_free_and_works_row_by_row() -> None:
    first = np.array([[0.1, 0.2, 0.4], [1.0, 2.0, 4.0], [0.5, 0.5, 0.5]])
    stir = np.array([[0.3, 0.1, 0.2], [0.3, 0.1, 0.2], [0.3, 0.1, 0.2]])
    fused = fuse_distances(first, stir, 2.0)
    assert fused[0] == pytest.approx(fused[1])  # 10x the first-stage scale: same blend
    assert fused[2] == pytest.approx(stir[2] / 3)  # all tied: only STIR speaks
    assert ((fused >= 0) & (fused <= 1)).all()


def test_fusion_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="weight"):
        fuse_distances([0.1, 0.2], [0.5, 0.5], -1.0)
    with pytest.raises(ValueError, match="shape"):
        fuse_distances([0.1, 0.2], [0.5], 1.0)
