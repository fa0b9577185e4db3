"""Experimental HRTEM images: vendor files -> calibrated grey-level frames.

:func:`read_images` opens a file with HyperSpy/RosettaSciIO (imported inside the
functions, so importing this module is cheap) and returns one :class:`ExperimentalImage`
per image signal in the file. Supported formats:

=========================  ====================================================
extension                  notes
=========================  ====================================================
``.dm3``, ``.dm4``         Gatan DigitalMicrograph (images and image stacks)
``.emd``                   Velox (Thermo Fisher); one entry per image signal,
                           non-image signals (spectra, spectrum images) skipped
``.ser``, ``.emi``         TIA (FEI); ``.emi`` adds the microscope metadata
``.mrc``                   MRC (Direct Electron, cryo-EM stacks, ...)
``.tif``, ``.tiff``        TIFF incl. DigitalMicrograph, ImageJ and TVIPS
                           calibration tags; RGB is converted to grey
``.hspy``                  HyperSpy files, and this package's simulated
                           datasets (one entry per defocus)
``.npy``                   NumPy arrays (2-D, or stacks (..., ny, nx); uncalibrated)
``.png``, ``.jpg``         plain images (uncalibrated; e.g. label masks)
=========================  ====================================================

Calibration
-----------
``sampling_A`` is the pixel size [Å/px] taken from the signal axes, converted from pm,
Å, nm, µm ("um"), mm or m. Pixels that are not square trigger a :class:`ReaderWarning`
and the x (last-axis) pixel size is used. Files without a spatial calibration (scale 1
and no units, or HyperSpy's ``"<undefined>"``) give ``sampling_A = None``; HyperSpy's
``"<undefined>"`` unit is mapped to ``None`` everywhere.

Diffraction patterns and other reciprocal-space data
-----------------------------------------------------
The segmentation models work on real-space images, so a signal whose axes are in
reciprocal units (``1/nm``, ``nm^-1``, ...) or angles (``mrad``) is **refused**: a file
holding only such signals raises :class:`~napari_hrtem_transfer.errors.ReaderError`, and
such signals in a multi-signal file are skipped with a warning. Pass
``allow_reciprocal=True`` to read them anyway (the napari reader does, so users can look
at a diffraction pattern); they then have ``sampling_A = None`` and keep their units in
``axes`` and ``metadata["reciprocal_sampling"]``.

Metadata
--------
``metadata`` holds, when the file records them: ``energy_eV`` (beam energy [eV]),
``acquisition_mode`` ("TEM"/"STEM"), ``microscope``, ``magnification``,
``vendor_defocus_nm`` (the defocus read-out as the vendor writes it [nm]), ``defocus_nm``
(the same value in abTEM's sign convention, ``defocus = -C10``, positive = underfocus;
only for Thermo Fisher/FEI files, whose read-out is negative for underfocus, and only
relative to the focus reference the operator set) and ``Cs_A`` (spherical aberration [Å],
DigitalMicrograph "Cs(mm)" tag, only when non-zero: DM writes 0 when it is not known).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReaderError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ExperimentalImage",
    "ReaderWarning",
    "is_supported",
    "length_unit_to_A",
    "normalise_units",
    "read_images",
]

#: File extensions :func:`read_images` understands (lower case, with the dot).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".dm3",
    ".dm4",
    ".emd",
    ".ser",
    ".emi",
    ".mrc",
    ".tif",
    ".tiff",
    ".hspy",
    ".npy",
    ".png",
    ".jpg",
    ".jpeg",
)

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

# ITU-R BT.601 luma weights (what Pillow's convert("L") uses).
_LUMA = {"R": 0.299, "G": 0.587, "B": 0.114}


class ReaderWarning(UserWarning):
    """Something in a file was skipped, guessed or converted; the message says what."""


@dataclass
class ExperimentalImage:
    """Grey-level frames read from one signal of an experimental file.

    Attributes
    ----------
    data
        Array (n_frames, ny, nx), float32, the file's intensities (counts, not
        standardised). A single image has ``n_frames == 1``; stacks and series keep
        their navigation axes flattened in array order.
    sampling_A
        Pixel size [Å/px] (the x pixel size when pixels are not square), or None when
        the file has no real-space calibration.
    axes
        Three rosettasciio-style axis dicts (``name``, ``size``, ``scale``, ``offset``,
        ``units``, ``navigate``) describing ``data``'s axes (frame, y, x) as stored in
        the file; ``units`` is None where the file has none (never ``"<undefined>"``).
    metadata
        Flat dict of plain values: see the module docstring for the keys; always has
        ``format``, ``title``, ``reader_notes`` (list of str) and ``hyperspy`` (the
        signal's HyperSpy metadata as a dict, empty for ``.npy``).
    original_metadata
        The vendor tags as HyperSpy reports them.
    name
        Human-readable name (file stem plus signal title or index).
    path
        File the image was read from, or None.
    nav_axes
        The file's navigation axes as axis dicts, in array order (outermost first), exactly
        as stored (names, units, scales, offsets; ``axis`` values for non-uniform axes such
        as a defocus series): ``[]`` for a single image, one entry for a stack, two for a
        defocus x image series.  ``data`` holds the frames flattened in C order;
        :attr:`nav_shape` and :meth:`frames` restore the navigation shape.
    """

    data: np.ndarray
    sampling_A: float | None
    axes: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    original_metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    path: Path | None = None
    nav_axes: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ReaderError(
                f"{self.name or 'image'}: data must have shape (n_frames, ny, nx); "
                f"got shape {data.shape}."
            )
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        if self.sampling_A is not None:
            s = float(self.sampling_A)
            if not (math.isfinite(s) and s > 0):
                raise ReaderError(
                    f"{self.name or 'image'}: sampling_A must be a positive pixel size [Å]; "
                    f"got {self.sampling_A!r}."
                )
            self.sampling_A = s
        if len(self.axes) != 3:
            self.axes = _default_axes(self.data.shape, self.sampling_A)
        if self.nav_axes is None:
            n = self.data.shape[0]
            self.nav_axes = [] if n == 1 else [dict(self.axes[0])]
        self.nav_axes = [dict(a) for a in self.nav_axes]
        if int(np.prod(self.nav_shape, dtype=np.int64)) != self.data.shape[0]:
            raise ReaderError(
                f"{self.name or 'image'}: navigation axes of shape {self.nav_shape} do not "
                f"match {self.data.shape[0]} frames."
            )

    @property
    def nav_shape(self) -> tuple[int, ...]:
        """Navigation shape in array order (``()`` for a single image)."""
        return tuple(int(a["size"]) for a in self.nav_axes or [])

    @property
    def full_axes(self) -> list[dict[str, Any]]:
        """Navigation axes then the y and x signal axes, in array order."""
        return [dict(a) for a in self.nav_axes or []] + [dict(self.axes[1]), dict(self.axes[2])]

    def frames(self) -> np.ndarray:
        """``data`` with its navigation shape restored: ``nav_shape + (ny, nx)``."""
        return self.data.reshape(*self.nav_shape, *self.image_shape)

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.data.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(ny, nx) in pixels."""
        return (int(self.data.shape[1]), int(self.data.shape[2]))

    @property
    def sampling_nm(self) -> float | None:
        """Pixel size [nm/px], or None when uncalibrated."""
        return None if self.sampling_A is None else self.sampling_A / 10.0

    @property
    def is_calibrated(self) -> bool:
        """Whether the image has a real-space pixel size."""
        return self.sampling_A is not None


# ----------------------------------------------------------------------------- units


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


def _unit_kind(units: str | None) -> str:
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


# ----------------------------------------------------------------------------- public API


def is_supported(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an extension :func:`read_images` understands."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def read_images(
    path: str | os.PathLike, *, allow_reciprocal: bool = False
) -> list[ExperimentalImage]:
    """Read every image signal in an experimental (or simulated) file.

    Parameters
    ----------
    path
        The file; see :data:`SUPPORTED_EXTENSIONS`. A TIA ``.emi`` file reads its
        ``_1.ser`` data file(s) and adds the microscope metadata.
    allow_reciprocal
        Also return signals calibrated in reciprocal units or angles (diffraction
        patterns), with ``sampling_A = None``. By default they are refused.

    Returns
    -------
    list of ExperimentalImage
        One entry per image signal (a Velox file with four detectors gives four); one
        entry per defocus for this package's simulated ``.hspy`` datasets.

    Raises
    ------
    ReaderError
        If the file is missing, has an unsupported extension, cannot be parsed, or holds
        no real-space image (only spectra, or only diffraction patterns when
        ``allow_reciprocal`` is False).

    Warns
    -----
    ReaderWarning
        When RGB data are converted to grey, pixels are not square, a calibration is
        missing or unusual, or signals of a multi-signal file are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path}: file not found. Check the path and the file name.")
    if path.is_dir():
        raise ReaderError(f"{path} is a folder; pass one image file (e.g. a .dm4 or .emd).")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ReaderError(
            f"{path}: the format '{ext or '(no extension)'}' is not supported. Supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file (e.g. to TIFF with "
            "calibration) or open it with HyperSpy and use "
            "napari_hrtem_transfer.io.hyperspy_integration.from_signal."
        )
    if ext == ".npy":
        return [_read_npy(path)]
    if ext == ".hspy":
        images = _read_simulated_dataset(path)
        if images is not None:
            return images
    try:
        signals = _hs_load(path)
    except ReaderError:
        if ext not in (".tif", ".tiff"):
            raise
        return [_read_tiff_plain(path)]  # e.g. uint8 stacks RosettaSciIO takes for RGB
    return images_from_signals(signals, path=path, allow_reciprocal=allow_reciprocal)


def images_from_signals(
    signals: Any,
    *,
    path: Path | None = None,
    allow_reciprocal: bool = False,
) -> list[ExperimentalImage]:
    """Convert one HyperSpy signal or a list of signals to ExperimentalImage objects.

    Non-image signals are skipped with a :class:`ReaderWarning`; see :func:`read_images`
    for the parameters and errors.
    """
    signal_list = list(signals) if isinstance(signals, list | tuple) else [signals]
    where = str(path) if path is not None else "signal"
    images: list[ExperimentalImage] = []
    skipped: list[str] = []
    for i, signal in enumerate(signal_list):
        label = _signal_label(signal, i, len(signal_list))
        try:
            images.append(
                _signal_to_image(signal, path=path, label=label, allow_reciprocal=allow_reciprocal)
            )
        except _NotAnImage as exc:
            skipped.append(f"{label}: {exc}")
    if not images:
        reasons = "; ".join(skipped) or "it holds no signals"
        raise ReaderError(
            f"{where}: no real-space image to read ({reasons}). This plugin segments "
            "real-space HRTEM images (2-D signals calibrated in length units)."
        )
    if skipped:
        note = f"{where}: skipped {len(skipped)} non-image signal(s): " + "; ".join(skipped)
        warnings.warn(note, ReaderWarning, stacklevel=2)
        for im in images:
            im.metadata["reader_notes"].append(note)
    return images


# ----------------------------------------------------------------------------- internals


class _NotAnImage(Exception):
    """Internal: this signal is not a real-space image (message says why)."""


def _hs_load(path: Path) -> Any:
    try:
        import hyperspy.api as hs
    except ImportError as exc:  # pragma: no cover - hyperspy is a base dependency
        from ..errors import MissingDependencyError

        raise MissingDependencyError("hyperspy", "Reading microscope files") from exc
    try:
        with warnings.catch_warnings():
            # rosettasciio warns about vendor quirks that are not the user's business
            warnings.simplefilter("ignore", UserWarning)
            return hs.load(path, lazy=False)
    except Exception as exc:  # noqa: BLE001 - rosettasciio raises many types
        raise ReaderError(
            f"{path}: HyperSpy/RosettaSciIO could not read this file "
            f"({type(exc).__name__}: {exc}). Check that the file is complete and of the "
            "type its extension says; a TIA .ser file needs its companion .emi for metadata."
        ) from exc


def _signal_label(signal: Any, index: int, n: int) -> str:
    title = str(signal.metadata.get_item("General.title", "") or "").strip()
    if title:
        return title
    return f"signal {index}" if n > 1 else ""


def _axis_dict(ax: Any) -> dict[str, Any]:
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


def _default_axes(shape: tuple[int, ...], sampling_A: float | None) -> list[dict[str, Any]]:
    n, ny, nx = (int(v) for v in shape)
    if sampling_A is None:
        scale, units = 1.0, None
    else:
        scale, units = float(sampling_A) / 10.0, "nm"
    return [
        {"name": "frame", "size": n, "scale": 1.0, "offset": 0.0, "units": None, "navigate": True},
        {"name": "y", "size": ny, "scale": scale, "offset": 0.0, "units": units, "navigate": False},
        {"name": "x", "size": nx, "scale": scale, "offset": 0.0, "units": units, "navigate": False},
    ]


def _to_grey(data: np.ndarray, label: str, notes: list[str]) -> np.ndarray:
    """Structured RGB(A) or trailing-channel arrays -> float32 grey (BT.601 luma)."""
    names = data.dtype.names
    if names:
        channels = [n for n in names if n.upper() in _LUMA]
        if len(channels) != 3:
            raise _NotAnImage(f"structured pixel type {data.dtype} is not RGB")
        grey = sum(_LUMA[n.upper()] * data[n].astype(np.float32) for n in channels)
        note = (
            f"{label}: RGB colour image converted to grey "
            "(0.299 R + 0.587 G + 0.114 B); use the raw detector file if you have it."
        )
        notes.append(note)
        warnings.warn(note, ReaderWarning, stacklevel=4)
        return np.asarray(grey, dtype=np.float32)
    if np.iscomplexobj(data):
        raise _NotAnImage("complex-valued data (an FFT or exit wave?), not an intensity image")
    return np.asarray(data)


def _calibration(
    y: dict[str, Any], x: dict[str, Any], label: str, notes: list[str], allow_reciprocal: bool
) -> float | None:
    """Pixel size [Å] from the y and x axis dicts (see module docstring for the rules)."""
    ky, kx = _unit_kind(y["units"]), _unit_kind(x["units"])
    name = label
    if "reciprocal" in (ky, kx) or "angle" in (ky, kx):
        units = x["units"] if kx in ("reciprocal", "angle") else y["units"]
        if not allow_reciprocal:
            raise _NotAnImage(
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


def _signal_to_image(
    signal: Any, *, path: Path | None, label: str, allow_reciprocal: bool
) -> ExperimentalImage:
    am = signal.axes_manager
    sig_dim = int(am.signal_dimension)
    if sig_dim == 1:
        ax = am.signal_axes[0]
        units = normalise_units(ax.units)
        raise _NotAnImage(
            f"a 1-D signal (spectrum over '{ax.name}'{f' [{units}]' if units else ''})"
            + (f" with navigation shape {am.navigation_shape}" if am.navigation_dimension else "")
        )
    if sig_dim != 2:
        raise _NotAnImage(f"a {sig_dim}-D signal, not an image")
    notes: list[str] = []
    display = label or (path.name if path is not None else "signal")
    data = np.asarray(signal.data)
    data = _to_grey(data, display, notes)
    y_ax, x_ax = (_axis_dict(a) for a in am.signal_axes[::-1])
    nav_axes = [_axis_dict(a) for a in am.navigation_axes[::-1]]
    ny, nx = data.shape[-2:]
    frames = data.reshape(-1, ny, nx)
    if len(nav_axes) == 1:
        frame_ax = dict(nav_axes[0])
        frame_ax["name"] = frame_ax["name"] or "frame"
    else:
        frame_ax = {
            "name": "frame",
            "size": int(frames.shape[0]),
            "scale": 1.0,
            "offset": 0.0,
            "units": None,
            "navigate": True,
        }
        if len(nav_axes) > 1:
            frame_ax["navigation_axes"] = nav_axes
            notes.append(
                f"{display}: navigation shape {tuple(a['size'] for a in nav_axes)} "
                f"flattened to {frames.shape[0]} frames."
            )
    sampling = _calibration(y_ax, x_ax, display, notes, allow_reciprocal)
    metadata = _extract_metadata(signal)
    metadata["format"] = (path.suffix.lower().lstrip(".") if path else "hyperspy")
    metadata["title"] = label
    metadata["reader_notes"] = notes
    ly, lx = length_unit_to_A(y_ax["units"]), length_unit_to_A(x_ax["units"])
    metadata["sampling_A_y"] = y_ax["scale"] * ly if ly else None
    metadata["sampling_A_x"] = x_ax["scale"] * lx if lx else None
    if sampling is None and _unit_kind(x_ax["units"]) == "reciprocal":
        metadata["reciprocal_sampling"] = {"scale": x_ax["scale"], "units": x_ax["units"]}
    try:
        original = signal.original_metadata.as_dictionary()
    except Exception:  # noqa: BLE001 - exotic vendor trees; metadata is optional
        original = {}
    stem = path.stem if path is not None else "signal"
    name = f"{stem} [{label}]" if label else stem
    return ExperimentalImage(
        data=frames,
        sampling_A=sampling,
        axes=[frame_ax, y_ax, x_ax],
        metadata=metadata,
        original_metadata=original,
        name=name,
        path=path,
        nav_axes=nav_axes,
    )


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _as_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _extract_metadata(signal: Any) -> dict[str, Any]:
    """Beam energy, mode, defocus and Cs from HyperSpy metadata and vendor tags."""
    md = signal.metadata.as_dictionary()
    try:
        om = signal.original_metadata.as_dictionary()
    except Exception:  # noqa: BLE001
        om = {}
    out: dict[str, Any] = {"hyperspy": md}
    tem = _get(md, "Acquisition_instrument.TEM") or {}
    energy_keV = _as_float(tem.get("beam_energy"))
    if energy_keV is not None and energy_keV > 0:
        out["energy_eV"] = energy_keV * 1e3
    for key in ("acquisition_mode", "microscope", "magnification", "camera_length"):
        if tem.get(key) is not None:
            out[key] = tem[key]
    # Thermo Fisher / FEI: Velox ``Optics.Defocus`` [m], TIA ``Defocus_um`` [µm]; the
    # read-out is negative for underfocus, abTEM's defocus is positive for underfocus.
    vendor_nm = None
    velox = _as_float(_get(om, "Optics.Defocus"))
    if velox is not None:
        vendor_nm, source = velox * 1e9, "Velox Optics.Defocus"
    tia = _as_float(_get(om, "ObjectInfo.ExperimentalDescription.Defocus_um"))
    if vendor_nm is None and tia is not None:
        vendor_nm, source = tia * 1e3, "TIA ExperimentalDescription.Defocus_um"
    if vendor_nm is not None:
        out["vendor_defocus_nm"] = vendor_nm
        out["defocus_nm"] = -vendor_nm if vendor_nm != 0 else 0.0
        out["defocus_source"] = (
            f"{source}; Thermo Fisher/FEI read-out (negative = underfocus) converted to "
            "abTEM's sign (defocus = -C10, positive = underfocus); relative to the "
            "operator's focus reference"
        )
    mic = _find_microscope_info(om)
    if mic:
        cs_mm = _as_float(mic.get("Cs(mm)"))
        if cs_mm:
            out["Cs_A"] = cs_mm * 1e7
        for key, value in mic.items():
            if re.search(r"defocus", str(key), re.IGNORECASE) and _as_float(value) is not None:
                out.setdefault("vendor_defocus", {"tag": f"Microscope Info.{key}", "value": value})
    if "energy_eV" not in out:
        volts = _as_float(mic.get("Voltage")) if mic else None
        if volts:
            out["energy_eV"] = volts
    return out


def _find_microscope_info(om: dict) -> dict | None:
    """DigitalMicrograph's ``Microscope Info`` group, wherever the image tags put it."""
    stack: list[Any] = [om]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("Microscope Info"), dict):
            return node["Microscope Info"]
        stack.extend(v for v in node.values() if isinstance(v, dict))
    return None


def _read_tiff_plain(path: Path) -> ExperimentalImage:
    """A TIFF that RosettaSciIO cannot parse, read as a plain array with tifffile."""
    import tifffile

    try:
        data = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types
        raise ReaderError(f"{path}: not a readable TIFF file ({exc}).") from exc
    image = _array_image(data, path, "tif")
    image.metadata["reader_notes"].append(
        f"{path.name}: read as a plain array (tifffile); calibration tags were not read."
    )
    return image


def _read_npy(path: Path) -> ExperimentalImage:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/...
        raise ReaderError(
            f"{path}: not a readable NumPy array file ({exc}). Save arrays with numpy.save."
        ) from exc
    return _array_image(data, path, "npy")


def _array_image(data: np.ndarray, path: Path, fmt: str) -> ExperimentalImage:
    notes: list[str] = []
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        note = (
            f"{path.name}: (ny, nx, {data.shape[-1]}) array read as RGB(A) and converted to grey."
        )
        notes.append(note)
        warnings.warn(note, ReaderWarning, stacklevel=3)
        w = np.array([_LUMA["R"], _LUMA["G"], _LUMA["B"]], dtype=np.float32)
        data = data[..., :3].astype(np.float32) @ w
    if data.ndim < 2 or data.dtype.kind not in "biuf":
        raise ReaderError(
            f"{path}: expected a real 2-D image or a stack (..., ny, nx) of them; got a "
            f"{data.ndim}-D array of shape {data.shape} and dtype {data.dtype}."
        )
    notes.append(f"{path.name}: no calibration read; sampling_A is None.")
    lead = data.shape[:-2]
    nav_axes = [
        {
            "name": "frame" if len(lead) == 1 else f"axis{i}",
            "size": int(n),
            "scale": 1.0,
            "offset": 0.0,
            "units": None,
            "navigate": True,
        }
        for i, n in enumerate(lead)
    ]
    return ExperimentalImage(
        data=data.reshape(-1, *data.shape[-2:]),
        sampling_A=None,
        axes=[],
        metadata={"format": fmt, "title": "", "reader_notes": notes, "hyperspy": {}},
        original_metadata={},
        name=path.stem,
        path=path,
        nav_axes=nav_axes,
    )


def _read_simulated_dataset(path: Path) -> list[ExperimentalImage] | None:
    """Read a simulated ``.hspy`` dataset, one entry per defocus; None if not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            experiments = f.get("Experiments")
            is_dataset = experiments is not None and any(
                "metadata" in experiments[k] and "HRTEM_transfer" in experiments[k]["metadata"]
                for k in experiments
            )
    except OSError as exc:
        raise ReaderError(f"{path}: not a readable HDF5/.hspy file ({exc}).") from exc
    if not is_dataset:
        return None
    from .dataset import load_dataset

    ds = load_dataset(path, lazy=False)
    images = []
    for i, d in enumerate(ds.defocus_nm):
        note = (
            f"simulated defocus plane {i} of {ds.n_defocus}; the ground-truth masks are in "
            "the dataset (napari_hrtem_transfer.io.load_dataset)."
        )
        metadata = {
            "format": "hspy",
            "title": f"defocus {d:+g} nm",
            "reader_notes": [note],
            "hyperspy": {},
            "simulated": True,
            "defocus_nm": float(d),
            "energy_eV": float(ds.energy_eV),
            "dose_e_per_A2": ds.dose_e_per_A2,
            "sampling_A_y": float(ds.sampling_A),
            "sampling_A_x": float(ds.sampling_A),
            "structure_ids": ds.structure_ids.tolist(),
            "materials": ds.materials.tolist(),
        }
        images.append(
            ExperimentalImage(
                data=np.asarray(ds.images[i]),
                sampling_A=ds.sampling_A,
                axes=[],
                metadata=metadata,
                original_metadata={"HRTEM_transfer": ds.info},
                name=f"{path.stem} [defocus {d:+g} nm]",
                path=path,
            )
        )
        images[-1].axes[0]["name"] = "image"
        images[-1].nav_axes = [dict(images[-1].axes[0])] if ds.n_images > 1 else []
    return images
