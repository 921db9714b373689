"""PatchCore's search kernels against faiss and torch, and fit/predict scaling, in one process.

    pip install faiss-cpu          # only for this benchmark; npanomaly never imports it
    python benchmarks/bench_patchcore.py [--threads 2] [--repeats 3] [--quick]

1. Exact 1-NN search: 6,272 queries (8 images x 28 x 28 patches) against a 50,000 x 1,024 bank,
   npanomaly.search.knn vs faiss.IndexFlatL2 (skipped with a note if faiss is not installed).
2. Greedy k-center coreset on 100,000 x 128 features vs a torch loop written like anomalib's
   KCenterGreedy (norm of the difference, running minimum, argmax). The per-step cost is constant,
   so both are timed on the first --coreset-steps steps (default 1,000; the full 10% is 10,000 steps)
   and the ratio is the same; --coreset-steps 10000 runs the full 10%.
3. PatchCore.default_rgb() fit (coreset 10%) and predict on 64x64 textures for 10, 100 and 400
   training images: seconds, images/s and the process's peak memory, each size in a fresh process.
4. The same at 224x224 with 100 training images (--large-images; 0 skips it; fitting takes minutes):
   predict images/s and the share of queries the knn screening left to the exhaustive float64
   scan (issue 13: 56% of the prediction time before the screening centred its coordinates).
Ratios are npanomaly / peer: below 1 means npanomaly is faster. Medians over --repeats runs, the
contenders timed in turns.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _common import benchmark_parser, median_time, median_times, use_threads


def parse_args():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coreset-steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--large-images", type=int, default=100, help="training images of row 4 (0: skip it)")
    parser.add_argument("--scaling-child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    return parser.parse_args()


ARGS = parse_args()
use_threads(ARGS.threads, ARGS.import_order)

import numpy as np  # noqa: E402  (after use_threads: BLAS reads its thread variables at load time)



def scaling_child(n_images, size):
    """Fit and predict in this (fresh) process; print one JSON line."""
    import npanomaly
    from npanomaly import kernels

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from textures import textures

    n_test = 50 if size <= 64 else 8
    train = textures(n_images, size=(size, size), seed=0)
    test = textures(n_test, size=(size, size), seed=1)
    warm = npanomaly.PatchCore.default_rgb().fit(train[:2])  # compile outside the timings
    warm.predict(test[:2])
    start = time.perf_counter()
    model = npanomaly.PatchCore.default_rgb().fit(train, coreset_ratio=0.1)
    fit_s = time.perf_counter() - start
    scanned = [0]
    exact_scan = kernels.exact_scan

    def counting_scan(queries, bank, rows, *rest):
        scanned[0] += rows.size
        return exact_scan(queries, bank, rows, *rest)

    kernels.exact_scan = counting_scan  # knn looks the kernel up in this table at each call
    start = time.perf_counter()
    model.predict(test)
    predict_s = time.perf_counter() - start
    kernels.exact_scan = exact_scan
    queries = n_test * model._patch_features(test[:1]).shape[1] * model._patch_features(test[:1]).shape[2]
    # VmHWM, not ru_maxrss: the latter survives fork+exec and would report the parent's peak.
    with open("/proc/self/status") as status:
        peak_mib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    print(json.dumps(dict(n=n_images, bank=model.memory_bank.shape[0], fit_s=fit_s, predict_ips=n_test / predict_s,
                          peak_mib=peak_mib, exhaustive=scanned[0] / queries)))


def main():
    import numba

    from npanomaly.search import greedy_coreset, knn

    numba.set_num_threads(ARGS.threads)
    rng = np.random.default_rng(0)
    print(f"threads={ARGS.threads} repeats={ARGS.repeats} numpy={np.__version__} numba={numba.__version__}")

    # 1. exact nearest neighbour
    n_bank, n_query, dim = (5000, 627, 256) if ARGS.quick else (50000, 6272, 1024)
    bank = rng.standard_normal((n_bank, dim), dtype=np.float32)
    queries = rng.standard_normal((n_query, dim), dtype=np.float32)
    knn(queries[:10], bank[:100])
    try:
        import faiss
    except ImportError:
        ours = median_time(lambda: knn(queries, bank, k=1), ARGS.repeats)
        print(f"knn {n_query} x {n_bank} x {dim}: npanomaly {ours:.2f} s; faiss not installed (pip install faiss-cpu)")
    else:
        faiss.omp_set_num_threads(ARGS.threads)
        index = faiss.IndexFlatL2(dim)
        index.add(bank)
        ours, theirs = median_times([lambda: knn(queries, bank, k=1), lambda: index.search(queries, 1)], ARGS.repeats)
        agree = np.mean(knn(queries, bank)[1][:, 0] == index.search(queries, 1)[1][:, 0])
        print(f"knn {n_query} x {n_bank} x {dim}: npanomaly {ours:.2f} s, faiss IndexFlatL2 {theirs:.2f} s, "
              f"ratio {ours / theirs:.2f}x (same neighbour for {agree:.2%} of queries)")

    # 2. greedy coreset
    import torch

    torch.set_num_threads(ARGS.threads)
    n_points = 10000 if ARGS.quick else 100000
    steps = min(ARGS.coreset_steps, n_points // 10)
    features = rng.standard_normal((n_points, 128), dtype=np.float32)
    tfeatures = torch.from_numpy(features)

    def torch_k_center():  # anomalib's KCenterGreedy loop, on already projected features
        min_distances = None
        index = 0
        chosen = []
        for _ in range(steps):
            distance = torch.linalg.norm(tfeatures - tfeatures[index:index + 1], ord=2, dim=1, keepdim=True)
            min_distances = distance if min_distances is None else torch.minimum(min_distances, distance)
            index = int(torch.argmax(min_distances).item())
            min_distances[index] = 0
            chosen.append(index)
        return chosen

    greedy_coreset(features[:100], 5, projection_dim=None)
    ours, theirs = median_times([lambda: greedy_coreset(features, steps, projection_dim=None), torch_k_center],
                                ARGS.repeats)
    same = greedy_coreset(features, steps, projection_dim=None)[1:].tolist() == torch_k_center()[:-1]
    print(f"greedy coreset {steps} steps over {n_points} x 128: npanomaly {ours:.2f} s, torch loop {theirs:.2f} s, "
          f"ratio {ours / theirs:.2f}x (same selection: {same})")

    # 3. fit / predict scaling, each size in a fresh process for an honest peak memory
    print(f"{'size':>5} {'train images':>12} {'bank':>7} {'fit s':>8} {'predict img/s':>14} {'peak MiB':>9} "
          f"{'exhaustive':>10}")
    rows = [(64, n) for n in ((10, 20) if ARGS.quick else (10, 100, 400))]
    if ARGS.large_images:
        rows.append((64, 4) if ARGS.quick else (224, ARGS.large_images))
    for size, n_images in rows:
        out = subprocess.run([sys.executable, __file__, "--threads", str(ARGS.threads), "--import-order",
                              ARGS.import_order, "--scaling-child",
                              str(n_images), "--size", str(size)], capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{size:>5} {row['n']:>12} {row['bank']:>7} {row['fit_s']:>8.2f} {row['predict_ips']:>14.1f} "
              f"{row['peak_mib']:>9.0f} {row['exhaustive']:>10.2%}", flush=True)


if __name__ == "__main__":
    if ARGS.scaling_child:
        scaling_child(int(ARGS.scaling_child), ARGS.size)
    else:
        main()
