"""The simulated-dataset file format (HyperSpy ``.hspy``, HDF5).

One file holds a defocus series of many structures::

    images      Signal2D, data shape (n_defocus, n_images, ny, nx)
                navigation axes: ``image`` (index) x ``defocus`` [nm]; signal axes y, x [nm]
                values: electron counts per pixel (uint16/uint32) when a dose is given,
                otherwise noise-free intensity (float32, vacuum = 1)
    metadata.HRTEM_transfer.masks
                Signal2D (n_images, ny, nx) uint8 ground-truth masks, one per structure,
                shared by every defocus (``None`` if the file has no labels)
    metadata.HRTEM_transfer.info_json
                JSON: the simulation config, seeds, structure ids and materials, each image's
                actual defocus [nm], package versions

Defocus sign convention: abTEM's, ``defocus = -C10``; positive defocus is underfocus.

``hyperspy.api.load(path)`` opens the file directly; :func:`load_dataset` wraps it and checks it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from .atomic import atomic_path
from .geometry import PixelGrid
from .provenance import SIMULATION_PACKAGES, package_versions

FORMAT_VERSION = "1"
DEFOCUS_CONVENTION = (
    "defocus [nm] follows abTEM: defocus = -C10, positive = underfocus, negative = overfocus"
)


def recorded_cs_A(config: dict[str, Any] | None) -> float | None:
    """The Cs [Å] a simulation config set for every image, or None (no config, no Cs, or a
    Cs drawn per image: ``Cs_range_A``)."""
    cfg = config or {}
    cs = cfg.get("Cs_A")
    if cfg.get("Cs_range_A") is None and isinstance(cs, int | float) and np.isfinite(cs):
        return float(cs)
    return None


@dataclass
class HRTEMDataset(PixelGrid):
    """A labelled defocus series of simulated (or labelled experimental) HRTEM images.

    Attributes
    ----------
    images
        Array (n_defocus, n_images, ny, nx): electron counts per pixel, or noise-free
        intensity if ``dose_e_per_A2`` is None.  A dask array when loaded lazily.
    defocus_nm
        Nominal defocus of each domain [nm], shape (n_defocus,), abTEM sign convention.
    sampling_A
        Pixel size [Å/px] (square pixels).
    masks
        Ground truth, bool array (n_images, ny, nx), or None for an unlabelled file.
    structure_ids
        Identifier of the structure in each image, shape (n_images,).  Splits into training
        and validation sets are made by structure id.
    materials
        Material name of each image's particles, shape (n_images,).
    actual_defocus_nm
        Defocus actually used for each image including jitter [nm], shape (n_defocus, n_images).
    dose_e_per_A2
        Electron dose [e/Å²], or None for noise-free images.
    energy_eV
        Acceleration voltage [eV].
    info
        JSON-serialisable provenance: config, seeds, package versions, ...
    path
        File the dataset was read from, if any.
    """

    _PIXELS = "images"  # image_shape (PixelGrid): the last two axes of images

    images: Any
    defocus_nm: np.ndarray
    sampling_A: float
    masks: np.ndarray | None = None
    structure_ids: np.ndarray | None = None
    materials: np.ndarray | None = None
    actual_defocus_nm: np.ndarray | None = None
    dose_e_per_A2: float | None = None
    energy_eV: float = 300e3
    info: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.defocus_nm = np.asarray(self.defocus_nm, dtype=float).reshape(-1)
        shape = tuple(self.images.shape)
        if len(shape) != 4:
            raise DatasetError(
                f"images must have shape (n_defocus, n_images, ny, nx); got shape {shape}."
            )
        n_def, n_img = shape[:2]
        if self.defocus_nm.size != n_def:
            raise DatasetError(
                f"{self.defocus_nm.size} defocus values for {n_def} defocus planes of images."
            )
        if self.structure_ids is None:
            self.structure_ids = np.array([f"s{i:05d}" for i in range(n_img)])
        self.structure_ids = np.asarray(self.structure_ids).astype(str)
        if self.materials is None:
            self.materials = np.array(["unknown"] * n_img)
        self.materials = np.asarray(self.materials).astype(str)
        if self.structure_ids.shape != (n_img,) or self.materials.shape != (n_img,):
            raise DatasetError("structure_ids and materials need one entry per image.")
        if self.masks is not None:
            self.masks = np.asarray(self.masks).astype(bool)
            if self.masks.shape != (n_img, *shape[2:]):
                raise DatasetError(
                    f"masks must have shape {(n_img, *shape[2:])}; got {self.masks.shape}."
                )
        if self.actual_defocus_nm is None:
            self.actual_defocus_nm = np.repeat(self.defocus_nm[:, None], n_img, axis=1)
        self.actual_defocus_nm = np.asarray(self.actual_defocus_nm, dtype=float)

    @property
    def n_defocus(self) -> int:
        """Number of defocus domains."""
        return int(self.images.shape[0])

    @property
    def n_images(self) -> int:
        """Number of structures (images per defocus)."""
        return int(self.images.shape[1])

    def recorded_conditions(self) -> dict[str, float]:
        """What the microscope was set to, for the verdict's Thon-ring fit: ``energy_eV`` [eV]
        and, when one Cs served every image, ``Cs_A`` [Å] (from the simulation config; no
        ``Cs_A`` when the config drew a Cs per image, ``Cs_range_A``)."""
        out = {"energy_eV": float(self.energy_eV)}
        cs = recorded_cs_A(self.info.get("config"))
        if cs is not None:
            out["Cs_A"] = cs
        return out

    def defocus_index(self, defocus_nm: float, tol_nm: float = 0.05) -> int:
        """Index of the domain whose nominal defocus is ``defocus_nm`` [nm].

        Raises
        ------
        DatasetError
            If no domain matches; the message lists the defoci in the file.
        """
        d = np.abs(self.defocus_nm - float(defocus_nm))
        i = int(np.argmin(d))
        if d[i] > tol_nm:
            raise DatasetError(
                f"defocus {defocus_nm:g} nm is not in the dataset"
                f"{' ' + str(self.path) if self.path else ''}; it has "
                f"{', '.join(f'{v:g}' for v in self.defocus_nm)} nm."
            )
        return i


def _axis(name: str, values: np.ndarray, units: str | None) -> dict:
    values = np.asarray(values, dtype=float)
    if values.size > 1:
        steps = np.diff(values)
        uniform = np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9) and steps[0] != 0
    else:
        uniform = True
    if uniform:
        scale = float(values[1] - values[0]) if values.size > 1 else 1.0
        d = {"name": name, "size": int(values.size), "offset": float(values[0]), "scale": scale}
    else:
        d = {"name": name, "axis": values}
    if units:
        d["units"] = units
    return d


def _dataset_signal(ds: HRTEMDataset):
    """Build the HyperSpy signal that :func:`save_dataset` writes (images + masks in metadata)."""
    import hyperspy.api as hs

    n_img = ds.n_images
    ny, nx = ds.image_shape
    s_nm = ds.sampling_A / 10.0
    axes = [
        _axis("defocus", ds.defocus_nm, "nm"),
        {"name": "image", "size": n_img, "offset": 0.0, "scale": 1.0},
        {"name": "y", "size": ny, "offset": 0.0, "scale": s_nm, "units": "nm"},
        {"name": "x", "size": nx, "offset": 0.0, "scale": s_nm, "units": "nm"},
    ]
    s = hs.signals.Signal2D(ds.images, axes=axes)
    s.metadata.Signal.signal_type = "HRTEM_defocus_series"
    if hasattr(ds.images, "dask"):
        s = s.as_lazy()
        s.data = ds.images
    s.metadata.General.title = ds.info.get("title", "Simulated HRTEM defocus series")
    s.metadata.Signal.quantity = (
        "Electron counts (e/px)" if ds.dose_e_per_A2 is not None else "Intensity (vacuum = 1)"
    )
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", ds.energy_eV / 1e3)
    if ds.dose_e_per_A2 is not None:
        s.metadata.set_item("Acquisition_instrument.TEM.dose_e_per_A2", float(ds.dose_e_per_A2))
    node = "HRTEM_transfer"
    s.metadata.set_item(f"{node}.format_version", FORMAT_VERSION)
    s.metadata.set_item(f"{node}.defocus_convention", DEFOCUS_CONVENTION)
    s.metadata.set_item(f"{node}.sampling_A", float(ds.sampling_A))
    info = dict(ds.info)
    info.update(
        {
            "defocus_nm": ds.defocus_nm.tolist(),
            "structure_ids": ds.structure_ids.tolist(),
            "materials": ds.materials.tolist(),
            "actual_defocus_nm": np.asarray(ds.actual_defocus_nm).tolist(),
            "dose_e_per_A2": ds.dose_e_per_A2,
            "energy_eV": ds.energy_eV,
            "sampling_A": ds.sampling_A,
            "versions": info.get("versions") or package_versions(SIMULATION_PACKAGES),
        }
    )
    s.metadata.set_item(f"{node}.info_json", json.dumps(info))
    if ds.masks is not None:
        m = hs.signals.Signal2D(
            ds.masks.astype(np.uint8),
            axes=[
                {"name": "image", "size": n_img, "offset": 0.0, "scale": 1.0},
                {"name": "y", "size": ny, "offset": 0.0, "scale": s_nm, "units": "nm"},
                {"name": "x", "size": nx, "offset": 0.0, "scale": s_nm, "units": "nm"},
            ],
        )
        m.metadata.General.title = "Ground-truth particle masks (shared by all defoci)"
        s.metadata.set_item(f"{node}.masks", m)
    return s


def save_dataset(ds: HRTEMDataset, path: str | os.PathLike, chunks: bool = True) -> Path:
    """Write ``ds`` to ``path`` (``.hspy``), atomically.

    Images are chunked one image per chunk so that large files load lazily.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    if path.suffix != ".hspy":
        raise DatasetError(
            f"{path}: datasets are written as HyperSpy .hspy files; use a name ending in .hspy."
        )
    s = _dataset_signal(ds)
    ny, nx = ds.image_shape
    with atomic_path(path) as tmp:
        s.save(tmp, overwrite=True, chunks=(1, 1, ny, nx) if chunks else None)
    return path


def load_dataset(path: str | os.PathLike, lazy: bool = True) -> HRTEMDataset:
    """Read a dataset written by :func:`save_dataset` (or ``hrtem-transfer simulate``).

    Parameters
    ----------
    path
        The ``.hspy`` file.
    lazy
        Keep images on disk as a dask array (masks are always read into memory).

    Raises
    ------
    DatasetError
        If the file is missing, unreadable or not a napari-hrtem-transfer dataset.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"dataset {path} does not exist. Create one with 'hrtem-transfer simulate'."
        )
    import hyperspy.api as hs

    try:
        s = hs.load(path, lazy=lazy)
    except Exception as exc:  # noqa: BLE001 - hyperspy raises many types
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    if isinstance(s, list) or not s.metadata.has_item("HRTEM_transfer.info_json"):
        raise DatasetError(
            f"{path} is not a napari-hrtem-transfer dataset (no metadata.HRTEM_transfer). "
            "Simulate one with 'hrtem-transfer simulate', or read experimental images with "
            "napari_hrtem_transfer.io.read_images."
        )
    info = json.loads(s.metadata.HRTEM_transfer.info_json)
    masks = None
    if s.metadata.has_item("HRTEM_transfer.masks"):
        m = s.metadata.HRTEM_transfer.masks
        masks = np.asarray(m.data if not hasattr(m.data, "compute") else m.data.compute())
    data = s.data
    if data.ndim == 3:  # a single defocus plane saved without its axis
        data = data[None]
    return HRTEMDataset(
        images=data,
        defocus_nm=np.asarray(info["defocus_nm"], dtype=float),
        sampling_A=float(info["sampling_A"]),
        masks=masks,
        structure_ids=np.asarray(info.get("structure_ids")) if info.get("structure_ids") else None,
        materials=np.asarray(info.get("materials")) if info.get("materials") else None,
        actual_defocus_nm=np.asarray(info["actual_defocus_nm"])
        if info.get("actual_defocus_nm")
        else None,
        dose_e_per_A2=info.get("dose_e_per_A2"),
        energy_eV=float(info.get("energy_eV", 300e3)),
        info=info,
        path=path,
    )
