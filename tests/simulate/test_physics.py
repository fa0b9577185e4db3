"""Image formation against theory: CTF zeros (Thon rings), dose statistics, masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import argrelmin
from scipy.spatial import cKDTree

from napari_hrtem_transfer.simulate import SimulationConfig, wavelength_A
from napari_hrtem_transfer.simulate.physics import (
    apply_dose,
    defocus_series,
    exit_waves,
    particle_mask,
)
from napari_hrtem_transfer.simulate.structures import build_specimen


def _analytic_zeros(defocus_A, Cs_A, lam, kmax):
    """k [1/Å] where sin(chi) = 0, chi = -pi lam df k^2 + pi/2 Cs lam^3 k^4 (abTEM sign)."""
    k = np.linspace(1e-4, kmax, 400_000)
    chi = -np.pi * lam * defocus_A * k**2 + 0.5 * np.pi * Cs_A * lam**3 * k**4
    s = np.sin(chi)
    idx = np.nonzero(np.sign(s[1:]) != np.sign(s[:-1]))[0]
    return k[idx]


@pytest.mark.slow
def test_thon_rings_sit_at_analytic_ctf_zeros():
    cfg = SimulationConfig(
        image_size_px=512,
        sampling_A=0.2,
        sim_sampling_A=0.2,
        n_phonons=1,
        particles_per_image=(0, 0),
        substrate_thickness_nm=(3, 3),
        Cs_A=1e7,
        focal_spread_A=0,
        dose_e_per_A2=None,
        defocus_jitter_nm=0,
    )
    spec = build_specimen(cfg, np.random.default_rng(1))
    assert len(spec.particle_atoms) == 0  # carbon only
    defoci = np.array([200.0, -200.0])  # +-20 nm, opposite signs
    images = defocus_series(exit_waves(spec.atoms, cfg, 1), cfg, defoci)
    lam = wavelength_A(cfg.energy_eV)
    n, dk = cfg.image_size_px, 1 / cfg.extent_A
    k = np.fft.fftfreq(n, cfg.sampling_A)
    kr = np.hypot(*np.meshgrid(k, k))
    bins = np.round(kr / dk).astype(int)
    kk = np.arange(bins.max() + 1) * dk
    window = (kk > 0.22) & (kk < 0.7)  # zeros are > 3 bins apart below 0.65 1/Å
    for df, im in zip(defoci, images, strict=True):
        psd = np.abs(np.fft.fft2(im - im.mean())) ** 2
        prof = np.bincount(bins.ravel(), psd.ravel()) / np.bincount(bins.ravel())
        minima = np.array([kk[i] for i in argrelmin(np.log(prof), order=2)[0] if window[i]])
        all_zeros = _analytic_zeros(df, cfg.Cs_A, lam, 1.0)
        # zeros resolvable by the radial profile: more than 3 bins from their neighbours
        gaps = np.diff(all_zeros)
        separated = np.r_[True, gaps > 3 * dk] & np.r_[gaps > 3 * dk, True]
        zeros = all_zeros[separated & (all_zeros > 0.25) & (all_zeros < 0.65)]
        assert len(zeros) >= 4 and len(minima) >= 4
        for z in zeros:  # every analytic zero has a PSD minimum within 3 %
            assert np.min(np.abs(minima - z)) / z < 0.03, (df, z, minima)
        for m in minima[(minima > 0.25) & (minima < 0.65)]:  # and every minimum is a zero
            assert np.min(np.abs(all_zeros - m)) / m < 0.03, (df, m, all_zeros)
        # the opposite sign convention would put the first zero elsewhere
        wrong = _analytic_zeros(-df, cfg.Cs_A, lam, 1.0)
        wrong = wrong[(wrong > 0.25) & (wrong < 0.65)]
        assert np.max([np.min(np.abs(minima - z)) / z for z in wrong]) > 0.03


def test_dose_mean_and_poisson_statistics():
    rng = np.random.default_rng(0)
    intensity = np.clip(rng.normal(1.0, 0.2, (256, 256)), 0.2, None).astype(np.float32)
    dose, s = 400.0, 0.2
    counts = apply_dose(intensity, dose, s, np.random.default_rng(1))
    assert counts.dtype == np.uint16
    lam = intensity * dose * s**2
    assert counts.mean() == pytest.approx(lam.mean(), rel=0.01)
    resid = (counts - lam) / np.sqrt(lam)
    assert resid.var() == pytest.approx(1.0, rel=0.05)  # Poisson: variance = mean
    assert apply_dose(intensity, None, s, rng).dtype == np.float32


def test_dose_on_simulated_images(small_dataset, small_config):
    # stored images are counts (not standardised): mean = dose x pixel area within 1 %
    expected = small_config.dose_e_per_A2 * small_config.sampling_A**2
    assert small_dataset.images.dtype.kind == "u"
    assert small_dataset.images.mean() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("material", ["CdSe", "Au"])
def test_mask_covers_every_atom_and_nothing_far(material):
    cfg = SimulationConfig(
        material=material, image_size_px=192, radius_nm=(0.8, 1.0), particles_per_image=(2, 2)
    )
    spec = build_specimen(cfg, np.random.default_rng(2))
    mask = particle_mask(spec.particle_atoms, cfg)
    assert mask.shape == (192, 192)
    xy = spec.particle_atoms.positions[:, :2]  # (x, y) [Å]
    # abTEM samples pixel j at j * sampling; images are stored (y, x)
    ix = np.round(xy / cfg.sampling_A).astype(int) % cfg.image_size_px
    assert mask[ix[:, 1], ix[:, 0]].all(), "a particle atom lies outside the mask"
    yy, xx = np.nonzero(mask)
    centres = np.c_[xx, yy] * cfg.sampling_A
    L = cfg.extent_A
    d = cKDTree(xy % L, boxsize=[L, L]).query(centres)[0]
    assert d.max() <= 3.5, f"mask pixel {d.max():.2f} Å from the nearest particle atom"


@pytest.mark.parametrize("material", ["CdSe", "Au"])
def test_mask_edge_sits_at_the_atoms_projected_radii(material):
    """The default binarisation level puts the mask's edge where the atoms' projected
    metallic/covalent radii end (the footprint of evaluation.independent), within 0.6 Å on
    average; the earlier level 0.02 put it more than 0.7 Å outside."""
    from napari_hrtem_transfer.evaluation.independent import footprint_mask

    cfg = SimulationConfig(
        material=material, image_size_px=256, radius_nm=(1.0, 1.4), particles_per_image=(2, 2)
    )
    pa = build_specimen(cfg, np.random.default_rng(5)).particle_atoms
    foot = footprint_mask(
        pa.positions[:, :2], np.array(pa.get_chemical_symbols()), cfg.sampling_A, (256, 256)
    )
    perimeter_A = (
        np.count_nonzero(foot[1:] != foot[:-1]) + np.count_nonzero(foot[:, 1:] != foot[:, :-1])
    ) * cfg.sampling_A * (np.pi / 4)

    def offset_A(level):
        mask = particle_mask(pa, cfg.model_copy(update={"mask_binarize_level": level}))
        return (mask.sum() - foot.sum()) * cfg.sampling_A**2 / perimeter_A

    assert abs(offset_A(cfg.mask_binarize_level)) < 0.6
    assert offset_A(0.02) > 0.7


def test_mask_independent_of_defocus_and_dose(small_config):
    from napari_hrtem_transfer.simulate import simulate_structure

    a = simulate_structure(small_config, 0)
    b = simulate_structure(
        small_config.model_copy(update={"defocus_nm": [25.0], "dose_e_per_A2": 30.0}), 0
    )
    assert np.array_equal(a["mask"], b["mask"])
    assert a["mask"].any()


@pytest.mark.slow
def test_zero_defocus_follows_the_particle_height():
    """Minimum-contrast focus moves with the particle: 2 nm more below it = +2 nm defocus."""
    import ase

    from napari_hrtem_transfer.simulate.physics import particle_reference
    from napari_hrtem_transfer.simulate.structures import particle

    cfg = SimulationConfig(image_size_px=128, focal_spread_A=0, defocus_jitter_nm=0)
    p = particle("CdSe", 8.0, np.random.default_rng(0))
    offsets = []
    for below in (10.0, 30.0):  # vacuum between the particle and the exit plane [Å]
        L = cfg.extent_A
        atoms = ase.Atoms(p.get_chemical_symbols(), p.positions + [L / 2, L / 2, 10.0],
                          cell=[L, L, 10.0 + 8.0 + below], pbc=True)
        mask, offset_A = particle_reference(atoms, cfg)
        assert mask.any()
        offsets.append(offset_A)
    # positive defocus = underfocus = focus above the exit plane (abTEM sign)
    assert offsets[0] > 0
    assert offsets[1] - offsets[0] == pytest.approx(20.0, abs=3.0)
    no_cal = cfg.model_copy(update={"calibrate_zero_defocus": False})
    assert particle_reference(atoms, no_cal)[1] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("material", ["Au", "CdSe"])
def test_zero_defocus_is_a_property_of_the_specimen_not_the_microscope(material):
    """The calibrated zero is the particles' focus under the defocus propagator alone.

    Across Cs = 0, 5 µm, 0.5 mm and 1.2 mm (with focal spread, and an aperture at the
    largest Cs) a structure's offset moves by < 0.5 nm; particles of the same size at the
    same height but different orientations scatter by < 1 nm and sit at their centre.
    """
    import ase

    from napari_hrtem_transfer.simulate.physics import particle_reference
    from napari_hrtem_transfer.simulate.structures import particle

    microscopes = [
        dict(Cs_A=0.0, focal_spread_A=0.0),
        dict(Cs_A=5e4, focal_spread_A=10.0),
        dict(Cs_A=5e6, focal_spread_A=30.0),
        dict(Cs_A=1.2e7, focal_spread_A=40.0, semiangle_cutoff_mrad=20.0),
    ]
    size, radius_A, below_A = 112, 7.0, 12.0  # 22.4 Å field of view
    offsets = np.zeros((3, len(microscopes)))
    for i in range(3):  # three orientations of the same geometry
        p = particle(material, radius_A, np.random.default_rng(10 + i))
        for j, kw in enumerate(microscopes):
            cfg = SimulationConfig(material=material, image_size_px=size, **kw)
            L = cfg.extent_A
            atoms = ase.Atoms(
                p.get_chemical_symbols(),
                p.positions + [L / 2, L / 2, 2.0 + radius_A],
                cell=[L, L, 2.0 + 2 * radius_A + below_A],
                pbc=True,
            )
            offsets[i, j] = particle_reference(atoms, cfg)[1]
    assert np.ptp(offsets, axis=1).max() < 5.0, offsets  # across microscopes, < 0.5 nm
    assert np.ptp(offsets[:, 0]) < 10.0, offsets  # across structures, < 1 nm
    # focus near the particle centre: radius + vacuum below it above the exit plane
    assert offsets.mean() == pytest.approx(radius_A + below_A, abs=5.0)
