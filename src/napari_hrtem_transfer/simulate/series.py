"""Datasets of many structures: one seeded task per structure, run serially or on dask.

Reproducibility: structure ``i`` draws everything (geometry, orientation, phonons, defocus
jitter, noise) from ``SeedSequence(config.seed, spawn_key=(i,))``, so the same seed gives
identical arrays whatever the number of workers or the order tasks finish in.  The FFTs have
no timing-dependent planning (:data:`.physics.ABTEM_SETTINGS`), so the arrays are also bitwise
identical run to run on one machine.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SimulationError
from .config import SimulationConfig


def _rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator, int]:
    ss = np.random.SeedSequence(seed, spawn_key=(index,))
    s_struct, s_noise, s_phonon = ss.spawn(3)
    phonon_seed = int(s_phonon.generate_state(1)[0] & 0x7FFFFFFF)
    return np.random.default_rng(s_struct), np.random.default_rng(s_noise), phonon_seed


def simulate_structure(config: SimulationConfig | dict, index: int, device: str = "cpu") -> dict:
    """Simulate structure number ``index`` of ``config`` at every defocus.

    This is the unit of parallel work; it is a pure function of ``(config, index)``.

    Returns
    -------
    dict
        ``images`` (n_defocus, ny, nx) counts or intensity, ``mask`` (ny, nx) bool,
        ``actual_defocus_nm`` (n_defocus,) relative to the calibrated zero,
        ``zero_defocus_offset_nm`` (that zero relative to the exit plane), ``n_particles``,
        ``radii_nm``, ``substrate_thickness_nm``, ``n_atoms``, ``index``, and ``per_image``:
        None, or (when the config draws imaging conditions per image) a dict of arrays
        (n_defocus,) named in :data:`.conditions.PER_IMAGE_FIELDS`.
    """
    from .conditions import draw_conditions, form_images, imaging_rngs
    from .physics import (
        abtem_settings,
        apply_dose,
        defocus_series,
        exit_waves,
        particle_reference,
    )
    from .structures import build_specimen

    if isinstance(config, dict):
        config = SimulationConfig(**config)
    rng, rng_noise, phonon_seed = _rngs(config.seed, index)
    spec = build_specimen(config, rng)
    nominal = np.asarray(config.defocus_nm, dtype=float)
    actual_nm = nominal + rng.normal(0.0, config.defocus_jitter_nm, nominal.size)
    # abTEM's settings only for this structure's work: the user's session keeps its own
    with _single_threaded_dask(), abtem_settings():
        mask, zero_A = particle_reference(spec.particle_atoms, config, device=device)
        waves = exit_waves(spec.atoms, config, phonon_seed, device=device)
        # defoci are relative to the particles' minimum-contrast focus; the CTF needs them
        # relative to the exit plane of the cell
        defocus_A = actual_nm * 10.0 + zero_A
        if config.varies_per_image:
            rng_cond, rng_field = imaging_rngs(config.seed, index)
            conditions = draw_conditions(config, nominal.size, rng_cond)
            images = form_images(waves, config, defocus_A, conditions, rng_noise, rng_field)
        else:
            conditions = None
            intensity = defocus_series(waves, config, defocus_A)
    if conditions is None:
        images = apply_dose(intensity, config.dose_e_per_A2, config.sampling_A, rng_noise)
    return {
        "per_image": conditions,
        "index": index,
        "images": images,
        "mask": mask,
        "actual_defocus_nm": actual_nm,
        "zero_defocus_offset_nm": zero_A / 10.0,
        "n_particles": int(len(spec.radii_A)),
        "radii_nm": (spec.radii_A / 10).tolist(),
        "substrate_thickness_nm": spec.substrate_thickness_A / 10,
        "n_atoms": int(len(spec.atoms)),
        "stacking_faults": list(spec.stacking_faults or []),
    }


@contextlib.contextmanager
def _single_threaded_dask():
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def _check_resources(config: SimulationConfig) -> None:
    need = config.memory_estimate_bytes()
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    if need > 0.8 * avail:
        raise ConfigError(
            f"a multislice grid of {config.sim_gpts}² points with {config.n_phonons} phonons needs "
            f"about {need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB available: use a "
            f"coarser sim_sampling_A (now {config.sim_sampling_A} Å), fewer n_phonons, or a "
            "smaller image_size_px",
            "sim_sampling_A",
            fields=("n_phonons", "image_size_px"),
        )


def _iter_results(config: SimulationConfig, workers: int, client, device: str):
    """Yield per-structure results (in completion order)."""
    cfg = config.model_dump()
    n = config.n_structures
    if client is None and workers <= 1:
        for i in range(n):
            yield simulate_structure(cfg, i, device)
        return
    from distributed import Client, LocalCluster, as_completed

    own = None
    if client is None:
        own = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(own)
    try:
        futures = client.map(simulate_structure, [cfg] * n, range(n), [device] * n, pure=False)
        for fut in as_completed(futures):
            yield fut.result()
            fut.release()
    finally:
        if own is not None:
            client.close()
            own.close()


def simulate_dataset(
    config: SimulationConfig,
    workers: int = 1,
    client=None,
    progress: bool | Callable[[int, int], None] = False,
    device: str = "cpu",
):
    """Simulate ``config.n_structures`` structures at every defocus of ``config``.

    Parameters
    ----------
    config
        The validated :class:`SimulationConfig`.
    workers
        Processes of a temporary local dask cluster (1 = run in this process).
    client
        An existing :class:`dask.distributed.Client`; used instead of ``workers`` if given.
    progress
        True for a terminal progress bar, or a callable ``progress(done, total)``.
    device
        ``"cpu"``, or ``"gpu"`` to run abTEM on CuPy.

    Returns
    -------
    HRTEMDataset
    """
    _check_resources(config)
    if device == "gpu":
        try:
            import cupy  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "device 'gpu' needs CuPy and a CUDA GPU; use device 'cpu'", "device"
            ) from exc
    t0 = time.perf_counter()
    arrays = _collect(config, _iter_results(config, workers, client, device), progress)
    return _dataset(config, arrays, elapsed_s=time.perf_counter() - t0)


#: The per-structure record of ``info["structures"]`` (keys of a structure's result).
_STRUCTURE_KEYS = (
    "n_particles",
    "radii_nm",
    "substrate_thickness_nm",
    "n_atoms",
    "stacking_faults",
    "zero_defocus_offset_nm",
)


def _collect(
    config: SimulationConfig, results, progress: bool | Callable[[int, int], None]
) -> dict:
    """Place the structures' results (in any order) by index: ``images`` (defocus, structure,
    y, x), ``masks``, ``actual`` defocus [nm] (defocus, structure), the ``per_image``
    conditions and the ``per_structure`` records, reporting progress as they arrive."""
    n, nd, size = config.n_structures, len(config.defocus_nm), config.image_size_px
    images = None
    masks = np.zeros((n, size, size), bool)
    actual = np.zeros((nd, n))
    per_image: dict[str, np.ndarray] = {}
    per_structure: list[dict] = [{} for _ in range(n)]
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="simulating structures", unit="structure")
    try:
        for done, r in enumerate(results, start=1):
            i = r["index"]
            if images is None:
                images = np.zeros((nd, n, size, size), r["images"].dtype)
            if r["images"].dtype.itemsize > images.dtype.itemsize:
                images = images.astype(r["images"].dtype)
            images[:, i] = r["images"]
            masks[i] = r["mask"]
            actual[:, i] = r["actual_defocus_nm"]
            for key, values in (r.get("per_image") or {}).items():
                per_image.setdefault(key, np.full((nd, n), np.nan))[:, i] = values
            per_structure[i] = {k: r[k] for k in _STRUCTURE_KEYS}
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, n)
    except ConfigError:
        raise
    except MemoryError as exc:
        raise SimulationError(
            f"out of memory while simulating: {exc}; reduce image_size_px or n_phonons"
        ) from exc
    finally:
        if bar is not None:
            bar.close()
    return {
        "images": images,
        "masks": masks,
        "actual": actual,
        "per_image": per_image,
        "per_structure": per_structure,
    }


def _dataset(config: SimulationConfig, arrays: dict, elapsed_s: float):
    """The :class:`~..io.dataset.HRTEMDataset` of the collected arrays, with its provenance."""
    from ..io.dataset import HRTEMDataset
    from ..io.provenance import SIMULATION_PACKAGES, package_versions

    n, per_image = config.n_structures, arrays["per_image"]
    ids = np.array([f"{config.material}-seed{config.seed}-{i:05d}" for i in range(n)])
    info_extra = {}
    if per_image:
        from .conditions import PER_IMAGE_FIELDS

        info_extra["per_image"] = {
            k: np.where(np.isnan(v), None, v).tolist() for k, v in per_image.items()
        }
        info_extra["per_image_units"] = {k: PER_IMAGE_FIELDS[k] for k in per_image}
    dose = config.dose_e_per_A2
    if dose is not None and config.dose_range_e_per_A2 is not None:
        dose = float(np.sqrt(np.prod(config.dose_range_e_per_A2)))
    return HRTEMDataset(
        images=arrays["images"],
        defocus_nm=np.asarray(config.defocus_nm),
        sampling_A=config.sampling_A,
        masks=arrays["masks"],
        structure_ids=ids,
        materials=np.array([config.material] * n),
        actual_defocus_nm=arrays["actual"],
        dose_e_per_A2=dose,
        energy_eV=config.energy_eV,
        info={
            "title": f"Simulated HRTEM defocus series: {config.material}, {n} structures",
            "kind": "simulated_defocus_series",
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "seeding": "structure i uses numpy SeedSequence(seed, spawn_key=(i,))",
            "structures": arrays["per_structure"],
            **info_extra,
            "elapsed_s": elapsed_s,
            "versions": package_versions(SIMULATION_PACKAGES),
        },
    )


def simulate_to_file(
    config: SimulationConfig,
    path: str | os.PathLike,
    workers: int = 1,
    client=None,
    progress: bool | Callable[[int, int], None] = False,
    device: str = "cpu",
) -> Path:
    """Simulate and write a ``.hspy`` dataset atomically (see :func:`simulate_dataset`)."""
    from ..io.atomic import check_writable
    from ..io.dataset import save_dataset

    path = Path(path)
    if path.suffix != ".hspy":
        raise ConfigError(
            f"path {path}: the dataset is written as HyperSpy .hspy; use a name ending in .hspy",
            "path",
        )
    path = check_writable(path)
    ds = simulate_dataset(config, workers=workers, client=client, progress=progress, device=device)
    return save_dataset(ds, path)
