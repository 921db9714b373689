"""The one boundary where user input is checked, converted and made contiguous.

Kernels assume clean input; every public entry point funnels its arguments through these helpers,
so a bad argument fails here with a message that names it, and never as a Numba typing error deep
inside a kernel.
"""

import numbers

import numpy as np

from npanomaly.kernels import all_below, all_finite

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Bounds that keep a model's allocations survivable whatever a config file says (issue 13). Each is
# far beyond what any of the supported networks uses; docs/bad-input.md lists them.
MAX_IMAGE_SIZE = 4096     # pixels per side of the images a detector is fitted on
MAX_WIDTH = 8192          # channels of a seed network, target_dim, projection_dim
MAX_BATCH_SIZE = 1024     # images per pass
MAX_NEIGHBORS = 1024      # num_neighbors of Eq. 7
MAX_BLUR_SIGMA = 256.0    # pixels
MAX_ABS_VALUE = 1e8       # any saved parameter, statistic or memory-bank value (Lite0's largest: 566)


def pair(value, name):
    """An int or a pair of ints -> a tuple of two Python ints (torch's convention for sizes)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_positive_int(value, name, minimum=1, maximum=None):
    """A Python or NumPy integer in [minimum, maximum], returned as int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_nonnegative_float(value, name, maximum=None):
    """A real number (Python or NumPy) in [0, maximum], returned as float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not value >= 0.0 or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_fraction(value, name):
    """A real number (Python or NumPy scalar) in (0, 1], returned as float: ratios and quantiles."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_image_size(size, name, minimum, what):
    """A pair of ints (height, width), each in [minimum, MAX_IMAGE_SIZE]; what names the reason
    for the minimum (the backbone's deepest stage). Returned as a tuple of ints."""
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        raise ValueError(f"{name} must be a pair of ints (height, width), got {size!r}")
    height, width = (int(v) for v in size)
    if min(height, width) < minimum:
        raise ValueError(f"{name}: images of {height}x{width}, but {what} needs at least {minimum}x{minimum}")
    if max(height, width) > MAX_IMAGE_SIZE:
        raise ValueError(f"{name}: images of {height}x{width}, larger than the {MAX_IMAGE_SIZE} pixels per side "
                         "that npanomaly accepts (resize them first)")
    return height, width


def check_state(state, what):
    """Refuse saved parameters and statistics that would make a model silently wrong.

    state: {name: array}. Every value must be finite and within +-MAX_ABS_VALUE, batch-norm
    variances (``running_var``) >= 0 and counters (``num_batches_tracked``) >= 0.
    """
    for name, value in state.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fiub":
            raise ValueError(f"{what} {name!r} has dtype {value.dtype}, not a number")
        if value.size == 0:
            continue
        if value.dtype in FLOAT_DTYPES:  # the allocation-free kernels: a memory bank may be gigabytes
            value = np.ascontiguousarray(value)
            finite, within = all_finite(value), all_below(value, MAX_ABS_VALUE)
        else:  # integers, booleans and other float widths: small arrays, plain NumPy
            finite = value.dtype.kind != "f" or bool(np.isfinite(value).all())
            within = False
        if not finite:
            raise ValueError(f"{what} {name!r} contains NaN or infinite values")
        largest = 0.0 if within else float(np.abs(value.astype(np.float64)).max())
        if largest > MAX_ABS_VALUE:
            raise ValueError(f"{what} {name!r} holds a value of magnitude {largest:.3g}, beyond the "
                             f"{MAX_ABS_VALUE:.0e} that any trained network has")
        if name.endswith(("running_var", "num_batches_tracked")) and value.min() < 0:
            raise ValueError(f"{what} {name!r} is negative ({value.min():.3g}); a variance or count never is")


def check_float_dtype(dtype, name="dtype"):
    """float32 or float64 as a np.dtype; anything else is refused."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from error
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_array(x, name, ndim, dtype=None, keep_channels_last=False):
    """An ndarray of float32/float64 with ndim dimensions, returned C-contiguous (or, with
    ``keep_channels_last``, as it is where it is an [N, C, H, W] view of a C-contiguous
    [N, H, W, C] array: what Winograd layers hand to each other).

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
    if keep_channels_last and ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous:
        return x
    return np.ascontiguousarray(x)


def check_batch(x, name, channels=None, dtype=None, keep_channels_last=False):
    """An NCHW batch: 4 dimensions, at least one image, the expected channel count, non-zero size."""
    x = check_array(x, name, 4, dtype, keep_channels_last)
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
