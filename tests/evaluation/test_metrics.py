"""Metric kernels against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.evaluation import metrics as m


def test_dice_and_iou_hand_computed():
    # pred covers 4 pixels, target 2 pixels, overlap 2 pixels
    pred = np.zeros((4, 4), bool)
    pred[0, :4] = True
    target = np.zeros((4, 4), bool)
    target[0, 1:3] = True
    assert m.dice(pred, target) == pytest.approx(2 * 2 / (4 + 2))  # 0.6667
    assert m.iou(pred, target) == pytest.approx(2 / 4)


def test_dice_iou_batch_and_empty_images():
    a = np.zeros((3, 2, 2), bool)
    b = np.zeros((3, 2, 2), bool)
    a[0, 0, 0] = b[0, 0, 0] = True  # perfect
    a[1, 0, 0] = True  # false positive only
    # image 2: both empty -> 'empty' value
    np.testing.assert_allclose(m.dice(a, b), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(m.iou(a, b), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(m.dice(a, b, empty=np.nan)[:2], [1.0, 0.0])
    assert math.isnan(m.dice(a, b, empty=np.nan)[2])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="differ in shape"):
        m.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_bce_from_logits_and_probabilities():
    y = np.array([[1.0, 0.0]])
    z = np.array([[0.0, 2.0]])
    # pixel 1: -log(sigmoid(0)) = log 2; pixel 2: -log(1 - sigmoid(2)) = log(1 + e^2)
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert m.binary_cross_entropy(z, y) == pytest.approx(expected)
    p = 1 / (1 + np.exp(-z))
    assert m.binary_cross_entropy(p, y, from_logits=False) == pytest.approx(expected)
    # batch with channel axis
    out = m.binary_cross_entropy(np.stack([z, z])[:, None], np.stack([y, y]))
    np.testing.assert_allclose(out, [expected, expected])
    # large logits stay finite
    assert np.isfinite(m.binary_cross_entropy(np.array([[1000.0, -1000.0]]), np.array([[0, 1]])))


def test_predictive_entropy():
    assert m.predictive_entropy(np.full((2, 2), 0.5)) == pytest.approx(math.log(2))
    assert m.predictive_entropy(np.array([[0.0, 1.0]])) == pytest.approx(0.0, abs=1e-5)


def test_generalization_is_population_std_over_nonzero_defoci():
    losses = {-10.0: 0.1, -5.0: 0.2, 0.0: 5.0, 5.0: 0.3, 10.0: 0.4}
    # mean 0.25; deviations 0.15, 0.05, 0.05, 0.15 -> var = (2*0.0225 + 2*0.0025)/4 = 0.0125
    assert m.generalization(losses) == pytest.approx(math.sqrt(0.0125))
    # ddof=1 would give sqrt(0.05/3) = 0.1291; population std is 0.1118
    assert m.generalization(losses) == pytest.approx(0.111803, abs=1e-6)
    # sequence form and other exclusions
    d = list(losses)
    v = list(losses.values())
    assert m.generalization(v, d) == pytest.approx(math.sqrt(0.0125))
    assert m.generalization(v, d, exclude_nm=(0.0, 10.0)) == pytest.approx(np.std([0.1, 0.2, 0.3]))
    assert m.generalization(v, d, exclude_nm=()) == pytest.approx(np.std(v))
    with pytest.raises(ConfigError, match="at least two"):
        m.generalization({0.0: 1.0, 5.0: 2.0})


def test_shift_sign_positive_is_worse():
    assert m.shift(after=0.05, before=0.02) == pytest.approx(0.03)
    assert m.shift(after=0.01, before=0.02) == pytest.approx(-0.01)
    np.testing.assert_allclose(m.shift([0.3, 0.1], [0.1, 0.3]), [0.2, -0.2])


def test_bootstrap_ci_brackets_the_mean_and_degenerate_cases():
    rng = np.random.default_rng(1)
    v = rng.normal(1.0, 0.1, size=200)
    lo, hi = m.bootstrap_ci(v, n_boot=2000)
    assert lo < v.mean() < hi
    # standard error 0.1/sqrt(200) = 0.00707 -> 95% half-width ~ 0.0139
    assert (hi - lo) / 2 == pytest.approx(1.96 * v.std() / math.sqrt(200), rel=0.15)
    assert m.bootstrap_ci([2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in m.bootstrap_ci([]))
    assert m.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo2, hi2 = m.bootstrap_ci(v, statistic=np.median, n_boot=200)
    assert lo2 < np.median(v) < hi2
    with pytest.raises(ConfigError):
        m.bootstrap_ci(v, confidence=1.5)
