"""The segmentation core: any frame size, axes kept, one resampling policy, OOD per frame."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.segmentation import (
    SegmentationStopped,
    SegmentationWarning,
    segment,
)

from .conftest import disc_frames


def _defocus_stack():
    frames, masks = disc_frames(6, seed=5)
    data = frames.reshape(3, 2, 64, 64)  # (defocus, image, y, x)
    axes = [
        {
            "name": "defocus",
            "size": 3,
            "units": "nm",
            "axis": np.array([-10.0, 0.0, 12.5]),
            "scale": 11.25,
            "offset": -10.0,
            "navigate": True,
        },
        {"name": "image", "size": 2, "units": None, "scale": 1.0, "offset": 0.0, "navigate": True},
        {"name": "y", "size": 64, "units": "nm", "scale": 0.02, "offset": 1.5, "navigate": False},
        {"name": "x", "size": 64, "units": "nm", "scale": 0.02, "offset": -0.7, "navigate": False},
    ]
    return data, axes, masks.reshape(3, 2, 64, 64)


def test_defocus_by_image_stack_keeps_axes_and_scores_every_frame(tiny_model):
    data, axes, masks = _defocus_stack()
    res = segment(data, tiny_model, axes=axes)
    assert res.labels.shape == data.shape and res.labels.dtype == np.uint8
    assert res.proba.shape == data.shape
    assert res.ood_score.shape == (3, 2)
    assert np.isfinite(res.ood_score).all()
    assert res.sampling_A == pytest.approx(0.2)
    # every axis comes back unchanged, including the non-uniform defocus values and offsets
    for got, want in zip(res.axes, axes, strict=True):
        assert got["name"] == want["name"] and got["units"] == want["units"]
        assert got["offset"] == want["offset"] and got["scale"] == want["scale"]
    np.testing.assert_array_equal(res.axes[0]["axis"], [-10.0, 0.0, 12.5])
    table = res.frame_table()
    assert len(table) == 6
    assert [r["defocus_nm"] for r in table] == [-10.0, -10.0, 0.0, 0.0, 12.5, 12.5]
    assert [r["image"] for r in table] == [0.0, 1.0] * 3
    assert all("ood_score" in r and "caution" in r for r in table)
    # the model learnt the discs: the masks are mostly right
    dice = 2 * (res.labels.astype(bool) & masks).sum() / (res.labels.sum() + masks.sum())
    assert dice > 0.6
    assert res.provenance["weights_sha256"]
    assert res.provenance["threshold"] == 0.5


@pytest.mark.parametrize("shape", [(525, 525), (65, 64), (3, 3), (258, 244)])
def test_odd_frame_sizes_segment_and_score(tiny_model, shape):
    rng = np.random.default_rng(0)
    frame = rng.poisson(200.0, shape).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SegmentationWarning)
        res = segment(frame, tiny_model, sampling_A=0.2)
    assert res.labels.shape == shape
    assert res.ood_score.shape == ()
    assert np.isfinite(res.ood_score)


def test_padding_is_invisible_away_from_the_border(tiny_model):
    """A 525 x 525 frame gives what the same frame gives inside a larger one, far from its edge.

    The larger frame is the frame mirrored to the right and below (so both have the same
    mean and standard deviation, hence the same standardisation); pixels more than the model's
    reach from the padded border must agree.
    """
    from napari_hrtem_transfer.segmentation import resolve_model

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:525, :525]
    frame = rng.poisson(200.0 * (1 - 0.4 * (((yy - 200) ** 2 + (xx - 180) ** 2) < 40**2)))
    frame = frame.astype(np.float32)
    big = np.block([[frame, frame[:, ::-1]], [frame[::-1], frame[::-1, ::-1]]])
    opts = dict(precision="fp32", tile_size=2048, ood=False)
    small = segment(frame, tiny_model, sampling_A=0.2, **opts).proba
    large = segment(big, tiny_model, sampling_A=0.2, **opts).proba[:525, :525]
    reach = int(resolve_model(tiny_model).model.receptive_field) // 2 + 16
    keep = 525 - reach
    assert keep > 64
    np.testing.assert_allclose(small[:keep, :keep], large[:keep, :keep], atol=2e-4)
    # and the padded border does differ somewhere (the test can see a difference)
    assert np.abs(small - large).max() > 1e-4


def test_resampling_returns_the_input_grid_and_refuses_absurd_zooms(tiny_model):
    frames, _ = disc_frames(2, size=48, seed=7)
    res = segment(frames, tiny_model, sampling_A=0.4)  # model: 0.2 A/px -> zoom x2
    assert res.labels.shape == frames.shape
    assert res.resampled == pytest.approx(2.0)
    assert any("resampled" in n for n in res.notes)
    with pytest.raises(ConfigError, match="resampl"):
        segment(frames, tiny_model, sampling_A=52.6)  # a 5 nm/px search image
    with pytest.warns(SegmentationWarning, match="resampling is off"):
        out = segment(frames, tiny_model, sampling_A=52.6, resample=False)
    assert out.labels.shape == frames.shape and out.resampled is None


def test_unknown_pixel_size_warns_and_assumes_the_model(tiny_model):
    frames, _ = disc_frames(1, seed=8)
    with pytest.warns(SegmentationWarning, match="pixel size is unknown"):
        res = segment(frames[0], tiny_model)
    assert res.labels.shape == (64, 64) and res.sampling_A is None


def test_stem_images_warn_and_reciprocal_axes_are_refused(tiny_model):
    from napari_hrtem_transfer.io import ExperimentalImage

    frames, _ = disc_frames(1, seed=9)
    im = ExperimentalImage(
        data=frames,
        sampling_A=0.2,
        axes=[],
        metadata={"acquisition_mode": "STEM", "title": "HAADF"},
        name="haadf",
    )
    with pytest.warns(SegmentationWarning, match="STEM"):
        res = segment(im, tiny_model)
    assert any("STEM" in n for n in res.notes)
    axes = [
        {"name": "ky", "size": 64, "units": "1/nm", "scale": 0.1, "offset": 0.0},
        {"name": "kx", "size": 64, "units": "1/nm", "scale": 0.1, "offset": 0.0},
    ]
    with pytest.raises(ConfigError, match="reciprocal"):
        segment(frames[0], tiny_model, axes=axes)


def test_bad_input_is_refused_with_a_clear_message(tiny_model):
    with pytest.raises(ConfigError, match="RGB"):
        segment(np.zeros((64, 64, 3), np.uint8), tiny_model)
    with pytest.raises(ConfigError, match="shape"):
        segment(np.zeros(64), tiny_model)
    with pytest.raises(ConfigError, match="threshold"):
        segment(np.zeros((64, 64)), tiny_model, threshold=1.5)
    with pytest.raises(ConfigError, match="axes"):
        segment(np.zeros((2, 64, 64)), tiny_model, axes=[{"name": "y"}, {"name": "x"}])


def test_stop_raises_and_progress_counts_frames(tiny_model):
    frames, _ = disc_frames(3, seed=10)
    seen = []
    segment(frames, tiny_model, sampling_A=0.2, progress=lambda d, n, m: seen.append((d, n)))
    assert seen[-1] == (3, 3) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # large frames go one at a time: one progress report per frame
    seen.clear()
    segment(
        frames, tiny_model, sampling_A=0.2, tile_size=64, progress=lambda d, n, m: seen.append(d)
    )
    assert seen == [1, 2, 3]
    ev = threading.Event()
    ev.set()
    with pytest.raises(SegmentationStopped):
        segment(frames, tiny_model, sampling_A=0.2, stop=ev)


def test_ood_reference_of_other_weights_is_not_used(tiny_model, tmp_path):
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    meta = json.loads((copy / "ood_reference.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (copy / "ood_reference.json").write_text(json.dumps(meta))
    frames, _ = disc_frames(1, seed=11)
    res = segment(frames, copy, sampling_A=0.2)
    assert res.ood_score is None
    assert any("other weights" in n for n in res.notes)


def test_far_domain_scores_higher_than_training_like_frames(tiny_model):
    frames, _ = disc_frames(4, seed=12, contrast=-0.4)  # like training
    rng = np.random.default_rng(13)
    stripes = (200 + 150 * np.sin(np.arange(64) / 1.3))[None, :] * np.ones((64, 1))
    far = rng.poisson(np.broadcast_to(stripes, (4, 64, 64))).astype(np.float32)
    near = segment(frames, tiny_model, sampling_A=0.2).ood_score
    away = segment(far, tiny_model, sampling_A=0.2).ood_score
    assert np.median(away) > np.median(near)


def test_lazy_stack_is_read_frame_by_frame(tiny_model):
    import dask.array as da

    frames, _ = disc_frames(4, seed=14)
    lazy = da.from_array(frames, chunks=(1, 64, 64))
    a = segment(lazy, tiny_model, sampling_A=0.2, precision="fp32")
    b = segment(frames, tiny_model, sampling_A=0.2, precision="fp32")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.ood_score, b.ood_score)
