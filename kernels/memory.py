"""Recycled memory for the large arrays of the convolution drivers (outputs, columns, gradients).

Why: a training step allocates and frees the same large arrays every time (a Student-Teacher
step about 150 MB). glibc's malloc serves such requests from the top of its heap or from fresh
mmaps, and once more than its trim threshold (at most 64 MiB) lies free at the top it hands the
memory back to the kernel, so the next step page-faults it in again, zero-filled. Measured on the
Student-Teacher step: 900-1,900 page faults and 15-50 ms of kernel time per step, and a smaller
im2col chunk, which would be faster, tripled them (glibc raises its thresholds only when a large
mmapped block is freed). Setting glibc's thresholds would fix this for the whole process, which is
the application's decision and not a library's. Instead, arrays of at least RECYCLE_MIN_BYTES come
from private anonymous mappings that npanomaly keeps when the array dies and hands out again for
the next request of the same size: after the first step no page is faulted in again.

A mapping returns to the pool only when the flat array on it has been garbage-collected, which
happens only after every view of it is gone (a view keeps its base alive): a recycled array never
aliases a live one. Idle mappings are kept up to RECYCLE_LIMIT_BYTES in all, the least recently
returned dropped first; ``release()`` drops them all. Mappings are private (copy-on-write after a
fork), so a forked worker never shares them with its parent.
"""

import mmap
import threading
import weakref
from collections import OrderedDict

import numpy as np

from . import _config

_PAGE = mmap.PAGESIZE
# Platforms without MAP_PRIVATE (Windows) get plain NumPy arrays.
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE")

# Reentrant: a mapping comes back from a weakref callback, which the cyclic garbage collector can
# run in the middle of _take or _give_back on the same thread. Nothing here iterates over the pool,
# so such a nested call only ever sees it between two complete updates.
_lock = threading.RLock()
_idle_by_size = {}  # size -> idle mappings of that size, the most recently returned last
_idle_order = OrderedDict()  # id(mapping) -> (mapping, size), the least recently returned first
_idle_bytes = 0


def empty(shape, dtype):
    """An uninitialised C-contiguous array like np.empty, on recycled memory when it is large."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not _CAN_MAP or nbytes == 0 or nbytes < _config.RECYCLE_MIN_BYTES or _config.RECYCLE_LIMIT_BYTES <= 0:
        return np.empty(shape, dtype)
    size = -(-nbytes // _PAGE) * _PAGE
    mapping = _take(size)
    if mapping is None:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)  # as NumPy asks for its own large arrays
    # The finaliser watches the flat array on the mapping, not the shaped view returned: NumPy points
    # every view's base at the flat array (it stops collapsing bases at the mapping), so the flat
    # array dies only after the last view of it.
    flat = np.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize)
    weakref.finalize(flat, _give_back, mapping, size).atexit = False
    return flat.reshape(shape)


def zeros(shape, dtype):
    """A zero-filled array like np.zeros, on recycled memory when it is large."""
    array = empty(shape, dtype)
    array.fill(0)
    return array


def release():
    """Drop every idle mapping (memory held by live arrays is unaffected). Returns the bytes released."""
    with _lock:
        released = _idle_bytes
        while _idle_order:
            _drop_oldest()
    return released


def idle_bytes():
    """Bytes held in idle mappings, waiting for a request of their size."""
    return _idle_bytes


def _take(size):
    """The most recently returned idle mapping of exactly this size, or None."""
    global _idle_bytes
    with _lock:
        same_size = _idle_by_size.get(size)
        if not same_size:
            return None
        mapping = same_size.pop()
        del _idle_order[id(mapping)]
        _idle_bytes -= size
        return mapping


def _give_back(mapping, size):
    """Called when the flat array on mapping is collected: keep the mapping for reuse, within the limit."""
    global _idle_bytes
    with _lock:
        _idle_by_size.setdefault(size, []).append(mapping)
        _idle_order[id(mapping)] = (mapping, size)
        _idle_bytes += size
        while _idle_bytes > _config.RECYCLE_LIMIT_BYTES and _idle_order:
            _drop_oldest()


def _drop_oldest():
    """Forget the least recently returned idle mapping; it is unmapped once nothing refers to it."""
    global _idle_bytes
    _, (mapping, size) = _idle_order.popitem(last=False)
    _idle_by_size[size].remove(mapping)
    _idle_bytes -= size
