"""PatchCore across machines with Dask: fit on partitions, score on every worker, shard a large bank.

    pip install npanomaly[dask]

    from dask.distributed import Client
    from npanomaly import distributed
    client = Client("tcp://scheduler:8786")             # or Client(LocalCluster(...)), or None: the current one
    model = distributed.fit(npanomaly.PatchCore(), paths, size=224, client=client)
    scores = distributed.score_samples(model, test_paths, client=client)

``images`` is a dask array [N, C, H, W] (chunked along N; each chunk is a partition) or a list of
image files with ``size=`` (cut into ``partitions`` lists; default: two per worker). Workers read
their own partition: files must be reachable from every worker under the same paths (a shared
file system or object store mount).

How the work is split:

- **fit**: each worker extracts its partition's patch features (spilled to its own disk when
  large, as ``PatchCore.fit``) and selects a local greedy coreset; the client gathers the local
  coresets and the final bank is the greedy coreset of their union (composable k-center coresets,
  see ``fit`` for the bound this keeps).
- **score_samples / anomaly_map**: the fitted model is sent to each worker once (a worker plugin,
  also sent to workers that join or restart later), not once per task; each partition is scored
  where it is read and results come back in input order. Partitions are cut at multiples of the
  model's batch_size, so every image is scored in the same batch as on one machine and the
  results are the same numbers exactly.
- **ShardedBank**: a memory bank larger than one worker stays on the workers in row shards; each
  query block is searched on every shard and the per-shard top-k are merged exactly.

A worker that dies is replaced and its tasks rerun by Dask (up to the scheduler's
``allowed-failures``, 3 by default); when Dask gives up, the call fails with one RuntimeError and
the model is left as it was: never a bank built from part of the data.
"""

import collections
import uuid

import numpy as np

try:
    import dask
    import dask.array
    import distributed
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("npanomaly.distributed needs Dask: pip install npanomaly[dask] "
                      "(installs dask[distributed])") from error

from npanomaly import search
from npanomaly._progress import Progress
from npanomaly._validation import check_fitted, check_fraction, check_positive_int, pair
from npanomaly.detector import Detector
from npanomaly.patchcore import PatchCore, nearest_other_threshold, reweighted_scores
from npanomaly.maps import upsample_and_blur

#: Images per piece a sharded search handles at once, in batches (a piece's features wait on a worker).
SHARDED_PIECE_BATCHES = 4

__all__ = ["ShardedBank", "anomaly_map", "calibrate_threshold", "fit", "score_samples", "scores_and_maps"]


# ----------------------------------------------------------------- the model on the workers
class ModelPlugin(distributed.WorkerPlugin):
    """Builds a model once on each worker from its config and arrays (what save() writes)."""

    #: models this worker process has built (each fit or scoring call builds one per worker)
    builds = 0

    def __init__(self, name, kind, config, arrays, threshold, image_size):
        self.name, self.kind, self.config, self.arrays = name, kind, config, arrays
        self.threshold, self.image_size = threshold, image_size
        self.model = None

    def setup(self, worker):
        from npanomaly.detector import _REGISTRY

        model = _REGISTRY[self.kind](**self.config)
        if self.threshold is None:  # an unfitted PatchCore: only its backbone's weights
            model.backbone.load_state_dict({k[len("backbone/"):]: v for k, v in self.arrays.items()})
        else:
            model._restore(self.arrays)
            model.threshold_, model.image_size_ = self.threshold, tuple(self.image_size)
        self.model = model
        ModelPlugin.builds += 1


def _worker_model(name):
    return distributed.get_worker().plugins[name].model


class _ModelOnWorkers:
    """``with _ModelOnWorkers(client, model, fitted, what):`` registers the plugin, removes it at
    the end; ``what`` names the step in the error when a worker dies while the model is sent."""

    def __init__(self, client, model, fitted, what, bank=True):
        self.client, self.name, self.what = client, f"npanomaly-model-{uuid.uuid4().hex}", what
        if fitted:
            arrays = model._arrays()
            if not bank:
                arrays["memory_bank"] = model.memory_bank_[:1]  # a placeholder: the shards hold the bank
            plugin = ModelPlugin(self.name, type(model).__name__, model._config(), arrays, model.threshold_,
                                 model.image_size_)
        else:
            arrays = {f"backbone/{k}": v for k, v in model.backbone.state_dict().items()}
            plugin = ModelPlugin(self.name, type(model).__name__, model._config(), arrays, None, None)
        self.plugin = plugin

    def __enter__(self):
        try:
            self.client.register_plugin(self.plugin, name=self.name)
        except OSError as error:  # distributed's CommClosedError: a worker died during the broadcast
            self.__exit__()
            raise RuntimeError(f"{self.what} failed: a worker died while the model was being sent to the "
                               f"workers ({error}); nothing was kept") from error
        return self.name

    def __exit__(self, *exc):
        try:
            self.client.unregister_worker_plugin(self.name)
        except Exception:  # noqa: BLE001 - a cluster shutting down must not hide the real error
            pass


# ----------------------------------------------------------------- partitions
def _client(client):
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError as error:
        raise ValueError("no Dask client: pass client=Client(...) (or start one: distributed.Client(address), "
                         "LocalCluster for one machine)") from error


def _partitions(images, batch_size, partitions, client, size, name="images", max_images=None):
    """(list of partitions: delayed dask blocks or lists of paths, number of images, image size or None).

    Cuts fall at multiples of batch_size, so each image meets the same batch mates as on one
    machine; max_images (a multiple of batch_size) caps a partition's size.
    """
    if isinstance(images, dask.array.Array):
        if images.ndim != 4:
            raise ValueError(f"{name} must be a dask array [N, C, H, W], got shape {images.shape}")
        chunk = min(images.chunks[0][0], max_images or images.shape[0])
        if chunk < images.shape[0]:
            chunk = max(batch_size, (chunk // batch_size) * batch_size)
        images = images.rechunk((chunk, -1, -1, -1))
        blocks = list(images.to_delayed().ravel())
        return blocks, images.shape[0], tuple(images.shape[2:])
    if isinstance(images, (list, tuple)) and images and all(isinstance(p, str) for p in images):
        if size is None:
            raise ValueError(f"{name} is a list of image files: pass size=(height, width)")
        count = len(images)
        if partitions is None:
            partitions = 2 * max(1, len(client.scheduler_info()["workers"]))
        partitions = check_positive_int(partitions, "partitions")
        per_part = -(-count // partitions)
        per_part = min(-(-per_part // batch_size) * batch_size, max_images or count)
        return [list(images[i:i + per_part]) for i in range(0, count, per_part)], count, None
    raise TypeError(f"{name} must be a dask array [N, C, H, W] or a list of image file paths, "
                    f"got {type(images).__name__}")


def _gather(client, futures, what, progress=False):
    """client.gather in order, with a progress bar over finished tasks when asked; a worker lost
    more often than Dask allows becomes one RuntimeError."""
    try:
        if progress:
            with Progress(len(futures), what, True) as bar:
                for _ in distributed.as_completed(futures):
                    bar.update()
        return client.gather(futures)
    except distributed.scheduler.KilledWorker as error:
        client.cancel(futures)
        raise RuntimeError(f"{what} failed: a worker died while running it more often than Dask's "
                           f"allowed-failures permits ({error}); nothing was kept") from error
    except BaseException:
        client.cancel(futures)
        raise


# ----------------------------------------------------------------- fit
def _local_coreset(name, images, size, total_select, local_ratio, spill_dir):
    """On a worker: extract one partition's patch features and return its local greedy coreset
    (rows [k_i, D], the partition's image size, its number of rows)."""
    model = _worker_model(name)
    source = model._source(images, "images", size, fitting=True)
    with model._collect_features(source, "auto", spill_dir, name="images") as collected:
        rows = collected.store.rows
        n_select = min(rows, total_select) if local_ratio is None else max(1, min(rows, int(rows * local_ratio)))
        keep = model._greedy_rows(collected, n_select)
        return collected.store.gather(keep), tuple(collected.image_size), rows


def fit(model, images, client=None, *, size=None, coreset_ratio=0.1, local_ratio=None, partitions=None,
        spill_dir=None):
    """Fit a PatchCore on a cluster: local greedy coresets on the workers, the greedy coreset of
    their union on the client. Returns the model, fitted (its threshold from the bank, as fit()).

    Args:
        model: an unfitted (or to be refitted) PatchCore with sampler="greedy".
        images: a dask array [N, C, H, W] or a list of image files (with size=).
        client: a distributed.Client (default: the current one).
        coreset_ratio: the final bank keeps k = max(1, int(R * coreset_ratio)) of all R patch rows.
        local_ratio: None (default) lets each partition keep min(R_i, k) rows, the composable
            k-center coreset of the bound below; a number keeps max(1, int(R_i * local_ratio))
            rows per partition (less traffic and a smaller union, a weaker bound).
        partitions: how many lists the files are cut into (default: two per worker).
        spill_dir: where each worker spills its features (default: its temporary folder).

    The bound (Malkomes et al., "Fast distributed k-center clustering with outliers on massive
    data", NeurIPS 2015). Let OPT be the smallest covering radius any k centers achieve on all
    rows. Greedy k-center's radius is at most 2 OPT on any set (Gonzalez 1985), and a partition's
    or the union's optimum is at most the whole set's (their rows are among all rows, and the
    union's k-center problem has those same centers within reach). So with k rows per partition
    every row lies within r_local <= 2 OPT of the union, every union row within r_union <= 2 OPT of
    the final bank, and by the triangle inequality the bank covers all rows within
    r_local + r_union <= 4 OPT <= 4 r_single, where r_single >= OPT is the single-machine greedy
    radius. The distances are those the greedy measures (after the random projection unless
    projection_dim=None). With local_ratio the first term is 2 OPT_{k_i} of the smallest k_i.
    tests/test_distributed.py and the README measure the actual radii on the same data.
    """
    if not isinstance(model, PatchCore):
        raise TypeError(f"model must be a PatchCore, got {type(model).__name__}")
    if model.sampler != "greedy":
        raise ValueError("distributed.fit builds a greedy k-center coreset: model.sampler must be 'greedy', "
                         f"got {model.sampler!r}")
    coreset_ratio = check_fraction(coreset_ratio, "coreset_ratio")
    if local_ratio is not None:
        local_ratio = check_fraction(local_ratio, "local_ratio")
    client = _client(client)
    if size is not None:
        size = model.check_image_size(pair(size, "size"), "size")
    parts, count, array_size = _partitions(images, model.batch_size, partitions, client, size)
    image_size = model.check_image_size(array_size or size, "images")
    probe = model._patch_features(np.zeros((1, model.in_channels) + image_size, np.float32))
    total_rows = count * probe.shape[1] * probe.shape[2]
    total_select = max(1, int(total_rows * coreset_ratio))
    with _ModelOnWorkers(client, model, fitted=False, what="local coresets") as name:
        tasks = [dask.delayed(_local_coreset, pure=False)(name, part, size, total_select, local_ratio, spill_dir)
                 for part in parts]
        local = _gather(client, client.compute(tasks), "local coresets", model.show_progress)
    union = np.concatenate([rows for rows, _, _ in local])
    keep = search.greedy_coreset(union, min(total_select, union.shape[0]), projection_dim=model.projection_dim,
                                 seed=model.seed, progress=model.show_progress, device=model.device)
    model.memory_bank_ = np.ascontiguousarray(union[keep])
    model.image_size_ = image_size
    model.threshold_ = nearest_other_threshold(model.memory_bank_)
    return model


# ----------------------------------------------------------------- scoring
def _score_partition(name, images, size, want_maps):
    model = _worker_model(name)
    return model._stream(images, want_maps, size=size)


def _partition_features(name, images, size):
    """On a worker, for a sharded bank: a partition's patch features [n, h, w, D] (kept there)."""
    model = _worker_model(name)
    source = model._source(images, "images", size)
    return np.concatenate([model._patch_features(batch) for batch in model._batches(source)])


def scores_and_maps(model, images, client=None, *, size=None, want_maps=True, bank=None):
    """(scores [N] float64, maps [N, H, W] float32 or None) of a fitted model, scored on the workers.

    The same numbers as model.scores_and_maps(images) on one machine. bank: a ShardedBank of
    model's memory bank, for banks too large for one worker (the workers then extract features
    and the shards search them; the model goes to the workers without its bank).
    """
    if not isinstance(model, Detector):
        raise TypeError(f"model must be a fitted npanomaly detector, got {type(model).__name__}")
    check_fitted(model, model._fitted_attribute)
    client = _client(client)
    if bank is not None:
        parts, _, _ = _partitions(images, model.batch_size, None, client, size or model.image_size_,
                                  max_images=SHARDED_PIECE_BATCHES * model.batch_size)
        return _scores_with_shards(model, parts, client, size, want_maps, bank)
    parts, _, _ = _partitions(images, model.batch_size, None, client, size or model.image_size_)
    with _ModelOnWorkers(client, model, fitted=True, what="distributed scoring") as name:
        tasks = [dask.delayed(_score_partition, pure=False)(name, part, size, want_maps) for part in parts]
        results = _gather(client, client.compute(tasks), "distributed scoring", model.show_progress)
    scores = np.concatenate([s for s, _ in results])
    return scores, (np.concatenate([m for _, m in results]) if want_maps else None)


def calibrate_threshold(model, normal_images, quantile=0.99, client=None, *, size=None, bank=None):
    """model.calibrate_threshold with the scores computed on the workers. Returns the model."""
    quantile = check_fraction(quantile, "quantile")
    scores = score_samples(model, normal_images, client, size=size, bank=bank)
    model.threshold_ = float(np.quantile(scores, quantile))
    return model


def score_samples(model, images, client=None, *, size=None, bank=None):
    """Anomaly score of each image, computed on the workers (model.score_samples's numbers)."""
    return scores_and_maps(model, images, client, size=size, want_maps=False, bank=bank)[0]


def anomaly_map(model, images, client=None, *, size=None, bank=None):
    """Anomaly maps [N, H, W], computed on the workers (model.anomaly_map's numbers)."""
    return scores_and_maps(model, images, client, size=size, bank=bank)[1]


def _scores_with_shards(model, parts, client, size, want_maps, bank):
    if not isinstance(model, PatchCore) or not isinstance(bank, ShardedBank):
        raise TypeError("bank= takes a ShardedBank of a PatchCore's memory bank")
    if bank.shape != model.memory_bank_.shape:
        raise ValueError(f"bank has shape {bank.shape} but the model's memory bank is {model.memory_bank_.shape}")
    scores, maps = [], []
    window = 2 * max(1, len(client.scheduler_info()["workers"]))
    with _ModelOnWorkers(client, model, fitted=True, what="distributed scoring", bank=False) as name:
        def extract(part):
            return client.compute(dask.delayed(_partition_features, pure=False)(name, part, size))

        pending = collections.deque(extract(part) for part in parts[:window])
        for index in range(len(parts)):  # a window of pieces in flight: the workers never hold them all
            future = pending.popleft()
            if index + window < len(parts):
                pending.append(extract(parts[index + window]))
            part_scores, part_dist = _piece_scores(model, client, bank, future)
            future.cancel()
            scores.append(part_scores)
            if want_maps:
                maps.append(upsample_and_blur(part_dist, model.image_size_, model.blur_sigma))
    return np.concatenate(scores), (np.concatenate(maps) if want_maps else None)


def _piece_scores(model, client, bank, features):
    """Scores [n] and patch distances [n, h, w] of one piece whose features [n, h, w, D] stay on a
    worker (a future): the shards search them, only distances and the worst rows travel."""
    dist, index = bank._search_future(features, k=1)
    n, h, w, _ = _gather(client, client.submit(np.shape, features), "distributed scoring")
    dist = dist[:, 0].reshape(n, h * w)
    index = index[:, 0].reshape(n, h * w)
    if model.score == "max":
        return dist.max(axis=1).astype(np.float64), dist.reshape(n, h, w)
    worst = np.argmax(dist, axis=1)
    picked = np.arange(n)
    rows = _gather(client, client.submit(_worst_rows, features, worst), "distributed scoring")
    scores = reweighted_scores(rows[:, None, :], dist[picked, worst][:, None], index[picked, worst][:, None], bank,
                               model.num_neighbors)
    return scores, dist.reshape(n, h, w)


def _worst_rows(features, worst):
    n = features.shape[0]
    flat = features.reshape(n, -1, features.shape[-1])
    return flat[np.arange(n), worst]


# ----------------------------------------------------------------- a bank over several workers
def _shard_knn(shard, offset, queries, k):
    queries = queries.reshape(-1, queries.shape[-1])
    distances, indices = search.knn(queries, shard, k=min(k, shard.shape[0]), squared=True)
    return distances, indices + offset


def _merge(results, k):
    """Exact top-k of per-shard candidates: by float64 squared distance, ties by global index
    (search.knn's order), so the result equals one search over the whole bank."""
    distances = np.concatenate([d for d, _ in results], axis=1)
    indices = np.concatenate([i for _, i in results], axis=1)
    order = np.lexsort((indices, distances), axis=1)[:, :k]
    return (np.sqrt(np.take_along_axis(distances, order, axis=1)).astype(np.float32),
            np.take_along_axis(indices, order, axis=1))


def _shard_rows(shard, offset, indices):
    mine = (indices >= offset) & (indices < offset + shard.shape[0])
    return np.flatnonzero(mine), shard[indices[mine] - offset]


class ShardedBank:
    """A memory bank [M, D] kept on the workers in contiguous row shards (one per worker by default).

    ``knn(queries, k)`` equals ``search.knn(queries, bank, k)`` exactly: every shard returns its
    own k nearest rows with float64 squared distances, and the candidates are merged by distance
    and then global row index. ``rows(indices)`` fetches bank rows. Pass it as ``bank=`` to
    score_samples / anomaly_map. ``close()`` (or a with block) releases the shards.
    """

    def __init__(self, bank, client=None, shards=None):
        client = _client(client)
        bank = np.ascontiguousarray(bank)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [M, D] array, got shape {bank.shape}")
        workers = list(client.scheduler_info()["workers"])
        shards = check_positive_int(shards or len(workers), "shards")
        bounds = np.linspace(0, bank.shape[0], min(shards, bank.shape[0]) + 1).astype(np.int64)
        self.client, self.shape, self.dtype = client, bank.shape, bank.dtype
        self.offsets = bounds[:-1].tolist()
        pieces = [bank[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.shards = [client.scatter(piece, workers=[workers[i % len(workers)]], hash=False)
                       for i, piece in enumerate(pieces)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.client.cancel(self.shards)
        self.shards = []

    def _search_future(self, queries, k):
        results = [self.client.submit(_shard_knn, shard, offset, queries, k, pure=False)
                   for shard, offset in zip(self.shards, self.offsets)]
        return _merge(_gather(self.client, results, "sharded search"), k)

    def knn(self, queries, k=1):
        """(distances [Q, k] float32, indices [Q, k] int64): search.knn against the whole bank."""
        k = check_positive_int(k, "k")
        if k > self.shape[0]:
            raise ValueError(f"k={k} exceeds the {self.shape[0]} bank rows")
        queries = np.ascontiguousarray(queries, dtype=self.dtype)
        if queries.ndim != 2 or queries.shape[1] != self.shape[1]:
            raise ValueError(f"queries must be [Q, {self.shape[1]}], got shape {queries.shape}")
        # hash=False: a repeated query block would share a key with the last one, whose release races
        # with this call and loses the data ("lost dependencies")
        return self._search_future(self.client.scatter(queries, hash=False), k)

    def rows(self, indices):
        """Bank rows [len(indices), D] in the order of indices."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((indices.size, self.shape[1]), self.dtype)
        for shard, offset in zip(self.shards, self.offsets):
            where, rows = self.client.submit(_shard_rows, shard, offset, indices, pure=False).result()
            out[where] = rows
        return out
