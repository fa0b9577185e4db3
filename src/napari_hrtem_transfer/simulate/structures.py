"""Atomic structures: crystalline nanoparticles on amorphous carbon (numpy + ase).

All lengths in Å.  Every function takes a :class:`numpy.random.Generator` so that the same seed
gives the same structure on any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: Lattice parameters [Å] (room temperature literature values).
LATTICES: dict[str, dict] = {
    "CdSe": dict(kind="wurtzite", symbols="CdSe", a=4.299, c=7.010),
    "ZnS": dict(kind="wurtzite", symbols="ZnS", a=3.820, c=6.260),
    "Au": dict(kind="fcc", symbols="Au", a=4.078),
    "Cu": dict(kind="fcc", symbols="Cu", a=3.615),
    "Ag": dict(kind="fcc", symbols="Ag", a=4.086),
    "Pt": dict(kind="fcc", symbols="Pt", a=3.924),
    "Pd": dict(kind="fcc", symbols="Pd", a=3.891),
    "C": dict(kind="diamond", symbols="C", a=3.567),
    "Si": dict(kind="diamond", symbols="Si", a=5.431),
    "Fe": dict(kind="bcc", symbols="Fe", a=2.8665),
    "Fe3O4": dict(kind="spinel", symbols=("Fe", "Fe", "O"), a=8.396, u=0.2549),
    "Co3O4": dict(kind="spinel", symbols=("Co", "Co", "O"), a=8.084, u=0.2632),
}

_AVOGADRO = 6.02214076e23
_CARBON_MASS_G_MOL = 12.011

#: Amorphous supports other than carbon: composition, density [g/cm³], mean atomic mass
#: [g/mol] and minimum interatomic distance [Å] of the random packing.
SUPPORTS: dict[str, dict] = {
    "Si3N4": dict(
        symbols=("Si", "N"), fractions=(3 / 7, 4 / 7), density_g_cm3=3.1,
        mass_g_mol=(3 * 28.0855 + 4 * 14.007) / 7, min_distance_A=1.6,
    ),
}


def unit_cell(material: str):
    """The conventional unit cell of ``material`` as :class:`ase.Atoms`."""
    from ase.build import bulk
    from ase.spacegroup import crystal

    try:
        p = LATTICES[material]
    except KeyError:
        raise ConfigError(
            f"material {material!r} is unknown; choose one of {', '.join(LATTICES)}", "material"
        ) from None
    if p["kind"] == "wurtzite":
        return bulk(p["symbols"], "wurtzite", a=p["a"], c=p["c"])
    if p["kind"] == "spinel":
        a, u = p["a"], p["u"]
        # Fd-3m, origin choice 2: A on 8a, B on 16d, O on 32e (u, u, u)
        return crystal(
            p["symbols"],
            basis=[(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (u, u, u)],
            spacegroup=227,
            setting=2,
            cellpar=[a, a, a, 90, 90, 90],
        )
    return bulk(p["symbols"], p["kind"], a=p["a"], cubic=True)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3)."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix()


def _fault_geometry(material: str, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Plane normal, fault (partial) vector [Å] and the largest eligible plane gap [Å].

    Wurtzite: faults on (0001) with the shift (a1 + 2 a2)/3, cut only in the short c/8 gaps
    between layers of different stacking letter.  fcc: faults on (111) with the Shockley
    partial a/6 [1 1 -2].  Other lattices: None (no stacking faults).
    """
    kind = LATTICES[material]["kind"]
    if kind == "wurtzite":
        c = cell[2]
        return c / np.linalg.norm(c), (cell[0] + 2 * cell[1]) / 3, 0.25 * np.linalg.norm(c)
    if kind == "fcc":
        a = LATTICES[material]["a"]
        return np.ones(3) / np.sqrt(3), a / 6 * np.array([1.0, 1.0, -2.0]), np.inf
    return None


def add_stacking_faults(
    positions: np.ndarray, material: str, cell: np.ndarray, n_faults: int, radius_A: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Insert up to ``n_faults`` stacking faults into lattice ``positions`` (centred on 0).

    Every atom above a randomly chosen lattice plane (within 0.6 radius of the centre) is
    translated by the fault vector, which changes the stacking sequence there and keeps all
    interatomic distances physical.

    Returns
    -------
    tuple
        New positions [Å] and the number of faults inserted.
    """
    geom = _fault_geometry(material, cell)
    if geom is None or n_faults <= 0:
        return positions, 0
    from scipy.spatial import cKDTree

    normal, vector, max_gap = geom
    pos = positions.copy()
    d_min = cKDTree(pos).query(pos, k=2)[0][:, 1].min()
    done = 0
    for _ in range(n_faults):
        h = pos @ normal
        planes = np.unique(np.round(h[np.abs(h) < radius_A + 3.0], 2))
        mids = 0.5 * (planes[1:] + planes[:-1])
        gaps = np.diff(planes)
        ok = (np.abs(mids) < 0.6 * radius_A) & (gaps > 0.3) & (gaps < max_gap)
        if not ok.any():
            break
        d = rng.choice(mids[ok])
        above = h > d
        near = np.abs(h - d) < 4.0
        # of the two opposite partials, take the one that does not put an atom on top of the
        # plane below (the stacking letter above must differ from the one below)
        for v in (vector, -vector) if rng.random() < 0.5 else (-vector, vector):
            moved = pos[above & near] + v
            if cKDTree(pos[~above & near]).query(moved)[0].min() >= 0.95 * d_min:
                pos[above] += v
                done += 1
                break
    return pos, done


def particle(
    material: str, radius_A: float, rng: np.random.Generator, n_faults: int = 0
):
    """A sphere of radius ``radius_A`` [Å] cut from ``material`` at a random orientation.

    Parameters
    ----------
    material
        One of :data:`LATTICES`.
    radius_A
        Radius [Å].
    rng
        Random generator (orientation, lattice offset, fault planes).
    n_faults
        Stacking faults to insert (wurtzite and fcc lattices only; ignored otherwise).

    Returns
    -------
    ase.Atoms
        Atoms centred on the origin (no cell); ``atoms.info["stacking_faults"]`` holds the
        number of faults inserted.
    """
    cell_atoms = unit_cell(material)
    cell = np.asarray(cell_atoms.cell)
    volume = abs(np.linalg.det(cell))
    heights = [
        volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)
    ]
    reps = [int(np.ceil((2 * radius_A + 4.0) / h)) + 1 for h in heights]
    sup = cell_atoms.repeat(reps)
    centre = 0.5 * np.asarray(sup.cell).sum(axis=0)
    # random offset of the lattice inside the sphere, then a random orientation
    shift = rng.uniform(0, 1, 3) @ cell
    pos = sup.positions - centre - shift
    pos, n_done = add_stacking_faults(pos, material, cell, n_faults, radius_A, rng)
    pos = pos @ random_rotation(rng).T
    keep = np.linalg.norm(pos, axis=1) <= radius_A
    out = sup[keep]
    out.positions = pos[keep]
    out.cell = None
    out.pbc = False
    out.info["stacking_faults"] = n_done
    return out


def amorphous_carbon(
    extent_A: float,
    thickness_A: float,
    rng: np.random.Generator,
    density_g_cm3: float = 2.0,
    min_distance_A: float = 1.4,
    batch: int = 4096,
) -> np.ndarray:
    """Random close packing of carbon atoms, periodic in x and y.

    Random sequential addition: candidates closer than ``min_distance_A`` to an accepted atom
    (across the periodic x/y boundaries too) are rejected until the density is reached.
    Films of more than 100 000 atoms add candidates in batches of n/16 (the accepted atoms'
    tree is rebuilt once per batch, so the cost stays near linear in the thickness).

    Returns
    -------
    numpy.ndarray
        Positions (n, 3) [Å], x and y in [0, extent_A), z in [0, thickness_A).
    """
    return _random_packing(
        extent_A, thickness_A, rng, density_g_cm3, _CARBON_MASS_G_MOL, min_distance_A, batch
    )


def amorphous_support(
    material: str, extent_A: float, thickness_A: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """An amorphous film of ``material`` (a key of :data:`SUPPORTS`): positions [Å], symbols.

    Random packing as :func:`amorphous_carbon` at the support's density and minimum distance;
    the species are then assigned at random in the stoichiometric fractions.
    """
    p = SUPPORTS[material]
    pos = _random_packing(
        extent_A, thickness_A, rng, p["density_g_cm3"], p["mass_g_mol"], p["min_distance_A"]
    )
    counts = np.round(np.asarray(p["fractions"]) * len(pos)).astype(int)
    counts[-1] = len(pos) - counts[:-1].sum()
    symbols = np.repeat(np.asarray(p["symbols"]), counts)
    return pos, rng.permutation(symbols).tolist()


def _random_packing(
    extent_A: float,
    thickness_A: float,
    rng: np.random.Generator,
    density_g_cm3: float,
    mass_g_mol: float,
    min_distance_A: float,
    batch: int = 4096,
) -> np.ndarray:
    """Random sequential addition of atoms of mean mass ``mass_g_mol`` (see amorphous_carbon)."""
    from scipy.spatial import cKDTree

    if thickness_A <= 0:
        return np.zeros((0, 3))
    number_density = density_g_cm3 / mass_g_mol * _AVOGADRO * 1e-24  # atoms / Å³
    n_target = int(round(number_density * extent_A**2 * thickness_A))
    packing = n_target * (np.pi / 6) * min_distance_A**3 / (extent_A**2 * thickness_A)
    if packing > 0.3:
        raise ConfigError(
            f"a carbon density of {density_g_cm3} g/cm³ (substrate_density_g_cm3) with a "
            f"minimum C–C distance of {min_distance_A} Å (substrate_min_distance_A) cannot be "
            f"packed at random (packing fraction {packing:.2f} > 0.3); lower "
            "substrate_density_g_cm3 or substrate_min_distance_A",
            "substrate_density_g_cm3",
            fields=("substrate_min_distance_A",),
        )
    box = np.array([extent_A, extent_A, thickness_A + 4 * min_distance_A])
    if n_target > 100_000:
        batch = max(batch, n_target // 16)
    accepted = np.zeros((0, 3))
    for _ in range(10_000):
        need = n_target - len(accepted)
        if need <= 0:
            break
        cand = rng.uniform(0, 1, (min(batch, 2 * need + 64), 3)) * [extent_A, extent_A, thickness_A]
        if len(accepted):
            d, _ = cKDTree(accepted, boxsize=box).query(
                cand, k=1, distance_upper_bound=min_distance_A
            )
            cand = cand[~np.isfinite(d) | (d >= min_distance_A)]
        if len(cand) > 1:
            pairs = cKDTree(cand, boxsize=box).query_pairs(min_distance_A, output_type="ndarray")
            if len(pairs):
                drop = np.zeros(len(cand), bool)
                drop[pairs.max(axis=1)] = True
                cand = cand[~drop]
        accepted = np.concatenate([accepted, cand[:need]])
    return accepted[:n_target]


@dataclass
class Specimen:
    """One structure: particles (optionally) on a carbon film, in a periodic cell.

    Attributes
    ----------
    atoms
        Everything (particles + substrate), :class:`ase.Atoms` with cell (L, L, Lz), pbc.
    particle_atoms
        The particles alone, same cell and positions (used for the ground-truth mask).
    centres_A, radii_A
        Particle centres (n, 3) and radii (n,) [Å].
    substrate_thickness_A
        Carbon thickness [Å].
    stacking_faults
        Stacking faults inserted in each particle.
    """

    atoms: object
    particle_atoms: object
    centres_A: np.ndarray
    radii_A: np.ndarray
    substrate_thickness_A: float
    stacking_faults: list | None = None


def place_particles(
    n: int,
    radii_A: np.ndarray,
    extent_A: float,
    min_gap_A: float,
    rng: np.random.Generator,
    tries: int = 2000,
    edge_A: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Place up to ``n`` discs inside the field of view with gaps of at least ``min_gap_A``.

    Particles keep ``edge_A`` [Å] from the borders, so that nothing of them (or of their
    mask) wraps around the periodic cell.  Particles that do not fit after ``tries`` attempts
    are dropped (the number placed is recorded with the dataset).  A negative ``min_gap_A``
    lets discs overlap by up to ``-min_gap_A``, but no centre lies inside another disc.

    Returns
    -------
    tuple of numpy.ndarray
        Centres (m, 2) [Å] and radii (m,) [Å] of the placed particles, m <= n.
    """
    centres: list[np.ndarray] = []
    used: list[float] = []
    for r in radii_A[:n]:
        lo, hi = r + edge_A, extent_A - r - edge_A
        if hi <= lo:
            continue
        for _ in range(tries):
            c = rng.uniform(lo, hi, 2)
            if all(
                np.linalg.norm(c - c2) >= max(r + r2 + min_gap_A, r, r2)
                for c2, r2 in zip(centres, used, strict=True)
            ):
                centres.append(c)
                used.append(float(r))
                break
    return np.array(centres).reshape(-1, 2), np.array(used)


def _outside_earlier(
    pos: np.ndarray, earlier: list[np.ndarray], centres: list, radii: np.ndarray
) -> np.ndarray:
    """Which atoms ``pos`` (n, 3) [Å] of a new particle may join the particles placed before.

    Atoms inside an earlier particle's sphere, or closer than 0.75 times the new lattice's
    nearest-neighbour distance to an earlier atom, are dropped: overlapping particles merge
    into one cluster with a grain boundary (their mask is the union).  All True when no
    earlier particle reaches the new one.
    """
    keep = np.ones(len(pos), bool)
    if not earlier or len(pos) < 2:
        return keep
    from scipy.spatial import cKDTree

    for c, r in zip(centres, radii, strict=True):
        keep &= np.linalg.norm(pos - np.asarray(c), axis=1) > r
    near = np.concatenate(earlier)
    if len(near):
        d_nn = cKDTree(pos).query(pos, k=2)[0][:, 1].min()
        keep &= cKDTree(near).query(pos, k=1)[0] >= 0.75 * d_nn
    return keep


def build_specimen(config, rng: np.random.Generator) -> Specimen:
    """Build one random structure from a :class:`~.config.SimulationConfig`."""
    import ase

    L = config.extent_A
    lo, hi = config.particles_per_image
    n = int(rng.integers(lo, hi + 1))
    radii = rng.uniform(config.radius_nm[0] * 10, config.radius_nm[1] * 10, n)
    radii = np.sort(radii)[::-1]  # place the big ones first
    if n and 2 * radii.max() + 10.0 > L:
        raise ConfigError(
            f"particles of radius up to {radii.max() / 10:.2f} nm do not fit in a field of view of "
            f"{L / 10:.2f} nm (image_size_px x sampling_A, with 0.5 nm margins); use a larger "
            "image_size_px or a smaller radius_nm",
            "radius_nm",
            fields=("image_size_px", "sampling_A"),
        )
    xy, radii = place_particles(n, radii, L, config.min_separation_nm * 10, rng)
    zmax = 2 * radii.max() + 2.0 if len(radii) else 0.0
    t_lo, t_hi = config.substrate_thickness_nm
    thickness = float(rng.uniform(t_lo, t_hi)) * 10
    symbols: list[str] = []
    positions: list[np.ndarray] = []
    centres = []
    faults: list[int] = []
    for (cx, cy), r in zip(xy, radii, strict=True):
        lo_f, hi_f = config.stacking_faults
        n_faults = int(rng.integers(lo_f, hi_f + 1)) if hi_f > 0 else 0
        p = particle(config.material, float(r), rng, n_faults)
        faults.append(int(p.info["stacking_faults"]))
        cz = 1.0 + zmax / 2
        pos = p.positions + [cx, cy, cz]
        keep = _outside_earlier(pos, positions, centres, radii[: len(centres)])
        positions.append(pos[keep])
        symbols.extend(np.asarray(p.get_chemical_symbols())[keep].tolist())
        centres.append([cx, cy, cz])
    ppos = np.concatenate(positions) if positions else np.zeros((0, 3))
    cell = [L, L, zmax + thickness + 2.0]
    particles = ase.Atoms(symbols=symbols, positions=ppos, cell=cell, pbc=True)
    support = getattr(config, "substrate_material", "C")
    if support == "C":
        carbon = amorphous_carbon(
            L, thickness, rng, config.substrate_density_g_cm3, config.substrate_min_distance_A
        )
        film_symbols = ["C"] * len(carbon)
    else:
        carbon, film_symbols = amorphous_support(support, L, thickness, rng)
    carbon[:, 2] += zmax + 1.0
    allatoms = particles + ase.Atoms(
        symbols=film_symbols, positions=carbon, cell=cell, pbc=True
    )
    return Specimen(allatoms, particles, np.array(centres), radii, thickness, faults)
