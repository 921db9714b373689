"""The thread pools' spin settings hold whatever the user imported first (issue 14).

Each case runs in a fresh interpreter, because the settings are about what happens when libraries
load. What is observed is the behaviour itself: the CPU time a process burns while its main thread
sleeps right after a matrix product is OpenBLAS's idle workers spinning; the value OpenBLAS reports
for its timeout; and the warning when GNU OpenMP was loaded first and its spin cannot be changed.
"""

import json
import os
import subprocess
import sys

import pytest

SPIN_PROBE = """
import json, sys, time, warnings
warnings.simplefilter("always")
order = sys.argv[1]
caught = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if order in ("numpy", "torch"):
        import numpy as np
        (np.ones((256, 256), np.float32) @ np.ones((256, 256), np.float32))
    if order == "torch":
        import torch
        torch.ones(64, 64) @ torch.ones(64, 64)
    import npanomaly
import ctypes, numpy as np
from npanomaly import threads
a = np.random.default_rng(0).random((600, 600), dtype=np.float32)
spins = []
for _ in range(5):
    a @ a                                   # both OpenBLAS threads work
    start = time.process_time()
    time.sleep(0.05)                        # the main thread sleeps: any CPU time now is spinning
    spins.append(time.process_time() - start)
libraries = threads._openblas_libraries()
timeout = [lib.openblas_thread_timeout() for lib in libraries if hasattr(lib, "openblas_thread_timeout")]
print(json.dumps(dict(spin=sorted(spins)[2], timeout=timeout, warnings=[str(w.category.__name__) for w in caught],
                      report=threads.report()["settings"])))
"""


def run_probe(order, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    env.update({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}, **(extra_env or {}))
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE, order], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["npanomaly", "numpy", "torch"])
def test_openblas_idle_threads_sleep_whatever_was_imported_first(order):
    if order == "torch":
        pytest.importorskip("torch")
    result = run_probe(order)
    assert result["timeout"] and all(value == 4 for value in result["timeout"]), result
    # 0.1 s of spinning per product before; a short timeout leaves the sleeping process idle
    assert result["spin"] < 0.01, result
    assert result["report"]["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert result["report"]["blas_restarted"] == (order != "npanomaly")


def test_the_probe_sees_spinning_when_the_timeout_is_long():
    """The same probe with the user's own long timeout (left alone by npanomaly) does see the spin,
    so the assertion above can fail."""
    result = run_probe("numpy", {"OPENBLAS_THREAD_TIMEOUT": "28"})
    assert result["timeout"] == [28] or all(value == 28 for value in result["timeout"])
    assert result["spin"] > 0.02, result


def test_a_libgomp_loaded_first_is_reported_once():
    pytest.importorskip("torch")
    torch_first = run_probe("torch")
    assert torch_first["warnings"].count("ThreadingWarning") == 1 and torch_first["report"]["gomp_too_late"]
    numpy_first = run_probe("numpy")
    assert "ThreadingWarning" not in numpy_first["warnings"] and not numpy_first["report"]["gomp_too_late"]
    chosen = run_probe("torch", {"GOMP_SPINCOUNT": "10000"})  # the user's own value: nothing to say
    assert "ThreadingWarning" not in chosen["warnings"]


def test_report_names_layer_blas_and_threads():
    import numpy as np

    import npanomaly
    from npanomaly import kernels

    kernels.all_finite(np.ones(10))  # start Numba's pool
    info = npanomaly.threads.report()
    assert info["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["numba_threads"] >= 1
    line = npanomaly.threads.describe()
    assert "layer" in line and "OPENBLAS_THREAD_TIMEOUT=" in line and "GOMP_SPINCOUNT=" in line


@pytest.fixture
def two_cores(monkeypatch):
    """share_cores on a pretend 2-core machine whose other processes the test decides."""
    import numba

    from npanomaly import threads

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setitem(threads._shared, "enabled", True)
    saved = dict(threads._shared)
    numba.set_num_threads(2)
    blas = [f for f in map(threads._blas_thread_functions, threads._openblas_libraries()) if f]
    before = [get() for get, _ in blas]
    for _, put in blas:  # earlier tests may have left a pool narrowed by share_cores on a busy machine
        put(2)
    threads._shared.update(pools={}, others=0)
    yield threads, numba, blas
    threads._shared.update(saved)
    numba.set_num_threads(2)
    for (_, put), value in zip(blas, before):
        put(value)


def test_share_cores_leaves_busy_cores_to_other_processes(two_cores, monkeypatch):
    threads, numba, blas = two_cores
    others = iter([0, 1, 1, 2, 0, 1])
    monkeypatch.setattr(threads, "_others_running", lambda: next(others))
    chosen = []
    for _ in range(6):
        chosen.append(threads.share_cores())
        assert numba.get_num_threads() == chosen[-1]
        assert all(get() == chosen[-1] for get, _ in blas)
    # a single busy sample is a blip; two in a row are a neighbour; free cores are taken back at once
    assert chosen == [2, 2, 1, 1, 2, 2]


def test_share_cores_keeps_the_user_s_own_limit(two_cores, monkeypatch):
    threads, numba, blas = two_cores
    monkeypatch.setattr(threads, "_others_running", lambda: 0)
    assert threads.share_cores() == 2
    numba.set_num_threads(1)  # the user's choice after npanomaly's: it becomes the most we use
    assert threads.share_cores() == 1 and numba.get_num_threads() == 1
    monkeypatch.setitem(threads._shared, "enabled", False)
    assert threads.share_cores() is None


def test_the_pools_get_their_threads_back_after_the_work(two_cores, monkeypatch):
    """A busy neighbour narrows the pools for npanomaly's batches only, never for the user's own
    NumPy code afterwards."""
    import numpy as np

    from npanomaly import PatchCore

    threads, numba, blas = two_cores
    monkeypatch.setattr(threads, "_others_running", lambda: 5)
    seen = []
    real = threads.share_cores
    monkeypatch.setattr(threads, "share_cores", lambda: seen.append(real()) or seen[-1])
    images = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32)
    PatchCore(feature_dim=8, batch_size=2).fit(images)
    assert 1 in seen  # it did narrow while working
    assert numba.get_num_threads() == 2 and all(get() == 2 for get, _ in blas)
