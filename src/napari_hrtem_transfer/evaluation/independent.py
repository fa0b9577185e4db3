"""An independent check: a second HRTEM simulator and a second mask definition.

The package's training data come from abTEM's multislice (:mod:`..simulate`) with masks
thresholded from the exit-wave phase of the particles.  A model that only learnt that one
simulation path (its potential, its cropping, its mask rule) can score well on held-out
structures of it and still be wrong elsewhere.  This module builds frames another way, in
numpy, so that a score here measures what the network learnt about particles rather than
about one simulator:

* **Structures** (ase + numpy, not :mod:`..simulate.structures`): spheres cut from a
  randomly rotated bulk lattice (Au, Ag, Pt, Pd fcc; CdSe wurtzite), on an amorphous carbon
  film made as a jittered simple-cubic lattice at the film's density.
* **Potential**: the projected potential of every atom from Kirkland's electron scattering
  factors (the parameter table abTEM ships, read as a JSON file; none of abTEM's code runs),
  built in Fourier space: atoms are spread bilinearly onto the grid, the spreading kernel
  (sinc² per axis) is divided out, and the sum is multiplied by ``f_e(q)``
  (``V_z(q) = 47.878 V·Å² × f_e(q)``), band-limited at 2/3 of the grid's Nyquist.
* **Image**: one phase object ``exp(i σ V_z)`` (projection approximation, no multislice),
  this module's own CTF (``chi = -π λ Δf q² + π/2 Cs λ³ q⁴``, abTEM's sign: positive Δf =
  underfocus; spatial and temporal envelopes), intensity on the simulation grid, integrated
  over each detector pixel (box binning, not Fourier cropping), Poisson counts at the dose.
* **Mask**: the projected footprint of the particle atoms, each atom a disk of its metallic
  (covalent for CdSe) radius, union, holes filled; not a phase threshold.

Lengths [Å] unless a name says ``_nm``; dose [e/Å²]; energy [eV]; angles [mrad].
Seeded: structure ``i`` draws everything from ``SeedSequence(seed, spawn_key=(7, i))``.
Frames are written as the package's HyperSpy ``.hspy`` dataset (calibrated axes, defocus
axis, masks), so ``evaluate`` and ``segment`` read them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..simulate.config import STUDY_DEFOCI_NM

__all__ = [
    "ATOM_RADII_A",
    "IndependentConfig",
    "ctf_transfer",
    "ctf_zeros_q",
    "footprint_mask",
    "independent_dataset",
    "interaction_parameter",
    "projected_potential",
    "score_frames",
    "simulate_independent_structure",
    "wavelength_A",
    "with_dose",
    "write_independent_set",
]

#: Atomic radii of the mask [Å]: metallic (12-coordinate) radii for the metals, covalent
#: radii for the CdSe semiconductor.
ATOM_RADII_A: dict[str, float] = {
    "Au": 1.44,
    "Ag": 1.44,
    "Pt": 1.39,
    "Pd": 1.37,
    "Cd": 1.44,
    "Se": 1.20,
}

#: Lattices of the check's particles [Å].
_LATTICES: dict[str, dict] = {
    "Au": dict(kind="fcc", a=4.078),
    "Ag": dict(kind="fcc", a=4.086),
    "Pt": dict(kind="fcc", a=3.924),
    "Pd": dict(kind="fcc", a=3.891),
    "CdSe": dict(kind="wurtzite", a=4.299, c=7.010),
}

#: h² / (2π m0 e) [V·Å²]: the projected potential's Fourier transform per scattering factor.
_V_PER_FE = 47.87801



class IndependentConfig(BaseModel):
    """Settings of the independent-check simulator (defaults held here only)."""

    model_config = ConfigDict(extra="forbid")

    materials: tuple[str, ...] = Field(("CdSe", "Au", "Ag", "Pt"), description="Particles.")
    n_per_material: int = Field(6, ge=1, le=10_000, description="Structures per material.")
    diameter_nm: tuple[float, float] = Field((2.0, 10.0), description="Diameter range [nm].")
    particles_per_image: tuple[int, int] = Field((1, 3), description="Min, max particles.")
    min_gap_nm: float = Field(0.8, ge=0, description="Surface-to-surface gap [nm].")
    defocus_nm: list[float] = Field(
        default_factory=lambda: list(STUDY_DEFOCI_NM),
        description="Nominal defoci [nm]; abTEM sign, positive = underfocus.",
    )
    dose_e_per_A2: float | None = Field(400.0, gt=0, description="Dose [e/Å²]; None = no noise.")
    sampling_A: float = Field(0.2, gt=0, le=2.0, description="Detector pixel size [Å/px].")
    image_size_px: int = Field(640, ge=32, le=4096, description="Frame side [px].")
    oversampling: int = Field(2, ge=1, le=4, description="Simulation samples per pixel side.")
    energy_eV: float = Field(300e3, ge=20e3, le=1.5e6, description="Beam energy [eV].")
    Cs_A: float = Field(5e4, description="Spherical aberration C30 [Å] (5 µm = 5e4 Å).")
    focal_spread_A: float = Field(10.0, ge=0, description="Focal spread [Å].")
    convergence_mrad: float = Field(0.1, ge=0, description="Beam convergence semi-angle [mrad].")
    substrate_thickness_nm: tuple[float, float] = Field((2.0, 8.0), description="Carbon [nm].")
    carbon_density_g_cm3: float = Field(2.0, gt=0, le=4.0, description="Carbon density [g/cm³].")
    seed: int = Field(0, ge=0, description="Master seed.")

    @field_validator("materials")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in _LATTICES]
        if bad or not v:
            raise ValueError(f"materials must be among {', '.join(_LATTICES)}; got {list(v)}")
        return tuple(v)

    @field_validator("diameter_nm", "particles_per_image", "substrate_thickness_nm")
    @classmethod
    def _range(cls, v):
        if len(v) != 2 or v[0] > v[1] or v[0] < 0:
            raise ValueError(f"give a range as (min, max) with 0 <= min <= max (got {v})")
        return v

    @property
    def extent_A(self) -> float:
        """Field of view [Å]."""
        return self.image_size_px * self.sampling_A


# ----------------------------------------------------------------------------- physics
def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength [Å] at kinetic energy ``energy_eV`` [eV]."""
    m0c2 = 510998.95  # electron rest energy [eV]
    hc = 12398.419843  # [eV·Å]
    return hc / math.sqrt(energy_eV * (2 * m0c2 + energy_eV))


def interaction_parameter(energy_eV: float) -> float:
    """Interaction parameter σ [rad/(V·Å)]: phase per projected potential."""
    m0c2 = 510998.95
    lam = wavelength_A(energy_eV)
    return 2 * math.pi / (lam * energy_eV) * (m0c2 + energy_eV) / (2 * m0c2 + energy_eV)


@lru_cache(maxsize=1)
def _kirkland_table() -> dict[str, np.ndarray]:
    """Kirkland's parameters (a, b, c, d rows of 3) per element, from abTEM's data file."""
    import importlib.util

    spec = importlib.util.find_spec("abtem")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Kirkland parameter table is read from abTEM's data; install abtem")
    path = Path(spec.submodule_search_locations[0]) / "parametrizations" / "data" / "kirkland.json"
    raw = json.loads(path.read_text())
    return {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()}


def scattering_factor(symbol: str, q2: np.ndarray) -> np.ndarray:
    """Electron scattering factor f_e [Å] at squared spatial frequency ``q2`` [1/Å²].

    Kirkland: ``f_e(q) = Σ a_i / (q² + b_i) + Σ c_i exp(-d_i q²)`` (q = 1/d, not 2π/d).
    """
    a, b, c, d = _kirkland_table()[symbol]
    q2 = np.asarray(q2, dtype=np.float64)
    out = np.zeros_like(q2)
    for i in range(3):
        out += a[i] / (q2 + b[i]) + c[i] * np.exp(-d[i] * q2)
    return out


def _freqs(n: int, dx: float) -> tuple[np.ndarray, np.ndarray]:
    f = np.fft.fftfreq(n, dx)
    return f[:, None], f[None, :]


def _spread(p_px: np.ndarray, gpts: int, half: int = 4, chunk: int = 20_000) -> np.ndarray:
    """Sum of unit Gaussians (sigma = 1 px, cut at ``half`` px) at positions (N, 2) [px]
    (x, y) on a periodic (gpts, gpts) grid indexed (y, x)."""
    k = np.arange(-half, half + 1)
    grid = np.zeros(gpts * gpts)
    for s in range(0, len(p_px), chunk):
        p = p_px[s : s + chunk]
        base = np.floor(p).astype(int)
        ix, iy = base[:, :1] + k, base[:, 1:] + k  # (N, 2 half + 1)
        wx = np.exp(-0.5 * (ix - p[:, :1]) ** 2)
        wy = np.exp(-0.5 * (iy - p[:, 1:]) ** 2)
        idx = (iy % gpts)[:, :, None] * gpts + (ix % gpts)[:, None, :]
        w = wy[:, :, None] * wx[:, None, :]
        grid += np.bincount(idx.ravel(), w.ravel(), minlength=gpts * gpts)
    return grid.reshape(gpts, gpts)


def projected_potential(
    xy_A: np.ndarray, symbols: np.ndarray, extent_A: float, gpts: int
) -> np.ndarray:
    """Projected potential V_z [V·Å] of atoms at ``xy_A`` (N, 2) [Å] (x, y) on a periodic
    square grid (gpts, gpts) indexed (y, x), sample j at ``j * extent_A / gpts``.

    Atoms are spread onto the grid per element as Gaussians of one sample's width (the
    gridding step of a non-uniform FFT); the Gaussian's transfer ``2π exp(-2π² dx² q²)`` is
    divided out, the spectrum multiplied by ``47.878 × f_e(q)`` and band-limited at 2/3 of
    the Nyquist frequency.
    """
    dx = extent_A / gpts
    qy, qx = _freqs(gpts, dx)
    q2 = qy**2 + qx**2
    band = q2 < (2.0 / 3.0 / (2 * dx)) ** 2
    kernel = 2 * math.pi * np.exp(-2 * math.pi**2 * dx**2 * q2)
    spectrum = np.zeros((gpts, gpts), np.complex128)
    symbols = np.asarray(symbols).astype(str)
    for sym in np.unique(symbols):
        grid = _spread(np.asarray(xy_A, float)[symbols == sym] / dx, gpts)
        spectrum += np.fft.fft2(grid) * (_V_PER_FE * scattering_factor(sym, q2))
    spectrum *= band / kernel
    return np.fft.ifft2(spectrum).real / dx**2


def ctf_transfer(
    q2: np.ndarray,
    defocus_A: float,
    energy_eV: float,
    Cs_A: float,
    focal_spread_A: float = 0.0,
    convergence_mrad: float = 0.0,
) -> np.ndarray:
    """Wave transfer function at squared frequency ``q2`` [1/Å²] (complex, same shape).

    ``exp(-i chi) E_t E_s`` with ``chi = -π λ Δf q² + π/2 Cs λ³ q⁴`` (Δf = ``defocus_A``,
    positive = underfocus, abTEM's sign: ``defocus = -C10``), temporal envelope
    ``exp(-(π λ Δ q²)² / 4)`` (Δ = focal spread) and spatial envelope
    ``exp(-(π α)² (Cs λ² q³ - Δf q)²)`` (α = convergence semi-angle [rad]).
    """
    lam = wavelength_A(energy_eV)
    q2 = np.asarray(q2, dtype=np.float64)
    q = np.sqrt(q2)
    chi = -math.pi * lam * defocus_A * q2 + 0.5 * math.pi * Cs_A * lam**3 * q2**2
    env = np.exp(-((math.pi * lam * focal_spread_A * q2) ** 2) / 4.0)
    alpha = convergence_mrad * 1e-3
    if alpha:
        env = env * np.exp(-((math.pi * alpha) ** 2) * (Cs_A * lam**2 * q**3 - defocus_A * q) ** 2)
    return np.exp(-1j * chi) * env


def ctf_zeros_q(defocus_A: float, energy_eV: float, Cs_A: float, n_max: int = 5) -> np.ndarray:
    """Spatial frequencies [1/Å] of the first ``n_max`` zeros (q > 0) of ``sin(chi)``.

    Roots of ``π/2 Cs λ³ q⁴ - π λ Δf q² = n π`` for integer n (both signs), ascending.
    """
    lam = wavelength_A(energy_eV)
    roots: list[float] = []
    for n in range(-4 * n_max, 4 * n_max + 1):
        if Cs_A == 0:
            cands = [-n / (lam * defocus_A)] if defocus_A else []
        else:
            a, b, c = 0.5 * Cs_A * lam**3, -lam * defocus_A, -float(n)
            disc = b * b - 4 * a * c
            cands = [] if disc < 0 else [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1, -1)]
        roots += [math.sqrt(x) for x in cands if x > 1e-12]
    return np.array(sorted(set(np.round(roots, 12))))[:n_max]


# ----------------------------------------------------------------------------- structures
def _particle(material: str, diameter_A: float, rng: np.random.Generator):
    """Positions (N, 3) [Å] centred on 0 and symbols of a rotated sphere of bulk lattice."""
    from ase.build import bulk
    from scipy.spatial.transform import Rotation

    p = _LATTICES[material]
    if p["kind"] == "wurtzite":
        cell = bulk(material, "wurtzite", a=p["a"], c=p["c"])
    else:
        cell = bulk(material, "fcc", a=p["a"], cubic=True)
    r = diameter_A / 2
    lengths = cell.cell.lengths()
    reps = [
        int(math.ceil(2 * r / L / (0.8 if p["kind"] == "wurtzite" else 1.0))) + 3 for L in lengths
    ]
    block = cell.repeat(reps)
    pos = block.get_positions()
    pos -= block.cell.sum(axis=0) / 2 + rng.uniform(-0.5, 0.5, 3) * lengths.min()
    pos = pos @ Rotation.random(random_state=rng).as_matrix().T
    keep = np.linalg.norm(pos, axis=1) <= r
    return pos[keep], np.asarray(block.get_chemical_symbols())[keep]


def _carbon(extent_A: float, thickness_A: float, density: float, rng: np.random.Generator):
    """Amorphous-carbon positions (N, 3) [Å] at ``density`` g/cm³.

    Layers one mean spacing apart, each a strongly jittered square lattice turned by its own
    random angle and shifted at random (so the projection has no Bragg peaks: a diffuse ring
    at the nearest-neighbour distance, and short-range exclusion), cut to the periodic cell.
    """
    if thickness_A <= 0:
        return np.zeros((0, 3))
    step = (density / 12.011 * 6.02214076e23 / 1e24) ** (-1 / 3)
    nz = max(1, round(thickness_A / step))
    half = extent_A / math.sqrt(2) + step
    g = np.arange(-half, half, step)
    base = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    layers = []
    for k in range(nz):
        t = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        p = (base + rng.uniform(-0.35, 0.35, base.shape) * step) @ rot.T
        p += extent_A / 2 + rng.uniform(-step, step, 2)
        p = p[np.all((p >= 0) & (p < extent_A), axis=1)]
        z = (k + 0.5) * thickness_A / nz + rng.uniform(-0.3, 0.3, len(p)) * step
        layers.append(np.column_stack([p, z]))
    return np.concatenate(layers)


def _place(diams_A: list[float], extent_A: float, gap_A: float, rng) -> list[np.ndarray]:
    """Non-overlapping centres (x, y) [Å] inside the frame (margin 0.4 nm); may drop some."""
    centres: list[np.ndarray] = []
    kept: list[float] = []
    for d in sorted(diams_A, reverse=True):
        lo, hi = d / 2 + 4.0, extent_A - d / 2 - 4.0
        if hi < lo:
            continue
        for _ in range(200):
            c = rng.uniform(lo, hi, 2)
            if all(
                np.linalg.norm(c - o) >= (d + e) / 2 + gap_A
                for o, e in zip(centres, kept, strict=True)
            ):
                centres.append(c)
                kept.append(d)
                break
    return [np.array([*c, d]) for c, d in zip(centres, kept, strict=True)]


def footprint_mask(
    xy_A: np.ndarray,
    symbols: np.ndarray,
    sampling_A: float,
    shape: tuple[int, int],
    offset_A: float = 0.0,
) -> np.ndarray:
    """Union of disks (each atom's radius from :data:`ATOM_RADII_A`), holes filled (bool).

    Pixel (j, i) is centred at ``(i * sampling_A + offset_A, j * sampling_A + offset_A)``.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    mask = np.zeros(shape, bool)
    symbols = np.asarray(symbols).astype(str)
    if len(xy_A) == 0:
        return mask
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    pts = np.stack([xx.ravel(), yy.ravel()], 1) * sampling_A + offset_A
    for sym in np.unique(symbols):
        r = ATOM_RADII_A[sym]
        sub = np.asarray(xy_A)[symbols == sym]
        lo, hi = sub.min(0) - r - sampling_A, sub.max(0) + r + sampling_A
        near = np.all((pts >= lo) & (pts <= hi), axis=1)
        d, _ = cKDTree(sub).query(pts[near], distance_upper_bound=r)
        flat = mask.ravel()
        flat[np.flatnonzero(near)[np.isfinite(d)]] = True
    return ndimage.binary_fill_holes(mask)


# ----------------------------------------------------------------------------- frames
def _rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    s_struct, s_noise = np.random.SeedSequence(seed, spawn_key=(7, index)).spawn(2)
    return np.random.default_rng(s_struct), np.random.default_rng(s_noise)


def _specimen(config: IndependentConfig, index: int, rng: np.random.Generator) -> dict:
    """Atoms of structure ``index``: particle and carbon (x, y) [Å] and symbols."""
    material = config.materials[index % len(config.materials)]
    d_nm = float(rng.uniform(*config.diameter_nm))
    n = int(rng.integers(config.particles_per_image[0], config.particles_per_image[1] + 1))
    diams = [10 * d_nm * float(rng.uniform(0.95, 1.05)) for _ in range(n)]
    placed = _place(diams, config.extent_A, 10 * config.min_gap_nm, rng)
    pxy, psym = [np.zeros((0, 2))], [np.zeros(0, str)]
    for cx, cy, d in placed:
        pos, sym = _particle(material, d, rng)
        pxy.append(pos[:, :2] + [cx, cy])
        psym.append(sym)
    t_nm = float(rng.uniform(*config.substrate_thickness_nm))
    carbon = _carbon(config.extent_A, 10 * t_nm, config.carbon_density_g_cm3, rng)
    return {
        "material": material,
        "particle_xy": np.concatenate(pxy),
        "particle_symbols": np.concatenate(psym).astype(str),
        "carbon_xy": carbon[:, :2],
        "diameters_nm": [float(d) / 10 for *_, d in placed],
        "substrate_thickness_nm": t_nm,
    }


def _bin(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks: the signal a pixel of side f samples integrates."""
    if f == 1:
        return img
    n = img.shape[0] // f
    return img.reshape(n, f, n, f).mean(axis=(1, 3))


def simulate_independent_structure(config: IndependentConfig | dict, index: int) -> dict:
    """Frames of structure ``index`` at every defocus of ``config``, its mask and metadata.

    Returns
    -------
    dict
        ``images`` (n_defocus, ny, nx) counts (uint16/uint32) or intensity (float32, vacuum
        = 1), ``mask`` (ny, nx) bool, ``material``, ``diameters_nm``, ``diameter_nm`` (mean;
        NaN without particles), ``n_particles``, ``substrate_thickness_nm``, ``n_atoms``.
    """
    if isinstance(config, dict):
        config = IndependentConfig(**config)
    rng, rng_noise = _rngs(config.seed, index)
    spec = _specimen(config, index, rng)
    ov, n = config.oversampling, config.image_size_px
    gpts, dx = n * ov, config.sampling_A / ov
    xy = np.concatenate([spec["particle_xy"], spec["carbon_xy"]])
    sym = np.concatenate([spec["particle_symbols"], np.full(len(spec["carbon_xy"]), "C")])
    if len(xy):
        vz = projected_potential(xy, sym, config.extent_A, gpts)
    else:
        vz = np.zeros((gpts, gpts))
    wave_q = np.fft.fft2(np.exp(1j * interaction_parameter(config.energy_eV) * vz))
    del vz
    qy, qx = _freqs(gpts, dx)
    q2 = qy**2 + qx**2
    frames = np.empty((len(config.defocus_nm), n, n), np.float32)
    for k, df_nm in enumerate(config.defocus_nm):
        h = ctf_transfer(
            q2,
            10 * df_nm,
            config.energy_eV,
            config.Cs_A,
            config.focal_spread_A,
            config.convergence_mrad,
        )
        frames[k] = _bin(np.abs(np.fft.ifft2(wave_q * h)) ** 2, ov)
    if config.dose_e_per_A2 is not None:
        lam = np.clip(frames, 0, None).astype(np.float64) * (
            config.dose_e_per_A2 * config.sampling_A**2
        )
        counts = rng_noise.poisson(lam)
        images = counts.astype(np.uint16 if counts.max(initial=0) < 2**16 else np.uint32)
    else:
        images = frames
    mask = footprint_mask(
        spec["particle_xy"],
        spec["particle_symbols"],
        config.sampling_A,
        (n, n),
        offset_A=(ov - 1) / 2 * dx,
    )
    d = spec["diameters_nm"]
    return {
        "index": index,
        "images": images,
        "mask": mask,
        "material": spec["material"],
        "diameters_nm": d,
        "diameter_nm": float(np.mean(d)) if d else float("nan"),
        "n_particles": len(d),
        "substrate_thickness_nm": spec["substrate_thickness_nm"],
        "n_atoms": int(len(xy)),
    }


def independent_dataset(
    config: IndependentConfig, progress: Callable[[int, int], None] | None = None
):
    """All structures of ``config`` as an :class:`~..io.dataset.HRTEMDataset`.

    Structure ids are ``indep-<material>-seed<seed>-<index>``; ``info["structures"]`` holds
    each structure's ``diameter_nm``, ``diameters_nm``, ``n_particles``, ``material``,
    ``substrate_thickness_nm`` and ``dose_e_per_A2``.
    """
    from ..io.dataset import HRTEMDataset
    from ..io.provenance import SIMULATION_PACKAGES, package_versions

    n = config.n_per_material * len(config.materials)
    size, nd = config.image_size_px, len(config.defocus_nm)
    images = None
    masks = np.zeros((n, size, size), bool)
    meta: list[dict] = []
    for i in range(n):
        r = simulate_independent_structure(config, i)
        if images is None or r["images"].dtype.itemsize > images.dtype.itemsize:
            old = images
            images = np.zeros((nd, n, size, size), r["images"].dtype)
            if old is not None:
                images[:, :i] = old[:, :i]
        images[:, i] = r["images"]
        masks[i] = r["mask"]
        meta.append(
            {
                k: r[k]
                for k in (
                    "material",
                    "diameter_nm",
                    "diameters_nm",
                    "n_particles",
                    "substrate_thickness_nm",
                    "n_atoms",
                )
            }
        )
        meta[-1]["dose_e_per_A2"] = config.dose_e_per_A2
        if progress is not None:
            progress(i + 1, n)
    mats = [m["material"] for m in meta]
    return HRTEMDataset(
        images=images,
        defocus_nm=np.asarray(config.defocus_nm, float),
        sampling_A=config.sampling_A,
        masks=masks,
        structure_ids=np.array(
            [f"indep-{m}-seed{config.seed}-{i:05d}" for i, m in enumerate(mats)]
        ),
        materials=np.array(mats),
        dose_e_per_A2=config.dose_e_per_A2,
        energy_eV=config.energy_eV,
        info={
            "title": f"Independent-check HRTEM series: {', '.join(config.materials)}, {n} "
            "structures",
            "kind": "independent_check",
            "simulator": "napari_hrtem_transfer.evaluation.independent (phase object, "
            "Kirkland potential in Fourier space, own CTF, pixel binning)",
            "mask_definition": "union of atom disks (metallic/covalent radii), holes filled",
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "structures": meta,
            "versions": package_versions(SIMULATION_PACKAGES),
        },
    )


def write_independent_set(
    config: IndependentConfig,
    path: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Simulate ``config`` and write it atomically as a ``.hspy`` dataset; returns the path."""
    from ..errors import ConfigError
    from ..io.dataset import save_dataset

    path = Path(path)
    if path.suffix != ".hspy":
        raise ConfigError(f"path {path}: write the check set as .hspy", "path")
    return save_dataset(independent_dataset(config, progress), path)


# ----------------------------------------------------------------------------- scoring
def _load(model: Any):
    if hasattr(model, "predict_logits"):
        return model
    from ..training import load_checkpoint

    return load_checkpoint(Path(model), "best", device="cpu")


def _resample(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from scipy import ndimage

    if img.shape == tuple(shape):
        return img
    f = (shape[0] / img.shape[0], shape[1] / img.shape[1])
    out = ndimage.zoom(img, f, order=1, grid_mode=True, mode="reflect")
    return out[: shape[0], : shape[1]]


def score_frames(
    model: Any,
    dataset: Any,
    *,
    precision: str = "auto",
    batch_size: int = 4,
    mask_margins_A: tuple[float, ...] = (),
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Dice and IoU of ``model`` on every frame of a labelled dataset, frames of any size.

    ``model`` is a loaded model (``predict_logits``, ``sampling_A``; e.g.
    ``segmentation.resolve_model``'s) or a checkpoint folder.  When the dataset's pixel size
    differs from the model's, each frame is resampled to the model's pixel size and the
    logits back to the frame (bilinear).  Rows: ``structure_id``, ``image_index``,
    ``material``, ``defocus_nm`` [nm], ``dose_e_per_A2``, ``diameter_nm`` [nm],
    ``n_particles``, ``dice``, ``iou``, ``area_ratio`` (predicted / true particle area),
    ``sampling_A`` [Å/px].  For each margin m of ``mask_margins_A`` [Å] a column
    ``dice_mask+<m>A`` holds the Dice against the mask dilated by a disk of radius m (the
    footprint mask with every atom radius grown by m): how much a score depends on where the
    mask definition puts the particle edge.
    """
    from ..io.dataset import HRTEMDataset, load_dataset
    from .metrics import dice, iou

    ds = dataset if isinstance(dataset, HRTEMDataset) else load_dataset(dataset)
    if ds.masks is None:
        from ..errors import DatasetError

        raise DatasetError("the dataset has no masks; the check needs labelled frames")
    lm = _load(model)
    ms = getattr(lm, "sampling_A", None) or ds.sampling_A
    ny, nx = ds.image_shape
    shape = (max(8, round(ny * ds.sampling_A / ms)), max(8, round(nx * ds.sampling_A / ms)))
    meta = list((ds.info or {}).get("structures") or [{}] * ds.n_images)
    grown = {m: _dilate(ds.masks, m / ds.sampling_A) for m in mask_margins_A}
    rows: list[dict] = []
    for di in range(ds.n_defocus):
        imgs = np.asarray(ds.images[di]).astype(np.float32)
        imgs = np.stack([_resample(im, shape) for im in imgs])
        logits = lm.predict_logits(imgs, batch_size=batch_size, precision=precision)
        pred = np.stack([_resample(lg, (ny, nx)) for lg in logits]) > 0
        dsc, jac = dice(pred, ds.masks), iou(pred, ds.masks)
        extra = {f"dice_mask+{m:g}A": dice(pred, g) for m, g in grown.items()}
        for i in range(ds.n_images):
            m = meta[i] if i < len(meta) else {}
            rows.append(
                {
                    "structure_id": str(ds.structure_ids[i]),
                    "image_index": i,
                    "material": str(ds.materials[i]),
                    "defocus_nm": float(ds.defocus_nm[di]),
                    "dose_e_per_A2": m.get("dose_e_per_A2", ds.dose_e_per_A2),
                    "diameter_nm": _diameter(m),
                    "n_particles": m.get("n_particles"),
                    "dice": float(dsc[i]),
                    "area_ratio": float(pred[i].sum() / max(1, ds.masks[i].sum())),
                    "iou": float(jac[i]),
                    "sampling_A": float(ds.sampling_A),
                    **{k: float(v[i]) for k, v in extra.items()},
                }
            )
        if progress is not None:
            progress(di + 1, ds.n_defocus)
    return rows


def _dilate(masks: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary dilation of masks (N, H, W) by a disk of ``radius_px`` [px]."""
    from scipy import ndimage

    r = int(math.floor(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = yy**2 + xx**2 <= radius_px**2
    return np.stack([ndimage.binary_dilation(m, disk) for m in np.asarray(masks, bool)])


def _diameter(meta: dict) -> float:
    """Mean particle diameter [nm] of a structure's metadata (this module's or simulate's)."""
    if meta.get("diameter_nm") is not None:
        return float(meta["diameter_nm"])
    radii = meta.get("radii_nm")
    return float(2 * np.mean(radii)) if radii else float("nan")


def with_dose(dataset: Any, dose_e_per_A2: float, seed: int = 0):
    """A copy of a noise-free dataset (intensity, vacuum = 1) with Poisson counts at a dose.

    The expected count of a pixel is ``intensity * dose * sampling_A**2``; draws come from
    ``SeedSequence(seed, spawn_key=(11, round(dose)))``, so every dose has its own noise.
    """
    import copy

    from ..errors import DatasetError
    from ..io.dataset import HRTEMDataset

    if dataset.dose_e_per_A2 is not None:
        raise DatasetError("with_dose needs a noise-free dataset (dose_e_per_A2 None)")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11, round(dose_e_per_A2))))
    scale = dose_e_per_A2 * dataset.sampling_A**2
    counts = np.stack(
        [
            rng.poisson(np.clip(np.asarray(dataset.images[k], np.float64), 0, None) * scale).astype(
                np.uint32
            )
            for k in range(dataset.n_defocus)
        ]
    )
    if counts.max(initial=0) < 2**16:
        counts = counts.astype(np.uint16)
    info = copy.deepcopy(dataset.info)
    for m in info.get("structures") or []:
        m["dose_e_per_A2"] = float(dose_e_per_A2)
    if "config" in info:
        info["config"]["dose_e_per_A2"] = float(dose_e_per_A2)
    return HRTEMDataset(
        images=counts,
        defocus_nm=dataset.defocus_nm,
        sampling_A=dataset.sampling_A,
        masks=dataset.masks,
        structure_ids=dataset.structure_ids,
        materials=dataset.materials,
        actual_defocus_nm=dataset.actual_defocus_nm,
        dose_e_per_A2=float(dose_e_per_A2),
        energy_eV=dataset.energy_eV,
        info=info,
    )
