"""Batch normalisation over the channels of an NCHW batch (torch.nn.BatchNorm2d).

Shapes used throughout: x, y, grad [N, C, H, W]; weight, bias, mean, var [C]. Every statistic is
a sum over the M = N*H*W values of one channel, accumulated in float64.
"""

import math

import numpy as np
from numba import njit, prange

from . import memory
from ._config import PARALLEL_JIT_OPTIONS, REDUCTION_JIT_OPTIONS
from .activation import clamp


def batchnorm2d_train_forward(x, weight, bias, eps, lower=-np.inf, upper=np.inf):
    """Normalise with the batch's own statistics (training mode), optionally then a ReLU.

    Shapes: x [N, C, H, W], weight [C], bias [C] -> (y [N, C, H, W], batch_mean [C], batch_var [C]), statistics in float64.
    Math: mean_c = (1/M) sum x,  var_c = (1/M) sum (x - mean_c)^2  (biased, as torch normalises with),
          y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c.
          The sums run on x minus the channel's first value, which keeps the one-pass variance
          exact to float64 rounding however large the mean is. y is then clamped (activation.clamp:
          (0, inf) a fused ReLU, (-inf, inf) none).
    Parallel: over channels; each iteration reads and writes only its own channel.
    """
    channels = x.shape[1]
    y = memory.empty(x.shape, x.dtype)
    # float64 whatever x is: with a large mean, rounding the mean to float32 would shift every xhat
    # (and the backward pass that reuses it) by up to half an ulp of the mean.
    batch_mean = np.empty(channels, dtype=np.float64)
    batch_var = np.empty(channels, dtype=np.float64)
    _batchnorm2d_train_forward(x, weight, bias, float(eps), float(lower), float(upper), y, batch_mean, batch_var)
    return y, batch_mean, batch_var


@njit(**REDUCTION_JIT_OPTIONS)
def _batchnorm2d_train_forward(x, weight, bias, eps, lower, upper, y, batch_mean, batch_var):
    """batchnorm2d_train_forward into y [N, C, H, W], batch_mean and batch_var [C] float64. Every
    large output is allocated by the Python driver, on recycled memory (kernels/memory.py): made
    in the kernel, it was fresh pages from malloc on every call once other code in the process
    had made glibc hand its heap top back (docs/speed.md, page faults).
    """
    batch, channels, height, width = x.shape
    count = batch * height * width
    for c in prange(channels):
        shift = np.float64(x[0, c, 0, 0])
        total = 0.0
        total_sq = 0.0
        for n in range(batch):
            for h in range(height):
                for w in range(width):
                    d = x[n, c, h, w] - shift
                    total += d
                    total_sq += d * d
        mean_shifted = total / count
        var = max(total_sq / count - mean_shifted * mean_shifted, 0.0)
        mean = shift + mean_shifted
        scale = weight[c] / math.sqrt(var + eps)
        offset = bias[c] - mean * scale
        for n in range(batch):
            for h in range(height):
                for w in range(width):
                    y[n, c, h, w] = clamp(x[n, c, h, w] * scale + offset, lower, upper)
        batch_mean[c] = mean
        batch_var[c] = var


def batchnorm2d_eval_forward(x, weight, bias, running_mean, running_var, eps, lower=-np.inf, upper=np.inf):
    """Normalise with stored running statistics (evaluation mode): a per-channel affine map, optionally then a ReLU.

    Shapes: x [N, C, H, W], weight, bias, running_mean, running_var [C] -> y [N, C, H, W].
    Math: y = (x - running_mean_c) / sqrt(running_var_c + eps) * weight_c + bias_c, clamped
          (activation.clamp: (0, inf) a fused ReLU, (-inf, inf) none).
    Parallel: over (n, c) planes, which are disjoint.
    """
    y = memory.empty(x.shape, x.dtype)
    _batchnorm2d_eval_forward(x, weight, bias, running_mean, running_var, float(eps), float(lower), float(upper), y)
    return y


@njit(**PARALLEL_JIT_OPTIONS)
def _batchnorm2d_eval_forward(x, weight, bias, running_mean, running_var, eps, lower, upper, y):
    """batchnorm2d_eval_forward into y [N, C, H, W] (see _batchnorm2d_train_forward)."""
    batch, channels, height, width = x.shape
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        scale = weight[c] / math.sqrt(np.float64(running_var[c]) + eps)
        offset = bias[c] - running_mean[c] * scale
        for h in range(height):
            for w in range(width):
                y[n, c, h, w] = clamp(x[n, c, h, w] * scale + offset, lower, upper)


def batchnorm2d_backward(grad_out, x, weight, batch_mean, batch_var, eps, activated, lower, upper):
    """Gradients of training-mode batch norm (and a ReLU fused after it) with respect to its input, weight and bias.

    Shapes: grad_out, x, activated [N, C, H, W]; weight [C]; batch_mean, batch_var [C] float64
            -> (grad_x [N, C, H, W], grad_weight [C], grad_bias [C]).
    Gradient: grad_out is dL/d(clamped output) of batchnorm2d_train_forward(..., lower, upper) and
              activated that output; the clamp passes the gradient where lower < activated < upper
              (relu_backward_input's rule), so dy = grad_out there and 0 elsewhere. Then with
              xhat = (x - mean_c) * inv_std_c and inv_std_c = 1 / sqrt(var_c + eps),
              dL/dbias_c = sum dy,  dL/dweight_c = sum dy * xhat,
              dL/dx = weight_c * inv_std_c / M * (M*dy - sum dy - xhat * sum dy*xhat),
              the last term carrying the dependence of mean and var on every x of the channel.
              Without a fused ReLU, pass (-inf, inf) and grad_out itself as activated: every
              finite value passes, and no other array is read.
    Parallel: over channels; each iteration reads and writes only its own channel.
    """
    channels = x.shape[1]
    grad_x = memory.empty(x.shape, x.dtype)
    grad_weight = np.empty(channels, dtype=x.dtype)
    grad_bias = np.empty(channels, dtype=x.dtype)
    _batchnorm2d_backward(grad_out, x, weight, batch_mean, batch_var, float(eps), activated, float(lower), float(upper),
                          grad_x, grad_weight, grad_bias)
    return grad_x, grad_weight, grad_bias


@njit(**REDUCTION_JIT_OPTIONS)
def _batchnorm2d_backward(grad_out, x, weight, batch_mean, batch_var, eps, activated, lower, upper, grad_x,
                          grad_weight, grad_bias):
    """batchnorm2d_backward into grad_x [N, C, H, W], grad_weight and grad_bias [C] (see
    _batchnorm2d_train_forward)."""
    batch, channels, height, width = x.shape
    count = batch * height * width
    for c in prange(channels):
        mean = batch_mean[c]
        inv_std = 1.0 / math.sqrt(batch_var[c] + eps)
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for n in range(batch):
            for h in range(height):
                for w in range(width):
                    dy = np.float64(grad_out[n, c, h, w]) if lower < activated[n, c, h, w] < upper else 0.0
                    sum_dy += dy
                    sum_dy_xhat += dy * (x[n, c, h, w] - mean) * inv_std
        scale = weight[c] * inv_std
        mean_dy = sum_dy / count
        mean_dy_xhat = sum_dy_xhat / count
        for n in range(batch):
            for h in range(height):
                for w in range(width):
                    xhat = (x[n, c, h, w] - mean) * inv_std
                    dy = grad_out[n, c, h, w] if lower < activated[n, c, h, w] < upper else 0.0
                    grad_x[n, c, h, w] = scale * (dy - mean_dy - xhat * mean_dy_xhat)
        grad_weight[c] = sum_dy_xhat
        grad_bias[c] = sum_dy
