"""The built-in data set: procedural textures with MVTec-like defects and exact masks.

Three texture styles (``woven``, ``grid``, ``granular``) and four defect kinds (``scratch``, ``hole``,
``stain``, ``foreign`` patch). Everything is drawn from ``numpy.random.default_rng`` seeded by
(seed, style), so the same arguments give the same pixels on every machine. A category can be
written to disk in the MVTec AD layout and read back with ``npanomaly.data.mvtec_category``.
"""

import os
from dataclasses import dataclass

import numpy as np

from npanomaly import kernels
from npanomaly.data import to_uint8
from npanomaly.png import write_png

STYLES = ("woven", "grid", "granular")
DEFECTS = ("scratch", "hole", "stain", "foreign")


def texture(style, size, rng):
    """One normal texture image, float32 [3, H, W] in [0, 1]."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy += rng.uniform(0, 50)
    xx += rng.uniform(0, 50)
    if style == "woven":
        period = rng.uniform(7.0, 8.0)
        cell = (np.floor(xx / period) + np.floor(yy / period)) % 2
        thread = 2 * np.pi * 3 / period
        value = np.where(cell == 0, 0.5 + 0.5 * np.sin(thread * yy), 0.5 + 0.5 * np.sin(thread * xx))
        colour = np.array([0.55, 0.45, 0.35]) + rng.normal(0, 0.02, 3)
        image = colour[:, None, None] * (0.55 + 0.45 * value)[None]
    elif style == "grid":
        period = rng.uniform(9.0, 10.0)
        line = (np.mod(xx, period) < 2) | (np.mod(yy, period) < 2)
        colour = np.array([0.35, 0.55, 0.6]) + rng.normal(0, 0.02, 3)
        image = colour[:, None, None] * np.where(line, 0.45, 1.0)[None]
    elif style == "granular":
        noise = rng.standard_normal((1, 1, height, width))
        grains = kernels.gaussian_blur(noise, 1.2)[0, 0]
        grains = (grains - grains.mean()) / (grains.std() + 1e-12)
        low, high = np.array([0.3, 0.3, 0.32]), np.array([0.75, 0.72, 0.65])
        mix = np.clip(0.5 + 0.25 * grains, 0, 1)
        image = low[:, None, None] + (high - low)[:, None, None] * mix[None]
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    image = image + rng.normal(0, 0.015, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def add_defect(image, kind, rng, style):
    """A copy of image [3, H, W] with one defect of the given kind, and its exact mask [H, W] bool."""
    _, height, width = image.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = image.copy()
    scale = min(height, width)
    if kind == "scratch":
        y0, x0 = rng.uniform(0.2, 0.8, 2) * (height, width)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.35, 0.6) * scale
        dy, dx = np.sin(angle), np.cos(angle)
        along = np.clip((yy - y0) * dy + (xx - x0) * dx, -length / 2, length / 2)
        distance = np.hypot(yy - (y0 + along * dy), xx - (x0 + along * dx))
        mask = distance <= rng.uniform(0.7, 1.3)
        out[:, mask] = rng.choice([0.05, 0.95])
    elif kind == "hole":
        cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
        radius = rng.uniform(0.05, 0.1) * scale
        mask = np.hypot(yy - cy, xx - cx) <= radius
        out[:, mask] = 0.04
    elif kind == "stain":
        cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
        radius = rng.uniform(0.07, 0.13) * scale
        wobble = 1 + 0.2 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi))
        mask = np.hypot(yy - cy, xx - cx) <= radius * wobble
        tint = np.array([0.45, 0.25, 0.1])[:, None]
        out[:, mask] = 0.35 * out[:, mask] + 0.65 * tint
    elif kind == "foreign":
        h, w = (rng.uniform(0.15, 0.25, 2) * scale).astype(int) + 2
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        other = STYLES[(STYLES.index(style) + 1) % len(STYLES)]
        mask = np.zeros((height, width), bool)
        mask[y:y + h, x:x + w] = True
        out[:, mask] = texture(other, (height, width), rng)[:, mask] * 0.6 + 0.35
    else:
        raise ValueError(f"kind must be one of {DEFECTS}, got {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32), mask


@dataclass
class SyntheticCategory:
    """One texture style: normal training images and a labelled test set with masks."""

    style: str
    train: np.ndarray           # [N, 3, H, W] normal images
    test: np.ndarray            # [M, 3, H, W]
    labels: np.ndarray          # [M] bool, True = anomalous
    masks: np.ndarray           # [M, H, W] bool
    defects: list               # [M] "good" or a defect kind


def make_category(style, n_train=40, n_test_good=12, n_test_defect=24, size=64, seed=0):
    """A deterministic synthetic category; defect kinds cycle through DEFECTS."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    size = (size, size) if np.isscalar(size) else tuple(size)
    if min(size) < 16:
        raise ValueError(f"size must be at least 16x16 for the defects to fit, got {size}")
    rng = np.random.default_rng([seed, STYLES.index(style)])
    train = np.stack([texture(style, size, rng) for _ in range(n_train)])
    test, masks, defects = [], [], []
    for _ in range(n_test_good):
        test.append(texture(style, size, rng))
        masks.append(np.zeros(size, bool))
        defects.append("good")
    for index in range(n_test_defect):
        kind = DEFECTS[index % len(DEFECTS)]
        image, mask = add_defect(texture(style, size, rng), kind, rng, style)
        test.append(image)
        masks.append(mask)
        defects.append(kind)
    return SyntheticCategory(style, train, np.stack(test), np.array([d != "good" for d in defects]),
                             np.stack(masks), defects)


def write_mvtec(root, category):
    """Write a category in MVTec AD's layout under root/<style>/; returns that folder."""
    base = os.path.join(root, category.style)
    os.makedirs(os.path.join(base, "train", "good"), exist_ok=True)
    for i, image in enumerate(category.train):
        write_png(os.path.join(base, "train", "good", f"{i:03d}.png"), to_uint8(image))
    counters = {}
    for image, mask, defect in zip(category.test, category.masks, category.defects):
        index = counters[defect] = counters.get(defect, -1) + 1
        folder = os.path.join(base, "test", defect)
        os.makedirs(folder, exist_ok=True)
        write_png(os.path.join(folder, f"{index:03d}.png"), to_uint8(image))
        if defect != "good":
            truth = os.path.join(base, "ground_truth", defect)
            os.makedirs(truth, exist_ok=True)
            write_png(os.path.join(truth, f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return base
