"""What every detector shares: results, batching, thresholds and the saved-model file format.

A detector subclass implements ``_score_and_map(batch, want_maps)`` for one checked float32 batch;
this base class streams any number of images through it in batches of ``batch_size`` and builds
``predict``, ``score_samples``, ``anomaly_map``, ``decision_function`` and ``calibrate_threshold``
on top. Saved models are one ``.npz`` file (no pickle) written atomically.
"""

import json
import zipfile
from dataclasses import dataclass

import numpy as np

from npanomaly import sources, threads
from npanomaly._files import atomic_write
from npanomaly._progress import Progress
from npanomaly.checkpoint import read_npz
from npanomaly._validation import (MAX_BATCH_SIZE, MAX_WIDTH, check_batch, check_finite, check_fitted,
                                   check_fraction, check_image_size, check_positive_int, pair)

FORMAT_VERSION = 1
#: The most bytes the arrays of one saved model may take (a 8,000-image wide_resnet50_2 bank at 10%
#: is ~2.4 GB; raise it here for larger banks).
MAX_MODEL_BYTES = 8 * 1024 ** 3
_REGISTRY = {}


@dataclass
class AnomalyResult:
    """The verdict on one image: score (higher = more anomalous), score > threshold, and the
    anomaly map at input resolution [H, W] (None where a model has none)."""

    score: float
    is_anomalous: bool
    heatmap: np.ndarray = None


def register(cls):
    """Class decorator: lets ``npanomaly.load`` find the class named in a saved file."""
    _REGISTRY[cls.__name__] = cls
    return cls


class Detector:
    """Batching, thresholds and persistence for the anomaly detectors."""

    #: attribute that fit() (or load) sets; None means "not fitted"
    _fitted_attribute = "threshold_"

    def __init__(self, in_channels, batch_size):
        self.in_channels = check_positive_int(in_channels, "in_channels", maximum=MAX_WIDTH)
        self.batch_size = check_positive_int(batch_size, "batch_size", maximum=MAX_BATCH_SIZE)
        self.threshold_ = None
        self.image_size_ = None
        self.show_progress = False  # progress bars on stderr for long steps (the CLI turns them on)

    # ----------------------------------------------------------------- input
    @property
    def min_image_size(self):
        """The smallest image side the detector accepts: the stride of its deepest feature stage
        (a smaller image has less than one feature position there)."""
        return self._deepest_stage()[1]

    def _deepest_stage(self):
        backbone, stages = self._feature_stages()
        stage = max(stages, key=backbone.stride)
        return stage, backbone.stride(stage)

    def check_image_size(self, size, name):
        """size as (height, width) ints if this detector can take images of that size (at least
        min_image_size, at most MAX_IMAGE_SIZE per side); else ValueError naming ``name`` and the
        stage that sets the minimum. Nothing is allocated first: the CLI checks --size with it."""
        stage, stride = self._deepest_stage()
        reason = f"the {self.backbone_name} backbone's {stage} stage (stride {stride})"
        return check_image_size(size, name, stride, reason)

    def _feature_stages(self):
        """(the Backbone whose stages give the features, the stage names used) (subclasses)."""
        raise NotImplementedError

    def _check_images(self, images, name="images", fitting=False):
        """An [N, C, H, W] float batch in [0, 1] with the model's channels (and the fitted image
        size, or when fitting a size the backbone can take), as float32."""
        images = check_batch(images, name, self.in_channels)
        check_finite(images, name)
        if fitting:
            self.check_image_size(images.shape[2:], name)
        elif self.image_size_ is not None and images.shape[2:] != self.image_size_:
            raise ValueError(f"{name} must be {self.image_size_[0]}x{self.image_size_[1]} images like the ones "
                             f"the model was fitted on, got shape {images.shape}")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name} must hold values in [0, 1] (8-bit pixels / 255), got values from {low:.4g} "
                             f"to {high:.4g}; the pretrained backbones apply ImageNet's normalisation themselves, "
                             "so pass images before any normalisation (np.clip(images, 0, 1) for resampling overshoot)")
        return images.astype(np.float32, copy=False)

    def _source(self, images, name, size=None, fitting=False):
        """What the caller passed as images, as a source of batches (npanomaly.sources).

        size: (h, w) or int for image files; by default the fitted image size. An array is checked
        whole here (as before); other sources are checked batch by batch as they are read.
        """
        if isinstance(images, sources.SOURCES):
            return images  # already checked by the caller
        if isinstance(images, np.ndarray):
            return sources.ArraySource(self._check_images(images, name, fitting))
        if size is not None:
            size = self.check_image_size(pair(size, "size"), "size")
        elif not fitting or self.image_size_ is not None:
            size = self.image_size_
        return sources.as_source(images, name, self.in_channels, size)

    def _batches(self, source, name="images", fitting=False, batch_size=None):
        """Checked float32 batches of batch_size images from a source (see _source); before each, the
        thread pools take only the cores other processes leave free (threads.share_cores), and get
        them all back at the end. A source's images must all have one size (the first batch's when
        fitting, else the fitted one)."""
        checked = isinstance(source, sources.ArraySource)
        expected = source.image_size if fitting else self.image_size_
        count = 0
        try:
            for index, batch in enumerate(source.batches(batch_size or self.batch_size)):
                if not checked:
                    batch = self._check_images(batch, f"{name} (batch {index})", fitting)
                    if expected is None:
                        expected = batch.shape[2:]
                    elif batch.shape[2:] != tuple(expected):
                        raise ValueError(f"{name} (batch {index}) holds {batch.shape[2]}x{batch.shape[3]} images, "
                                         f"expected {expected[0]}x{expected[1]} like the ones before")
                count += batch.shape[0]
                threads.share_cores()
                yield batch
        finally:
            threads.restore_cores()
        if count == 0:
            raise ValueError(f"{name} holds no images")
        source.n_images = count

    def _stream(self, images, want_maps, size=None, name="images"):
        check_fitted(self, self._fitted_attribute)
        source = self._source(images, name, size)
        scores, maps = [], []
        with Progress(source.n_images, "prediction", self.show_progress) as bar:
            for batch in self._batches(source, name):
                batch_scores, batch_maps = self._score_and_map(batch, want_maps)
                scores.append(batch_scores)
                if want_maps:
                    maps.append(batch_maps)
                bar.update(batch.shape[0])
        return np.concatenate(scores), (np.concatenate(maps) if want_maps else None)

    # ----------------------------------------------------------------- public
    @property
    def threshold(self):
        """The decision threshold on score_samples (is_anomalous = score > threshold)."""
        return self.threshold_

    def set_threshold(self, value):
        """Set the decision threshold by hand."""
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        self.threshold_ = value
        return self

    def score_samples(self, images, size=None):
        """Anomaly score of each image: higher = more anomalous.

        images: an array [N, C, H, W] or any source of npanomaly.sources (image files are resized
        to ``size``, by default the fitted image size), streamed one batch at a time.

        Note: the opposite sign convention of scikit-learn's ``score_samples`` (IsolationForest,
        LocalOutlierFactor), where lower means more abnormal.
        Returns float64 [N].
        """
        return self._stream(images, want_maps=False, size=size)[0]

    def anomaly_map(self, images, size=None):
        """Per-pixel anomaly maps at input resolution, float32 [N, H, W] (higher = more anomalous)."""
        return self._stream(images, want_maps=True, size=size)[1]

    def scores_and_maps(self, images, size=None):
        """(score_samples(images), anomaly_map(images)) from one pass over the images."""
        return self._stream(images, want_maps=True, size=size)

    def decision_function(self, images, size=None):
        """score_samples(images) - threshold: positive means anomalous."""
        return self.score_samples(images, size) - self.threshold_

    def predict(self, images, size=None):
        """One AnomalyResult(score, is_anomalous, heatmap) per image, heatmaps at input resolution."""
        scores, maps = self._stream(images, want_maps=True, size=size)
        return [AnomalyResult(float(s), bool(s > self.threshold_), m) for s, m in zip(scores, maps)]

    def calibrate_threshold(self, normal_images, quantile=0.99, size=None):
        """Set the threshold to the given quantile of the scores of held-out normal images.

        With quantile=0.99 about 1% of normal images will be flagged. normal_images: an array or
        any source of npanomaly.sources (streamed; only the scores are kept). Returns self.
        """
        quantile = check_fraction(quantile, "quantile")
        scores = self._stream(normal_images, want_maps=False, size=size, name="normal_images")[0]
        self.threshold_ = float(np.quantile(scores, quantile))
        return self

    # ----------------------------------------------------------------- persistence
    def _config(self):
        """JSON-serialisable constructor arguments (subclasses)."""
        raise NotImplementedError

    def _arrays(self):
        """Learned state as name -> ndarray (subclasses)."""
        raise NotImplementedError

    def _restore(self, arrays):
        """Set learned state from what _arrays() returned (subclasses)."""
        raise NotImplementedError

    def save(self, path):
        """Write the model to one .npz file (no pickle), atomically: a crash leaves the old file intact."""
        check_fitted(self, self._fitted_attribute)
        arrays = {
            "npanomaly_format": np.array(FORMAT_VERSION),
            "model": np.array(type(self).__name__),
            "config": np.array(json.dumps(self._config())),
            "threshold": np.array(self.threshold_, dtype=np.float64),
            "image_size": np.array(self.image_size_, dtype=np.int64),
        }
        arrays.update(self._arrays())
        return atomic_write(path, lambda stream: np.savez(stream, **arrays))

    @classmethod
    def load(cls, path, device=None):
        """Read a model written by save(); a foreign, damaged or mismatched file raises ValueError.

        device: run the loaded model on "cpu" or "cuda" (default: the device it was saved with).
        """
        arrays = read_model_file(path)
        kind = arrays["model"]
        if cls is not Detector and kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind} model, not a {cls.__name__}; use npanomaly.load()")
        model_cls = _REGISTRY.get(kind)
        if model_cls is None:
            raise ValueError(f"{path} holds an unknown model type {kind!r}")
        try:
            config = json.loads(str(arrays["config"]))
            if not isinstance(config, dict):
                raise ValueError(f"its config is a {type(config).__name__}, not a dict")
            if device is not None:
                config["device"] = device
            model = model_cls(**model_cls._config_from_file(config))
            model._restore(arrays)
            threshold = arrays["threshold"]
            if threshold.shape != () or threshold.dtype.kind != "f" or not np.isfinite(threshold):
                shown = float(threshold) if threshold.shape == () and threshold.dtype.kind == "f" else repr(threshold)
                raise ValueError(f"its threshold must be a finite number, got {shown}")
            model.threshold_ = float(threshold)
            model.image_size_ = model.check_image_size(arrays["image_size"].tolist(), "its image size")
            model._check_responsive()
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path} is not a valid {kind} model file: {error}") from error
        return model

    @classmethod
    def _config_from_file(cls, config):
        """The constructor's arguments from a saved config. A subclass fills in what files written
        before an argument existed lack, with the value those files were made under."""
        return config

    def _check_responsive(self):
        """Refuse a model that cannot tell images apart.

        Two different seeded noise images must get finite scores and maps that differ. A model
        whose network was zeroed or saturated by an edited file would give every image the same
        score and the same verdict; that is refused here rather than found out in production.
        """
        probes = np.random.default_rng(0).random((2, self.in_channels) + tuple(self.image_size_), dtype=np.float32)
        show, self.show_progress = self.show_progress, False
        try:
            with np.errstate(all="ignore"):
                scores, maps = self._stream(probes, want_maps=True)
        finally:
            self.show_progress = show
        if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
            raise ValueError("it gives NaN or infinite scores (its weights or statistics overflow)")
        if scores[0] == scores[1] and np.array_equal(maps[0], maps[1]):
            raise ValueError("it gives two different images the same score and map: its network cannot tell "
                             "images apart (edited weights or statistics?)")


def is_model_file(path):
    """True when path is a file that npanomaly.save wrote (an .npz with the format marker)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {"npanomaly_format.npy", "model.npy"} <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def read_model_file(path):
    """All arrays of a saved model, checked for the format marker and version.

    Each array's declared size is checked against the file before it is read (``read_npz``), so a
    crafted file cannot make the loader allocate what it does not hold."""
    arrays = read_npz(path, MAX_MODEL_BYTES, what="npanomaly model file")
    if "npanomaly_format" not in arrays or "model" not in arrays:
        raise ValueError(f"{path} is not an npanomaly model file (no format marker)")
    try:
        version = int(arrays["npanomaly_format"])
        kind = str(arrays["model"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} has a damaged format marker: {error}") from error
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has model format {version}; this npanomaly reads format {FORMAT_VERSION}")
    arrays["model"] = kind
    return arrays


def load(path, device=None):
    """Load any saved npanomaly model (PatchCore or StudentTeacher), optionally onto another device."""
    return Detector.load(path, device)
