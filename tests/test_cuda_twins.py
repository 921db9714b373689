"""The numba.cuda twins equal their CPU kernels, run in Numba's CUDA simulator.

Runs only with NUMBA_ENABLE_CUDASIM=1 set before Numba is imported: `.ci/run` does a separate
`NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_twins.py`. The simulator executes every
thread in Python (~1e5 inner steps per second), so the shapes are tiny; the thread counts are
patched down so that even these span several blocks.
"""

import inspect
import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                                reason="needs NUMBA_ENABLE_CUDASIM=1 before numba is imported (see .ci/run)")

from npanomaly import kernels as cpu  # noqa: E402
from npanomaly.kernels import _config  # noqa: E402
from strategies import random_array  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(_config, "CUDA_TILE", 4)


@pytest.fixture(scope="module")
def gpu():
    return cpu.for_device("cuda")


def test_tables_have_the_same_names_and_signatures(gpu):
    for name in cpu.__all__:
        if name == "for_device":
            continue
        if name in cpu.CPU_ONLY:  # Conv2d falls back to im2col where these are missing
            assert not hasattr(gpu, name), name
            continue
        assert hasattr(gpu, name), name
        ours, theirs = getattr(cpu, name), getattr(gpu, name)
        ours = getattr(ours, "py_func", ours)
        theirs = getattr(theirs, "py_func", theirs)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name
    assert set(gpu.TWINS) <= set(cpu.__all__)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride,pad,bias", [(1, 1, True), (2, 0, False), (2, 1, True)])
def test_convolution_twins(gpu, dtype, stride, pad, bias):
    x = random_array(0, (2, 2, 5, 4), dtype)
    w = random_array(1, (3, 2, 3, 2), dtype)
    b = random_array(2, (3,), dtype) if bias else None
    y = cpu.conv2d_forward(x, w, b, stride, stride, pad, pad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gpu.conv2d_forward(x, w, b, stride, stride, pad, pad), y, **tol)
    np.testing.assert_allclose(gpu.conv2d_forward(x, w, b, stride, stride, pad, pad, 0.0, 0.5),
                               cpu.conv2d_forward(x, w, b, stride, stride, pad, pad, 0.0, 0.5), **tol)
    shortcut = random_array(7, y.shape, dtype)  # a residual block's sum, before the ReLU
    np.testing.assert_allclose(gpu.conv2d_forward(x, w, b, stride, stride, pad, pad, 0.0, np.inf, residual=shortcut),
                               cpu.conv2d_forward(x, w, b, stride, stride, pad, pad, 0.0, np.inf, residual=shortcut),
                               **tol)
    with pytest.raises(ValueError, match="residual must be"):
        gpu.conv2d_forward(x, w, b, stride, stride, pad, pad, residual=shortcut[:1])
    g = random_array(3, y.shape, dtype)
    np.testing.assert_allclose(gpu.conv2d_backward_input(g, w, 5, 4, stride, stride, pad, pad),
                               cpu.conv2d_backward_input(g, w, 5, 4, stride, stride, pad, pad), **tol)
    np.testing.assert_allclose(gpu.conv2d_backward_weight(g, x, 3, 2, stride, stride, pad, pad),
                               cpu.conv2d_backward_weight(g, x, 3, 2, stride, stride, pad, pad), **tol)
    np.testing.assert_allclose(gpu.conv2d_backward_bias(g), cpu.conv2d_backward_bias(g), **tol)


def test_batchnorm_and_relu_twins(gpu):
    x = random_array(4, (2, 3, 3, 4)) + 5.0
    w, b = random_array(5, (3,)), random_array(6, (3,))
    for got, want in zip(gpu.batchnorm2d_train_forward(x, w, b, 1e-5), cpu.batchnorm2d_train_forward(x, w, b, 1e-5)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    _, mean, var = cpu.batchnorm2d_train_forward(x, w, b, 1e-5)
    g = random_array(7, x.shape)
    for activated, lower, upper in ((g, -np.inf, np.inf), (x - 5.5, 0.0, np.inf), (x - 5.5, 0.0, 0.3)):
        for got, want in zip(gpu.batchnorm2d_backward(g, x, w, mean, var, 1e-5, activated, lower, upper),
                             cpu.batchnorm2d_backward(g, x, w, mean, var, 1e-5, activated, lower, upper)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(gpu.batchnorm2d_train_forward(x, w, b, 1e-5, 0.0, 0.5),
                         cpu.batchnorm2d_train_forward(x, w, b, 1e-5, 0.0, 0.5)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    rm, rv = random_array(8, (3,)), random_array(9, (3,), low=0.5, high=2.0)
    for lower, upper in ((-np.inf, np.inf), (0.0, np.inf), (0.0, 0.5)):
        np.testing.assert_allclose(gpu.batchnorm2d_eval_forward(x, w, b, rm, rv, 1e-5, lower, upper),
                                   cpu.batchnorm2d_eval_forward(x, w, b, rm, rv, 1e-5, lower, upper),
                                   rtol=1e-12, atol=1e-12)
    for upper in (np.inf, 6.0):
        z = x * 2 - 9
        np.testing.assert_array_equal(gpu.relu_forward(z, upper), cpu.relu_forward(z, upper))
        np.testing.assert_array_equal(gpu.relu_backward_input(g, z, upper), cpu.relu_backward_input(g, z, upper))


def test_search_twins(gpu):
    q, b = random_array(10, (7, 9), np.float32), random_array(11, (6, 9), np.float32)
    out_gpu, out_cpu = np.empty((7, 6), np.float32), np.empty((7, 6), np.float32)
    np.testing.assert_allclose(gpu.block_dots(q, b, out_gpu), cpu.block_dots(q, b, out_cpu), rtol=1e-5, atol=1e-6)
    features = random_array(12, (20, 3))
    selected = np.array([0, 7, 3, 0, 0], dtype=np.int64)
    states = []
    for table in (cpu, gpu):
        min_dist, nearest = np.full(20, np.inf), np.zeros(20, np.int64)
        for count in (1, 2, 3):
            table.update_min_distances(features, selected, count, min_dist, nearest)
        states.append((min_dist, nearest))
    np.testing.assert_allclose(states[0][0], states[1][0], rtol=1e-12)
    np.testing.assert_array_equal(states[0][1], states[1][1])


def test_models_pick_the_cuda_table_and_agree_with_cpu():
    from npanomaly import PatchCore
    from npanomaly.search import greedy_coreset, knn

    q, b = random_array(13, (9, 5), np.float32), random_array(14, (12, 5), np.float32)
    for got, want in zip(knn(q, b, k=2, device="cuda"), knn(q, b, k=2)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(greedy_coreset(b, 5, projection_dim=None, device="cuda"),
                                  greedy_coreset(b, 5, projection_dim=None))
    images = random_array(15, (2, 3, 8, 8), np.float32, 0.0, 1.0)
    on_cpu = PatchCore(feature_dim=4, layers=("block2",), patch_size=1).fit(images, coreset_ratio=0.5)
    on_gpu = PatchCore(feature_dim=4, layers=("block2",), patch_size=1, device="cuda").fit(images, coreset_ratio=0.5)
    assert on_gpu.backbone.layers[0].kernels is cpu.for_device("cuda")
    np.testing.assert_allclose(on_gpu.memory_bank, on_cpu.memory_bank, rtol=1e-5, atol=1e-6)


def test_conv2d_on_cuda_runs_its_3x3_convolutions_by_im2col(gpu):
    from npanomaly import nn

    x = random_array(3, (2, 16, 16, 16), np.float32)
    conv = nn.Conv2d(16, 16, 3, padding=1, seed=0).eval()
    expected = nn.set_conv_algorithm(conv, "im2col")(x)
    nn.set_conv_algorithm(conv, "auto").to_device("cuda")
    assert conv._winograd_tile(x, (1, 1)) is None
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)
