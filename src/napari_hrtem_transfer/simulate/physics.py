"""HRTEM image formation with abTEM: exit waves, defocus series, masks and dose noise.

Sign convention (abTEM): ``defocus = -C10``; positive defocus is underfocus.  Lengths [Å].
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

#: abTEM settings of every simulation: eager numpy inside one structure's task, and numpy's
#: FFT (pocketfft), which has no run-time planning.  abTEM's default FFTW with
#: ``FFTW_MEASURE`` times candidate algorithms and keeps the fastest, so the plan (and the
#: last bits of most pixels) changed from run to run with the machine's load, and those bits
#: reached the Poisson draw.  ``FFTW_ESTIMATE`` would be reproducible too, but abTEM then finds
#: no FFTW wisdom and builds a new plan for every transform (several times slower); see
#: ``benchmarks/bench_simulate.py --fft-plans`` for the costs.
#: They hold only while the simulator works (:func:`abtem_settings`); the user's abTEM session
#: keeps its own configuration.
ABTEM_SETTINGS: dict = {
    "dask.lazy": False,
    "fft": "numpy",
}


_settings_lock = threading.Lock()
_settings_users = 0
_settings_applied: Any = None


@contextlib.contextmanager
def abtem_settings() -> Iterator[Any]:
    """Yield the ``abtem`` module with :data:`ABTEM_SETTINGS` in force; restore the old ones.

    Every function of this module that calls abTEM runs inside it, and
    :func:`~.series.simulate_structure` holds it around the whole structure.  abTEM's
    configuration is one per process, so the settings are counted: the first user (of any
    thread) applies them, the last one out restores what was there before.  Simulations in
    several threads of one process (a dask cluster with ``processes=False``) therefore never
    lose them half-way, and nesting is harmless.  While any simulation runs, abTEM calls of
    other threads see these settings too.
    """
    global _settings_users, _settings_applied
    import abtem

    with _settings_lock:
        if _settings_users == 0:
            _settings_applied = abtem.config.set(ABTEM_SETTINGS)  # applied now, undone on exit
        _settings_users += 1
    try:
        yield abtem
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                _settings_applied.__exit__(None, None, None)
                _settings_applied = None


def exit_waves(atoms, config, phonon_seed: int, device: str = "cpu"):
    """Frozen-phonon exit waves Fourier-cropped to the output sampling.

    Parameters
    ----------
    atoms
        :class:`ase.Atoms` with an orthogonal periodic cell of side ``config.extent_A`` [Å].
    config
        :class:`~.config.SimulationConfig`.
    phonon_seed
        Seed of the frozen-phonon displacements.
    device
        ``"cpu"`` or ``"gpu"`` (abTEM's CuPy backend).

    Returns
    -------
    abtem.Waves
        Ensemble (n_phonons, ny, nx) at ``config.sampling_A`` [Å/px].
    """
    with abtem_settings() as abtem:
        if config.n_phonons > 1 and config.phonon_sigma_A > 0:
            model = abtem.FrozenPhonons(
                atoms,
                num_configs=config.n_phonons,
                sigmas=config.phonon_sigma_A,
                seed=phonon_seed,
            )
        else:
            model = atoms
        waves = _multislice(abtem, model, config, device)[1]
        n = config.image_size_px
        return waves.downsample(gpts=(n, n))


def _multislice(abtem: Any, model: Any, config, device: str) -> tuple[Any, Any]:
    """Plane-wave multislice through ``model`` (atoms or frozen phonons) on the simulation
    grid (``config.sim_gpts``, slices of ``config.slice_thickness_A`` [Å], infinite
    projection) at ``config.energy_eV`` [eV]: the potential and the exit waves (lazy)."""
    potential = abtem.Potential(
        model,
        gpts=config.sim_gpts,
        slice_thickness=config.slice_thickness_A,
        projection="infinite",
        device=device,
    )
    return potential, abtem.PlaneWave(energy=config.energy_eV, device=device).multislice(potential)


def make_ctf(
    config,
    defocus_A: np.ndarray,
    microscope: bool = True,
    Cs_A: float | None = None,
    focal_spread_A: float | None = None,
):
    """abTEM CTF with an ensemble axis over ``defocus_A`` [Å] (positive = underfocus).

    With ``microscope=False`` the CTF is the defocus propagator alone: no spherical
    aberration, focal spread or objective aperture (free-space propagation by ``-defocus_A``).
    ``Cs_A`` and ``focal_spread_A`` [Å] replace the config's values when given (an image's
    own draw from ``Cs_range_A`` / ``focal_spread_range_A``).
    """
    Cs_A = config.Cs_A if Cs_A is None else float(Cs_A)
    focal_spread_A = config.focal_spread_A if focal_spread_A is None else float(focal_spread_A)
    with abtem_settings() as abtem:
        if not microscope:
            return abtem.CTF(energy=config.energy_eV, defocus=np.asarray(defocus_A, dtype=float))
        cutoff = config.semiangle_cutoff_mrad if config.semiangle_cutoff_mrad else np.inf
        return abtem.CTF(
            energy=config.energy_eV,
            semiangle_cutoff=cutoff,
            focal_spread=focal_spread_A,
            aberration_coefficients={"C30": Cs_A},
            defocus=np.asarray(defocus_A, dtype=float),
        )


def defocus_series(
    waves,
    config,
    defocus_A: np.ndarray,
    microscope: bool = True,
    Cs_A: float | None = None,
    focal_spread_A: float | None = None,
) -> np.ndarray:
    """Images of one stored exit wave at every defocus: the CTF is applied per defocus.

    Frozen phonons are averaged incoherently (intensities), after the CTF.  With
    ``microscope=False`` only the defocus is applied (see :func:`make_ctf`); ``Cs_A`` and
    ``focal_spread_A`` [Å] override the config's (one value for the whole call).

    Returns
    -------
    numpy.ndarray
        float32 intensities (n_defocus, ny, nx), vacuum = 1.
    """
    with abtem_settings():
        ctf = make_ctf(config, defocus_A, microscope, Cs_A, focal_spread_A)
        images = waves.apply_ctf(ctf).intensity()
        if any(type(ax).__name__ == "FrozenPhononsAxis" for ax in images.ensemble_axes_metadata):
            images = images.reduce_ensemble()
        arr = np.asarray(images.array)
    if hasattr(arr, "get"):  # cupy
        arr = arr.get()
    arr = arr.reshape(len(np.atleast_1d(defocus_A)), *arr.shape[-2:])
    # abTEM arrays are indexed (x, y); images are stored (y, x) like every image format
    return np.ascontiguousarray(arr.transpose(0, 2, 1), dtype=np.float32)


def particle_mask(particle_atoms, config, device: str = "cpu") -> np.ndarray:
    """Ground-truth mask from the particles alone in vacuum (see :func:`particle_reference`)."""
    return particle_reference(particle_atoms, config, device)[0]


def min_contrast_defocus(waves, config, half_range_A: float, step_A: float = 0.5) -> float:
    """Defocus [Å] (abTEM sign) at which the wave ``waves`` has the least intensity contrast.

    The wave is propagated by the defocus alone (no Cs, focal spread or aperture), so the
    result is a property of the specimen, the same for every microscope.  Used on the exit
    wave of the particles alone, it locates their focus relative to the exit plane: the
    study's calibration of zero defocus per structure.  A coarse scan (5 Å steps) over
    ``[-half_range_A, half_range_A]`` is refined with ``step_A`` steps.
    """
    coarse = np.arange(-half_range_A, half_range_A + 5.0, 5.0)
    # contrasts in float64, so that rounding can never decide between two near-equal minima
    c = defocus_series(waves, config, coarse, microscope=False).std((1, 2), np.float64)
    centre = coarse[int(np.argmin(c))]
    fine = np.arange(centre - 5.0, centre + 5.0 + step_A, step_A)
    c = defocus_series(waves, config, fine, microscope=False).std((1, 2), np.float64)
    return float(fine[int(np.argmin(c))])


def _particles_cell(particle_atoms, config):
    """The particles and the vacuum [Å] the reference may skip (``config.reference_cell``).

    ``"full"``: the particles in the specimen's whole cell (0 skipped).  ``"particles"``: the
    cell cut a whole number of slices above the highest particle atom (+ 2 Å); the vacuum
    beyond it, where the carbon was, is one free-space propagation instead of many empty
    slices (the same wave up to the slices' rounding, at a fraction of the cost).
    """
    if getattr(config, "reference_cell", "full") != "particles" or not len(particle_atoms):
        return particle_atoms, 0.0
    cell_z = float(particle_atoms.cell.lengths()[2])
    n_slices = int(np.ceil((particle_atoms.positions[:, 2].max() + 2.0) / config.slice_thickness_A))
    cut_A = n_slices * config.slice_thickness_A
    if cut_A >= cell_z:
        return particle_atoms, 0.0
    atoms = particle_atoms.copy()
    cell = np.array(atoms.cell)
    cell[2, 2] = cut_A
    atoms.set_cell(cell, scale_atoms=False)
    return atoms, cell_z - cut_A


def particle_reference(particle_atoms, config, device: str = "cpu") -> tuple[np.ndarray, float]:
    """Ground-truth mask and zero-defocus offset from the particles alone in vacuum.

    The exit-wave phase is computed by multislice without phonons, unwrapped with the
    phase-object phase (sigma x projected potential), thresholded (together with the
    phase-object phase, so that no surface atom is lost) at
    ``config.mask_phase_threshold_rad``, smoothed with a Gaussian of
    ``config.mask_smoothing_A`` [Å], resampled to the output grid, binarised at
    ``config.mask_binarize_level``, joined with every output pixel that contains
    above-threshold phase, and hole-filled.  The pixels with above-threshold phase keep
    every particle atom, including isolated surface atoms, inside the mask; the default
    level (0.1) puts the edge where the atoms' projected radii end.

    The zero-defocus offset [Å] is the minimum-contrast focus of the same exit wave relative
    to the exit plane of the cell under the defocus propagator alone
    (:func:`min_contrast_defocus`; independent of Cs, focal spread and aperture), or 0 if
    there are no particles or ``config.calibrate_zero_defocus`` is False.

    Returns
    -------
    tuple
        bool mask (ny, nx) at ``config.sampling_A``, and the offset [Å].
    """
    from scipy import ndimage

    atoms, vacuum_A = _particles_cell(particle_atoms, config)
    with abtem_settings() as abtem:
        from abtem.core.energy import energy2sigma

        potential, waves = _multislice(abtem, atoms, config, device)
        if vacuum_A > 0:  # the empty rest of the cell: free-space propagation by vacuum_A
            waves = waves.apply_ctf(abtem.CTF(energy=config.energy_eV, defocus=-vacuum_A))
        offset_A = 0.0
        if config.calibrate_zero_defocus and len(particle_atoms):
            n = config.image_size_px
            cell_z = float(particle_atoms.cell.lengths()[2])
            offset_A = min_contrast_defocus(waves.downsample(gpts=(n, n)), config, cell_z + 50.0)
        wave = waves.array
        projected = potential.project().array
    if hasattr(wave, "get"):
        wave, projected = wave.get(), projected.get()
    phase_po = energy2sigma(config.energy_eV) * np.asarray(projected, dtype=np.float64)
    phase = np.angle(np.asarray(wave) * np.exp(-1j * phase_po)) + phase_po
    sim_sampling = config.extent_A / config.sim_gpts
    # an atom counts if its phase exceeds the threshold in the exit wave or, for surface atoms
    # whose exit-wave phase is spread out by propagation, in the phase-object approximation
    binary = (np.maximum(phase, phase_po) > config.mask_phase_threshold_rad).T  # (x, y) -> (y, x)
    sigma_px = config.mask_smoothing_A / sim_sampling
    smooth = binary.astype(np.float32)
    if sigma_px > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma_px, mode="wrap")
    n = config.image_size_px
    zoomed = ndimage.zoom(smooth, n / smooth.shape[0], order=1, mode="grid-wrap", grid_mode=True)
    mask = zoomed[:n, :n] > config.mask_binarize_level
    # keep every pixel that holds above-threshold phase (isolated surface atoms)
    f = binary.shape[0] // n
    if f * n == binary.shape[0]:  # output sample j sits at j*sampling: pool sim samples around it
        centred = np.roll(binary, (f // 2, f // 2), axis=(0, 1))
        raw = centred.reshape(n, f, n, f).any(axis=(1, 3))
    else:
        raw = ndimage.zoom(binary, n / binary.shape[0], order=0, grid_mode=True)[:n, :n]
    return ndimage.binary_fill_holes(mask | raw), offset_A


def apply_dose(
    intensity: np.ndarray, dose_e_per_A2: float | None, sampling_A: float, rng: np.random.Generator
) -> np.ndarray:
    """Poisson electron counts for a dose [e/Å²] at pixel size ``sampling_A`` [Å].

    The expected count of a pixel is ``intensity * dose * sampling_A**2`` (vacuum intensity = 1).
    Returns integer counts (uint16, or uint32 if needed), or the intensity itself (float32)
    if ``dose_e_per_A2`` is None.
    """
    if dose_e_per_A2 is None:
        return intensity.astype(np.float32)
    lam = np.clip(intensity, 0, None).astype(np.float64) * (dose_e_per_A2 * sampling_A**2)
    counts = rng.poisson(lam)
    dtype = np.uint16 if counts.max(initial=0) < 2**16 else np.uint32
    return counts.astype(dtype)
