"""Hypothesis strategies for consistent layer cases: shapes, kernels, strides and paddings that fit."""

import numpy as np
from hypothesis import strategies as st


@st.composite
def window_cases(draw, max_batch=3, max_channels=4, max_size=9, max_stride=3, max_pad=2, pool=False):
    """(x_shape, kernel, stride, pad) with kernel <= padded input, so at least one output exists.

    Pooling additionally needs padding <= kernel / 2 (torch's rule), which is drawn after the kernel.
    Covers 1x1 images, kernels exactly the padded input's size, strides larger than the kernel.
    """
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    h = draw(st.integers(1, max_size))
    w = draw(st.integers(1, max_size))
    kernel, stride, pad = [], [], []
    for size in (h, w):
        p = draw(st.integers(0, max_pad))
        k = draw(st.integers(max(1, 2 * p if pool else 1), size + 2 * p))
        kernel.append(k)
        stride.append(draw(st.integers(1, max_stride)))
        pad.append(p)
    return (n, c, h, w), tuple(kernel), tuple(stride), tuple(pad)


def random_array(seed, shape, dtype=np.float64, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)
