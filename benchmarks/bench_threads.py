"""Import order and a shared machine: does npanomaly's speed depend on either?

    python benchmarks/bench_threads.py [--threads 2] [--rounds 3] [--steps 12]

Workload: one Student-Teacher training step of ``StudentTeacher.default_rgb()`` (Adam, batch 8 x 3 x
256 x 256), the same as bench_student_teacher.py, timed as the median of --steps steps in a fresh
process (each process starts with the imports in the order named, as a user's script would).

1. Import order: npanomaly imported first; NumPy first (``import numpy as np`` at the top, Jupyter);
   NumPy and torch first; and the best case, both spin variables set in the environment before
   Python starts. Processes run in turns (a, b, c, d, a, b, ...), --rounds times; the table gives
   each order's median and its ratio to npanomaly-first.
2. A shared machine: the same --steps steps in one process alone, then in two processes whose
   timed steps start at the same moment (each with --threads threads, after its imports and
   warm-up). The ratio is the slower of the pair's step time over the single process's; a fair
   share of the cores is 2.0x.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import THREAD_VARIABLES

ORDERS = ("npanomaly-first", "numpy-first", "torch-first", "variables-preset")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--child", choices=ORDERS, help=argparse.SUPPRESS)
    parser.add_argument("--start-delay", type=float, default=15.0,
                        help="seconds the shared-machine processes get for imports and warm-up (default 15)")
    parser.add_argument("--pair-threads", type=int, default=0,
                        help="also time two processes with this many threads each (default: skip)")
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args()


def child(args):
    """Import in the order named, then time --steps training steps; print one JSON line."""
    if args.child == "npanomaly-first":
        import npanomaly  # noqa: F401  (before NumPy: the point of this order)
    if args.child in ("numpy-first", "torch-first", "variables-preset"):
        import numpy as np

        np.ones((64, 64), np.float32) @ np.ones((64, 64), np.float32)  # OpenBLAS has started its threads
    if args.child in ("torch-first", "variables-preset"):
        import torch

        torch.set_num_threads(args.threads)
        torch.ones(64, 64) @ torch.ones(64, 64)
    import numpy as np

    import npanomaly
    from npanomaly import optim

    st = npanomaly.StudentTeacher.default_rgb()
    images = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    st._calibrate_teacher(st._source(images, "images", fitting=True))
    st.train()
    optimizer = optim.Adam(st.student_parameters(), lr=1e-3)
    for _ in range(2):
        st.train_step(images, optimizer)  # compile and warm the caches
    if args.start_at:  # processes sharing the machine start their timed steps together
        time.sleep(max(0.0, args.start_at - time.time()))
    times = []
    start_all = time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter()
        st.train_step(images, optimizer)
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(order=args.child, median_ms=1000 * statistics.median(times),
                          total_s=time.perf_counter() - start_all, threads=npanomaly.threads.describe())))


def spawn(args, order, start_at=0.0, threads=None):
    threads = threads or args.threads
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    env.update((variable, str(threads)) for variable in THREAD_VARIABLES)
    if order == "variables-preset":
        env.update(OPENBLAS_THREAD_TIMEOUT="4", GOMP_SPINCOUNT="10000")
    command = [sys.executable, __file__, "--child", order, "--threads", str(threads), "--steps", str(args.steps),
               "--batch", str(args.batch), "--size", str(args.size), "--start-at", str(start_at)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(process):
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(err[-2000:])
    return json.loads(out.strip().splitlines()[-1])


def main(args):
    print(f"threads={args.threads} rounds={args.rounds} steps={args.steps} batch={args.batch} size={args.size}")
    runs = {order: [] for order in ORDERS}
    for _ in range(args.rounds):
        for order in ORDERS:
            row = result(spawn(args, order))
            runs[order].append(row["median_ms"])
            if len(runs[order]) == 1:
                print(f"  {order}: {row['threads']}")
    base = statistics.median(runs["npanomaly-first"])
    print(f"{'import order':<18} {'step ms (median)':>16} {'runs':>28} {'vs npanomaly-first':>19}")
    for order in ORDERS:
        value = statistics.median(runs[order])
        print(f"{order:<18} {value:>16.1f} {' '.join(f'{v:.0f}' for v in runs[order]):>28} {value / base:>18.2f}x")

    singles, pairs = [], []
    for _ in range(args.rounds):
        singles.append(result(spawn(args, "numpy-first", time.time() + args.start_delay))["total_s"])
        start_at = time.time() + args.start_delay  # after both have imported, compiled and warmed up
        both = [spawn(args, "numpy-first", start_at) for _ in range(2)]
        pairs.append(max(result(process)["total_s"] for process in both))
    if args.pair_threads:
        start_at = time.time() + args.start_delay
        both = [spawn(args, "numpy-first", start_at, args.pair_threads) for _ in range(2)]
        print(f"two processes with {args.pair_threads} thread(s) each: {max(result(p)['total_s'] for p in both):.2f} s")
    single, pair = statistics.median(singles), statistics.median(pairs)
    print(f"two processes sharing the machine, {args.steps} steps each: one alone {single:.2f} s, two together "
          f"{pair:.2f} s (the slower of the two), ratio {pair / single:.2f}x (fair share 2.0x; runs "
          f"{' '.join(f'{p / s:.2f}' for p, s in zip(pairs, singles))})")


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.child:
        child(ARGS)
    else:
        main(ARGS)
