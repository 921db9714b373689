"""Depthwise 2-D convolution (groups = channels, one filter per channel), as in MobileNet/EfficientNet.

A depthwise convolution does kh*kw multiply-adds per output value and reuses nothing across
channels, so it is memory-bound: direct loops beat im2col + a batch of 1-row GEMMs.

Shapes used throughout: x [N, C, H, W], weight [C, 1, kh, kw], y [N, C, Ho, Wo].
"""

import numpy as np
from numba import njit, prange

from ._config import PARALLEL_JIT_OPTIONS, REDUCTION_JIT_OPTIONS
from .activation import clamp
from .conv import U, _valid_outputs


@njit(**PARALLEL_JIT_OPTIONS)
def depthwise_conv2d_forward(x, weight, bias, stride_h, stride_w, pad_h, pad_w, out_h, out_w, lower=-np.inf,
                             upper=np.inf):
    """Each channel cross-correlated with its own filter, optionally then a ReLU.

    Shapes: x [N, C, H, W], weight [C, 1, kh, kw], bias [C] (zeros for none) -> y [N, C, out_h, out_w].
    Math: y[n, c, oh, ow] = bias[c] + sum_{i,j} weight[c, 0, i, j] * x[n, c, oh*sh - ph + i, ow*sw - pw + j]
          (x taken as 0 outside the image). pad_h/pad_w are the zeros before the image; the output
          size is given, so the zeros after it may differ (TensorFlow's asymmetric "same" padding
          needs no padded copy of the input). Symmetric padding: out = (H + 2*ph - kh) // sh + 1.
          Then each plane, still in cache, is clamped (activation.clamp: (0, inf) ReLU, (0, 6) ReLU6,
          (-inf, inf) nothing).
    Parallel: over (n, c) planes.
    """
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    y = np.empty((batch, channels, out_h, out_w), dtype=x.dtype)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        plane = y[n, c]
        plane[:] = bias[c]
        for i in range(kernel_h):
            oh_lo, oh_hi = _valid_outputs(out_h, height, stride_h, pad_h, i)
            for j in range(kernel_w):
                ow_lo, ow_hi = _valid_outputs(out_w, width, stride_w, pad_w, j)
                w = weight[c, 0, i, j]
                for oh in range(oh_lo, oh_hi):
                    line = x[n, c, oh * stride_h - pad_h + i]
                    out_line = plane[oh]
                    for ow in range(ow_lo, ow_hi):
                        out_line[U(ow)] += w * line[U(ow * stride_w - pad_w + j)]
        if lower > -np.inf or upper < np.inf:
            for oh in range(out_h):
                out_line = plane[oh]
                for ow in range(out_w):
                    out_line[U(ow)] = clamp(out_line[U(ow)], lower, upper)
    return y


@njit(**PARALLEL_JIT_OPTIONS)
def depthwise_conv2d_backward_input(grad_out, weight, in_h, in_w, stride_h, stride_w, pad_h, pad_w):
    """Gradient of the loss with respect to the depthwise convolution's input.

    Shapes: grad_out [N, C, Ho, Wo], weight [C, 1, kh, kw] -> grad_x [N, C, in_h, in_w].
    Gradient: dL/dx[n, c, oh*sh - ph + i, ow*sw - pw + j] += weight[c, 0, i, j] * dL/dy[n, c, oh, ow].
    Parallel: over (n, c) planes; each scatters only into its own plane.
    """
    batch, channels, out_h, out_w = grad_out.shape
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    grad_x = np.empty((batch, channels, in_h, in_w), dtype=grad_out.dtype)  # zeroed in the loop (PARALLEL_JIT_OPTIONS)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        plane = grad_x[n, c]
        for ih in range(in_h):
            for iw in range(in_w):
                plane[ih, iw] = 0.0
        for i in range(kernel_h):
            oh_lo, oh_hi = _valid_outputs(out_h, in_h, stride_h, pad_h, i)
            for j in range(kernel_w):
                ow_lo, ow_hi = _valid_outputs(out_w, in_w, stride_w, pad_w, j)
                w = weight[c, 0, i, j]
                for oh in range(oh_lo, oh_hi):
                    line = plane[oh * stride_h - pad_h + i]
                    grad_line = grad_out[n, c, oh]
                    for ow in range(ow_lo, ow_hi):
                        line[U(ow * stride_w - pad_w + j)] += w * grad_line[U(ow)]
    return grad_x


@njit(**REDUCTION_JIT_OPTIONS)
def depthwise_conv2d_backward_weight(grad_out, x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """Gradient of the loss with respect to the depthwise filters (float64 sums).

    Shapes: grad_out [N, C, Ho, Wo], x [N, C, H, W] -> grad_weight [C, 1, kh, kw].
    Gradient: dL/dweight[c, 0, i, j] = sum_{n, oh, ow} dL/dy[n, c, oh, ow] * x[n, c, oh*sh - ph + i, ow*sw - pw + j].
    Parallel: over channels; each owns its own filter.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    grad_weight = np.empty((channels, 1, kernel_h, kernel_w), dtype=grad_out.dtype)
    for c in prange(channels):
        for i in range(kernel_h):
            oh_lo, oh_hi = _valid_outputs(out_h, height, stride_h, pad_h, i)
            for j in range(kernel_w):
                ow_lo, ow_hi = _valid_outputs(out_w, width, stride_w, pad_w, j)
                total = 0.0
                for n in range(batch):
                    for oh in range(oh_lo, oh_hi):
                        line = x[n, c, oh * stride_h - pad_h + i]
                        grad_line = grad_out[n, c, oh]
                        for ow in range(ow_lo, ow_hi):
                            total += grad_line[U(ow)] * line[U(ow * stride_w - pad_w + j)]
                grad_weight[c, 0, i, j] = total
    return grad_weight
