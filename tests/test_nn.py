"""Layer behaviour that is not arithmetic: modes, memory, state dicts, and every bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npanomaly import nn, optim
from npanomaly.kernels import _config


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, seed=0), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 2, 1, seed=1))


def images(shape=(2, 3, 8, 8), dtype=np.float32):
    return np.random.default_rng(0).random(shape).astype(dtype)


def test_inference_keeps_no_activations():
    net = small_net().eval()
    net(images())
    assert all(layer._saved is None for layer in net.layers)
    with pytest.raises(RuntimeError, match="training mode"):
        net.backward(np.ones((2, 2, 2, 2), np.float32))


def test_one_backward_per_forward():
    net = small_net().train()
    y = net(images())
    net.backward(np.ones_like(y))
    assert all(layer._saved is None for layer in net.layers)
    with pytest.raises(RuntimeError, match="preceding forward"):
        net.backward(np.ones_like(y))


def test_input_grad_false_skips_the_first_layers_input_gradient():
    net = small_net().train()
    y = net(images())
    assert net.backward(np.ones_like(y), input_grad=False) is None
    assert all(p.grad is not None for p in net.parameters())


def test_frozen_parameters_receive_no_gradient():
    net = small_net().train().requires_grad_(False)
    y = net(images())
    net.backward(np.ones_like(y))
    assert all(p.grad is None for p in net.parameters())


def test_eval_uses_running_statistics_so_scores_do_not_depend_on_the_batch():
    net = small_net()
    for _ in range(3):
        net(images((4, 3, 8, 8)))
    net.eval()
    batch = images((4, 3, 8, 8))
    np.testing.assert_array_equal(net(batch)[:1], net(batch[:1]))


def test_state_dict_round_trip_and_torch_key_names():
    net = small_net()
    net(images())
    state = net.state_dict()
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                           "1.num_batches_tracked", "4.weight", "4.bias"]
    assert int(state["1.num_batches_tracked"]) == 1
    assert net.state_shapes() == {key: value.shape for key, value in state.items()}
    other = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, seed=5), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 2, 1, seed=6))
    other.load_state_dict(state)
    net.eval()
    other.eval()
    np.testing.assert_array_equal(net(images()), other(images()))
    with pytest.raises(ValueError, match=r"missing keys \['4.bias'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "4.bias"})
    with pytest.raises(ValueError, match="unexpected keys"):
        other.load_state_dict(dict(state, extra=np.zeros(1)))
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        other.load_state_dict(dict(state, **{"0.weight": np.zeros((4, 3, 2, 2))}))


def test_to_float64_converts_parameters_and_buffers():
    net = small_net().to(np.float64)
    assert all(p.data.dtype == np.float64 for p in net.parameters())
    assert net.layers[1].running_var.dtype == np.float64
    assert net(images(dtype=np.float64)).dtype == np.float64


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad,error,match", [
    (np.zeros((3, 8, 8), np.float32), ValueError, r"4 dimensions, got shape \(3, 8, 8\)"),
    (np.zeros((2, 5, 8, 8), np.float32), ValueError, r"3 channels .* got shape \(2, 5, 8, 8\)"),
    (np.zeros((0, 3, 8, 8), np.float32), ValueError, "empty batch"),
    (np.zeros((2, 3, 8, 8), np.int64), TypeError, "float32 or float64, got int64"),
    (np.zeros((2, 3, 8, 8), np.float64), TypeError, "dtype float64 but the layer's parameters are float32"),
    ([[[[0.0]]]], TypeError, "numpy.ndarray, got list"),
    (np.zeros((1, 3, 1, 8), np.float32), ValueError, "height 1 plus padding 2\\*0 is smaller than the kernel"),
])
def test_conv_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        nn.Conv2d(3, 4, 3)(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(value):
    x = images()
    x[1, 2, 3, 4] = value
    for layer in (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(3), nn.ReLU(), small_net()):
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer(x)


@given(dtype=st.sampled_from([np.int8, np.int32, np.uint8, np.float16, np.complex64, np.bool_]))
def test_non_float_dtypes_are_type_errors(dtype):
    for layer in (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)):
        with pytest.raises(TypeError, match="float32 or float64"):
            layer(np.zeros((1, 3, 4, 4), dtype=dtype))


def test_miswired_network_fails_clearly():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 2, 3))
    with pytest.raises(ValueError, match="5 channels"):
        net(images())


def test_batchnorm_training_needs_more_than_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(3)(np.ones((1, 3, 1, 1), np.float32))
    nn.BatchNorm2d(3).eval()(np.ones((1, 3, 1, 1), np.float32))  # fine in eval mode


def test_grad_out_is_checked():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    y = conv(images())
    with pytest.raises(ValueError, match="shape of the forward output"):
        conv.backward(np.ones((2, 4, 7, 8), np.float32))
    conv(images())
    with pytest.raises(TypeError, match="float32"):
        conv.backward(np.ones_like(y, dtype=np.float64))


@pytest.mark.parametrize("make,error,match", [
    (lambda: nn.Conv2d(3, 4, 0), ValueError, "kernel_size must be >= 1"),
    (lambda: nn.Conv2d(3, 4, 3, stride=0), ValueError, "stride must be >= 1"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), ValueError, "padding must be >= 0"),
    (lambda: nn.Conv2d(3, 4, "3"), TypeError, "kernel_size must be an int or a pair"),
    (lambda: nn.Conv2d(0, 4, 3), ValueError, "in_channels must be >= 1"),
    (lambda: nn.Conv2d(3, 4, 3, dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (lambda: nn.BatchNorm2d(3, eps=-1), ValueError, "eps must be"),
    (lambda: nn.MaxPool2d(2, padding=2), ValueError, "at most half of kernel_size"),
    (lambda: nn.Sequential(nn.ReLU(), "relu"), TypeError, "layer 1 must be an npanomaly.nn.Module"),
    (lambda: optim.SGD([], lr=0.1), ValueError, "empty parameter list"),
    (lambda: optim.SGD(small_net().parameters(), lr=-1), ValueError, "lr must be"),
    (lambda: optim.Adam(small_net().parameters(), betas=(0.9, 1.0)), ValueError, r"betas must lie in \[0, 1\)"),
    (lambda: optim.SGD(small_net().parameters(), lr=0.1, nesterov=True), ValueError, "nesterov"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_optimizer_skips_parameters_without_gradient():
    net = small_net()
    before = [p.data.copy() for p in net.parameters()]
    optim.SGD(net.parameters(), lr=0.1, momentum=0.9).step()
    for a, p in zip(before, net.parameters()):
        np.testing.assert_array_equal(a, p.data)


def test_cuda_without_a_gpu_is_one_clear_error():
    from npanomaly import PatchCore
    from npanomaly.kernels import cuda

    if cuda.is_available():
        pytest.skip("a GPU (or the CUDA simulator) is available here")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        nn.Conv2d(3, 4, 3).to_device("cuda")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        PatchCore(device="cuda")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        cuda.relu_forward(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        nn.ReLU().to_device("tpu")


def _trained_statistics(bn, rng):
    """Give a batch norm non-trivial affine parameters and running statistics."""
    n = bn.num_features
    bn.weight.data[:] = rng.uniform(0.5, 2.0, n)
    bn.bias.data[:] = rng.standard_normal(n)
    bn.running_mean[:] = rng.standard_normal(n)
    bn.running_var[:] = rng.uniform(0.1, 3.0, n)
    return bn


@given(bias=st.booleans(), groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_eval_conv_batchnorm_pairs_run_folded_and_equal_the_two_layers(bias, groups, seed):
    """Sequential folds an eval Conv2d + BatchNorm2d pair into one convolution: in float64 the result
    equals running the layers one by one; a wanted convolution output is never folded away."""
    rng = np.random.default_rng(seed)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias, groups=groups, seed=seed),
                        _trained_statistics(nn.BatchNorm2d(4), rng), nn.ReLU(),
                        nn.Conv2d(4, 6, 1, seed=seed + 1), _trained_statistics(nn.BatchNorm2d(6), rng)).to(np.float64)
    net.eval()
    x = rng.standard_normal((2, 4, 8, 9))  # more outputs per image than weights: folding pays
    step_by_step = [x]
    for layer in net.layers:
        step_by_step.append(layer._forward(step_by_step[-1]))
    calls = []
    for bn in (net.layers[1], net.layers[4]):
        bn._forward = lambda x, bn=bn, **fused_relu: calls.append(bn) or type(bn)._forward(bn, x, **fused_relu)
    np.testing.assert_allclose(net(x), step_by_step[-1], rtol=1e-12, atol=1e-12)
    assert calls == []  # both pairs ran as one convolution each
    conv_out, bn_out = net.intermediate(x, [0, 1])
    np.testing.assert_array_equal(conv_out, step_by_step[1])  # the unfolded convolution itself
    np.testing.assert_allclose(bn_out, step_by_step[2], rtol=1e-12, atol=1e-12)
    net.train()  # batch statistics: no folding, and the result differs from the eval one
    assert not np.allclose(net(x), step_by_step[-1])


def test_batchnorm_is_not_folded_where_the_weights_outnumber_an_images_outputs():
    rng = np.random.default_rng(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, seed=0), _trained_statistics(nn.BatchNorm2d(8), rng)).eval()
    calls = []
    net.layers[1]._forward = lambda x: calls.append(x) or nn.BatchNorm2d._forward(net.layers[1], x)
    x = rng.standard_normal((16, 8, 2, 2)).astype(np.float32)  # 576 weights, 32 outputs per image
    y = net(x)
    assert len(calls) == 1
    np.testing.assert_array_equal(y[:1], net(x[:1]))


def _spy_on_relu_forward(net):
    """Count the calls of every ReLU layer's own forward."""
    calls = []
    for layer in net.layers:
        if isinstance(layer, nn.ReLU):
            layer._forward = lambda x, layer=layer: calls.append(layer) or type(layer)._forward(layer, x)
    return calls


@given(depthwise=st.booleans(), upper=st.sampled_from([None, 6.0]), seed=st.integers(0, 2**16))
def test_eval_relu_runs_inside_the_layer_before_and_is_bit_identical(depthwise, upper, seed):
    """In eval mode a ReLU after a convolution (with its batch norm folded in) or after a batch norm
    runs in that layer's output pass; the float32 result equals the layers run one by one, bit for bit."""
    rng = np.random.default_rng(seed)
    relu = nn.ReLU if upper is None else nn.ReLU6
    first = nn.Conv2d(4, 4, 3, padding=1, groups=4 if depthwise else 1, seed=seed)
    net = nn.Sequential(first, _trained_statistics(nn.BatchNorm2d(4), rng), relu(),
                        nn.MaxPool2d(2), _trained_statistics(nn.BatchNorm2d(4), rng), relu()).eval()
    net[4].running_mean[:] = 2.0  # about half of the second ReLU's inputs negative
    x = (3 * rng.standard_normal((2, 4, 8, 9))).astype(np.float32)
    stage = net[2]._forward(first._forward(x, *net[1].folded_into(first)))
    expected = net[5]._forward(net[4]._forward(net[3]._forward(stage)))
    calls = _spy_on_relu_forward(net)
    np.testing.assert_array_equal(net(x), expected)
    assert calls == []
    relu_out, bn_out = net.intermediate(x, [2, 4])  # a wanted ReLU output can come fused, a batch norm's not
    assert calls == []
    np.testing.assert_array_equal(relu_out, stage)
    np.testing.assert_array_equal(bn_out, net[4]._forward(net[3]._forward(stage)))
    assert (bn_out < 0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(upper=st.sampled_from([None, 6.0]), seed=st.integers(0, 2**16))
def test_training_batchnorm_relu_pairs_fuse_forward_and_backward_bit_identically(dtype, upper, seed):
    """A training-mode BatchNorm2d + ReLU runs as one pass forward and one backward (the ReLU passes
    the gradient through, the batch norm applies its mask); outputs, gradients and running
    statistics equal the layers run one by one, bit for bit."""
    def make():
        relu = nn.ReLU if upper is None else nn.ReLU6
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, seed=seed), nn.BatchNorm2d(4), relu(),
                             nn.Conv2d(4, 5, 3, padding=1, seed=seed + 1), nn.BatchNorm2d(5), relu()).to(dtype)
    fused, separate = make(), make()
    x = (4 * np.random.default_rng(seed).standard_normal((2, 3, 9, 8))).astype(dtype)
    grad = np.random.default_rng(seed + 1).standard_normal((2, 5, 5, 4)).astype(dtype)
    calls = _spy_on_relu_forward(fused)
    y = fused(x)
    assert calls == []
    fused.backward(grad)
    h = x
    for layer in separate.layers:
        h = layer.forward(h)
    np.testing.assert_array_equal(y, h)
    g = grad
    for layer in reversed(separate.layers):
        g = layer.backward(g)
    for (name, p), (_, q) in zip(fused.named_parameters(), separate.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)
    for name, value in separate.state_dict().items():
        np.testing.assert_array_equal(fused.state_dict()[name], value, err_msg=name)
    assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("images_per_chunk", [1, 2, 3])
def test_eval_networks_run_a_few_images_at_a_time_with_bit_identical_results(monkeypatch, images_per_chunk):
    """In eval mode forward() and intermediate() run EVAL_CHUNK_BYTES of input at a time; every
    output equals the whole batch's bit for bit. Training runs the whole batch (batch statistics)."""
    rng = np.random.default_rng(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, seed=0), _trained_statistics(nn.BatchNorm2d(8), rng),
                        nn.ReLU(), nn.Residual(nn.Conv2d(8, 8, 3, padding=1, seed=1), nn.ReLU()),
                        nn.Conv2d(8, 4, 1, seed=2)).eval()
    x = rng.standard_normal((7, 3, 12, 10)).astype(np.float32)
    whole_out, whole_maps = net(x), net.intermediate(x, [2, 3, 4])
    runs = []
    real_run = nn.Sequential._run
    monkeypatch.setattr(nn.Sequential, "_run", lambda self, part, stop, wanted: runs.append(
        (self, part.shape[0])) or real_run(self, part, stop, wanted))
    monkeypatch.setattr(_config, "EVAL_CHUNK_BYTES", images_per_chunk * x[0].nbytes)
    np.testing.assert_array_equal(net(x), whole_out)
    for got, want in zip(net.intermediate(x, [2, 3, 4]), whole_maps):
        np.testing.assert_array_equal(got, want)
    sizes = [size for owner, size in runs if owner is net]
    chunks = -(-7 // images_per_chunk)
    assert sizes == [min(images_per_chunk, 7 - i * images_per_chunk) for i in range(chunks)] * 2
    runs.clear()
    net.train()
    net(x)
    assert [size for owner, size in runs if owner is net] == [7]


def _trained_bn(channels, rng):
    bn = nn.BatchNorm2d(channels)
    bn.weight.data = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bn.bias.data = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    bn.running_mean = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    bn.running_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    return bn


@pytest.mark.parametrize("algorithm", ["im2col", "winograd"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("downsample", [False, True])
def test_eval_residual_blocks_add_the_shortcut_in_the_last_convolution_bit_identically(
        monkeypatch, algorithm, frozen, downsample):
    """relu(body(x) + shortcut(x)) in evaluation mode: where the body's last layer is a convolution
    (a frozen one folds its batch norm in; at 16 x 16 x 3 x 3 weights and 16 x 12 x 12 outputs an
    unfrozen one does not, and ends in the batch norm) the sum and the ReLU run in its output pass,
    and the result is the two-step block's, bit for bit."""
    from npanomaly import kernels
    rng = np.random.default_rng(int(frozen) + 2 * int(downsample))
    width = 24 if downsample else 16
    body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, seed=1, algorithm=algorithm), _trained_bn(16, rng), nn.ReLU(),
                         nn.Conv2d(16, width, 3, padding=1, seed=2, algorithm=algorithm), _trained_bn(width, rng))
    shortcut = nn.Sequential(nn.Conv2d(16, width, 1, seed=3), _trained_bn(width, rng)) if downsample else None
    block = nn.ResidualBlock(body, shortcut).eval()
    if frozen:
        block.requires_grad_(False)
    x = rng.standard_normal((3, 16, 12, 12)).astype(np.float32)
    expected = np.maximum(body._forward(x) + (x if shortcut is None else shortcut._forward(x)), 0.0)
    sums = []
    original = kernels.relu_forward
    monkeypatch.setattr(kernels, "relu_forward", lambda total: sums.append(1) or original(total))
    np.testing.assert_array_equal(block._forward(x), expected)
    assert len(sums) == (0 if frozen else 1)  # fused where the convolution is last


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_convolution_kernels_add_a_residual_before_the_clamp(dtype, kernel, stride, padding):
    """conv2d_forward and winograd_conv2d_forward with a residual: clamp((conv + bias) + residual),
    bit for bit the separate passes (float64 runs the batched products, float32 the per-image ones);
    a residual of the wrong shape or dtype is refused by name."""
    from npanomaly import kernels
    rng = np.random.default_rng(kernel + stride)
    x = rng.standard_normal((2, 6, 9, 10)).astype(dtype)
    w = rng.standard_normal((5, 6, kernel, kernel)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    plain = kernels.conv2d_forward(x, w, b, stride, stride, padding, padding)
    residual = rng.standard_normal(plain.shape).astype(dtype)
    np.testing.assert_array_equal(kernels.conv2d_forward(x, w, b, stride, stride, padding, padding, 0.0, np.inf,
                                                         residual=residual), np.maximum(plain + residual, 0.0))
    np.testing.assert_array_equal(kernels.conv2d_forward(x, w, None, stride, stride, padding, padding,
                                                         residual=residual),
                                  kernels.conv2d_forward(x, w, None, stride, stride, padding, padding) + residual)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.conv2d_forward(x, w, b, stride, stride, padding, padding, residual=residual[:, :, 1:])
    with pytest.raises(ValueError, match="residual must be"):
        kernels.conv2d_forward(x, w, b, stride, stride, padding, padding, residual=residual.astype(np.float16))
    if kernel == 3 and stride == 1:
        for m in (2, 4):
            plain = kernels.winograd_conv2d_forward(x, w, b, padding, padding, m)
            np.testing.assert_array_equal(
                kernels.winograd_conv2d_forward(x, w, b, padding, padding, m, 0.0, np.inf, residual=residual),
                np.maximum(plain + residual, 0.0))
        with pytest.raises(ValueError, match="residual must be"):
            kernels.winograd_conv2d_forward(x, w, b, padding, padding, 2, residual=residual.T)


def test_frozen_parameters_hold_read_only_copies_and_unfreeze_to_writable_ones():
    given = np.arange(6, dtype=np.float32)
    param = nn.Parameter(given, requires_grad=False)
    assert param.data is not given and given.flags.writeable and not param.data.flags.writeable
    np.testing.assert_array_equal(param.data, given)
    given[0] = 7.0  # the caller's array stays the caller's
    assert param.data[0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        param.data[1] = 1.0
    param.data = given * 2  # a new version, frozen too
    assert not param.data.flags.writeable and param.data[0] == 14.0
    param.requires_grad = True
    assert param.data.flags.writeable
    param.data[1] = 5.0
    net = small_net().requires_grad_(False).to(np.float64)  # a conversion keeps them frozen
    assert all(not p.data.flags.writeable and p.data.dtype == np.float64 for p in net.parameters())
    net.load_state_dict(net.state_dict())  # and so does loading
    assert all(not p.data.flags.writeable for p in net.parameters())
    assert all(p.data.flags.writeable for p in net.requires_grad_(True).parameters())
