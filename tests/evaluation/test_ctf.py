"""CTF estimation from Thon rings and the information-transfer overlap (evaluation.ctf).

Checked against theory (analytic CTF zeros, abTEM's own CTF), against frames with an exactly
known CTF (a weak phase object imaged through ``ctf_curve`` with Poisson noise), against
frames simulated by this package at known defocus, and on frames without amorphous signal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation import ctf

SAMPLE = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "napari_hrtem_transfer"
    / "sample_data"
    / "defocus_series_small.hspy"
)


def weak_phase_frame(
    defocus_nm: float,
    *,
    n: int = 256,
    sampling_A: float = 0.2,
    Cs_mm: float = 0.5,
    focal_spread_A: float = 10.0,
    counts: float = 16.0,
    phase_rms: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Counts of a random weak phase object (amorphous film) imaged with a known CTF.

    Image intensity 1 + 2 phi * T (linear imaging, T = ctf_curve with the focal-spread
    envelope), the object's spectrum falling off as exp(-(q / 1.5 1/Å)²), Poisson noise at
    ``counts`` electrons per pixel.
    """
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n, d=sampling_A)
    q = np.hypot(f[:, None], f[None, :])
    t = ctf.ctf_curve(q, defocus_nm, energy_eV=300e3, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    phi = np.fft.fft2(rng.normal(0.0, phase_rms, (n, n))) * np.exp(-((q / 1.5) ** 2))
    intensity = 1.0 + 2.0 * np.real(np.fft.ifft2(phi * t))
    return rng.poisson(np.clip(intensity, 0, None) * counts).astype(np.uint16)


def lattice_frame(n: int = 256, sampling_A: float = 0.2, counts: float = 100.0, seed: int = 0):
    """Crystal everywhere: two hexagonal sets of cosine fringes (2.1 Å and 1.2 Å), Poisson."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] * sampling_A
    img = np.ones((n, n))
    for k in range(3):
        for g, amp, da in ((1 / 2.1, 0.3, 0.0), (1 / 1.2, 0.1, np.pi / 6)):
            a = 0.3 + np.pi * k / 3 + da
            img += amp * np.cos(2 * np.pi * g * (np.cos(a) * x + np.sin(a) * y))
    return rng.poisson(img * counts).astype(np.uint16)


# ---------------------------------------------------------------------------- theory


def test_ctf_zeros_match_chi_n_pi():
    """Analytic CTF with Cs = 0: zeros of sin(chi) at q_n = sqrt(n / (lambda df))."""
    lam = ctf.wavelength_A(300e3)
    assert lam == pytest.approx(0.019687, rel=1e-4)  # 300 kV
    df_nm = 20.0
    qn = np.sqrt(np.arange(1, 6) / (lam * df_nm * 10))
    assert np.allclose(ctf.ctf_curve(qn, df_nm, energy_eV=300e3, Cs_mm=0.0), 0.0, atol=1e-9)
    mid = np.sqrt((np.arange(1, 6) + 0.5) / (lam * df_nm * 10))
    assert np.allclose(np.abs(ctf.ctf_curve(mid, df_nm, energy_eV=300e3, Cs_mm=0.0)), 1.0)
    # underfocus: T = sin(chi) < 0 below the first zero (chi = -pi lam df q^2)
    assert ctf.ctf_curve(0.5 * qn[0], df_nm, energy_eV=300e3, Cs_mm=0.0) < 0


def test_scherzer_band_and_envelope():
    """Cs > 0, underfocus: chi is stationary at q² = df / (Cs lambda²) (the Scherzer band)."""
    lam = ctf.wavelength_A(300e3)
    cs_mm, df_nm = 0.5, 40.0
    q0 = math.sqrt(df_nm * 10 / (cs_mm * 1e7 * lam**2))
    q = np.linspace(0.5 * q0, 1.5 * q0, 2001)
    chi = ctf.chi_rad(q, df_nm, energy_eV=300e3, Cs_mm=cs_mm)
    assert q[np.argmin(chi)] == pytest.approx(q0, rel=1e-3)
    t = ctf.ctf_curve(
        2.0, 0.0, energy_eV=300e3, Cs_mm=0.0, focal_spread_A=10.0, amplitude_contrast=1
    )
    assert t == pytest.approx(math.exp(-0.25 * (math.pi * lam * 10.0 * 4.0) ** 2), rel=1e-9)
    with pytest.raises(ValueError, match="amplitude_contrast"):
        ctf.ctf_curve(1.0, 0.0, amplitude_contrast=1.5)


@pytest.mark.slow
def test_chi_is_abtem_phase():
    """exp(-i chi) equals abTEM's CTF (same defocus sign and Cs) at 300 kV."""
    abtem = pytest.importorskip("abtem")
    lam = ctf.wavelength_A(300e3)
    q = np.linspace(0, 1.5, 31)
    for df_nm in (-35.0, 20.0):
        c = abtem.CTF(energy=300e3, defocus=df_nm * 10, aberration_coefficients={"C30": 5e6})
        ref = np.asarray(c._evaluate_from_angular_grid(q * lam, np.zeros_like(q)))
        chi = ctf.chi_rad(q, df_nm, energy_eV=300e3, Cs_mm=0.5)
        assert np.allclose(np.exp(-1j * chi), ref, atol=1e-4)
    # the focal-spread envelope is abTEM's (the simulator's)
    c = abtem.CTF(energy=300e3, defocus=0.0, focal_spread=10.0)
    env = np.abs(np.asarray(c._evaluate_from_angular_grid(q * lam, np.zeros_like(q))))
    mine = ctf.ctf_curve(q, 0.0, Cs_mm=0.0, focal_spread_A=10.0, amplitude_contrast=1.0)
    assert np.allclose(mine, env, atol=1e-4)


def test_defaults_are_the_training_values():
    from napari_hrtem_transfer.simulate.config import SimulationConfig

    cfg = SimulationConfig.from_preset("laptop")
    assert ctf.DEFAULT_CS_MM == pytest.approx(cfg.Cs_A / 1e7)
    assert ctf.DEFAULT_ENERGY_EV == cfg.energy_eV
    assert ctf.DEFAULT_FOCAL_SPREAD_A == cfg.focal_spread_A
    assert ctf.DEFAULT_TRAINING_JITTER_NM == cfg.defocus_jitter_nm


# ---------------------------------------------------------------------------- spectra


def test_power_spectrum_white_noise_level_and_tiles():
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 2.0, (1024, 1024))
    spec, n_tiles = ctf.power_spectrum(img, tile_px=256, max_tiles=20)
    assert spec.shape == (256, 256)
    assert n_tiles == 20
    assert spec.mean() == pytest.approx(4.0, rel=0.05)  # variance of the noise
    with pytest.raises(ValueError, match="2-D"):
        ctf.power_spectrum(np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="too small"):
        ctf.power_spectrum(np.zeros((16, 16)))


# ---------------------------------------------------------------------------- estimates


@pytest.mark.parametrize("defocus_nm", [-45.0, -20.0, -10.0, 12.0, 30.0, 55.0])
def test_known_ctf_frames_large_cs_give_signed_defocus(defocus_nm):
    img = weak_phase_frame(defocus_nm, n=512, seed=int(defocus_nm) + 100)
    e = ctf.estimate_ctf(img, 0.2, Cs_mm=0.5)
    assert e.amorphous and not e.blank and not e.periodic
    assert e.sign_determined, e
    assert e.defocus_nm == pytest.approx(defocus_nm, abs=1.5)
    assert e.defocus_abs_nm == pytest.approx(abs(defocus_nm), abs=1.5)
    assert 0.5 < e.fit_quality <= 1.0
    assert e.ring_F > ctf.RING_F_THRESHOLD


@pytest.mark.parametrize("defocus_nm", [-30.0, 15.0])
def test_sign_undetermined_without_cs(defocus_nm):
    """Cs = 0: sin²(chi) is the same for ±defocus, so only |defocus| can be known."""
    e = ctf.estimate_ctf(weak_phase_frame(defocus_nm, Cs_mm=0.0, seed=5), 0.2, Cs_mm=0.0)
    assert e.amorphous
    assert not e.sign_determined
    assert e.defocus_abs_nm == pytest.approx(abs(defocus_nm), abs=1.5)
    assert e.label().startswith("±")
    assert e.sign_lr == pytest.approx(0.0, abs=1e-6)


def test_wrong_cs_or_sampling_changes_the_answer():
    """The fit uses the given imaging conditions: the estimate is not a constant."""
    img = weak_phase_frame(25.0, seed=9)
    right = ctf.estimate_ctf(img, 0.2, Cs_mm=0.5)
    wrong = ctf.estimate_ctf(img, 0.25, Cs_mm=0.5)
    assert right.defocus_nm == pytest.approx(25.0, abs=1.0)
    assert wrong.defocus_nm is None or abs(wrong.defocus_nm - 25.0) > 3.0


def test_simulated_sample_series_abs_defocus():
    """Frames of the shipped simulated series (abTEM, Cs 5 µm): |defocus| of the carbon film.

    The film lies below the particles, so its defocus is the image's calibrated defocus plus
    the zero offset minus the film's half thickness (see benchmarks/bench_ctf.py).
    """
    from napari_hrtem_transfer.io.dataset import load_dataset

    ds = load_dataset(SAMPLE, lazy=False)
    checked = 0
    for j in range(ds.images.shape[0]):
        for i in range(ds.images.shape[1]):
            s = ds.info["structures"][i]
            film = (
                ds.actual_defocus_nm[j, i]
                + s["zero_defocus_offset_nm"]
                - (s["substrate_thickness_nm"] / 2 + 0.1)
            )
            if abs(film) < 8:
                continue
            e = ctf.estimate_ctf(
                ds.images[j, i], ds.sampling_A, Cs_mm=ds.info["config"]["Cs_A"] / 1e7
            )
            assert e.amorphous, (film, e)
            assert e.defocus_abs_nm == pytest.approx(abs(film), abs=3.0)
            checked += 1
    assert checked >= 4


@pytest.fixture(scope="session")
def cs05_series():
    """Four frames simulated with this package at Cs 0.5 mm (abTEM, 256², carbon + particles)."""
    from napari_hrtem_transfer.simulate import SimulationConfig, simulate_dataset

    cfg = SimulationConfig.from_preset(
        "laptop", Cs_A=5e6, defocus_nm=[-35.0, 15.0, 40.0], n_structures=2, seed=17
    )
    return simulate_dataset(cfg, workers=1)


@pytest.mark.slow
def test_simulated_frames_at_large_cs_within_3nm(cs05_series):
    """abTEM frames (256², particles on 2-3 nm carbon, 400 e/Å², Cs 0.5 mm): signed defocus
    of the film within 3 nm in every frame (the benchmark: 86 % of 132 frames)."""
    ds = cs05_series
    for j in range(ds.images.shape[0]):
        for i in range(ds.images.shape[1]):
            s = ds.info["structures"][i]
            film = (
                ds.actual_defocus_nm[j, i]
                + s["zero_defocus_offset_nm"]
                - (s["substrate_thickness_nm"] / 2 + 0.1)
            )
            e = ctf.estimate_ctf(ds.images[j, i], ds.sampling_A, Cs_mm=0.5)
            assert e.amorphous and e.sign_determined, (film, e)
            assert e.defocus_nm == pytest.approx(film, abs=3.0)
            # the film, not the particles' calibrated zero, is what the rings measure
            assert abs(e.defocus_nm - film) < abs(e.defocus_nm - ds.actual_defocus_nm[j, i])


def test_blank_frames():
    rng = np.random.default_rng(11)
    for img in (
        rng.poisson(16, (256, 256)),
        rng.poisson(0.5, (512, 512)),
        rng.normal(5, 1, (128, 128)),
    ):
        e = ctf.estimate_ctf(img, 0.2, Cs_mm=0.5)
        assert not e.amorphous and e.blank and not e.periodic, e
        assert e.defocus_nm is None and e.defocus_abs_nm is None
        assert "blank" in e.reason
    flat = ctf.estimate_ctf(np.full((128, 128), 7.0), 0.2)
    assert flat.blank and not flat.amorphous


@pytest.mark.parametrize("n", [128, 512])
def test_lattice_everywhere_is_periodic_not_amorphous(n):
    e = ctf.estimate_ctf(lattice_frame(n, seed=n), 0.2, Cs_mm=0.5)
    assert e.periodic and not e.amorphous and not e.blank, e
    assert e.peak_power_fraction > ctf.PERIODIC_POWER_FRACTION
    assert "lattice" in e.reason


def axis_lattice_frame(n: int, period_A: float, counts: float = 100.0, seed: int = 0):
    """A cubic lattice whose fringes run along the frame's edges: every reflection lies on
    the frequency axes (a zone-axis crystal aligned with the camera)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] * 0.2
    img = 1 + 0.3 * np.cos(2 * np.pi * x / period_A) + 0.3 * np.cos(2 * np.pi * y / period_A)
    return rng.poisson(img * counts).astype(np.uint16)


@pytest.mark.parametrize(("n", "period_A"), [(256, 3.2), (256, 2.1), (512, 3.905)])
def test_axis_aligned_lattice_is_periodic_not_blank(n, period_A):
    """The axes are left out of the ring fit, but reflections on them are still peaks: an
    axis-aligned crystal is a lattice, not a blank frame (3.2 Å at 0.2 Å/px is commensurate
    with the tile: all its power sits on four axis pixels)."""
    e = ctf.estimate_ctf(axis_lattice_frame(n, period_A, seed=n), 0.2)
    assert e.periodic and not e.blank and not e.amorphous, e
    assert e.peak_power_fraction > ctf.PERIODIC_POWER_FRACTION
    assert "lattice" in e.reason


def test_axis_peaks_do_not_turn_noise_or_carbon_into_a_lattice():
    """The axis-peak search must not find peaks in shot noise or on amorphous carbon."""
    rng = np.random.default_rng(5)
    e = ctf.estimate_ctf(rng.poisson(16, (512, 512)), 0.2)
    assert e.blank and not e.periodic and e.peak_power_fraction < 0.05, e
    e = ctf.estimate_ctf(weak_phase_frame(20.0, n=512, seed=4), 0.2, Cs_mm=0.5)
    assert e.amorphous and not e.periodic and e.peak_power_fraction < 0.05, e


def test_lattice_on_carbon_still_gives_rings():
    """Sharp peaks are masked before the ring fit: a crystal on carbon keeps its rings."""
    img = weak_phase_frame(30.0, seed=21).astype(float) + lattice_frame(256, counts=8.0) - 8.0
    e = ctf.estimate_ctf(img, 0.2, Cs_mm=0.5)
    assert e.amorphous
    assert e.defocus_nm == pytest.approx(30.0, abs=1.5)


def test_large_frame_tile_average():
    img = np.tile(weak_phase_frame(-25.0, n=512, seed=2), (2, 2))[:1000, :900]
    e = ctf.estimate_ctf(img, 0.2, Cs_mm=0.5, tile_px=256)
    assert e.n_tiles > 1
    assert e.defocus_nm == pytest.approx(-25.0, abs=1.0)


def test_result_is_json_and_bad_input_is_named():
    e = ctf.estimate_ctf(weak_phase_frame(20.0, seed=4), 0.2, Cs_mm=0.5)
    d = json.loads(json.dumps(e.to_dict()))
    assert d["defocus_nm"] == pytest.approx(e.defocus_nm)
    assert d["amorphous"] is True and d["Cs_mm"] == 0.5
    with pytest.raises(ValueError, match="sampling_A"):
        ctf.estimate_ctf(np.zeros((64, 64)), -1.0)
    with pytest.raises(ValueError, match="defocus_range_nm"):
        ctf.estimate_ctf(np.zeros((64, 64)), 0.2, defocus_range_nm=(10, -10))
    with pytest.raises(ValueError, match="NaN"):
        ctf.estimate_ctf(np.full((64, 64), np.nan), 0.2)


# ---------------------------------------------------------------------------- overlap


def test_overlap_is_one_at_a_training_defocus_and_falls_away():
    kw = dict(energy_eV=300e3, Cs_mm=0.005, sampling_A=0.2)
    assert ctf.ctf_overlap(10.0, [10.0], training_jitter_nm=0.0, **kw) == pytest.approx(1.0)
    at = ctf.ctf_overlap(10.0, [10.0], **kw)
    near = ctf.ctf_overlap(13.0, [10.0], **kw)
    far = ctf.ctf_overlap(40.0, [10.0], **kw)
    assert 0.0 <= far < near < at <= 1.0
    # the best training condition counts
    assert ctf.ctf_overlap(40.0, [10.0, 40.0], **kw) == pytest.approx(at, abs=0.02)


def test_overlap_ignores_sign_without_cs():
    kw = dict(energy_eV=300e3, Cs_mm=0.0, sampling_A=0.2)
    assert ctf.ctf_overlap(-20.0, [15.0], **kw) == pytest.approx(
        ctf.ctf_overlap(20.0, [15.0], **kw)
    )
    with pytest.raises(ValueError, match="training_defocus_nm"):
        ctf.ctf_overlap(0.0, [], **kw)
    with pytest.raises(ValueError, match="q_min_per_A"):
        ctf.ctf_overlap(0.0, [1.0], q_min_per_A=5.0, **kw)


def test_real_blank_detector_frame_has_no_rings(shared_data_dir):
    """A real Ceta camera frame without beam (Titan, 300 kV): no amorphous signal.

    Its noise is not white (detector correlations and a column pattern), so it is reported
    as "no Thon rings found" rather than "blank"; the frequency axes with the column
    pattern are left out, so it is not taken for a lattice either.
    """
    hs = pytest.importorskip("hyperspy.api")
    s = hs.load(shared_data_dir / "data" / "emd_velox" / "ncem_Camera_Ceta_Imaging_Micro.emd")
    img = np.asarray(s.data, dtype=float)
    for sampling_A in (0.2, 1.0):
        e = ctf.estimate_ctf(img, sampling_A, energy_eV=300e3)
        assert not e.amorphous and not e.periodic, e
        assert e.defocus_nm is None and e.reason


def test_coarse_pixels_cannot_show_rings():
    """5 nm pixels: no defocus within ±150 nm puts two ring zeros below Nyquist."""
    img = weak_phase_frame(30.0, seed=1)
    e = ctf.estimate_ctf(img, 50.0)
    assert not e.amorphous and "pixel size" in e.reason


def test_overlap_of_an_estimate():
    signed = ctf.estimate_ctf(weak_phase_frame(20.0, n=512, seed=8), 0.2, Cs_mm=0.5)
    assert signed.sign_determined
    kw = dict(energy_eV=300e3, Cs_mm=0.5, sampling_A=0.2)
    assert ctf.ctf_overlap_for_estimate(signed, [20.0]) == pytest.approx(
        ctf.ctf_overlap(signed.defocus_nm, [20.0], **kw)
    )
    assert ctf.ctf_overlap_for_estimate(signed, [20.0]) > 0.8
    # sign unknown: the worse of the two signs
    unsigned = ctf.CTFEstimate(None, 20.0, False, 0.9, True, False, False, None, 300e3, 0.5, 0.2)
    assert ctf.ctf_overlap_for_estimate(unsigned, [20.0]) == pytest.approx(
        ctf.ctf_overlap(-20.0, [20.0], **kw)
    )
    blank = ctf.estimate_ctf(np.random.default_rng(0).poisson(9, (128, 128)), 0.2)
    assert ctf.ctf_overlap_for_estimate(blank, [20.0]) is None


def test_small_cs_never_claims_a_sign():
    """Cs 5 µm (the shipped model's): the Cs term adds ~2π at the information limit, below
    SIGN_MIN_CS_PHASE_RAD, so the sign stays ± even when the likelihood ratio is large."""
    e = ctf.estimate_ctf(weak_phase_frame(-25.0, n=512, Cs_mm=0.005, seed=3), 0.2, Cs_mm=0.005)
    assert e.amorphous and not e.sign_determined
    assert e.cs_phase_rad < ctf.SIGN_MIN_CS_PHASE_RAD
    assert e.defocus_abs_nm == pytest.approx(25.0, abs=1.5)


def test_conditions_from_metadata_else_training_values():
    img = weak_phase_frame(25.0, n=512, seed=12)
    e = ctf.estimate_ctf_with_metadata(img, 0.2, {"energy_eV": 300e3, "Cs_A": 5e6})
    assert e.Cs_mm == pytest.approx(0.5) and e.energy_eV == 300e3
    assert "Cs from metadata" in e.conditions_source
    assert e.defocus_nm == pytest.approx(25.0, abs=1.5) and e.sign_determined
    d = ctf.estimate_ctf_with_metadata(img, 0.2, {"Cs_A": 0.0})  # DM writes 0 when unknown
    assert d.Cs_mm == ctf.DEFAULT_CS_MM and d.energy_eV == ctf.DEFAULT_ENERGY_EV
    assert "training value" in d.conditions_source
    assert not d.sign_determined  # 5 µm: never a sign
    g = ctf.estimate_ctf_with_metadata(img, 0.2, None, Cs_mm=0.5)
    assert g.Cs_mm == 0.5 and "Cs given" in g.conditions_source
    assert json.loads(json.dumps(g.to_dict()))["conditions_source"] == g.conditions_source


def test_periodic_component_keeps_high_frequencies_and_removes_edge_jumps():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(64, 64)) + np.add.outer(np.arange(64.0), np.zeros(64)) * 0.1
    smooth = u - ctf.periodic_component(u)  # Moisan's smooth part
    k = np.abs(np.fft.fftfreq(64) * 64)
    high = (k[:, None] >= 3) & (k[None, :] >= 3)  # off the frequency axes
    assert (np.abs(np.fft.fft2(smooth)) ** 2)[high].sum() < 0.02 * (np.abs(np.fft.fft2(u)) ** 2)[
        high
    ].sum()
    ramp = np.add.outer(np.arange(64.0), np.arange(64.0))  # big jumps between opposite edges
    spec_raw = np.abs(np.fft.fft2(ramp - ramp.mean())) ** 2
    spec_p = np.abs(np.fft.fft2(ctf.periodic_component(ramp))) ** 2
    axis = (slice(1, None), 0)  # the qy axis: where edge jumps put their power
    assert spec_p[axis].sum() < 1e-3 * spec_raw[axis].sum()
    with pytest.raises(ValueError, match="window"):
        ctf.power_spectrum(ramp, window="kaiser")


def test_real_crystal_everywhere_is_periodic(shared_data_dir):
    """Atomic-resolution STEM survey of a crystal (SrTiO3, 512², uncalibrated): no rings."""
    hs = pytest.importorskip("hyperspy.api")
    s = hs.load(shared_data_dir / "data" / "dm3" / "scifi_DMReader_Image_SI-Survey.dm3")
    img = np.asarray(s.data, dtype=float)
    for sampling_A in (0.2, 0.3, 0.5):
        e = ctf.estimate_ctf(img, sampling_A, energy_eV=200e3, Cs_mm=1.0)
        assert e.periodic and not e.amorphous, e
        assert "lattice" in e.reason
