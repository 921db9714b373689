"""Images and data sets: loading, resizing, the MVTec AD and plain-folder layouts.

Images come out as float32 [C, H, W] in [0, 1] (batches [N, C, H, W]), resized to one chosen size.
PNG is read by ``npanomaly.png``; other formats need Pillow (``pip install npanomaly[images]``).
"""

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from npanomaly import kernels
from npanomaly.png import read_png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(path):
    """The pixels of an image file as uint8/uint16 [H, W] or [H, W, C]."""
    if str(path).lower().endswith(".png"):
        return read_png(path)
    try:
        from PIL import Image
    except ImportError as error:
        raise ValueError(f"reading {os.path.basename(str(path))} needs Pillow (pip install npanomaly[images]); "
                         "PNG files are read without it") from error
    with Image.open(path) as image:
        return np.asarray(image)


def to_float_chw(pixels, channels=3):
    """uint8/uint16 pixels [H, W(, C)] -> float32 [channels, H, W] in [0, 1]; grey is repeated for RGB, alpha dropped."""
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    image = pixels.astype(np.float32) / np.float32(scale)
    if image.ndim == 2:
        image = image[:, :, None]
    colour = image[:, :, :3] if image.shape[2] >= 3 else image[:, :, :1]
    if channels == 1:
        colour = colour.mean(axis=2, keepdims=True) if colour.shape[2] == 3 else colour
    elif channels == 3 and colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    elif colour.shape[2] != channels:
        raise ValueError(f"cannot make a {channels}-channel image from one with {colour.shape[2]} channels")
    return np.ascontiguousarray(colour.transpose(2, 0, 1))


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


def load_images(paths, size=None, channels=3):
    """Load image files into one float32 batch [N, channels, h, w]; size=None requires equal sizes."""
    paths = list(paths)
    if not paths:
        raise ValueError("no image files given")
    out = []
    for path in paths:
        try:
            image = to_float_chw(read_image(path), channels)[None]
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        if size is not None:
            image = resize(image, size)
        elif out and image.shape != out[0].shape:
            raise ValueError(f"images have different sizes ({os.path.basename(str(paths[0]))} is "
                             f"{out[0].shape[2]}x{out[0].shape[3]}, {os.path.basename(str(path))} is "
                             f"{image.shape[2]}x{image.shape[3]}): pass size=(h, w) to resize them")
        out.append(image)
    return np.concatenate(out).astype(np.float32)


def load_masks(paths, size):
    """Ground-truth masks [N, h, w] bool (non-zero = defect); None entries give all-normal masks."""
    masks = []
    for path in paths:
        if path is None:
            masks.append(np.zeros((1, 1) + tuple(size), np.float32))
            continue
        masks.append(resize(to_float_chw(read_image(path), 1)[None], size))
    return np.concatenate(masks)[:, 0] >= 0.5


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
        images = load_images([item.path for item in self.test_items], size, channels)
        labels = np.array([item.anomalous for item in self.test_items])
        missing = [item.path for item in self.test_items if item.anomalous and item.mask_path is None]
        masks = None
        if missing:
            warnings.warn(f"{len(missing)} anomalous test images have no mask (first: {missing[0]}); "
                          "pixel-level metrics are unavailable", stacklevel=2)
        else:
            masks = load_masks([item.mask_path for item in self.test_items], images.shape[2:])
        return images, labels, masks, [item.defect for item in self.test_items]

    def batches(self, paths, batch_size, size, channels=3):
        """Stream image files in batches of float32 [B, C, h, w]."""
        for start in range(0, len(paths), batch_size):
            yield load_images(paths[start:start + batch_size], size, channels)


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
