"""Preprocessing shared by training and inference; pixel-size and dose augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.errors import CheckpointError
from napari_hrtem_transfer.models.normalization import (
    NORMALIZATION,
    PreprocessConfig,
    apply_normalization,
)
from napari_hrtem_transfer.training import TrainConfig
from napari_hrtem_transfer.training.augment import resample_weights, rescale_frame
from napari_hrtem_transfer.training.checkpoint import validate_sidecar
from napari_hrtem_transfer.training.data import TrainingData, renoise

from .conftest import make_dataset

FLAT = PreprocessConfig(flat_field_sigma_A=4.0)  # 20 px at the fixture's 0.2 Å/px


def _illuminated(size=64, seed=0):
    """The disc fixture under a strong illumination gradient."""
    ds = make_dataset(n_images=12, size=size, seed=seed)
    ramp = 1.0 + 0.8 * np.linspace(0, 1, size)[None, :]
    ds.images = np.round(ds.images * ramp).astype(np.uint16)
    return ds


def test_training_and_inference_preprocess_identically(small_config, tmp_path):
    from napari_hrtem_transfer.training import load_checkpoint, train

    ds = _illuminated()
    cfg = small_config.model_copy(update={"preprocessing": FLAT, "epochs": 1})
    train(cfg, ds, tmp_path / "m")
    side = json.loads((tmp_path / "m" / "best.json").read_text())
    assert side["normalization"] == {
        "method": "flat_field_standardize",
        "eps": 1e-6,
        "flat_field_sigma_A": 4.0,
        "sampling_A": 0.2,
    }
    lm = load_checkpoint(tmp_path / "m", device="cpu")
    td = TrainingData.prepare(cfg, ds, normalization=side["normalization"])
    td_default = TrainingData.prepare(cfg, ds)  # the record of cfg.preprocessing
    d, i = (int(v) for v in td.train_items[0])
    raw = np.asarray(ds.images[d, i])
    np.testing.assert_array_equal(td.image(d, i), lm.standardize(raw)[0])
    np.testing.assert_array_equal(td_default.image(d, i), td.image(d, i))
    # and the step changed something: not plain standardisation
    assert np.abs(td.image(d, i) - apply_normalization(raw, NORMALIZATION)).max() > 0.1


def test_sidecar_schema_reads_old_and_new_records():
    base = {
        "format": "napari-hrtem-transfer checkpoint",
        "format_version": "1",
        "which": "best",
        "weights_file": "best-0123456789ab.safetensors",
        "weights_sha256": "0" * 64,
        "model": {"architecture": "compact"},
    }
    old = validate_sidecar({**base, "normalization": dict(NORMALIZATION)}, "x.json", "best")
    assert old.normalization.method == "per_image_standardize"
    new = validate_sidecar(
        {**base, "normalization": FLAT.record(0.2)}, "x.json", "best"
    ).normalization
    assert (new.flat_field_sigma_A, new.sampling_A) == (4.0, 0.2)
    with pytest.raises(CheckpointError, match="flat_field_sigma_A"):
        validate_sidecar(
            {**base, "normalization": {"method": "flat_field_standardize"}}, "x.json", "best"
        )


def _disc(n=128, r=20.0, c=(64.0, 64.0)):
    yy, xx = np.mgrid[:n, :n]
    return ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r).astype(np.float32)


@pytest.mark.parametrize("factor", [0.6, 0.8, 1.3, 1.7])
def test_rescale_frame_scales_a_disc_and_keeps_image_and_mask_aligned(factor):
    mask = _disc()
    image = 5.0 * mask + 1.0
    crop = (128, 128)
    h = 128 / factor  # source region, centred on the frame
    origin = ((128 - h) / 2, (128 - h) / 2)
    img, msk = rescale_frame(image, mask, factor, crop, origin)
    assert img.shape == msk.shape == crop
    assert set(np.unique(msk).tolist()) <= {0.0, 1.0}
    ratio = msk.sum() / mask.sum()
    assert ratio == pytest.approx(factor**2, rel=0.05)
    yy, xx = np.mgrid[: crop[0], : crop[1]]
    w = img - img.min()
    cm_img = (np.sum(w * yy) / w.sum(), np.sum(w * xx) / w.sum())
    cm_msk = (np.sum(msk * yy) / msk.sum(), np.sum(msk * xx) / msk.sum())
    assert np.allclose(cm_img, cm_msk, atol=0.3)
    # the disc's centre (64, 64) is 0.5 px from the frame centre 63.5: magnified about it
    expect = 63.5 + 0.5 * factor
    assert np.allclose(cm_img, (expect, expect), atol=0.1)


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.0, 1.25, 1.6])
def test_resample_weights_rows_are_means_of_the_source(factor):
    w = resample_weights(50, 40, factor, -3.3)
    assert w.shape == (40, 50) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    ramp = np.arange(50.0) + 10
    inner = slice(8, 20)  # away from the mirrored border: a ramp is resampled exactly
    centres = -3.3 + (np.arange(40) + 0.5) / factor - 0.5
    # area means of a pixelated ramp are exact when an output pixel spans whole source pixels
    tol = 1e-9 if factor >= 1 or (1 / factor).is_integer() else 0.1
    np.testing.assert_allclose((w @ ramp)[inner], (centres + 10)[inner], atol=tol)


@pytest.mark.parametrize("factor", [0.7, 1.1, 1.25, 1.6])
def test_rescaled_counts_have_the_poisson_noise_of_the_new_pixel_size(factor):
    """A frame of 100 counts/px at the same dose per area but pixels ``factor`` times smaller
    holds 100 / factor**2 counts/px with Poisson noise, white (neighbours uncorrelated).
    Interpolating the noisy frame alone gives smoothed noise of too little variance (the
    bug that halved the Dice of pixel-size augmentation in the recipe ablation)."""
    rng = np.random.default_rng(1)
    raw = rng.poisson(100.0, (256, 256)).astype(np.uint16)
    mask = np.zeros(raw.shape)
    img, _ = rescale_frame(raw, mask, factor, (200, 200), rng=np.random.default_rng(2))
    mean = 100.0 / factor**2
    assert img.mean() == pytest.approx(mean, rel=0.01)
    assert img.var() == pytest.approx(mean, rel=0.06)
    x = img - img.mean()
    lag1 = (x[:, 1:] * x[:, :-1]).mean() / x.var()
    assert abs(lag1) < 0.35
    plain, _ = rescale_frame(raw, mask, factor, (200, 200))  # no noise model
    if factor != 1.0:
        assert plain.var() / factor**4 < 0.8 * mean


def test_pixel_size_augmentation_is_seeded_and_varies_the_scale():
    ds = make_dataset(n_images=12, size=64)
    cfg = TrainConfig(patch_size=32, pixel_size_augment=1.5, samples_per_epoch=40)
    td = TrainingData.prepare(cfg, ds)
    plan, again = td.epoch_plan(0), TrainingData.prepare(cfg, ds).epoch_plan(0)
    assert plan.shape == (40, 7) and np.array_equal(plan, again)
    f = plan[:, 4] / 1e6
    assert f.min() >= 1 / 1.5 and f.max() <= 1.5 and f.std() > 0.1
    plain = TrainingData.prepare(cfg.model_copy(update={"pixel_size_augment": 1.0}), ds)
    assert np.array_equal(plain.epoch_plan(0)[:, :2], plan[:, :2])  # order and D4 unchanged
    assert plain.epoch_plan(0).shape == (40, 4)
    for rows in td.batches(0):
        x, y = td.load_batch(rows)
        x2, y2 = td.load_batch(rows)
        assert x.shape == (len(rows), 1, 32, 32)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # image and mask stay aligned: the discs are bright at -5 and 0 nm, dark at +5 nm
    from scipy import ndimage

    lags = []
    for row in plan.tolist():
        img, msk = td.sample(row)
        d = int(td.train_items[row[0]][0])
        if 0 < msk.mean() < 1:
            contrast = img[msk > 0].mean() - img[msk == 0].mean()
            assert contrast * (1 if d < 2 else -1) > 0.5, (row, contrast)
        # the noise is white like a recorded frame's (interpolated noise is smooth)
        bg = ~ndimage.binary_dilation(msk > 0, iterations=2)
        pair = bg[:, 1:] & bg[:, :-1]
        x = img - img[bg].mean()
        if abs(row[4] / 1e6 - 1) > 0.05 and pair.sum() > 100:
            lags.append((x[:, 1:] * x[:, :-1])[pair].mean() / (x[bg] ** 2).mean())
    assert len(lags) > 10 and np.mean(lags) < 0.2, np.round(lags, 2)


def test_coarser_detail_removes_what_a_coarser_frame_cannot_hold_and_keeps_the_rest():
    """A frame recorded at g times the pixel size and upsampled holds no detail above 1/g of
    the Nyquist frequency: the augmentation removes that band and keeps the large scales."""
    from napari_hrtem_transfer.training.data import coarser_detail

    rng = np.random.default_rng(0)
    n = 128
    yy, xx = np.mgrid[:n, :n]
    big = 10.0 * np.exp(-((yy - 64.0) ** 2 + (xx - 64.0) ** 2) / (2 * 15.0**2))
    img = (big + rng.normal(0, 1, (n, n))).astype(np.float32)
    out = coarser_detail(img, 3.0)
    assert out.shape == img.shape and out.dtype == np.float32

    def band_power(x, lo, hi):
        f = np.abs(np.fft.fftshift(np.fft.fft2(x - x.mean()))) ** 2
        q = np.hypot(*np.meshgrid(*(np.fft.fftshift(np.fft.fftfreq(n)) * 2,) * 2))  # Nyquist 1
        return f[(q >= lo) & (q < hi)].mean()

    assert band_power(out, 0.5, 1.0) < 0.02 * band_power(img, 0.5, 1.0)
    assert band_power(out, 0.0, 0.05) > 0.8 * band_power(img, 0.0, 0.05)
    assert abs(out.mean() - img.mean()) < 0.01 * abs(img.mean()) + 1e-3


def test_resolution_augmentation_coarsens_half_the_crops_and_leaves_the_masks():
    """Half the samples come from the raw frame coarsened and then preprocessed (segment's
    order, so a coarsened sample is standardised like any other); masks are unchanged."""
    from napari_hrtem_transfer.training.data import coarser_detail, d4_transform

    ds = make_dataset(n_images=12, size=64)
    cfg = TrainConfig(patch_size=64, resolution_augment=3.0, samples_per_epoch=200)
    td = TrainingData.prepare(cfg, ds)
    plan = td.epoch_plan(0)
    again = TrainingData.prepare(cfg, ds).epoch_plan(0)
    assert plan.shape == (200, 8) and np.array_equal(plan, again)
    g = plan[:, 7] / 1e6
    assert g.min() >= 1.0 and g.max() <= 3.0 and 0.35 < np.mean(g > 1) < 0.65
    plain = TrainingData.prepare(cfg.model_copy(update={"resolution_augment": 1.0}), ds)
    assert np.array_equal(plain.epoch_plan(0), plan[:, :4])  # the other columns unchanged
    for row in plan[:20].tolist():
        img, msk = td.sample(row)
        base_img, base_msk = plain.sample(row[:4])
        np.testing.assert_array_equal(msk, base_msk)
        assert abs(float(img.std()) - 1.0) < 0.05  # whole frames: standardised as in segment
        if row[7] > 1_000_000:
            d, i = (int(v) for v in td.train_items[row[0]])
            raw = td.raw_image(d, i)
            expect = d4_transform(td.normalize(coarser_detail(raw, row[7] / 1e6)), row[1])
            np.testing.assert_allclose(img, expect, rtol=1e-5, atol=1e-6)
            assert not np.allclose(img, base_img)
        else:
            np.testing.assert_array_equal(img, base_img)
    # with dose augmentation too: columns 0-6 are those of the dose-only plan
    both = cfg.model_copy(update={"dose_augment_e_per_A2": (50.0, 400.0)})
    dose_only = both.model_copy(update={"resolution_augment": 1.0})
    p_both = TrainingData.prepare(both, ds).epoch_plan(0)
    assert np.array_equal(p_both[:, :7], TrainingData.prepare(dose_only, ds).epoch_plan(0))
    img, _ = TrainingData.prepare(both, ds).sample(p_both[int(np.argmax(p_both[:, 7]))].tolist())
    assert img.shape == (64, 64) and abs(float(img.std()) - 1.0) < 0.05


def test_dose_thinning_is_poisson_at_the_lower_dose():
    rng = np.random.default_rng(0)
    lam = 40.0
    counts = rng.poisson(lam, (400, 400)).astype(np.uint16)
    low = renoise(counts, 400.0, 100.0, 0.2, np.random.default_rng(1))
    assert low.mean() == pytest.approx(lam / 4, rel=0.01)
    assert low.var() == pytest.approx(lam / 4, rel=0.03)  # Poisson: variance = mean
    assert renoise(counts, 400.0, 800.0, 0.2, rng) is counts  # no dose can be added
    clean = np.full((400, 400), 0.5, np.float32)
    noisy = renoise(clean, None, 250.0, 0.2, np.random.default_rng(2))
    assert noisy.mean() == pytest.approx(0.5 * 250 * 0.04, rel=0.02)


def test_dose_augmentation_in_batches_is_seeded():
    ds = make_dataset(n_images=12, size=64)
    cfg = TrainConfig(patch_size=32, dose_augment_e_per_A2=(50.0, 1000.0), augment=False)
    td = TrainingData.prepare(cfg, ds)
    plan = td.epoch_plan(0)
    assert plan.shape[1] == 7 and (plan[:, 5] > 0).all()
    rows = plan[:4]
    x1, _ = td.load_batch(rows)
    x2, _ = td.load_batch(rows)
    np.testing.assert_array_equal(x1, x2)
    plain = TrainingData.prepare(cfg.model_copy(update={"dose_augment_e_per_A2": None}), ds)
    xp, _ = plain.load_batch(plain.epoch_plan(0)[:4])
    assert not np.array_equal(x1, xp)  # re-noised at a dose below the dataset's 5000
    with pytest.raises(ValueError, match="0 < low <= high"):
        TrainConfig(dose_augment_e_per_A2=(100.0, 50.0))
