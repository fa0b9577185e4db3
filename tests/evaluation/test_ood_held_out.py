"""The OOD reference fitted and calibrated on held-out series (``fit_ood_on_held_out``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation.ood import (
    OODReference,
    calibrate_caution_level,
    fit_ood_on_held_out,
    fit_ood_reference,
    ood_scores,
)
from napari_hrtem_transfer.evaluation.ood.reference import (
    DEFAULT_LOG_ENTROPY_WEIGHT,
    HELD_OUT_LOG_ENTROPY_WEIGHT,
)

from .conftest import weak_phase_series
from .test_ood import checkpoint  # noqa: F401 - the tiny model's checkpoint folder


def test_the_level_is_calibrated_on_the_held_out_frames_only(checkpoint, series):  # noqa: F811
    """Fit on the first 8 images of one series; the level is the 5 % false-alarm level of
    the other 4 and of a second series at another dose (20 frames at -10 nm, the model's
    training defocus), computed again here from the verdict scores of exactly those frames."""
    fit = weak_phase_series(n_images=12, defocus_nm=(-10.0, 10.0), seed=5)
    calib = weak_phase_series(n_images=16, defocus_nm=(-10.0,), seed=6, dose=120.0)
    res = fit_ood_on_held_out(checkpoint, [fit], [calib], n_fit_images=8)
    assert res.ok and np.isfinite(res.caution_level)
    ref = OODReference.load(checkpoint)
    assert ref.n_images == 8 * 8  # 8 images at the one training defocus x 8 D4 transforms
    assert ref.info["train_defocus_nm"] == [-10.0]
    assert ref.calibration["n_frames"] == 20
    # held-out frames: ln H's statistics are those of new frames, so the entropy term gets
    # the held-out weight; a fit on the model's own training frames keeps the default
    assert ref.log_entropy_weight == HELD_OUT_LOG_ENTROPY_WEIGHT != DEFAULT_LOG_ENTROPY_WEIGHT
    own = fit_ood_reference(checkpoint, np.asarray(fit.images[0][:8]), save=False)
    assert own.log_entropy_weight == DEFAULT_LOG_ENTROPY_WEIGHT
    frames = np.concatenate([np.asarray(fit.images[0][8:]), np.asarray(calib.images[0])])
    v = ood_scores(checkpoint, frames)
    level, _ = calibrate_caution_level(
        v.score, None, np.ones(v.score.size, bool), physics_flag=v.physics_flag
    )
    assert ref.caution == pytest.approx(level, rel=1e-6)
    # a level from the 400 e/Å² frames alone is another one: the low-dose frames count
    only_fit = fit_ood_on_held_out(checkpoint, [fit], n_fit_images=8)
    assert only_fit.caution_level != pytest.approx(res.caution_level, rel=1e-3)
    assert OODReference.load(checkpoint).calibration["n_frames"] == 4


def test_held_out_series_must_hold_the_training_defoci_and_calibration_frames(
    checkpoint,  # noqa: F811
):
    other = weak_phase_series(n_images=4, defocus_nm=(0.0, 10.0), seed=7)
    with pytest.raises(ValueError, match=r"lacks the training defoci \[-10.0\] nm"):
        fit_ood_on_held_out(checkpoint, [other], n_fit_images=2)
    fit = weak_phase_series(n_images=4, defocus_nm=(-10.0,), seed=7)
    with pytest.raises(ValueError, match="no calibration frames"):
        fit_ood_on_held_out(checkpoint, [fit])
    assert not (checkpoint / "ood_reference.json").exists()
