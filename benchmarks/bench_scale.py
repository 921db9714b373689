"""PatchCore fits from a folder larger than the fit's memory: peak RSS against the patch features' size.

    python benchmarks/bench_scale.py [--sizes 500 2000 8000] [--backbones seed efficientnet_lite0]
                                     [--data DIR] [--threads 2] [--in-memory-up-to 2000]

Writes --sizes' largest number of generated textures (grid, woven and granular in turn, 128 x 128
PNG files) to --data once (default: a temporary folder, deleted afterwards), then fits
``PatchCore(backbone=B).fit(first_n_files, size=S, coreset_ratio=0.01)`` for each backbone and
each size in a fresh process: the seed backbone at 64 x 64 (block2 + block3: 256 patches of 384
floats per image), efficientnet_lite0 at 128 x 128 (stride8 + stride16: 256 patches of 152 floats).
The fit streams the files one batch at a time and spills the features to disk ("auto": above
1 GiB); sizes up to --in-memory-up-to are also fitted with spill=False, the in-memory path.

Each row: images, patch features (rows x D x 4 bytes), bank rows, fit seconds, the process's RSS
just before the fit (NumPy, Numba and the compiled kernels; a warm-up fit on 4 images ran first),
its peak RSS during the fit (VmHWM, reset before the fit through /proc/self/clear_refs; not
ru_maxrss, which an exec'd child inherits from its parent) and what the fit added, as a share of
the patch features' size.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import benchmark_parser, use_threads

IMAGE_SIZE = {"seed": 64, "efficientnet_lite0": 128}
STORED_SIZE = 128


def parse_args():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--backbones", nargs="+", default=["seed", "efficientnet_lite0"], choices=sorted(IMAGE_SIZE))
    parser.add_argument("--data", help="folder for the generated images (kept); default: a temporary one")
    parser.add_argument("--in-memory-up-to", type=int, default=2000,
                        help="also fit with spill=False up to this many images (default %(default)s)")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--child", nargs=4, metavar=("BACKBONE", "N", "FOLDER", "SPILL"), help=argparse.SUPPRESS)
    return parser.parse_args()


def _status(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024


def write_images(folder, count):
    """count generated textures as PNG files in folder/normal (only the ones not there yet)."""
    import numpy as np

    from npanomaly import synthetic
    from npanomaly.data import to_uint8
    from npanomaly.png import write_png

    target = os.path.join(folder, "normal")
    os.makedirs(target, exist_ok=True)
    start = time.perf_counter()
    for index in range(count):
        path = os.path.join(target, f"{index:06d}.png")
        if not os.path.exists(path):
            rng = np.random.default_rng([7, index])
            style = synthetic.STYLES[index % len(synthetic.STYLES)]
            write_png(path, to_uint8(synthetic.texture(style, (STORED_SIZE, STORED_SIZE), rng)))
    return time.perf_counter() - start


def child(backbone, n_images, folder, spill):
    """One fit in this fresh process; prints one JSON line."""
    import npanomaly

    names = sorted(os.listdir(os.path.join(folder, "normal")))[:n_images]
    paths = [os.path.join(folder, "normal", name) for name in names]
    size = IMAGE_SIZE[backbone]
    spill_dir = tempfile.mkdtemp(prefix="npanomaly-bench-spill-")
    try:
        npanomaly.PatchCore(backbone=backbone).fit(paths[:4], size=size)  # compile and load the kernels
        model = npanomaly.PatchCore(backbone=backbone)
        baseline = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:  # reset VmHWM to the current RSS
            refs.write("5")
        start = time.perf_counter()
        model.fit(paths, size=size, coreset_ratio=ARGS.coreset_ratio, spill=spill == "spill",
                  spill_dir=spill_dir)
        fit_s = time.perf_counter() - start
        peak = _status("VmHWM")
    finally:
        shutil.rmtree(spill_dir)
    rows_per_image = (size // model.feature_extractor.stride(model.layers[0])) ** 2
    print(json.dumps(dict(n=n_images, dim=model.feature_size, rows=n_images * rows_per_image,
                          bank=model.memory_bank.shape[0], fit_s=fit_s, baseline=baseline, peak=peak)))


def main():
    folder = ARGS.data or tempfile.mkdtemp(prefix="npanomaly-bench-scale-")
    try:
        largest = max(ARGS.sizes)
        seconds = write_images(folder, largest)
        print(f"{largest} images of {STORED_SIZE}x{STORED_SIZE} in {folder} (written in {seconds:.0f} s); "
              f"coreset ratio {ARGS.coreset_ratio}", flush=True)
        print(f"{'backbone':<19} {'where':<7} {'images':>7} {'features GB':>11} {'bank':>7} {'fit s':>7} "
              f"{'RSS before MB':>13} {'peak RSS MB':>11} {'added / features':>16}", flush=True)
        for backbone in ARGS.backbones:
            for n_images in sorted(ARGS.sizes):
                for where in ("disk", "memory") if n_images <= ARGS.in_memory_up_to else ("disk",):
                    out = subprocess.run([sys.executable, __file__, "--threads", str(ARGS.threads), "--import-order",
                                          ARGS.import_order, "--coreset-ratio", str(ARGS.coreset_ratio), "--child",
                                          backbone, str(n_images), folder, "spill" if where == "disk" else "memory"],
                                         capture_output=True, text=True, check=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    features = row["rows"] * row["dim"] * 4
                    added = row["peak"] - row["baseline"]
                    print(f"{backbone:<19} {where:<7} {row['n']:>7} {features / 1e9:>11.2f} {row['bank']:>7} "
                          f"{row['fit_s']:>7.1f} {row['baseline'] / 1e6:>13.0f} {row['peak'] / 1e6:>11.0f} "
                          f"{added / features:>16.1%}", flush=True)
    finally:
        if not ARGS.data:
            shutil.rmtree(folder)


ARGS = parse_args()
use_threads(ARGS.threads, ARGS.import_order)
if __name__ == "__main__":
    if ARGS.child:
        child(ARGS.child[0], int(ARGS.child[1]), ARGS.child[2], ARGS.child[3])
    else:
        main()
