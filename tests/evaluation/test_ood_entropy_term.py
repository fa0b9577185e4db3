"""The frame's mean predictive entropy in the "uncertainty" score (``log_entropy_weight``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation.ood import (
    Z_FLOOR,
    OODReference,
    fit_reference_from_features,
)


def _fit(weight: float, entropy: np.ndarray, rng) -> OODReference:
    n = entropy.size
    return fit_reference_from_features(
        rng.normal(size=(n, 6)),
        entropy,
        boundary_entropy=rng.uniform(0.5, 0.7, n),
        band_width_px=rng.uniform(2, 6, n),
        log_entropy_weight=weight,
    )


def test_the_fit_stores_the_median_and_robust_spread_of_ln_entropy():
    rng = np.random.default_rng(0)
    h = np.exp(rng.normal(-2.6, 0.25, 200))
    ref = _fit(1.0, h, rng)
    med = np.median(np.log(h))
    assert ref.log_entropy_ref == pytest.approx(med)
    assert ref.log_entropy_spread == pytest.approx(1.4826 * np.median(np.abs(np.log(h) - med)))
    assert ref.log_entropy_weight == 1.0
    off = _fit(0.0, h, np.random.default_rng(0))
    assert off.log_entropy_weight == 0.0


def test_the_term_adds_its_clipped_z_and_names_itself():
    rng = np.random.default_rng(1)
    ref = _fit(1.0, np.exp(rng.normal(-2.6, 0.25, 100)), rng)
    f = rng.normal(size=(3, 6))
    b, w = np.full(3, 0.6), np.full(3, 4.0)
    h = np.exp(ref.log_entropy_ref + ref.log_entropy_spread * np.array([-10.0, 0.0, 4.0]))
    with_term = ref.network_terms(f, h, b, w)
    ref.log_entropy_weight = 0.0
    without = ref.network_terms(f, h, b, w)
    assert "mean_entropy_z" not in without
    np.testing.assert_allclose(with_term["mean_entropy_z"], [-Z_FLOOR, 0.0, 4.0], atol=1e-9)
    np.testing.assert_allclose(
        with_term["network"] - without["network"], [-Z_FLOOR, 0.0, 4.0], atol=1e-9
    )
    ref.log_entropy_weight = 1.0
    with pytest.raises(Exception, match="mean predictive entropy"):
        ref.network_terms(f, None, b, w)
    from napari_hrtem_transfer.evaluation.ood.verdict import _score_reasons

    reasons = _score_reasons({"mean_entropy_z": 4.0, "band_width_z": 2.5}, 9.0, 7.0)
    assert "unsure of the whole frame" in reasons[0] and "+4.0 training spreads" in reasons[0]


def test_a_reference_written_before_the_term_scores_as_it_did(tmp_path):
    """Files without the three fields load with weight 0: the same score as before."""
    rng = np.random.default_rng(2)
    ref = _fit(1.0, np.exp(rng.normal(-2.6, 0.25, 50)), rng)
    ref.caution_level = 4.0
    ref.save(tmp_path)
    meta = json.loads((tmp_path / "ood_reference.json").read_text())
    assert meta["log_entropy_weight"] == 1.0
    back = OODReference.load(tmp_path)
    assert (back.log_entropy_ref, back.log_entropy_weight) == (ref.log_entropy_ref, 1.0)
    for k in ("log_entropy_ref", "log_entropy_spread", "log_entropy_weight"):
        del meta[k]
    (tmp_path / "ood_reference.json").write_text(json.dumps(meta))
    old = OODReference.load(tmp_path)
    assert old.log_entropy_weight == 0.0
    f = rng.normal(size=(2, 6))
    t = old.network_terms(f, np.array([0.5, 0.01]), np.full(2, 0.6), np.full(2, 4.0))
    np.testing.assert_allclose(
        t["network"],
        t["boundary_entropy_z"]
        + t["band_width_z"]
        + old.feature_weight * np.maximum(t["feature_distance"], 0),
    )
