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
