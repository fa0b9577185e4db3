"""The OOD verdict (issue 17): components against theory, the calibration with physics
flags, the format-4 reference, and the shipped model's verdict on frames it must flag."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation.ood import (
    OOD_JSON,
    OODReference,
    calibrate_caution_level,
    fit_reference_from_features,
    load_ood_reference,
)
from napari_hrtem_transfer.evaluation.ood import components as comp


def _phase_contrast_frame(size=256, seed=0, dose=16.0):
    """A weak-phase amorphous frame: white phase noise filtered by a CTF-like band pass."""
    rng = np.random.default_rng(seed)
    f = np.fft.fft2(rng.normal(size=(size, size)))
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    img = 1 + 0.2 * np.real(np.fft.ifft2(f * np.sin(40 * q**2) * np.exp(-((q / 0.25) ** 2))))
    return rng.poisson(dose * img).astype(np.float32)


def test_white_noise_has_no_spectral_contrast_and_a_band_limited_frame_has():
    rng = np.random.default_rng(1)
    noise = rng.poisson(16.0, (2, 256, 256)).astype(np.float32)
    assert np.all(np.abs(comp.spectral_contrast(comp.power_spectrum_profiles(noise))) < 0.15)
    pc = comp.spectral_contrast(comp.power_spectrum_profiles(_phase_contrast_frame(dose=1e4)))
    assert pc[0] > 1.0
    # the profile is a shape: independent of dose scaling and offset
    a = comp.power_spectrum_profiles(noise[0])
    b = comp.power_spectrum_profiles(3 * noise[0] + 100)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_an_upsampled_frame_has_a_high_frequency_deficit():
    from scipy import ndimage

    frames = np.stack([_phase_contrast_frame(seed=s) for s in range(6)])
    prof = comp.power_spectrum_profiles(frames)
    mean, scale = prof.mean(0), np.maximum(prof.std(0), 0.05)
    ok = comp.high_frequency_deficit(prof, mean, scale)
    up = ndimage.zoom(frames[0], 3, order=1)  # claimed pixel size 3x the true one
    bad = comp.high_frequency_deficit(comp.power_spectrum_profiles(up), mean, scale)
    assert np.all(np.abs(ok) < 5) and bad[0] > 10


def test_calibration_counts_physics_flags_as_false_alarms():
    s = np.arange(100, dtype=float)
    level, rec = calibrate_caution_level(s, None, np.ones(100, bool))
    assert level == pytest.approx(np.quantile(s, 0.95)) and rec["false_alarm_rate"] == 0.05
    # 3 % of the frames are flagged by physics: the level lets 2 % more through
    phys = np.zeros(100, bool)
    phys[[10, 20, 30]] = True
    level, rec = calibrate_caution_level(s, None, np.ones(100, bool), physics_flag=phys)
    rest = np.delete(s, [10, 20, 30])
    assert level == pytest.approx(np.quantile(rest, 1 - 0.02 / 0.97))
    assert rec["false_alarm_rate"] == pytest.approx(0.05, abs=0.011)
    assert rec["physics_flag_rate_in_domain"] == pytest.approx(0.03)
    # more physics flags than the budget: no frame is flagged by its score alone
    phys[:8] = True
    level, rec = calibrate_caution_level(s, None, np.ones(100, bool), physics_flag=phys)
    assert level == pytest.approx(np.max(s[~phys])) and rec["false_alarm_rate"] > 0.05


def test_format_4_reference_round_trips_domain_and_spectrum(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(20, 4))
    ref = fit_reference_from_features(
        f, boundary_entropy=rng.uniform(0.6, 0.7, 20), band_width_px=rng.uniform(3, 4, 20)
    )
    ref.imaging_domain = {
        "defocus_nm_range": (-25.0, 25.0),
        "energy_eV": 300e3,
        "Cs_mm": 0.005,
        "focal_spread_A": 10.0,
        "dose_e_per_A2": 400.0,
        "sampling_A": 0.2,
    }
    ref.ps_mean, ref.ps_scale = np.zeros(32), np.full(32, 0.1)
    ref.ps_distance_ref = 2.0
    ref.ps_settings = {"tile_px": 256, "n_bins": 32, "max_tiles": 16}
    ref.caution_level = 4.0
    ref.save(tmp_path)
    back = OODReference.load(tmp_path)
    assert back.format_version == "4" and back.caution == 4.0
    assert back.domain["defocus_nm_range"] == (-25.0, 25.0) and back.domain["Cs_mm"] == 0.005
    np.testing.assert_allclose(back.ps_scale, 0.1)
    assert back.ps_distance(np.full(32, 0.2))[0] == pytest.approx(2.0 / 2.0)
    # a format-3 file (no domain, no spectrum) is read; its domain comes from the info
    meta = json.loads((tmp_path / OOD_JSON).read_text())
    for k in ("imaging_domain", "power_spectrum", "verdict"):
        meta.pop(k)
    meta["format_version"] = "3"
    meta["info"] = {"train_defocus_nm": [-10.0, 0.0, 10.0]}
    (tmp_path / OOD_JSON).write_text(json.dumps(meta))
    old = OODReference.load(tmp_path)
    assert old.format_version == "3" and old.domain["defocus_nm_range"] == (-10.0, 10.0)
    # a wrong type is a clear error, not a crash later
    meta["distance_ref"] = "far"
    (tmp_path / OOD_JSON).write_text(json.dumps(meta))
    with pytest.raises(Exception, match="malformed"):
        OODReference.load(tmp_path)


def test_the_shipped_reference_is_calibrated_and_knows_its_domain():
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    d = pretrained_model_dir()
    sha = json.loads((d / "best.json").read_text())["weights_sha256"]
    ref = load_ood_reference(d, sha)
    assert ref is not None and math.isfinite(ref.caution_level)
    dom = ref.domain
    assert dom["defocus_nm_range"] == (-25.0, 25.0)
    assert dom["sampling_A"] == pytest.approx(0.2) and dom["energy_eV"] == pytest.approx(300e3)


@pytest.fixture(scope="module")
def shipped_verdicts():
    """The shipped model's verdict (through segment) on a blank detector frame and on a
    particle-free lattice."""
    from napari_hrtem_transfer.segmentation import segment

    rng = np.random.default_rng(3)
    blank = (1e4 + rng.normal(0, 1.9, (256, 256))).astype(np.float32)  # HAADF, no specimen
    yy, xx = np.mgrid[:256, :256] * 0.2  # [Å]
    a = 3.905  # SrTiO3-like cubic lattice [Å], Gaussian atom columns, no amorphous support
    dy, dx = (yy % a) - a / 2, (xx % a) - a / 2
    lattice = rng.poisson(400 * (1 + np.exp(-(dx**2 + dy**2) / (2 * 0.4**2)))).astype(np.float32)
    res = segment(np.stack([blank, lattice]), sampling_A=0.2)
    return res


def test_a_blank_frame_is_flagged_with_its_reason(shipped_verdicts):
    res = shipped_verdicts
    row = res.frame_table()[0]
    assert row["caution"] is True
    assert any(r.startswith("blank frame") for r in row["reasons"]), row["reasons"]
    assert row["estimated_defocus_nm"] is None  # noise has no Thon rings to trust


def test_a_lattice_without_support_is_flagged_with_its_reason(shipped_verdicts):
    res = shipped_verdicts
    row = res.frame_table()[1]
    assert row["caution"] is True
    assert any("no amorphous support" in r for r in row["reasons"]), row["reasons"]
    assert row["ood_score"] > res.ood_caution


def test_frame_rows_carry_the_verdict(shipped_verdicts):
    res = shipped_verdicts
    assert res.imaging_domain["defocus_nm_range"] == (-25.0, 25.0)
    assert set(res.imaging_domain) >= {
        "energy_eV",
        "Cs_mm",
        "focal_spread_A",
        "dose_e_per_A2",
        "sampling_A",
    }
    assert len(res.ood_reasons) == 2 and len(res.ood_components) == 2
    for row in res.frame_table():
        assert {
            "ood_score",
            "caution",
            "reasons",
            "estimated_defocus_nm",
            "defocus_sign_determined",
            "ood_components",
        } <= set(row)
        assert "network" in row["ood_components"]
        json.dumps(row)  # the CLI writes these rows as JSON


def test_the_pixel_size_reason_says_what_was_measured_and_what_the_model_expects():
    import importlib

    vd = importlib.import_module("napari_hrtem_transfer.evaluation.ood.verdict")
    coarse = vd.pixel_size_reason(7.2, 2.775, 0.2)  # a real frame at 0.555 Å/px
    assert "implausible" not in coarse
    assert "0.555 Å/px" in coarse and "x2.77" in coarse and "0.2 Å/px" in coarse
    assert "1.1 Å" in coarse and "0.4 Å" in coarse and "7 training spreads" in coarse
    # no upsampling explains the missing detail: then the stated pixel size is in doubt
    for zoom in (None, 1.0, 0.5):
        doubt = vd.pixel_size_reason(7.2, zoom, 0.2)
        assert doubt.startswith("implausible pixel size") and "check its pixel size" in doubt


def test_a_real_frame_at_its_true_coarser_pixel_size_is_out_of_domain_not_implausible():
    """The soot TIFF at its true 0.555 Å/px: flagged, with the measured pixel size and the
    model's, not called implausible."""
    from pathlib import Path

    import tifffile

    from napari_hrtem_transfer.segmentation import segment

    path = (
        Path(__file__).resolve().parents[2]
        / "src/napari_hrtem_transfer/sample_data/hrtem_soot_ucam_como.tif"
    )
    grey = tifffile.imread(path).astype(np.float32).mean(axis=-1)
    row = segment(grey, sampling_A=0.555).frame_table()[0]
    text = "; ".join(row["reasons"])
    assert row["caution"] is True
    assert "coarser pixels than the model's domain: 0.555 Å/px" in text, text
    assert "implausible" not in text


def test_the_rings_are_fitted_with_the_cs_recorded_with_the_frame():
    """A frame taken at Cs 0.5 mm, 30 nm underfocus, scored by a model trained at Cs 5 µm:
    with the recorded Cs the defocus comes out right and signed; with the model's Cs it does
    not (and the components say which values were used)."""
    from tests.evaluation.test_ctf import weak_phase_frame

    img = weak_phase_frame(30.0, n=512, Cs_mm=0.5, seed=31)
    domain = {"energy_eV": 300e3, "Cs_mm": 0.005, "defocus_nm": [-25.0, 0.0, 25.0]}
    recorded = comp.physics_components(
        img, 0.2, domain, conditions={"energy_eV": 300e3, "Cs_A": 0.5e7}
    )
    assumed = comp.physics_components(img, 0.2, domain)
    assert recorded["defocus_sign_determined"]
    assert recorded["estimated_defocus_nm"] == pytest.approx(30.0, abs=1.5)
    assert "Cs recorded with the frame" in recorded["ctf_conditions"]
    assert "Cs: the model's training value" in assumed["ctf_conditions"]
    est = assumed["estimated_defocus_nm"]
    assert est is None or abs(est - 30.0) > 3.0
    # a nonsense recording (NaN, a bool, a string) falls back to the model's values
    for bad in (float("nan"), True, "5e6"):
        fb = comp.physics_components(img, 0.2, domain, conditions={"Cs_A": bad})
        assert fb["estimated_defocus_nm"] == assumed["estimated_defocus_nm"]


def test_segment_passes_the_recorded_cs_to_the_verdict(monkeypatch):
    """The user path: the beam energy and Cs the reader recorded reach the Thon-ring fit."""
    from napari_hrtem_transfer.io.frames import Frames
    from napari_hrtem_transfer.segmentation import segment

    seen = []
    orig = comp.physics_components

    def spy(*a, conditions=None, **kw):
        seen.append(dict(conditions or {}))
        return orig(*a, conditions=conditions, **kw)

    monkeypatch.setattr(comp, "physics_components", spy)
    axes = [
        {"name": "frame", "size": 1, "scale": 1.0, "offset": 0.0, "units": None},
        {"name": "y", "size": 256, "scale": 0.02, "offset": 0.0, "units": "nm"},
        {"name": "x", "size": 256, "scale": 0.02, "offset": 0.0, "units": "nm"},
    ]
    frames = Frames(
        _phase_contrast_frame(size=256, seed=3)[None],
        0.2,
        axes,
        metadata={"format": "test", "energy_eV": 200e3, "Cs_A": 1.2e7, "reader_notes": []},
    )
    res = segment(frames, model="pretrained", ood=True)
    assert seen and seen[-1]["Cs_A"] == 1.2e7 and seen[-1]["energy_eV"] == 200e3
    row = res.frame_table()[0]
    assert "Cs recorded with the frame" in row["ood_components"]["ctf_conditions"]


def test_rows_report_the_networks_mean_entropy_of_the_frame():
    """``mean_entropy_nats``: the mean binary entropy of the probability map the user gets
    (the network's own estimate of its per-pixel loss), reported beside the score."""
    from napari_hrtem_transfer.segmentation import segment

    frames = np.stack([_phase_contrast_frame(size=256, seed=s) for s in (1, 2)])
    res = segment(frames, "pretrained", sampling_A=0.2, ood=True, probabilities=True)
    p = np.clip(np.asarray(res.proba, np.float64), 1e-7, 1 - 1e-7)
    h = (-(p * np.log(p) + (1 - p) * np.log1p(-p))).mean(axis=(-2, -1))
    got = [row["ood_components"]["mean_entropy_nats"] for row in res.frame_table()]
    np.testing.assert_allclose(got, h, rtol=1e-4)
    assert got[0] != got[1]


def test_a_frame_too_small_to_judge_is_flagged_with_its_reason():
    """A 24 px frame at 0.4 Å/px is 48 px at the model's 0.2 Å/px: judged; a 40 px frame at
    0.1 Å/px is 20 px there, and a 20 px frame at 0.2 Å/px (or of unknown pixel size) is
    20 px: too small for the spectrum and ring checks, flagged (before padding)."""
    from napari_hrtem_transfer.segmentation import segment

    frame = _phase_contrast_frame(size=256, seed=7, dose=400.0)
    coarse = segment(frame[:24, :24], sampling_A=0.4).frame_table()[0]
    assert not any("too small" in r for r in coarse["reasons"]), coarse["reasons"]
    fine = segment(frame[:40, :40], sampling_A=0.1)
    row = fine.frame_table()[0]
    assert row["caution"] is True
    (reason,) = [r for r in row["reasons"] if r.startswith("frame too small to judge")]
    assert "40x40 px (20x20 px at the model's 0.2 Å/px), under 32 px" in reason
    assert row["ood_components"].get("power_spectrum_distance") is None  # not the padding's
    # not resampled (at the model's pixel size, or unknown): the size before padding counts
    for sampling in (0.2, None):
        row = segment(frame[:20, :24], sampling_A=sampling).frame_table()[0]
        assert row["caution"] is True
        assert any(r.startswith("frame too small to judge: 20x24 px, under 32 px")
                   for r in row["reasons"]), (sampling, row["reasons"])
