"""kernels/blas.py: gemm called from Numba kernels, and single-threaded BLAS around them.

Checked against NumPy's matmul as the reference: hypothesis-generated shapes (empty ones
included), a transposed first factor, beta = 0 over garbage and beta = 1 accumulating, both
dtypes, inside a parallel loop; the NumPy callback that stands in where no 64-bit-integer
OpenBLAS is loaded (in a fresh process with NPANOMALY_BLAS=numpy) gives a Winograd convolution
equal to the reference; OpenBLAS is single-threaded inside a kernel and gets its thread count back
afterwards, also when two Python threads run kernels at once; and a Winograd convolution gives the
same bits on every call.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit, prange

from npanomaly import threads
from npanomaly.kernels import blas, winograd


def blas_counts():
    return [get() for get, _ in filter(None, map(threads._blas_thread_functions, threads._openblas_libraries()))]


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 9), n=st.integers(0, 9), k=st.integers(0, 9), transpose=st.booleans(),
       accumulate=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_gemm_matches_numpy(m, n, k, transpose, accumulate, dtype):
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    a = rng.standard_normal((k, m) if transpose else (m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = rng.standard_normal((m, n)).astype(dtype)
    expected = (a.T if transpose else a).astype(np.float64) @ b + (out if accumulate else 0.0)
    if not accumulate:
        out[...] = np.nan  # beta = 0 must not read what out held
    blas.gemm(a, b, out, transpose, 1.0 if accumulate else 0.0)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * max(1, k))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 9), margins=st.tuples(*[st.integers(0, 3)] * 6),
       transpose=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_gemm_on_column_blocks_of_wider_matrices(m, n, k, margins, transpose, dtype):
    """a, b and out as blocks of columns of wider matrices (their rows strided): BLAS's leading
    dimensions must be the row strides, and nothing outside the block of out may change."""
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    (a_left, a_right), (b_left, b_right), (o_left, o_right) = zip(margins[::2], margins[1::2])
    a_shape = (k, m) if transpose else (m, k)
    a_wide = rng.standard_normal((a_shape[0], a_left + a_shape[1] + a_right)).astype(dtype)
    b_wide = rng.standard_normal((k, b_left + n + b_right)).astype(dtype)
    out_wide = rng.standard_normal((m, o_left + n + o_right)).astype(dtype)
    a = a_wide[:, a_left:a_left + a_shape[1]]
    b = b_wide[:, b_left:b_left + n]
    before = out_wide.copy()
    expected = (a.T if transpose else a).astype(np.float64) @ b
    blas.gemm(a, b, out_wide[:, o_left:o_left + n], transpose, 0.0)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out_wide[:, o_left:o_left + n], expected, rtol=tolerance, atol=tolerance * k)
    np.testing.assert_array_equal(out_wide[:, :o_left], before[:, :o_left])
    np.testing.assert_array_equal(out_wide[:, o_left + n:], before[:, o_left + n:])


def test_gemm_rejects_columns_that_are_not_contiguous():
    with pytest.raises(ValueError, match="contiguous rows"):
        blas.gemm(np.ones((3, 4)), np.ones((4, 6))[:, ::2], np.empty((3, 3)))


def test_gemm_rejects_shapes_that_do_not_chain():
    with pytest.raises(ValueError, match="do not chain"):
        blas.gemm(np.ones((3, 4)), np.ones((5, 2)), np.empty((3, 2)))


@njit(parallel=True)
def _products_in_a_parallel_loop(a, b, out):
    for i in prange(a.shape[0]):
        blas.gemm(a[i], b[i], out[i])


def test_gemm_from_the_threads_of_a_parallel_loop():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 33, 20)), rng.standard_normal((16, 20, 17))
    out = np.empty((16, 33, 17))
    with threads.single_threaded_blas():
        _products_in_a_parallel_loop(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


FALLBACK = """
import numpy as np
from npanomaly.kernels import blas, winograd
assert blas.BACKEND == "numpy", blas.BACKEND
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 6, 9, 7)).astype(np.float32)
w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
g = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)
np.savez(__import__("sys").argv[1], y=winograd.winograd_conv2d_forward(x, w, None, 1, 1, 2),
         dw=winograd.winograd_conv2d_backward_weight(g, x, 1, 1, 4))
"""


def test_the_numpy_fallback_computes_the_same_convolution(tmp_path):
    import reference

    env = dict(os.environ, NPANOMALY_BLAS="numpy")
    out = subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path / "out.npz")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(shape) for shape in ((2, 6, 9, 7), (5, 6, 3, 3), (2, 5, 9, 7)))
    x, w, g = (v.astype(np.float32).astype(np.float64) for v in (x, w, g))
    y = reference.conv2d(x, w, np.zeros(5), (1, 1), (1, 1))
    dw = reference.conv2d_grads(x, w, g, (1, 1), (1, 1))[1]
    assert np.abs(got["y"] - y).max() <= 1e-5 * np.abs(y).max()
    assert np.abs(got["dw"] - dw).max() <= 1e-4 * np.abs(dw).max()


def test_blas_is_single_threaded_inside_and_restored_after():
    before = blas_counts()
    if not before:
        pytest.skip("NumPy's BLAS is not an OpenBLAS npanomaly can see")
    with threads.single_threaded_blas():
        assert blas_counts() == [1] * len(before)
    assert blas_counts() == before


def test_overlapping_single_threaded_blocks_restore_the_counts_once():
    before = blas_counts()
    if not before:
        pytest.skip("NumPy's BLAS is not an OpenBLAS npanomaly can see")
    first_inside, second_left = threading.Event(), threading.Event()

    def second():
        with threads.single_threaded_blas():
            first_inside.wait(10)
        second_left.set()

    other = threading.Thread(target=second)
    with threads.single_threaded_blas():
        other.start()
        first_inside.set()
        second_left.wait(10)
        assert blas_counts() == [1] * len(before)  # the other block left; this one still runs
    other.join()
    assert blas_counts() == before


def test_winograd_gives_the_same_bits_on_every_call(monkeypatch):
    """Small blocks, so that every thread runs many of them."""
    from npanomaly.kernels import _config

    monkeypatch.setattr(_config, "WINOGRAD_MIN_BLOCK_TILES", 3)
    monkeypatch.setattr(_config, "WINOGRAD_BLOCK_BYTES", 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 17, 13), dtype=np.float32)
    weight = rng.standard_normal((5, 8, 3, 3), dtype=np.float32)
    bias = rng.standard_normal(5, dtype=np.float32)
    first = winograd.winograd_conv2d_forward(x, weight, bias, 1, 1)
    for _ in range(5):
        np.testing.assert_array_equal(winograd.winograd_conv2d_forward(x, weight, bias, 1, 1), first)


def test_weight_gradients_do_not_depend_on_the_thread_count():
    """share_cores changes the thread count between calls on a busy machine; the weight gradients
    that sum per-share partials (im2col image by image, Winograd) must give the same bits anyway."""
    import numba

    from npanomaly.kernels import conv

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 8, 15, 13)).astype(np.float32)
    grad_3x3 = rng.standard_normal((6, 5, 15, 13)).astype(np.float32)
    grad_strided = rng.standard_normal((6, 5, 8, 7)).astype(np.float32)
    saved = numba.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            numba.set_num_threads(count)
            results.append((conv.conv2d_backward_weight(grad_strided, x, 3, 3, 2, 2, 1, 1),
                            winograd.winograd_conv2d_backward_weight(grad_3x3, x, 1, 1, 4),
                            winograd.winograd_conv2d_backward_weight(grad_3x3, x, 1, 1, 2)))
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
