"""The recycling allocator (kernels/memory.py): reuse without aliasing, within its limit."""

import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npanomaly import kernels as K
from npanomaly import nn
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


def _on_recycled_memory(array):
    """Whether array lies on one of memory.empty's mappings (its base chain ends in an mmap)."""
    import mmap

    while isinstance(array, np.ndarray):
        array = array.base
    if isinstance(array, memoryview):
        array = array.obj
    return isinstance(array, mmap.mmap)


def test_the_layer_kernels_return_recycled_arrays(pool):
    """Every large output of the layer kernels comes from the pool: allocated inside a kernel, it
    was fresh pages from malloc on every call once other code had made glibc trim its heap."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, mean, var = K.batchnorm2d_train_forward(x, ones, zeros, 1e-5)
    grads = K.batchnorm2d_backward(x, x, ones, mean, var, 1e-5, x, -np.inf, np.inf)
    unit, norm = K.l2_normalize_channels_forward(x, 1e-6)
    pooled, argmax = K.max_pool2d_forward(x, 2, 2, 2, 2, 0, 0)
    outputs = [y, grads[0], K.batchnorm2d_eval_forward(x, ones, zeros, zeros, ones, 1e-5), K.relu_forward(x),
               K.relu_backward_input(x, x), unit, norm, K.l2_normalize_channels_backward(x, unit, norm, 1e-6),
               pooled, argmax, K.max_pool2d_backward_input(pooled, argmax, 6, 5)]
    assert all(_on_recycled_memory(a) for a in outputs)


def test_max_pool_leaves_out_the_argmax_only_when_asked(pool):
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 6)).astype(np.float32)
    y, argmax = K.max_pool2d_forward(x, 3, 3, 2, 2, 1, 1)
    y_eval, none = K.max_pool2d_forward(x, 3, 3, 2, 2, 1, 1, with_argmax=False)
    assert none is None and argmax.shape == y.shape
    np.testing.assert_array_equal(y_eval, y)
    layer = nn.MaxPool2d(3, 2, 1)
    np.testing.assert_array_equal(layer.eval()(x), y)
    np.testing.assert_array_equal(layer.train()(x), y)
    assert layer.backward(np.ones_like(y)).shape == x.shape


def _page_faults():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.parametrize("call", [
    lambda x, w: K.conv2d_forward(x, w, None, 2, 2, 1, 1),  # by image: 1.4 MB of columns per thread
    lambda x, w: K.winograd_conv2d_forward(x, w, None, 1, 1, 4),  # 1.2 MB of blocks per thread
    lambda x, w: K.winograd_conv2d_backward(K.winograd_conv2d_forward(x, w, None, 1, 1, 4), x, w, 1, 1, 4),
    lambda x, w: K.batchnorm2d_train_forward(x, np.ones(64, np.float32), np.zeros(64, np.float32), 1e-5),
], ids=["im2col", "winograd", "winograd backward", "batch norm"])
def test_a_repeated_call_faults_in_no_pages_after_the_heap_is_trimmed(call):
    """glibc hands its heap top back (malloc_trim, as it does when other code frees enough: torch
    in the benchmarks); scratch and outputs allocated inside the kernels were then fresh pages on
    every call (~1,400 page faults per call of ResNet's stem, ~20,000 per STFPM step). On recycled
    memory a repeated call faults in next to nothing."""
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 56, 56)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32) / 24
    for _ in range(2):
        call(x, w)  # compiled, and the pool holds what the call frees
    faults = []
    for _ in range(3):
        malloc_trim(0)
        before = _page_faults()
        call(x, w)
        faults.append(_page_faults() - before)
    assert min(faults) < 64, faults  # a single fresh megabyte is 256 pages
