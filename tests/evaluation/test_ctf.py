"""CTF estimation from Thon rings and the information-transfer overlap (evaluation.ctf)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation import ctf


def test_ctf_zeros_match_chi_n_pi():
    """Analytic CTF: zeros of sin(chi) at chi = -n*pi (underfocus, small q)."""
    lam = ctf.wavelength_A(300e3)
    df_nm = 20.0
    # Cs = 0: chi = -pi lam df q^2 -> zeros at q_n = sqrt(n / (lam df))
    qn = np.sqrt(np.arange(1, 6) / (lam * df_nm * 10))
    t = ctf.ctf_curve(qn, df_nm, energy_eV=300e3, Cs_mm=0.0)
    assert np.allclose(t, 0.0, atol=1e-9)
    mid = np.sqrt((np.arange(1, 6) + 0.5) / (lam * df_nm * 10))
    assert np.allclose(np.abs(ctf.ctf_curve(mid, df_nm, energy_eV=300e3, Cs_mm=0.0)), 1.0)


def test_overlap_is_one_at_a_training_defocus_and_lower_away():
    kw = dict(energy_eV=300e3, Cs_mm=0.005, sampling_A=0.2)
    assert ctf.ctf_overlap(10.0, [10.0], **kw) == pytest.approx(1.0)
    near = ctf.ctf_overlap(12.0, [10.0], **kw)
    far = ctf.ctf_overlap(40.0, [10.0], **kw)
    assert 0.0 <= far < near < 1.0
