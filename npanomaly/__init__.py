"""npanomaly: visual anomaly detection in NumPy and Numba, every step readable.

Layers with hand-written backward passes live in ``npanomaly.nn`` and ``npanomaly.optim``; the Numba
kernels under them in ``npanomaly.kernels``.
"""

import os
import sys

if "numpy" not in sys.modules:
    # NumPy's OpenBLAS keeps its worker threads spinning for ~0.1 s after every matrix product. The
    # convolutions alternate BLAS products with Numba loops, and on a small machine the spinning
    # threads steal the cores those loops need (measured: 25% slower convolutions on 2 cores).
    # The variable is read once, when NumPy loads OpenBLAS, so it only helps when npanomaly is
    # imported first; a value the user set is left alone. See README, "Speed".
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# The mirror image: after each parallel loop, Numba's OpenMP workers (GNU libgomp) spin for up to
# 300,000 pause instructions (milliseconds on recent Xeons) and steal the cores of the BLAS product
# that follows. 10,000 keeps a short spin for back-to-back loops; measured 20-30% faster
# convolutions on 2 cores and no change in torch's (which shares the library when loaded after it).
# libgomp reads it when it loads, at the first parallel loop, so setting it here is in time unless
# an OpenMP library was already loaded; a value the user set is left alone.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from npanomaly import kernels, nn, optim, search  # noqa: E402
from npanomaly.detector import AnomalyResult, load  # noqa: E402
from npanomaly.patchcore import PatchCore  # noqa: E402
from npanomaly.student_teacher import StudentTeacher  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AnomalyResult", "PatchCore", "StudentTeacher", "__version__", "kernels", "load", "nn", "optim", "search"]
