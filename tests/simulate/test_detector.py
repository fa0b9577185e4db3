"""Detector, drift and illumination models against theory (noise power spectra, kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.simulate.detector import (
    detect,
    drift_transfer,
    illumination_field,
)


def _radial_profile(power: np.ndarray, sampling_A: float, n_bins: int = 24):
    """Radially averaged ``power`` (n, n) in bins of nu = q / q_Nyquist in (0, 1)."""
    n = power.shape[0]
    q = np.fft.fftfreq(n, sampling_A)
    nu = np.hypot(q[:, None], q[None, :]) * 2 * sampling_A
    edges = np.linspace(0.04, 1.0, n_bins + 1)
    idx = np.digitize(nu.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    prof = np.bincount(idx[ok], power.ravel()[ok], n_bins) / np.bincount(idx[ok], None, n_bins)
    centre = np.bincount(idx[ok], nu.ravel()[ok], n_bins) / np.bincount(idx[ok], None, n_bins)
    return centre, prof


def _nps(images: np.ndarray) -> np.ndarray:
    """Noise power spectrum per pixel (mean |FFT|² / n_pixels) of a stack of flat images."""
    f = np.fft.fft2(images - images.mean(axis=(1, 2), keepdims=True))
    return (np.abs(f) ** 2).mean(axis=0) / images[0].size


def _stack(kind, dose, s, n=128, k=24, seed=0, **kw):
    rng = np.random.default_rng(seed)
    flat = np.ones((n, n))
    return np.stack([detect(flat, dose, s, rng, kind=kind, **kw) for _ in range(k)])


def test_ideal_counts_have_poisson_variance_dose_times_pixel_area():
    dose, s = 300.0, 0.3
    im = _stack("none", dose, s).astype(float)
    expected = dose * s**2  # 27 e/px
    assert im.mean() == pytest.approx(expected, rel=0.01)
    assert im.var() == pytest.approx(expected, rel=0.03)


def test_scintillator_noise_power_spectrum_is_dose_over_dqe_times_mtf_squared():
    """Flat field: NPS(nu) = N / DQE0 * MTF(nu)^2 with the parametric MTF written out here."""
    dose, s, nu0, c, dqe0 = 400.0, 0.25, 0.3, 0.1, 0.5
    im = _stack("scintillator", dose, s, mtf_nu0=nu0, mtf_floor=c, dqe0=dqe0).astype(float)
    n_e = dose * s**2
    assert im.mean() == pytest.approx(n_e, rel=0.01)  # gain: electrons per pixel
    nu, prof = _radial_profile(_nps(im), s)
    mtf = ((1 - c) / (1 + (nu / nu0) ** 2) + c) * np.sin(np.pi * nu / 2) / (np.pi * nu / 2)
    ratio = prof / (n_e / dqe0 * mtf**2)
    assert np.all(np.abs(ratio - 1) < 0.12), ratio
    # the pixel variance is the DQE-scaled count variance times the mean of MTF^2
    q = np.fft.fftfreq(im.shape[-1], s)
    nu2 = np.hypot(q[:, None], q[None, :]) * 2 * s
    mtf2 = (((1 - c) / (1 + (nu2 / nu0) ** 2) + c) * np.sinc(nu2 / 2)) ** 2
    assert im.var() == pytest.approx(n_e / dqe0 * mtf2.mean(), rel=0.05)


def test_counting_detector_noise_is_white_and_poisson():
    dose, s = 200.0, 0.3
    im = _stack("counting", dose, s).astype(float)
    n_e = dose * s**2
    assert im.var() == pytest.approx(n_e, rel=0.03)
    _, prof = _radial_profile(_nps(im), s)
    assert np.all(np.abs(prof / n_e - 1) < 0.12), prof  # flat: DQE(q) = MTF(q)^2


def test_counting_detector_passes_the_signal_through_the_pixel_sinc():
    """A cosine at 0.7 Nyquist along x is attenuated by sinc(q a) (noise-free)."""
    n, s = 128, 0.3
    m = 45  # cycles per field -> q = m / (n s)
    x = np.arange(n)
    signal = 1 + 0.5 * np.cos(2 * np.pi * m * x / n)[None, :] * np.ones((n, 1))
    out = detect(signal, None, s, np.random.default_rng(0), kind="counting")
    amp = 2 * np.abs(np.fft.fft2(out)[0, m]) / n**2
    assert amp == pytest.approx(0.5 * np.sinc(m / (n * s) * s), rel=1e-4)


@pytest.mark.parametrize("angle_deg", [0.0, 90.0, 30.0])
def test_drift_blur_has_sinc_zeros_along_the_drift_and_none_across(angle_deg):
    n, s, length = 256, 0.5, 16.0
    t = drift_transfer(n, s, length, np.deg2rad(angle_deg))
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((n, n))
    blurred = np.fft.ifft2(np.fft.fft2(noise) * t).real
    power = np.abs(np.fft.fft2(blurred)) ** 2 / np.abs(np.fft.fft2(noise)) ** 2
    a = np.deg2rad(angle_deg)
    # along the drift: power vanishes at q = m / L; across it (q perpendicular) power is 1
    for m in (1, 2):
        q = m / length
        qx, qy = q * np.cos(a), q * np.sin(a)
        ix, iy = int(round(qx * n * s)), int(round(qy * n * s))
        if abs(ix - qx * n * s) < 1e-9 and abs(iy - qy * n * s) < 1e-9:
            assert power[iy % n, ix % n] < 1e-20
    q = np.fft.fftfreq(n, s)
    qy, qx = q[:, None], q[None, :]
    q_along = qx * np.cos(a) + qy * np.sin(a)
    expected = (np.sin(np.pi * length * q_along) / (np.pi * length * q_along + 1e-300)) ** 2
    expected[q_along == 0] = 1.0
    inner = np.ones((n, n), bool)  # the Nyquist row and column have no +q partner
    inner[n // 2, :] = inner[:, n // 2] = False
    assert np.allclose(power[inner], expected[inner], atol=1e-9)
    across = inner & (np.abs(q_along) * length < 0.05)  # (nearly) across the drift
    assert across.sum() >= 8 and power[across].min() > 0.99
    if angle_deg in (0.0, 90.0):
        assert (power < 1e-20).sum() > n  # whole lines of zeros at q.u = m / L
    # real space: a point spreads into a uniform line of length L, variance L^2 / 12 along it
    delta = np.zeros((n, n))
    delta[n // 2, n // 2] = 1
    line = np.fft.ifft2(np.fft.fft2(delta) * t).real
    yy, xx = (np.mgrid[:n, :n] - n // 2) * s
    along = xx * np.cos(a) + yy * np.sin(a)
    perp = -xx * np.sin(a) + yy * np.cos(a)
    assert line.sum() == pytest.approx(1.0)
    assert (line * along**2).sum() == pytest.approx(length**2 / 12, rel=0.05)
    if angle_deg in (0.0, 90.0):
        assert (line * perp**2).sum() == pytest.approx(0.0, abs=1e-9)


def test_illumination_field_is_smooth_mean_one_and_within_its_amplitude():
    n, amp, cutoff = 128, 0.3, 2.5
    for seed in range(5):
        field = illumination_field(n, amp, cutoff, np.random.default_rng(seed))
        assert field.mean() == pytest.approx(1.0, abs=1e-12)
        assert np.abs(field - 1).max() == pytest.approx(amp, rel=1e-9)
        power = np.abs(np.fft.fft2(field - 1)) ** 2
        k = np.fft.fftfreq(n, 1 / n)
        kr = np.hypot(k[:, None], k[None, :])
        assert power[kr > cutoff].sum() < 1e-20 * power.sum()
        assert power[(kr > 0) & (kr <= cutoff)].sum() > 0
    assert np.all(illumination_field(n, 0.0, cutoff, np.random.default_rng(0)) == 1)


def _plane_residual(field: np.ndarray) -> float:
    """Largest deviation of ``field`` from its least-squares plane."""
    n = field.shape[0]
    yy, xx = np.mgrid[:n, :n]
    a = np.column_stack([np.ones(n * n), yy.ravel(), xx.ravel()])
    coef, *_ = np.linalg.lstsq(a, field.ravel(), rcond=None)
    return float(np.abs(field.ravel() - a @ coef).max())


def test_an_illumination_period_in_pixels_keeps_its_scale_whatever_the_frame_size():
    """A frame much smaller than the illumination's period sees an offset and a gentle
    gradient (as a tile of a large real frame does); the per-field-of-view rule puts a
    full variation of +-amplitude on the frame, however small it is."""
    n, amp = 128, 0.3
    for seed in range(5):
        big = illumination_field(n, amp, 2.0, np.random.default_rng(seed), period_px=2000.0)
        assert np.all(np.abs(big - 1) <= amp + 1e-12)
        assert _plane_residual(big - 1) < 0.05 * amp
        old = illumination_field(n, amp, 2.0, np.random.default_rng(seed))
        assert _plane_residual(old - 1) > 0.3 * amp
        again = illumination_field(n, amp, 2.0, np.random.default_rng(seed), period_px=2000.0)
        np.testing.assert_array_equal(big, again)
    # a frame larger than the period: variations down to the period and none shorter
    field = illumination_field(256, amp, 2.0, np.random.default_rng(0), period_px=64.0)
    assert np.abs(field - 1).max() == pytest.approx(amp, rel=0.05)
    power = np.abs(np.fft.fft2(field - field.mean())) ** 2
    k = np.fft.fftfreq(256, 1 / 256)
    kr = np.hypot(k[:, None], k[None, :])
    assert power[kr > 4 + 1e-9].sum() < 1e-8 * power.sum()  # 256 px / 64 px = 4 cycles
    assert power[(kr > 2) & (kr <= 4)].sum() > 0.05 * power.sum()
    assert np.all(illumination_field(n, 0.0, 2.0, np.random.default_rng(0), 2000.0) == 1)
