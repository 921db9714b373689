"""The npanomaly command end to end (demo, fit, predict, eval) and the self-contained report."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import npanomaly
from npanomaly import synthetic
from npanomaly.cli import main
from npanomaly.png import decode_png
from npanomaly.report import colormap, heatmap_overlay


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    category = synthetic.make_category("grid", n_train=12, n_test_good=4, n_test_defect=4, size=32, seed=1)
    return synthetic.write_mvtec(root, category)


def test_a_random_teacher_is_called_what_it_is(grid_data, tmp_path, capsys):
    out = tmp_path / "st.npz"
    assert main(["fit", grid_data, "--model", "student-teacher", "--size", "32", "--epochs", "1", "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert "random teacher" in err and "--backbone efficientnet_lite0" in err
    assert main(["fit", grid_data, "--size", "32", "--out", str(tmp_path / "pc.npz")]) == 0
    assert "random teacher" not in capsys.readouterr().err
    assert main(["fit", grid_data, "--model", "student-teacher", "--size", "32", "--epochs", "1", "--out",
                 str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: stderr is for errors alone


def test_fit_an_ensemble_of_students(grid_data, tmp_path, capsys):
    out = tmp_path / "ensemble.npz"
    assert main(["fit", grid_data, "--model", "student-teacher", "--size", "32", "--epochs", "1", "--students", "2",
                 "--out", str(out), "--quiet"]) == 0
    model = npanomaly.load(out)
    assert model.n_students == 2 and model.score_statistics_.shape == (1, 4)
    assert main(["fit", grid_data, "--model", "student-teacher", "--students", "0", "--out", str(out), "--quiet"]) == 1
    assert "n_students must be >= 1" in capsys.readouterr().err


def test_fit_predict_eval(grid_data, tmp_path, capsys):
    model = tmp_path / "model.npz"
    assert main(["fit", grid_data, "--size", "32", "--out", str(model), "--quiet"]) == 0
    assert "saved PatchCore" in capsys.readouterr().out
    hole = os.path.join(grid_data, "test", "hole", "000.png")
    good = os.path.join(grid_data, "test", "good", "000.png")
    assert main(["predict", str(model), hole, good, "--json", "--heatmaps", str(tmp_path / "maps")]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [hole, good]
    assert results[0]["score"] > results[1]["score"]
    maps = sorted(os.listdir(tmp_path / "maps"))
    assert maps == ["000_1_heatmap.png", "000_heatmap.png"]  # same file names, both kept
    assert decode_png((tmp_path / "maps" / maps[0]).read_bytes()).shape == (32, 32, 3)
    report = tmp_path / "report.html"
    assert main(["eval", str(model), grid_data, "--report", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"image AUROC\s+[01]\.\d{4}", out) and "AUPRO" in out
    page = report.read_text()
    assert page.count("<svg") == 2 and page.count("data:image/png;base64,") == 3 * 8
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from outside


def test_student_teacher_from_the_command_line(grid_data, tmp_path, capsys):
    model = tmp_path / "st.npz"
    assert main(["fit", grid_data, "--model", "student-teacher", "--size", "32", "--epochs", "2",
                 "--out", str(model)]) == 0
    captured = capsys.readouterr()
    assert "saved StudentTeacher" in captured.out and "epoch   2/2" in captured.err


def test_errors_are_one_line_and_a_non_zero_exit(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.npz"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("npanomaly: error:") and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "bad.npz"), "x.png"]) == 1
    assert "not a readable npanomaly model file" in capsys.readouterr().err
    assert main(["fit", str(tmp_path)]) == 1
    assert "neither the MVTec AD layout" in capsys.readouterr().err
    assert main(["fit", str(tmp_path), "--backbone", "resnet18"]) == 1
    assert "resnet18 needs weights=PATH" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "npanomaly", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("npanomaly ")


@pytest.mark.slow
def test_demo_runs_and_detects(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "32", "--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in synthetic.STYLES]
    assert len(rows) == 6
    assert np.mean([float(row[2]) for row in rows]) > 0.75  # image AUROC, even at 32x32 and 3 epochs
    assert (tmp_path / "report.html").exists()
    assert sorted(os.listdir(tmp_path / "data")) == sorted(synthetic.STYLES)


def test_colormap_and_overlay():
    ramp = colormap(np.linspace(0, 1, 5))
    assert ramp.shape == (5, 3) and np.all((ramp >= 0) & (ramp <= 1))
    assert ramp[0, 2] > ramp[0, 0] and ramp[-1, 0] > ramp[-1, 2]  # blue for low, red for high
    overlay = heatmap_overlay(np.zeros((1, 4, 4)), np.ones((4, 4)), 0.0, 1.0)
    assert overlay.shape == (4, 4, 3) and overlay.dtype == np.uint8
