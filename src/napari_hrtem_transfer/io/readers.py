"""Experimental HRTEM images: vendor files -> calibrated grey-level frames.

Every reader returns :class:`~napari_hrtem_transfer.io.frames.Frames` (public name
``ExperimentalImage``), the one frames model; the unit table, pixel-size discovery and RGB ->
grey live in :mod:`napari_hrtem_transfer.io.frames` and are re-exported here.

:func:`read_images` opens a file with HyperSpy/RosettaSciIO (imported inside the
functions, so importing this module is cheap) and returns one :class:`ExperimentalImage`
per image signal in the file. Supported formats:

=========================  ====================================================
extension                  notes
=========================  ====================================================
``.dm3``, ``.dm4``         Gatan DigitalMicrograph (images and image stacks)
``.emd``                   Velox (Thermo Fisher); one entry per image signal,
                           non-image signals (spectra, spectrum images) skipped
``.ser``, ``.emi``         TIA (FEI); ``.emi`` adds the microscope metadata, and a
                           ``.ser`` given alone is read through the ``.emi`` beside it
``.mrc``                   MRC (Direct Electron, cryo-EM stacks, ...)
``.tif``, ``.tiff``        TIFF incl. DigitalMicrograph, ImageJ and TVIPS
                           calibration tags; RGB is converted to grey
``.hspy``                  HyperSpy files, and this package's simulated
                           datasets (one defocus x image stack)
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

import contextlib
import logging
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReaderError
from .frames import (
    ExperimentalImage,
    Frames,
    ReaderWarning,
    axis_from_values,
    default_axes,
    length_unit_to_A,
    normalise_units,
    trailing_rgb_to_grey,
)
from .frames import NotAnImage as _NotAnImage
from .frames import axis_dict as _axis_dict
from .frames import calibration as _calibration
from .frames import to_grey as _to_grey
from .frames import unit_kind as _unit_kind

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ExperimentalImage",
    "Frames",
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

# ----------------------------------------------------------------------------- units


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
        One entry per image signal (a Velox file with four detectors gives four); a
        simulated ``.hspy`` dataset of this package gives one entry whose navigation is
        ``defocus`` [nm] x ``image``.

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
    lazy: bool = False,
) -> list[ExperimentalImage]:
    """Convert one HyperSpy signal or a list of signals to ExperimentalImage objects.

    Non-image signals are skipped with a :class:`ReaderWarning`; see :func:`read_images`
    for the parameters and errors. With ``lazy=True`` a lazy signal's frames stay a dask
    array (read frame by frame later); otherwise they are computed.
    """
    signal_list = list(signals) if isinstance(signals, list | tuple) else [signals]
    where = str(path) if path is not None else "signal"
    images: list[ExperimentalImage] = []
    skipped: list[str] = []
    for i, signal in enumerate(signal_list):
        label = _signal_label(signal, i, len(signal_list))
        try:
            images.append(
                _signal_to_image(
                    signal, path=path, label=label, allow_reciprocal=allow_reciprocal, lazy=lazy
                )
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


@contextlib.contextmanager
def _quiet_rsciio() -> Any:
    """Silence HyperSpy's and RosettaSciIO's loggers around a read.

    On a file it cannot parse, HyperSpy logs "please report this error to the RosettaSciIO
    developers" (in red) before raising; our own :class:`ReaderError` says what is wrong
    and what to do, so theirs is dropped.  The loggers' flags are process-wide, so reads
    through here are serialised (:data:`_PATCH_LOCK`; napari reads in worker threads).
    """
    names = ("hyperspy.io", "hyperspy.io_plugins", "rsciio")
    loggers = [logging.getLogger(n) for n in names]
    with _PATCH_LOCK:
        before = [lg.disabled for lg in loggers]
        for lg in loggers:
            lg.disabled = True
        try:
            with warnings.catch_warnings():
                # rosettasciio and HyperSpy warn about vendor quirks that are not the user's
                # business; the package's own warnings (ReaderWarning) still show
                warnings.filterwarnings(
                    "ignore", category=UserWarning, module=r"(rsciio|hyperspy)\b"
                )
                yield
        finally:
            for lg, was in zip(loggers, before, strict=True):
                lg.disabled = was


def _tia_companion(path: Path) -> tuple[Path, int] | None:
    """The ``.emi`` next to a TIA ``x_N.ser`` and the ser's index among its data files."""
    m = re.match(r"^(.*)_(\d+)$", path.stem)
    if path.suffix.lower() != ".ser" or not m:
        return None
    for ext in (".emi", ".EMI"):
        emi = path.with_name(m.group(1) + ext)
        if emi.is_file():
            return emi, int(m.group(2)) - 1
    return None


def _hs_load(path: Path, *, lazy: bool = False) -> Any:
    try:
        import hyperspy.api as hs
    except ImportError as exc:  # pragma: no cover - hyperspy is a base dependency
        from ..errors import MissingDependencyError

        raise MissingDependencyError("hyperspy", "Reading microscope files") from exc
    ext = path.suffix.lower()
    companion = _tia_companion(path)
    try:
        with _quiet_rsciio():
            if companion is not None:
                # the .emi holds the microscope metadata (mode, energy, defocus): read the
                # .ser through it, as if the user had given the .emi
                emi, index = companion
                signals = hs.load(emi, lazy=lazy)
                if isinstance(signals, list) and 0 <= index < len(signals):
                    return signals[index]
                if not isinstance(signals, list) and index == 0:
                    return signals
            if ext != ".mrc":
                return hs.load(path, lazy=lazy)
            with _closing_files("rsciio.mrc._api"):
                signals = hs.load(path, lazy=False)
            return _in_memory(signals)
    except Exception as exc:  # noqa: BLE001 - rosettasciio raises many types
        hint = (
            " A TIA .ser file needs its companion .emi for the metadata; keep them together."
            if ext in (".ser", ".emi")
            else ""
        )
        raise ReaderError(
            f"{path}: HyperSpy/RosettaSciIO could not read this file "
            f"({type(exc).__name__}: {exc}). Check that the file is complete and of the "
            f"type its extension says.{hint}"
        ) from exc


#: One patched read at a time: the patches replace process-wide state (a module global, the
#: loggers' flags), and napari reads files in worker threads.  Re-entrant: the MRC patch is
#: taken inside the quiet read.
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _closing_files(module_name: str) -> Any:
    """Close the files a reader module opens and leaves open (RosettaSciIO's MRC reader
    opens the header with ``open()`` and never closes it: "ResourceWarning: unclosed
    file").  Reads through it are serialised (:data:`_PATCH_LOCK`)."""
    import builtins
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:  # pragma: no cover - another rosettasciio layout
        yield
        return
    opened: list[Any] = []

    def _open(*args: Any, **kwargs: Any) -> Any:
        f = builtins.open(*args, **kwargs)
        opened.append(f)
        return f

    with _PATCH_LOCK:
        had = "open" in vars(module)
        previous = vars(module).get("open")
        module.open = _open
        try:
            yield
        finally:
            if had:
                module.open = previous
            else:
                del module.open
            for f in opened:
                with contextlib.suppress(Exception):
                    f.close()


def _in_memory(signals: Any) -> Any:
    """Memory-mapped data copied into memory (no file stays mapped after the read)."""
    for s in signals if isinstance(signals, list) else [signals]:
        if isinstance(s.data, np.memmap):
            s.data = np.array(s.data)
    return signals


def _signal_label(signal: Any, index: int, n: int) -> str:
    title = str(signal.metadata.get_item("General.title", "") or "").strip()
    if title:
        return title
    return f"signal {index}" if n > 1 else ""


def _signal_to_image(
    signal: Any, *, path: Path | None, label: str, allow_reciprocal: bool, lazy: bool = False
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
    data = signal.data
    if not (lazy and getattr(signal, "_lazy", False)):
        data = np.asarray(data)
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
    metadata["format"] = path.suffix.lower().lstrip(".") if path else "hyperspy"
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
        sampling_source=(
            "none"
            if sampling is None
            else f"signal axes of {path.name if path is not None else 'the signal'} "
            f"({x_ax['units']})"
        ),
        provenance={"reader": "hyperspy", "file": str(path) if path is not None else None},
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
    if "Cs_A" not in out:
        cs = _simulated_cs_A(md)
        if cs is not None:
            out["Cs_A"] = cs
    return out


def _simulated_cs_A(md: dict[str, Any]) -> float | None:
    """The Cs [Å] of a signal this package simulated (its dataset record), or None."""
    import json

    from .dataset import recorded_cs_A

    info = _get(md, "HRTEM_transfer.info_json")
    if not isinstance(info, str):
        return None
    try:
        config = (json.loads(info) or {}).get("config")
    except (ValueError, AttributeError):
        return None
    return recorded_cs_A(config if isinstance(config, dict) else None)


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
        data = trailing_rgb_to_grey(data, path.name, notes)
    if data.ndim < 2 or data.dtype.kind not in "biuf":
        raise ReaderError(
            f"{path}: expected a real 2-D image or a stack (..., ny, nx) of them; got a "
            f"{data.ndim}-D array of shape {data.shape} and dtype {data.dtype}."
        )
    notes.append(f"{path.name}: no calibration read; sampling_A is None.")
    nav_axes = default_axes(data.shape, None)[:-2]
    return ExperimentalImage(
        data=data.reshape(-1, *data.shape[-2:]),
        sampling_A=None,
        axes=[],
        metadata={"format": fmt, "title": "", "reader_notes": notes, "hyperspy": {}},
        original_metadata={},
        name=path.stem,
        path=path,
        nav_axes=nav_axes,
        sampling_source="none",
        provenance={"reader": fmt, "file": str(path)},
    )


def _read_simulated_dataset(path: Path) -> list[ExperimentalImage] | None:
    """Read a simulated ``.hspy`` dataset as one defocus x image stack; None if not one.

    The navigation is the file's: ``defocus`` [nm] (non-uniform values kept) outermost,
    then ``image``; ``metadata["defocus_nm"]`` lists the defocus values.
    """
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
    note = (
        f"simulated defocus series: {ds.n_defocus} defocus plane(s) x {ds.n_images} image(s); "
        "the ground-truth masks are in the dataset (napari_hrtem_transfer.io.load_dataset)."
    )
    defocus = [float(d) for d in ds.defocus_nm]
    metadata = {
        "format": "hspy",
        "title": str(ds.info.get("title", "simulated defocus series")),
        "reader_notes": [note],
        "hyperspy": {},
        "simulated": True,
        "defocus_nm": defocus,
        "dose_e_per_A2": ds.dose_e_per_A2,
        **ds.recorded_conditions(),
        "sampling_A_y": float(ds.sampling_A),
        "sampling_A_x": float(ds.sampling_A),
        "structure_ids": ds.structure_ids.tolist(),
        "materials": ds.materials.tolist(),
    }
    nav = [
        axis_from_values("defocus", defocus, "nm"),
        {
            "name": "image",
            "size": int(ds.n_images),
            "scale": 1.0,
            "offset": 0.0,
            "units": None,
            "navigate": True,
        },
    ]
    images = np.asarray(ds.images)
    ny, nx = images.shape[-2:]
    image = ExperimentalImage(
        data=images.reshape(-1, ny, nx),
        sampling_A=ds.sampling_A,
        axes=[],
        metadata=metadata,
        original_metadata={"HRTEM_transfer": ds.info},
        name=path.stem,
        path=path,
        nav_axes=nav,
        sampling_source=f"simulated dataset {path.name} (sampling_A)",
        provenance={"reader": "simulated dataset", "file": str(path)},
    )
    return [image]
