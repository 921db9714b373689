"""Bilinear resizing and separable Gaussian blur of NCHW maps (anomaly maps, multi-layer features)."""

import numpy as np
from numba import njit, prange

from ._config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS


@njit(**JIT_OPTIONS)
def _source_index(dst, scale, in_size):
    """torch's align_corners=False mapping: src = (dst + 0.5) * in/out - 0.5, clamped at 0.

    Returns (i0, i1, weight of i1).
    """
    src = (dst + 0.5) * scale - 0.5
    if src < 0.0:
        src = 0.0
    i0 = min(int(src), in_size - 1)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    return i0, i1, src - i0


@njit(**PARALLEL_JIT_OPTIONS)
def bilinear_resize(x, out_h, out_w):
    """Resize every plane bilinearly, as torch.nn.functional.interpolate(mode="bilinear", align_corners=False).

    Shapes: x [N, C, H, W] -> [N, C, out_h, out_w].
    Math: y[oh, ow] = (1-a)(1-b) x[h0, w0] + (1-a) b x[h0, w1] + a (1-b) x[h1, w0] + a b x[h1, w1]
          with (h0, h1, a) and (w0, w1, b) from the half-pixel source mapping above.
    Parallel: over (n, c) planes.
    """
    batch, channels, height, width = x.shape
    y = np.empty((batch, channels, out_h, out_w), dtype=x.dtype)
    scale_h = height / out_h
    scale_w = width / out_w
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        for oh in range(out_h):
            h0, h1, a = _source_index(oh, scale_h, height)
            for ow in range(out_w):
                w0, w1, b = _source_index(ow, scale_w, width)
                top = (1.0 - b) * x[n, c, h0, w0] + b * x[n, c, h0, w1]
                bottom = (1.0 - b) * x[n, c, h1, w0] + b * x[n, c, h1, w1]
                y[n, c, oh, ow] = (1.0 - a) * top + a * bottom
    return y


@njit(**JIT_OPTIONS)
def _reflect(index, size):
    """Mirror an out-of-range index back inside [0, size), edge not repeated (torch's "reflect" padding).

    Unlike torch it also folds indices more than one image away, so any kernel fits any image.
    """
    if size == 1:
        return 0
    period = 2 * (size - 1)
    index = abs(index) % period
    return period - index if index >= size else index


def gaussian_kernel1d(sigma):
    """Normalised 1-D Gaussian taps, radius int(4 sigma + 0.5) (anomalib's kernel size 2*radius + 1)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


@njit(**PARALLEL_JIT_OPTIONS)
def _blur_rows_then_columns(x, taps):
    batch, channels, height, width = x.shape
    radius = taps.size // 2
    y = np.empty_like(x)
    for job in prange(batch * channels):
        n = job // channels
        c = job % channels
        rows = np.empty((height, width), dtype=np.float64)
        for h in range(height):
            for w in range(width):
                total = 0.0
                for t in range(taps.size):
                    total += taps[t] * x[n, c, h, _reflect(w + t - radius, width)]
                rows[h, w] = total
        for h in range(height):
            for w in range(width):
                total = 0.0
                for t in range(taps.size):
                    total += taps[t] * rows[_reflect(h + t - radius, height), w]
                y[n, c, h, w] = total
    return y


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of every plane with reflect padding (anomalib's GaussianBlur2d).

    Shapes: x [N, C, H, W] -> same shape.
    Math: y = g * (g * x along rows) along columns, g = gaussian_kernel1d(sigma), a 2-D Gaussian
          factorised into two 1-D passes (2 (2r+1) instead of (2r+1)^2 multiplies per pixel).
    Parallel: over (n, c) planes.
    """
    return _blur_rows_then_columns(x, gaussian_kernel1d(sigma))


