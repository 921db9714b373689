"""torch as an oracle: same weights, same input -> same outputs, gradients, running statistics and
optimizer trajectories, to 1e-5 relative in float32. Skipped cleanly where torch is not installed."""

import numpy as np
import pytest

from npanomaly import nn, optim
from strategies import random_array

torch = pytest.importorskip("torch")
torch.set_num_threads(2)


def assert_close(actual, expected, rtol=1e-5):
    """Elementwise agreement to rtol of the tensor's scale (float32 sums differ in order, not in value)."""
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def to_torch(module):
    """The same network in torch.nn, with our weights and buffers copied in."""
    def convert(layer):
        if isinstance(layer, nn.Conv2d):
            return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                   layer.padding, bias=layer.bias is not None)
        if isinstance(layer, nn.BatchNorm2d):
            return torch.nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        if isinstance(layer, nn.ReLU):
            return torch.nn.ReLU()
        if isinstance(layer, nn.MaxPool2d):
            return torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, nn.AvgPool2d):
            return torch.nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding,
                                      count_include_pad=layer.count_include_pad)
        if isinstance(layer, nn.Sequential):
            return torch.nn.Sequential(*[convert(child) for child in layer.layers])
        raise TypeError(type(layer))

    twin = convert(module)
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in module.state_dict().items()})
    return twin


def stack(seed=0):
    # Convolutions followed by batch norm carry no bias: its true gradient is exactly 0 and both
    # libraries would only be compared on rounding noise.
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False, seed=seed), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 0), bias=False, seed=seed + 1),
                         nn.BatchNorm2d(6, momentum=None), nn.ReLU(), nn.AvgPool2d(3, 1, 1),
                         nn.Conv2d(6, 4, 1, seed=seed + 2))


def test_default_initialisation_has_torchs_distribution():
    """Weights and biases uniform in +-1/sqrt(fan_in): compare the range and variance with torch's init."""
    ours = nn.Conv2d(16, 64, 3, seed=0)
    torch.manual_seed(0)  # unseeded, the 64 biases' variances differed by more than 30% about 1 run in 16
    theirs = torch.nn.Conv2d(16, 64, 3)
    bound = 1 / np.sqrt(16 * 9)
    for a, b in ((ours.weight.data, theirs.weight), (ours.bias.data, theirs.bias)):
        b = b.detach().numpy()
        assert np.abs(a).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(a).max() > 0.95 * bound
        np.testing.assert_allclose(a.var(), b.var(), rtol=0.3)
        np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.3)


@pytest.mark.parametrize("training", [True, False])
def test_stack_forward_backward_and_running_stats(training):
    net = stack()
    twin = to_torch(net)
    net.train(training)
    twin.train(training)
    x = random_array(1, (4, 3, 21, 18), np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    for _ in range(2):  # two batches: running statistics are updated twice
        y = net(x)
        yt = twin(xt)
    assert_close(y, yt)
    for name, value in twin.state_dict().items():
        assert_close(net.state_dict()[name], value.numpy())
    if not training:
        with pytest.raises(RuntimeError, match="training mode"):
            net.backward(np.ones_like(y))
        return
    upstream = random_array(2, y.shape, np.float32)
    grad_x = net.backward(upstream)
    yt.backward(torch.from_numpy(upstream))
    assert_close(grad_x, xt.grad)
    for (name, param), (tname, tparam) in zip(net.named_parameters(), twin.named_parameters()):
        assert name == tname
        assert_close(param.grad, tparam.grad)


def train_both(make_optimizer, make_torch_optimizer, steps=5):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False, seed=3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, stride=2, padding=1, seed=4))
    twin = to_torch(net)
    opt = make_optimizer(net.parameters())
    topt = make_torch_optimizer(twin.parameters())
    rng = np.random.default_rng(5)
    for _ in range(steps):
        x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
        target = rng.standard_normal((4, 4, 6, 6)).astype(np.float32)
        opt.zero_grad()
        y = net(x)
        loss = float(np.mean((y - target) ** 2))
        net.backward((2.0 / y.size) * (y - target), input_grad=False)
        opt.step()
        topt.zero_grad()
        tloss = torch.mean((twin(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2)
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-5)
    for (name, param), tparam in zip(net.named_parameters(), twin.parameters()):
        assert_close(param.data, tparam)


def test_sgd_with_momentum_and_weight_decay_follows_torch():
    train_both(lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
               lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3))


def test_sgd_nesterov_follows_torch():
    train_both(lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
               lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True))


def test_adam_follows_torch():
    train_both(lambda p: optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-4),
               lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-4))
