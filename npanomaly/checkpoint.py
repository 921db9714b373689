"""Reading PyTorch checkpoints (state dicts) without torch, and without running any pickled code.

Both of torch.save's formats are read:
- the zip format (torch >= 1.6): ``<archive>/data.pkl`` refers to storages ``<archive>/data/<key>``;
- the legacy format: a magic number, protocol, system info, the pickled object, the list of storage
  keys, then each storage's raw bytes after an 8-byte element count.

The unpickler is restricted: it resolves only the globals a state dict needs (the tensor and
parameter rebuild functions, storage types, OrderedDict) to local, harmless stand-ins, and refuses
every other global with a ValueError before anything is called. A crafted file whose pickle would
run a command therefore fails to load and runs nothing.
"""

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# torch >= 2 pickles "UntypedStorage" with a dtype object such as torch.float32 next to it.
TORCH_DTYPES = {"float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
                "float16": np.float16, "half": np.float16, "int64": np.int64, "long": np.int64,
                "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                "bool": np.bool_}


class _StorageType:
    """Stand-in for torch.<X>Storage or a torch dtype: only carries the NumPy dtype."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A storage's elements; in the legacy format they are filled in after the pickle is read."""

    def __init__(self, dtype, data=None):
        self.dtype = dtype
        self.data = data


class _PendingTensor:
    """A tensor view on a storage, materialised once every storage has its data."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self):
        flat = self.storage.data
        if flat is None:
            raise ValueError("checkpoint refers to a storage whose data is missing")
        if not self.size:
            return np.array(flat[self.offset]).copy()
        needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if 0 in self.size:
            return np.zeros(self.size, dtype=flat.dtype)
        if needed > flat.size or any(s < 0 for s in self.stride):
            raise ValueError(f"checkpoint tensor of shape {self.size} does not fit its storage of {flat.size} elements")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               tuple(s * flat.itemsize for s in self.stride))
        return np.array(view, copy=True, order="C")  # "K" would keep a channels-last layout


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *rest):
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, load_storage):
        super().__init__(stream)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _StorageType(TORCH_DTYPES[name])
        if module == "torch" and name == "UntypedStorage":
            return _StorageType(np.uint8)
        raise ValueError(f"refused to load {module}.{name}: a state-dict checkpoint never needs it "
                         "(the file may be a whole pickled model or malicious)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise ValueError(f"unexpected persistent id in checkpoint: {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unexpected storage type in checkpoint: {storage_type!r}")
        return self._load_storage(key, storage_type.dtype)


def _materialise(obj):
    if isinstance(obj, _PendingTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]

        def load_storage(key, dtype):
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"checkpoint storage {key} is missing")
            raw = archive.read(member)
            if len(raw) % dtype.itemsize:
                raise ValueError(f"checkpoint storage {key} has {len(raw)} bytes, not a whole number of {dtype}")
            return _Storage(dtype, np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype))

        return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _load_legacy(stream):
    storages = {}

    def load_storage(key, dtype):
        if key not in storages:
            storages[key] = _Storage(dtype)
        return storages[key]

    def plain(what):
        return _RestrictedUnpickler(stream, load_storage).load()

    magic = plain("magic number")
    if magic != LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (bad magic number)")
    plain("protocol version")
    plain("system info")
    result = plain("object")
    keys = plain("storage keys")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise ValueError(f"checkpoint lists storage {key} that no tensor uses")
        header = stream.read(8)
        if len(header) != 8:
            raise ValueError("checkpoint is truncated inside its storage data")
        (count,) = struct.unpack("<q", header)
        raw = stream.read(count * storage.dtype.itemsize)
        if count < 0 or len(raw) != count * storage.dtype.itemsize:
            raise ValueError("checkpoint is truncated inside its storage data")
        storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<")).astype(storage.dtype)
    return result


def load_torch_checkpoint(path):
    """A state dict {name: ndarray} from a torch.save file (zip or legacy) or an .npz file.

    A checkpoint that wraps its state dict (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
    Anything but tensors, numbers and containers in the pickle is refused with ValueError.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return OrderedDict((name, data[name]) for name in data.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{path} is not a readable .npz file: {error}") from error
    try:
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        else:
            with open(path, "rb") as stream:
                result = _load_legacy(stream)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, AttributeError, IndexError,
            TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    result = _materialise(result)
    for wrapper in ("state_dict", "model"):
        if isinstance(result, dict) and wrapper in result and isinstance(result[wrapper], dict):
            result = result[wrapper]
    if not isinstance(result, dict) or not all(isinstance(v, np.ndarray) for v in result.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return OrderedDict((str(k), v) for k, v in result.items())
