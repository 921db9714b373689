"""PatchCore on a Dask cluster: the throughputs a cluster estimate needs, and distributed against one machine.

    pip install npanomaly[dask] threadpoolctl
    python benchmarks/bench_distributed.py [--threads 2] [--images 400] [--repeats 3]

1. Per worker thread (one thread, the way a Dask worker of --nthreads 1 runs it), medians of
   --repeats: patch-feature extraction in images/s for the seed backbone at 64 x 64,
   efficientnet_lite0 at 224 x 224 and wide_resnet50_2 (random weights: the same work as the
   paper's) at 224 x 224, layer2 + layer3; the greedy coreset's cost per row and step (1% of
   200,000 projected rows of real features); the exact 1-NN search's cost per query and bank row
   (784 queries of 1,536 floats against 20,000 bank rows).
2. --images generated 64 x 64 textures, seed backbone, coreset 1%: PatchCore.fit on one machine
   (--threads threads) against distributed.fit on a LocalCluster of --threads one-thread worker
   processes (cluster start-up not timed), then scoring the same images both ways (equal scores
   are checked). The covering radius of each bank over all patch rows (exact search, float64)
   shows what the composable coreset costs in quality.
"""

import os
import statistics
import sys
import time

from _common import benchmark_parser, median_time, use_threads


def parse_args():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return parser.parse_args()


if __name__ == "__main__":  # not in the worker processes, which import this file as __mp_main__
    ARGS = parse_args()
    use_threads(ARGS.threads, ARGS.import_order)

import numpy as np  # noqa: E402

import npanomaly  # noqa: E402
from npanomaly import search, synthetic  # noqa: E402


def one_thread(function):
    """Run function with Numba and BLAS on one thread, as a one-thread Dask worker does."""
    import numba
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return function()
    finally:
        numba.set_num_threads(previous)


def extraction_rates():
    configs = [("seed", 64, None), ("efficientnet_lite0", 224, None), ("wide_resnet50_2", 224, "random")]
    if ARGS.quick:
        configs = configs[:1]
    rates = {}
    for backbone, size, weights in configs:
        model = npanomaly.PatchCore(backbone=backbone, weights=weights)
        batch = np.random.default_rng(0).random((8, 3, size, size), dtype=np.float32)
        seconds = one_thread(lambda: median_time(lambda: model._patch_features(batch), ARGS.repeats))  # noqa: B023
        rates[backbone] = (size, model.feature_size, 8 / seconds)
        print(f"  extraction {backbone:<19} {size}x{size}, D = {model.feature_size:>5}: {8 / seconds:7.2f} images/s "
              "per worker thread", flush=True)
    return rates


def greedy_cost():
    rows = 20_000 if ARGS.quick else 200_000
    images = synthetic.make_category("woven", n_train=rows // 256 + 1, size=64, seed=3).train
    model = npanomaly.PatchCore()
    features = np.concatenate([model._patch_features(images[i:i + 8]).reshape(-1, model.feature_size)
                               for i in range(0, len(images), 8)])[:rows]
    projected = features @ search.random_projection(features.shape[1], 128, 0)
    steps = rows // 100
    seconds = one_thread(lambda: median_time(lambda: search.greedy_select(projected, steps), 1, warm_up=False))
    cost = seconds / (rows * steps)
    print(f"  greedy coreset: {rows} rows x {steps} steps (1%) in {seconds:.1f} s: {cost * 1e9:.2f} ns per row "
          "and step", flush=True)
    return cost


def search_cost(dim):
    rng = np.random.default_rng(1)
    rows = 2_000 if ARGS.quick else 20_000
    bank = rng.random((rows, dim), dtype=np.float32)
    queries = bank[rng.integers(0, rows, 784)] + rng.normal(0, 0.01, (784, dim)).astype(np.float32)
    seconds = one_thread(lambda: median_time(lambda: search.knn(queries, bank, k=1), ARGS.repeats))
    cost = seconds / (784 * rows)
    print(f"  exact 1-NN: 784 x {rows:,} x {dim:,} in {seconds:.2f} s: {cost * 1e9:.3f} ns per query and bank row",
          flush=True)
    return cost


IMAGES = 1_000_000
ROWS_PER_IMAGE = 784       # 28 x 28 at 224 x 224 (stride 8)
BANK_ROWS = 1_000_000      # 0.13% of the rows: greedy k-center costs rows x bank x c, 1% (7.8M) would take years
CLIENT_THREADS = 16        # the final greedy on the client runs its update in parallel over rows


def estimate(rates, greedy, search_costs):
    """On paper: 1,000,000 training images at 224 x 224 on W one-thread workers (two partitions each),
    each partition keeping a local coreset of 2 x BANK_ROWS / partitions rows (local_ratio), the
    client selecting BANK_ROWS from their union of 2 x BANK_ROWS rows; prediction with the bank
    sharded over the workers. Extraction: images / (rate x W). Local coreset: two partitions of
    R / 2W rows each, keeping k_i rows, at rows x steps x c. Final coreset: 2 BANK_ROWS x BANK_ROWS
    x c on CLIENT_THREADS threads. Worker RAM: a partition's projection (spilled features stay on
    its disk). Prediction: 1 / rate + 784 x BANK_ROWS x the search cost per query and row, per
    worker thread."""
    rows = IMAGES * ROWS_PER_IMAGE
    print(f"3. on paper: {IMAGES:,} images, {rows:,} patch rows, a bank of {BANK_ROWS:,} rows, from the rates above")
    print(f"  {'backbone':<17} {'workers':>7} {'features':>9} {'extract':>8} {'worker RAM':>10} {'local coreset':>13} "
          f"{'final coreset':>13} {'bank':>7} {'predict img/s':>13}")
    for backbone, (size, dim, rate) in rates.items():
        if size != 224:
            continue
        knn = search_costs[dim]
        for workers in (10, 100, 1000):
            partitions = 2 * workers
            part_rows = rows / partitions
            local_keep = 2 * BANK_ROWS / partitions
            extract_h = IMAGES / (rate * workers) / 3600
            local_h = 2 * part_rows * local_keep * greedy / 3600   # two partitions per worker, one after the other
            final_h = 2 * BANK_ROWS * BANK_ROWS * greedy / CLIENT_THREADS / 3600
            per_image = 1 / rate + ROWS_PER_IMAGE * BANK_ROWS * knn
            worker_ram = part_rows * (4 * 128 + 16)  # a spilled partition's projection, distance and index
            print(f"  {backbone:<17} {workers:>7} {rows * dim * 4 / 1e12:>7.2f}TB {extract_h:>7.1f}h "
                  f"{worker_ram / 1e9:>8.1f}GB {local_h:>12.1f}h "
                  f"{final_h:>12.1f}h {BANK_ROWS * dim * 4 / 1e9:>5.1f}GB {workers / per_image:>13.1f}")


def cluster_against_one_machine():
    import dask.array as da
    import distributed

    from npanomaly import distributed as nd

    n = 40 if ARGS.quick else ARGS.images
    images = np.concatenate([synthetic.make_category(style, n_train=n // 3 + 1, size=64, seed=5).train
                             for style in synthetic.STYLES])[:n]
    cluster = distributed.LocalCluster(n_workers=ARGS.threads, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        chunked = da.from_array(images, chunks=(-(-n // (2 * ARGS.threads)), 3, 64, 64))
        nd.fit(npanomaly.PatchCore(), chunked[:16], client, coreset_ratio=0.01)  # workers load the kernels
        fits, spreads = [], []
        for _ in range(ARGS.repeats):
            start = time.perf_counter()
            single = npanomaly.PatchCore().fit(images, 0.01)
            fits.append(time.perf_counter() - start)
            start = time.perf_counter()
            spread = nd.fit(npanomaly.PatchCore(), chunked, client, coreset_ratio=0.01)
            spreads.append(time.perf_counter() - start)
        single_fit, spread_fit = statistics.median(fits), statistics.median(spreads)
        score_single = median_time(lambda: single.score_samples(images), ARGS.repeats)
        score_spread = median_time(lambda: nd.score_samples(single, chunked, client), ARGS.repeats)
        assert np.array_equal(nd.score_samples(single, chunked, client), single.score_samples(images))
    rows = np.concatenate([single._patch_features(images[i:i + 8]).reshape(-1, single.feature_size)
                           for i in range(0, n, 8)])
    radius = [float(search.knn(rows.astype(np.float64), bank.memory_bank_.astype(np.float64), k=1)[0].max())
              for bank in (single, spread)]
    print(f"  {n} images, {rows.shape[0]} patch rows, bank {single.memory_bank_.shape[0]} rows:")
    print(f"    fit:   one machine {single_fit:6.2f} s, cluster of {ARGS.threads} {spread_fit:6.2f} s "
          f"(ratio {spread_fit / single_fit:.2f})")
    print(f"    score: one machine {n / score_single:6.1f} img/s, cluster {n / score_spread:6.1f} img/s, "
          "scores equal")
    print(f"    covering radius of the bank over all rows: one machine {radius[0]:.4f}, cluster {radius[1]:.4f} "
          f"(ratio {radius[1] / radius[0]:.2f}; the bound is 4)", flush=True)


def main():
    print(f"threads {ARGS.threads}; process {os.getpid()}; python {sys.version.split()[0]}")
    print("1. per worker thread")
    rates = extraction_rates()
    greedy = greedy_cost()
    search_costs = {dim: search_cost(dim) for size, dim, _ in rates.values() if size == 224}
    print("2. a LocalCluster against one machine")
    cluster_against_one_machine()
    estimate(rates, greedy, search_costs)


if __name__ == "__main__":
    main()
