"""Winograd's 3x3 convolution (kernels/winograd.py) against the plain-NumPy reference, torch, and
finite differences; and Conv2d's choice between it and im2col."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from test_gradcheck import check_gradients
from npanomaly import kernels, nn
from npanomaly.kernels import winograd

# The float32 error of each tile size, measured against a float64 convolution on the
# wide_resnet50_2 3x3 shapes (128 channels at 56 x 56, 256 at 28, 512 at 14; post-ReLU inputs,
# Kaiming weights): the largest |error| / max |y| was 1.1e-5 for F(4x4), 6.5e-7 for F(2x2) and
# 4.6e-7 for im2col (docs/speed.md). The tolerances are about four times those.
FLOAT32_TOLERANCE = {4: 4e-5, 2: 3e-6}


def test_the_transforms_are_lavin_and_grays_and_compute_a_correlation():
    a_t, g, b_t = winograd.transform_matrices(4)
    # F(4, 3) as printed by Lavin & Gray (2016), up to the sign of a row (moved between G and B^T)
    lavin_b_t = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
    np.testing.assert_array_equal(np.abs(b_t), np.abs(lavin_b_t))
    rng = np.random.default_rng(0)
    for m in (2, 4):
        a_t, g, b_t = winograd.transform_matrices(m)
        for _ in range(5):
            taps, d = rng.standard_normal(3), rng.standard_normal(m + 2)
            direct = np.array([np.dot(taps, d[i:i + 3]) for i in range(m)])
            np.testing.assert_allclose(a_t @ ((g @ taps) * (b_t @ d)), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4])
def test_filter_transforms_are_g_w_g_transposed_of_each_filter(m):
    """U[a * alpha + b, o, c] = (G w[o, c] G^T)[a, b]; rotated, of w[o, c] turned by 180 degrees,
    indexed [xi, c, o] (the input gradient's filters, [outputs, inputs] of its convolution),
    computed here by einsum over the definition."""
    rng = np.random.default_rng(m)
    weight = rng.standard_normal((5, 3, 3, 3))  # O != C, so a swapped index cannot pass
    _, g, _ = winograd.transform_matrices(m)
    alpha = m + 2
    expected = np.einsum("ai,ocij,bj->aboc", g, weight, g).reshape(alpha * alpha, 5, 3)
    np.testing.assert_allclose(winograd.winograd_filters(weight, m), expected, rtol=1e-13, atol=1e-13)
    rotated = np.einsum("ai,ocij,bj->abco", g, weight[:, :, ::-1, ::-1], g).reshape(alpha * alpha, 3, 5)
    np.testing.assert_allclose(winograd.winograd_filters(weight, m, rotated=True), rotated, rtol=1e-13, atol=1e-13)


def test_filter_reversal_is_a_signed_permutation_of_g_for_f2_only():
    """Reversing the taps maps F(2, 3)'s G onto its own rows up to sign (points 0, 1, -1, infinity,
    closed under p -> 1/p), not F(4, 3)'s (2 -> 1/2): checked on G itself, and the 2-D consequence,
    G J w J G^T = S U S^T, on random filters."""
    perm, signs = winograd.filter_reversal(2)
    _, g, _ = winograd.transform_matrices(2)
    assert sorted(perm) == list(range(4))
    np.testing.assert_array_equal(g[:, ::-1], signs[:, None] * g[perm])
    s = signs[:, None] * np.eye(4)[perm]
    w = np.random.default_rng(0).standard_normal((3, 3))
    np.testing.assert_allclose(g @ w[::-1, ::-1] @ g.T, s @ (g @ w @ g.T) @ s.T, rtol=1e-14, atol=1e-14)
    assert winograd.filter_reversal(4) is None
    assert winograd._reversed_matrices(4, np.float32) is None


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 5), out_channels=st.integers(1, 5),
       height=st.integers(1, 11), width=st.integers(1, 11), pad=st.integers(0, 2), m=st.sampled_from([2, 4]),
       bias=st.booleans(), relu=st.booleans(), shares=st.sampled_from([None, (1, 2), (1, 3), (2, 2), (3, 1)]))
def test_forward_matches_the_reference_in_float64(batch, channels, out_channels, height, width, pad, m, bias, relu,
                                                  shares):
    """shares: (tile shares, channel shares) forced on forward_blocks, more of each than there may
    be tiles or channels (None: its own rule for this machine's threads)."""
    if height + 2 * pad < 3 or width + 2 * pad < 3:
        return
    rng = np.random.default_rng(batch * 1000 + channels * 100 + height * 10 + width)
    x = rng.standard_normal((batch, channels, height, width))
    weight = rng.standard_normal((out_channels, channels, 3, 3))
    b = rng.standard_normal(out_channels) if bias else None
    expected = reference.conv2d(x, weight, b, (1, 1), (pad, pad))
    if relu:
        expected = np.maximum(expected, 0.0)
    rule = winograd._forward_shares
    try:
        if shares is not None:
            winograd._forward_shares = lambda jobs, out_channels, workers: shares
        got = winograd.winograd_conv2d_forward(x, weight, b, pad, pad, m, 0.0 if relu else -np.inf)
    finally:
        winograd._forward_shares = rule
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expected).max()))


def test_blocks_running_on_two_threads_at_once_match_im2col_in_float32():
    """forward_blocks' threads call gemm at the same time. With OpenBLAS's AVX-512 kernels, gemm's
    TT case (U^T V^T for M [O, rows]) gave wrong float32 results in about one call in five when
    two threads ran it at once (never on one thread, nor with OpenBLAS's Haswell kernels), so
    the products run as U V^T (filters [O, C]) or V U (the forward pass's filters reused by the
    input gradient). Small layers, repeated, where OpenBLAS takes its small-matrix paths: the
    forward pass (plain, with a residual, channels-last) and the input gradient from the forward
    pass's filters, each against im2col."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    rng = np.random.default_rng(7)
    try:
        for trial in range(24):
            channels, out_channels, size, batch = [(16, 16, 12, 3), (16, 8, 12, 3), (32, 24, 20, 2),
                                                   (64, 48, 14, 4)][trial % 4]
            m = (2, 4)[trial // 4 % 2]
            x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
            weight = rng.standard_normal((out_channels, channels, 3, 3)).astype(np.float32)
            bias = rng.standard_normal(out_channels).astype(np.float32)
            grad_out = rng.standard_normal((batch, out_channels, size, size)).astype(np.float32)
            expected = kernels.conv2d_forward(x, weight, bias, 1, 1, 1, 1)
            tolerance = 1e-4 * np.abs(expected).max()
            for got in (winograd.winograd_conv2d_forward(x, weight, bias, 1, 1, m),
                        winograd.winograd_conv2d_forward(x, weight, bias, 1, 1, m, residual=expected) - expected,
                        winograd.winograd_conv2d_forward(x, weight, bias, 1, 1, m, channels_last=True)):
                np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
            expected_grad = kernels.conv2d_backward_input(grad_out, weight, size, size, 1, 1, 1, 1)
            got_grad = winograd.winograd_conv2d_backward_input(grad_out, weight, 1, 1, m,
                                                               forward_filters=winograd.winograd_filters(weight, m))
            np.testing.assert_allclose(got_grad, expected_grad, rtol=0, atol=1e-4 * np.abs(expected_grad).max())
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape,pad", [((2, 16, 13, 9), 1), ((1, 1, 5, 5), 0), ((3, 8, 2, 7), 2), ((2, 32, 30, 30), 1)])
def test_float32_error_stays_within_the_measured_bound(m, shape, pad):
    rng = np.random.default_rng(sum(shape) + m)
    x = np.maximum(rng.standard_normal(shape), 0.0)
    weight = rng.standard_normal((12, shape[1], 3, 3)) * np.sqrt(2 / (9 * shape[1]))
    expected = reference.conv2d(x, weight, None, (1, 1), (pad, pad))
    got = winograd.winograd_conv2d_forward(x.astype(np.float32), weight.astype(np.float32), None, pad, pad, m)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= FLOAT32_TOLERANCE[m] * np.abs(expected).max()


def test_forward_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.random((2, 24, 17, 22), dtype=np.float32)
    weight = (rng.standard_normal((20, 24, 3, 3)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(20).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias),
                                              padding=1).numpy()
    for m in (2, 4):
        got = winograd.winograd_conv2d_forward(x, weight, bias, 1, 1, m)
        assert np.abs(got - expected).max() <= FLOAT32_TOLERANCE[m] * np.abs(expected).max() * 2  # two float32 sides


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 4), out_channels=st.integers(1, 4),
       height=st.integers(1, 9), width=st.integers(1, 9), pad=st.integers(0, 2), m=st.sampled_from([2, 4]))
def test_gradients_match_the_reference(batch, channels, out_channels, height, width, pad, m):
    if height + 2 * pad < 3 or width + 2 * pad < 3:
        return
    rng = np.random.default_rng(height * 31 + width + pad)
    x = rng.standard_normal((batch, channels, height, width))
    weight = rng.standard_normal((out_channels, channels, 3, 3))
    grad_out = rng.standard_normal((batch, out_channels, height + 2 * pad - 2, width + 2 * pad - 2))
    grad_x, grad_w, _ = reference.conv2d_grads(x, weight, grad_out, (1, 1), (pad, pad))
    reused = winograd.winograd_conv2d_backward_input(grad_out, weight, pad, pad, m,
                                                     forward_filters=winograd.winograd_filters(weight, m))
    for got, expected in ((winograd.winograd_conv2d_backward_input(grad_out, weight, pad, pad, m), grad_x),
                          (reused, grad_x),
                          (winograd.winograd_conv2d_backward_weight(grad_out, x, pad, pad, m), grad_w)):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("m", [2, 4])
def test_the_combined_backward_gives_the_separate_gradients_bit_for_bit(m):
    """winograd_conv2d_backward shares dL/dy's channels-last copy between the two gradients; the
    sums must be exactly those of the two separate functions, and no input gradient unless asked."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((3, 5, 9, 7)).astype(np.float32)
    weight = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    grad_out = rng.standard_normal((3, 6, 9, 7)).astype(np.float32)
    grad_w, grad_x = winograd.winograd_conv2d_backward(grad_out, x, weight, 1, 1, m)
    np.testing.assert_array_equal(grad_w, winograd.winograd_conv2d_backward_weight(grad_out, x, 1, 1, m))
    np.testing.assert_array_equal(grad_x, winograd.winograd_conv2d_backward_input(grad_out, weight, 1, 1, m))
    only_w, none = winograd.winograd_conv2d_backward(grad_out, x, weight, 1, 1, m, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(only_w, grad_w)


def test_weight_gradient_float32_error_stays_within_the_measured_bound():
    """Measured against float64 on 8 images of 64-512 channels (benchmark shapes): F(4x4) up to
    1.6e-5 of the largest entry, im2col 4.6e-7; the tolerance is four times F(4x4)'s."""
    rng = np.random.default_rng(9)
    x = np.maximum(rng.standard_normal((2, 24, 20, 20)), 0.0)
    grad_out = rng.standard_normal((2, 16, 20, 20))
    expected = reference.conv2d_grads(x, np.zeros((16, 24, 3, 3)), grad_out, (1, 1), (1, 1))[1]
    got = winograd.winograd_conv2d_backward_weight(grad_out.astype(np.float32), x.astype(np.float32), 1, 1)
    assert np.abs(got - expected).max() <= 6.4e-5 * np.abs(expected).max()


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_winograd_conv2d_gradients_by_finite_differences(padding):
    conv = nn.Conv2d(3, 4, 3, padding=padding, seed=1, algorithm="winograd")
    check_gradients(conv, np.random.default_rng(2).standard_normal((2, 3, 6, 5)))


def test_conv2d_auto_chooses_winograd_for_wide_calls_only(monkeypatch):
    calls = []
    original = kernels.winograd_conv2d_forward

    def spy(*args, **kwargs):
        calls.append((args[0].shape, args[5]))  # (input shape, tile size m)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "winograd_conv2d_forward", spy)
    wide = nn.Conv2d(32, 32, 3, padding=1, seed=0)  # training: the filters are transformed every call
    wide(np.zeros((4, 32, 32, 32), np.float32))  # 32 x 32 outputs: 8 x 8 tiles of 4 x 4 per image
    wide(np.zeros((4, 32, 28, 30), np.float32))  # both sides >= 28: still 4 x 4 tiles
    wide(np.zeros((4, 32, 27, 40), np.float32))  # one side < 28: 2 x 2 tiles
    wide(np.zeros((16, 32, 7, 7), np.float32))   # 16 tiles of 2 x 2 per image
    wide(np.zeros((16, 32, 6, 6), np.float32))   # 9 tiles per image, however many images: im2col
    wide.eval()  # evaluation: the filters are transformed once, 4 x 4 tiles at every size
    wide(np.zeros((4, 32, 27, 40), np.float32))
    wide(np.zeros((16, 32, 7, 7), np.float32))   # still counted in 2 x 2 tiles: 16 per image
    wide(np.zeros((16, 32, 6, 6), np.float32))   # 9: im2col
    nn.Conv2d(3, 32, 3, padding=1, seed=0)(np.zeros((4, 3, 32, 32), np.float32))  # 3 input channels: im2col
    nn.Conv2d(32, 32, 3, stride=2, padding=1, seed=0)(np.zeros((4, 32, 32, 32), np.float32))  # stride 2
    nn.Conv2d(32, 32, 3, padding=1, seed=0).to(np.float64)(np.zeros((1, 32, 32, 32)))  # float64: im2col
    assert calls == [((4, 32, 32, 32), 4), ((4, 32, 28, 30), 4), ((4, 32, 27, 40), 2), ((16, 32, 7, 7), 2),
                     ((4, 32, 27, 40), 4), ((16, 32, 7, 7), 4)]
    with pytest.raises(ValueError, match="needs a dense 3x3 stride-1 convolution"):
        nn.Conv2d(8, 8, 1, algorithm="winograd")
    with pytest.raises(ValueError, match="algorithm must be"):
        nn.Conv2d(8, 8, 3, algorithm="fft")


def test_frozen_layers_transform_their_filters_once_per_weight_version(monkeypatch):
    transforms = []
    original = kernels.winograd_filters
    monkeypatch.setattr(kernels, "winograd_filters", lambda weight, *a: transforms.append(1) or original(weight, *a))
    conv = nn.Conv2d(16, 16, 3, padding=1, seed=0, algorithm="winograd").eval()
    x = np.random.default_rng(0).random((2, 16, 12, 12), dtype=np.float32)
    first = conv(x)
    np.testing.assert_array_equal(conv(x), first)
    assert len(transforms) == 1
    conv.weight.data = conv.weight.data * 2  # a new weight version
    np.testing.assert_allclose(conv(x) - conv.bias.data[:, None, None], 2 * (first - conv.bias.data[:, None, None]),
                               rtol=1e-5, atol=1e-5)
    assert len(transforms) == 2
    conv.train()
    conv(x)
    conv(x)
    assert len(transforms) == 2  # training transforms inside the kernel call, every step, and caches nothing


def test_frozen_weights_are_known_by_identity_and_unfrozen_ones_by_value(monkeypatch):
    """An unfrozen evaluation layer compares its weight with the one its filters came from on every
    call, so an in-place change is seen; a frozen one's weight cannot change in place (read-only),
    so its filters are reused without the comparison, and a new array assigned is seen. A frozen
    Conv2d + BatchNorm2d folds once; a change of the batch norm's statistics folds again."""
    compared = []
    original_equal = np.array_equal
    monkeypatch.setattr(np, "array_equal", lambda a, b, *r: compared.append(np.shape(a)) or original_equal(a, b, *r))
    transforms = []
    original = kernels.winograd_filters
    monkeypatch.setattr(kernels, "winograd_filters", lambda weight, *a: transforms.append(1) or original(weight, *a))
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 12, 12), dtype=np.float32)
    conv = nn.Conv2d(16, 16, 3, padding=1, seed=0, algorithm="winograd").eval()
    reference = nn.Conv2d(16, 16, 3, padding=1, seed=0, algorithm="im2col").eval()
    conv(x)
    conv.weight.data[0] *= -1  # unfrozen: in place, seen by value
    reference.weight.data[0] *= -1
    np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(transforms) == 2 and (16, 16, 3, 3) in compared

    given = conv.weight.data
    conv.requires_grad_(False)
    # a read-only copy; the array given is untouched
    assert not conv.weight.data.flags.writeable and given.flags.writeable
    np.testing.assert_array_equal(conv.weight.data, given)
    with pytest.raises(ValueError, match="read-only"):
        conv.weight.data[0] = 0.0
    compared.clear()
    first = conv(x)  # same values, now frozen: no new transform
    np.testing.assert_array_equal(conv(x), first)
    assert len(transforms) == 2 and (16, 16, 3, 3) not in compared[1:]
    conv.weight.data = given * 2  # a new array is a new version
    reference.weight.data = given * 2
    np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(transforms) == 3
    conv.requires_grad_(True)
    assert conv.weight.data.flags.writeable

    # 2,304 weights, 2,304 outputs per image: a frozen net folds its batch norm (once), an unfrozen one does not
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, seed=1, algorithm="winograd"), nn.BatchNorm2d(16)).eval()
    twin = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, seed=1, algorithm="winograd"), nn.BatchNorm2d(16)).eval()
    net.requires_grad_(False)
    for bn in (net[1], twin[1]):
        bn.running_mean = np.linspace(-1, 1, 16).astype(np.float32)
    transforms.clear()
    compared.clear()
    np.testing.assert_allclose(net(x), twin(x), rtol=1e-5, atol=1e-5)
    folded = net[1]._folded[2]
    np.testing.assert_allclose(net(x), twin(x), rtol=1e-5, atol=1e-5)
    assert net[1]._folded[2] is folded and net[0]._winograd_filters[0] is folded  # folded once, known by identity
    assert len(transforms) == 2  # once each
    assert compared.count((16, 16, 3, 3)) == 1  # the twin's second call compares its weight by value
    for bn in (net[1], twin[1]):
        bn.running_var = np.full(16, 4.0, np.float32)
    np.testing.assert_allclose(net(x), twin(x), rtol=1e-5, atol=1e-5)
    assert net[1]._folded[2] is not folded and len(transforms) == 3  # folded again, a new version


@pytest.mark.parametrize("batch,channels,expected", [
    (2, 64, {"winograd_conv2d_backward"}),
    (1, 64, {"winograd_conv2d_backward", "forward filters reused"}),
    (1, 128, {"conv2d_backward_weight", "winograd_conv2d_backward_input", "forward filters reused"}),
    (1, 256, {"conv2d_backward_weight", "conv2d_backward_input"})])
def test_each_gradient_follows_its_batch_rule_and_matches_im2col(monkeypatch, batch, channels, expected):
    """7 x 7 outputs, 16 tiles of 2 x 2 per image: the weight gradient by Winograd from a quarter as many
    tiles as channels, the input gradient from half as many, or from an eighth as many with the forward
    pass's filters (F(2x2)); either way the gradients agree with im2col's within F(2x2)'s float32 error."""
    rng = np.random.default_rng(batch * channels)
    x = rng.standard_normal((batch, channels, 7, 7)).astype(np.float32)
    grad_out = rng.standard_normal((batch, channels, 7, 7)).astype(np.float32)
    gradients = {}
    for algorithm in ("auto", "im2col"):
        conv = nn.Conv2d(channels, channels, 3, padding=1, seed=3, algorithm=algorithm)
        calls = set()
        def spy(*a, _name, _f, **k):
            calls.add(_name)
            if k.get("forward_filters") is not None:
                calls.add("forward filters reused")
            return _f(*a, **k)

        for name in ("winograd_conv2d_backward", "winograd_conv2d_backward_weight", "winograd_conv2d_backward_input",
                     "conv2d_backward_weight", "conv2d_backward_input"):
            monkeypatch.setattr(kernels, name, functools.partial(spy, _name=name, _f=getattr(kernels, name)))
        conv(x)
        grad_x = conv.backward(grad_out)
        monkeypatch.undo()
        gradients[algorithm] = (conv.weight.grad, grad_x, calls)
    assert gradients["auto"][2] == expected
    for ours, exact in zip(gradients["auto"][:2], gradients["im2col"][:2]):
        np.testing.assert_allclose(ours, exact, rtol=0, atol=FLOAT32_TOLERANCE[2] * 10 * np.abs(exact).max())


def test_networks_agree_between_algorithms():
    rng = np.random.default_rng(5)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, seed=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1, seed=2), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 16, 3, padding=1, seed=3))
    x = rng.random((4, 3, 24, 24), dtype=np.float32)
    exact = nn.set_conv_algorithm(net, "im2col").eval()(x)
    fast = nn.set_conv_algorithm(net, "winograd").eval()(x)
    assert [layer.algorithm for layer in net.layers if isinstance(layer, nn.Conv2d)] == ["winograd"] * 3
    assert np.abs(fast - exact).max() <= 3 * FLOAT32_TOLERANCE[4] * np.abs(exact).max()


def test_patchcore_detects_as_well_with_winograd_as_with_im2col():
    from npanomaly import PatchCore, metrics, synthetic

    category = synthetic.make_category("woven", n_train=16, n_test_good=6, n_test_defect=8, size=64, seed=1)
    results = {}
    for algorithm in ("im2col", "winograd"):
        model = PatchCore(backbone="resnet18", weights="random", seed=0)
        nn.set_conv_algorithm(model.backbone, algorithm)
        scores = model.fit(category.train).score_samples(category.test)
        results[algorithm] = (metrics.auroc(scores, category.labels), scores)
    assert results["winograd"][0] == results["im2col"][0]
    np.testing.assert_allclose(results["winograd"][1], results["im2col"][1], rtol=1e-3)


def test_auto_keeps_im2col_where_kernels_cannot_call_openblas(monkeypatch):
    from npanomaly.kernels import blas

    x = np.zeros((2, 32, 32, 32), np.float32)
    conv = nn.Conv2d(32, 32, 3, padding=1, seed=0)
    assert conv._winograd_tile(x, (1, 1)) == 4
    monkeypatch.setattr(blas, "BACKEND", "numpy")
    assert conv._winograd_tile(x, (1, 1)) is None
    conv.algorithm = "winograd"  # forced: still Winograd, through the slow but exact callback
    assert conv._winograd_tile(x, (1, 1)) == 4


def test_consecutive_winograd_layers_hand_over_channels_last_bit_identically(monkeypatch):
    """In evaluation a Winograd layer whose only reader is another Winograd layer writes its output
    channels-last, which the next reads without a copy; the network's output is bit-identical to
    the layers run on plain arrays, an output asked for with intermediate() stays a C-contiguous
    [N, C, H, W] array, and a layer of any algorithm or mode given such a view computes as on a copy."""
    rng = np.random.default_rng(5)
    net = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, seed=0, algorithm="winograd"), nn.ReLU(),
                        nn.Conv2d(12, 8, 3, padding=1, seed=1, algorithm="winograd"),
                        nn.Conv2d(8, 8, 1, seed=2)).eval()
    x = rng.standard_normal((3, 8, 11, 13)).astype(np.float32)
    expected = net[3]._forward(net[2]._forward(np.maximum(net[0]._forward(x), 0.0)))
    handed, copies = [], []
    original = kernels.winograd_conv2d_forward
    monkeypatch.setattr(kernels, "winograd_conv2d_forward",
                        lambda x, *a, **k: handed.append((x.flags.c_contiguous, k.get("channels_last", False)))
                        or original(x, *a, **k))
    original_copy = winograd.to_channels_last
    monkeypatch.setattr(winograd, "to_channels_last", lambda x, out: copies.append(x.shape) or original_copy(x, out))
    np.testing.assert_array_equal(net(x), expected)
    assert handed == [(True, True), (False, False)]  # the second layer got the first's channels-last view
    assert copies == [x.shape]  # only the network's input was copied to channels-last
    first, = net.intermediate(x, [1])
    assert first.flags.c_contiguous
    np.testing.assert_array_equal(first, np.maximum(net[0]._forward(x), 0.0))

    view = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not view.flags.c_contiguous
    for algorithm in ("winograd", "im2col"):
        for training in (False, True):
            conv = nn.Conv2d(8, 6, 3, padding=1, seed=3, algorithm=algorithm).train(training)
            np.testing.assert_array_equal(conv(view), conv(x))
    spoiled = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    spoiled[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nn.Conv2d(8, 6, 3, padding=1, seed=3).eval()(spoiled.transpose(0, 3, 1, 2))
