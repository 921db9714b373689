"""Whole-array checks used at the public boundary."""

import numpy as np
from numba import njit, prange

from ._config import PARALLEL_JIT_OPTIONS


@njit(**PARALLEL_JIT_OPTIONS)
def all_finite(x):
    """True when no element of x is NaN or infinite.

    Shapes: x [...] C-contiguous -> bool. Unlike np.isfinite(x).all() it allocates nothing.
    Parallel: a sum reduction over elements (numba gives each thread its own partial count).
    """
    flat = x.reshape(x.size)
    bad = 0
    for i in prange(flat.size):
        if not np.isfinite(flat[i]):
            bad += 1
    return bad == 0
