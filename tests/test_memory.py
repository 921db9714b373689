"""The recycling allocator (kernels/memory.py): reuse without aliasing, within its limit."""

import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npanomaly import kernels as K
from npanomaly.kernels import _config, memory

MIB = 1024 * 1024


@pytest.fixture
def pool(monkeypatch):
    """Recycling for arrays of any size, a 64 MiB limit, and an empty pool before and after."""
    monkeypatch.setattr(_config, "RECYCLE_MIN_BYTES", 0)
    monkeypatch.setattr(_config, "RECYCLE_LIMIT_BYTES", 64 * MIB)
    memory.release()
    yield memory
    memory.release()


@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8]))
def test_empty_and_zeros_are_like_numpy(shape, dtype):
    for make in (memory.empty, memory.zeros):
        array = make(shape, dtype)
        assert array.shape == tuple(shape) and array.dtype == dtype
        assert array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(memory.zeros(shape, dtype), np.zeros(shape, dtype))


def test_memory_is_reused_only_after_every_view_is_gone(pool):
    a = pool.empty((256, 256), np.float32)
    a.fill(1.0)
    view = a[10:].T  # a view of a view: its base is the flat array, not a
    del a
    assert pool.idle_bytes() == 0  # the view still holds the memory
    b = pool.empty((256, 256), np.float32)
    assert not np.shares_memory(b, view)
    b.fill(2.0)
    np.testing.assert_array_equal(view, 1.0)
    del view
    assert pool.idle_bytes() == 256 * 256 * 4
    c = pool.zeros((256, 256), np.float32)  # the returned mapping, dirty, zero-filled again
    assert pool.idle_bytes() == 0
    np.testing.assert_array_equal(c, 0.0)


def test_idle_memory_stays_within_the_limit_oldest_dropped_first(pool, monkeypatch):
    monkeypatch.setattr(_config, "RECYCLE_LIMIT_BYTES", 3 * MIB)
    arrays = [pool.empty((MIB // 4,), np.float32) for _ in range(5)]  # 1 MiB each
    del arrays
    assert pool.idle_bytes() == 3 * MIB
    assert pool.release() == 3 * MIB and pool.idle_bytes() == 0


def test_small_arrays_and_a_zero_limit_use_plain_numpy(monkeypatch):
    monkeypatch.setattr(_config, "RECYCLE_MIN_BYTES", MIB)  # the default (the test session lowers it)
    assert memory.empty((4, 4), np.float32).flags.owndata
    assert not memory.empty((MIB // 4,), np.float32).flags.owndata
    monkeypatch.setattr(_config, "RECYCLE_MIN_BYTES", 0)
    monkeypatch.setattr(_config, "RECYCLE_LIMIT_BYTES", 0)
    assert memory.empty((1024, 1024), np.float32).flags.owndata


def test_threads_never_share_an_array(pool):
    errors = []

    def work(value):
        for _ in range(50):
            array = pool.empty((64, 1024), np.float32)
            array.fill(value)
            np.sqrt(array[:1], out=array[1:2])  # some work between the fill and the check
            if not (array[2:] == value).all():
                errors.append(value)
            del array

    threads = [threading.Thread(target=work, args=(float(v),)) for v in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_to_its_own_copy(pool):
    array = pool.zeros((512, 512), np.float32)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave at once
        array.fill(7.0)
        os.write(write, b"1")
        os._exit(0)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read)
    os.close(write)
    np.testing.assert_array_equal(array, 0.0)


def test_a_kept_convolution_output_survives_later_calls(pool):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    x1, x2 = (rng.standard_normal((2, 3, 40, 40)).astype(np.float32) for _ in range(2))
    y1 = K.conv2d_forward(x1, weight, None, 2, 2, 1, 1)
    kept = y1.copy()
    for _ in range(3):  # outputs, columns and gradients of the same sizes come and go
        y2 = K.conv2d_forward(x2, weight, None, 2, 2, 1, 1)
        K.conv2d_backward_input(y2, weight, 40, 40, 2, 2, 1, 1)
        K.conv2d_backward_weight(y2, x2, 3, 3, 2, 2, 1, 1)
        del y2
    np.testing.assert_array_equal(y1, kept)
