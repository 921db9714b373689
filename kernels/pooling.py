"""Max and average pooling over NCHW planes (torch.nn.MaxPool2d, torch.nn.AvgPool2d, ceil_mode=False).

Shapes used throughout: x [N, C, H, W] -> y [N, C, Ho, Wo] with Ho = (H + 2*pad_h - kh) // stride_h + 1.
Window (oh, ow) covers rows oh*sh - ph .. oh*sh - ph + kh - 1 (and likewise columns), clipped to the image.
Every kernel runs in parallel over the N*C planes: a window never leaves its plane, so the planes
are independent and the backward scatters of two iterations never touch the same element.
"""

import numpy as np
from numba import njit, prange

from ._config import PARALLEL_JIT_OPTIONS


def pool2d_output_size(in_size, kernel, stride, pad):
    """Length of the output along one axis (floor mode): (in + 2*pad - kernel) // stride + 1."""
    return (in_size + 2 * pad - kernel) // stride + 1


@njit(**PARALLEL_JIT_OPTIONS)
def max_pool2d_forward(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w):
    """Largest value of each window; padding never wins (it counts as -inf).

    Shapes: x [N, C, H, W] -> (y [N, C, Ho, Wo], argmax [N, C, Ho, Wo] int64).
    Math: y = max over the window's in-image elements; argmax = ih*W + iw of the first maximum in
          row-major window order (torch's tie rule), the index backward routes the gradient to.
    Parallel: over (n, c) planes.
    """
    batch, channels, height, width = x.shape
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    y = np.empty((batch, channels, out_h, out_w), dtype=x.dtype)
    argmax = np.empty((batch, channels, out_h, out_w), dtype=np.int64)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        for oh in range(out_h):
            h0 = max(oh * stride_h - pad_h, 0)
            h1 = min(oh * stride_h - pad_h + kernel_h, height)
            for ow in range(out_w):
                w0 = max(ow * stride_w - pad_w, 0)
                w1 = min(ow * stride_w - pad_w + kernel_w, width)
                best = x[n, c, h0, w0]
                best_index = h0 * width + w0
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        if x[n, c, ih, iw] > best:
                            best = x[n, c, ih, iw]
                            best_index = ih * width + iw
                y[n, c, oh, ow] = best
                argmax[n, c, oh, ow] = best_index
    return y, argmax


@njit(**PARALLEL_JIT_OPTIONS)
def max_pool2d_backward_input(grad_out, argmax, in_h, in_w):
    """Gradient of the loss with respect to the max-pool input.

    Shapes: grad_out, argmax [N, C, Ho, Wo] -> grad_x [N, C, in_h, in_w].
    Gradient: each dL/dy[n, c, oh, ow] goes to the element that won its window; an element that
              won several overlapping windows receives their sum, the others receive 0.
    Parallel: over (n, c) planes; argmax always points inside the same plane.
    """
    batch, channels, out_h, out_w = grad_out.shape
    grad_x = np.empty((batch, channels, in_h, in_w), dtype=grad_out.dtype)  # zeroed in the loop (PARALLEL_JIT_OPTIONS)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        plane = grad_x[n, c].reshape(in_h * in_w)
        for i in range(plane.size):
            plane[i] = 0.0
        for oh in range(out_h):
            for ow in range(out_w):
                plane[argmax[n, c, oh, ow]] += grad_out[n, c, oh, ow]
    return grad_x


@njit(**PARALLEL_JIT_OPTIONS)
def avg_pool2d_forward(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad):
    """Mean of each window.

    Shapes: x [N, C, H, W] -> y [N, C, Ho, Wo].
    Math: y = (sum of the window's in-image elements) / divisor, where divisor = kh*kw when
          count_include_pad (zeros of the padding count, torch's default and PatchCore's 3x3
          neighbourhood average in anomalib), else the number of in-image elements.
    Parallel: over (n, c) planes.
    """
    batch, channels, height, width = x.shape
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    y = np.empty((batch, channels, out_h, out_w), dtype=x.dtype)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        for oh in range(out_h):
            h0 = max(oh * stride_h - pad_h, 0)
            h1 = min(oh * stride_h - pad_h + kernel_h, height)
            for ow in range(out_w):
                w0 = max(ow * stride_w - pad_w, 0)
                w1 = min(ow * stride_w - pad_w + kernel_w, width)
                total = 0.0
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        total += x[n, c, ih, iw]
                divisor = kernel_h * kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
                y[n, c, oh, ow] = total / divisor
    return y


@njit(**PARALLEL_JIT_OPTIONS)
def avg_pool2d_backward_input(grad_out, in_h, in_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                              count_include_pad):
    """Gradient of the loss with respect to the average-pool input.

    Shapes: grad_out [N, C, Ho, Wo] -> grad_x [N, C, in_h, in_w].
    Gradient: every in-image element of window (oh, ow) receives dL/dy[n, c, oh, ow] / divisor,
              with the same divisor as the forward pass.
    Parallel: over (n, c) planes.
    """
    batch, channels, out_h, out_w = grad_out.shape
    grad_x = np.empty((batch, channels, in_h, in_w), dtype=grad_out.dtype)  # zeroed in the loop (PARALLEL_JIT_OPTIONS)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        plane = grad_x[n, c].reshape(in_h * in_w)
        for i in range(plane.size):
            plane[i] = 0.0
        for oh in range(out_h):
            h0 = max(oh * stride_h - pad_h, 0)
            h1 = min(oh * stride_h - pad_h + kernel_h, in_h)
            for ow in range(out_w):
                w0 = max(ow * stride_w - pad_w, 0)
                w1 = min(ow * stride_w - pad_w + kernel_w, in_w)
                divisor = kernel_h * kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
                share = grad_out[n, c, oh, ow] / divisor
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        grad_x[n, c, ih, iw] += share
    return grad_x
