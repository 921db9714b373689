"""L2 normalisation over the channels of each position (torch.nn.functional.normalize(x, dim=1))."""

import math

import numpy as np
from numba import njit, prange

from . import memory
from ._config import PARALLEL_JIT_OPTIONS


def l2_normalize_channels_forward(x, eps):
    """Scale the channel vector at every position to unit length.

    Shapes: x [N, C, H, W] -> (y [N, C, H, W], norm [N, H, W] float64).
    Math: y[n, :, h, w] = x[n, :, h, w] / max(|x[n, :, h, w]|, eps).
    Parallel: over (n, h) rows of positions; each writes only its own positions.
    """
    batch, channels, height, width = x.shape
    y = memory.empty(x.shape, x.dtype)
    norm = memory.empty((batch, height, width), np.float64)
    _l2_normalize_channels_forward(x, float(eps), y, norm)
    return y, norm


@njit(**PARALLEL_JIT_OPTIONS)
def _l2_normalize_channels_forward(x, eps, y, norm):
    """l2_normalize_channels_forward into y [N, C, H, W] and norm [N, H, W] float64, allocated by
    the Python driver on recycled memory (kernels/memory.py; see batchnorm's kernels)."""
    batch, channels, height, width = x.shape
    for job in prange(batch * height):
        n = job // height
        h = job % height
        for w in range(width):
            total = 0.0
            for c in range(channels):
                total += np.float64(x[n, c, h, w]) * x[n, c, h, w]
            length = math.sqrt(total)
            norm[n, h, w] = length
            scale = 1.0 / max(length, eps)
            for c in range(channels):
                y[n, c, h, w] = x[n, c, h, w] * scale


def l2_normalize_channels_backward(grad_out, y, norm, eps):
    """Gradient of the loss with respect to the input of the channel-wise L2 normalisation.

    Shapes: grad_out, y [N, C, H, W], norm [N, H, W] -> grad_x [N, C, H, W].
    Gradient: where |x| > eps, y = x / |x| and dL/dx = (dL/dy - y <y, dL/dy>) / |x|: the upstream
              gradient with its component along y removed (scaling x does not change y), over |x|;
              where |x| <= eps, y = x / eps and dL/dx = dL/dy / eps.
    Parallel: over (n, h) rows of positions.
    """
    grad_x = memory.empty(grad_out.shape, grad_out.dtype)
    _l2_normalize_channels_backward(grad_out, y, norm, float(eps), grad_x)
    return grad_x


@njit(**PARALLEL_JIT_OPTIONS)
def _l2_normalize_channels_backward(grad_out, y, norm, eps, grad_x):
    """l2_normalize_channels_backward into grad_x [N, C, H, W] (see _l2_normalize_channels_forward)."""
    batch, channels, height, width = grad_out.shape
    for job in prange(batch * height):
        n = job // height
        h = job % height
        for w in range(width):
            length = norm[n, h, w]
            if length <= eps:
                for c in range(channels):
                    grad_x[n, c, h, w] = grad_out[n, c, h, w] / eps
                continue
            along = 0.0
            for c in range(channels):
                along += np.float64(y[n, c, h, w]) * grad_out[n, c, h, w]
            for c in range(channels):
                grad_x[n, c, h, w] = (grad_out[n, c, h, w] - y[n, c, h, w] * along) / length
