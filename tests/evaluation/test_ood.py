"""The label-free OOD pass: streaming capped fit, the end-of-training step, any frame size,
tiling, and the calibrated caution level."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.evaluation._model import ScoringModel
from napari_hrtem_transfer.evaluation.ood import (
    OOD_ARRAYS,
    OOD_JSON,
    OODFitConfig,
    OODReference,
    calibrate_caution_level,
    fit_ood_after_training,
    fit_ood_reference,
    fit_ood_reference_for_checkpoint,
    ood_scores,
    sample_transforms,
)

TINY = {"architecture": "compact", "channels": [8, 16, 24, 32], "bottleneck_dilations": [2]}


@pytest.fixture
def checkpoint(series, trained, tmp_path):
    """The tiny model trained at -10 nm on structures 0..15, as a checkpoint folder."""
    from napari_hrtem_transfer.models.normalization import NORMALIZATION
    from napari_hrtem_transfer.training.checkpoint import save_checkpoint

    ids = [str(s) for s in series.structure_ids]
    save_checkpoint(
        tmp_path / "model",
        "best",
        trained,
        {
            "model": TINY,
            "normalization": dict(NORMALIZATION),
            "sampling_A": float(series.sampling_A),
            "stage": "pretrain",
            "data": {
                "train_defocus_nm": [-10.0],
                "train_structures": ids[:16],
                "val_structures": ids[16:],
                "train_items": [[1, i] for i in range(16)],
                "image_shape": list(series.image_shape),
            },
        },
    )
    return tmp_path / "model"


class _CountForward:
    """Counts the images that go through the network (wraps ScoringModel._forward)."""

    def __init__(self, monkeypatch):
        self.images = 0
        self.calls = 0
        orig = ScoringModel._forward

        def wrapped(sm, x, decode):
            self.images += len(x)
            self.calls += 1
            return orig(sm, x, decode)

        monkeypatch.setattr(ScoringModel, "_forward", wrapped)


def test_fit_work_is_bounded_by_the_cap_not_the_dataset(checkpoint, series, monkeypatch):
    import dataclasses

    # every domain's training structures: 5 domains x 16 images x 8 transforms = 640 samples
    side = json.loads((checkpoint / "best.json").read_text())
    side["data"]["train_items"] = [[d, i] for d in range(5) for i in range(16)]
    side["data"]["train_defocus_nm"] = [float(v) for v in series.defocus_nm]
    (checkpoint / "best.json").write_text(json.dumps(side))
    reads = []

    class Lazy:  # an on-disk array: records every read
        def __init__(self, a):
            self.a, self.shape, self.ndim, self.dtype = a, a.shape, a.ndim, a.dtype

        def __getitem__(self, key):
            reads.append(key)
            return self.a[key]

        def __len__(self):
            return len(self.a)

    ds = dataclasses.replace(series)
    ds.images = Lazy(np.asarray(series.images))
    count = _CountForward(monkeypatch)
    for cap in (24, 48):
        count.images = count.calls = 0
        reads.clear()
        cfg = OODFitConfig(max_samples=cap, batch_size=8, calibration_frames_per_domain=0)
        msg = fit_ood_reference_for_checkpoint(checkpoint, ds, refit=True, config=cfg)
        assert f"on {cap} training image-transforms" in msg
        assert count.images == cap and count.calls == cap // 8
        assert len(reads) == cap  # one image read per sample, never the whole array
        ref = OODReference.load(checkpoint)
        assert ref.n_images == cap
        # the sample spreads over the five training domains
        assert ref.info["n_samples"] == cap


def test_sample_is_spread_over_domains_and_structures():
    groups = np.array([0] * 10 + [1] * 30)
    pairs = sample_transforms(groups, 8, 20, seed=1)
    assert len(pairs) == 20 and len(set(pairs)) == 20
    items = [i for i, _ in pairs]
    assert sum(i < 10 for i in items) == 10  # the domains take turns
    assert len(set(items)) == 20  # every structure once before any twice
    assert all(0 <= c < 8 for _, c in pairs)
    assert sample_transforms(groups, 8, 20, seed=1) == pairs  # seeded
    # fewer possible pairs than the cap: all of them
    assert len(sample_transforms(np.zeros(3, int), 8, 100)) == 24


def test_failed_fit_leaves_a_usable_checkpoint_and_says_how_to_retry(
    checkpoint, series, monkeypatch
):
    from napari_hrtem_transfer.training import load_checkpoint

    before = (checkpoint / "best.json").read_bytes()

    def boom(*_a, **_k):
        raise MemoryError("simulated: cannot allocate 24 GB")

    monkeypatch.setattr(ScoringModel, "frame_stats", boom)
    res = fit_ood_after_training(checkpoint, series)
    assert not res.ok and "MemoryError" in res.error
    assert f"evaluate --model {checkpoint}" in res.message and "--fit-ood" in res.message
    assert "usable" in res.message
    assert not (checkpoint / OOD_ARRAYS).exists() and not (checkpoint / OOD_JSON).exists()
    assert (checkpoint / "best.json").read_bytes() == before
    lm = load_checkpoint(checkpoint, device="cpu")  # still loads and predicts
    assert lm.predict_proba(np.asarray(series.images[1][:1])).shape == (1, 64, 64)


def test_fit_after_training_calibrates_and_stores_the_caution_level(checkpoint, series):
    calls = []
    res = fit_ood_after_training(
        checkpoint, series, progress=lambda d, t, m: calls.append((d, t, m))
    )
    assert res.ok and res.error is None, res.message
    assert res.n_samples == 16 * 8 and res.reference_path == checkpoint / OOD_JSON
    assert calls and calls[-1][0] == calls[-1][1]
    ref = OODReference.load(checkpoint)
    assert ref.caution_level == pytest.approx(res.caution_level)
    assert np.isfinite(ref.caution) and ref.calibration["n_frames"] == 5 * 8
    # the level flags 5 % of the held-out training-domain frames (structures 16..23 at
    # -10 nm), physics flags included: the 95th percentile of their scores when none has a
    # physics reason; the in-focus frames (no contrast, a much higher loss) score higher
    v_train = ood_scores(checkpoint, np.asarray(series.images[1][16:]))
    s_train = v_train.score
    s_focus = ood_scores(checkpoint, np.asarray(series.images[2][16:])).score
    level, _ = calibrate_caution_level(
        s_train, None, np.ones(s_train.size, bool), physics_flag=v_train.physics_flag
    )
    assert ref.caution == pytest.approx(level, rel=1e-6)
    if not v_train.physics_flag.any():
        assert ref.caution == pytest.approx(np.quantile(s_train, 0.95), rel=1e-6)
    assert np.median(s_focus) > np.median(s_train)
    assert ref.calibration["n_bad"] > 0 and 0 <= ref.calibration["recall"] <= 1


@pytest.mark.parametrize("when", ["at once", "during the fit", "while calibrating"])
def test_a_stopped_fit_writes_nothing_and_says_how_to_fit_later(checkpoint, series, when):
    import threading

    before = (checkpoint / "best.json").read_bytes()
    calls = {"n": 0}
    # the fit checks before each of its 16 batches (128 samples / 8), then before each of
    # the 5 domains of the calibration
    limit = {"at once": 0, "during the fit": 3, "while calibrating": 18}[when]

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > limit

    arg = threading.Event() if when == "at once" else stop
    if when == "at once":
        arg.set()
    res = fit_ood_after_training(checkpoint, series, stop=arg)
    assert not res.ok and res.error == "stopped"
    assert "--fit-ood" in res.message and "usable" in res.message
    assert not (checkpoint / OOD_JSON).exists() and not (checkpoint / OOD_ARRAYS).exists()
    assert (checkpoint / "best.json").read_bytes() == before
    if when != "at once":
        assert calls["n"] == limit + 1
    with pytest.raises(ConfigError, match="stop"):
        fit_ood_after_training(checkpoint, series, stop="yes")


def test_caution_level_hand_computed():
    score = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    loss = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0])
    ind = np.array([True, True, True, False, False, False, False])
    level, rec = calibrate_caution_level(score, loss, ind, quantile=0.5)
    assert level == pytest.approx(1.0)  # the median of the in-domain scores 0, 1, 2
    assert rec["loss_threshold"] == pytest.approx(1.0)
    # flagged: scores 2..6 (5 frames); bad: loss > 1 (scores 5, 6)
    assert rec["n_flagged"] == 5 and rec["n_bad"] == 2
    assert rec["recall"] == pytest.approx(1.0) and rec["precision"] == pytest.approx(2 / 5)
    level95, _ = calibrate_caution_level(score, None, ind)
    assert level95 == pytest.approx(np.quantile([0.0, 1.0, 2.0], 0.95))
    with pytest.raises(ConfigError):
        calibrate_caution_level(score, loss, np.zeros(7, bool))


def test_any_frame_size_and_tiling_give_the_whole_frame_statistics(trained):
    import torch

    from napari_hrtem_transfer.models import standardize

    rng = np.random.default_rng(3)
    frame = rng.poisson(50, size=(525, 470)).astype(np.float32)
    sm = ScoringModel(trained)
    whole = sm.frame_stats(frame, want_proba=True, tile_px=1024)
    tiled = sm.frame_stats(frame, want_proba=True, tile_px=256)
    assert sm.n_forward > 2
    np.testing.assert_allclose(tiled.features, whole.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tiled.entropy, whole.entropy, rtol=1e-4)
    np.testing.assert_allclose(tiled.proba, whole.proba, atol=1e-4)
    assert whole.proba.shape == (1, 525, 470)
    # the boundary statistics too (tile edges see their neighbours), and from the proba
    np.testing.assert_allclose(tiled.boundary_entropy, whole.boundary_entropy, rtol=1e-4)
    np.testing.assert_allclose(tiled.band_width_px, whole.band_width_px, rtol=1e-4)
    again = sm.frame_stats(frame, proba=whole.proba, tile_px=256)
    np.testing.assert_allclose(again.boundary_entropy, whole.boundary_entropy, rtol=1e-4)
    np.testing.assert_allclose(again.band_width_px, whole.band_width_px, rtol=1e-4)
    # by hand: reflect-pad to 528 x 480, pool every stage over the unpadded part only
    x = np.pad(standardize(frame), ((0, 3), (0, 10)), mode="reflect")
    with torch.no_grad():
        maps = trained.encoder(torch.from_numpy(x)[None, None])
    expect = []
    for m in maps:
        f = 528 // m.shape[2]
        v = m[0, :, : -(-525 // f), : -(-470 // f)].double().flatten(1)
        expect += [v.mean(1), v.std(1, unbiased=False)]
    np.testing.assert_allclose(whole.features[0], torch.cat(expect).numpy(), rtol=1e-4, atol=1e-5)


def test_proba_from_the_segmentation_is_reused(trained, series, monkeypatch):
    frames = np.asarray(series.images[3][:3])[:, :60, :50]  # not a multiple of the stride
    ref = fit_ood_reference(trained, np.asarray(series.images[1][:8]), save=False)
    full = ood_scores(trained, frames, ref)
    decoded = []
    h = trained.decoder.register_forward_hook(lambda *a: decoded.append(1))
    try:
        again = ood_scores(trained, frames, ref, proba=full.proba)
    finally:
        h.remove()
    assert not decoded  # only the encoder ran
    np.testing.assert_allclose(again.score, full.score, rtol=1e-5, atol=1e-6)
    assert again.proba is None and full.proba.shape == (3, 60, 50)
    with pytest.raises(Exception, match="does not match"):
        ood_scores(trained, frames, ref, proba=full.proba[:, :10])


@pytest.fixture(scope="module")
def contrast_series():
    """The weak-phase series with 10 % amplitude contrast (particles keep a little contrast
    in focus, as heavy-atom particles do), plus a far 60 nm domain."""
    from .conftest import weak_phase_series

    return weak_phase_series(
        amplitude_contrast=0.1, defocus_nm=(-20.0, -10.0, 0.0, 10.0, 20.0, 60.0)
    )


@pytest.mark.slow
@pytest.mark.parametrize("train_nm, far_nm", [(-10.0, 0.0), (0.0, 60.0), (10.0, 0.0)])
def test_far_domain_frames_score_higher_than_held_out_training_frames(
    contrast_series, train_nm, far_nm
):
    """Issue 13: for each of three pretraining domains, frames of a domain far from training
    (in focus for the +-10 nm models, which are confidently wrong there; 60 nm for the
    in-focus model) score higher than the training domain's own held-out frames.  The
    premise is checked too: the model is worse on the far domain."""
    from napari_hrtem_transfer.evaluation.metrics import binary_cross_entropy

    from .conftest import train_tiny

    series = contrast_series
    di, dfar = series.defocus_index(train_nm), series.defocus_index(far_nm)
    model = train_tiny(series, di, np.arange(16), seed=1)
    ref = fit_ood_reference(model, np.asarray(series.images[di][:16]), save=False)
    assert ref.kind == "uncertainty"
    s_own = ood_scores(model, np.asarray(series.images[di][16:]), ref)
    s_far = ood_scores(model, np.asarray(series.images[dfar][16:]), ref)
    own, far = s_own.score, s_far.score
    # the premise: the model is worse on the far domain
    loss = [binary_cross_entropy(s.proba, series.masks[16:], False) for s in (s_own, s_far)]
    assert np.mean(loss[1]) > np.mean(loss[0])
    # the far domain's frames rank above the training domain's held-out frames
    assert np.median(far) > np.quantile(own, 0.75)
    assert np.mean(far[:, None] > own[None, :]) > 0.75  # AUC of far vs own


# ------------------------------------------------------------- boundary statistics
def _disk(size: int = 96, r: float = 20.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - size / 2, xx - size / 2) < r


def _h(p: float) -> float:
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def test_boundary_statistics_hand_computed():
    from napari_hrtem_transfer.evaluation._model import boundary_mask, boundary_statistics

    disk = _disk()
    p = np.where(disk, 0.9, 0.1)
    edge = boundary_mask(disk)
    # both sides of the edge: the disk's outer ring and the background's inner ring
    assert edge[disk].sum() > 0 and edge[~disk].sum() > 0
    assert not edge[0].any() and edge[48, 28] and not edge[48, 48]
    bnd, band = boundary_statistics(p)
    assert bnd[0] == pytest.approx(_h(0.9))  # every pixel has the entropy of 0.9 / 0.1
    assert band[0] == pytest.approx(_h(0.1) * p.size / (edge.sum() + 1))
    # no predicted boundary: NaN boundary entropy, all the entropy in the band
    bnd, band = boundary_statistics(np.full((32, 32), 0.1))
    assert np.isnan(bnd[0]) and band[0] == pytest.approx(_h(0.1) * 32 * 32)


@pytest.mark.parametrize("rows", [7, 512])
def test_band_width_grows_with_the_width_of_the_uncertain_ring(rows, monkeypatch):
    """A confident disk inside an uncertain ring (p = 0.45) of width k: the band width is
    H(0.45) x the ring's area / the boundary pixels (both sides of the edge), and doubles
    with k; the chunked computation (rows at a time) gives the same."""
    from napari_hrtem_transfer.evaluation import _model

    orig = _model._boundary_sums
    monkeypatch.setattr(_model, "_boundary_sums", lambda p, rows_=rows: orig(p, rows_))
    size, r = 160, 30.0
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(yy - size / 2, xx - size / 2)
    widths = {}
    for k in (3, 6):
        p = np.where(d < r, 1 - 1e-7, np.where(d < r + k, 0.45, 1e-7))
        _, band = _model.boundary_statistics(p)
        widths[k] = band[0]
        ring = (d >= r) & (d < r + k)
        n_edge = _model.boundary_mask(d < r).sum()
        assert band[0] == pytest.approx(_h(0.45) * ring.sum() / (n_edge + 1), rel=1e-3)
    assert widths[6] / widths[3] == pytest.approx(2.0, rel=0.1)


def test_uncertainty_reference_hand_computed_and_stored(tmp_path):
    from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features

    f = np.array([[1.0, 11.0], [-1.0, 9.0], [1.0, 9.0], [-1.0, 11.0], [0.0, 10.0]])
    b = np.array([0.60, 0.62, 0.64, 0.66, 0.68])  # median 0.64, MAD 0.02
    w = np.exp([2.0, 3.0, 4.0, np.nan, 5.0])  # ln w: NaN ignored, median 3.5, MAD 1.0
    ref = fit_reference_from_features(f, boundary_entropy=b, band_width_px=w)
    assert ref.kind == "uncertainty" and ref.feature_weight == pytest.approx(2.0)
    assert ref.boundary_ref == pytest.approx(0.64)
    assert ref.boundary_spread == pytest.approx(1.4826 * 0.02)
    assert ref.log_band_ref == pytest.approx(3.5)
    assert ref.log_band_spread == pytest.approx(1.4826)
    feat = np.array([[0.0, 10.0], [3.0, 10.0]])  # at the mean; far in feature 0
    w0 = np.exp(3.5)
    s = ref.score(feat, boundary_entropy=np.array([0.64, np.nan]), band_width_px=[w0, w0])
    # training distances: 4 corners at rms z = 1/sqrt(0.8) (the median), the centre at 0;
    # (3, 10): rms z = 3/sqrt(1.6) -> relative distance 3/sqrt(2) - 1
    rel = 3 / np.sqrt(2) - 1
    assert ref.distance(feat)[1] / ref.distance_ref - 1 == pytest.approx(rel)
    # nothing unusual -> 0 (the distance term counts only above the training median);
    # no predicted boundary adds nothing through the boundary entropy
    assert s[0] == pytest.approx(0.0)
    assert s[1] == pytest.approx(2.0 * rel)
    s = ref.score(feat[:1], boundary_entropy=[0.64 + 3 * 1.4826 * 0.02], band_width_px=[w0])
    assert s[0] == pytest.approx(3.0)
    # a band twice as wide: ln 2 / spread
    s = ref.score(feat[:1], boundary_entropy=[0.64], band_width_px=[2 * w0])
    assert s[0] == pytest.approx(np.log(2) / 1.4826)
    # unusually sharp edges lower the score by at most 3 per term (z clipped at -3), so
    # they cannot cancel a feature shift
    s = ref.score(feat, boundary_entropy=[0.0, 0.0], band_width_px=[w0 / 1e3, w0 / 1e3])
    assert s[0] == pytest.approx(-6.0) and s[1] == pytest.approx(-6.0 + 2.0 * rel)
    with pytest.raises(ConfigError, match="boundary"):
        ref.score(feat)
    # a reference is only written with a finite caution level
    with pytest.raises(ConfigError, match="finite caution level"):
        ref.save(tmp_path)
    assert not (tmp_path / OOD_JSON).exists()
    ref.caution_level = 3.5
    ref.save(tmp_path)
    back = OODReference.load(tmp_path)
    assert back.caution == 3.5
    assert back.kind == "uncertainty"
    keys = ("boundary_ref", "boundary_spread", "log_band_ref", "log_band_spread")
    for k in (*keys, "distance_ref", "feature_weight"):
        assert getattr(back, k) == pytest.approx(getattr(ref, k))
    meta = json.loads((tmp_path / OOD_JSON).read_text())
    assert meta["format_version"] == "4" and meta["entropy_weight"] == 0.0


def test_format_2_references_are_still_read_and_scored_as_before(tmp_path):
    """A reference written by the previous version (no "kind") scores features + entropy."""
    from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features

    f = np.array([[1.0, 11.0], [-1.0, 9.0], [1.0, 9.0], [-1.0, 11.0]])
    ref = fit_reference_from_features(f, entropy=np.full(4, 0.1), entropy_weight=2.0)
    ref.caution_level = 2.0
    ref.save(tmp_path)
    meta = json.loads((tmp_path / OOD_JSON).read_text())
    for k in ("kind", "boundary_ref", "boundary_spread", "log_band_ref", "log_band_spread",
              "imaging_domain", "power_spectrum", "verdict"):
        meta.pop(k)
    meta["format_version"] = "2"
    meta["caution_level"] = None  # format 2 files had no calibrated level
    (tmp_path / OOD_JSON).write_text(json.dumps(meta))
    back = OODReference.load(tmp_path)
    assert back.kind == "features+entropy" and back.format_version == "2"
    assert back.caution == 1.0 and back.ps_mean is None  # the legacy level, old files only
    s = back.score(np.array([[3.0, 10.0]]), entropy=np.array([0.3]))
    assert s[0] == pytest.approx((np.sqrt(4.5) - 1) + 2.0 * (0.3 / 0.1 - 1))
    meta["kind"] = "magic"
    (tmp_path / OOD_JSON).write_text(json.dumps(meta))
    with pytest.raises(Exception, match="fit it again"):
        OODReference.load(tmp_path)


def test_fit_option_overrides_are_validated_and_misspellings_refused():
    """The fit entry points take OODFitConfig fields as keywords: validated like the config
    (a ConfigError naming the field), and a name that is no field is a TypeError."""
    from napari_hrtem_transfer.errors import ConfigError
    from napari_hrtem_transfer.evaluation.ood.sample import OODFitConfig, _config

    assert _config(None, max_samples=7, seed=None).max_samples == 7
    assert _config(OODFitConfig(batch_size=3)).batch_size == 3
    with pytest.raises(ConfigError, match="batch_size"):
        _config(None, batch_size=0)
    with pytest.raises(TypeError, match="max_sample"):
        _config(None, max_sample=7)
