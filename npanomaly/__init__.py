"""npanomaly: visual anomaly detection in NumPy and Numba, every step readable.

Layers with hand-written backward passes live in ``npanomaly.nn`` and ``npanomaly.optim``; the Numba
kernels under them in ``npanomaly.kernels``.
"""

from npanomaly import threads

# Short spins for the two thread pools the kernels alternate between (OpenBLAS's and GNU OpenMP's),
# before NumPy's BLAS or Numba's parallel loops run: on a small machine each pool's spinning idle
# threads steal the cores the other needs next (20-30% slower convolutions on 2 cores). Works at run
# time whatever was imported first, except a libgomp that torch loaded before us; see threads.py.
threads.configure()

from npanomaly import kernels, nn, optim, search  # noqa: E402
from npanomaly.detector import AnomalyResult, load  # noqa: E402
from npanomaly.patchcore import PatchCore  # noqa: E402
from npanomaly.student_teacher import StudentTeacher  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AnomalyResult", "PatchCore", "StudentTeacher", "__version__", "kernels", "load", "nn", "optim", "search",
           "threads"]
