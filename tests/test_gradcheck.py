"""float64 central-difference checks of every backward pass, always with a random upstream gradient.

The loss is L = sum(G * f(x)) with G drawn at random: the gradient of plain sum(f(x)) through
training-mode batch norm is identically zero and would prove nothing.
"""

import numpy as np
import pytest

from npanomaly import nn
from strategies import random_array

EPS = 1e-6


def numeric_gradient(loss, array):
    """dL/darray by central differences, perturbing array in place one element at a time."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + EPS
        plus = loss()
        flat[i] = saved - EPS
        minus = loss()
        flat[i] = saved
        flat_grad[i] = (plus - minus) / (2 * EPS)
    return grad


def check_gradients(module, x, seed=0):
    module.to(np.float64).train()
    y = module(x)
    upstream = random_array(seed, y.shape)

    def loss():
        return float(np.sum(upstream * module(x)))

    module.zero_grad()
    module(x)
    grad_x = module.backward(upstream)
    np.testing.assert_allclose(grad_x, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    params = module.parameters()
    analytic = [p.grad.copy() for p in params]
    for param, grad in zip(params, analytic):
        np.testing.assert_allclose(grad, numeric_gradient(loss, param.data), rtol=1e-6, atol=1e-8)
    return analytic


@pytest.mark.parametrize("stride,padding,kernel,bias", [(1, 0, 3, True), (2, 1, 3, True), ((2, 1), (0, 2), (2, 3), False),
                                                          (3, 1, 1, True), (1, 0, 1, False)])
def test_conv2d_gradients(stride, padding, kernel, bias):
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, bias=bias, seed=1)
    check_gradients(conv, random_array(2, (2, 3, 7, 6)))


def test_batchnorm_gradients():
    bn = nn.BatchNorm2d(3)
    bn.weight.data = random_array(3, (3,))
    bn.bias.data = random_array(4, (3,))
    check_gradients(bn, random_array(5, (3, 3, 4, 5)) * 3 + 1)


def test_relu_gradients_away_from_the_kink():
    x = random_array(6, (2, 3, 4, 4))
    x[np.abs(x) < 0.05] = 0.5
    check_gradients(nn.ReLU(), x)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_gradients_with_distinct_values(kernel, stride, padding):
    values = np.linspace(-1, 1, 2 * 3 * 6 * 5)  # distinct and 1e-2 apart: no tie flips within EPS
    x = np.random.default_rng(7).permutation(values).reshape(2, 3, 6, 5)
    check_gradients(nn.MaxPool2d(kernel, stride, padding), x)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_gradients(count_include_pad):
    check_gradients(nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad), random_array(8, (2, 2, 5, 4)))


def test_whole_conv_bn_relu_conv_stack():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, seed=9), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1, seed=10))
    x = random_array(11, (3, 2, 8, 7))
    net.to(np.float64).train()
    pre_activation = net.layers[1](net.layers[0](x))
    assert np.min(np.abs(pre_activation)) > 1e-4  # no ReLU kink within the finite-difference step
    check_gradients(net, x, seed=12)


def test_backward_accumulates_into_grad():
    conv = nn.Conv2d(2, 3, 3, padding=1, seed=0).to(np.float64)
    x = random_array(1, (2, 2, 5, 5))
    upstream = random_array(2, (2, 3, 5, 5))
    conv(x)
    conv.backward(upstream)
    once = conv.weight.grad.copy()
    conv(x)
    conv.backward(upstream)
    np.testing.assert_allclose(conv.weight.grad, 2 * once, rtol=1e-12)
