"""Exact k-nearest-neighbour search in blocks: BLAS for the bulk, float64 for the last word.

The search runs in two stages (orchestrated by ``npanomaly.search.knn``):

1. Screening. For a block of queries and a block of the bank, both centred at the bank's mean
   (which leaves distances unchanged and makes the rounding error bound small), squared distances
   are expanded as ``|q|^2 + |b|^2 - 2 q.b`` with the dot products from one float32 BLAS product. Each query keeps
   its ``width`` smallest screened distances (``merge_block_candidates``). Memory: one
   [query block, bank block] matrix, never [Q, M].
2. Refinement. The candidates are re-measured exactly in float64 as ``sum((q - b)^2)`` and the k
   best taken, ties going to the lower bank index (``refine_candidates``). A query whose candidate
   list could have missed a true neighbour (the last candidate is within the screening error bound
   of the k-th) is searched again exhaustively in float64 (``exact_scan``), so the result always
   equals a float64 brute force.
"""

import numpy as np
from numba import njit, prange

from ._config import JIT_OPTIONS, KNN_SCREEN_CHUNK, PARALLEL_JIT_OPTIONS, REDUCTION_JIT_OPTIONS


def block_dots(queries, bank, out):
    """The screening product of one block: out[...] = queries @ bank.T through BLAS.

    Shapes: queries [Qb, D], bank [Mb, D] -> out [Qb, Mb] (written in place and returned).
    """
    return np.matmul(queries, bank.T, out=out)


@njit(**REDUCTION_JIT_OPTIONS)
def squared_norms(x):
    """Row-wise squared Euclidean norms, accumulated in float64.

    Shapes: x [N, D] -> [N] float64.
    Parallel: over rows.
    """
    n, dim = x.shape
    out = np.empty(n, dtype=np.float64)
    for i in prange(n):
        total = 0.0
        for d in range(dim):
            total += np.float64(x[i, d]) * x[i, d]
        out[i] = total
    return out


@njit(**JIT_OPTIONS)
def _insert_sorted(dist, index, d2, row):
    """Insert (d2, row) into the ascending list dist/index, dropping its last entry.

    Equal distances keep their order, so with rows offered in increasing order the lower row wins ties.
    """
    slot = dist.size - 1
    while slot > 0 and dist[slot - 1] > d2:
        dist[slot] = dist[slot - 1]
        index[slot] = index[slot - 1]
        slot -= 1
    dist[slot] = d2
    index[slot] = row


@njit(**JIT_OPTIONS)
def _count_below(dots_row, bank_norms, limit):
    """How many j have |b_j|^2 - 2 q.b_j < limit: a branch-free loop the compiler vectorises.

    Shapes: dots_row [n] (q.b_j), bank_norms [n] float64. Callers pass slices, so the indices start
    at 0 and the compiler can drop the negative-index handling that would stop vectorisation.
    """
    hits = 0
    for j in range(dots_row.size):
        hits += bank_norms[j] - 2.0 * dots_row[j] < limit
    return hits


@njit(**PARALLEL_JIT_OPTIONS)
def merge_block_candidates(dots, query_norms, bank_norms, bank_offset, exclude_offset, best_dist, best_index):
    """Fold one block of screened distances into each query's sorted candidate list.

    Shapes: dots [Qb, Mb] (q.b for this block), query_norms [Qb], bank_norms [Mb] float64,
            best_dist [Qb, width] float64 ascending and best_index [Qb, width] int64, updated in place.
    Math: d2 = max(|q|^2 + |b|^2 - 2 q.b, 0) for bank row bank_offset + j, inserted when below the
          list's last entry. When exclude_offset >= 0 the bank is the query set itself and query row
          i never lists bank row exclude_offset + i.
          Each row is taken KNN_SCREEN_CHUNK columns at a time: a vectorised count of the elements
          that beat the current worst candidate, then the (branchy, scalar) insertion walk only over
          chunks where the count is not zero. Most chunks have nothing to insert, so this skips
          most of the walk that a whole-row count would still pay for any row with a single hit
          (measured: half the merge time on the knn benchmark).
    Parallel: over query rows; each owns its own candidate row.
    """
    rows, cols = dots.shape
    width = best_dist.shape[1]
    for i in prange(rows):
        dist = best_dist[i]
        index = best_index[i]
        for c0 in range(0, cols, KNN_SCREEN_CHUNK):
            c1 = min(cols, c0 + KNN_SCREEN_CHUNK)
            limit = dist[width - 1] - query_norms[i]
            if _count_below(dots[i, c0:c1], bank_norms[c0:c1], limit) == 0:
                continue
            for j in range(c0, c1):
                partial = bank_norms[j] - 2.0 * dots[i, j]
                if partial >= limit or (exclude_offset >= 0 and bank_offset + j == exclude_offset + i):
                    continue
                d2 = max(query_norms[i] + partial, 0.0)
                if d2 < dist[width - 1]:  # not always so after the clamp at 0
                    _insert_sorted(dist, index, d2, bank_offset + j)
                    limit = dist[width - 1] - query_norms[i]


@njit(**PARALLEL_JIT_OPTIONS)
def refine_candidates(queries, bank, candidates, k, error_bound, screened, needs_exact, out_dist, out_index):
    """Exact float64 distances to each query's candidates; the k best, ties to the lower index.

    Shapes: queries [Q, D], bank [M, D], candidates [Q, width] int64 (-1 = empty slot),
            error_bound [Q] and screened [Q, width] float64 (the stage-1 squared distances),
            -> needs_exact [Q] bool, out_dist [Q, k] float64 (squared), out_index [Q, k] int64.
    Math: exact d2 = sum_d (q_d - b_d)^2. The screened value of every bank row is within
          error_bound[i] of its exact one, so a bank row outside the list is provably no closer than
          the k-th exact candidate unless the list is full and its last screened distance is within
          2 * error_bound of that k-th distance; then needs_exact[i] is set for an exhaustive search.
          Only candidates screened within 2 * error_bound of the k-th screened distance are
          re-measured: any other is farther, exactly, than each of the first k (usually all but
          one candidate of a 1-NN query is skipped this way).
    Parallel: over queries.
    """
    n_queries, dim = queries.shape
    width = candidates.shape[1]
    for i in prange(n_queries):
        exact = np.full(width, np.inf)
        reach = screened[i, k - 1] + 2.0 * error_bound[i]
        for c in range(width):
            b = candidates[i, c]
            if b < 0 or screened[i, c] > reach:
                continue
            total = 0.0
            for d in range(dim):
                diff = np.float64(queries[i, d]) - bank[b, d]
                total += diff * diff
            exact[c] = total
        # Selection of the k smallest by (distance, index): width is small, so a simple scan.
        taken = np.zeros(width, dtype=np.bool_)
        for slot in range(k):
            best = -1
            for c in range(width):
                if taken[c] or exact[c] == np.inf:  # empty slots and candidates not re-measured
                    continue
                if best < 0 or exact[c] < exact[best] or (exact[c] == exact[best]
                                                          and candidates[i, c] < candidates[i, best]):
                    best = c
            if best < 0:
                out_dist[i, slot] = np.inf
                out_index[i, slot] = -1
            else:
                taken[best] = True
                out_dist[i, slot] = exact[best]
                out_index[i, slot] = candidates[i, best]
        last = screened[i, width - 1]
        needs_exact[i] = candidates[i, width - 1] >= 0 and last - 2.0 * error_bound[i] <= out_dist[i, k - 1]


@njit(**PARALLEL_JIT_OPTIONS)
def exact_scan(queries, bank, rows, k, exclude_offset, out_dist, out_index):
    """Exhaustive float64 k-nearest search for the listed query rows (the rare fallback).

    Shapes: queries [Q, D], bank [M, D], rows [R] int64 -> out_dist, out_index [Q, k] rows overwritten.
    Math: as refine_candidates, over every bank row (skipping bank row exclude_offset + i for query
          row i when exclude_offset >= 0, as merge_block_candidates does).
    Parallel: over the listed rows, each writing its own output row.
    """
    n_bank, dim = bank.shape
    for r in prange(rows.size):
        i = rows[r]
        dist = np.full(k, np.inf)
        index = np.full(k, -1, dtype=np.int64)
        for b in range(n_bank):
            if exclude_offset >= 0 and b == exclude_offset + i:
                continue
            total = 0.0
            for d in range(dim):
                diff = np.float64(queries[i, d]) - bank[b, d]
                total += diff * diff
            if total < dist[k - 1]:
                _insert_sorted(dist, index, total, b)
        out_dist[i] = dist
        out_index[i] = index


def dot_error_bound(query_norms, max_bank_norm, dim, itemsize):
    """Bound on |screened d2 - exact d2| for each query (float64).

    The screening sees q~ = fl(q - c) and b~ = fl(b - c), centred at some c and rounded once
    (search.knn centres at the bank's mean), and computes |q~|^2 + |b~|^2 - 2 q~.b~ with float64
    norms. Two errors, each proportional to |q~|^2 + |b~|^2 (the arguments are those centred norms):
    - the float dot product of length D is off by at most gamma_D |q~| |b~| <= gamma_D (|q~|^2 + |b~|^2) / 2
      (Higham, Accuracy and Stability, 3.1; any summation order), and the -2 q~.b~ term doubles it;
    - the centring's rounding e = (q~ - b~) - (q - b) has |e| <= u' (|q~| + |b~|), u' = u / (1 - u),
      so | |q - b|^2 - |q~ - b~|^2 | <= 2 |q~ - b~| |e| + |e|^2 <= (4 u' + 2 u'^2) (|q~|^2 + |b~|^2).
    gamma_n = n u / (1 - n u) grows faster than linearly in n, so gamma_D + 4u' + 2u'^2 + the
    float64 norms' negligible term are covered by gamma_{D + 8}.
    """
    unit = 2.0 ** -24 if itemsize == 4 else 2.0 ** -53
    n = dim + 8
    gamma = n * unit / (1.0 - n * unit)
    return gamma * (query_norms + max_bank_norm) + 1e-300
