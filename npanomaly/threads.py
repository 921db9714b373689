"""The two thread pools npanomaly runs on, what it sets in them, and a report of what runs.

The convolutions alternate NumPy matrix products (OpenBLAS's threads) with Numba's parallel loops
(GNU OpenMP's threads under Numba's default 'omp' threading layer). After its work each pool keeps
its idle threads spinning for a while, ready for more; on a small machine the spinning threads of
one pool steal the cores that the other pool needs next. npanomaly shortens both spins:

- ``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's idle threads sleep after 2^4 cycles instead of 2^28,
  about 0.1 s). OpenBLAS reads the variable when it starts its threads, which NumPy does as it is
  imported. When NumPy came first (the usual case: ``import numpy as np`` at the top of a script,
  Jupyter, torch), ``configure()`` sets the variable, asks OpenBLAS to read its environment again
  (``openblas_read_env``) and stops its idle threads (``blas_thread_shutdown_``); OpenBLAS starts
  them again at the next product, with the short timeout. So this one works whatever was imported
  first.
- ``GOMP_SPINCOUNT=10000`` (libgomp's idle threads spin 10,000 rounds instead of 300,000). GNU
  OpenMP reads it once, when it loads, and has no call to change it later. npanomaly sets it at
  import; when libgomp is already loaded by then (torch imported before npanomaly: torch ships
  the libgomp that Numba then shares), the setting comes too late and ``configure()`` says so once
  with a ``ThreadingWarning`` that names the variable, its measured cost and the remedy.

A value the user set for either variable is left alone. ``report()`` tells which threading layer,
BLAS library and thread counts run; the benchmarks print it.

Sharing the machine: both pools work in lock step (each parallel loop and each product waits for
its slowest thread), so when another process keeps some cores busy, every step waits for threads
that the scheduler has parked, and the OpenBLAS caller spins while it waits. Two 2-thread processes
on 2 cores took 5-6x the time of one instead of 2x. ``share_cores()`` runs before each unit of
work (a batch, a training step): it counts the runnable threads of other processes
(``/proc/loadavg`` less this process's own running threads) and uses only the cores they leave
free, at least one and at most the thread counts the pools had when npanomaly was imported (or
that the user set since); ``restore_cores()`` gives them back when the batches or the step are
done. ``NPANOMALY_SHARE_CORES=0`` turns it off. See docs/threads.md for the
measured cost of each setting.
"""

import contextlib
import ctypes
import os
import sys
import threading
import warnings

BLAS_TIMEOUT = "4"
GOMP_SPIN = "10000"


class ThreadingWarning(RuntimeWarning):
    """A thread-pool setting that npanomaly relies on could not be applied in this process."""


_state = {"blas_restarted": False, "gomp_late": False}


def _loaded_libraries():
    """Paths of the shared libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:
        return []


def _openblas_libraries():
    """ctypes handles of every loaded OpenBLAS that can re-read its environment and restart.

    Cached until a module is imported (the only way a new library loads here)."""
    if _libraries["modules"] == len(sys.modules):
        return _libraries["handles"]
    handles = []
    for path in _loaded_libraries():
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            library = ctypes.CDLL(path)  # already loaded: dlopen returns the same handle
        except OSError:
            continue
        if hasattr(library, "openblas_read_env") and hasattr(library, "blas_thread_shutdown_"):
            handles.append(library)
    _libraries.update(modules=len(sys.modules), handles=handles)
    return handles


_libraries = {"modules": -1, "handles": []}


def _gomp_libraries():
    return [path for path in _loaded_libraries() if "libgomp" in os.path.basename(path)]


def _blas_symbol(library, name):
    """OpenBLAS function ``openblas_<name>`` under whatever prefix and suffix its wheel gave it
    (NumPy's and SciPy's: scipy_openblas_<name>, with 64_ for 64-bit ints), or None."""
    for prefix in ("openblas", "scipy_openblas"):
        for suffix in ("", "64_"):
            if hasattr(library, f"{prefix}_{name}{suffix}"):
                return getattr(library, f"{prefix}_{name}{suffix}")
    return None


def configure():
    """Apply the two spin settings (see the module docstring). Called by ``import npanomaly``;
    calling it again does nothing more."""
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = BLAS_TIMEOUT
        if "numpy" in sys.modules and not _state["blas_restarted"]:
            # OpenBLAS has read its environment already: make it read the new value and restart
            # its threads (they come back lazily at the next product, on the same core count).
            for library in _openblas_libraries():
                library.openblas_read_env()
                library.blas_thread_shutdown_()
            _state["blas_restarted"] = True
    if "GOMP_SPINCOUNT" not in os.environ:
        late = bool(_gomp_libraries())
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPIN
        if late and not _state["gomp_late"]:
            _state["gomp_late"] = True
            warnings.warn(
                "GNU OpenMP (libgomp) was loaded before npanomaly (by torch?), so GOMP_SPINCOUNT=10000 comes "
                "too late: its idle threads spin 30x longer and take the cores NumPy's products need next "
                "(measured: a training step 1.45x slower on 2 cores). Import npanomaly before torch, or set "
                "GOMP_SPINCOUNT=10000 in the environment before Python starts; a program that calls npanomaly "
                "from one thread only may instead set NUMBA_THREADING_LAYER=workqueue. See docs/threads.md.",
                ThreadingWarning, stacklevel=3)


# pools: {pool key: (the most threads it may use, the count npanomaly last gave it)}
_shared = {"enabled": os.environ.get("NPANOMALY_SHARE_CORES", "1") != "0", "pools": {}, "others": 0}


def _blas_thread_functions(library):
    """(get, set) of one OpenBLAS's thread count, or None when it exports no such pair."""
    get, put = _blas_symbol(library, "get_num_threads"), _blas_symbol(library, "set_num_threads")
    return None if get is None or put is None else (get, put)


def _pools():
    """(key, get, set) of every thread pool: Numba's (for the calling thread) and each OpenBLAS's."""
    import numba

    pools = [("numba", numba.get_num_threads, numba.set_num_threads)]
    for library in _openblas_libraries():
        functions = _blas_thread_functions(library)
        if functions is not None:
            pools.append((library._name, *functions))
    return pools


def _resize_pools(free):
    """Give every pool min(its limit, free) threads, or its whole limit when free is None.

    A pool's limit is what it had when npanomaly first resized it, or what the user set since:
    a count that differs from the one npanomaly last gave is the user's, and becomes the limit.
    Returns the Numba pool's new count."""
    for key, get, put in _pools():
        current = get()
        limit, last = _shared["pools"].get(key, (current, current))
        if current != last:
            limit = current
        wanted = limit if free is None else min(limit, free)
        if wanted != current:
            put(wanted)
        _shared["pools"][key] = (limit, wanted)
    return _shared["pools"]["numba"][1]


def _others_running():
    """Runnable threads of other processes right now: the system's count less our own."""
    try:
        with open("/proc/loadavg") as stream:
            running = int(stream.read().split()[3].split("/")[0])
        ours = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as stream:
                    ours += stream.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - ours)


def share_cores():
    """Use only the cores other processes leave free right now (see the module docstring).

    Sets Numba's thread count for the calling thread and every loaded OpenBLAS's; returns the
    number of threads chosen (None when switched off or not on Linux). Cheap: one read of
    /proc/loadavg and of this process's thread states (~0.1 ms).
    """
    if not _shared["enabled"] or not os.path.exists("/proc/loadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Fewer cores only when other processes were running at this call and the one before: a
    # passing blip (a daemon waking up) must not halve a whole step, a busy neighbour persists.
    others = _others_running()
    busy, _shared["others"] = min(others, _shared["others"]), others
    return _resize_pools(max(1, cores - busy))


def restore_cores():
    """Give the pools back the thread counts share_cores() narrowed, so that code outside npanomaly
    (the user's own NumPy products) never runs on fewer threads because of it. A count the user
    changed in between is left alone."""
    if _shared["pools"]:
        _resize_pools(None)


_single_blas = {"lock": threading.Lock(), "depth": 0, "saved": []}


@contextlib.contextmanager
def single_threaded_blas():
    """Every loaded OpenBLAS runs its products on the calling thread alone while the block runs.

    For kernels whose parallel loops call BLAS from each of their threads (kernels/blas.py): a
    product that also started OpenBLAS's threads would put two threads on every core. OpenBLAS's
    thread count is one global setting (its ``openblas_set_num_threads_local`` sets the global
    count too, measured), so NumPy products that other threads of the program run meanwhile are
    single-threaded as well. Blocks may overlap (two Python threads each running a
    kernel): the first to enter saves the counts, the last to leave puts them back.
    """
    with _single_blas["lock"]:
        if _single_blas["depth"] == 0:
            for key, get, put in _pools():
                if key != "numba":
                    _single_blas["saved"].append((put, get()))
                    put(1)
        _single_blas["depth"] += 1
    try:
        yield
    finally:
        with _single_blas["lock"]:
            _single_blas["depth"] -= 1
            if _single_blas["depth"] == 0:
                for put, count in _single_blas["saved"]:
                    put(count)
                _single_blas["saved"].clear()


def report():
    """What runs: {"numba_threading_layer", "numba_threads", "blas", "gomp", "settings"}.

    blas: [(library path, version string, threads)] of the loaded OpenBLAS libraries; gomp: the
    loaded libgomp paths; settings: the two spin variables as npanomaly left them and whether
    they took effect ("blas_restarted": OpenBLAS re-read its environment after loading;
    "gomp_too_late": libgomp loaded before the spin count was set).
    """
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel loop has run yet: the layer is chosen at the first one
        layer = f"not started (configured: {numba.config.THREADING_LAYER})"
    blas = []
    for library in _openblas_libraries():
        get_config, get_threads = _blas_symbol(library, "get_config"), _blas_symbol(library, "get_num_threads")
        if get_config is not None:
            get_config.restype = ctypes.c_char_p
        version = get_config().decode(errors="replace") if get_config is not None else "?"
        blas.append((library._name, version, get_threads() if get_threads is not None else None))
    return {
        "numba_threading_layer": layer,
        "numba_threads": numba.get_num_threads(),
        "blas": blas,
        "gomp": _gomp_libraries(),
        "settings": {"OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                     "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                     "blas_restarted": _state["blas_restarted"], "gomp_too_late": _state["gomp_late"]},
    }


def describe():
    """report() as one line, for benchmark output."""
    info = report()
    blas = "; ".join(f"{os.path.basename(path)} ({version.split()[1] if len(version.split()) > 1 else version}, "
                     f"{threads} threads)" for path, version, threads in info["blas"]) or "no OpenBLAS found"
    settings = info["settings"]
    return (f"numba {info['numba_threading_layer']} layer, {info['numba_threads']} threads; BLAS {blas}; "
            f"OPENBLAS_THREAD_TIMEOUT={settings['OPENBLAS_THREAD_TIMEOUT']}"
            f"{' (applied at run time)' if settings['blas_restarted'] else ''}, "
            f"GOMP_SPINCOUNT={settings['GOMP_SPINCOUNT']}{' (too late: libgomp loaded first)' if settings['gomp_too_late'] else ''}")
