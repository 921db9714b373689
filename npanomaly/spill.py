"""Where PatchCore keeps the patch features of a fit: in memory, or in a temporary file on disk.

A fit collects one row of D floats per patch of every training image (N rows), subsamples them
to the memory bank, and needs nothing else of them. ``MemoryFeatures`` holds them in one
preallocated array (no list of parts plus a concatenated copy); ``FeatureSpill`` appends each
batch's rows to a ``.npy`` file and reads back only the chosen rows, so a fit's memory does not
grow with N x D. Both are context managers; the file is removed when the fit ends, also on an
exception or Ctrl-C (and, failing that, when the interpreter exits).
"""

import os
import shutil
import tempfile
import weakref

import numpy as np

#: Patch features up to this many bytes stay in memory when a fit may choose (spill="auto").
SPILL_ABOVE_BYTES = 1024 ** 3
#: Bytes reserved for the .npy header, rewritten with the final row count when the file is done.
HEADER_BYTES = 128
#: Rows whose file offsets fall in one window of this size are read back with one call.
READ_WINDOW_BYTES = 1024 * 1024


def _npy_header(rows, dim):
    """The .npy (format 1.0) header of a C-ordered little-endian float32 [rows, dim] array,
    padded with spaces to HEADER_BYTES."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
    length = HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > length:
        raise ValueError(f"{rows} x {dim} features do not fit a {HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + (text.ljust(length - 1) + "\n").encode("ascii")


class MemoryFeatures:
    """Patch features [N, D] float32 in memory: one array when N is known, else parts joined at the end."""

    def __init__(self, dim, expected_rows=None):
        self.dim, self.rows, self.expected_rows = dim, 0, expected_rows
        self._array = None if expected_rows is None else np.empty((expected_rows, dim), np.float32)
        self._parts = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._array = self._parts = None

    def append(self, rows):
        if self._array is None:
            self._parts.append(np.array(rows, np.float32))
        else:
            self._array[self.rows:self.rows + rows.shape[0]] = rows
        self.rows += rows.shape[0]

    def array(self):
        """All rows [N, D]."""
        if self._array is None:
            self._array, self._parts = np.concatenate(self._parts), []
        return self._array

    def gather(self, indices):
        return np.ascontiguousarray(self.array()[indices])


class FeatureSpill:
    """Patch features [N, D] float32 appended to a temporary .npy file in ``folder``.

    The file is a valid .npy once ``finish()`` has written its header (np.load can map it). Rows
    are written with plain file writes and read back with ``os.pread``, not through a memory map,
    so the process's resident memory never holds the file (a mapped page counts in its RSS).

    Args:
        dim: D.
        folder: where the file goes (default: the system's temporary folder). Refused before
            anything is written when it is not a writable folder, or when ``expected_rows`` rows
            would not fit its free space.
    """

    def __init__(self, dim, folder=None, expected_rows=None):
        folder = tempfile.gettempdir() if folder is None else os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"spill_dir {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"spill_dir {folder} is not writable")
        if expected_rows is not None:
            need, free = expected_rows * dim * 4, shutil.disk_usage(folder).free
            if need > free:
                raise ValueError(f"spill_dir {folder} has {free / 1e9:.2f} GB free, but the patch features need "
                                 f"{need / 1e9:.2f} GB ({expected_rows} x {dim} float32): pass spill_dir= a folder "
                                 "on a larger disk")
        self.dim, self.folder, self.rows, self.expected_rows = dim, folder, 0, expected_rows
        fd, self.path = tempfile.mkstemp(prefix="npanomaly-features-", suffix=".npy", dir=folder)
        self._file = os.fdopen(fd, "w+b")
        self._cleanup = weakref.finalize(self, _remove, self._file, self.path)
        self._file.write(_npy_header(0, dim))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close and delete the file (idempotent)."""
        self._cleanup()

    def append(self, rows):
        """Write rows [k, D] at the end of the file."""
        rows = np.ascontiguousarray(rows, dtype="<f4")
        try:
            self._file.write(memoryview(rows).cast("B"))
        except OSError as error:
            raise OSError(f"writing patch features to spill_dir {self.folder} failed after "
                          f"{self.rows * self.dim * 4 / 1e9:.2f} GB: {error.strerror or error}") from error
        self.rows += rows.shape[0]

    def finish(self):
        """Write the header with the final shape and flush: the file is now a complete .npy."""
        self._file.seek(0)
        self._file.write(_npy_header(self.rows, self.dim))
        self._file.seek(0, os.SEEK_END)
        self._file.flush()

    def array(self):
        """All rows as a read-only memory map (the exact greedy coreset reads them all at each step)."""
        self.finish()
        return np.load(self.path, mmap_mode="r")

    def gather(self, indices):
        """The rows at ``indices``, in that order, as float32 [len(indices), D].

        Rows are read in file order: those whose offsets fall in one READ_WINDOW_BYTES window come
        from one read spanning the first to the last of them, so a dense selection reads the file
        in large sequential pieces and a sparse one reads little more than its rows.
        """
        self.finish()
        indices = np.asarray(indices, dtype=np.int64)
        row_bytes = self.dim * 4
        order = np.argsort(indices, kind="stable")
        rows = indices[order]
        out = np.empty((indices.size, self.dim), np.float32)
        windows = (rows * row_bytes) // READ_WINDOW_BYTES
        bounds = np.flatnonzero(np.diff(windows)) + 1
        fd = self._file.fileno()
        for first, last in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [rows.size]])):
            low, high = rows[first], rows[last - 1] + 1
            data = os.pread(fd, int((high - low) * row_bytes), HEADER_BYTES + int(low) * row_bytes)
            if len(data) != (high - low) * row_bytes:
                raise OSError(f"the spill file {self.path} is shorter than the features written to it")
            block = np.frombuffer(data, dtype="<f4").reshape(-1, self.dim)
            out[order[first:last]] = block[rows[first:last] - low]
        return out


def _remove(file, path):
    file.close()
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
