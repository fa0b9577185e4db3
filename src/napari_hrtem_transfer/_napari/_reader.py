"""napari reader: experimental images and simulated defocus series as napari layers.

This module converts :mod:`napari_hrtem_transfer.io` objects into napari ``LayerData``
tuples ``(data, kwargs, layer_type)``; it imports neither napari nor Qt, so the conversions
are testable without a viewer.

Layer conventions
-----------------
* ``scale`` of the image axes is the pixel size in **nm** and ``units`` are ``"nm"`` (napari
  0.9 layer units); uncalibrated images get scale 1 and ``"pixel"``; diffraction patterns
  keep their reciprocal units (e.g. ``"1/nm"``). HyperSpy's ``"<undefined>"`` never
  reaches napari.
* ``metadata`` holds ``sampling_A`` (pixel size [Å] or None, what the segmentation widget
  uses), ``units``, ``path`` and the reader's notes and vendor metadata.
* A simulated dataset gives an image layer ``(defocus, image, y, x)`` and a Labels layer
  of the ground-truth masks, the same mask for every defocus. When the defoci are evenly
  spaced the defocus axis is calibrated in nm (abTEM sign: positive = underfocus), so
  napari's slider shows the defocus.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.readers import SUPPORTED_EXTENSIONS, ExperimentalImage, ReaderWarning, read_images

LayerData = tuple[Any, dict[str, Any], str]

#: Above this many bytes the broadcast mask stack stays a read-only view.
_MAX_EDITABLE_MASK_BYTES = 256 * 2**20


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]) -> Callable | None:
    """Return :func:`read_layers` if every path has a supported extension, else None.

    Parameters
    ----------
    path
        One path or a list of paths (napari passes a list when several files are dropped).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths:
        return None
    if all(Path(p).suffix.lower() in SUPPORTED_EXTENSIONS for p in paths):
        return read_layers
    return None


def read_layers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData]:
    """Read one or several files into napari layer data.

    Diffraction patterns are shown (with their reciprocal units) rather than refused; a
    :class:`~napari_hrtem_transfer.io.readers.ReaderWarning` says that they cannot be
    segmented.

    Raises
    ------
    napari_hrtem_transfer.errors.ReaderError
        If a file cannot be read; the message names the file and what to do.
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        p = Path(p)
        if p.suffix.lower() == ".hspy" and _is_simulated_dataset(p):
            from ..io.dataset import load_dataset

            layers.extend(dataset_to_layer_data(load_dataset(p, lazy=True)))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            images = read_images(p, allow_reciprocal=True)
        layers.extend(image_to_layer_data(im) for im in images)
    return layers


def _is_simulated_dataset(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            exp = f.get("Experiments")
            return exp is not None and any(
                "metadata" in exp[k] and "HRTEM_transfer" in exp[k]["metadata"] for k in exp
            )
    except OSError:
        return False


def _json_friendly(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "hyperspy"}


def _robust_limits(frames: np.ndarray) -> tuple[float, float]:
    """0.5-99.5 percentile contrast limits (min/max if flat)."""
    sample = np.asarray(frames, dtype=np.float32)
    if sample.size > 2**22:
        sample = sample.reshape(-1)[:: sample.size // 2**22 + 1]
    lo, hi = np.nanpercentile(sample, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(np.nanmin(sample)), float(np.nanmax(sample))
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def image_to_layer_data(image: ExperimentalImage) -> LayerData:
    """One :class:`ExperimentalImage` as an image ``LayerData`` with scale in nm.

    A single frame becomes a 2-D layer, a stack a 3-D layer (frame, y, x).  The y and x
    offsets of the file's axes become the layer's translate (in nm, like the scale).
    """
    from ..io.geometry import length_unit_to_A

    y_ax, x_ax = image.axes[1], image.axes[2]

    def offset_nm(ax: dict) -> float:
        to_A = length_unit_to_A(ax.get("units"))
        return float(ax.get("offset") or 0.0) * to_A / 10.0 if to_A else 0.0

    meta = _json_friendly(image.metadata)
    # a layer's ``defocus_nm`` lists the frames' defocus [nm] (a defocus axis); the one value a
    # vendor file reports for all its frames (abTEM sign) becomes ``file_defocus_nm``
    if meta.get("defocus_nm") is not None and np.ndim(meta["defocus_nm"]) == 0:
        meta["file_defocus_nm"] = float(meta.pop("defocus_nm"))
    if image.sampling_A is not None:
        sy_A = meta.get("sampling_A_y") or image.sampling_A
        sx_A = meta.get("sampling_A_x") or image.sampling_A
        yx_scale = (float(sy_A) / 10.0, float(sx_A) / 10.0)
        yx_units = ("nm", "nm")
        yx_offset = (offset_nm(y_ax), offset_nm(x_ax))
    elif image.metadata.get("reciprocal_sampling"):
        yx_scale = (float(y_ax["scale"]), float(x_ax["scale"]))
        yx_units = (_pint_units(y_ax["units"]), _pint_units(x_ax["units"]))
        yx_offset = (float(y_ax.get("offset") or 0.0), float(x_ax.get("offset") or 0.0))
    else:
        yx_scale, yx_units = (1.0, 1.0), ("pixel", "pixel")
        yx_offset = (0.0, 0.0)
    frame_name = image.axes[0].get("name") or "frame"
    nav = _navigation_axes(image)
    translate: tuple[float, ...] | None = yx_offset if any(yx_offset) else None
    if image.n_frames == 1:
        data = image.data[0]
        scale, units, labels = yx_scale, yx_units, ("y", "x")
    elif nav is not None:  # several navigation axes (defocus x image, ...): kept, not flattened
        axes = [_layer_axis(a, k) for k, a in enumerate(nav)]
        data = image.data.reshape(*(int(a["size"]) for a in nav), *image.data.shape[-2:])
        scale = (*(a["scale"] for a in axes), *yx_scale)
        translate = (*(a["translate"] for a in axes), *yx_offset)
        units = (*(a["units"] for a in axes), *yx_units)
        labels = (*(a["label"] for a in axes), "y", "x")
        for a in axes:
            if a["defocus_nm"] is not None:
                meta["defocus_nm"] = a["defocus_nm"]
                meta["defocus_convention"] = "abTEM: defocus = -C10, positive = underfocus"
            elif a["values"] is not None:
                meta.setdefault("axis_values", {})[a["label"]] = a["values"]
                meta.setdefault("axis_units", {})[a["label"]] = a["values_units"]
    else:
        single = _layer_axis(image.axes[0], 0)
        data = image.data
        scale, units = (single["scale"], *yx_scale), (single["units"], *yx_units)
        labels = (single["label"] if single["defocus_nm"] is not None else frame_name, "y", "x")
        if single["translate"] or any(yx_offset):
            translate = (single["translate"], *yx_offset)
        if single["defocus_nm"] is not None:
            meta["defocus_nm"] = single["defocus_nm"]
        elif single["values"] is not None:
            meta["axis_values"] = {labels[0]: single["values"]}
            meta["axis_units"] = {labels[0]: single["values_units"]}
    meta.update(
        {
            "sampling_A": image.sampling_A,
            "units": list(units),
            "path": str(image.path) if image.path else None,
            "kind": "simulated" if meta.get("simulated") else "experimental",
            "original_metadata": image.original_metadata,
        }
    )
    kwargs = {
        "name": image.name,
        "scale": scale,
        "units": units,
        "axis_labels": labels,
        "metadata": meta,
        "colormap": "gray",
        "contrast_limits": _robust_limits(data),
    }
    if translate is not None:
        kwargs["translate"] = translate
    return (data, kwargs, "image")


#: Length units of a defocus axis -> nm.
_TO_NM = {"nm": 1.0, "nanometer": 1.0, "µm": 1e3, "um": 1e3, "micrometer": 1e3, "Å": 0.1,
          "A": 0.1, "angstrom": 0.1, "pm": 1e-3, "picometer": 1e-3}


def _navigation_axes(image: ExperimentalImage) -> list[dict[str, Any]] | None:
    """The navigation axes of an image whose frames are a flattened grid (slowest first),
    when there are several and their sizes multiply to the number of frames."""
    nav = image.axes[0].get("navigation_axes")
    if not nav or len(nav) < 2:
        return None
    if int(np.prod([int(a["size"]) for a in nav])) != int(image.n_frames):
        return None
    return [dict(a) for a in nav]


def _layer_axis(ax: dict[str, Any], k: int) -> dict[str, Any]:
    """A navigation axis as a napari layer axis.

    A defocus axis in a length unit becomes a calibrated axis in nm when its values are evenly
    spaced and increasing (the slider shows the defocus); otherwise (a non-uniform defocus
    axis cannot be a layer scale) the layer axis is the index and the values [nm] go into
    ``defocus_nm`` (the layer's metadata; the Segment dock gives each frame its defocus from
    them). Other axes keep their scale, offset and unit when they are uniform and increasing (a
    time axis in s: the slider shows the time); a non-uniform or decreasing one is the index,
    its values and unit kept in ``values`` and ``values_units`` (the layer's ``axis_values`` /
    ``axis_units`` metadata, which the jobs give back to the core as the axis' values).
    """
    name = str(ax.get("name") or ("frame" if k == 0 else f"axis{k}"))
    size = int(ax.get("size", 1))
    values = ax.get("axis")
    if values is None:
        values = float(ax.get("offset", 0.0)) + float(ax.get("scale", 1.0)) * np.arange(size)
    values = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"label": name, "scale": 1.0, "translate": 0.0, "units": "pixel",
                           "defocus_nm": None, "values": None}
    factor = _TO_NM.get(str(ax.get("units") or "").strip())
    if name.lower().startswith("defocus") and factor is not None and values.size == size:
        nm = values * factor
        out["label"] = "defocus"
        out["defocus_nm"] = [float(v) for v in nm]
        steps = np.diff(nm)
        if nm.size > 1 and steps[0] > 0 and np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9):
            out.update(scale=float(steps[0]), translate=float(nm[0]), units="nm")
        elif nm.size == 1:
            out.update(translate=float(nm[0]), units="nm")
    elif ax.get("axis") is not None:
        out["values"] = [float(v) for v in values]
        out["values_units"] = _pint_units(ax.get("units"))
    else:
        step, start = float(ax.get("scale", 1.0)), float(ax.get("offset", 0.0))
        if np.isfinite(step) and step > 0 and np.isfinite(start):  # napari needs scale > 0
            out.update(scale=step, translate=start, units=_pint_units(ax.get("units")))
        elif np.isfinite(values).all():  # a decreasing axis: the index, its values kept
            out["values"] = [float(v) for v in values]
            out["values_units"] = _pint_units(ax.get("units"))
    return out


def _pint_units(units: str | None) -> str:
    """A unit string napari (pint) accepts; 'pixel' when unknown."""
    if not units:
        return "pixel"
    try:
        import pint

        pint.get_application_registry().Unit(units.replace("µ", "u").replace("Å", "angstrom"))
    except Exception:  # noqa: BLE001 - pint raises several error types
        return "pixel"
    return units.replace("µ", "u").replace("Å", "angstrom")


def dataset_to_layer_data(ds: Any, name: str | None = None) -> list[LayerData]:
    """A simulated :class:`~napari_hrtem_transfer.io.HRTEMDataset` as napari layers.

    Parameters
    ----------
    ds
        The dataset; ``images`` may be a dask array (kept lazy).
    name
        Layer name; defaults to the file stem or "simulated defocus series".

    Returns
    -------
    list of LayerData
        The image stack (defocus, image, y, x) and, if the dataset has masks, a Labels
        layer of the masks broadcast over defocus (label 1 = particle).
    """
    name = name or (Path(ds.path).stem if getattr(ds, "path", None) else "simulated defocus series")
    defocus = np.asarray(ds.defocus_nm, dtype=float)
    s_nm = float(ds.sampling_A) / 10.0
    steps = np.diff(defocus)
    if defocus.size > 1 and np.allclose(steps, steps[0]) and steps[0] > 0:
        d_scale, d_translate, d_units = float(steps[0]), float(defocus[0]), "nm"
    else:
        d_scale, d_translate, d_units = 1.0, 0.0, "pixel"
    scale = (d_scale, 1.0, s_nm, s_nm)
    translate = (d_translate, 0.0, 0.0, 0.0)
    units = (d_units, "pixel", "nm", "nm")
    labels = ("defocus", "image", "y", "x")
    meta = {
        "kind": "simulated",
        "sampling_A": float(ds.sampling_A),
        "defocus_nm": defocus.tolist(),
        "defocus_convention": "abTEM: defocus = -C10, positive = underfocus",
        "dose_e_per_A2": ds.dose_e_per_A2,
        "energy_eV": float(ds.energy_eV),
        "structure_ids": np.asarray(ds.structure_ids).tolist(),
        "materials": np.asarray(ds.materials).tolist(),
        "path": str(ds.path) if getattr(ds, "path", None) else None,
        "units": list(units),
    }
    first = np.asarray(ds.images[:, 0])
    layers: list[LayerData] = [
        (
            ds.images,
            {
                "name": name,
                "scale": scale,
                "translate": translate,
                "units": units,
                "axis_labels": labels,
                "metadata": meta,
                "colormap": "gray",
                "contrast_limits": _robust_limits(first),
            },
            "image",
        )
    ]
    if ds.masks is not None:
        masks = np.asarray(ds.masks).astype(np.uint8)
        shape = (ds.n_defocus, *masks.shape)
        if np.prod(shape) <= _MAX_EDITABLE_MASK_BYTES:
            labels_data = np.broadcast_to(masks[None], shape).copy()
        else:
            labels_data = np.broadcast_to(masks[None], shape)
        layers.append(
            (
                labels_data,
                {
                    "name": f"{name} masks",
                    "scale": scale,
                    "translate": translate,
                    "units": units,
                    "axis_labels": labels,
                    "metadata": {**meta, "kind": "ground truth"},
                    "opacity": 0.4,
                },
                "labels",
            )
        )
    return layers


__all__ = [
    "ReaderWarning",
    "dataset_to_layer_data",
    "image_to_layer_data",
    "napari_get_reader",
    "read_layers",
]
