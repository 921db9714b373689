"""Saved models edited by hand or by an attacker: every value that would make a loaded model silently
wrong (NaN or absurd weights, negative variances, a NaN threshold, a constant network, bad optimizer
state, configs that would allocate without bound) is refused by load() with the reason."""

import json

import numpy as np
import pytest

import npanomaly
from npanomaly import PatchCore, StudentTeacher
from npanomaly.student_teacher import TrainingDiverged
from textures import textures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (path, arrays)} of a small fitted PatchCore and StudentTeacher."""
    folder = tmp_path_factory.mktemp("models")
    normal = textures(6, size=(16, 16), seed=0)
    models = {"patchcore": PatchCore(feature_dim=16).fit(normal),
              "student-teacher": StudentTeacher(feature_dim=8).fit(normal, epochs=1, batch_size=3, verbose=False)}
    out = {}
    for kind, model in models.items():
        path = model.save(folder / f"{kind}.npz")
        with np.load(path, allow_pickle=False) as data:
            out[kind] = (path, {name: data[name] for name in data.files})
    return out


def edited(saved, kind, tmp_path, edit):
    """Write a copy of a saved model with edit(arrays) applied; return its path."""
    arrays = {name: value.copy() for name, value in saved[kind][1].items()}
    edit(arrays)
    path = tmp_path / f"edited-{kind}.npz"
    np.savez(path, **arrays)
    return path


def first_key(arrays, prefix, suffix):
    return next(k for k in arrays if k.startswith(prefix) and k.endswith(suffix))


def set_value(key_prefix, suffix, value, index=0):
    def edit(arrays):
        key = first_key(arrays, key_prefix, suffix)
        arrays[key].reshape(-1)[index] = value
    return edit


def test_the_untouched_files_load(saved):
    for path, _ in saved.values():
        npanomaly.load(path)


@pytest.mark.parametrize("kind, edit, match", [
    ("patchcore", set_value("backbone/", "weight", np.nan), "backbone parameter '.*weight' contains NaN"),
    ("patchcore", set_value("backbone/", "running_var", -1.0), "running_var' is negative"),
    ("patchcore", set_value("backbone/", "running_mean", 1e30), "magnitude 1e\\+30"),
    ("patchcore", set_value("memory_bank", "", 1e30), "'memory_bank' holds a value of magnitude 1e\\+30"),
    ("patchcore", set_value("memory_bank", "", np.inf), "'memory_bank' contains NaN"),
    ("student-teacher", set_value("student/", "bias", np.inf), "student parameter .* contains NaN"),
    ("student-teacher", set_value("teacher/", "running_var", -0.5), "teacher parameter .*running_var' is negative"),
])
def test_non_finite_absurd_or_impossible_parameters_are_refused(saved, tmp_path, kind, edit, match):
    with pytest.raises(ValueError, match=match):
        npanomaly.load(edited(saved, kind, tmp_path, edit))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_threshold_is_refused(saved, tmp_path, value):
    """NaN marked every image normal, -inf every image anomalous."""
    def edit(arrays):
        arrays["threshold"] = np.array(value)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        npanomaly.load(edited(saved, "patchcore", tmp_path, edit))


def test_a_network_that_cannot_tell_images_apart_is_refused(saved, tmp_path):
    """Zeroed convolutions pass every value check, but every image would get the same score."""
    def edit(arrays):
        for key in arrays:
            if key.startswith("backbone/") and key.endswith("weight") and arrays[key].ndim == 4:
                arrays[key][...] = 0.0
    with pytest.raises(ValueError, match="cannot tell images apart"):
        npanomaly.load(edited(saved, "patchcore", tmp_path, edit))


def config_edit(**changes):
    def edit(arrays):
        config = json.loads(str(arrays["config"]))
        config.update(changes)
        arrays["config"] = np.array(json.dumps(config))
    return edit


@pytest.mark.parametrize("changes, match", [
    (dict(feature_dim=2 ** 31), "feature_dim must be <= 8192"),   # was: 429 GiB allocated
    (dict(in_channels=10 ** 6), "in_channels must be <= 8192"),
    (dict(batch_size=10 ** 9), "batch_size must be <= 1024"),
    (dict(target_dim=10 ** 6), "target_dim must be <= 144"),
    (dict(num_neighbors=10 ** 7), "num_neighbors must be <= 1024"),
    (dict(blur_sigma=1e9), "blur_sigma must be <= 256"),
    (dict(colour="blue"), "unexpected keyword argument 'colour'"),
])
def test_config_sizes_are_bounded(saved, tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        npanomaly.load(edited(saved, "patchcore", tmp_path, config_edit(**changes)))


@pytest.mark.parametrize("size, match", [
    ([16], "pair of ints"), ([16, 16, 3], "pair of ints"), ([4, 16], "needs at least 8x8"),
    ([16, 100000], "larger than the 4096"),
])
def test_the_saved_image_size_is_checked(saved, tmp_path, size, match):
    def edit(arrays):
        arrays["image_size"] = np.array(size)
    with pytest.raises(ValueError, match=match):
        npanomaly.load(edited(saved, "patchcore", tmp_path, edit))


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.__setitem__(first_key(a, "optimizer/state/", "exp_avg"), np.zeros((3, 2), np.float32)),
     "has shape \\(3, 2\\)"),
    (set_value("optimizer/state/", "exp_avg", np.nan), "holds NaN"),
    (set_value("optimizer/state/", "exp_avg_sq", -1.0), "negative"),
    (lambda a: a.__setitem__(first_key(a, "optimizer/state/", "step"), np.array(-3)), "whole number >= 1"),
    (lambda a: a.__setitem__("optimizer/state/999.exp_avg", np.zeros(1, np.float32)), "unknown entry"),
    (lambda a: a.pop(first_key(a, "optimizer/state/", "exp_avg_sq")), "expected all of"),
])
def test_optimizer_state_is_checked_on_load(saved, tmp_path, edit, match):
    """A wrong shape used to load and fail at the next step; NaN state silently NaN'd the student."""
    with pytest.raises(ValueError, match=match):
        npanomaly.load(edited(saved, "student-teacher", tmp_path, edit))


def test_a_damaged_format_marker_is_refused(saved, tmp_path):
    def edit(arrays):
        arrays["npanomaly_format"] = np.array("one")
    with pytest.raises(ValueError, match="damaged format marker"):
        npanomaly.load(edited(saved, "patchcore", tmp_path, edit))


# ----------------------------------------------------------------------------- divergence

def test_a_diverging_fit_raises_naming_the_epoch_and_keeps_nothing():
    normal = textures(6, size=(16, 16), seed=0)
    fresh = StudentTeacher(feature_dim=8)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 1/3.*smaller learning rate than lr=1e\+30"):
        fresh.fit(normal, epochs=3, batch_size=3, lr=1e30, verbose=False)
    assert fresh.threshold is None and fresh.loss_history_ == [] and fresh.optimizer_ is None
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.save("never.npz")

    trained = StudentTeacher(feature_dim=8).fit(normal, epochs=2, batch_size=3, verbose=False)
    before = {k: v.copy() for k, v in trained.student.state_dict().items()}
    moments = {k: np.array(v, copy=True) for k, v in trained.optimizer_.state_dict().items()}
    scores = trained.score_samples(normal)
    threshold, history = trained.threshold, list(trained.loss_history_)
    settings = (trained.optimizer_.lr, trained.optimizer_.weight_decay)
    with pytest.raises(TrainingDiverged):
        trained.fit(normal, epochs=2, batch_size=3, lr=1e30, weight_decay=0.5, warm_start=True, verbose=False)
    assert (trained.optimizer_.lr, trained.optimizer_.weight_decay) == settings
    for key, value in trained.student.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    for key, value in trained.optimizer_.state_dict().items():
        np.testing.assert_array_equal(value, moments[key], err_msg=key)
    assert trained.threshold == threshold and trained.loss_history_ == history
    np.testing.assert_array_equal(trained.score_samples(normal), scores)
