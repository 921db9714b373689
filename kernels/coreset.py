"""Greedy k-center coreset selection: the distance update at the heart of each greedy step."""

import numpy as np
from numba import njit, prange

from ._config import REDUCTION_JIT_OPTIONS


@njit(**REDUCTION_JIT_OPTIONS)
def update_min_distances(features, center, min_dist):
    """Shrink each point's distance to the selected set by the newly selected center.

    Shapes: features [N, D], center int (a row of features), min_dist [N] float64, updated in place.
    Math: min_dist[i] = min(min_dist[i], sum_d (features[i, d] - features[center, d])^2), in float64.
          Squared distances order the points exactly as distances do, so no square root is taken.
          Already selected points carry -1 and stay below every distance, so they are never re-picked.
    Parallel: over points; each iteration writes only its own min_dist[i].
    """
    n, dim = features.shape
    for i in prange(n):
        total = 0.0
        for d in range(dim):
            diff = np.float64(features[i, d]) - features[center, d]
            total += diff * diff
        if total < min_dist[i]:
            min_dist[i] = total
