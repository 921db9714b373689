"""What every benchmark script shares: one thread count for everyone, and medians of repeated runs.

``use_threads`` must run before NumPy is imported: BLAS libraries read their thread variables once,
when they load.
"""

import os
import statistics
import time


def use_threads(threads):
    """Give NumPy's BLAS, Numba, OpenMP (torch, faiss) and MKL the same number of threads."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[variable] = str(threads)
    # what `import npanomaly` sets; here too, because a benchmark may load torch's OpenMP first
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def median_time(function, repeats, warm_up=True):
    """Median wall time of function() over repeats runs, after one untimed run (compilation, caches)."""
    return median_times([function], repeats, warm_up)[0]


def median_times(functions, repeats, warm_up=True):
    """Median wall time of each function, timed in turns (a, b, a, b, ...) after one untimed run of each.

    Taking turns spreads a noisy machine's slow stretches (another tenant, the kernel compacting
    memory for huge pages) over every contender; timing all runs of one before the other let a
    single stretch swing a ratio by 2x here.
    """
    if warm_up:
        for function in functions:
            function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]
