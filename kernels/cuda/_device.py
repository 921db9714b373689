"""Whether the numba.cuda twins can run here, and the one clear error when they cannot."""

from numba import cuda


def is_available():
    """True when a CUDA GPU and driver (or the simulator) can run the twins."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install raises instead of answering
        return False


def require():
    """Raise RuntimeError with what is missing when the twins cannot run here."""
    if not is_available():
        raise RuntimeError("device='cuda' needs an NVIDIA GPU with a working driver and numba's CUDA target "
                           "(pip install 'npanomaly[cuda]'); none is usable here. Use device='cpu', or set "
                           "NUMBA_ENABLE_CUDASIM=1 before importing numba to run the kernels in the simulator.")
