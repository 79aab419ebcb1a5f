"""Chunked top-k equals the dense computation, and its memory follows the chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from searchsvc.learning.evaluation import first_stage, relevant_counts, score
from searchsvc.learning.topk import chunk_for, top_k_neighbours


def dense_top_k(
    queries: np.ndarray, gallery: np.ndarray, k: int, self_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The computation the chunked one replaced: the whole matrix, a stable argsort."""
    distances = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    has_self = self_index >= 0
    distances[np.flatnonzero(has_self), self_index[has_self]] = np.inf
    width = min(k, len(gallery) - (1 if has_self.any() else 0))
    order = np.argsort(distances, axis=1, kind="stable")[:, :width]
    return order, np.take_along_axis(distances, order, axis=1)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_top_k_equals_dense_on_random_vectors(chunk: int) -> None:
    rng = np.random.default_rng(3)
    gallery = unit(rng, 300, 16)
    photos = unit(rng, 40, 16)
    queries = np.concatenate([gallery, photos])
    own = np.concatenate([np.arange(300), np.full(40, -1)]).astype(np.int64)
    for k in (1, 10, 299):
        want = dense_top_k(queries, gallery, k, own)
        got = top_k_neighbours(queries, gallery, k, self_index=own, chunk=chunk)
        np.testing.assert_array_equal(got[0], want[0])
        # BLAS rounds a 1-row product (gemv) and a block (gemm) differently in the last
        # bit; the order is the same, the distances equal to 1e-15.
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("chunk", [1, 5, 33])
def test_ties_keep_gallery_order_even_across_the_kth_place(chunk: int) -> None:
    # Small-integer vectors: dot products are exact, so many distances tie exactly, and
    # ties straddle the k-th place in most rows.
    rng = np.random.default_rng(11)
    gallery = rng.integers(-1, 2, size=(120, 3)).astype(np.float64)
    queries = np.concatenate([gallery[:50], rng.integers(-1, 2, size=(30, 3))])
    own = np.concatenate([np.arange(50), np.full(30, -1)]).astype(np.int64)
    straddled = 0
    for k in (1, 4, 10, 119):
        want = dense_top_k(queries, gallery, k, own)
        got = top_k_neighbours(queries, gallery, k, self_index=own, chunk=chunk)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        if k < 119:
            full = np.sort(1.0 - queries @ gallery.T, axis=1)
            straddled += int((full[:, k - 1] == full[:, k]).sum())
    assert straddled > 50  # the data really exercises ties at the boundary


def test_a_query_never_ranks_itself_and_queries_outside_the_gallery_may_rank_anything() -> None:
    rng = np.random.default_rng(0)
    gallery = unit(rng, 20, 4)
    own = np.arange(20, dtype=np.int64)
    ranked, _ = top_k_neighbours(gallery, gallery, 19, self_index=own, chunk=3)
    assert ranked.shape == (20, 19)
    assert not (ranked == own[:, None]).any()
    ranked, distances = top_k_neighbours(gallery, gallery, 19, chunk=3)
    np.testing.assert_array_equal(ranked[:, 0], own)  # itself, at distance ~0
    assert np.allclose(distances[:, 0], 0.0)


def test_metrics_from_the_chunked_ranking_equal_the_dense_ones() -> None:
    rng = np.random.default_rng(5)
    labels = [f"p{n % 37}" for n in range(200)]
    centres = unit(rng, 37, 8)
    gallery = centres[[n % 37 for n in range(200)]] + 0.4 * rng.normal(size=(200, 8))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    own = np.arange(200, dtype=np.int64)
    gallery_labels = np.array(labels, dtype=object)
    n_rel = relevant_counts(labels, labels, own)
    dense, _ = dense_top_k(gallery, gallery, 10, own)
    chunked, _ = first_stage(gallery, gallery, 10, self_index=own, chunk=9)
    want = score(gallery_labels[dense], labels, n_rel)
    got = score(gallery_labels[chunked], labels, n_rel)
    assert got == want
    assert 0.0 < got.metrics["cmc@1"] < 1.0


def peak_bytes(queries: np.ndarray, gallery: np.ndarray, chunk: int) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        top_k_neighbours(queries, gallery, 10, chunk=chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_allocation_scales_with_the_chunk_not_queries_times_gallery() -> None:
    rng = np.random.default_rng(1)
    gallery = unit(rng, 4000, 8)
    queries = unit(rng, 4000, 8)
    dense_bytes = 16 * len(queries) * len(gallery)  # float64 matrix + int64 argsort
    inputs = 8 * 8 * (len(queries) + len(gallery))  # the float64 copies of the inputs
    output = 16 * 10 * len(queries)
    small, large = peak_bytes(queries, gallery, 50), peak_bytes(queries, gallery, 400)
    per_chunk_row = 18 * len(gallery) * 2  # the chunk's working arrays, with slack
    assert small < inputs + output + 50 * per_chunk_row
    assert large < inputs + output + 400 * per_chunk_row
    assert small < dense_bytes / 20
    # Eight times the chunk costs more: the working set is the chunk's.
    assert large - small > 300 * len(gallery) * 8


def test_default_chunk_keeps_the_working_set_within_its_budget() -> None:
    assert chunk_for(1_000_000, 64 * 1024 * 1024) == 3
    assert chunk_for(10, 64 * 1024 * 1024) > 100_000
    assert chunk_for(10**12) == 1
