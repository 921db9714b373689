"""npanomaly: visual anomaly detection in NumPy and Numba, every step readable.

Layers with hand-written backward passes live in ``npanomaly.nn`` and ``npanomaly.optim``; the Numba
kernels under them in ``npanomaly.kernels``.
"""

from npanomaly import kernels, nn, optim

__version__ = "0.1.0"

__all__ = ["__version__", "kernels", "nn", "optim"]
