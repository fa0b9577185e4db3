"""Units and geometry of frames: the length-unit table, axis dicts, pixel-size discovery.

Every reader goes through these rules (re-exported by :mod:`napari_hrtem_transfer.io.frames`):
:func:`length_unit_to_A` and :func:`unit_kind` for units, :func:`axis_dict`,
:func:`axis_from_values` and :func:`default_axes` for rosettasciio-style axis dicts, and
:func:`calibration` / :func:`sampling_from_axes` for the pixel size [Å/px]. Every guess or
conversion is a :class:`ReaderWarning` and a note.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "NotAnImage",
    "PixelGrid",
    "ReaderWarning",
    "axis_dict",
    "axis_from_values",
    "calibration",
    "check_real_space",
    "default_axes",
    "length_unit_to_A",
    "normalise_units",
    "sampling_from_axes",
    "unit_kind",
]


class ReaderWarning(UserWarning):
    """Something in a file was skipped, guessed or converted; the message says what."""


# ----------------------------------------------------------------------------- units

_UNDEFINED_UNITS = {"", "<undefined>", "undefined", "none", "px", "pixel", "pixels"}

# Length units -> factor to Ångström.  Keys are compared after normalise_units().
_LENGTH_TO_A: dict[str, float] = {
    "pm": 1e-2,
    "Å": 1.0,
    "A": 1.0,
    "ang": 1.0,
    "angstrom": 1.0,
    "nm": 10.0,
    "µm": 1e4,
    "um": 1e4,
    "micron": 1e4,
    "mm": 1e7,
    "m": 1e10,
}

_ANGLE_UNITS = {"rad", "mrad", "µrad", "urad", "deg", "°", "degree", "degrees"}


def normalise_units(units: Any) -> str | None:
    """Return ``units`` as a clean string, or None if the axis has no units.

    HyperSpy's ``"<undefined>"`` (its ``t.Undefined``), empty strings and pixel units all
    become None. The micro sign variants (µ U+00B5, μ U+03BC) become "µ", and the
    Ångström sign (Å U+212B) becomes "Å".
    """
    if units is None:
        return None
    text = str(units).strip()
    if text.lower() in _UNDEFINED_UNITS:
        return None
    # Berkeley EMD files written by ncempy spell units with an underscore: "n_m", "1/n_m"
    text = re.sub(r"\b([pnuµμ])_m\b", r"\1m", text)
    return text.replace("\u03bc", "\u00b5").replace("\u212b", "\u00c5")


def length_unit_to_A(units: Any) -> float | None:
    """Factor converting one ``units`` of length to Ångström, or None if not a length.

    Examples
    --------
    >>> length_unit_to_A("nm"), length_unit_to_A("um"), length_unit_to_A("pm")
    (10.0, 10000.0, 0.01)
    >>> length_unit_to_A("1/nm") is None
    True
    """
    u = normalise_units(units)
    if u is None:
        return None
    if u in _LENGTH_TO_A:
        return _LENGTH_TO_A[u]
    low = u.lower()
    if low in ("å", "angstrom", "angstroms", "ang"):
        return 1.0
    if low in ("nm", "um", "µm", "pm", "mm", "micron", "microns"):
        return _LENGTH_TO_A.get(low, 1e4)
    return None


def unit_kind(units: str | None) -> str:
    """Classify a (normalised) unit: 'none', 'length', 'reciprocal', 'angle' or 'other'."""
    if units is None:
        return "none"
    if length_unit_to_A(units) is not None:
        return "length"
    low = units.lower().replace(" ", "")
    if low.startswith("1/") or low.endswith(("^-1", "-1", "⁻¹")):
        return "reciprocal"
    if low in _ANGLE_UNITS:
        return "angle"
    return "other"


# ----------------------------------------------------------------------------- axes


class NotAnImage(Exception):
    """Internal: this signal is not a real-space image (message says why)."""


def axis_dict(ax: Any) -> dict[str, Any]:
    """A HyperSpy axis as a rosettasciio-style dict (``axis`` values when non-uniform)."""
    d: dict[str, Any] = {
        "name": None if normalise_units(ax.name) is None else str(ax.name),
        "size": int(ax.size),
        "navigate": bool(ax.navigate),
        "units": normalise_units(ax.units),
    }
    if getattr(ax, "is_uniform", True):
        d["scale"] = float(ax.scale)
        d["offset"] = float(ax.offset)
    else:
        values = np.asarray(ax.axis, dtype=float)
        d["axis"] = values
        d["scale"] = float(np.mean(np.diff(values))) if values.size > 1 else 1.0
        d["offset"] = float(values[0]) if values.size else 0.0
    return d


def axis_from_values(name: str, values: Any, units: str | None) -> dict[str, Any]:
    """A navigation axis dict for coordinate ``values``: uniform when evenly spaced.

    A non-uniform axis keeps its values in ``axis`` (and a mean ``scale``, first value as
    ``offset``, for readers that only know uniform axes).
    """
    values = np.asarray(values, dtype=float).reshape(-1)
    d: dict[str, Any] = {"name": name, "navigate": True, "units": units, "size": int(values.size)}
    steps = np.diff(values)
    if values.size == 1:
        d.update(offset=float(values[0]), scale=1.0)
    elif steps[0] != 0 and np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9):
        d.update(offset=float(values[0]), scale=float(steps[0]))
    else:
        d.update(axis=values, scale=float(np.mean(steps)), offset=float(values[0]))
    return d


def default_axes(shape: tuple[int, ...], sampling_A: float | None) -> list[dict[str, Any]]:
    """Axis dicts of an uncalibrated array ``(..., ny, nx)`` (nm signal axes when known)."""
    nav = [
        {
            "name": "frame" if len(shape) == 3 else f"axis{k}",
            "size": int(n),
            "scale": 1.0,
            "offset": 0.0,
            "units": None,
            "navigate": True,
        }
        for k, n in enumerate(shape[:-2])
    ]
    scale, units = (1.0, None) if sampling_A is None else (float(sampling_A) / 10.0, "nm")
    sig = [
        {"name": n, "size": int(s), "scale": scale, "offset": 0.0, "units": units}
        for n, s in zip(("y", "x"), shape[-2:], strict=True)
    ]
    for a in sig:
        a["navigate"] = False
    return nav + sig


class PixelGrid:
    """Mixin of an image container whose array ``_PIXELS`` (an attribute name) holds the
    pixels in its last two axes (any leading axes: frames, defocus, images)."""

    _PIXELS = "data"

    @property
    def image_shape(self) -> tuple[int, int]:
        """(ny, nx) in pixels."""
        ny, nx = getattr(self, self._PIXELS).shape[-2:]
        return int(ny), int(nx)


def sampling_from_axes(axes: list[dict[str, Any]]) -> float | None:
    """The x (last-axis) pixel size [Å] of axis dicts, or None when not a length."""
    factor = length_unit_to_A(axes[-1].get("units"))
    if factor is None:
        return None
    return float(axes[-1].get("scale", 1.0)) * factor


def check_real_space(axes: list[dict[str, Any]], name: str) -> None:
    """Refuse signal axes in reciprocal units or angles (a diffraction pattern, an FFT).

    Raises
    ------
    ConfigError
        Naming ``name`` and the units.
    """
    for ax in axes[-2:]:
        kind = unit_kind(normalise_units(ax.get("units")))
        if kind in ("reciprocal", "angle"):
            raise ConfigError(
                f"{name}: the image axes are in '{ax.get('units')}', i.e. a diffraction pattern "
                "or another reciprocal-space signal. The models segment real-space HRTEM "
                "images; open a real-space image instead.",
                "data",
            )


def calibration(
    y: dict[str, Any], x: dict[str, Any], label: str, notes: list[str], allow_reciprocal: bool
) -> float | None:
    """Pixel size [Å] from the y and x axis dicts (see :mod:`.readers` for the rules)."""
    ky, kx = unit_kind(y["units"]), unit_kind(x["units"])
    name = label
    if "reciprocal" in (ky, kx) or "angle" in (ky, kx):
        units = x["units"] if kx in ("reciprocal", "angle") else y["units"]
        if not allow_reciprocal:
            raise NotAnImage(
                f"axes are in '{units}', i.e. a diffraction pattern or other "
                "reciprocal-space signal; the segmentation models need a real-space image"
            )
        note = f"{name}: axes in '{units}' (reciprocal space); no real-space pixel size."
        notes.append(note)
        warnings.warn(note, ReaderWarning, stacklevel=4)
        return None
    sy = y["scale"] * length_unit_to_A(y["units"]) if ky == "length" else None
    sx = x["scale"] * length_unit_to_A(x["units"]) if kx == "length" else None
    for kind, ax in ((ky, y), (kx, x)):
        if kind == "other":
            note = (
                f"{name}: axis '{ax['name']}' has units '{ax['units']}', which are not a "
                "length; treated as uncalibrated."
            )
            notes.append(note)
            warnings.warn(note, ReaderWarning, stacklevel=4)
        elif kind == "none" and not math.isclose(ax["scale"], 1.0):
            note = (
                f"{name}: axis '{ax['name']}' has scale {ax['scale']:g} but no units; "
                "treated as uncalibrated."
            )
            notes.append(note)
            warnings.warn(note, ReaderWarning, stacklevel=4)
    for s in (sy, sx):
        if s is not None and not (math.isfinite(s) and s > 0):
            notes.append(f"{name}: non-positive pixel size {s!r} Å ignored.")
            return None
    if sy is not None and sx is not None:
        if not math.isclose(sy, sx, rel_tol=1e-3):
            note = (
                f"{name}: pixels are not square (y {sy:.6g} Å, x {sx:.6g} Å); using the x "
                "pixel size. Resample the image to square pixels before segmenting."
            )
            notes.append(note)
            warnings.warn(note, ReaderWarning, stacklevel=4)
        return float(sx)
    if sx is not None or sy is not None:
        s = sx if sx is not None else sy
        note = f"{name}: only one axis is calibrated; using {s:.6g} Å for both."
        notes.append(note)
        warnings.warn(note, ReaderWarning, stacklevel=4)
        return float(s)
    return None
