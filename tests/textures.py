"""Small synthetic normal textures and defects for behaviour tests (made here, never downloaded)."""

import numpy as np


def textures(n, size=(48, 48), seed=0):
    """Smooth periodic stripes with a random phase and mild noise, RGB in [0, 1], float32 [n, 3, H, W]."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.2 * np.sin(xx * 0.6 + phase[0]) + 0.15 * np.sin(yy * 0.45 + phase[1])
        for c in range(3):
            images[i, c] = base * (0.8 + 0.1 * c) + rng.normal(0, 0.03, (h, w))
    return np.clip(images, 0, 1)


def with_defects(images, seed=1):
    """A copy of the images, each with a square stain or a dark scratch, and the defect masks [n, H, W]."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    n, _, h, w = images.shape
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        if i % 2 == 0:
            s = rng.integers(6, 11)
            y, x = rng.integers(0, h - s), rng.integers(0, w - s)
            masks[i, y:y + s, x:x + s] = True
            out[i][:, masks[i]] = rng.choice([0.05, 0.95], size=(3, 1))  # clearly off the 0.3-0.8 texture
        else:
            row = rng.integers(4, h - 4)
            masks[i, row:row + 2, 4:w - 4] = True
            out[i][:, masks[i]] = 0.02
    return out, masks


def auroc(normal_scores, anomalous_scores):
    """Probability that a random anomalous score exceeds a random normal one (ties count 1/2)."""
    a = np.asarray(anomalous_scores)[:, None]
    b = np.asarray(normal_scores)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))
