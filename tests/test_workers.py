"""kernels/workers.py: the pool that runs Winograd's blocks, and single-threaded BLAS around it.

What is checked is behaviour a kernel relies on: every job runs exactly once, shares are
contiguous and cover the range, an error in any thread reaches the caller after all have ended,
OpenBLAS runs single-threaded inside the pool's work and gets its thread count back afterwards,
also when two Python threads run kernels at once, and a Winograd convolution gives the same bits
on every call although its blocks go to whichever thread is free.
"""

import threading

import numpy as np
import pytest

from npanomaly import threads
from npanomaly.kernels import winograd, workers


def blas_counts():
    return [get() for get, _ in filter(None, map(threads._blas_thread_functions, threads._openblas_libraries()))]


@pytest.fixture
def two_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(saved)


@pytest.mark.parametrize("total, block", [(1, 1), (7, 3), (64, 64), (65, 8), (1000, 7)])
def test_run_blocks_runs_every_job_once(two_threads, total, block):
    seen = np.zeros(total, np.int64)
    names = set()
    lock = threading.Lock()

    def worker(_):
        def run(first, stop):
            assert 0 <= first < stop <= total and stop - first <= block
            with lock:
                seen[first:stop] += 1
                names.add(threading.current_thread().name)
        return run

    workers.run_blocks(worker, total, block)
    assert (seen == 1).all()
    assert threading.current_thread().name in names or -(-total // block) > 1  # the caller works too


@pytest.mark.parametrize("total", [1, 2, 3, 10, 101])
def test_run_shares_are_contiguous_and_cover_the_range(two_threads, total):
    shares = {}
    workers.run_shares(lambda k, first, stop: shares.__setitem__(k, (int(first), int(stop))), total)
    assert sorted(shares) == list(range(min(2, total)))
    bounds = [shares[k] for k in sorted(shares)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_an_error_in_a_pool_thread_reaches_the_caller_after_all_ended(two_threads):
    ended = []

    def work(k, first, stop):
        if k == 1:
            raise RuntimeError("thread 1 failed")
        ended.append(k)

    with pytest.raises(RuntimeError, match="thread 1 failed"):
        workers.run_shares(work, 10)
    assert ended == [0]


def test_blas_is_single_threaded_inside_and_restored_after(two_threads):
    before = blas_counts()
    if not before:
        pytest.skip("NumPy's BLAS is not an OpenBLAS npanomaly can see")
    inside = []
    workers.run_shares(lambda k, first, stop: inside.append(blas_counts()), 4)
    assert inside and all(counts == [1] * len(before) for counts in inside)
    assert blas_counts() == before


def test_overlapping_single_threaded_blocks_restore_the_counts_once(two_threads):
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


def test_winograd_gives_the_same_bits_whichever_thread_runs_a_block(two_threads, monkeypatch):
    """Small blocks, so that the two threads share many of them in a different order each call."""
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
