"""Student-Teacher: the seed nets, hand-written training checked by finite differences and torch,
detection, heatmaps, thresholds, persistence and errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from npanomaly import StudentTeacher, load, nn, optim
from strategies import random_array
from test_gradcheck import numeric_gradient
from textures import auroc, textures, with_defects


@pytest.fixture(scope="module")
def trained():
    st = StudentTeacher(feature_dim=32, seed=0)
    st.fit(textures(16, seed=0), epochs=6, batch_size=4, lr=3e-3, validation=textures(6, seed=7), verbose=False)
    return st


def test_seed_nets():
    st = StudentTeacher.default_rgb()
    assert st.feature_dim == 128 and st.in_channels == 3
    for net, hidden in ((st.teacher, 64), (st.student, 32)):
        assert [type(layer) for layer in net.layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        convs = net.layers[0::3]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias is not None)
                for c in convs] == [(3, hidden, (3, 3), 2, 1, True), (hidden, 128, (3, 3), 2, 1, True)]
    assert not st.teacher.training and not any(p.requires_grad for p in st.teacher.parameters())
    assert st.student_parameters() == st.student.parameters()
    assert st.train().student.training and not st.teacher.training
    assert not st.eval().student.training


def test_training_loss_is_the_seeds_mean_squared_difference():
    st = StudentTeacher(feature_dim=8).eval()
    x = textures(3, size=(16, 16))
    t, s = st.teacher(x), st.student(x)
    assert st.training_loss(x) == pytest.approx(float(np.mean((t.astype(np.float64) - s) ** 2)), rel=1e-6)
    st.set_threshold(0.0)
    scores = st.score_samples(x)
    np.testing.assert_allclose(scores, np.sqrt(np.mean((t.astype(np.float64) - s) ** 2, axis=(1, 2, 3))),
                               rtol=1e-6)


@pytest.mark.parametrize("multiscale", [False, True])
def test_loss_gradient_of_every_student_parameter_by_finite_differences(multiscale):
    st = StudentTeacher(in_channels=2, feature_dim=3, seed=1, multiscale=multiscale)
    st.teacher.to(np.float64)
    st.student.to(np.float64).train()
    x = random_array(2, (3, 2, 8, 6))
    teacher_maps = st._features(st._teacher, x)

    def loss():
        return st._loss_and_grads(teacher_maps, st._features(st._students[0], x))[0]

    st.student.zero_grad()
    _, grads = st._loss_and_grads(teacher_maps, st._features(st._students[0], x))
    st.student.backward_intermediate(grads, input_grad=False)
    for name, param in st.student.named_parameters():
        np.testing.assert_allclose(param.grad, numeric_gradient(loss, param.data), rtol=1e-5, atol=1e-9,
                                   err_msg=name)


@pytest.mark.parametrize("multiscale", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_training_steps_follow_torch(kind, multiscale):
    torch = pytest.importorskip("torch")
    from test_torch_oracle import to_torch

    st = StudentTeacher(feature_dim=16, seed=2, multiscale=multiscale)
    teacher, student = to_torch(st.teacher).eval(), to_torch(st.student).train()
    if kind == "sgd":
        ours, theirs = (optim.SGD(st.student_parameters(), lr=0.05, momentum=0.9),
                        torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9))
    else:
        ours, theirs = optim.Adam(st.student_parameters(), lr=1e-3), torch.optim.Adam(student.parameters(), lr=1e-3)
    st.train()
    for step in range(4):
        x = textures(4, size=(24, 20), seed=10 + step)
        loss = st.train_step(x, ours)
        theirs.zero_grad()
        xt = torch.from_numpy(x)
        if multiscale:
            tloss = 0.0
            ht, hs = xt, xt
            for first, last in ((0, 3), (3, 6)):
                ht, hs = teacher[first:last](ht), student[first:last](hs)
                diff = torch.nn.functional.normalize(hs, dim=1) - torch.nn.functional.normalize(ht.detach(), dim=1)
                tloss = tloss + 0.5 * (diff ** 2).sum() / (hs.shape[0] * hs.shape[2] * hs.shape[3])
        else:
            tloss = torch.mean((student(xt) - teacher(xt).detach()) ** 2)
        tloss.backward()
        theirs.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-4)
    for (name, param), tparam in zip(st.student.named_parameters(), student.parameters()):
        expected = tparam.detach().numpy()
        if kind == "adam" and name in ("0.bias", "3.bias"):
            # A conv bias right before batch norm has an exactly zero gradient; both libraries see
            # only rounding noise, which Adam normalises into steps of about lr in random directions.
            assert np.all(np.abs(param.grad) < 1e-5)
            continue
        np.testing.assert_allclose(param.data, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)


def test_loss_falls_and_defects_score_higher(trained):
    assert trained.loss_history_[-1] < 0.7 * trained.loss_history_[0]
    assert len(trained.val_loss_history_) == 6
    good = textures(8, seed=100)
    bad, masks = with_defects(textures(8, seed=200))
    assert auroc(trained.score_samples(good), trained.score_samples(bad)) >= 0.95
    maps = trained.anomaly_map(bad)
    assert maps.shape == (8, 48, 48)
    assert np.mean([m[k].mean() > m[~k].mean() for m, k in zip(maps, masks)]) >= 0.75
    results = trained.predict(bad)
    assert all(r.heatmap.shape == (48, 48) for r in results)
    assert sum(r.is_anomalous for r in results) >= 6


def test_multiscale_detects_too():
    st = StudentTeacher(feature_dim=32, seed=0, multiscale=True)
    assert st.student.layers[0].out_channels == 64  # STFPM: the student has the teacher's shape
    st.fit(textures(16, seed=0), epochs=6, batch_size=4, lr=3e-3, verbose=False)
    good = textures(8, seed=100)
    bad, _ = with_defects(textures(8, seed=200))
    assert auroc(st.score_samples(good), st.score_samples(bad)) >= 0.9


def test_fit_is_deterministic_and_reports_progress(capsys):
    a = StudentTeacher(feature_dim=8).fit(textures(6, size=(16, 16)), epochs=2, batch_size=3, seed=5)
    err = capsys.readouterr().err
    assert err.count("epoch") == 2 and "images/s" in err and "loss" in err
    b = StudentTeacher(feature_dim=8).fit(textures(6, size=(16, 16)), epochs=2, batch_size=3, seed=5, verbose=False)
    assert capsys.readouterr().err == ""
    assert a.loss_history_ == b.loss_history_
    for p, q in zip(a.student_parameters(), b.student_parameters()):
        np.testing.assert_array_equal(p.data, q.data)


def test_calibrated_threshold():
    st = StudentTeacher(feature_dim=8).fit(textures(8, size=(16, 16)), epochs=1, verbose=False)
    held_out = textures(20, size=(16, 16), seed=3)
    st.calibrate_threshold(held_out, quantile=0.9)
    assert np.mean(st.score_samples(held_out) > st.threshold) == pytest.approx(0.1, abs=0.051)


def test_save_load_predicts_identically_and_continues_training(trained, tmp_path):
    path = tmp_path / "st.npz"
    trained.save(path)
    loaded = load(path)
    assert isinstance(loaded, StudentTeacher)
    images = with_defects(textures(5, seed=9))[0]
    np.testing.assert_array_equal(loaded.anomaly_map(images), trained.anomaly_map(images))
    assert loaded.threshold == trained.threshold and loaded.loss_history_ == trained.loss_history_
    more = textures(6, seed=11)
    for model in (trained, loaded):
        model.fit(more, epochs=1, batch_size=3, lr=1e-3, warm_start=True, verbose=False)
    for p, q in zip(trained.student_parameters(), loaded.student_parameters()):
        np.testing.assert_array_equal(p.data, q.data)
    with pytest.raises(ValueError, match="holds a StudentTeacher model, not a PatchCore"):
        from npanomaly import PatchCore
        PatchCore.load(path)


def test_errors(trained):
    x = textures(4, size=(16, 16))
    with pytest.raises(RuntimeError, match="not fitted"):
        StudentTeacher(feature_dim=8).predict(x)
    st = StudentTeacher(feature_dim=8).eval()
    with pytest.raises(RuntimeError, match="training mode"):
        st.train_step(x, optim.SGD(st.student_parameters(), lr=0.1))
    for kwargs, match in ((dict(epochs=0), "epochs must be >= 1"), (dict(epochs=-2), "epochs must be >= 1"),
                          (dict(batch_size=0), "batch_size must be >= 1"), (dict(lr=0.0), "lr must be > 0"),
                          (dict(lr=-1e-3), "lr must be a finite number >= 0"),
                          (dict(optimizer="rmsprop"), "optimizer must be"), (dict(epochs=1.5), "epochs must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            StudentTeacher(feature_dim=8).fit(x, verbose=False, **kwargs)
    with pytest.raises(ValueError, match="3 channels"):
        trained.predict(x[:, :2])
    with pytest.raises(ValueError, match="48x48 images"):
        trained.predict(x)
    nan = textures(2)
    nan[1, 2, 3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        trained.predict(nan)
    with pytest.raises(ValueError, match="empty batch"):
        trained.score_samples(textures(2)[:0])


# ----------------------------------------------------------------------------- Uninformed Students' ensemble

def reference_ensemble_maps(st, calibration, images):
    """The ensemble's anomaly maps written out plainly: per stage, the students' features (each
    L2-normalised over channels when multiscale), their mean mu, e = |mu - t|^2 and
    v = mean_i |s_i - mu|^2; e and v standardised by their mean and (population) std over every
    position of the calibration images; the stages' standardised e + v upsampled and averaged."""
    from npanomaly.maps import upsample_and_blur

    def stage_features(net, x):
        maps = [np.asarray(m, np.float64) for m in net.features(x, st.stages)]
        if st.multiscale:
            maps = [m / np.maximum(np.sqrt(np.sum(m * m, axis=1, keepdims=True)), 1e-12) for m in maps]
        return maps

    def error_and_variance(x):
        teacher = stage_features(st._teacher, x)
        students = [stage_features(s, x) for s in st._students]
        out = []
        for stage, t in enumerate(teacher):
            mu = sum(s[stage] for s in students) / len(students)
            e = np.sum((mu - t) ** 2, axis=1)
            v = sum(np.sum((s[stage] - mu) ** 2, axis=1) for s in students) / len(students)
            out.append((e, v))
        return out

    calibration_values = error_and_variance(calibration)
    result = np.zeros((len(images),) + images.shape[2:])
    for (e, v), (e_cal, v_cal) in zip(error_and_variance(images), calibration_values):
        stage_map = (e - e_cal.mean()) / e_cal.std() + (v - v_cal.mean()) / v_cal.std()
        result += upsample_and_blur(stage_map.astype(np.float32), images.shape[2:], 0.0) / len(st.stages)
    return result


@pytest.mark.parametrize("multiscale", [False, True])
def test_ensemble_scores_are_regression_error_plus_predictive_variance(multiscale):
    train, held_out = textures(12, size=(32, 32), seed=0), textures(5, size=(32, 32), seed=4)
    st = StudentTeacher(feature_dim=16, seed=1, n_students=3, multiscale=multiscale)
    st.fit(train, epochs=2, batch_size=4, lr=3e-3, validation=held_out, verbose=False)
    assert len(st.students) == 3 and st.score_statistics_.shape == (len(st.stages), 4)
    images = with_defects(textures(4, size=(32, 32), seed=9))[0]
    expected = reference_ensemble_maps(st, held_out, images)
    maps = st.anomaly_map(images)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(st.score_samples(images), expected.reshape(4, -1).max(axis=1), rtol=1e-4)


def test_students_of_an_ensemble_train_independently():
    """One optimizer over all students is M independent ones: the first student of an ensemble
    ends exactly where a lone student from the same start does (the same batches, Adam is
    elementwise, the losses are separate)."""
    train = textures(8, size=(24, 24), seed=2)
    alone = StudentTeacher(feature_dim=8, seed=3).fit(train, epochs=2, batch_size=4, seed=1, verbose=False)
    ensemble = StudentTeacher(feature_dim=8, seed=3, n_students=2).fit(train, epochs=2, batch_size=4, seed=1,
                                                                          verbose=False)
    for p, q in zip(alone.student.parameters(), ensemble.students[0].parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-6, atol=1e-7)
    different = [not np.allclose(p.data, q.data) for p, q in zip(ensemble.students[0].parameters(),
                                                               ensemble.students[1].parameters())]
    assert all(different)  # each student from its own random start


def test_ensemble_detects_round_trips_and_rejects_damaged_statistics(tmp_path):
    st = StudentTeacher(feature_dim=32, seed=0, n_students=3)
    st.fit(textures(16, seed=0), epochs=6, batch_size=4, lr=3e-3, validation=textures(6, seed=7), verbose=False)
    good = textures(8, seed=100)
    bad, _ = with_defects(textures(8, seed=200))
    assert auroc(st.score_samples(good), st.score_samples(bad)) >= 0.9
    path = tmp_path / "ensemble.npz"
    st.save(path)
    loaded = load(path)
    assert loaded.n_students == 3
    np.testing.assert_array_equal(loaded.anomaly_map(bad), st.anomaly_map(bad))
    with np.load(path) as saved:
        arrays = dict(saved)
    for damage, match in ((lambda a: a.pop("score_statistics"), "needs 'score_statistics'"),
                          (lambda a: a.__setitem__("score_statistics", a["score_statistics"][:, :2]), "shape"),
                          (lambda a: a["score_statistics"].__setitem__((0, 1), 0.0), "positive standard"),
                          (lambda a: a.pop("student2/0.weight"), r"student2: .*missing keys \[.0.weight.\]")):
        edited = {k: v.copy() for k, v in arrays.items()}
        damage(edited)
        np.savez(tmp_path / "damaged.npz", **edited)
        with pytest.raises(ValueError, match=match):
            load(tmp_path / "damaged.npz")


def test_n_students_is_checked():
    for value, error, match in ((0, ValueError, "n_students must be >= 1"),
                                (1.5, TypeError, "n_students must be an int"),
                                (1000, ValueError, "n_students must be <= 64")):
        with pytest.raises(error, match=match):
            StudentTeacher(feature_dim=8, n_students=value)


def test_fit_takes_what_it_is_not_given_from_the_teachers_recipe():
    from npanomaly.student_teacher import RECIPES

    images = textures(6, size=(32, 32))
    seed_st = StudentTeacher(feature_dim=8)
    assert seed_st.recipe() == RECIPES["seed"] and RECIPES["seed"]["optimizer"] == "adam"
    seed_st.fit(images, epochs=1, verbose=False)
    assert isinstance(seed_st.optimizer_, optim.Adam) and seed_st.optimizer_.lr == RECIPES["seed"]["lr"]
    stfpm = StudentTeacher(backbone="efficientnet_lite0", weights="random", stages=("stride4", "stride8"))
    assert stfpm.recipe() == RECIPES["stfpm"]
    stfpm.fit(images, epochs=1, verbose=False)
    assert isinstance(stfpm.optimizer_, optim.SGD)
    assert (stfpm.optimizer_.lr, stfpm.optimizer_.momentum, stfpm.optimizer_.weight_decay) == (0.4, 0.9, 1e-4)
    stfpm.fit(images, epochs=1, lr=0.1, weight_decay=0.0, warm_start=True, verbose=False)  # given values win
    assert (stfpm.optimizer_.lr, stfpm.optimizer_.weight_decay) == (0.1, 0.0)


# ----------------------------------------------------------------------------- STFPM's map and image score

def reference_top_mean(maps, fraction):
    """The mean of each map's ceil(fraction * pixels) largest values (at least one), by sorting."""
    flat = -np.sort(-np.asarray(maps, np.float64).reshape(len(maps), -1), axis=1)
    count = max(1, int(np.ceil(fraction * flat.shape[1])))
    return flat[:, :count].mean(axis=1)


def reference_stfpm_maps(st, images):
    """STFPM's anomaly map written out plainly (Wang et al. 2021, Sec. 3.3): per stage, the teacher's
    and the student's features L2-normalised over channels, 0.5 x their squared distance at each
    position, upsampled bilinearly to the image size; the stages' maps multiplied."""
    from reference import bilinear_resize
    result = np.ones((len(images),) + images.shape[2:])
    for t, s in zip(st._teacher.features(images, st.stages), st._students[0].features(images, st.stages)):
        t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
        t = t / np.maximum(np.sqrt(np.sum(t * t, axis=1, keepdims=True)), 1e-12)
        s = s / np.maximum(np.sqrt(np.sum(s * s, axis=1, keepdims=True)), 1e-12)
        result *= bilinear_resize(0.5 * np.sum((s - t) ** 2, axis=1)[:, None], *images.shape[2:])[:, 0]
    return result


@given(st_.integers(1, 3), st_.integers(1, 9), st_.integers(1, 9), st_.floats(0.0, 1.0), st_.integers(0, 2 ** 31))
@settings(max_examples=60, deadline=None)
def test_top_mean_is_the_mean_of_the_largest_pixels(n, height, width, fraction, seed):
    from npanomaly.maps import top_mean
    maps = np.random.default_rng(seed).random((n, height, width), dtype=np.float32)
    maps[:, 0, 0] = maps[:, -1, -1]  # ties must not change the mean
    np.testing.assert_allclose(top_mean(maps, fraction), reference_top_mean(maps, fraction), rtol=1e-6)
    np.testing.assert_array_equal(top_mean(maps, 0.0), maps.reshape(n, -1).max(axis=1))


@pytest.mark.parametrize("top_fraction", [None, 0.0, 0.3, 1.0])
def test_stfpm_multiplies_the_stages_maps_and_scores_the_top_of_the_map(top_fraction):
    from npanomaly.student_teacher import DEFAULT_TOP_FRACTION
    st = StudentTeacher(backbone="efficientnet_lite0", weights="random", stages=("stride4", "stride8"),
                        top_fraction=top_fraction)
    st.fit(textures(4, size=(32, 32)), epochs=1, verbose=False)
    images = with_defects(textures(3, size=(32, 32), seed=5))[0]
    expected = reference_stfpm_maps(st, images)
    maps = st.anomaly_map(images)
    np.testing.assert_allclose(maps, expected, rtol=2e-4, atol=2e-4 * expected.max())
    fraction = DEFAULT_TOP_FRACTION if top_fraction is None else top_fraction
    assert st.top_fraction == fraction
    np.testing.assert_allclose(st.score_samples(images), reference_top_mean(expected, fraction), rtol=2e-4)


def test_top_fraction_is_saved_and_a_file_from_before_it_keeps_the_maximum(tmp_path):
    import json
    st = StudentTeacher(backbone="efficientnet_lite0", weights="random", stages=("stride4", "stride8"),
                        top_fraction=0.25)
    st.fit(textures(4, size=(32, 32)), epochs=1, verbose=False)
    images = with_defects(textures(3, size=(32, 32), seed=5))[0]
    st.save(tmp_path / "stfpm.npz")
    loaded = load(tmp_path / "stfpm.npz")
    assert loaded.top_fraction == 0.25
    np.testing.assert_array_equal(loaded.score_samples(images), st.score_samples(images))
    with np.load(tmp_path / "stfpm.npz") as saved:
        arrays = dict(saved)
    config = json.loads(str(arrays["config"]))
    del config["top_fraction"]  # as written by npanomaly before top_fraction existed
    arrays["config"] = np.array(json.dumps(config))
    np.savez(tmp_path / "old.npz", **arrays)
    old = load(tmp_path / "old.npz")
    assert old.top_fraction == 0.0  # its threshold was calibrated on the map's maximum
    np.testing.assert_array_equal(old.score_samples(images), old.anomaly_map(images).reshape(3, -1).max(axis=1))


def test_top_fraction_is_checked():
    for kwargs, error, match in ((dict(top_fraction=0.1), ValueError, "single-stage score is the root-mean-square"),
                                 (dict(multiscale=True, top_fraction=1.5), ValueError, "top_fraction must be <= 1"),
                                 (dict(multiscale=True, top_fraction=-0.1), ValueError, "top_fraction must be a finite number >="),
                                 (dict(multiscale=True, top_fraction="top"), TypeError, "top_fraction must be a")):
        with pytest.raises(error, match=match):
            StudentTeacher(feature_dim=8, **kwargs)
