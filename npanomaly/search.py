"""Exact nearest-neighbour search and greedy k-center coreset selection over feature matrices.

Both run in bounded memory: ``knn`` holds one [query block, bank block] matrix of distances at a
time (never [Q, M]); ``greedy_coreset`` holds one distance per point (never [N, N]).
"""

import numpy as np

from npanomaly import kernels
from npanomaly._progress import Progress
from npanomaly._validation import check_array, check_finite, check_positive_int
from npanomaly.kernels import _config

__all__ = ["StreamingProjection", "greedy_coreset", "greedy_select", "knn", "random_projection"]


def _check_matrix(x, name):
    x = check_array(x, name, 2)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [rows, features] matrix, got shape {x.shape}")
    return check_finite(x, name)


def knn(queries, bank, k=1, *, exclude_self=False, device="cpu", squared=False):
    """The k nearest bank rows of every query row, exactly (Euclidean distance).

    Args:
        queries: [Q, D] float32 or float64.
        bank: [M, D], same dtype as queries.
        k: how many neighbours, 1 <= k <= M (M - 1 with exclude_self).
        exclude_self: the bank is the query set itself and row i may not be its own neighbour
            (used for each bank vector's nearest *other* vector).
        device: "cpu" or "cuda" (the screening products run as tiled numba.cuda kernels).
        squared: return the exact squared distances in float64 instead (what merging the results
            of several banks exactly needs: two float32 distances can round to one value).

    Returns:
        (distances [Q, k] float32 ascending, indices [Q, k] int64). Equal distances are ordered
        by bank index. The result equals a float64 brute force: BLAS screens candidates (on
        coordinates centred at the bank's mean), float64 re-measures them in the original
        coordinates, and queries whose screening was not conclusive are searched exhaustively.
        Memory: one centred copy of the bank and of a query block, and one block of products.
    """
    queries = _check_matrix(queries, "queries")
    bank = _check_matrix(bank, "bank")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries and bank must have the same number of features, got shapes "
                         f"{queries.shape} and {bank.shape}")
    if queries.dtype != bank.dtype:
        raise TypeError(f"queries and bank must have the same dtype, got {queries.dtype} and {bank.dtype}")
    if exclude_self and queries.shape[0] != bank.shape[0]:
        raise ValueError(f"exclude_self needs the queries to be the bank itself, got shapes {queries.shape} "
                         f"and {bank.shape}")
    k = check_positive_int(k, "k")
    available = bank.shape[0] - (1 if exclude_self else 0)
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} bank rows available"
                         f"{' besides each query itself' if exclude_self else ''}")

    table = kernels.for_device(device)
    n_queries, dim = queries.shape
    width = min(k + _config.KNN_EXTRA_CANDIDATES, available)
    # Screen on coordinates centred at the bank's mean: distances do not change, but the norms in
    # the screening error bound (|q|^2 + |b|^2) shrink to the spread of the data. Post-ReLU
    # features sit far from the origin (|q|^2 ~ 1.5 where neighbours are ~0.001 apart), and the
    # uncentred bound left ~1% of queries inconclusive, each an exhaustive float64 scan.
    center = bank.mean(axis=0, dtype=np.float64).astype(bank.dtype)
    centered_bank = bank - center
    bank_norms = table.squared_norms(centered_bank)
    max_bank_norm = float(bank_norms.max())
    distances = np.empty((n_queries, k), dtype=np.float64)
    indices = np.empty((n_queries, k), dtype=np.int64)
    # One buffer for every block's products: allocating 32 MiB per block would page-fault it in anew.
    buffer = np.empty(min(n_queries, _config.KNN_QUERY_BLOCK) * min(bank.shape[0], _config.KNN_BANK_BLOCK),
                      dtype=queries.dtype)
    for q0 in range(0, n_queries, _config.KNN_QUERY_BLOCK):
        q1 = min(n_queries, q0 + _config.KNN_QUERY_BLOCK)
        block = queries[q0:q1]
        centered = block - center
        exclude_offset = q0 if exclude_self else -1  # bank row q0 + i is query row i itself
        query_norms = table.squared_norms(centered)
        best_dist = np.full((q1 - q0, width), np.inf)
        best_index = np.full((q1 - q0, width), -1, dtype=np.int64)
        for m0 in range(0, bank.shape[0], _config.KNN_BANK_BLOCK):
            m1 = min(bank.shape[0], m0 + _config.KNN_BANK_BLOCK)
            dots = buffer[: (q1 - q0) * (m1 - m0)].reshape(q1 - q0, m1 - m0)
            table.block_dots(centered, centered_bank[m0:m1], dots)
            table.merge_block_candidates(dots, query_norms, bank_norms[m0:m1], m0, exclude_offset, best_dist,
                                         best_index)
        error = table.dot_error_bound(query_norms, max_bank_norm, dim, queries.itemsize)
        needs_exact = np.empty(q1 - q0, dtype=np.bool_)
        # the exact stages measure the caller's own coordinates, not the rounded centred ones
        table.refine_candidates(block, bank, best_index, k, error, best_dist, needs_exact,
                                distances[q0:q1], indices[q0:q1])
        rows = np.flatnonzero(needs_exact)
        if rows.size:
            table.exact_scan(block, bank, rows, k, exclude_offset, distances[q0:q1], indices[q0:q1])
    return (distances if squared else np.sqrt(distances).astype(np.float32)), indices


#: Bytes of rows per projection product. The rows are always copied into one block buffer of
#: this size first, so a fit that streams its features and one that holds them all make exactly
#: the same BLAS calls on the same bits (and select the same coreset).
PROJECTION_BLOCK_BYTES = 8 * 1024 * 1024


def random_projection(dim, projection_dim, seed, dtype=np.float32):
    """The seeded Gaussian Johnson-Lindenstrauss matrix [dim, projection_dim] / sqrt(projection_dim),
    or None when projection_dim is None or >= dim (then distances are measured exactly)."""
    if projection_dim is None or projection_dim >= dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, projection_dim)) / np.sqrt(projection_dim)).astype(dtype)


class StreamingProjection:
    """Rows times a projection matrix, computed as the rows arrive in any number of pieces.

    ``add(rows)`` as often as needed, then ``finish()`` returns all projected rows [N, p]. The
    product is taken in fixed blocks of rows counted from the first row, through one buffer, so
    the result does not depend on how the rows were cut into pieces. expected_rows (when known)
    lets the result be allocated once.
    """

    def __init__(self, matrix, expected_rows=None):
        self.matrix = matrix
        dim, self.width = matrix.shape
        self.block = np.empty((max(1, PROJECTION_BLOCK_BYTES // (dim * matrix.itemsize)), dim), matrix.dtype)
        self.filled = 0
        self.rows = 0
        self.out = None if expected_rows is None else np.empty((expected_rows, self.width), matrix.dtype)
        self.parts = []

    def add(self, rows):
        start = 0
        while start < rows.shape[0]:
            take = min(self.block.shape[0] - self.filled, rows.shape[0] - start)
            self.block[self.filled:self.filled + take] = rows[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.block.shape[0]:
                self._flush()

    def _flush(self):
        rows = self.block[:self.filled]
        if self.out is None:
            self.parts.append(rows @ self.matrix)
        else:
            np.matmul(rows, self.matrix, out=self.out[self.rows:self.rows + self.filled])
        self.rows += self.filled
        self.filled = 0

    def finish(self):
        """All projected rows [N, p] in arrival order."""
        if self.filled:
            self._flush()
        if self.out is None:
            self.out, self.parts = np.concatenate(self.parts), []
        return self.out


def greedy_coreset(features, n_select, projection_dim=128, start=0, seed=0, progress=False, device="cpu"):
    """Indices of a greedy k-center coreset (PatchCore's memory-bank subsampling).

    Starting from row ``start``, repeatedly adds the row farthest from everything selected so far
    (ties to the lowest index), which minimises the largest distance from any row to the coreset
    within a factor 2 of the optimum. With ``projection_dim`` (default 128, as the PatchCore
    authors) distances are measured after a seeded Gaussian random projection to that many
    dimensions (Johnson-Lindenstrauss), which keeps them close at a fraction of the cost;
    ``projection_dim=None`` (or >= D) measures them in the original space: exact k-center greedy.

    Args:
        features: [N, D] float32 or float64.
        n_select: 1 <= n_select <= N.
        projection_dim: int >= 1 or None.
        start: the first selected row, 0 <= start < N.
        seed: seed of the projection matrix.
        progress: show a progress bar on stderr.
        device: "cpu" or "cuda" (the distance update runs as a numba.cuda kernel).

    Returns:
        int64 [n_select] row indices in selection order. Memory: the projected rows [N, p], a
        float64 and an int64 per row.
    """
    features = _check_matrix(features, "features")
    if projection_dim is not None:
        projection_dim = check_positive_int(projection_dim, "projection_dim")
    matrix = random_projection(features.shape[1], projection_dim, seed, features.dtype)
    if matrix is not None:
        projection = StreamingProjection(matrix, features.shape[0])
        projection.add(features)
        features = projection.finish()
    return greedy_select(features, n_select, start, progress, device)


def greedy_select(points, n_select, start=0, progress=False, device="cpu"):
    """The greedy k-center selection of greedy_coreset on points [N, p] as given (already projected,
    or exact): n_select row indices in selection order."""
    n = points.shape[0]
    n_select = check_positive_int(n_select, "n_select")
    if n_select > n:
        raise ValueError(f"n_select={n_select} exceeds the {n} rows of features")
    start = check_positive_int(start, "start", minimum=0)
    if start >= n:
        raise ValueError(f"start={start} is not a row of features (shape {points.shape})")
    table = kernels.for_device(device)
    min_dist = np.full(n, np.inf)
    nearest = np.zeros(n, dtype=np.int64)
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = start
    with Progress(n_select - 1, "coreset", progress) as bar:
        for step in range(1, n_select):
            table.update_min_distances(points, selected, step, min_dist, nearest)
            min_dist[selected[step - 1]] = -1.0
            selected[step] = np.argmax(min_dist)  # the first maximum: ties go to the lowest index
            bar.update()
    return selected
