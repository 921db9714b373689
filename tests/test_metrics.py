"""Metrics against hand-computed cases, scikit-learn where installed, and their defining properties."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npanomaly.metrics import aupro, auroc, connected_components, f1_max, pixel_auroc, roc_curve


def test_auroc_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of 4 (anomalous, normal) pairs ordered
    assert auroc([1.0, 1.0], [0, 1]) == 0.5  # a tie counts one half
    assert auroc([0.0, 1.0, 2.0], [0, 0, 1]) == 1.0
    assert auroc([2.0, 1.0, 0.0], [0, 0, 1]) == 0.0


@given(data=st.data(), n=st.integers(2, 30))
def test_auroc_equals_pair_counting_with_ties(data, n):
    scores = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), float)
    labels = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if labels.all() or not labels.any():
        with pytest.raises(ValueError, match="both classes"):
            auroc(scores, labels)
        return
    a, b = scores[labels][:, None], scores[~labels][None, :]
    assert auroc(scores, labels) == pytest.approx(np.mean((a > b) + 0.5 * (a == b)), abs=1e-12)


def test_against_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(500), 2)
    labels = rng.random(500) < 0.3
    assert auroc(scores, labels) == pytest.approx(sklearn.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = sklearn.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    precision, recall, _ = sklearn.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        best = np.nanmax(2 * precision * recall / (precision + recall))
    assert f1_max(scores, labels)[0] == pytest.approx(best, abs=1e-12)


def test_f1_max_hand_computed():
    f1, threshold = f1_max([0.1, 0.4, 0.35, 0.8], [0, 1, 1, 1])
    # at 0.35: predicted {0.8, 0.4, 0.35} all anomalous: precision 1, recall 1 -> F1 1
    assert f1 == 1.0 and threshold == 0.35
    f1, threshold = f1_max([0.9, 0.8, 0.7], [1, 0, 1])
    # t=0.9: P1 R.5 F.667; t=0.8: P.5 R.5 F.5; t=0.7: P.667 R1 F.8
    assert f1 == pytest.approx(0.8) and threshold == 0.7


def test_pixel_auroc_flattens_all_images():
    maps = np.array([[[0.0, 1.0]], [[0.5, 0.2]]])
    masks = np.array([[[0, 1]], [[1, 0]]], bool)
    assert pixel_auroc(maps, masks) == auroc([0.0, 1.0, 0.5, 0.2], [0, 1, 1, 0]) == 1.0


def test_connected_components_are_8_connected():
    mask = np.array([[1, 0, 0, 1],
                     [0, 1, 0, 0],
                     [0, 0, 0, 1],
                     [1, 1, 0, 1]], bool)
    labels, count = connected_components(mask)
    # the diagonal pair (touching at a corner), the lone top-right pixel, the right column pair and
    # the bottom-left pair
    assert count == 4
    assert labels[0, 0] == labels[1, 1] and labels[2, 3] == labels[3, 3] and labels[3, 0] == labels[3, 1]
    assert len({labels[0, 0], labels[0, 3], labels[2, 3], labels[3, 0]}) == 4


def test_aupro_hand_computed():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True                 # region A: 1 pixel
    masks[0, 2:4, 2:4] = True             # region B: 4 pixels
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)  # perfect map
    # A constant map: one threshold, FPR 0 -> 1 and PRO 0 -> 1 together; up to 0.3 the curve is
    # the diagonal: area 0.3^2 / 2, normalised by 0.3 -> 0.15.
    assert aupro(np.ones((1, 4, 4)), masks) == pytest.approx(0.15)
    # A map that finds region A only: PRO 1/2 at FPR 0, whatever region B's size.
    only_a = np.zeros((1, 4, 4))
    only_a[0, 0, 0] = 1.0
    # thresholds: 1.0 -> (FPR 0, PRO 0.5); 0 -> (FPR 1, PRO 1); at FPR 0.3: PRO 0.5 + 0.5*0.3 = 0.65
    expected = (0.3 * (0.5 + 0.65) / 2) / 0.3
    assert aupro(only_a, masks) == pytest.approx(expected)


@given(seed=st.integers(0, 2**16), limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_aupro_stays_in_unit_interval(seed, limit):
    rng = np.random.default_rng(seed)
    masks = rng.random((2, 6, 6)) < 0.2
    masks[0, 0, 0], masks[1, 5, 5] = True, False
    value = aupro(rng.random((2, 6, 6)), masks, fpr_limit=limit)
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("call,error,match", [
    (lambda: auroc([1.0, 2.0], [1, 1]), ValueError, "both classes"),
    (lambda: auroc([1.0, np.nan], [0, 1]), ValueError, "NaN"),
    (lambda: auroc([1.0, 2.0, 3.0], [0, 1]), ValueError, "same number of elements"),
    (lambda: auroc([1.0, 2.0], [0, 2]), ValueError, "only 0/1"),
    (lambda: auroc([1.0, 2.0], ["a", "b"]), TypeError, "booleans or 0/1"),
    (lambda: aupro(np.ones((1, 2, 2)), np.ones((1, 2, 3), bool)), ValueError, "same shape"),
    (lambda: aupro(np.ones((1, 2, 2)), np.eye(2, dtype=bool)[None], fpr_limit=0), ValueError, "fpr_limit"),
])
def test_metric_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
