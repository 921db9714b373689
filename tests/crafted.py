"""Hand-made torch checkpoints, including ones torch itself would never write (negative offsets,
strides over a tiny storage, lying sizes), for the reader's hostile-input tests. No torch needed."""

import io
import pickle
import struct
import zipfile
from collections import OrderedDict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Global:
    """A reference to module.name written as a GLOBAL opcode, without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists on a callable; never called
        raise AssertionError("a stand-in")


class Tensor:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, key, offset, size, stride, storage_type="FloatStorage", numel=0):
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)
        self.storage_type, self.numel = storage_type, numel


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets save() be extended
    legacy = False

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        if isinstance(obj, Tensor):
            self.save_reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                             (_StorageRef(obj), obj.offset, obj.size, obj.stride, False, OrderedDict()), obj=None)
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            t = obj.tensor
            pid = ("storage", Global("torch", t.storage_type), t.key, "cpu", t.numel)
            return pid + (None,) if self.legacy else pid  # the legacy format adds view metadata
        return None


class _StorageRef:
    def __init__(self, tensor):
        self.tensor = tensor


def dumps(obj, legacy=False):
    stream = io.BytesIO()
    pickler = _Pickler(stream, protocol=2)
    pickler.legacy = legacy
    pickler.dump(obj)
    return stream.getvalue()


def zip_checkpoint(path, state, storages, compress=zipfile.ZIP_STORED):
    """torch.save's zip layout: archive/data.pkl and archive/data/<key> (raw little-endian bytes)."""
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr("archive/data.pkl", dumps(state))
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", "3\n")
    return path


def legacy_checkpoint(path, state, storages, counts=None):
    """torch.save's legacy layout: magic, protocol, system info, the object, the keys, then each
    storage as an 8-byte element count and its bytes (counts may lie, to test the reader)."""
    parts = [dumps(LEGACY_MAGIC), dumps(1001), dumps({"little_endian": True}), dumps(state, legacy=True),
             dumps(list(storages))]
    for key, raw in storages.items():
        count = (counts or {}).get(key, len(raw) // 4)
        parts.append(struct.pack("<q", count) + raw)
    with open(path, "wb") as stream:
        stream.write(b"".join(parts))
    return path
