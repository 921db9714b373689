"""Reading PyTorch checkpoints (state dicts) without torch, and without running any pickled code.

Both of torch.save's formats are read:
- the zip format (torch >= 1.6): ``<archive>/data.pkl`` refers to storages ``<archive>/data/<key>``;
- the legacy format: a magic number, protocol, system info, the pickled object, the list of storage
  keys, then each storage's raw bytes after an 8-byte element count.

The unpickler is restricted: it resolves only the globals a state dict needs (the tensor and
parameter rebuild functions, storage types, OrderedDict) to local, harmless stand-ins, and refuses
every other global with a ValueError before anything is called. A crafted file whose pickle would
run a command therefore fails to load and runs nothing.

A checkpoint is untrusted input, so nothing is allocated on its word alone. The pickle is read
first, into tensor descriptions (storage, offset, shape, strides) that must be whole non-negative
numbers; then every tensor is checked against its storage's real length (from the zip directory or
the legacy file's length), may not hold more elements than its storage (no stride-0 expansion of
a small storage into a huge array), and all of them together at most ``max_bytes``; then the
caller's ``check`` sees the names, shapes and dtypes; only then are storages read, each only as far
as its tensors reach (a storage cannot inflate past that).
"""

import io
import os
import pickle
import struct
import zipfile
import zlib
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


#: The most bytes all tensors of one checkpoint may take once read (wide_resnet50_2: 263 MB).
MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3


class _StorageType:
    """Stand-in for torch.<X>Storage or a torch dtype: only carries the NumPy dtype."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A storage: its dtype, how many elements the file really holds (``available``), and its
    elements once read (``data``). ``read(count)`` returns the first count elements' bytes."""

    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype
        self.available = None
        self.read = None
        self.data = None


def _whole(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint tensor has an invalid {what}: {value!r}")
    return value


class _PendingTensor:
    """A tensor view on a storage, checked when made and materialised once its storage is read."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise ValueError(f"checkpoint tensor refers to {type(storage).__name__}, not a storage")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
            raise ValueError(f"checkpoint tensor has an invalid shape {size!r} or strides {stride!r}")
        self.storage = storage
        self.offset = _whole(offset, "storage offset")
        self.size = tuple(_whole(n, "shape") for n in size)
        self.stride = tuple(_whole(n, "stride") for n in stride)
        self.numel = int(np.prod(self.size, dtype=object))
        # one past the last storage element the view touches (0 elements: touches nothing)
        self.end = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if self.numel else 0

    @property
    def nbytes(self):
        return self.numel * self.storage.dtype.itemsize

    def check_fits(self):
        available = self.storage.available
        if self.end > available or self.numel > available:
            raise ValueError(f"checkpoint tensor of shape {self.size} (offset {self.offset}, strides {self.stride}) "
                             f"does not fit its storage of {available} elements")

    def materialise(self):
        flat = self.storage.data
        if self.numel == 0:
            return np.zeros(self.size, dtype=self.storage.dtype)
        view = np.lib.stride_tricks.as_strided(flat[self.offset:self.end], self.size,
                                               tuple(s * flat.itemsize for s in self.stride), writeable=False)
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
    def __init__(self, stream, storage):
        super().__init__(stream)
        self._storage = storage

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
        if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
            raise ValueError(f"unexpected persistent id in checkpoint: {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unexpected storage type in checkpoint: {storage_type!r}")
        return self._storage(key, storage_type.dtype)


def _storage_table():
    """A function key, dtype -> the one _Storage of that key, and the table it fills."""
    storages = {}

    def storage(key, dtype):
        if key not in storages:
            storages[key] = _Storage(key, dtype)
        elif storages[key].dtype != dtype:
            raise ValueError(f"checkpoint storage {key} is used with two dtypes")
        return storages[key]

    return storage, storages


def _parse_zip(archive, path):
    """(the unpickled object, its storages) of a zip checkpoint; no storage data is read."""
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
    if not pickles:
        raise ValueError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    info = archive.getinfo(pickles[0])
    if info.file_size > 256 * 1024 * 1024:
        raise ValueError(f"{path}: its pickle declares {info.file_size} bytes, not a state dict's")
    storage, storages = _storage_table()
    result = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storage).load()
    for key, item in storages.items():
        member = f"{prefix}data/{key}"
        if member not in names:
            raise ValueError(f"checkpoint storage {key} is missing")
        size = archive.getinfo(member).file_size
        if size % item.dtype.itemsize:
            raise ValueError(f"checkpoint storage {key} has {size} bytes, not a whole number of {item.dtype}")
        item.available = size // item.dtype.itemsize

        def read(count, member=member):
            with archive.open(member) as stream:  # stops after count elements: nothing inflates further
                return stream.read(count)

        item.read = read
    return result, storages


def _parse_legacy(stream, path):
    """(the unpickled object, its storages) of a legacy checkpoint; storage headers are checked
    against the file's length and their data is left unread."""
    storage, storages = _storage_table()

    def plain():
        return _RestrictedUnpickler(stream, storage).load()

    if plain() != LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (bad magic number)")
    plain()  # protocol version
    plain()  # system info
    result = plain()
    keys = plain()
    if not isinstance(keys, list):
        raise ValueError("checkpoint's list of storage keys is damaged")
    file_size = os.fstat(stream.fileno()).st_size
    for key in keys:
        item = storages.get(str(key))
        if item is None:
            raise ValueError(f"checkpoint lists storage {key} that no tensor uses")
        header = stream.read(8)
        if len(header) != 8:
            raise ValueError("checkpoint is truncated inside its storage data")
        (count,) = struct.unpack("<q", header)
        start = stream.tell()
        if count < 0 or start + count * item.dtype.itemsize > file_size:
            raise ValueError("checkpoint is truncated inside its storage data")
        item.available = count

        def read(n, start=start):
            stream.seek(start)
            return stream.read(n)

        item.read = read
        stream.seek(start + count * item.dtype.itemsize)
    missing = [key for key, item in storages.items() if item.available is None]
    if missing:
        raise ValueError(f"checkpoint storage {missing[0]} is missing")
    return result, storages


def _unwrap(result, path):
    for wrapper in ("state_dict", "model"):
        if isinstance(result, dict) and wrapper in result and isinstance(result[wrapper], dict):
            result = result[wrapper]
    if not isinstance(result, dict) or not all(isinstance(v, _PendingTensor) for v in result.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return OrderedDict((str(k), v) for k, v in result.items())


def _read_tensors(tensors, storages, max_bytes, check):
    """Check sizes, let the caller check names and shapes, then read and materialise."""
    total = 0
    for name, tensor in tensors.items():
        try:
            tensor.check_fits()
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        total += tensor.nbytes
    if total > max_bytes:
        raise ValueError(f"checkpoint tensors need {total} bytes, more than max_bytes={max_bytes}")
    if check is not None:
        check({name: (tensor.size, tensor.storage.dtype) for name, tensor in tensors.items()})
    used = {}
    for tensor in tensors.values():
        used[tensor.storage.key] = max(used.get(tensor.storage.key, 0), tensor.end)
    for key, count in used.items():
        item = storages[key]
        raw = item.read(count * item.dtype.itemsize)
        if len(raw) != count * item.dtype.itemsize:
            raise ValueError(f"checkpoint storage {key} is truncated")
        item.data = np.frombuffer(raw, dtype=item.dtype.newbyteorder("<")).astype(item.dtype)
    return OrderedDict((name, tensor.materialise()) for name, tensor in tensors.items())


def read_npz(path, max_bytes=MAX_CHECKPOINT_BYTES, what=".npz file"):
    """{name: array} of an .npz file, with every member's header checked before its data is read.

    np.load would allocate the shape an array's header declares before reading a byte of it; here
    the declared size must match the member's real length, and all members together stay under
    max_bytes. Object arrays (pickles) are refused. Raises ValueError for anything damaged, saying
    "{path} is not a readable {what}".
    """
    arrays, total = OrderedDict(), 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not an array")
                with archive.open(info) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                    else:
                        raise ValueError(f"member {info.filename!r} has unknown .npy version {version}")
                    header = stream.tell()
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects (a pickle), refused")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes != info.file_size - header:
                    raise ValueError(f"member {info.filename!r} declares shape {shape} ({nbytes} bytes) but holds "
                                     f"{info.file_size - header} bytes")
                total += nbytes
                if total > max_bytes:
                    raise ValueError(f"arrays need more than max_bytes={max_bytes} bytes")
                with archive.open(info) as stream:
                    arrays[info.filename[:-4]] = np.lib.format.read_array(stream, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable {what}: {error}") from error
    return arrays


def load_torch_checkpoint(path, check=None, max_bytes=MAX_CHECKPOINT_BYTES):
    """A state dict {name: ndarray} from a torch.save file (zip or legacy) or an .npz file.

    A checkpoint that wraps its state dict (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
    Anything but tensors, numbers and containers in the pickle is refused with ValueError.
    check: called with {name: (shape, dtype)} before any tensor data is read (raise ValueError to
    refuse the file: a wrong file is refused without reading its storages). max_bytes: the most that
    all tensors together may take.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".npz"):
            state = read_npz(path, max_bytes)
            if check is not None:
                check({name: (value.shape, value.dtype) for name, value in state.items()})
            return state
        return _load_torch_checkpoint(path, check, max_bytes)
    except ValueError as error:
        if str(error).startswith(path):
            raise
        raise ValueError(f"{path}: {error}") from error


def _load_torch_checkpoint(path, check, max_bytes):
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                result, storages = _parse_zip(archive, path)
                return _read_tensors(_unwrap(result, path), storages, max_bytes, check)
        with open(path, "rb") as stream:
            result, storages = _parse_legacy(stream, path)
            return _read_tensors(_unwrap(result, path), storages, max_bytes, check)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, zlib.error, AttributeError,
            IndexError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    except MemoryError as error:  # the pickle itself declared an absurd length (the allocation failed)
        raise ValueError(f"{path} is not a readable torch checkpoint: it declares more memory than "
                         "this machine has") from error
