"""The independent-check simulator against theory and against abTEM's CTF."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation import independent as ind

E = 300e3


def test_wavelength_and_sigma_at_300kV():
    # textbook values: lambda(300 kV) = 0.01969 Å, sigma = 6.526e-4 rad/(V Å)
    assert ind.wavelength_A(E) == pytest.approx(0.019687, rel=2e-4)
    assert ind.interaction_parameter(E) == pytest.approx(6.526e-4, rel=2e-3)


@pytest.mark.parametrize("df_A, cs_A", [(150.0, 0.0), (-150.0, 0.0), (300.0, 5e4), (-80.0, 1e7)])
def test_ctf_zeros_equal_the_analytic_ones(df_A, cs_A):
    q = np.linspace(1e-4, 1.2, 400_001)
    h = ind.ctf_transfer(q**2, df_A, E, cs_A)
    s = h.imag  # -sin(chi): zero where chi = n pi
    crossings = q[:-1][np.sign(s[:-1]) != np.sign(s[1:])]
    analytic = ind.ctf_zeros_q(df_A, E, cs_A, n_max=6)
    analytic = analytic[analytic < 1.2]
    assert len(crossings) >= 3
    n = min(len(crossings), len(analytic))
    np.testing.assert_allclose(crossings[:n], analytic[:n], atol=5e-6)
    if cs_A == 0:  # chi = -pi lambda df q^2: zeros at q^2 = n / (lambda |df|)
        lam = ind.wavelength_A(E)
        expect = np.sqrt(np.arange(1, n + 1) / (lam * abs(df_A)))
        np.testing.assert_allclose(analytic[:n], expect, rtol=1e-9)


def test_ctf_matches_abtem_including_envelopes_and_sign():
    abtem = pytest.importorskip("abtem")
    lam = ind.wavelength_A(E)
    q = np.linspace(0.0, 1.5, 301)
    for df, cs, fs, conv in [(200.0, 5e4, 10.0, 0.1), (-250.0, 5e4, 30.0, 0.3), (0.0, 1e6, 0, 0)]:
        ctf = abtem.CTF(
            energy=E,
            defocus=df,
            aberration_coefficients={"C30": cs},
            focal_spread=fs,
            angular_spread=conv,
        )
        ref = np.asarray(ctf._evaluate_from_angular_grid(lam * q, np.zeros_like(q)))
        mine = ind.ctf_transfer(q**2, df, E, cs, fs, conv)
        np.testing.assert_allclose(mine, ref, atol=2e-5)


def test_positive_defocus_is_underfocus_atoms_dark_at_scherzer():
    """Weak-phase atom at Scherzer (under)focus Δf = +1.2 sqrt(Cs λ) is dark; at -Δf bright."""
    cs = 5e5
    lam = ind.wavelength_A(E)
    n, extent = 256, 25.6
    vz = ind.projected_potential(np.array([[12.8, 12.8]]), np.array(["C"]), extent, n)
    wave = np.fft.fft2(np.exp(1j * ind.interaction_parameter(E) * vz))
    f = np.fft.fftfreq(n, extent / n)
    q2 = f[:, None] ** 2 + f[None, :] ** 2
    df = 1.2 * math.sqrt(cs * lam)
    centre = {}
    for sign in (1, -1):
        img = np.abs(np.fft.ifft2(wave * ind.ctf_transfer(q2, sign * df, E, cs))) ** 2
        centre[sign] = img[128, 128]
    assert centre[1] < 0.97 and centre[-1] > 1.0


def test_projected_potential_equals_kirkland_real_space_formula():
    """The Fourier-space construction (47.878 f_e(q), q = 1/d) against Kirkland's analytic
    real-space projected potential (K0 + Gaussian terms), Hankel-transformed numerically,
    and the grid construction (off-grid atom: spreading kernel and phase) against it."""
    from scipy.integrate import quad
    from scipy.special import j0, k0

    a, b, c, d = ind._kirkland_table()["Au"]
    a0e = 0.52917721 * 14.399645  # Bohr radius x e [V Å^2]

    def vz_real(r):
        return sum(
            4 * math.pi**2 * a0e * a[i] * k0(2 * math.pi * r * math.sqrt(b[i]))
            + 2 * math.pi**2 * a0e * c[i] / d[i] * math.exp(-(math.pi**2) * r**2 / d[i])
            for i in range(3)
        )

    for q in (0.05, 0.3, 1.0, 2.0):
        hankel = quad(
            lambda r, q=q: 2 * math.pi * r * vz_real(r) * j0(2 * math.pi * q * r),
            0,
            30,
            limit=2000,
        )[0]
        assert hankel == pytest.approx(47.87801 * ind.scattering_factor("Au", q**2), rel=5e-3)

    n, extent = 512, 25.6
    dx = extent / n
    x0 = 12.8 + 0.3 * dx  # off-grid
    vz = ind.projected_potential(np.array([[x0, 12.8]]), np.array(["Au"]), extent, n)
    f = np.fft.fftfreq(n, dx)
    spec = np.fft.fft2(vz) * dx**2 * np.exp(2j * math.pi * (f[None, :] * x0 + f[:, None] * 12.8))
    q2 = f[:, None] ** 2 + f[None, :] ** 2
    band = q2 < (0.3 / dx) ** 2  # inside the simulator's band limit (1 / (3 dx))
    expect = 47.87801 * ind.scattering_factor("Au", q2[band])
    np.testing.assert_allclose(spec[band].real, expect, rtol=2e-3)
    assert np.abs(spec[band].imag).max() < 2e-3 * expect.min()
    assert vz.sum() * dx**2 == pytest.approx(47.87801 * ind.scattering_factor("Au", 0.0), rel=1e-4)
    assert vz[256].argmax() == round(x0 / dx)  # the peak sits at the atom


def test_vacuum_frame_dose_statistics():
    cfg = ind.IndependentConfig(
        materials=("Au",),
        n_per_material=1,
        particles_per_image=(0, 0),
        substrate_thickness_nm=(0.0, 0.0),
        defocus_nm=[0.0, 20.0],
        image_size_px=128,
        dose_e_per_A2=400.0,
        sampling_A=0.2,
    )
    r = ind.simulate_independent_structure(cfg, 0)
    assert not r["mask"].any() and r["n_particles"] == 0
    lam = 400.0 * 0.2**2  # 16 e/px
    counts = r["images"].astype(float).ravel()
    n = counts.size
    assert abs(counts.mean() - lam) < 4 * math.sqrt(lam / n)
    assert abs(counts.var(ddof=1) - lam) < 4 * math.sqrt((lam + 2 * lam**2) / n)
    clean = ind.simulate_independent_structure(cfg.model_copy(update={"dose_e_per_A2": None}), 0)
    np.testing.assert_allclose(clean["images"], 1.0, atol=1e-6)


def test_mask_of_one_atom_and_one_particle_have_the_theoretical_area():
    s = 0.05
    one = ind.footprint_mask(np.array([[10.0, 10.0]]), np.array(["Au"]), s, (400, 400))
    r = ind.ATOM_RADII_A["Au"]
    assert one.sum() * s**2 == pytest.approx(math.pi * r**2, rel=0.02)

    rng = np.random.default_rng(0)
    radius = 20.0  # a 4 nm Au particle
    pos, sym = ind._particle("Au", 2 * radius, rng)
    assert np.linalg.norm(pos, axis=1).max() <= radius
    # number of atoms = volume x fcc density (4 atoms per a^3) within a few %
    assert len(pos) == pytest.approx(4 / 3 * math.pi * radius**3 * 4 / 4.078**3, rel=0.05)
    mask = ind.footprint_mask(pos[:, :2] + 30.0, sym, 0.2, (300, 300))
    area = mask.sum() * 0.2**2
    assert math.pi * radius**2 < area < math.pi * (radius + r) ** 2
    assert area == pytest.approx(math.pi * (radius + r / 2) ** 2, rel=0.06)


def test_seeded_reproducible_and_written_as_a_dataset(tmp_path):
    from napari_hrtem_transfer.io.dataset import load_dataset

    cfg = ind.IndependentConfig(
        materials=("CdSe", "Pt"),
        n_per_material=1,
        diameter_nm=(1.5, 2.0),
        defocus_nm=[-10.0, 10.0],
        image_size_px=128,
        sampling_A=0.3,
        substrate_thickness_nm=(2.0, 2.0),
    )
    a, b = ind.simulate_independent_structure(cfg, 1), ind.simulate_independent_structure(cfg, 1)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    other = ind.simulate_independent_structure(cfg.model_copy(update={"seed": 3}), 1)
    assert not np.array_equal(a["images"], other["images"])
    path = ind.write_independent_set(cfg, tmp_path / "check.hspy")
    ds = load_dataset(path, lazy=False)
    assert ds.sampling_A == pytest.approx(0.3)
    np.testing.assert_allclose(ds.defocus_nm, [-10.0, 10.0])
    assert ds.image_shape == (128, 128) and ds.masks.shape == (2, 128, 128)
    assert list(ds.materials) == ["CdSe", "Pt"]
    assert ds.info["structures"][1]["material"] == "Pt"
    assert 1.5 * 0.95 <= ds.info["structures"][1]["diameter_nm"] <= 2.0 * 1.05
    np.testing.assert_array_equal(np.asarray(ds.images[1, 1]), a["images"][1])
    # the same noise-free structures at another dose: mean counts scale with the dose
    clean = ind.independent_dataset(cfg.model_copy(update={"dose_e_per_A2": None}))
    low = ind.with_dose(clean, 80.0)
    assert low.dose_e_per_A2 == 80.0 and low.info["structures"][0]["dose_e_per_A2"] == 80.0
    ratio = np.asarray(low.images, float).mean() / (np.asarray(clean.images).mean() * 80 * 0.09)
    assert ratio == pytest.approx(1.0, abs=0.01)


class _AllParticle:
    """A stand-in model: logit +1 everywhere (predicts particle on every pixel)."""

    def __init__(self, sampling_A):
        self.sampling_A = sampling_A
        self.shapes = []

    def predict_logits(self, images, **_):
        self.shapes.append(np.shape(images))
        return np.ones(np.shape(images), np.float32)


def test_score_frames_dice_and_resampling():
    cfg = ind.IndependentConfig(
        materials=("Au",),
        n_per_material=2,
        diameter_nm=(2.0, 2.5),
        defocus_nm=[0.0],
        image_size_px=96,
        sampling_A=0.4,
        substrate_thickness_nm=(1.0, 1.0),
    )
    ds = ind.independent_dataset(cfg)
    for model_px, shape in ((0.4, (2, 96, 96)), (0.2, (2, 192, 192))):
        m = _AllParticle(model_px)
        rows = ind.score_frames(m, ds, mask_margins_A=(1.0,))
        assert m.shapes == [shape]
        for r in rows:
            t = ds.masks[r["image_index"]].sum()
            assert t > 0
            assert r["dice"] == pytest.approx(2 * t / (96 * 96 + t))
            assert r["area_ratio"] == pytest.approx(96 * 96 / t)
            t1 = ind._dilate(ds.masks[r["image_index"]][None], 1.0 / 0.4)[0].sum()
            assert t1 > t
            assert r["dice_mask+1A"] == pytest.approx(2 * t1 / (96 * 96 + t1))
            assert r["material"] == "Au" and r["dose_e_per_A2"] == 400.0


def test_mask_margin_equals_grown_atom_radii():
    s, m = 0.05, 1.0
    xy, sym = np.array([[10.0, 10.0], [13.0, 10.0]]), np.array(["Au", "Au"])
    grown = ind._dilate(ind.footprint_mask(xy, sym, s, (400, 400))[None], m / s)[0]
    old = ind.ATOM_RADII_A["Au"]
    try:
        ind.ATOM_RADII_A["Au"] = old + m
        direct = ind.footprint_mask(xy, sym, s, (400, 400))
    finally:
        ind.ATOM_RADII_A["Au"] = old
    assert np.mean(grown != direct) < 1e-3
    assert grown.sum() > ind.footprint_mask(xy, sym, s, (400, 400)).sum()
