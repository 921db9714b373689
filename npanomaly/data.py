"""Images and data sets: loading, resizing, the MVTec AD and plain-folder layouts.

Images come out as float32 [C, H, W] in [0, 1] (batches [N, C, H, W]), resized to one chosen size.
PNG is read by ``npanomaly.png``; other formats need Pillow (``pip install npanomaly[images]``).
"""

import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np

from npanomaly import kernels
from npanomaly._validation import pair
from npanomaly.png import read_png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# Rows of a large image converted to float at a time while it is shrunk (bounds the float copy).
STRIP_BYTES = 32 * 1024 * 1024


def read_image(path):
    """The pixels of an image file: uint8/uint16 [H, W] or [H, W, C] (C = 2: grey + alpha, 3: RGB,
    4: RGBA), or float32 in [0, 1] for floating-point files.

    PNG is read by npanomaly.png. Other formats go through Pillow, converted by its own rules where
    the stored values are not intensities: palette images to RGB(A), 1-bit to 0/255, CMYK, YCbCr,
    LAB and HSV to RGB; 16-bit and 32-bit integer images are kept as uint16 when their values fit;
    32-bit float images must hold values in [0, 1]. Anything else is refused with the mode named.
    """
    if str(path).lower().endswith(".png"):
        return read_png(path)
    try:
        from PIL import Image
    except ImportError as error:
        raise ValueError(f"reading {os.path.basename(str(path))} needs Pillow (pip install npanomaly[images]); "
                         "PNG files are read without it") from error
    with Image.open(path) as image:
        return _pillow_pixels(image)


def _pillow_pixels(image):
    """A Pillow image's intensities as read_image returns them (see there)."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if transparent else "RGB"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.asarray(image.convert("RGB"))
    if mode in ("RGBa", "La"):  # alpha premultiplied: Pillow divides it out
        return np.asarray(image.convert("RGBA" if mode == "RGBa" else "LA"))
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N and the 32-bit integer mode I
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a {mode} image with values from {values.min()} to {values.max()}, beyond 16 bits; "
                             "convert it to 8 or 16 bit")
        return values.astype(np.uint16)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(f"a floating-point image with values from {np.nanmin(values):.4g} to "
                             f"{np.nanmax(values):.4g}; npanomaly takes floating-point images in [0, 1] only")
        return values
    raise ValueError(f"images of Pillow mode {mode!r} are not supported; convert it to RGB")


def _scale(pixels):
    """The divisor that maps pixel values to [0, 1]."""
    if pixels.dtype == np.uint16:
        return 65535.0
    if pixels.dtype == np.uint8:
        return 255.0
    if pixels.dtype == np.float32:
        return 1.0
    raise ValueError(f"unsupported pixel type {pixels.dtype}")


def _colour_planes(pixels):
    """Pixels [H, W(, C)] -> their colour planes [k, H, W] (k = 1 grey or 3 RGB; alpha dropped), still integers."""
    planes = pixels[:, :, None] if pixels.ndim == 2 else pixels
    planes = planes[:, :, :3] if planes.shape[2] >= 3 else planes[:, :, :1]
    return planes.transpose(2, 0, 1)


def _resized_planes(planes, scale, size):
    """Integer planes [k, H, W] -> float32 [k, h, w] in [0, 1], resized as resize() does.

    A large image is box-averaged STRIP_BYTES of float rows at a time, so the float copy never holds
    the whole image; pooling windows never cross strips, so the result equals resizing at once.
    """
    k, height, width = planes.shape
    if size is None or (height, width) == tuple(size):
        return planes.astype(np.float32) / np.float32(scale)
    factor_h, factor_w = max(1, height // size[0]), max(1, width // size[1])
    if factor_h == 1 and factor_w == 1:
        return resize(planes.astype(np.float32)[None] / np.float32(scale), size)[0]
    rows = factor_h * max(1, STRIP_BYTES // (4 * k * width * factor_h))
    pooled = []
    for top in range(0, (height // factor_h) * factor_h, rows):
        strip = planes[:, top:min(top + rows, (height // factor_h) * factor_h)].astype(np.float32)[None]
        strip /= np.float32(scale)
        pooled.append(kernels.avg_pool2d_forward(np.ascontiguousarray(strip), factor_h, factor_w, factor_h,
                                                 factor_w, 0, 0, True))
    shrunk = np.concatenate(pooled, axis=2)
    if shrunk.shape[2:] != tuple(size):
        shrunk = kernels.bilinear_resize(np.ascontiguousarray(shrunk), size[0], size[1])
    return shrunk[0]


def _to_channels(image, channels):
    """float [k, h, w] (k = 1 or 3) -> [channels, h, w]: grey repeated for RGB, RGB averaged for grey."""
    if image.shape[0] == channels:
        return image
    if channels == 1 and image.shape[0] == 3:
        return image.mean(axis=0, keepdims=True)
    if channels == 3 and image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    raise ValueError(f"cannot make a {channels}-channel image from one with {image.shape[0]} channels")


def to_float_chw(pixels, channels=3):
    """Pixels [H, W(, C)] (uint8, uint16 or float32 in [0, 1]) -> float32 [channels, H, W] in [0, 1];
    grey is repeated for RGB, alpha dropped."""
    return np.ascontiguousarray(_to_channels(_resized_planes(_colour_planes(pixels), _scale(pixels), None), channels))


def to_rgb_hwc(image):
    """float [C, H, W] (C = 1 or >= 3) -> float RGB [H, W, 3]: grey repeated, channels past 3 dropped."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    return rgb.transpose(1, 2, 0)


def to_uint8(image):
    """float [C, H, W] in [0, 1] -> uint8 RGB [H, W, 3] (the inverse of to_float_chw for 8-bit files)."""
    return np.round(np.clip(to_rgb_hwc(image), 0, 1) * 255).astype(np.uint8)


def resize(images, size):
    """Resize float [N, C, H, W] to size = (h, w): box-average first when shrinking by 2x or more
    (so a sharp downscale does not alias), then bilinear as torch's interpolate(align_corners=False)."""
    height, width = images.shape[2:]
    factor_h, factor_w = max(1, height // size[0]), max(1, width // size[1])
    if factor_h > 1 or factor_w > 1:
        images = kernels.avg_pool2d_forward(np.ascontiguousarray(images), factor_h, factor_w, factor_h, factor_w,
                                            0, 0, True)
    if images.shape[2:] != tuple(size):
        images = kernels.bilinear_resize(np.ascontiguousarray(images), size[0], size[1])
    return images


def _read(path):
    """read_image, with every failure (damaged file, unknown format, Pillow's errors) naming the file."""
    try:
        return read_image(path)
    except (ValueError, OSError, SyntaxError, struct.error, zlib.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path}: {error}") from error


def load_image(path, size=None, channels=3):
    """One image file as float32 [channels, h, w] in [0, 1], resized to size = (h, w) if given.

    Shrinks before it converts and expands channels, so a huge grey image costs its pixels and a
    strip of floats, not three float copies of itself.
    """
    pixels = _read(path)
    try:
        image = _resized_planes(_colour_planes(pixels), _scale(pixels), size)
        return np.ascontiguousarray(_to_channels(image, channels)), pixels.shape[:2]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def load_images(paths, size=None, channels=3, return_sizes=False):
    """Load image files into one float32 batch [N, channels, h, w]; size=None requires equal sizes.

    return_sizes: also return each file's own (height, width) before resizing.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("no image files given")
    out = np.empty((len(paths), channels) + tuple(size), np.float32) if size is not None else []
    sizes = []
    for index, path in enumerate(paths):
        image, original = load_image(path, size, channels)
        sizes.append(original)
        if size is not None:
            out[index] = image
            continue
        if out and image.shape != out[0].shape:
            raise ValueError(f"images have different sizes ({os.path.basename(str(paths[0]))} is "
                             f"{out[0].shape[1]}x{out[0].shape[2]}, {os.path.basename(str(path))} is "
                             f"{image.shape[1]}x{image.shape[2]}): pass size=(h, w) to resize them")
        out.append(image)
    batch = out if size is not None else np.stack(out)
    return (batch, sizes) if return_sizes else batch


def read_mask(path):
    """A ground-truth mask file as bool [H, W]: a pixel is defective where any colour channel is
    non-zero (alpha ignored). So 0/255 masks, 0/1 masks (common in public data sets) and palette
    or colour masks with the defect drawn in any colour on black all read the same."""
    planes = _colour_planes(_read(path))
    return (planes != 0).any(axis=0)


def load_masks(paths, size, image_sizes=None):
    """Ground-truth masks [N, h, w] bool (see read_mask); None entries give all-normal masks.

    image_sizes: each mask's image's own (height, width). A mask of another aspect ratio than its
    image belongs to another image and is refused; one of another size but the same aspect ratio
    is resized to it with a warning.
    """
    masks = np.zeros((len(paths),) + tuple(size), bool)
    for index, path in enumerate(paths):
        if path is None:
            continue
        mask = read_mask(path)
        if image_sizes is not None and mask.shape != tuple(image_sizes[index]):
            (mh, mw), (ih, iw) = mask.shape, image_sizes[index]
            if abs(mh * iw - mw * ih) > max(mh * iw, mw * ih) * 0.01:
                raise ValueError(f"{path} is {mh}x{mw} but its image is {ih}x{iw}: another aspect ratio, so it "
                                 "cannot be this image's mask")
            warnings.warn(f"{path} is {mh}x{mw} but its image is {ih}x{iw}; resizing the mask", stacklevel=3)
        masks[index] = resize(mask.astype(np.float32)[None, None], size)[0, 0] >= 0.5
    return masks


def _image_files(folder):
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))


@dataclass
class TestItem:
    """One test image: its path, whether it is anomalous, its defect type and mask file (or None)."""

    path: str
    anomalous: bool
    defect: str
    mask_path: str = None


@dataclass
class Dataset:
    """A data set on disk: normal training images and labelled test images.

    Use ``train_images(size)`` / ``test_images(size)`` for arrays, or ``batches`` to stream.
    """

    root: str
    train_paths: list
    test_items: list = field(default_factory=list)

    def train_images(self, size=None, channels=3):
        return load_images(self.train_paths, size, channels)

    def test_images(self, size=None, channels=3):
        """(images [N, C, h, w], labels [N] bool, masks [N, h, w] bool or None, defects [N] str)."""
        if not self.test_items:
            raise ValueError(f"{self.root} has no test images")
        images, sizes = load_images([item.path for item in self.test_items], size, channels, return_sizes=True)
        labels = np.array([item.anomalous for item in self.test_items])
        missing = [item.path for item in self.test_items if item.anomalous and item.mask_path is None]
        masks = None
        if missing:
            warnings.warn(f"{len(missing)} anomalous test images have no mask (first: {missing[0]}); "
                          "pixel-level metrics are unavailable", stacklevel=2)
        else:
            masks = load_masks([item.mask_path for item in self.test_items], images.shape[2:], sizes)
        return images, labels, masks, [item.defect for item in self.test_items]

    def batches(self, paths=None, batch_size=8, size=None, channels=3):
        """The image files ``paths`` (default: the training images) as an ImageFiles: a re-iterable
        source of float32 batches [B, C, h, w], read from disk one batch at a time."""
        return ImageFiles(self.train_paths if paths is None else paths, size, channels, batch_size)


class ImageFiles:
    """Image files read one batch at a time: a re-iterable source of float32 batches [B, C, h, w].

    Iterating reads the files anew each time (nothing is cached), so a data set larger than memory
    can be passed to ``PatchCore.fit``, ``StudentTeacher.fit`` or ``calibrate_threshold`` and
    costs one batch of pixels at a time. ``take(indices)`` reads chosen files as one batch (the
    Student-Teacher's shuffled mini-batches). size=None requires all files to have one size.
    """

    def __init__(self, paths, size=None, channels=3, batch_size=8):
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise TypeError(f"paths must be a list of image files, got one path {paths!r}")
        self.paths = [os.fspath(path) for path in paths]
        if not self.paths:
            raise ValueError("no image files given")
        self.size = None if size is None else pair(size, "size")
        self.channels = channels
        self.batch_size = batch_size

    def __len__(self):
        """The number of images (not batches)."""
        return len(self.paths)

    def __iter__(self):
        for start in range(0, len(self.paths), self.batch_size):
            yield load_images(self.paths[start:start + self.batch_size], self.size, self.channels)

    def take(self, indices):
        """The files at ``indices`` (in that order) as one batch [len(indices), C, h, w]."""
        return load_images([self.paths[int(i)] for i in indices], self.size, self.channels)

    def __repr__(self):
        return f"ImageFiles({len(self.paths)} files, size={self.size}, batch_size={self.batch_size})"


def mvtec_category(root):
    """A category of MVTec AD: train/good, test/<defect>/, ground_truth/<defect>/<name>_mask.png."""
    train = _image_files(os.path.join(root, "train", "good"))
    if not train:
        raise ValueError(f"no training images in {os.path.join(root, 'train', 'good')} (MVTec AD layout expected)")
    items = []
    test_root = os.path.join(root, "test")
    for defect in sorted(os.listdir(test_root)) if os.path.isdir(test_root) else []:
        for path in _image_files(os.path.join(test_root, defect)):
            mask = None
            if defect != "good":
                stem = os.path.splitext(os.path.basename(path))[0]
                candidate = os.path.join(root, "ground_truth", defect, f"{stem}_mask.png")
                mask = candidate if os.path.exists(candidate) else None
            items.append(TestItem(path, defect != "good", defect, mask))
    return Dataset(root, train, items)


def folder_dataset(root):
    """A plain folder: normal/ (training images), anomalous/ (test defects), optional masks/ and test/normal/.

    Masks are matched by file name (masks/<name>.png or masks/<stem>_mask.png). Normal test images come
    from test_normal/ when present; otherwise the last fifth of normal/ is held out for testing.
    """
    normal = _image_files(os.path.join(root, "normal"))
    if not normal:
        raise ValueError(f"no images in {os.path.join(root, 'normal')} (folder layout: normal/, anomalous/, masks/)")
    test_normal = _image_files(os.path.join(root, "test_normal"))
    if not test_normal:
        held = max(1, len(normal) // 5) if len(normal) > 1 else 0
        normal, test_normal = normal[:len(normal) - held], normal[len(normal) - held:]
    items = [TestItem(path, False, "good") for path in test_normal]
    for path in _image_files(os.path.join(root, "anomalous")):
        stem = os.path.splitext(os.path.basename(path))[0]
        candidates = [os.path.join(root, "masks", f"{stem}.png"), os.path.join(root, "masks", f"{stem}_mask.png")]
        mask = next((c for c in candidates if os.path.exists(c)), None)
        items.append(TestItem(path, True, "anomalous", mask))
    return Dataset(root, normal, items)


def open_dataset(root):
    """MVTec AD category or plain folder, whichever layout root has."""
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a folder")
    if os.path.isdir(os.path.join(root, "train")):
        return mvtec_category(root)
    if os.path.isdir(os.path.join(root, "normal")):
        return folder_dataset(root)
    raise ValueError(f"{root} has neither the MVTec AD layout (train/good, test/...) nor the folder layout "
                     "(normal/, anomalous/)")
