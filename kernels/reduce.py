"""Reductions: the finiteness check at the public boundary, the squared-difference loss and its map."""

import numpy as np
from numba import njit, prange

from ._config import JIT_OPTIONS, LOSS_SHARES, REDUCTION_JIT_OPTIONS
from .conv import _share


@njit(**JIT_OPTIONS)
def all_below(x, bound):
    """True when every |x_i| < bound; NaN never is (so all_below(x, inf) means "all finite").

    Shapes: x [...] C-contiguous, bound float -> bool. Unlike np.abs(x).max() it allocates nothing.
    Serial: the count vectorises, and the check runs once per call on its inputs (a batch of
    8 x 3 x 256 x 256 images in 0.17 ms, 0.10 as a parallel loop, which cost 0.9 s of cold compile).
    """
    flat = x.reshape(x.size)
    bad = 0
    for i in range(flat.size):
        if not abs(flat[i]) < bound:
            bad += 1
    return bad == 0


def all_finite(x):
    """True when no element of x is NaN or infinite (allocates nothing where x is contiguous in
    some order, as a channels-last view is: it is read in memory order)."""
    if not x.flags.c_contiguous:
        x = np.ravel(x, order="K")
    return all_below(x, np.inf)


@njit(**REDUCTION_JIT_OPTIONS)
def squared_difference_loss(prediction, target, grad_scale):
    """The sum of squared differences and its gradient, in one pass.

    Shapes: prediction, target [...] C-contiguous, same shape -> (total float64, grad like prediction).
    Math: total = sum (p - t)^2, accumulated in float64; grad = grad_scale * (p - t).
    Gradient: d(scale/2 * total)/dp = scale * (p - t); with grad_scale = 2/n the gradient of the
    mean squared difference, which Student-Teacher's loss is.
    Parallel: over LOSS_SHARES contiguous shares of the elements, each summed on one thread, the
    shares' sums then added in order. A prange reduction (each thread its own partial sum) made
    the total depend on the thread count, which threads.share_cores() narrows when other
    processes keep a core busy: the same seeded fit then reported a loss differing in its last bit.
    """
    p = prediction.reshape(prediction.size)
    t = target.reshape(target.size)
    grad = np.empty_like(p)
    partial = np.empty(LOSS_SHARES)
    for share in prange(LOSS_SHARES):
        first, stop = _share(p.size, LOSS_SHARES, share)
        acc = 0.0
        for i in range(first, stop):
            diff = p[np.uint64(i)] - t[np.uint64(i)]  # unsigned: no wrap-around test, so it vectorises
            grad[np.uint64(i)] = grad_scale * diff
            acc += np.float64(diff) * diff
        partial[share] = acc
    total = 0.0
    for share in range(LOSS_SHARES):
        total += partial[share]
    return total, grad.reshape(prediction.shape)


@njit(**REDUCTION_JIT_OPTIONS)
def channel_mean_squared_difference(a, b):
    """The mean over channels of the squared difference at every position (Student-Teacher's anomaly map).

    Shapes: a, b [N, C, H, W] C-contiguous -> [N, H, W] float64.
    Math: out[n, h, w] = (1/C) sum_c (a - b)[n, c, h, w]^2, the difference in the inputs' dtype (as
          the loss takes it) and the squares summed in float64. One pass over both inputs, where
          the NumPy expression made three temporaries, one of them a float64 copy.
    Parallel: over (n, h) rows of the output.
    """
    batch, channels, height, width = a.shape
    out = np.empty((batch, height, width), dtype=np.float64)  # zeroed in the loop (PARALLEL_JIT_OPTIONS)
    for job in prange(batch * height):
        n = job // height
        h = job % height
        row = out[n, h]
        for w in range(width):
            row[w] = 0.0
        for c in range(channels):
            a_line = a[n, c, h]
            b_line = b[n, c, h]
            for w in range(width):
                d = np.float64(a_line[w] - b_line[w])
                row[w] += d * d
        for w in range(width):
            row[w] /= channels
    return out
