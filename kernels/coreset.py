"""Greedy k-center coreset selection: the distance update at the heart of each greedy step."""

import numpy as np
from numba import njit, prange

from ._config import REDUCTION_JIT_OPTIONS, SERIAL_REDUCTION_JIT_OPTIONS

# Relative slack on the pruning test below, far above the float64 rounding of the distances
# involved, so rounding can never prune a point the exact arithmetic would update.
PRUNE_SLACK = 1e-9


@njit(**SERIAL_REDUCTION_JIT_OPTIONS)
def _squared_distance(features, i, j):
    total = 0.0
    for d in range(features.shape[1]):
        diff = np.float64(features[i, d]) - features[j, d]
        total += diff * diff
    return total


@njit(**REDUCTION_JIT_OPTIONS)
def update_min_distances(features, selected, count, min_dist, nearest):
    """Shrink each point's distance to the selected set by the newest center, skipping provable non-changes.

    Shapes: features [N, D]; selected [K] int64 rows, of which the first count are chosen and
            selected[count - 1] is the new center; min_dist [N] float64 squared distances and
            nearest [N] int64 (position in selected of each point's closest center), updated in place.
    Math: min_dist[i] = min(min_dist[i], |f_i - f_new|^2), nearest[i] = count - 1 where it shrinks.
          Triangle inequality: |f_i - f_new| >= |f_new - c| - |f_i - c| for the point's closest center c,
          so when |f_new - c|^2 > 4 min_dist[i] the new center cannot be closer and the D-dimensional
          distance is not computed (Elkan's k-means bound). Late in the greedy order most points are
          skipped, and the cost per step falls from N*D to about N + count*D.
          Already selected points carry -1 and are never re-picked or updated.
    Parallel: over centers for the center-to-center distances, then over points; each iteration
              writes only its own element.
    """
    n = features.shape[0]
    new = selected[count - 1]
    center_dist = np.empty(count, dtype=np.float64)
    for t in prange(count):
        center_dist[t] = _squared_distance(features, new, selected[t])
    for i in prange(n):
        if center_dist[nearest[i]] > 4.0 * min_dist[i] * (1.0 + PRUNE_SLACK):
            continue
        total = _squared_distance(features, i, new)
        if total < min_dist[i]:
            min_dist[i] = total
            nearest[i] = count - 1
