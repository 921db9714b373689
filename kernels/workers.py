"""One pool of threads for kernels that interleave Numba loops with BLAS products.

Why: the Winograd convolution alternates three steps, a Numba loop (the input transform), BLAS
products and a Numba loop (the output transform). Run as a parallel loop, a multi-threaded product
and another parallel loop, the three steps run on two thread pools that take turns (GNU OpenMP's
under Numba, OpenBLAS's), each product waits for its slowest thread, and each pool's idle threads
spin on the cores the other needs next (docs/threads.md: with torch imported first, libgomp's spin
cannot be shortened). Measured on ResNet-18's and WideResNet-50's 3x3 layers (batch 8, 2 threads),
the products alone then ran at 30-100 GFLOP/s and took as long as torch's whole convolution.

Instead, ``run_blocks`` and ``run_shares`` cut the work into blocks and run each block from start
to end on one thread: Numba kernels compiled without ``parallel`` (they release the GIL) and BLAS
products that run on the calling thread only (``threads.single_threaded_blas``). A block's data
then stays in that core's cache from transform to product to transform, no thread waits for
another until the end, and no pool spins: the pool's idle threads sleep on a queue. The calling
thread is one of the threads, so one thread needs no pool at all.
"""

import concurrent.futures
import itertools
import os

import numba
import numpy as np

from npanomaly import threads

_pool = {"pid": None, "executor": None}


def _executor():
    """The process's pool of NUMBA_NUM_THREADS - 1 threads (made again in a forked child, which
    inherits the object but not its threads)."""
    if _pool["pid"] != os.getpid():
        _pool["executor"] = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1), thread_name_prefix="npanomaly-kernels")
        _pool["pid"] = os.getpid()
    return _pool["executor"]


def _on_threads(thread, count):
    """thread(k) for k < count, k = 0 on the calling thread and the others on the pool, with BLAS
    single-threaded; returns when all have ended, then raises the first error any of them raised
    (the others have ended by then: they write into the caller's arrays)."""
    with threads.single_threaded_blas():
        futures = [_executor().submit(thread, k) for k in range(1, count)]
        try:
            thread(0)
        finally:
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()


def thread_count(jobs):
    """How many threads a kernel splits ``jobs`` independent jobs over: Numba's thread count for
    the calling thread (what ``threads.share_cores`` narrows on a busy machine), at most ``jobs``."""
    return max(1, min(numba.get_num_threads(), jobs))


def run_blocks(worker, total, block):
    """Run range(total) in blocks [b * block, min(total, (b + 1) * block)) on thread_count threads:
    worker(k) prepares thread k (its buffers) and returns run(first, stop), and each thread takes
    the next block not yet taken until none is left. A thread that runs slower (a core shared with
    another process, or with another pool's spinning threads) takes fewer blocks instead of
    holding up the others. The blocks are fixed, so only for jobs whose results do not depend on
    the thread that runs them (each block writes its own outputs)."""
    blocks = -(-total // block)
    claims = itertools.count()  # next() on it is atomic under the GIL

    def thread(k):
        run = worker(k)
        for index in iter(claims.__next__, None):
            if index >= blocks:
                return
            run(index * block, min(total, (index + 1) * block))

    _on_threads(thread, thread_count(blocks))


def run_shares(work, total):
    """work(k, first, stop) for thread_count(total) contiguous shares of range(total), sizes within
    one, in parallel: for work whose result depends on how the jobs are split (sums), which is then
    the same on every call with the same thread count."""
    shares = thread_count(total)
    bounds = np.linspace(0, total, shares + 1).round().astype(np.int64)
    _on_threads(lambda k: work(k, bounds[k], bounds[k + 1]), shares)
