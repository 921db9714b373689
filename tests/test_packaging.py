"""The wheel maps the top-level kernels/ folder to npanomaly.kernels, proven outside the source tree."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_as_npanomaly_kernels(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("npanomaly", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("npanomaly-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "npanomaly/kernels/conv.py" in names and "npanomaly/kernels/_config.py" in names
    assert not any(name.startswith("kernels/") for name in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # PYTHONPATH comes before site-packages, so this imports the unpacked wheel, not the checkout.
    script = ("import npanomaly, npanomaly.kernels as k, numpy as np; print(npanomaly.kernels.__file__); "
              "x = np.ones((1, 1, 3, 3)); print(k.conv2d_forward(x, np.ones((1, 1, 3, 3)), None, 1, 1, 0, 0).item())")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "", "NUMBA_CACHE_DIR": str(tmp_path / "cache")},
                            check=True)
    kernels_file, value = result.stdout.split()
    assert Path(kernels_file).is_relative_to(site)
    assert float(value) == 9.0


def _environment_after_import(preset):
    """OPENBLAS_THREAD_TIMEOUT and GOMP_SPINCOUNT as a fresh interpreter sees them after `import npanomaly`."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    env.update(preset)
    code = "import os, npanomaly; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_import_shortens_the_thread_pools_spin_unless_the_user_chose():
    """Both settings are read when their library loads, so npanomaly sets defaults at import (see
    README, Speed); values the user set are kept."""
    assert _environment_after_import({}) == ["4", "10000"]
    assert _environment_after_import({"OPENBLAS_THREAD_TIMEOUT": "12", "GOMP_SPINCOUNT": "0"}) == ["12", "0"]
