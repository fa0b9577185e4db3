"""Structures: lattices, particles, placement and the amorphous carbon film."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_hrtem_transfer.simulate import MATERIALS, SimulationConfig
from napari_hrtem_transfer.simulate.structures import (
    LATTICES,
    amorphous_carbon,
    build_specimen,
    particle,
    place_particles,
    unit_cell,
)

# atoms per conventional cell and formula ratio
EXPECTED = {
    "CdSe": (4, {"Cd": 2, "Se": 2}),
    "ZnS": (4, {"Zn": 2, "S": 2}),
    "Au": (4, {"Au": 4}),
    "Cu": (4, {"Cu": 4}),
    "Ag": (4, {"Ag": 4}),
    "Pt": (4, {"Pt": 4}),
    "Pd": (4, {"Pd": 4}),
    "C": (8, {"C": 8}),
    "Si": (8, {"Si": 8}),
    "Fe": (2, {"Fe": 2}),
    "Fe3O4": (56, {"Fe": 24, "O": 32}),
    "Co3O4": (56, {"Co": 24, "O": 32}),
}


def test_all_study_lattices_available():
    assert set(MATERIALS) == set(LATTICES) == set(EXPECTED)


@pytest.mark.parametrize("material", sorted(EXPECTED))
def test_unit_cells(material):
    cell = unit_cell(material)
    n, counts = EXPECTED[material]
    assert len(cell) == n
    symbols = cell.get_chemical_symbols()
    assert {s: symbols.count(s) for s in set(symbols)} == counts
    # nearest-neighbour distances are physical (no overlapping atoms from a wrong setting)
    d = cell.get_all_distances(mic=True)
    assert d[d > 0].min() > 1.5


@pytest.mark.parametrize("material", ["CdSe", "Au", "Fe3O4"])
def test_particle_is_a_sphere_of_the_lattice(material):
    rng = np.random.default_rng(3)
    r = 12.0
    p = particle(material, r, rng)
    dist = np.linalg.norm(p.positions, axis=1)
    assert dist.max() <= r + 1e-9
    assert dist.max() > r - 2.0  # filled to the surface
    # number density matches the bulk lattice within 15 % (surface effects)
    cell = unit_cell(material)
    bulk_density = len(cell) / cell.get_volume()
    assert len(p) / (4 / 3 * np.pi * r**3) == pytest.approx(bulk_density, rel=0.15)


def test_particles_at_least_the_gap_apart():
    rng = np.random.default_rng(0)
    radii = np.array([15.0, 12.0, 10.0, 10.0, 8.0])
    centres, used = place_particles(5, radii, 100.0, 10.0, rng)
    assert len(centres) >= 3
    for i in range(len(centres)):
        assert np.all(centres[i] >= used[i]) and np.all(centres[i] <= 100 - used[i])
        for j in range(i):
            gap = np.linalg.norm(centres[i] - centres[j]) - used[i] - used[j]
            assert gap >= 10.0 - 1e-9


def test_amorphous_carbon_density_and_min_distance():
    rng = np.random.default_rng(1)
    L, t = 40.0, 20.0
    pos = amorphous_carbon(L, t, rng, density_g_cm3=2.0, min_distance_A=1.4)
    n_expected = 2.0 / 12.011 * 6.02214076e23 * 1e-24 * L * L * t
    assert len(pos) == pytest.approx(n_expected, abs=1)
    assert pos[:, :2].min() >= 0 and pos[:, :2].max() < L and pos[:, 2].max() < t
    # minimum distance holds across the periodic x/y boundaries too
    d, _ = cKDTree(pos, boxsize=[L, L, 10 * t]).query(pos, k=2)
    assert d[:, 1].min() >= 1.4 - 1e-9


def test_specimen_geometry():
    cfg = SimulationConfig(image_size_px=256, particles_per_image=(3, 3), radius_nm=(0.8, 1.0))
    s = build_specimen(cfg, np.random.default_rng(5))
    L = cfg.extent_A
    assert np.allclose(s.atoms.cell.lengths()[:2], [L, L])
    assert len(s.particle_atoms) < len(s.atoms)
    xy = s.particle_atoms.positions[:, :2]
    assert xy.min() >= 0 and xy.max() <= L
    assert 20 <= s.substrate_thickness_A <= 30


def test_same_rng_same_specimen():
    cfg = SimulationConfig()
    a = build_specimen(cfg, np.random.default_rng(11))
    b = build_specimen(cfg, np.random.default_rng(11))
    assert np.array_equal(a.atoms.positions, b.atoms.positions)


@pytest.mark.parametrize("material", ["Au", "CdSe"])
def test_stacking_faults_shift_lattice_planes(material):
    from napari_hrtem_transfer.simulate.structures import add_stacking_faults

    cell_atoms = unit_cell(material).repeat((6, 6, 6))
    cell = np.asarray(unit_cell(material).cell)
    pos = cell_atoms.positions - cell_atoms.positions.mean(axis=0)
    faulted, n = add_stacking_faults(pos, material, cell, 2, 10.0, np.random.default_rng(0))
    assert n == 2
    # faulted atoms leave the perfect lattice: fractional coordinates no longer match the basis
    basis = np.linalg.solve(cell.T, unit_cell(material).positions.T).T % 1.0
    frac = np.linalg.solve(cell.T, (faulted - pos[0]).T).T % 1.0
    on_site = [np.min(np.linalg.norm(((f - basis + 0.5) % 1.0) - 0.5, axis=1)) < 1e-6 for f in frac]
    assert 0 < np.sum(~np.asarray(on_site)) < len(pos)
    # ... but no atoms come closer than in the perfect crystal
    d0 = cKDTree(pos).query(pos, k=2)[0][:, 1].min()
    d1 = cKDTree(faulted).query(faulted, k=2)[0][:, 1].min()
    assert d1 >= 0.99 * d0


def test_no_faults_for_lattices_without_a_fault_model():
    from napari_hrtem_transfer.simulate.structures import add_stacking_faults

    pos = unit_cell("Fe").repeat((4, 4, 4)).positions
    out, n = add_stacking_faults(pos, "Fe", np.asarray(unit_cell("Fe").cell), 2, 5.0,
                                 np.random.default_rng(0))
    assert n == 0 and np.array_equal(out, pos)


def test_specimen_records_stacking_faults():
    cfg = SimulationConfig(material="Au", image_size_px=256, particles_per_image=(2, 2),
                           radius_nm=(0.9, 1.0), stacking_faults=(1, 2))
    s = build_specimen(cfg, np.random.default_rng(4))
    assert len(s.stacking_faults) == len(s.radii_A)
    assert all(1 <= k <= 2 for k in s.stacking_faults)


def test_core_errors_name_config_fields_not_flags():
    """The core speaks its config's language; front ends reword it (see test_config)."""
    from napari_hrtem_transfer.errors import ConfigError

    cfg = SimulationConfig(image_size_px=64, radius_nm=(1.5, 1.5))  # 3 nm particles, 1.28 nm view
    with pytest.raises(ConfigError) as info:
        build_specimen(cfg, np.random.default_rng(0))
    err = info.value
    assert err.field == "radius_nm" and "image_size_px" in err.fields
    assert "image_size_px" in str(err) and "radius_nm" in str(err) and "--" not in str(err)
    with pytest.raises(ConfigError) as info:
        amorphous_carbon(20.0, 10.0, np.random.default_rng(0), density_g_cm3=4.0,
                         min_distance_A=3.0)
    err = info.value
    assert err.field == "substrate_density_g_cm3" and "substrate_min_distance_A" in err.fields
    assert "--" not in str(err)
