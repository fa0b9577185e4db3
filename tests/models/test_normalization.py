"""The input pipeline: flat-field correction then standardisation, and the old record."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.models.normalization import (
    NORMALIZATION,
    PreprocessConfig,
    apply_normalization,
    flat_field,
)


def _reference_standardize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The textbook formula in float64, per image."""
    x = x.astype(np.float64)
    m = x.mean(axis=(-2, -1), keepdims=True)
    s = x.std(axis=(-2, -1), keepdims=True)
    return ((x - m) / (s + eps)).astype(np.float32)


def _gradient(img: np.ndarray) -> float:
    """Relative linear illumination gradient across the frame (fit of a plane)."""
    ny, nx = img.shape
    yy, xx = np.mgrid[:ny, :nx]
    a = np.c_[np.ones(img.size), yy.ravel() / ny, xx.ravel() / nx]
    coef = np.linalg.lstsq(a, img.ravel().astype(np.float64), rcond=None)[0]
    return float(np.hypot(coef[1], coef[2]) / abs(img.mean()) if img.mean() else np.inf)


def test_old_record_is_plain_standardisation():
    rng = np.random.default_rng(1)
    x = rng.poisson(30.0, (3, 70, 90)).astype(np.uint16)
    got = apply_normalization(x, dict(NORMALIZATION))
    np.testing.assert_allclose(got, _reference_standardize(x), atol=2e-6)
    assert PreprocessConfig().record(0.2) == NORMALIZATION  # default configs: unchanged


def test_flat_field_removes_a_smooth_illumination_gradient():
    rng = np.random.default_rng(2)
    ny = nx = 512
    yy, xx = np.mgrid[:ny, :nx]
    illum = 1.0 + 0.6 * (xx / nx) + 0.3 * np.sin(np.pi * yy / ny)
    obj = 1.0 + 0.1 * rng.standard_normal((ny, nx))  # fine, flat object
    frame = rng.poisson(200.0 * obj * illum).astype(np.float64)
    before = _gradient(frame)
    corrected = flat_field(frame, sigma_px=20.0)
    after = _gradient(corrected)
    assert before > 0.3
    assert after < 0.02 * before


@pytest.mark.parametrize("shape", [(64, 64), (300, 257)])
def test_uniform_frame_gives_the_standardised_output_of_standardisation_only(shape):
    rng = np.random.default_rng(3)
    frame = rng.poisson(500.0, shape).astype(np.uint16)  # uniform illumination
    rec = PreprocessConfig(flat_field_sigma_A=1000.0).record(0.2)  # sigma >> frame
    got = apply_normalization(frame, rec)
    np.testing.assert_allclose(got, apply_normalization(frame, NORMALIZATION), atol=1e-3)
    assert abs(got.mean()) < 1e-5 and abs(got.std() - 1) < 1e-4


def test_flat_field_sigma_is_in_angstrom():
    """The same scene at two pixel sizes gets the same background (sigma in Å)."""
    rng = np.random.default_rng(4)
    n = 256
    yy, xx = np.mgrid[:n, :n] / n
    base = 100 * (1 + 0.5 * np.cos(2 * np.pi * xx) * np.cos(np.pi * yy))
    fine = rng.poisson(base).astype(np.float64)
    coarse = fine.reshape(n // 2, 2, n // 2, 2).mean(axis=(1, 3))
    rec = PreprocessConfig(flat_field_sigma_A=6.0).record(0.2)  # 30 px at 0.2 Å/px
    a = apply_normalization(fine, rec)
    b = apply_normalization(coarse, rec, sampling_A=0.4)
    a2 = a.reshape(n // 2, 2, n // 2, 2).mean(axis=(1, 3))
    wrong = apply_normalization(coarse, rec)  # assumes 0.2 Å/px: sigma 30 coarse px
    err_right = np.abs(np.round(a2 - a2.mean(), 1) - np.round(b - b.mean(), 1)).mean()
    err_wrong = np.abs(np.round(a2 - a2.mean(), 1) - np.round(wrong - wrong.mean(), 1)).mean()
    assert err_right < err_wrong


def test_bad_and_unknown_records_are_errors():
    with pytest.raises(ValueError, match="unknown input normalisation"):
        apply_normalization(np.zeros((8, 8)), {"method": "magic"})
    with pytest.raises(ValueError, match="needs flat_field_sigma_A and sampling_A"):
        apply_normalization(np.zeros((8, 8)), {"method": "flat_field_standardize"})
    with pytest.raises(ValueError, match="pixel size"):
        PreprocessConfig(flat_field_sigma_A=100.0).record(None)


def test_large_frame_no_full_size_float64_temporaries():
    import tracemalloc

    frame = np.full((2048, 2048), 100, np.uint16)
    rec = PreprocessConfig(flat_field_sigma_A=150.0).record(0.2)
    tracemalloc.start()
    out = apply_normalization(frame, rec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.dtype == np.float32
    # the float32 output (16 MiB) plus blocks; a float64 copy alone would be 32 MiB
    assert peak < out.nbytes + 24 * 2**20
