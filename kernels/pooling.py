"""Max and average pooling over NCHW planes (torch.nn.MaxPool2d, torch.nn.AvgPool2d, ceil_mode=False).

Shapes used throughout: x [N, C, H, W] -> y [N, C, Ho, Wo] with Ho = (H + 2*pad_h - kh) // stride_h + 1.
Window (oh, ow) covers rows oh*sh - ph .. oh*sh - ph + kh - 1 (and likewise columns), clipped to the image.

A window never leaves its plane, so the N*C planes are independent and the backward scatters of
two planes never touch the same element. Each operation is therefore a serial kernel on one plane
(the ``_plane`` functions below, where the math is), and one parallel loop, pool2d_planes, runs
any of the four on every plane. (Four parallel kernels, one per operation, had cost 6.7 s of the
cold compile for float32 and float64; a parallel loop costs ~0.55 s more to compile than the same
loop serial, whatever it holds.)
"""

import numpy as np
from numba import njit, prange

from . import memory
from ._config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS

MAX_FORWARD, MAX_BACKWARD, AVG_FORWARD, AVG_BACKWARD = 0, 1, 2, 3


def pool2d_output_size(in_size, kernel, stride, pad):
    """Length of the output along one axis (floor mode): (in + 2*pad - kernel) // stride + 1."""
    return (in_size + 2 * pad - kernel) // stride + 1


@njit(**JIT_OPTIONS)
def _window(out_index, kernel, stride, pad, size):
    """(first, stop): the in-image rows (or columns) of window out_index along one axis."""
    start = out_index * stride - pad
    return max(start, 0), min(start + kernel, size)


@njit(**JIT_OPTIONS)
def _max_forward_plane(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, y, argmax):
    """Largest value of each window; padding never wins (it counts as -inf).

    Shapes: x [H, W] -> y [Ho, Wo], argmax [Ho, Wo] int64 or [0, 0] (not wanted: evaluation),
    written in place.
    Math: y = max over the window's in-image elements; argmax = ih*W + iw of the first maximum in
          row-major window order (torch's tie rule), the index backward routes the gradient to.
    """
    height, width = x.shape
    out_h, out_w = y.shape
    with_argmax = argmax.shape[0] > 0
    for oh in range(out_h):
        h0, h1 = _window(oh, kernel_h, stride_h, pad_h, height)
        for ow in range(out_w):
            w0, w1 = _window(ow, kernel_w, stride_w, pad_w, width)
            best = x[h0, w0]
            best_index = h0 * width + w0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    if x[ih, iw] > best:
                        best = x[ih, iw]
                        best_index = ih * width + iw
            y[oh, ow] = best
            if with_argmax:
                argmax[oh, ow] = best_index


@njit(**JIT_OPTIONS)
def _max_backward_plane(grad_out, argmax, grad_x):
    """Gradient of the loss with respect to the max-pool input.

    Shapes: grad_out, argmax [Ho, Wo] -> grad_x [H, W] (written in place).
    Gradient: each dL/dy[oh, ow] goes to the element that won its window; an element that won
              several overlapping windows receives their sum, the others receive 0.
    """
    width = grad_x.shape[1]
    for ih in range(grad_x.shape[0]):
        for iw in range(width):
            grad_x[ih, iw] = 0.0
    for oh in range(grad_out.shape[0]):
        for ow in range(grad_out.shape[1]):
            index = argmax[oh, ow]
            grad_x[index // width, index % width] += grad_out[oh, ow]


@njit(**JIT_OPTIONS)
def _avg_forward_plane(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad, y):
    """Mean of each window.

    Shapes: x [H, W] -> y [Ho, Wo] (written in place).
    Math: y = (sum of the window's in-image elements) / divisor, where divisor = kh*kw when
          count_include_pad (zeros of the padding count, torch's default and PatchCore's 3x3
          neighbourhood average in anomalib), else the number of in-image elements.
    """
    height, width = x.shape
    out_h, out_w = y.shape
    for oh in range(out_h):
        h0, h1 = _window(oh, kernel_h, stride_h, pad_h, height)
        for ow in range(out_w):
            w0, w1 = _window(ow, kernel_w, stride_w, pad_w, width)
            total = 0.0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    total += x[ih, iw]
            divisor = kernel_h * kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
            y[oh, ow] = total / divisor


@njit(**JIT_OPTIONS)
def _avg_backward_plane(grad_out, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad, grad_x):
    """Gradient of the loss with respect to the average-pool input.

    Shapes: grad_out [Ho, Wo] -> grad_x [H, W] (written in place).
    Gradient: every in-image element of window (oh, ow) receives dL/dy[oh, ow] / divisor, with the
              same divisor as the forward pass.
    """
    in_h, in_w = grad_x.shape
    for ih in range(in_h):
        for iw in range(in_w):
            grad_x[ih, iw] = 0.0
    for oh in range(grad_out.shape[0]):
        h0, h1 = _window(oh, kernel_h, stride_h, pad_h, in_h)
        for ow in range(grad_out.shape[1]):
            w0, w1 = _window(ow, kernel_w, stride_w, pad_w, in_w)
            divisor = kernel_h * kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
            share = grad_out[oh, ow] / divisor
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    grad_x[ih, iw] += share


@njit(**PARALLEL_JIT_OPTIONS)
def pool2d_planes(operation, source, indices, target, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                  count_include_pad):
    """One pooling operation on every (n, c) plane: MAX_FORWARD (source x -> target y, indices the
    argmax, written), MAX_BACKWARD (source dL/dy, indices the argmax -> target dL/dx), AVG_FORWARD
    (x -> y) or AVG_BACKWARD (dL/dy -> dL/dx); the average pool leaves ``indices`` (then
    [N, C, 0, 0]) alone. The window parameters are unused by MAX_BACKWARD.

    Shapes: source [N, C, ., .], indices [N, C, ., .] int64, target [N, C, ., .], all C-contiguous.
    Parallel: over the N*C planes, each read and written by one iteration.
    """
    batch, channels = source.shape[:2]
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        if operation == MAX_FORWARD:
            _max_forward_plane(source[n, c], kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, target[n, c],
                               indices[n, c])
        elif operation == MAX_BACKWARD:
            _max_backward_plane(source[n, c], indices[n, c], target[n, c])
        elif operation == AVG_FORWARD:
            _avg_forward_plane(source[n, c], kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad,
                               target[n, c])
        else:
            _avg_backward_plane(source[n, c], kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                count_include_pad, target[n, c])


def _run(operation, source, indices, target, window=(1, 1, 1, 1, 0, 0), count_include_pad=False):
    """pool2d_planes with one type per argument (C-contiguous arrays, int64 sizes, a bool), so it
    compiles once per dtype."""
    pool2d_planes(operation, source, indices, target, *(np.int64(v) for v in window), np.bool_(count_include_pad))
    return target


def _no_indices(x):
    return np.empty((x.shape[0], x.shape[1], 0, 0), np.int64)


def max_pool2d_forward(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, with_argmax=True):
    """Max pooling: (y [N, C, Ho, Wo], argmax [N, C, Ho, Wo] int64), argmax = ih*W + iw of each
    window's first maximum (_max_forward_plane); argmax None unless with_argmax (evaluation:
    only the backward pass reads it, and it is twice y's size in memory). y and argmax are on
    recycled memory (kernels/memory.py)."""
    x = np.ascontiguousarray(x)
    batch, channels, height, width = x.shape
    shape = (batch, channels, pool2d_output_size(height, kernel_h, stride_h, pad_h),
             pool2d_output_size(width, kernel_w, stride_w, pad_w))
    argmax = memory.empty(shape, np.int64) if with_argmax else _no_indices(x)
    y = _run(MAX_FORWARD, x, argmax, memory.empty(shape, x.dtype),
             (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w))
    return y, (argmax if with_argmax else None)


def max_pool2d_backward_input(grad_out, argmax, in_h, in_w):
    """dL/dx [N, C, in_h, in_w] of max pooling from dL/dy and the forward pass's argmax
    (_max_backward_plane)."""
    grad_out, argmax = np.ascontiguousarray(grad_out), np.ascontiguousarray(argmax, np.int64)
    if argmax.shape != grad_out.shape or grad_out.ndim != 4:
        raise ValueError(f"argmax must have grad_out's shape [N, C, Ho, Wo] {grad_out.shape}, got {argmax.shape}")
    grad_x = memory.empty((*grad_out.shape[:2], in_h, in_w), grad_out.dtype)
    return _run(MAX_BACKWARD, grad_out, argmax, grad_x)


def avg_pool2d_forward(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad):
    """Average pooling: y [N, C, Ho, Wo] (_avg_forward_plane)."""
    x = np.ascontiguousarray(x)
    batch, channels, height, width = x.shape
    y = np.empty((batch, channels, pool2d_output_size(height, kernel_h, stride_h, pad_h),
                  pool2d_output_size(width, kernel_w, stride_w, pad_w)), x.dtype)
    return _run(AVG_FORWARD, x, _no_indices(x), y, (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w),
                count_include_pad)


def avg_pool2d_backward_input(grad_out, in_h, in_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                              count_include_pad):
    """dL/dx [N, C, in_h, in_w] of average pooling (_avg_backward_plane)."""
    grad_out = np.ascontiguousarray(grad_out)
    grad_x = np.empty((*grad_out.shape[:2], in_h, in_w), grad_out.dtype)
    return _run(AVG_BACKWARD, grad_out, _no_indices(grad_out), grad_x,
                (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w), count_include_pad)
