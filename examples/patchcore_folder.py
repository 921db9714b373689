"""Fit PatchCore on a folder of normal images and write a heatmap for every test image.

    python examples/patchcore_folder.py DATA [--size 128] [--out heatmaps]

DATA is an MVTec AD category (train/good, test/<defect>) or a plain folder (normal/, anomalous/).
Without DATA the script writes the built-in woven texture and uses that.
"""

import argparse
import os

import npanomaly
from npanomaly import data, metrics, synthetic
from npanomaly.png import write_png
from npanomaly.report import heatmap_overlay


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="data set folder (default: the built-in woven texture)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="heatmaps")
    args = parser.parse_args()
    root = args.data or synthetic.write_mvtec("example-data", synthetic.make_category("woven", size=args.size))

    dataset = data.open_dataset(root)
    size = (args.size, args.size)
    model = npanomaly.PatchCore().fit(dataset.train_images(size), coreset_ratio=0.1)
    images, labels, masks, defects = dataset.test_images(size)
    scores, maps = model.scores_and_maps(images)
    print(f"{len(images)} test images, image AUROC {metrics.auroc(scores, labels):.3f}")

    os.makedirs(args.out, exist_ok=True)
    low, high = float(maps.min()), float(maps.max())  # one colour scale for every image
    for index, (image, heatmap, defect) in enumerate(zip(images, maps, defects)):
        write_png(os.path.join(args.out, f"{index:03d}_{defect}.png"), heatmap_overlay(image, heatmap, low, high))
    print(f"heatmaps in {args.out}/")


if __name__ == "__main__":
    main()
