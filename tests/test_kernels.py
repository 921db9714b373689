"""Kernels == the plain-NumPy reference on hypothesis-drawn consistent cases, in float32 and float64."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from npanomaly import kernels as K
from strategies import random_array, window_cases

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=window_cases(), out_channels=st.integers(1, 4), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d_forward_and_backward_match_reference(dtype, case, out_channels, with_bias, seed):
    shape, kernel, stride, pad = case
    x = random_array(seed, shape, dtype)
    weight = random_array(seed + 1, (out_channels, shape[1]) + kernel, dtype)
    bias = random_array(seed + 2, (out_channels,), dtype) if with_bias else None
    y = K.conv2d_forward(x, weight, bias, *stride, *pad)
    expected = ref.conv2d(x, weight, bias, stride, pad)
    assert y.dtype == dtype and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, **TOL[dtype])

    grad_out = random_array(seed + 3, y.shape, dtype)
    grad_x, grad_w, grad_b = ref.conv2d_grads(x, weight, grad_out, stride, pad)
    np.testing.assert_allclose(K.conv2d_backward_input(grad_out, weight, shape[2], shape[3], *stride, *pad),
                               grad_x, **TOL[dtype])
    np.testing.assert_allclose(K.conv2d_backward_weight(grad_out, x, *kernel, *stride, *pad), grad_w, **TOL[dtype])
    np.testing.assert_allclose(K.conv2d_backward_bias(grad_out), grad_b, **TOL[dtype])


def test_conv2d_chunking_does_not_change_results(monkeypatch):
    """Images split across several im2col chunks give the same numbers as one chunk."""
    import npanomaly.kernels.conv as conv

    x = random_array(0, (5, 3, 11, 9), np.float64)
    weight = random_array(1, (4, 3, 3, 2), np.float64)
    grad_out = random_array(2, (5, 4, 6, 9), np.float64)
    whole = (conv.conv2d_forward(x, weight, None, 2, 1, 1, 1),
             conv.conv2d_backward_input(grad_out, weight, 11, 9, 2, 1, 1, 1),
             conv.conv2d_backward_weight(grad_out, x, 3, 2, 2, 1, 1, 1))
    one_image = 3 * 3 * 2 * 6 * 9 * 8
    monkeypatch.setattr(conv, "IM2COL_BUDGET_BYTES", 2 * one_image)  # chunks of 2, 2 and 1 images
    assert conv._chunks(5, 18, 54, 8)[1] == [(0, 2), (2, 4), (4, 5)]
    chunked = (conv.conv2d_forward(x, weight, None, 2, 1, 1, 1),
               conv.conv2d_backward_input(grad_out, weight, 11, 9, 2, 1, 1, 1),
               conv.conv2d_backward_weight(grad_out, x, 3, 2, 2, 1, 1, 1))
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@given(case=window_cases(max_batch=5), out_channels=st.integers(1, 5), relu=st.booleans(), seed=st.integers(0, 2**16),
       min_columns=st.sampled_from([1, 8, 256]))
def test_conv2d_image_by_image_matches_the_batched_products(case, out_channels, relu, seed, min_columns):
    """float32 with an image for every thread runs conv2d_forward_images and conv2d_backward_images
    (gemm on each thread; bias and ReLU fused; the backward pass over groups of images side by
    side; per-share partial weight gradients); they must equal the batched path and the reference,
    with one image per gemm (min_columns 1) and groups of several (8, 256: the last group may be
    shorter)."""
    import numba

    import npanomaly.kernels.conv as conv

    shape, kernel, stride, pad = case
    x = random_array(seed, shape, np.float32)
    weight = random_array(seed + 1, (out_channels, shape[1]) + kernel, np.float32)
    bias = random_array(seed + 2, (out_channels,), np.float32)
    lower = 0.0 if relu else -np.inf

    def run():
        y = conv.conv2d_forward(x, weight, bias, *stride, *pad, lower)
        grad_out = random_array(seed + 3, y.shape, np.float32)
        return (y, conv.conv2d_backward_weight(grad_out, x, *kernel, *stride, *pad),
                conv.conv2d_backward_input(grad_out, weight, *shape[2:], *stride, *pad))

    calls = []
    real = conv.conv2d_forward_images, conv.conv2d_backward_images
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv, "CONV_MIN_PRODUCT_COLUMNS", min_columns)
        patch.setattr(conv, "conv2d_forward_images", lambda *a: calls.append(1) or real[0](*a))
        patch.setattr(conv, "conv2d_backward_images", lambda *a: calls.append(2) or real[1](*a))
        by_image = run()
        # the weight gradient always (its partial sums never depend on the thread count), the
        # others where every thread gets an image
        assert calls == ([1, 2, 2] if shape[0] >= numba.get_num_threads() else [2])
        patch.setattr(conv, "_by_image", lambda *a: False)
        batched = run()
    y64 = np.maximum(ref.conv2d(x, weight, bias, stride, pad), lower)
    grad_x, grad_w, _ = ref.conv2d_grads(x, weight, random_array(seed + 3, y64.shape, np.float32), stride, pad)
    for got, same, expected in zip(by_image, batched, (y64, grad_w, grad_x)):
        np.testing.assert_allclose(got, same, **TOL[np.float32])
        np.testing.assert_allclose(got, expected, **TOL[np.float32])


@pytest.mark.parametrize("size", [3, 7, 12])
def test_convolution_gradients_do_not_depend_on_the_thread_count(size):
    """The image groups and weight-gradient shares of the per-image kernels, and Winograd's
    per-point sums, are fixed by the shapes: one thread and all of them give the same bits."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    x = random_array(0, (5, 6, size, size), np.float32)
    weight = random_array(1, (4, 6, 3, 3), np.float32)
    grad_out = random_array(2, (5, 4, size, size), np.float32)

    def gradients():
        return (K.conv2d_backward_weight(grad_out, x, 3, 3, 1, 1, 1, 1),
                K.conv2d_backward_input(grad_out, weight, size, size, 1, 1, 1, 1),
                K.conv2d_backward_weight(grad_out, x, 1, 1, 1, 1, 0, 0),
                K.winograd_conv2d_backward_weight(grad_out, x, 1, 1, 2))

    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        alone = gradients()
    finally:
        numba.set_num_threads(threads)
    for one, many in zip(alone, gradients()):
        np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
       .filter(lambda s: s[0] * s[2] * s[3] > 1),
       seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 1e3]))
def test_batchnorm_matches_reference(dtype, shape, seed, offset):
    x = random_array(seed, shape, dtype) + dtype(offset)  # a large mean must not spoil the variance
    weight = random_array(seed + 1, shape[1:2], dtype)
    bias = random_array(seed + 2, shape[1:2], dtype)
    eps = 1e-5
    y, mean, var = K.batchnorm2d_train_forward(x, weight, bias, eps)
    y_ref, mean_ref, var_ref = ref.batchnorm_train(x, weight, bias, eps)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(mean, mean_ref, **TOL[dtype])
    np.testing.assert_allclose(var, var_ref, rtol=tol["rtol"], atol=1e-10)
    np.testing.assert_allclose(y, y_ref, **tol)

    running_mean = random_array(seed + 3, shape[1:2], dtype)
    running_var = random_array(seed + 4, shape[1:2], dtype, 0.5, 2.0)
    np.testing.assert_allclose(K.batchnorm2d_eval_forward(x, weight, bias, running_mean, running_var, eps),
                               ref.batchnorm_eval(x.astype(np.float64), weight, bias, running_mean, running_var, eps),
                               **tol)

    grad_out = random_array(seed + 5, shape, dtype)
    grad_x, grad_w, grad_b = K.batchnorm2d_backward(grad_out, x, weight, mean, var, eps, grad_out, -np.inf, np.inf)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.batchnorm_grads(x, weight, grad_out, eps)
    np.testing.assert_allclose(grad_x, grad_x_ref, **tol)
    np.testing.assert_allclose(grad_w, grad_w_ref, **tol)
    np.testing.assert_allclose(grad_b, grad_b_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 7), st.integers(2, 7)),
       seed=st.integers(0, 2**16), upper=st.sampled_from([np.inf, 6.0, 0.25]), with_bias=st.booleans())
def test_fused_relu_is_bit_identical_to_a_separate_relu(dtype, shape, seed, upper, with_bias):
    """Every kernel that can end in a ReLU (lower=0, upper) gives exactly relu_forward of its plain
    output, and the fused batch-norm backward exactly the batch-norm backward of relu_backward_input."""
    x = random_array(seed, shape, dtype)
    channels = shape[1]
    weight = random_array(seed + 1, (3, channels, 3, 3), dtype)
    bias = random_array(seed + 2, (3,), dtype) if with_bias else None
    np.testing.assert_array_equal(K.conv2d_forward(x, weight, bias, 2, 1, 1, 0, 0.0, upper),
                                  K.relu_forward(K.conv2d_forward(x, weight, bias, 2, 1, 1, 0), upper))
    depthwise = random_array(seed + 3, (channels, 1, 3, 3), dtype)
    shift = random_array(seed + 4, (channels,), dtype)
    out_h, out_w = K.conv2d_output_size(shape[2], 3, 2, 1), K.conv2d_output_size(shape[3], 3, 1, 1)
    np.testing.assert_array_equal(
        K.depthwise_conv2d_forward(x, depthwise, shift, 2, 1, 1, 1, out_h, out_w, 0.0, upper),
        K.relu_forward(K.depthwise_conv2d_forward(x, depthwise, shift, 2, 1, 1, 1, out_h, out_w), upper))

    gamma, beta = random_array(seed + 5, (channels,), dtype), random_array(seed + 6, (channels,), dtype)
    running_var = random_array(seed + 7, (channels,), dtype, 0.5, 2.0)
    np.testing.assert_array_equal(K.batchnorm2d_eval_forward(x, gamma, beta, shift, running_var, 1e-5, 0.0, upper),
                                  K.relu_forward(K.batchnorm2d_eval_forward(x, gamma, beta, shift, running_var, 1e-5),
                                                 upper))
    if shape[0] * shape[2] * shape[3] < 2:
        return
    fused, mean, var = K.batchnorm2d_train_forward(x, gamma, beta, 1e-5, 0.0, upper)
    plain, mean_plain, var_plain = K.batchnorm2d_train_forward(x, gamma, beta, 1e-5)
    np.testing.assert_array_equal(fused, K.relu_forward(plain, upper))
    np.testing.assert_array_equal(mean, mean_plain)
    np.testing.assert_array_equal(var, var_plain)
    grad_out = random_array(seed + 8, shape, dtype)
    masked = K.relu_backward_input(grad_out, fused, upper)
    separate = K.batchnorm2d_backward(masked, x, gamma, mean, var, 1e-5, masked, -np.inf, np.inf)
    for got, want in zip(K.batchnorm2d_backward(grad_out, x, gamma, mean, var, 1e-5, fused, 0.0, upper), separate):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
       seed=st.integers(0, 2**16))
def test_relu_matches_reference(dtype, shape, seed):
    x = random_array(seed, shape, dtype)
    x.flat[0] = 0.0  # the kink itself: gradient 0, as torch
    grad_out = random_array(seed + 1, shape, dtype)
    np.testing.assert_array_equal(K.relu_forward(x), ref.relu(x))
    np.testing.assert_array_equal(K.relu_backward_input(grad_out, x), ref.relu_grad(x, grad_out))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=window_cases(pool=True), seed=st.integers(0, 2**16), ties=st.booleans())
def test_max_pool_matches_reference(dtype, case, seed, ties):
    shape, kernel, stride, pad = case
    x = random_array(seed, shape, dtype)
    if ties:  # few distinct values: the first maximum in window order must win, as in torch
        x = np.round(x * 2).astype(dtype)
    y, argmax = K.max_pool2d_forward(x, *kernel, *stride, *pad)
    y_ref, argmax_ref = ref.max_pool2d(x, kernel, stride, pad)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    grad_out = random_array(seed + 1, y.shape, dtype)
    np.testing.assert_allclose(K.max_pool2d_backward_input(grad_out, argmax, shape[2], shape[3]),
                               ref.max_pool2d_grad(shape, argmax_ref, grad_out), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=window_cases(pool=True), seed=st.integers(0, 2**16), count_include_pad=st.booleans())
def test_avg_pool_matches_reference_and_its_adjoint(dtype, case, seed, count_include_pad):
    shape, kernel, stride, pad = case
    x = random_array(seed, shape, dtype)
    y = K.avg_pool2d_forward(x, *kernel, *stride, *pad, count_include_pad)
    np.testing.assert_allclose(y, ref.avg_pool2d(x, kernel, stride, pad, count_include_pad), **TOL[dtype])
    # Average pooling is linear, so its backward is its adjoint: <A x, g> == <x, A^T g>.
    grad_out = random_array(seed + 1, y.shape, dtype)
    grad_x = K.avg_pool2d_backward_input(grad_out, shape[2], shape[3], *kernel, *stride, *pad, count_include_pad)
    lhs = np.sum(y.astype(np.float64) * grad_out)
    rhs = np.sum(x.astype(np.float64) * grad_x)
    assert abs(lhs - rhs) <= (1e-4 if dtype == np.float32 else 1e-10) * max(1.0, abs(lhs))


def test_pooling_takes_strided_views_as_their_copies():
    """The pooling functions run every layout through one kernel (pool2d_planes, C-contiguous
    arrays): a transposed view and a channel slice give the results of their contiguous copies."""
    x = random_array(3, (2, 5, 9, 7), np.float32).transpose(0, 1, 3, 2)[:, ::2]
    dense = np.ascontiguousarray(x)
    for pool in (lambda a: K.max_pool2d_forward(a, 3, 2, 2, 1, 1, 0),
                 lambda a: K.avg_pool2d_forward(a, 3, 3, 2, 2, 1, 1, False)):
        for got, expected in zip(np.atleast_1d(pool(x)), np.atleast_1d(pool(dense))):
            np.testing.assert_array_equal(got, expected)
    y, argmax = K.max_pool2d_forward(dense, 2, 2, 2, 2, 0, 0)  # [2, 3, 3, 4]
    grad_out = random_array(4, (4, 3, 2, 3), np.float32).transpose(1, 0, 3, 2)[:2]  # [2, 4, 3, 2], a view
    grad_out, argmax = grad_out[:, :3], argmax[..., :2]  # both [2, 3, 3, 2], strided
    np.testing.assert_array_equal(K.max_pool2d_backward_input(grad_out, argmax, 7, 9),
                                  K.max_pool2d_backward_input(np.ascontiguousarray(grad_out),
                                                              np.ascontiguousarray(argmax), 7, 9))
    with pytest.raises(ValueError, match="argmax"):
        K.max_pool2d_backward_input(grad_out, argmax[:, :2], 7, 9)


def test_patchcore_neighbourhood_average_counts_padding():
    """3x3/stride 1/pad 1 with count_include_pad: a corner of a constant map is 4/9 of the constant."""
    x = np.ones((1, 1, 4, 5))
    y = K.avg_pool2d_forward(x, 3, 3, 1, 1, 1, 1, True)
    assert y.shape == x.shape
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9) and y[0, 0, 0, 2] == pytest.approx(6 / 9)
    assert y[0, 0, 1, 1] == pytest.approx(1.0)
    assert K.avg_pool2d_forward(x, 3, 3, 1, 1, 1, 1, False)[0, 0, 0, 0] == pytest.approx(1.0)


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), scale=st.floats(-3, 3),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]))
def test_squared_difference_loss_matches_numpy(shape, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    p, t = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    total, grad = K.squared_difference_loss(p, t, dtype(scale))
    diff = (p - t).astype(np.float64)  # the difference in the input's precision, as the seed's loss
    assert total == pytest.approx(float(np.sum(diff * diff)), rel=1e-12)
    assert grad.dtype == dtype and grad.shape == p.shape
    np.testing.assert_allclose(grad, scale * diff, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-30)


def test_squared_difference_loss_has_the_same_bits_on_any_thread_count():
    """threads.share_cores() narrows the threads when other processes keep a core busy; a seeded fit
    must report the same loss either way (a prange reduction's per-thread partial sums did not)."""
    import numba
    rng = np.random.default_rng(3)
    p, t = (rng.standard_normal((8, 64, 33, 31)).astype(np.float32) for _ in range(2))
    before = numba.get_num_threads()
    totals = []
    try:
        for threads in sorted({1, 2, before}):
            numba.set_num_threads(threads)
            totals.append(K.squared_difference_loss(p, t, np.float32(1.0))[0])
    finally:
        numba.set_num_threads(before)
    assert len(set(totals)) == 1, totals


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 6), st.integers(1, 6)),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]))
def test_channel_mean_squared_difference_matches_numpy(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    got = K.channel_mean_squared_difference(a, b)
    diff = (a - b).astype(np.float64)  # the difference in the input's precision, as the loss
    assert got.dtype == np.float64 and got.shape == (shape[0],) + shape[2:]
    np.testing.assert_allclose(got, np.mean(diff * diff, axis=1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite(dtype):
    x = np.zeros((2, 3, 4, 5), dtype)
    assert K.all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 2, 3, 4] = bad
        assert not K.all_finite(y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_below(dtype):
    x = np.random.default_rng(0).uniform(-3, 3, (4, 5, 6)).astype(dtype)
    largest = float(np.abs(x).max())
    assert K.all_below(x, largest * 1.001) and not K.all_below(x, largest)  # strictly below
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3, 4, 5] = bad
        assert not K.all_below(y, 1e30) and not K.all_below(y, np.inf)


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
       seed=st.integers(0, 2**16))
def test_l2_normalize_channels_matches_reference_and_finite_differences(shape, seed):
    x = random_array(seed, shape)
    x[0, :, 0, 0] = 0.0  # a zero vector takes the eps branch, as in torch.nn.functional.normalize
    y, norm = K.l2_normalize_channels_forward(x, 1e-12)
    np.testing.assert_allclose(y, ref.l2_normalize_channels(x), rtol=1e-12, atol=1e-15)
    upstream = random_array(seed + 1, shape)
    grad = K.l2_normalize_channels_backward(upstream, y, norm, 1e-12)
    np.testing.assert_allclose(grad[0, :, 0, 0], upstream[0, :, 0, 0] / 1e-12)  # y = x / eps there, as torch
    x[0, :, 0, 0] = 0.5  # finite differences only away from the kink at 0
    y, norm = K.l2_normalize_channels_forward(x, 1e-12)
    grad = K.l2_normalize_channels_backward(upstream, y, norm, 1e-12)
    eps = 1e-6
    numeric = np.zeros_like(x)
    for i in range(x.size):
        plus, minus = x.copy(), x.copy()
        plus.flat[i] += eps
        minus.flat[i] -= eps
        numeric.flat[i] = np.sum(upstream * (ref.l2_normalize_channels(plus) - ref.l2_normalize_channels(minus))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
