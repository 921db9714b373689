"""The one boundary where user input is checked, converted and made contiguous.

Kernels assume clean input; every public entry point funnels its arguments through these helpers,
so a bad argument fails here with a message that names it, and never as a Numba typing error deep
inside a kernel.
"""

import numbers

import numpy as np

from npanomaly.kernels import all_finite

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def pair(value, name):
    """An int or a pair of ints -> a tuple of two Python ints (torch's convention for sizes)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_positive_int(value, name, minimum=1):
    """A Python or NumPy integer >= minimum, returned as int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_nonnegative_float(value, name):
    """A real number >= 0, returned as float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not value >= 0.0 or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_float_dtype(dtype, name="dtype"):
    """float32 or float64 as a np.dtype; anything else is refused."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from error
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_array(x, name, ndim, dtype=None):
    """An ndarray of float32/float64 with ndim dimensions, returned C-contiguous.

    With dtype given the array must already have it: converting silently would hide a precision
    change the caller did not ask for.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}; "
            f"convert the input with .astype(np.{dtype}) or the layer with .to(np.{x.dtype})"
        )
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def check_batch(x, name, channels=None, dtype=None):
    """An NCHW batch: 4 dimensions, at least one image, the expected channel count, non-zero size."""
    x = check_array(x, name, 4, dtype)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: shape {x.shape}, expected at least one image")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (shape [N, {channels}, H, W]), got shape {x.shape}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} has a zero-sized spatial dimension: shape {x.shape}")
    return x


def check_finite(x, name):
    """Refuse NaN and infinity: one of them would silently turn every later number into NaN."""
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_fitted(model, attribute):
    """RuntimeError when a model is used before fit() (or load()) set its learned state."""
    if getattr(model, attribute, None) is None:
        raise RuntimeError(f"{type(model).__name__} is not fitted yet: call fit() (or load a saved model) first")
