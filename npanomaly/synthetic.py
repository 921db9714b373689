"""The built-in data set: procedural textures with MVTec-like defects and exact masks.

Three texture styles (``woven``, ``grid``, ``granular``) and four defect kinds (``scratch``, ``hole``,
``stain``, ``foreign`` patch), on which nearly every configuration scores 1.000; and a hard set
(``HARD_STYLES``: ``grass``, ``gravel``, ``sand``) modelled on what makes real inspection hard:
stochastic textures with natural 1/f spectra, uneven lighting and sensor noise, and subtle defects
made of the texture's own colours (``HARD_DEFECTS``). Everything is drawn from ``numpy.random.default_rng`` seeded by
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
#: The hard data set: stochastic, photograph-like textures (grass-, gravel- and sand-like) with
#: uneven lighting and sensor noise, and defects made of the texture's own colours.
HARD_STYLES = ("grass", "gravel", "sand")
HARD_DEFECTS = ("displaced", "blurred", "faint_scratch", "faint_stain")
SENSOR_NOISE = 0.012  # the hard images' per-pixel noise (sigma, in [0, 1] units)


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


def spectral_noise(size, rng, beta, stretch=1.0, angle=0.0):
    """A random-phase field [H, W] with power spectrum ~ 1 / f^beta (zero mean, unit deviation).

    Natural images have power spectra close to 1 / f^2; random phases with a matched amplitude
    give a stochastic texture with the right mix of scales and no repeating structure. stretch > 1
    elongates the field along the direction angle (grass blades).
    """
    height, width = size
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    frequency = np.hypot(along * stretch, across / stretch)
    amplitude = np.maximum(frequency, 1.0 / max(height, width)) ** (-beta / 2)
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0.0, 2 * np.pi, amplitude.shape)
    field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
    return (field - field.mean()) / (field.std() + 1e-12)


def _palette(values, colours):
    """values [H, W] in [0, 1] -> RGB [3, H, W] by piecewise-linear interpolation between colours."""
    colours = np.asarray(colours, dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(colours))
    return np.stack([np.interp(values, stops, colours[:, channel]) for channel in range(3)])


def hard_texture(style, size, rng):
    """One normal image of a hard style, float32 [3, H, W] in [0, 1].

    grass: elongated 1/f^1.4 noise at a random blade angle plus fine detail, green to yellow;
    gravel: stones from thresholded band-limited noise, each stone's brightness varying, grey-brown;
    sand: isotropic 1/f^2 noise and a fine grain, beige. Every image also gets a random
    low-frequency illumination field (+-15%) and sensor noise (sigma 0.012), so no two normal
    images are alike and the defects must be told from the texture's own variation.
    """
    if style == "grass":
        angle = np.pi / 2 + rng.uniform(-0.35, 0.35)
        field = 0.8 * spectral_noise(size, rng, 1.4, stretch=4.0, angle=angle) + 0.4 * spectral_noise(size, rng, 0.6)
        image = _palette(1 / (1 + np.exp(-1.6 * field)), [(0.10, 0.22, 0.06), (0.28, 0.45, 0.12), (0.62, 0.66, 0.30)])
    elif style == "gravel":
        blobs = spectral_noise(size, rng, 3.0)
        stones = 1 / (1 + np.exp(-6.0 * (blobs - 0.2)))
        shade = spectral_noise(size, rng, 2.2)
        detail = spectral_noise(size, rng, 0.8)
        values = np.clip(0.25 + 0.45 * stones + 0.12 * shade * stones + 0.06 * detail, 0, 1)
        image = _palette(values, [(0.18, 0.16, 0.14), (0.45, 0.42, 0.38), (0.72, 0.68, 0.60)])
    elif style == "sand":
        field = 0.7 * spectral_noise(size, rng, 2.0) + 0.5 * spectral_noise(size, rng, 0.3)
        image = _palette(1 / (1 + np.exp(-1.2 * field)), [(0.55, 0.45, 0.32), (0.78, 0.68, 0.52), (0.90, 0.84, 0.70)])
    else:
        raise ValueError(f"style must be one of {HARD_STYLES}, got {style!r}")
    light = 1.0 + 0.15 * spectral_noise(size, rng, 5.0)
    image = image * light[None] + rng.normal(0.0, SENSOR_NOISE, (3,) + tuple(size))
    return np.clip(image, 0, 1).astype(np.float32)


def _blob(size, rng, low, high):
    """A random wobbly blob mask [H, W] bool of radius low..high times the image side."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
    radius = rng.uniform(low, high) * min(height, width)
    wobble = 1 + 0.25 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= radius * wobble


def add_hard_defect(image, kind, rng):
    """A copy of a hard-style image [3, H, W] with one subtle defect, and its mask [H, W] bool.

    displaced: a blob filled with the same image magnified 1.6-2x (its own colours at a coarser
    grain: texture that does not belong there);
    blurred: a blob out of focus (Gaussian sigma 0.9-1.3, then fresh sensor noise: the finest
    detail is gone, colours and noise stay);
    faint_scratch: a line 1.4-2 pixels wide, 25-35% brighter or darker;
    faint_stain: a blob whose colour moves 28-38% of the way toward a brown tint.
    (Strengths chosen on the training seeds 0 and 1 so that PatchCore with EfficientNet-Lite0 finds
    each kind sometimes but not always; benchmarks/bench_quality.py --hard.)
    """
    _, height, width = image.shape
    out = image.copy()
    if kind == "displaced":
        mask = _blob((height, width), rng, 0.08, 0.14)
        zoom = rng.uniform(1.6, 2.0)
        cy, cx = rng.uniform(0.3, 0.7, 2) * (height, width)
        rows = np.clip(np.round(cy + (np.arange(height) - cy) / zoom).astype(int), 0, height - 1)
        cols = np.clip(np.round(cx + (np.arange(width) - cx) / zoom).astype(int), 0, width - 1)
        magnified = image[:, rows][:, :, cols]
        out[:, mask] = magnified[:, mask]
    elif kind == "blurred":
        mask = _blob((height, width), rng, 0.08, 0.14)
        blurred = kernels.gaussian_blur(np.ascontiguousarray(image[None]), rng.uniform(0.9, 1.3))[0]
        # out of focus before the sensor: the blur takes the detail, the sensor noise comes back
        out[:, mask] = blurred[:, mask] + rng.normal(0.0, SENSOR_NOISE, (3, int(mask.sum())))
    elif kind == "faint_scratch":
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        y0, x0 = rng.uniform(0.25, 0.75, 2) * (height, width)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.5) * min(height, width)
        dy, dx = np.sin(angle), np.cos(angle)
        along = np.clip((yy - y0) * dy + (xx - x0) * dx, -length / 2, length / 2)
        mask = np.hypot(yy - (y0 + along * dy), xx - (x0 + along * dx)) <= rng.uniform(0.7, 1.0)
        out[:, mask] *= 1.0 + rng.choice([-1, 1]) * rng.uniform(0.25, 0.35)
    elif kind == "faint_stain":
        mask = _blob((height, width), rng, 0.07, 0.12)
        tint = np.array([0.42, 0.30, 0.18])[:, None]
        weight = rng.uniform(0.28, 0.38)
        out[:, mask] = (1 - weight) * out[:, mask] + weight * tint
    else:
        raise ValueError(f"kind must be one of {HARD_DEFECTS}, got {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32), mask


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
    """A deterministic synthetic category; defect kinds cycle through DEFECTS (HARD_DEFECTS for
    the HARD_STYLES)."""
    if style not in STYLES + HARD_STYLES:
        raise ValueError(f"style must be one of {STYLES + HARD_STYLES}, got {style!r}")
    size = (size, size) if np.isscalar(size) else tuple(size)
    if min(size) < 16:
        raise ValueError(f"size must be at least 16x16 for the defects to fit, got {size}")
    hard = style in HARD_STYLES
    rng = np.random.default_rng([seed, (STYLES + HARD_STYLES).index(style)])
    normal = (lambda: hard_texture(style, size, rng)) if hard else (lambda: texture(style, size, rng))
    train = np.stack([normal() for _ in range(n_train)])
    test, masks, defects = [], [], []
    for _ in range(n_test_good):
        test.append(normal())
        masks.append(np.zeros(size, bool))
        defects.append("good")
    kinds = HARD_DEFECTS if hard else DEFECTS
    for index in range(n_test_defect):
        kind = kinds[index % len(kinds)]
        image, mask = add_hard_defect(normal(), kind, rng) if hard else add_defect(normal(), kind, rng, style)
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
