"""The built-in data sets: the hard textures' construction and their subtle defects."""

import numpy as np
import pytest

from npanomaly import synthetic


def radial_power_slope(field):
    """The log-log slope of the radially averaged power spectrum of field over mid frequencies."""
    power = np.abs(np.fft.fft2(field)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(field.shape[0]), np.fft.fftfreq(field.shape[1]), indexing="ij")
    radius = np.hypot(fy, fx)
    bins = np.geomspace(4 / field.shape[0], 0.25, 12)
    centres, means = [], []
    for low, high in zip(bins[:-1], bins[1:]):
        ring = (radius >= low) & (radius < high)
        centres.append(np.sqrt(low * high))
        means.append(power[ring].mean())
    return np.polyfit(np.log(centres), np.log(means), 1)[0]


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_spectral_noise_has_the_asked_power_law(beta):
    field = synthetic.spectral_noise((256, 256), np.random.default_rng(0), beta)
    assert abs(field.mean()) < 1e-9 and abs(field.std() - 1) < 1e-9
    assert abs(radial_power_slope(field) + beta) < 0.15


@pytest.mark.parametrize("style", synthetic.HARD_STYLES)
def test_hard_categories_are_deterministic_images_with_varied_normals(style):
    a = synthetic.make_category(style, n_train=4, n_test_good=1, n_test_defect=4, size=48, seed=7)
    b = synthetic.make_category(style, n_train=4, n_test_good=1, n_test_defect=4, size=48, seed=7)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.train.dtype == np.float32 and a.train.min() >= 0 and a.train.max() <= 1
    assert a.defects == ["good"] + list(synthetic.HARD_DEFECTS)
    # no two normal images alike: lighting and texture are drawn anew for each
    assert min(np.abs(a.train[i] - a.train[j]).mean() for i in range(4) for j in range(i)) > 0.02


@pytest.mark.parametrize("kind", synthetic.HARD_DEFECTS)
def test_hard_defects_change_only_their_mask_and_stay_subtle(kind):
    rng = np.random.default_rng(3)
    for style in synthetic.HARD_STYLES:
        image = synthetic.hard_texture(style, (64, 64), rng)
        defective, mask = synthetic.add_hard_defect(image, kind, rng)
        changed = np.abs(defective - image).max(axis=0) > 0
        assert mask.any() and changed[mask].mean() > 0.5, (style, kind)
        assert not changed[~mask].any(), (style, kind)
        # subtle: the defect's mean colour stays within 0.25 of what was there (at most 35% of a
        # bright sand pixel on a 1-2 pixel line; the legacy defects paint holes 0.4-0.9 away)
        assert np.abs(defective[:, mask].mean(axis=1) - image[:, mask].mean(axis=1)).max() < 0.25, (style, kind)


def test_unknown_hard_defect_is_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        synthetic.add_hard_defect(np.zeros((3, 32, 32), np.float32), "hole", np.random.default_rng(0))
