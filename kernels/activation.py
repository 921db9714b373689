"""Rectified linear units (ReLU, and ReLU6 with upper=6), forward and backward."""

import numpy as np
from numba import njit, prange

from . import memory
from ._config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS


@njit(**JIT_OPTIONS)
def clamp(v, lower, upper):
    """min(v, upper) if v > lower else lower: the output rule of every kernel that can end in a ReLU.

    (lower, upper) = (-inf, inf) leaves a finite v as it is, (0, inf) is a ReLU and (0, 6) a ReLU6.
    One expression everywhere, so that a ReLU fused into a convolution or a batch norm is
    bit-identical to relu_forward run after it.
    """
    return min(v, upper) if v > lower else lower


def relu_forward(x, upper=np.inf):
    """y = min(max(x, 0), upper), elementwise (upper = inf: ReLU; 6: ReLU6).

    Shapes: x [...] C-contiguous -> y of the same shape (on recycled memory, kernels/memory.py:
    see _relu_forward).
    """
    y = memory.empty(x.shape, x.dtype)
    _relu_forward(x, float(upper), y)
    return y


@njit(**PARALLEL_JIT_OPTIONS)
def _relu_forward(x, upper, y):
    """relu_forward into y (x's shape). The drivers allocate every large output outside the kernels,
    on recycled memory: allocated inside, it was fresh pages from malloc on every call once other
    code in the process had made glibc hand its heap top back (docs/speed.md, page faults).
    Parallel: over elements; each writes its own output.
    """
    flat_x = x.reshape(x.size)
    flat_y = y.reshape(y.size)
    for i in prange(flat_x.size):
        flat_y[i] = clamp(flat_x[i], 0.0, upper)


def relu_backward_input(grad_out, x, upper=np.inf):
    """Gradient of the loss with respect to the ReLU's input.

    Shapes: grad_out, x [...] C-contiguous, same shape -> grad_x of that shape. x may be the ReLU's
            input or its output: both lie strictly inside (0, upper) at the same places.
    Gradient: dL/dx = dL/dy where 0 < x < upper, else 0 (torch's choice of 0 at the kinks).
    """
    grad_x = memory.empty(grad_out.shape, grad_out.dtype)
    _relu_backward_input(grad_out, x, float(upper), grad_x)
    return grad_x


@njit(**PARALLEL_JIT_OPTIONS)
def _relu_backward_input(grad_out, x, upper, grad_x):
    """relu_backward_input into grad_x (grad_out's shape; see _relu_forward).
    Parallel: over elements; each writes its own output.
    """
    flat_g = grad_out.reshape(grad_out.size)
    flat_x = x.reshape(x.size)
    flat_out = grad_x.reshape(grad_x.size)
    for i in prange(flat_g.size):
        flat_out[i] = flat_g[i] if 0 < flat_x[i] < upper else 0
