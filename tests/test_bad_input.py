"""What a new user (or a careless script) gets wrong: one clear line, and no file lost or changed.

The command-line cases run through ``main([...])`` with files in a temporary folder and check the
message, the exit status and that every file that was there is byte for byte unchanged.
"""

import hashlib
import json
import os
import re
import tracemalloc

import numpy as np
import pytest

import npanomaly
from npanomaly import PatchCore, StudentTeacher, metrics, synthetic
from npanomaly.cli import _heatmap_names, main
from npanomaly.data import load_image, load_images, open_dataset, read_image, read_mask
from npanomaly.png import encode_png, read_png, write_png
from textures import textures


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """An MVTec-layout data set and a PatchCore model fitted on it, both on disk."""
    root = tmp_path_factory.mktemp("grid")
    category = synthetic.make_category("grid", n_train=8, n_test_good=3, n_test_defect=4, size=32, seed=2)
    data = synthetic.write_mvtec(root / "data", category)
    model = str(root / "model.npz")
    assert main(["fit", data, "--size", "32", "--out", model, "--quiet"]) == 0
    return data, model


def fingerprint(folder):
    """{path: sha256} of every file under folder."""
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as stream:
                out[path] = hashlib.sha256(stream.read()).hexdigest()
    return out


def run_error(capsys, argv):
    """main(argv) must fail with status 1 and one line on stderr; returns that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("npanomaly: error:") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------- nothing lost

def test_fit_never_replaces_a_file_that_is_not_a_model(grid, tmp_path, capsys):
    data, model = grid
    image = os.path.join(data, "train", "good", "000.png")
    before = fingerprint(data)
    err = run_error(capsys, ["fit", data, "--size", "32", "--out", image, "--quiet"])
    assert "is one of this command's inputs" in err
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"my holiday picture")
    err = run_error(capsys, ["fit", data, "--size", "32", "--out", str(notes), "--quiet"])
    assert "exists and is not an npanomaly model" in err and "--force" in err
    assert notes.read_bytes() == b"my holiday picture" and fingerprint(data) == before
    assert main(["fit", data, "--size", "32", "--out", str(notes), "--quiet", "--force"]) == 0
    assert isinstance(npanomaly.load(notes), PatchCore)
    # an existing model is replaced without --force: that is what --out is for
    again = tmp_path / "again.npz"
    assert main(["fit", data, "--size", "32", "--out", str(again), "--quiet"]) == 0
    assert main(["fit", data, "--size", "32", "--out", str(again), "--quiet"]) == 0


def test_eval_report_may_be_neither_the_model_nor_an_input(grid, tmp_path, capsys):
    data, model = grid
    before = fingerprint(os.path.dirname(model))
    err = run_error(capsys, ["eval", model, data, "--report", model, "--quiet"])
    assert "is one of this command's inputs" in err
    mask = os.path.join(data, "ground_truth", "hole", "000_mask.png")
    err = run_error(capsys, ["eval", model, data, "--report", mask, "--quiet", "--force"])
    assert "is one of this command's inputs" in err
    assert fingerprint(os.path.dirname(model)) == before
    other = tmp_path / "other.html"
    other.write_text("<html>my page</html>")
    assert "not an npanomaly report" in run_error(capsys, ["eval", model, data, "--report", str(other), "--quiet"])
    report = tmp_path / "report.html"
    assert main(["eval", model, data, "--report", str(report), "--quiet"]) == 0
    assert main(["eval", model, data, "--report", str(report), "--quiet"]) == 0  # our own report: replaced
    assert other.read_text() == "<html>my page</html>"


def test_a_diverging_fit_saves_nothing_over_a_good_model(grid, tmp_path, capsys):
    data, _ = grid
    good = tmp_path / "good.npz"
    assert main(["fit", data, "--model", "student-teacher", "--size", "32", "--epochs", "1", "--out", str(good),
                 "--quiet"]) == 0
    before = good.read_bytes()
    err = run_error(capsys, ["fit", data, "--model", "student-teacher", "--size", "32", "--epochs", "2",
                             "--lr", "1e30", "--out", str(good), "--quiet"])
    assert "diverged in epoch 1/2" in err and "smaller learning rate than lr=1e+30" in err
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]  # no temporary file left either


@pytest.mark.parametrize("size, match", [
    ("0", "needs at least 8x8"), ("1", "needs at least 8x8"), ("-8", "needs at least 8x8"),
    ("100000", "larger than the 4096"), ("7", "block3 stage \\(stride 8\\)"),
])
def test_size_is_checked_before_anything_is_read(grid, tmp_path, capsys, size, match):
    data, _ = grid
    err = run_error(capsys, ["fit", data, "--size", size, "--out", str(tmp_path / "m.npz"), "--quiet"])
    assert err.startswith(f"npanomaly: error: --size: images of {size}x{size}")
    assert re.search(match, err)
    assert not (tmp_path / "m.npz").exists()


def test_fit_into_a_missing_folder_fails_before_fitting(grid, tmp_path, capsys, monkeypatch):
    data, _ = grid
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fit ran"))
    err = run_error(capsys, ["fit", data, "--out", str(tmp_path / "missing" / "m.npz"), "--quiet"])
    assert "--out: the folder" in err and "does not exist" in err


def test_heatmap_names_never_collide(grid, tmp_path, capsys):
    data, model = grid
    sources = {}
    for folder, name, test in (("a", "x.png", "good/000.png"), ("b", "x.png", "hole/000.png"),
                               ("c", "x_1.png", "good/001.png"), ("d", "X.png", "good/002.png")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / name
        path.write_bytes(open(os.path.join(data, "test", test), "rb").read())
        sources[str(path)] = path
    assert main(["predict", model, *sources, "--heatmaps", str(tmp_path / "maps"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    written = [r["heatmap"] for r in results]
    assert len({p.lower() for p in written}) == 4 and all(os.path.exists(p) for p in written)
    assert sorted(os.listdir(tmp_path / "maps")) == sorted(os.path.basename(p) for p in written)
    assert _heatmap_names(["a/x.png", "b/x.png", "c/x_1.png"]) == ["x_heatmap.png", "x_1_heatmap.png",
                                                                   "x_1_2_heatmap.png"]


def test_heatmaps_never_replace_an_input(grid, tmp_path, capsys):
    data, model = grid
    folder = tmp_path / "maps"
    folder.mkdir()
    victim = folder / "y_heatmap.png"
    victim.write_bytes(open(os.path.join(data, "test", "good", "000.png"), "rb").read())
    before = victim.read_bytes()
    err = run_error(capsys, ["predict", model, str(victim), str(folder / "y.png"), "--heatmaps", str(folder)])
    assert "is one of this command's inputs" in err and victim.read_bytes() == before


def test_a_truncated_image_names_the_file(grid, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    data, model = grid
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:200])
    err = run_error(capsys, ["predict", model, str(path)])
    assert "cut.jpg" in err


# ----------------------------------------------------------------------------- masks

def expected_masks(defects, category):
    """category's masks in the data set's order (sorted by defect folder; one image per defect here)."""
    by_defect = {d: m for d, m in zip(category.defects, category.masks)}
    return np.stack([by_defect[d] for d in defects])


def _write_category_with_masks(root, transform):
    category = synthetic.make_category("woven", n_train=2, n_test_good=2, n_test_defect=4, size=32, seed=4)
    base = synthetic.write_mvtec(root, category)
    for defect in ("scratch", "hole", "stain", "foreign"):
        path = os.path.join(base, "ground_truth", defect, "000_mask.png")
        write_png(path, transform(read_png(path), defect))
    return base, category


@pytest.mark.parametrize("transform", [
    lambda mask, defect: (mask > 0).astype(np.uint8),                                  # 0/1 masks
    lambda mask, defect: (mask > 0).astype(np.uint8) * (1 if defect in ("hole", "stain") else 255),  # mixed
    lambda mask, defect: np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], axis=2),  # red on black
    lambda mask, defect: (mask > 0).astype(np.uint16) * 65535,                         # 16-bit
])
def test_masks_are_non_zero_wherever_the_defect_is(tmp_path, transform):
    """0/1 masks read as empty, and mixed ones gave wrong pixel metrics without a word."""
    reference_root, category = _write_category_with_masks(tmp_path / "ref", lambda mask, defect: mask)
    root, _ = _write_category_with_masks(tmp_path / "edited", transform)
    _, _, reference, defects = open_dataset(reference_root).test_images()
    _, _, masks, _ = open_dataset(root).test_images()
    np.testing.assert_array_equal(masks, reference)
    np.testing.assert_array_equal(masks, expected_masks(defects, category))
    maps = np.random.default_rng(0).random(masks.shape)
    assert metrics.pixel_auroc(maps, masks) == metrics.pixel_auroc(maps, reference)
    assert metrics.aupro(maps, masks) == metrics.aupro(maps, reference)


def test_a_palette_mask_with_the_defect_drawn_in_red_reads_as_the_defect(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    mask = Image.new("P", (16, 16), 0)
    mask.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    mask.paste(1, (4, 4, 8, 12))
    mask.save(tmp_path / "m.png")
    expected = np.zeros((16, 16), bool)
    expected[4:12, 4:8] = True
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), expected)


def test_masks_of_another_size_warn_and_of_another_shape_are_refused(tmp_path):
    base, category = _write_category_with_masks(tmp_path, lambda mask, defect: mask)
    hole = os.path.join(base, "ground_truth", "hole", "000_mask.png")
    write_png(hole, np.repeat(np.repeat(read_png(hole), 2, axis=0), 2, axis=1))  # 64x64 for a 32x32 image
    with pytest.warns(UserWarning, match="64x64 but its image is 32x32; resizing"):
        _, _, masks, defects = open_dataset(base).test_images()
    np.testing.assert_array_equal(masks, expected_masks(defects, category))
    write_png(hole, np.zeros((32, 48), np.uint8))
    with pytest.raises(ValueError, match="32x48 but its image is 32x32: another aspect ratio"):
        open_dataset(base).test_images()


# ----------------------------------------------------------------------------- image formats

def _pillow_rgb(path):
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.float32).transpose(2, 0, 1) / 255


@pytest.mark.parametrize("name, mode", [("cmyk.jpg", "CMYK"), ("palette.bmp", "P"), ("palette.tif", "P"),
                                        ("bits.bmp", "1"), ("bits.tif", "1"), ("ycbcr.jpg", "YCbCr"),
                                        ("palette.gif", "P"), ("grey.jpg", "L")])
def test_pillow_images_convert_as_pillow_converts_them_to_rgb(tmp_path, name, mode):
    """CMYK read as RGB (inverted), palette indices and 1-bit 1/255 taken as intensities: never again."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3)).astype(np.uint8))
    image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    image.save(tmp_path / name)
    ours = load_image(tmp_path / name)[0]
    np.testing.assert_allclose(ours, _pillow_rgb(tmp_path / name), atol=1e-6)
    if mode == "1":
        assert set(np.unique(ours)) <= {0.0, 1.0}


def test_sixteen_bit_and_float_tiffs_keep_their_intensities(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    values = np.random.default_rng(6).random((12, 10)).astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(load_image(tmp_path / "f.tif")[0][0], values, atol=1e-7)  # was divided by 255
    Image.fromarray(values * 3, mode="F").save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match="big.tif: a floating-point image with values from .* in \\[0, 1\\] only"):
        load_image(tmp_path / "big.tif")
    sixteen = (values * 65535).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.tif")
    assert read_image(tmp_path / "s.tif").dtype == np.uint16
    np.testing.assert_allclose(load_image(tmp_path / "s.tif")[0][0], sixteen / 65535, atol=1e-7)


def test_a_huge_grey_png_is_shrunk_before_it_becomes_rgb_floats(tmp_path):
    """Was: the grey image repeated to RGB floats first (3 GiB for 16384 x 16384)."""
    side = 4096
    grey = np.tile(np.arange(side, dtype=np.uint8)[None, :], (side, 1))
    (tmp_path / "big.png").write_bytes(encode_png(grey, compression=1))
    tracemalloc.start()
    try:
        image, original = load_image(tmp_path / "big.png", (64, 64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert original == (side, side) and image.shape == (3, 64, 64)
    whole = load_images([tmp_path / "big.png"], None)[0]
    np.testing.assert_allclose(image, npanomaly.data.resize(whole[None], (64, 64))[0], rtol=1e-6)
    # the grey pixels and their zlib output (one byte a pixel each) and the float strips; the old
    # path held 4 + 12 + 12 bytes a pixel (float grey, repeated to RGB, transposed)
    assert peak < 2 * side * side + 2 * npanomaly.data.STRIP_BYTES


# ----------------------------------------------------------------------------- the API

def test_images_outside_zero_one_are_refused_by_every_detector():
    normal = textures(4, size=(16, 16))
    eight_bit = np.round(normal * 255)  # the common mistake: pixels not divided by 255
    eight_bit[0, 0, 0, :2] = 0, 255
    for model in (PatchCore(feature_dim=8), StudentTeacher(feature_dim=8)):
        with pytest.raises(ValueError, match="must hold values in \\[0, 1\\].*from 0 to 255"):
            model.fit(eight_bit)
    pc = PatchCore(feature_dim=8).fit(normal)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        pc.predict(normal * 255)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        pc.calibrate_threshold(normal - 0.5)


def test_numpy_scalars_are_numbers_and_absurd_sizes_are_refused():
    normal = textures(4, size=(16, 16))
    pc = PatchCore(feature_dim=8).fit(normal, coreset_ratio=np.float32(0.5))
    pc.calibrate_threshold(normal, quantile=np.float64(0.9))
    with pytest.raises(ValueError, match="target_dim must be <= 136"):
        PatchCore(feature_dim=8, target_dim=10 ** 6)
    with pytest.raises(ValueError, match="feature_dim must be <= 8192"):
        StudentTeacher(feature_dim=2 ** 31)
