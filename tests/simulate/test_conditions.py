"""Per-image imaging conditions, the real-sessions preset, Pt/Pd lattices, overlapping particles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_hrtem_transfer._cli import simulate as sim_cli
from napari_hrtem_transfer.simulate import SimulationConfig, simulate_dataset
from napari_hrtem_transfer.simulate.conditions import (
    PER_IMAGE_FIELDS,
    draw_conditions,
    form_images,
)
from napari_hrtem_transfer.simulate.physics import (
    defocus_series,
    exit_waves,
    particle_reference,
)
from napari_hrtem_transfer.simulate.structures import (
    LATTICES,
    build_specimen,
    particle,
)

RANGES = dict(
    dose_range_e_per_A2=(50.0, 1000.0),
    Cs_range_A=(-2e5, 2e5),
    focal_spread_range_A=(5.0, 40.0),
    drift_length_A=(0.5, 3.0),
    illumination_amplitude=(0.05, 0.3),
    detector_mtf_width_nyquist=(0.2, 0.5),
)


def _tiny(**kw) -> SimulationConfig:
    base = dict(
        material="Au", n_structures=2, image_size_px=64, sampling_A=0.5, sim_sampling_A=0.25,
        n_phonons=1, particles_per_image=(1, 1), radius_nm=(0.5, 0.6),
        substrate_thickness_nm=(0.5, 0.5), defocus_nm=[-10.0, 0.0, 10.0],
        calibrate_zero_defocus=False, seed=3,
    )
    return SimulationConfig(**{**base, **kw})


def test_drawn_conditions_lie_in_their_ranges_and_dose_is_log_uniform():
    cfg = _tiny(**RANGES)
    c = draw_conditions(cfg, 20_000, np.random.default_rng(0))
    assert set(c) == set(PER_IMAGE_FIELDS)
    for field, key in [
        ("dose_range_e_per_A2", "dose_e_per_A2"), ("Cs_range_A", "Cs_A"),
        ("focal_spread_range_A", "focal_spread_A"), ("drift_length_A", "drift_length_A"),
        ("illumination_amplitude", "illumination_amplitude"),
        ("detector_mtf_width_nyquist", "detector_mtf_width_nyquist"),
    ]:
        lo, hi = getattr(cfg, field)
        assert c[key].min() >= lo and c[key].max() <= hi, key
    assert 0 <= c["drift_angle_deg"].min() and c["drift_angle_deg"].max() < 180
    # log-uniform: log(dose) is uniform, so half the draws lie below the geometric mean
    assert np.mean(c["dose_e_per_A2"] < np.sqrt(50 * 1000)) == pytest.approx(0.5, abs=0.02)
    u = (np.log(c["dose_e_per_A2"]) - np.log(50)) / np.log(20)
    assert np.histogram(u, 10, (0, 1))[0].min() > 0.9 * 2000
    # no range: every image at the scalar value
    plain = draw_conditions(_tiny(), 5, np.random.default_rng(0))
    assert np.all(plain["dose_e_per_A2"] == 400) and np.all(plain["Cs_A"] == 5e4)


def test_dataset_records_each_images_conditions_and_a_seeded_run_repeats():
    cfg = _tiny(detector="scintillator", **RANGES)
    a, b = simulate_dataset(cfg), simulate_dataset(cfg)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.info["per_image"] == b.info["per_image"]
    rec = {k: np.asarray(v, float) for k, v in a.info["per_image"].items()}
    assert set(rec) == set(PER_IMAGE_FIELDS) == set(a.info["per_image_units"])
    assert all(v.shape == (3, 2) for v in rec.values())  # (n_defocus, n_images)
    assert rec["dose_e_per_A2"].min() >= 50 and rec["dose_e_per_A2"].max() <= 1000
    assert len(np.unique(rec["Cs_A"])) == 6  # a draw per image
    assert a.images.dtype == np.float32
    # mean counts follow each image's own dose (vacuum-dominated small field: I ~ 1)
    means = np.asarray(a.images, float).mean(axis=(2, 3))
    expected = rec["dose_e_per_A2"] * cfg.sampling_A**2
    np.testing.assert_allclose(means / expected, 1.0, atol=0.12)
    assert a.dose_e_per_A2 == pytest.approx(np.sqrt(50 * 1000))
    other = simulate_dataset(cfg.model_copy(update={"seed": 4}))
    assert other.info["per_image"] != a.info["per_image"]


def test_defaults_record_nothing_per_image_and_keep_integer_counts():
    ds = simulate_dataset(_tiny(n_structures=1))
    assert "per_image" not in ds.info
    assert ds.images.dtype == np.uint16 and ds.dose_e_per_A2 == 400


def test_each_image_gets_the_ctf_of_its_own_cs_and_focal_spread():
    cfg = _tiny(dose_e_per_A2=None, Cs_range_A=(-2e5, 2e5), focal_spread_range_A=(5.0, 40.0))
    spec = build_specimen(cfg, np.random.default_rng(0))
    waves = exit_waves(spec.atoms, cfg, 1)
    defocus_A = np.array([-100.0, 0.0, 100.0])
    cond = draw_conditions(cfg, 3, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    images = form_images(waves, cfg, defocus_A, cond, rng, rng)
    for j in range(3):
        ref = defocus_series(
            waves, cfg, defocus_A[j : j + 1], Cs_A=cond["Cs_A"][j],
            focal_spread_A=cond["focal_spread_A"][j],
        )[0]
        np.testing.assert_allclose(images[j], ref, rtol=1e-5, atol=1e-6)
    nominal = defocus_series(waves, cfg, defocus_A[:1])[0]
    assert np.abs(images[0] - nominal).max() > 1e-3  # the draw changed the image


@pytest.mark.parametrize("material", ["Pt", "Pd", "Au", "Ag"])
def test_fcc_particles_have_the_lattices_nearest_neighbour_distance(material):
    p = particle(material, 12.0, np.random.default_rng(5))
    d = cKDTree(p.positions).query(p.positions, k=2)[0][:, 1]
    a = LATTICES[material]["a"]
    assert d.min() == pytest.approx(a / np.sqrt(2), rel=1e-6)
    assert np.median(d) == pytest.approx(a / np.sqrt(2), rel=1e-6)
    assert np.linalg.norm(p.positions, axis=1).max() <= 12.0
    assert set(p.get_chemical_symbols()) == {material}


def _overlapping_specimen(cfg):
    for seed in range(200):
        spec = build_specimen(cfg, np.random.default_rng(seed))
        if len(spec.radii_A) == 2:
            gap = np.linalg.norm(spec.centres_A[0] - spec.centres_A[1]) - spec.radii_A.sum()
            if gap < -3.0:
                return spec
    raise AssertionError("no overlapping pair placed in 200 seeds")


def test_overlapping_particles_merge_and_their_mask_is_the_union():
    cfg = _tiny(
        image_size_px=96, sampling_A=0.4, sim_sampling_A=0.2, particles_per_image=(2, 2),
        radius_nm=(1.0, 1.0), min_separation_nm=-1.0, substrate_thickness_nm=(0, 0),
    )
    spec = _overlapping_specimen(cfg)
    pos = spec.particle_atoms.positions
    d_nn = LATTICES["Au"]["a"] / np.sqrt(2)
    assert cKDTree(pos).query(pos, k=2)[0][:, 1].min() >= 0.75 * d_nn - 1e-9
    # (two interpenetrating lattices would put atoms far closer than that)
    # the first particle is complete: fcc density 4 / a^3 over its sphere
    c0, c1 = spec.centres_A
    in0 = np.linalg.norm(pos - c0, axis=1) <= spec.radii_A[0] + 1e-9
    in1 = np.linalg.norm(pos - c1, axis=1) <= spec.radii_A[1] + 1e-9
    assert np.all(in0 | in1)
    full = 4 / LATTICES["Au"]["a"] ** 3 * 4 / 3 * np.pi * spec.radii_A[0] ** 3
    assert in0.sum() == pytest.approx(full, rel=0.15)
    both = particle_reference(spec.particle_atoms, cfg)[0]
    first = particle_reference(spec.particle_atoms[np.nonzero(in0)[0]], cfg)[0]
    second = particle_reference(spec.particle_atoms[np.nonzero(~in0)[0]], cfg)[0]
    union = first | second
    iou = (both & union).sum() / (both | union).sum()
    assert iou > 0.97, iou
    from scipy import ndimage

    assert ndimage.label(both)[1] == 1  # one merged cluster


def test_negative_separation_still_keeps_every_centre_outside_the_other_particles():
    from napari_hrtem_transfer.simulate.structures import place_particles

    radii = np.array([40.0, 10.0, 10.0, 10.0])
    xy, r = place_particles(4, radii, 150.0, -15.0, np.random.default_rng(0))
    for i in range(len(r)):
        for j in range(i):
            d = np.linalg.norm(xy[i] - xy[j])
            assert d >= max(r[i], r[j]) and d >= r[i] + r[j] - 15.0 - 1e-9


def test_real_sessions_preset_covers_12_nm_particles_at_its_pixel_sizes():
    for s, n in [(0.2, 768), (0.25, 640), (0.3, 512), (0.4, 384)]:
        cfg = SimulationConfig.from_preset("real_sessions", sampling_A=s)
        assert cfg.image_size_px == n  # the preset keeps its field of view
        assert cfg.extent_A >= 2 * cfg.radius_nm[1] * 10 + 10  # 12 nm + 0.5 nm margins
        assert cfg.sim_sampling_A <= s and cfg.varies_per_image
    cfg = SimulationConfig.from_preset("real_sessions")
    assert cfg.dose_range_e_per_A2 == (50.0, 1000.0) and cfg.substrate_thickness_nm == (2, 15)
    assert cfg.radius_nm[1] == 6.0 and cfg.min_separation_nm < 0
    assert SimulationConfig.from_preset("real_sessions", image_size_px=256).image_size_px == 256


def test_new_flags_set_their_fields():
    import argparse

    p = argparse.ArgumentParser()
    sim_cli.add_arguments(p)
    args = p.parse_args([
        "--out", "x.hspy", "--preset", "real_sessions", "--material", "pd",
        "--dose-range", "80", "900", "--cs-range", "-0.01", "0.03",
        "--focal-spread-range", "3", "9", "--drift", "1", "2", "--illumination", "0.1",
        "--illumination-cutoff", "3", "--illumination-period", "80",
        "--detector", "counting", "--mtf-width", "0.25", "0.4",
        "--mtf-floor", "0.05", "--dqe0", "0.7", "--min-separation", "-0.5",
        "--substrate", "Si3N4",
    ])
    cfg = sim_cli.config_from_args(args)
    assert cfg.material == "Pd" and cfg.dose_range_e_per_A2 == (80, 900)
    assert cfg.Cs_range_A == pytest.approx((-1e5, 3e5))  # mm -> Å
    assert cfg.focal_spread_range_A == (3, 9) and cfg.drift_length_A == (1, 2)
    assert cfg.illumination_amplitude == (0.1, 0.1) and cfg.illumination_cutoff_cycles == 3
    assert cfg.illumination_period_nm == 80
    assert cfg.detector == "counting" and cfg.detector_mtf_width_nyquist == (0.25, 0.4)
    assert cfg.detector_mtf_floor == 0.05 and cfg.detector_dqe0 == 0.7
    assert cfg.min_separation_nm == -0.5 and cfg.substrate_material == "Si3N4"


@pytest.mark.parametrize(
    "bad",
    [
        {"dose_range_e_per_A2": (0, 10)},
        {"dose_range_e_per_A2": (100, 10)},
        {"illumination_amplitude": (0.1, 1.0)},
        {"focal_spread_range_A": (-1, 5)},
        {"detector": "film"},
    ],
)
def test_bad_imaging_ranges_are_refused(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SimulationConfig(**bad)


def test_silicon_nitride_support_has_its_composition_density_and_minimum_distance():
    from napari_hrtem_transfer.simulate.structures import SUPPORTS, amorphous_support

    L, t = 40.0, 30.0
    pos, symbols = amorphous_support("Si3N4", L, t, np.random.default_rng(0))
    n_si, n_n = symbols.count("Si"), symbols.count("N")
    assert n_si + n_n == len(pos) and abs(n_si / len(pos) - 3 / 7) < 1e-3
    mass_g = (n_si * 28.0855 + n_n * 14.007) / 6.02214076e23
    assert mass_g / (L * L * t * 1e-24) == pytest.approx(3.1, rel=0.01)
    d = cKDTree(pos, boxsize=[L, L, 1e6]).query(pos, k=2)[0][:, 1]
    assert d.min() >= SUPPORTS["Si3N4"]["min_distance_A"] - 1e-9
    cfg = _tiny(substrate_material="Si3N4", substrate_thickness_nm=(1.0, 1.0))
    spec = build_specimen(cfg, np.random.default_rng(1))
    film = set(spec.atoms.get_chemical_symbols()) - set(spec.particle_atoms.get_chemical_symbols())
    assert film == {"Si", "N"}


@pytest.mark.parametrize("material", ["CdSe", "ZnS"])
def test_wurtzite_particles_have_tetrahedral_bonds_between_unlike_atoms(material):
    p = particle(material, 12.0, np.random.default_rng(5))
    d, j = cKDTree(p.positions).query(p.positions, k=2)
    bond = LATTICES[material]["a"] * np.sqrt(3 / 8)  # ideal tetrahedral bond length
    assert np.median(d[:, 1]) == pytest.approx(bond, rel=5e-3)
    symbols = np.asarray(p.get_chemical_symbols())
    assert np.all(symbols[j[:, 1]] != symbols)  # every nearest neighbour is the other species


def test_particles_reference_cell_gives_the_full_cells_mask_and_zero_defocus():
    """Skipping the empty slices under the film is one free-space propagation: same result."""
    cfg = _tiny(
        image_size_px=96, sampling_A=0.4, sim_sampling_A=0.2, radius_nm=(0.8, 0.8),
        substrate_thickness_nm=(6.0, 6.0), calibrate_zero_defocus=True,
    )
    spec = build_specimen(cfg, np.random.default_rng(2))
    full_mask, full_zero = particle_reference(spec.particle_atoms, cfg)
    cut = cfg.model_copy(update={"reference_cell": "particles"})
    from napari_hrtem_transfer.simulate.physics import _particles_cell

    assert _particles_cell(spec.particle_atoms, cut)[1] > 50  # most of the cell is skipped
    mask, zero = particle_reference(spec.particle_atoms, cut)
    assert abs(zero - full_zero) <= 0.5  # the fine scan's step [Å]
    assert (mask != full_mask).sum() <= 0.005 * mask.size
    assert abs(full_zero) > 50  # the focus lies far from the exit plane: a real check
