"""What every benchmark script shares: one thread count for everyone, the import order a user's
script has, a report of the thread pools that ran, and medians of repeated runs.

``use_threads`` must run before NumPy is imported: BLAS libraries read their thread counts once,
when they load. It sets only thread counts, never the spin variables npanomaly manages
(OPENBLAS_THREAD_TIMEOUT, GOMP_SPINCOUNT): the published figures are what a user gets.
"""

import os
import statistics
import sys
import time

IMPORT_ORDERS = ("natural", "npanomaly-first")
# the thread counts of NumPy's BLAS, OpenMP (torch, faiss), MKL and Numba
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def benchmark_parser(doc):
    """An argument parser described by the script's docstring, with --threads and --import-order."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    add_import_order(parser)
    return parser


def add_import_order(parser):
    """--import-order: "natural" (the default) imports NumPy and torch before npanomaly, as a
    user's script or notebook does; "npanomaly-first" imports npanomaly before both."""
    parser.add_argument("--import-order", choices=IMPORT_ORDERS, default="natural",
                        help="natural: numpy and torch before npanomaly, as a user's script (default); "
                             "npanomaly-first: npanomaly before both")


def use_threads(threads, import_order="natural"):
    """Give NumPy's BLAS, Numba, OpenMP (torch, faiss) and MKL the same number of threads, import
    in the given order, and print which threading layer, BLAS and thread counts run."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if import_order == "npanomaly-first":
        import npanomaly  # noqa: F401
    import numpy  # noqa: F401
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"import order {import_order}: {describe_threads()}"
          f"{f'; torch {torch.__version__}, {torch.get_num_threads()} threads' if torch is not None else ''}",
          file=sys.stdout, flush=True)


def describe_threads():
    """npanomaly.threads.describe() once Numba's pool has started, so that it names the layer."""
    import numpy

    from npanomaly import kernels, threads

    kernels.all_finite(numpy.zeros(8))
    return threads.describe()


def median_time(function, repeats, warm_up=True):
    """Median wall time of function() over repeats runs, after one untimed run (compilation, caches)."""
    return median_times([function], repeats, warm_up)[0]


def median_times(functions, repeats, warm_up=True):
    """Median wall time of each function, timed in turns (a, b, a, b, ...) after one untimed run of each.

    Taking turns spreads a noisy machine's slow stretches (another tenant, the kernel compacting
    memory for huge pages) over every contender; timing all runs of one before the other let a
    single stretch swing a ratio by 2x here.
    Only the contenders (npanomaly and its peer) take turns; the scripts time their floors (a
    design's bare matrix products) in turns of their own, after. In the contenders' turns a floor
    ran NumPy's threaded products right before every npanomaly run and before no torch run, an
    order no user program has: its BLAS threads still held the cores when npanomaly started
    (bench_layers.py, ResNet-18 128 @28 backward: 1.06-1.13x torch with the floor in the turns,
    0.73-0.76x without).
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


def winograd_products(points, tiles, channels, out_channels, rng):
    """A function running only the products of a Winograd convolution's tiles, M = U V^T with U
    [O, C] and V [tiles, C], at each of the ``points`` transform points, on inputs transformed
    beforehand, the way kernels.winograd_conv2d_forward runs them: each thread its share of the
    tiles (or, with few tiles, of the output channels), in blocks whose M [O', rows] lies in that
    thread's scratch, gemm on that thread. Its time is the floor of the Winograd design (no
    transforms)."""
    import numba
    import numpy as np

    from npanomaly import threads
    from npanomaly.kernels import _config, blas, conv, winograd

    v = rng.random((points, tiles, channels), dtype=np.float32)
    u = rng.random((points, out_channels, channels), dtype=np.float32)
    alpha = int(round(points ** 0.5))
    tile_shares, channel_shares = winograd._forward_shares(tiles, out_channels, numba.get_num_threads())
    block_rows = winograd._block_rows(alpha, channels + out_channels // channel_shares, 4,
                                      _config.WINOGRAD_BLOCK_BYTES)
    block_rows = min(block_rows, -(-tiles // tile_shares))
    scratch = np.empty((tile_shares * channel_shares, points * block_rows * -(-out_channels // channel_shares)),
                       np.float32)

    @numba.njit(parallel=True)
    def products(v, u, scratch, tile_shares, channel_shares, block_rows):
        for share in numba.prange(tile_shares * channel_shares):
            first, stop = conv._share(tiles, tile_shares, share // channel_shares)
            o_first, o_stop = conv._share(u.shape[1], channel_shares, share % channel_shares)
            for start in range(first, stop, block_rows):
                rows = min(block_rows, stop - start)
                out = scratch[share, :v.shape[0] * (o_stop - o_first) * rows].reshape((v.shape[0], o_stop - o_first,
                                                                                       rows))
                for xi in range(v.shape[0]):
                    blas.gemm(u[xi][o_first:o_stop], v[xi, start:start + rows], out[xi], np.bool_(False),
                              np.float64(0.0), np.bool_(True))

    def run():
        with threads.single_threaded_blas():
            products(v, u, scratch, tile_shares, channel_shares, block_rows)
    return run
