"""Write per-frame results (masks, probabilities) on the input's own axes: the one writer.

:func:`write_result` writes an array ``(..., ny, nx)`` with the axes of the
:class:`~napari_hrtem_transfer.io.frames.Frames` it was computed from:

``.hspy``
    every axis (navigation and signal: names, units, scales, offsets, non-uniform values
    such as a defocus series in nm), the input's microscope metadata, the session table
    (``metadata.HRTEM_transfer.session``: the file of each frame, the defocus and its
    source) and the provenance (``metadata.HRTEM_transfer.provenance_json``);
``.tif`` / ``.tiff``
    the frames flattened to one stack, the pixel size in nm (ImageJ tags);
``.npy``
    the array as is.

Files are written under a temporary name and renamed when complete
(:mod:`napari_hrtem_transfer.io.atomic`).  HyperSpy and tifffile are imported inside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["RESULT_SUFFIXES", "write_result"]

#: Suffixes :func:`write_result` writes.
RESULT_SUFFIXES = (".hspy", ".tif", ".tiff", ".npy")

_AXIS_KEYS = ("name", "size", "scale", "offset", "units", "navigate", "axis")


def _clean_axes(axes: list[dict[str, Any]], ndim: int) -> list[dict[str, Any]]:
    out = []
    for k, a in enumerate(axes):
        d = {key: v for key, v in a.items() if key in _AXIS_KEYS and v is not None}
        if d.get("axis") is not None:
            d["axis"] = np.asarray(d["axis"], dtype=float)
        d["navigate"] = k < ndim - 2
        out.append(d)
    return out


def _session_node(source: Any) -> dict[str, Any] | None:
    session = getattr(source, "session", None)
    if session:
        return dict(session)
    files = list(getattr(source, "sources", None) or [])
    return {"files": files} if files else None


def write_result(
    path: str | os.PathLike,
    array: Any,
    *,
    axes: list[dict[str, Any]],
    sampling_A: float | None,
    title: str,
    quantity: str | None = None,
    source: Any = None,
    provenance: dict[str, Any] | None = None,
    to: str | os.PathLike | None = None,
) -> Path:
    """Write ``array`` to ``path`` (format from its suffix), keeping the input's axes.

    Parameters
    ----------
    path
        The final file (``.hspy``, ``.tif``/``.tiff`` or ``.npy``).
    array
        ``(..., ny, nx)``, the navigation shape of ``axes``.
    axes
        Axis dicts in array order (navigation..., y, x), e.g. ``SegmentationResult.axes``.
    sampling_A
        Pixel size [Å/px] for the TIFF resolution tags.
    title, quantity
        ``metadata.General.title`` and ``metadata.Signal.quantity`` (``.hspy``).
    source
        The :class:`~napari_hrtem_transfer.io.frames.Frames` the result was computed from:
        its beam energy, acquisition mode, session table and file go into the metadata.
    provenance
        Plain values stored as JSON in ``metadata.HRTEM_transfer.provenance_json``.
    to
        Write to this (temporary) file instead, leaving the rename to the caller
        (:class:`~napari_hrtem_transfer.io.atomic.AtomicGroup`); by default the file is
        written atomically here.

    Returns
    -------
    Path
        ``path``.
    """
    from .atomic import atomic_path

    final = Path(path)
    suffix = final.suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise ConfigError(
            f"{final}: choose a name ending in {', '.join(RESULT_SUFFIXES)}.", "--out"
        )
    arr = np.asarray(array)
    if to is not None:
        _write(Path(to), suffix, arr, axes, sampling_A, title, quantity, source, provenance)
    else:
        with atomic_path(final) as tmp:
            _write(tmp, suffix, arr, axes, sampling_A, title, quantity, source, provenance)
    return final


def _write(
    tmp: Path,
    suffix: str,
    arr: np.ndarray,
    axes: list[dict[str, Any]],
    sampling_A: float | None,
    title: str,
    quantity: str | None,
    source: Any,
    provenance: dict[str, Any] | None,
) -> None:
    if suffix == ".npy":
        np.save(tmp, arr)
        return
    if suffix in (".tif", ".tiff"):
        import tifffile

        kw: dict[str, Any] = {}
        if sampling_A:
            nm = sampling_A / 10.0
            kw = {"resolution": (1.0 / nm, 1.0 / nm), "imagej": True, "metadata": {"unit": "nm"}}
        flat = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 3 else arr
        tifffile.imwrite(tmp, flat, **kw)
        return
    from .hyperspy_integration import to_signal  # the one array -> signal conversion

    s = to_signal(arr, axes=_clean_axes(axes, arr.ndim), title=title)
    if quantity:
        s.metadata.set_item("Signal.quantity", quantity)
    meta = getattr(source, "metadata", None) or {}
    energy = meta.get("energy_eV")
    if energy:
        s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(energy) / 1e3)
    if meta.get("acquisition_mode"):
        s.metadata.set_item("Acquisition_instrument.TEM.acquisition_mode", meta["acquisition_mode"])
    session = _session_node(source)
    if session:
        s.metadata.set_item("HRTEM_transfer.session", session)
    if provenance is not None:
        s.metadata.set_item("HRTEM_transfer.provenance_json", json.dumps(provenance, default=str))
    if source is not None:
        where = getattr(source, "path", None) or getattr(source, "name", "")
        s.metadata.set_item("HRTEM_transfer.source", str(where))
    s.save(tmp, overwrite=True)
