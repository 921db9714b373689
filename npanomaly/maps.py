"""Patch scores -> image-size anomaly maps."""

import numpy as np

from npanomaly import kernels


def upsample_and_blur(patch_scores, out_size, sigma):
    """Bilinearly upsample [N, h, w] patch scores to out_size = (H, W), then Gaussian-blur them.

    The blur (sigma in output pixels, anomalib's default 4) removes the blockiness of the patch grid.
    sigma = 0 skips it. Returns float32 [N, H, W].
    """
    maps = kernels.bilinear_resize(np.ascontiguousarray(patch_scores[:, None], dtype=np.float32), *out_size)
    if sigma > 0:
        maps = kernels.gaussian_blur(maps, float(sigma))
    return maps[:, 0]


def top_mean(maps, fraction):
    """Image scores [N] float64 from anomaly maps [N, H, W]: the mean of each map's
    max(1, ceil(fraction * H * W)) largest values. fraction 0 gives the maximum (one value).

    A defect covers many pixels; a single hot pixel of a normal image does not. Averaging the top of
    the map keeps the first and dampens the second (docs/quality.md measures it for STFPM's maps).
    """
    flat = maps.reshape(len(maps), -1)
    count = max(1, int(np.ceil(fraction * flat.shape[1])))
    if count == 1:
        return flat.max(axis=1).astype(np.float64)
    top = np.partition(flat, flat.shape[1] - count, axis=1)[:, flat.shape[1] - count:]
    return top.astype(np.float64).mean(axis=1)
