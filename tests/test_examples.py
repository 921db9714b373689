"""Every script in examples/ runs, at toy size, and says what it should (so the examples never rot)."""

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def run(script, *args, cwd):
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_patchcore_folder_writes_a_heatmap_per_test_image(tmp_path):
    out = run("patchcore_folder.py", "--size", 32, "--out", "maps", cwd=tmp_path)
    match = re.search(r"(\d+) test images, image AUROC ([01]\.\d{3})", out)
    assert match and float(match.group(2)) > 0.5
    assert len(os.listdir(tmp_path / "maps")) == int(match.group(1))


def test_train_student_draws_its_loss_curve(tmp_path):
    out = run("train_student.py", "--epochs", 3, "--size", 32, "--out", "loss.svg", cwd=tmp_path)
    assert "over 3 epochs" in out
    svg = (tmp_path / "loss.svg").read_text()
    assert svg.count("<polyline") == 2 and svg.startswith("<svg")


def test_crosscheck_layer_agrees_with_torch(tmp_path):
    pytest.importorskip("torch")
    out = run("crosscheck_layer.py", "--dtype", "float64", cwd=tmp_path)
    differences = [float(v) for v in re.findall(r"max \|difference\| (\S+)", out)]
    assert len(differences) >= 6 and max(differences) < 1e-10, out


def test_read_checkpoint_runs_a_torch_saved_resnet(tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.dirname(__file__))
    import torch_backbones as tb

    twin = tb.ResNet(False, (2, 2, 2, 2), 1)
    tb.randomise(twin, seed=0)
    torch.save(twin.state_dict(), tmp_path / "resnet18.pth")
    out = run("read_checkpoint.py", tmp_path / "resnet18.pth", cwd=tmp_path)
    assert "tensors" in out and "layer3: features (1, 256, 14, 14)" in out
