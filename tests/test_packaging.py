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
