"""knn and greedy_coreset against float64 brute force on hypothesis-drawn cases, ties and duplicates included."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from npanomaly import kernels
from npanomaly.kernels import _config
from npanomaly.kernels.resize import gaussian_blur
from npanomaly.search import greedy_coreset, knn


@st.composite
def point_sets(draw, exclude_self=False):
    dim = draw(st.integers(1, 6))
    m = draw(st.integers(2 if exclude_self else 1, 40))
    q = m if exclude_self else draw(st.integers(1, 25))
    # A coarse integer grid makes exact ties and duplicate rows common; a fine one makes near ties.
    grid = draw(st.sampled_from([1.0, 0.25, 1e-3]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    bank = (rng.integers(-3, 4, size=(m, dim)) * grid).astype(np.float32)
    if draw(st.booleans()):
        bank += rng.standard_normal(bank.shape).astype(np.float32) * 1e-4
    queries = bank.copy() if exclude_self else (rng.integers(-3, 4, size=(q, dim)) * grid).astype(np.float32)
    k = draw(st.integers(1, m - 1 if exclude_self else m))
    return queries, bank, k


def assert_knn_exact(queries, bank, k, exclude_self=False):
    dist, index = knn(queries, bank, k, exclude_self=exclude_self)
    ref_dist, ref_index = ref.knn_bruteforce(queries, bank, k, exclude_self)
    assert dist.dtype == np.float32 and index.dtype == np.int64 and dist.shape == (len(queries), k)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-12)


@given(case=point_sets())
def test_knn_matches_bruteforce(case):
    assert_knn_exact(*case)


@given(case=point_sets(exclude_self=True))
def test_knn_nearest_other_matches_bruteforce(case):
    assert_knn_exact(*case, exclude_self=True)


@given(case=point_sets())
def test_knn_with_tiny_blocks_and_no_spare_candidates(case):
    """Blocks of 3 queries x 5 bank rows and no extra candidates: every merge path and the exact
    float64 fallback get exercised."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_config, "KNN_QUERY_BLOCK", 3)
        patch.setattr(_config, "KNN_BANK_BLOCK", 5)
        patch.setattr(_config, "KNN_EXTRA_CANDIDATES", 0)
        assert_knn_exact(*case)


@given(m=st.integers(_config.KNN_SCREEN_CHUNK + 1, 5 * _config.KNN_SCREEN_CHUNK), k=st.integers(1, 4),
       exclude_self=st.booleans(), grid=st.sampled_from([1.0, 1e-3]), seed=st.integers(0, 2**16))
def test_knn_rows_longer_than_one_screening_chunk(m, k, exclude_self, grid, seed):
    """The merge counts and walks each row in chunks of KNN_SCREEN_CHUNK columns (a compile-time
    constant, so not patched smaller): banks of several chunks, the last one partial, with ties."""
    rng = np.random.default_rng(seed)
    bank = (rng.integers(-2, 3, size=(m, 4)) * grid).astype(np.float32)
    queries = bank if exclude_self else (rng.integers(-2, 3, size=(30, 4)) * grid).astype(np.float32)
    assert_knn_exact(queries, bank, k, exclude_self)


def test_knn_near_ties_that_float32_blas_cannot_separate():
    """|q|^2 is ~2.5e6, so float32 screening is off by ~0.1, far more than the exact squared
    distances 0.0256 (row 0) and 0.0001 (row 1): only the float64 refinement orders them right."""
    query = (np.random.default_rng(0).standard_normal(256) * 100).astype(np.float32)
    bank = np.stack([query + np.float32(0.01), query.copy()])
    bank[1, 1] += np.float32(0.01)
    screened = (query @ query) + (bank * bank).sum(axis=1) - 2 * (bank @ query)
    exact = ((bank.astype(np.float64) - query) ** 2).sum(axis=1)
    assert np.argmin(screened) != np.argmin(exact)  # the trap is real
    assert_knn_exact(np.repeat(query[None], 3, axis=0), bank, 2)


def test_knn_float64_inputs_and_bank_of_one():
    q = np.random.default_rng(1).standard_normal((7, 3))
    assert_knn_exact(q, q[:1], 1)
    assert knn(q, q[:1])[0].dtype == np.float32


@pytest.mark.parametrize("call,error,match", [
    (lambda q, b: knn(q, b, k=0), ValueError, "k must be >= 1"),
    (lambda q, b: knn(q, b, k=11), ValueError, "k=11 exceeds the 10 bank rows"),
    (lambda q, b: knn(q, b[:, :3]), ValueError, "same number of features"),
    (lambda q, b: knn(q.astype(np.float64), b), TypeError, "same dtype"),
    (lambda q, b: knn(q[:0], b), ValueError, "non-empty"),
    (lambda q, b: knn(q[0], b), ValueError, "2 dimensions"),
    (lambda q, b: knn(q, np.where(b > 0, np.nan, b)), ValueError, "bank contains NaN"),
    (lambda q, b: knn(q, b, k=10, exclude_self=True), ValueError, "queries to be the bank itself"),
    (lambda q, b: greedy_coreset(b, 11), ValueError, "n_select=11 exceeds"),
    (lambda q, b: greedy_coreset(b, 2, start=10), ValueError, "start=10"),
    (lambda q, b: greedy_coreset(b, 0), ValueError, "n_select must be >= 1"),
    (lambda q, b: greedy_coreset(b.astype(np.int32), 2), TypeError, "float32 or float64"),
])
def test_search_bad_input(call, error, match):
    q = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    b = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(error, match=match):
        call(q, b)


@given(n=st.integers(1, 40), dim=st.integers(1, 5), data=st.data(), grid=st.sampled_from([1.0, 0.1]))
def test_exact_greedy_coreset_matches_textbook_greedy(n, dim, data, grid):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    features = (rng.integers(-2, 3, size=(n, dim)) * grid).astype(np.float32)  # many duplicates
    n_select = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, n - 1))
    chosen = greedy_coreset(features, n_select, projection_dim=None, start=start)
    np.testing.assert_array_equal(chosen, ref.greedy_k_center(features, n_select, start))
    assert len(set(chosen.tolist())) == n_select  # never the same row twice, duplicates or not


def test_projected_coreset_is_deterministic_and_covers_the_data():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((20, 256)) * 10
    features = (centres[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 256))).astype(np.float32)
    a = greedy_coreset(features, 40, projection_dim=32, seed=7)
    np.testing.assert_array_equal(a, greedy_coreset(features, 40, projection_dim=32, seed=7))
    # Each of the 20 well-separated clusters is hit, as exact k-center would do.
    nearest_centre = knn(features[a], centres.astype(np.float32))[1][:, 0]
    assert len(set(nearest_centre.tolist())) == 20
    assert greedy_coreset(features, 40, projection_dim=512, seed=7).tolist() == \
        greedy_coreset(features, 40, projection_dim=None).tolist()  # no projection when it would not shrink


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.integers(1, 9)),
       out=st.tuples(st.integers(1, 17), st.integers(1, 17)), seed=st.integers(0, 2**16))
def test_bilinear_resize_matches_reference(shape, out, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    np.testing.assert_allclose(kernels.bilinear_resize(x, *out), ref.bilinear_resize(x, *out), rtol=1e-12, atol=1e-12)


@given(sigma=st.sampled_from([0.5, 1.0, 2.0]), extra=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       seed=st.integers(0, 2**16))
def test_gaussian_blur_matches_direct_2d_convolution(sigma, extra, seed):
    radius = int(4 * sigma + 0.5)
    x = np.random.default_rng(seed).standard_normal((2, 1, radius + extra[0], radius + extra[1]))
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref.gaussian_blur(x, sigma), rtol=1e-10, atol=1e-12)


@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_gaussian_blur_on_images_smaller_than_its_kernel(shape, seed):
    """The reflection folds as often as needed: a constant stays constant, values stay in range."""
    x = np.random.default_rng(seed).standard_normal((1, 1) + shape)
    y = gaussian_blur(x, 4.0)
    assert y.max() <= x.max() + 1e-12 and y.min() >= x.min() - 1e-12
    np.testing.assert_allclose(gaussian_blur(np.full_like(x, 3.5), 4.0), 3.5, rtol=1e-12)


def test_features_far_from_the_origin_are_screened_conclusively(monkeypatch):
    """Post-ReLU features sit far from the origin with neighbours close together. Screening on
    coordinates centred at the bank's mean keeps the error bound at the data's spread, so almost
    no query falls back to the exhaustive scan (issue 13: ~1% of queries did, 56% of the time),
    and the result still equals a float64 brute force."""
    rng = np.random.default_rng(3)
    centre = rng.uniform(5, 10, 64)
    bank = (centre + 0.01 * rng.standard_normal((3000, 64))).astype(np.float32)
    queries = (centre + 0.01 * rng.standard_normal((2000, 64))).astype(np.float32)
    scanned = []
    exact_scan = kernels.exact_scan
    monkeypatch.setattr(kernels, "exact_scan", lambda q, b, rows, *rest: (scanned.append(rows.size),
                                                                          exact_scan(q, b, rows, *rest)))
    distances, indices = knn(queries, bank, k=3)
    assert sum(scanned) <= 0.001 * len(queries)
    exact = ((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(axis=2)
    expected = np.argsort(exact, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, np.sqrt(np.take_along_axis(exact, expected, axis=1)), rtol=1e-6)
