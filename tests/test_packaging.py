"""The wheel maps the top-level kernels/ folder to npanomaly.kernels, proven outside the source tree."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_modules():
    """Every module of the source tree under its installed name (kernels/ installs as npanomaly.kernels),
    except __main__ modules, which run when imported (the wheel test checks they are there)."""
    modules = []
    for folder, package in (("npanomaly", "npanomaly"), ("kernels", "npanomaly.kernels")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join((package,) + parts))
    return modules


def _build_wheel(tmp_path):
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
    return wheel


def test_wheel_installs_every_module_in_a_fresh_venv(tmp_path):
    """The built wheel, pip-installed into a new virtual environment, imports every module of the
    source tree (issue 13: npanomaly.kernels.cuda was missing from the wheel), outside the checkout."""
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "npanomaly/kernels/conv.py" in names and "npanomaly/kernels/cuda/ops.py" in names
    assert "npanomaly/__main__.py" in names
    assert not any(name.startswith("kernels/") for name in names)

    venv_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    python = venv_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The fresh venv has no pip and no network: the test's own pip installs into it, and NumPy/Numba
    # come from this interpreter's site-packages through a path line. A .pth line adds the folder
    # without running the .pth files inside it, so the checkout's editable install stays invisible.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    import numba
    import numpy
    deps = {str(Path(module.__file__).resolve().parents[1]) for module in (numpy, numba)}
    (site / "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    modules = _source_modules()
    assert "npanomaly.kernels.cuda.ops" in modules
    script = ("import importlib, sys, npanomaly, numpy as np\n"
              "for name in sys.argv[1:]:\n"
              "    module = importlib.import_module(name)\n"
              "    print(name, module.__file__)\n"
              "x = np.ones((1, 1, 3, 3))\n"
              "print('conv', npanomaly.kernels.conv2d_forward(x, np.ones((1, 1, 3, 3)), None, 1, 1, 0, 0).item())\n")
    result = subprocess.run([str(python), "-c", script, *modules], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "", "NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert set(modules) <= set(lines)
    for name in modules:
        assert Path(lines[name]).resolve().is_relative_to(site.resolve()), (name, lines[name])
    assert float(lines["conv"]) == 9.0


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
