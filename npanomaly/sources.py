"""Where a detector's images come from: one array in memory, or files read one batch at a time.

Every detector method that reads images (``PatchCore.fit``, ``StudentTeacher.fit``,
``calibrate_threshold``, ``score_samples``, ``anomaly_map``, ...) accepts any of:

- an ndarray [N, C, H, W] of floats in [0, 1] (the whole set in memory, as before);
- a list or tuple of image file paths, with ``size=(h, w)`` (or an int) to resize them to;
- a ``data.Dataset`` (its training images), with ``size=``;
- a ``data.ImageFiles`` (``Dataset.batches(...)`` returns one): files read batch by batch;
- any other *re-iterable* of [B, C, H, W] arrays (a list of arrays, an object whose ``__iter__``
  reads them from a database): iterated anew on each pass.

A generator or other one-shot iterator is refused: fitting reads the images more than once
(Student-Teacher once per epoch, and both detectors again to set the threshold).
"""

import numbers
import os

import numpy as np

from npanomaly.data import Dataset, ImageFiles


class ArraySource:
    """Images already in memory: batches are slices (no copies), any image can be taken."""

    def __init__(self, images):
        self.images = images
        self.n_images = images.shape[0]
        self.image_size = tuple(images.shape[2:])

    def batches(self, batch_size):
        for start in range(0, self.n_images, batch_size):
            yield self.images[start:start + batch_size]

    def take(self, indices):
        return self.images[indices]


class FileSource:
    """Image files (an ImageFiles) read batch_size at a time, or chosen files with take()."""

    def __init__(self, files):
        self.files = files
        self.n_images = len(files)
        self.image_size = files.size

    def batches(self, batch_size):
        for start in range(0, self.n_images, batch_size):
            yield self.files.take(range(start, min(self.n_images, start + batch_size)))

    def take(self, indices):
        return self.files.take(indices)


class IterableSource:
    """A re-iterable of arrays of any batch sizes, re-cut into batches of batch_size images."""

    take = None  # no random access: Student-Teacher iterates it in its own order
    image_size = None

    def __init__(self, iterable, name):
        self.iterable = iterable
        self.name = name
        self.n_images = None  # known after a pass

    def batches(self, batch_size):
        pending, count = [], 0
        for index, batch in enumerate(self.iterable):
            if not isinstance(batch, np.ndarray):
                raise TypeError(f"{self.name} must yield numpy arrays [B, C, H, W]; item {index} is a "
                                f"{type(batch).__name__}")
            if batch.ndim != 4:
                raise ValueError(f"{self.name} must yield 4-D batches [B, C, H, W]; item {index} has shape "
                                 f"{batch.shape}")
            if pending and batch.shape[1:] != pending[0].shape[1:]:
                raise ValueError(f"{self.name} must yield batches of one image shape; item {index} has shape "
                                 f"{batch.shape}, the ones before {pending[0].shape}")
            pending.append(batch)
            count += batch.shape[0]
            while count >= batch_size:
                joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
                yield joined[:batch_size]
                rest = joined[batch_size:]
                pending, count = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
        if count:
            yield pending[0] if len(pending) == 1 else np.concatenate(pending)


SOURCES = (ArraySource, FileSource, IterableSource)


def _is_path(item):
    return isinstance(item, (str, os.PathLike))


def as_source(images, name, channels, size=None):
    """Wrap what a user passed as images in one of the sources above (see the module docstring).

    size: (h, w) for file sources (required for paths and Datasets unless given by the caller's
    fitted model); ignored for arrays, which keep their own size.
    """
    if isinstance(images, np.ndarray):
        return ArraySource(images)
    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be an array, a list of image files, a Dataset or a re-iterable of batches; "
                        f"got one path {images!r} (pass [path], or open_dataset(folder))")
    if isinstance(images, Dataset):
        images = images.train_paths
    if isinstance(images, (list, tuple)) and images and all(_is_path(item) for item in images):
        if size is None:
            raise ValueError(f"{name} is a list of image files: pass size=(height, width) to resize them to")
        images = ImageFiles(images, size, channels)
    if isinstance(images, ImageFiles):
        if images.size is None and size is None:
            raise ValueError(f"{name} has no size: pass size=(height, width) to resize its files to")
        if size is not None and images.size != size:
            images = ImageFiles(images.paths, size, images.channels, images.batch_size)
        return FileSource(images)
    if isinstance(images, (list, tuple)) and not images:
        raise ValueError(f"{name} is empty: expected at least one image")
    if isinstance(images, numbers.Number) or not hasattr(images, "__iter__"):
        raise TypeError(f"{name} must be an ndarray [N, C, H, W], a list of image files, a Dataset or a "
                        f"re-iterable of batches, got {type(images).__name__}")
    if iter(images) is images:
        raise TypeError(f"{name} is a one-shot iterator ({type(images).__name__}): the images are read more than "
                        "once, so pass a list, a data.ImageFiles or an object whose __iter__ starts over")
    return IterableSource(images, name)
