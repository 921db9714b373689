"""Writing output files without losing anything: atomic replacement, and the checks made before a
long job starts (the folder exists and is writable, the target is not one of the job's inputs, and
an existing file is only replaced when it is one of ours or the user said --force)."""

import os
import tempfile


def atomic_write(path, write):
    """Call write(stream) on a temporary file beside path, then rename it over path.

    A crash or an exception leaves the old file (or no file) in place, never half a file.
    Returns path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".npanomaly-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def same_file(a, b):
    """True when the two paths name one file (through links, relative parts or case of the same inode)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_writable_folder(folder, option):
    """Refuse, before any work, a folder that does not exist or cannot be written."""
    folder = folder or "."
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: the folder {folder} does not exist")
    try:
        handle, probe = tempfile.mkstemp(prefix=".npanomaly-", suffix=".probe", dir=folder)
    except OSError as error:
        raise ValueError(f"{option}: cannot write to the folder {folder}: {error.strerror or error}") from error
    os.close(handle)
    os.unlink(probe)


def check_output(path, option, *, inputs=(), is_ours=None, kind="output", force=False):
    """Refuse, before any work, an output path that would destroy something.

    Args:
        path: where the output will be written.
        option: the command-line option (or argument) that named it, for the message.
        inputs: paths the job reads (the model, images, masks): the output may be none of them,
            --force or not.
        is_ours: is_ours(path) -> True when an existing file there is a previous output of the same
            kind, which may be replaced; anything else needs force.
        kind: what the output is, for the message ("npanomaly model", "report").
    """
    path = os.fspath(path)
    for source in inputs:
        if same_file(path, source):
            raise ValueError(f"{option} {path} is one of this command's inputs; refusing to overwrite it")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give a file name")
    if os.path.exists(path) and not force and not (is_ours is not None and is_ours(path)):
        raise ValueError(f"{option} {path} exists and is not an {kind}; refusing to overwrite it "
                         "(pass --force to replace it)")
    check_writable_folder(os.path.dirname(path), option)
    return path
