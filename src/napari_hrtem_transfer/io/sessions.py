"""Experimental sessions: a folder or a list of image files -> one HRTEM stack.

:func:`load_session` reads every file with
:func:`napari_hrtem_transfer.io.readers.read_images` and stacks the frames along one
navigation axis:

``defocus`` [nm]
    when the vendor metadata records a defocus for every frame (Velox ``Optics.Defocus``,
    TIA ``ExperimentalDescription.Defocus_um``; DigitalMicrograph ``Microscope Info``
    defocus tags whose name gives the unit, e.g. ``Defocus (nm)``), or when the user gives
    ``defocus_nm``. Thermo Fisher/FEI read-outs are converted to abTEM's sign
    (``defocus = -C10``, positive = underfocus), relative to the operator's focus
    reference. Frames are sorted by defocus.
``time`` [s]
    otherwise, when every frame has an acquisition date and time: seconds after the first
    frame, frames sorted by time.
``frame``
    otherwise: the order of the list (a folder: file names in natural order).

Where each value came from is recorded per frame in
``metadata.HRTEM_transfer.session`` (``defocus_source``, ``files``, ``acquired``, and a
JSON table ``table_json``). Files that are not images (spectra, diffraction patterns,
other formats) are skipped with a :class:`~napari_hrtem_transfer.io.readers.ReaderWarning`
naming them; the rest still loads. Frames of different pixel size or shape are refused
with a :class:`~napari_hrtem_transfer.errors.ReaderError` that lists them, unless
``resample=True`` (resampled to the most common pixel size, cropped to the common size).

:func:`read_session` is the core (an :class:`ExperimentalImage`, no HyperSpy signal);
:func:`load_session` returns it as a HyperSpy signal of type ``HRTEM``. HyperSpy and SciPy
are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReaderError
from .frames import RESAMPLING, axis_from_values
from .readers import SUPPORTED_EXTENSIONS, ExperimentalImage, ReaderWarning, read_images

__all__ = ["SessionFrame", "load_session", "read_session", "session_files"]

#: Relative difference of pixel sizes still counted as "the same" [-].
SAMPLING_RTOL = RESAMPLING.same_pixel_rtol

#: Largest resampling zoom factor (either way) that ``resample=True`` applies: the one
#: resampling limit (:class:`~napari_hrtem_transfer.io.frames.ResampleConfig`).
MAX_RESAMPLE_ZOOM = RESAMPLING.max_zoom

# DigitalMicrograph defocus tags carry their unit in the name, e.g. "Defocus (nm)".
_DM_UNIT_TO_NM = {"nm": 1.0, "um": 1e3, "µm": 1e3, "a": 0.1, "å": 0.1, "pm": 1e-3}


@dataclass
class SessionFrame:
    """One frame of a session and where its navigation value came from."""

    path: Path
    name: str
    index_in_file: int
    data: np.ndarray
    sampling_A: float | None
    image: ExperimentalImage
    defocus_nm: float | None = None
    defocus_source: str = "none"
    acquired: datetime | None = None
    notes: list[str] = field(default_factory=list)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def session_files(paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files of a session, in order (see :func:`_session_files`)."""
    return _session_files(paths_or_folder)[0]


def _session_files(
    paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
) -> tuple[list[Path], list[str]]:
    """The files of a session, in order; files of other formats skipped with a warning.

    A folder gives its files in natural name order (``img2`` before ``img10``); a list keeps
    its order. A TIA ``x_1.ser`` next to its ``x.emi`` is read through the ``.emi`` only.

    Raises
    ------
    ReaderError
        If a path does not exist, or nothing readable is left.
    """
    if isinstance(paths_or_folder, str | os.PathLike):
        root = Path(paths_or_folder)
        if not root.exists():
            raise ReaderError(f"{root}: not found. Give a folder or a list of image files.")
        candidates = (
            sorted((p for p in root.iterdir() if p.is_file()), key=_natural_key)
            if root.is_dir()
            else [root]
        )
    else:
        candidates = [Path(p) for p in paths_or_folder]
        missing = [str(p) for p in candidates if not p.exists()]
        if missing:
            raise ReaderError(f"session files not found: {', '.join(missing)}.")
    files: list[Path] = []
    skipped: list[str] = []
    emi_stems = {p.stem for p in candidates if p.suffix.lower() == ".emi"}
    for p in candidates:
        ext = p.suffix.lower()
        if p.name.startswith("."):
            continue
        if ext not in SUPPORTED_EXTENSIONS:
            skipped.append(f"{p.name}: not an image format this package reads")
            continue
        if ext == ".ser" and re.sub(r"_\d+$", "", p.stem) in emi_stems:
            continue  # read with its .emi
        files.append(p)
    if skipped:
        warnings.warn(
            f"session: skipped {len(skipped)} file(s) that are not image files: "
            f"{'; '.join(skipped)}.",
            ReaderWarning,
            stacklevel=3,
        )
    if not files:
        raise ReaderError(
            f"no image files in {paths_or_folder}; supported: {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    return files, skipped


# ----------------------------------------------------------------------------- metadata


def _vendor_defocus(image: ExperimentalImage) -> tuple[float | None, str]:
    """Defocus [nm] (abTEM sign where known) and its source, from the reader's metadata."""
    md = image.metadata
    if md.get("defocus_nm") is not None:
        return float(md["defocus_nm"]), str(md.get("defocus_source", "vendor metadata"))
    tag = md.get("vendor_defocus")
    if isinstance(tag, dict):
        name = str(tag.get("tag", ""))
        m = re.search(r"\(\s*([a-zA-Zµå]+)\s*\)", name)
        unit = m.group(1).lower() if m else None
        try:
            value = float(tag.get("value"))
        except (TypeError, ValueError):
            value = None
        if unit in _DM_UNIT_TO_NM and value is not None and math.isfinite(value):
            return value * _DM_UNIT_TO_NM[unit], (
                f"DigitalMicrograph {name} (the microscope's read-out and sign)"
            )
        return None, f"DigitalMicrograph {name} = {tag.get('value')!r} ignored: unit unknown"
    return None, "none"


def _acquired(image: ExperimentalImage) -> datetime | None:
    general = (image.metadata.get("hyperspy") or {}).get("General") or {}
    date, time = general.get("date"), general.get("time")
    if not date or not time:
        return None
    try:
        return datetime.fromisoformat(f"{date}T{str(time).strip()}")
    except ValueError:
        return None


def _frames(files: Sequence[Path]) -> tuple[list[SessionFrame], list[str]]:
    frames: list[SessionFrame] = []
    skipped: list[str] = []
    for path in files:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ReaderWarning)
                images = read_images(path)
        except ReaderError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        for w in caught:
            if issubclass(w.category, ReaderWarning):
                warnings.warn(str(w.message), ReaderWarning, stacklevel=3)
        for image in images:
            value, source = _vendor_defocus(image)
            when = _acquired(image)
            for i in range(image.n_frames):
                frames.append(
                    SessionFrame(
                        path=path,
                        name=image.name if image.n_frames == 1 else f"{image.name} #{i}",
                        index_in_file=i,
                        data=image.data[i],
                        sampling_A=image.sampling_A,
                        image=image,
                        defocus_nm=value,
                        defocus_source=source,
                        acquired=when,
                    )
                )
    if skipped:
        warnings.warn(
            "session: skipped file(s) that hold no real-space image: " + "; ".join(skipped),
            ReaderWarning,
            stacklevel=3,
        )
    return frames, skipped


# ----------------------------------------------------------------------------- geometry


def _describe(f: SessionFrame) -> str:
    px = "uncalibrated" if f.sampling_A is None else f"{f.sampling_A:.5g} Å/px"
    return f"{f.name} ({f.data.shape[0]}x{f.data.shape[1]} px, {px})"


def _same_geometry(frames: Sequence[SessionFrame]) -> bool:
    ref = frames[0]
    for f in frames[1:]:
        if f.data.shape != ref.data.shape:
            return False
        if (f.sampling_A is None) != (ref.sampling_A is None):
            return False
        if f.sampling_A is not None and not math.isclose(
            f.sampling_A, ref.sampling_A, rel_tol=SAMPLING_RTOL
        ):
            return False
    return True


def _resample(
    frames: list[SessionFrame], notes: list[str]
) -> tuple[list[SessionFrame], SessionFrame]:
    """Resample frames to the session's pixel size and crop to the common size.

    The session's pixel size is the most common one (the finest on a tie). Frames that
    cannot be resampled (uncalibrated, or a zoom beyond :data:`MAX_RESAMPLE_ZOOM`) are left
    out with a warning naming them. Order is kept.
    """
    from .frames import zoom as resample

    calibrated = [f.sampling_A for f in frames if f.sampling_A is not None]
    if not calibrated:
        raise ReaderError(
            "session: cannot resample frames without a pixel size: "
            + ", ".join(f.name for f in frames)
            + ". Calibrate them, or load files of one size."
        )

    def _count(v: float) -> int:
        return sum(math.isclose(v, w, rel_tol=SAMPLING_RTOL) for w in calibrated)

    target = min(calibrated, key=lambda v: (-_count(v), v))
    ref = next(f for f in frames if f.sampling_A == target)
    kept = []
    dropped: list[str] = []
    for f in frames:
        if f.sampling_A is None:
            dropped.append(f"{f.name} (uncalibrated)")
            continue
        zoom = f.sampling_A / ref.sampling_A
        if not (1 / MAX_RESAMPLE_ZOOM <= zoom <= MAX_RESAMPLE_ZOOM):
            dropped.append(
                f"{f.name} ({f.sampling_A:.5g} Å/px vs {ref.sampling_A:.5g} Å/px: zoom "
                f"{zoom:.3g} beyond {MAX_RESAMPLE_ZOOM:g})"
            )
            continue
        if not math.isclose(zoom, 1.0, rel_tol=SAMPLING_RTOL):
            f.data = resample(f.data, zoom)
            note = f"{f.name}: resampled from {f.sampling_A:.5g} to {ref.sampling_A:.5g} Å/px."
            f.notes.append(note)
            notes.append(note)
            f.sampling_A = ref.sampling_A
        kept.append(f)
    if dropped:
        msg = "session: left out frames that cannot be resampled: " + "; ".join(dropped) + "."
        warnings.warn(msg, ReaderWarning, stacklevel=3)
        notes.append(msg)
    ny = min(f.data.shape[0] for f in kept)
    nx = min(f.data.shape[1] for f in kept)
    for f in kept:
        h, w = f.data.shape
        if (h, w) != (ny, nx):
            y0, x0 = (h - ny) // 2, (w - nx) // 2
            f.data = f.data[y0 : y0 + ny, x0 : x0 + nx]
            note = f"{f.name}: centre-cropped from {h}x{w} to {ny}x{nx} px."
            f.notes.append(note)
            notes.append(note)
    return kept, ref


# ----------------------------------------------------------------------------- public API


def read_session(
    paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
    defocus_nm: Sequence[float] | None = None,
    resample: bool = False,
    *,
    title: str | None = None,
) -> ExperimentalImage:
    """Read a session (a folder or list of image files) as one stack of frames.

    The core of :func:`load_session` (which returns it as a HyperSpy ``HRTEM`` signal); the
    CLI and the napari reader can use it directly.

    Parameters
    ----------
    paths_or_folder
        A folder (files in natural name order) or a list of files (``.dm3 .dm4 .emd
        .ser/.emi .mrc .tif .hspy .npy``). Other files are skipped with a warning.
    defocus_nm
        Defocus of each file [nm] (abTEM sign: positive = underfocus), or of each frame when
        files hold stacks. Overrides the vendor metadata; the source is recorded as "user".
    resample
        Resample frames of other pixel sizes to the session's most common pixel size (the
        finest on a tie), and centre-crop to the common size. Without it, such a session
        raises :class:`ReaderError`.
    title
        ``metadata.General.title``; defaults to the folder name or "session".

    Returns
    -------
    ExperimentalImage
        ``data`` (n_frames, ny, nx) float32; ``nav_axes`` one navigation axis
        (``defocus`` [nm], ``time`` [s] or ``frame``, see the module docstring); the signal
        axes of the frame whose pixel size the session has; ``metadata["session"]`` the
        per-frame table (file, defocus and its source, acquisition time, notes), the
        skipped files and the notes; ``metadata["hyperspy"]`` the same as HyperSpy
        metadata (``HRTEM_transfer.session``, beam energy, ``Signal.signal_type`` "HRTEM").

    Raises
    ------
    ReaderError
        Nothing readable; ``defocus_nm`` of the wrong length; mixed pixel sizes or shapes
        without ``resample=True`` (the message lists every frame's size).
    """
    files, skipped_files = _session_files(paths_or_folder)
    frames, skipped = _frames(files)
    skipped = skipped_files + skipped
    if not frames:
        raise ReaderError(
            f"session {paths_or_folder}: no real-space image in any file: " + "; ".join(skipped)
        )
    notes: list[str] = []
    if defocus_nm is not None:
        _assign_defocus(frames, defocus_nm)
    kind, frames = _navigation(frames, notes)
    ref_frame = frames[0]
    if not _same_geometry(frames):
        if not resample:
            raise ReaderError(
                "session frames differ in pixel size or shape: "
                + "; ".join(_describe(f) for f in frames)
                + ". Pass resample=True (command line: --session-resample) to resample "
                "them to the most common pixel size and crop to the common size, or leave "
                "the odd files out."
            )
        frames, ref_frame = _resample(frames, notes)
    ny, nx = frames[0].data.shape
    y_ax, x_ax = (dict(a, navigate=False) for a in ref_frame.image.axes[1:])
    y_ax["size"], x_ax["size"] = ny, nx
    nav = _nav_axis(frames, kind)
    if title is None:
        title = (
            Path(paths_or_folder).name
            if isinstance(paths_or_folder, str | os.PathLike) and Path(paths_or_folder).is_dir()
            else "session"
        )
    root = paths_or_folder if isinstance(paths_or_folder, str | os.PathLike) else None
    return ExperimentalImage(
        data=np.stack([f.data for f in frames]).astype(np.float32, copy=False),
        sampling_A=ref_frame.sampling_A,
        axes=[dict(nav), y_ax, x_ax],
        metadata=_session_metadata(frames, kind, skipped, notes, title, ref_frame.image),
        original_metadata={},
        name=title,
        path=Path(root) if root is not None else None,
        nav_axes=[dict(nav)],
        sampling_source=(
            "none"
            if ref_frame.sampling_A is None
            else f"{ref_frame.path.name} ({ref_frame.image.sampling_source})"
        ),
        sources=[str(f.path) for f in frames],
        provenance={"reader": "session", "files": [str(f.path) for f in frames]},
    )


def _assign_defocus(frames: list[SessionFrame], defocus_nm: Sequence[float]) -> None:
    """Give each frame the user's defocus [nm] (one value per file or per frame)."""
    values = [float(v) for v in np.asarray(defocus_nm, dtype=float).reshape(-1)]
    per_file: dict[Path, list[SessionFrame]] = {}
    for f in frames:
        per_file.setdefault(f.path, []).append(f)
    if len(values) == len(frames):
        assigned = values
    elif len(values) == len(per_file):
        assigned = [values[list(per_file).index(f.path)] for f in frames]
    else:
        raise ReaderError(
            f"defocus_nm has {len(values)} values, but the session has {len(per_file)} "
            f"file(s) with {len(frames)} frame(s): "
            + ", ".join(f.name for f in frames)
            + ". Give one value per file or per frame."
        )
    for f, v in zip(frames, assigned, strict=True):
        if f.defocus_nm is not None and not math.isclose(f.defocus_nm, v, abs_tol=0.5):
            f.notes.append(f"vendor metadata says {f.defocus_nm:g} nm ({f.defocus_source})")
        f.defocus_nm, f.defocus_source = v, "user (defocus_nm)"


def _navigation(frames: list[SessionFrame], notes: list[str]) -> tuple[str, list[SessionFrame]]:
    """The navigation axis (``defocus``, ``time`` or ``frame``) and the frames in its order.

    A defocus axis needs a distinct defocus for every frame; else acquisition times (all
    known and distinct) give a time axis; else file order. Anything but a defocus axis for
    more than one frame warns (:class:`ReaderWarning`) and is noted in ``notes``.
    """
    known = [f.defocus_nm for f in frames if f.defocus_nm is not None]
    kind = "frame"
    if len(known) == len(frames) and (len(frames) == 1 or len(set(known)) > 1):
        if len(set(known)) == len(known):
            kind = "defocus"
        else:
            notes.append(
                "some frames share a defocus value; stacked in file order with a frame axis "
                "(the defocus of each frame is in the session table)."
            )
    elif known:
        missing = [f.name for f in frames if f.defocus_nm is None]
        if missing:
            notes.append("no defocus in the metadata of: " + ", ".join(missing))
        else:
            notes.append(
                f"every frame records the same defocus ({known[0]:g} nm), i.e. the read-out "
                "was not changed; not used as a defocus axis. Pass defocus_nm=[...]."
            )
    if kind == "frame":
        times = [f.acquired for f in frames]
        if len(frames) > 1 and all(t is not None for t in times) and len(set(times)) == len(times):
            kind = "time"
    if kind == "defocus":
        frames = sorted(frames, key=lambda f: f.defocus_nm)
    elif kind == "time":
        frames = sorted(frames, key=lambda f: f.acquired)
    if kind != "defocus" and len(frames) > 1:
        why = notes[-1] if notes else "no defocus in the metadata of any frame"
        msg = (
            f"session: {why}; stacked by "
            + ("acquisition time" if kind == "time" else "file order")
            + ". Give defocus_nm=[...] for a defocus axis."
        )
        warnings.warn(msg, ReaderWarning, stacklevel=3)  # the caller of read_session
        notes.append(msg)
    return kind, frames


def _nav_axis(frames: list[SessionFrame], kind: str) -> dict[str, Any]:
    """The stack's navigation axis: defocus [nm], time since the first frame [s], or index."""
    if kind == "defocus":
        nav = axis_from_values("defocus", np.array([f.defocus_nm for f in frames]), "nm")
    elif kind == "time":
        t0 = frames[0].acquired
        nav = axis_from_values(
            "time", np.array([(f.acquired - t0).total_seconds() for f in frames]), "s"
        )
    else:
        nav = {"name": "frame", "size": len(frames), "scale": 1.0, "offset": 0.0}
    nav.update(navigate=True, units=nav.get("units"))
    return nav


def _session_metadata(
    frames: list[SessionFrame],
    kind: str,
    skipped: list[str],
    notes: list[str],
    title: str,
    ref: ExperimentalImage,
) -> dict[str, Any]:
    """The stack's metadata: the per-frame table, and the same as HyperSpy metadata."""
    energy = next(
        (f.image.metadata.get("energy_eV") for f in frames if f.image.metadata.get("energy_eV")),
        None,
    )
    mode = ref.metadata.get("acquisition_mode")
    table = [
        {
            "file": str(f.path),
            "name": f.name,
            "index_in_file": f.index_in_file,
            "defocus_nm": f.defocus_nm,
            "defocus_source": f.defocus_source,
            "acquired": f.acquired.isoformat() if f.acquired else None,
            "sampling_A": f.sampling_A,
            "notes": f.notes,
        }
        for f in frames
    ]
    session = {
        "axis": kind,
        "files": [str(f.path) for f in frames],
        "defocus_nm": [np.nan if f.defocus_nm is None else f.defocus_nm for f in frames],
        "defocus_source": [f.defocus_source for f in frames],
        "acquired": [f.acquired.isoformat() if f.acquired else "" for f in frames],
        "skipped": list(skipped) or [""],
        "notes": notes or [""],
        "table_json": json.dumps(table),
    }
    tem: dict[str, Any] = {}
    if energy:
        tem["beam_energy"] = float(energy) / 1e3  # [keV], HyperSpy's unit
    if mode:
        tem["acquisition_mode"] = str(mode)
    hs_md: dict[str, Any] = {
        "General": {"title": title},
        "Signal": {"signal_type": "HRTEM"},
        "HRTEM_transfer": {"session": session},
    }
    if tem:
        hs_md["Acquisition_instrument"] = {"TEM": tem}
    metadata = {
        "format": "session",
        "title": title,
        "reader_notes": list(notes),
        "session": {**session, "table": table},
        "hyperspy": hs_md,
    }
    if energy:
        metadata["energy_eV"] = float(energy)
    if mode:
        metadata["acquisition_mode"] = mode
    return metadata


def load_session(
    paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
    defocus_nm: Sequence[float] | None = None,
    resample: bool = False,
    *,
    title: str | None = None,
):
    """Load a session (a folder or list of image files) as one HyperSpy ``HRTEM`` stack.

    :func:`read_session` returned as a signal: one navigation axis (``defocus`` [nm],
    ``time`` [s] or ``frame``), the signal axes of the session's frames (names, units,
    scale, offset), the beam energy, ``metadata.HRTEM_transfer.session`` (per-frame files,
    defocus values and their sources, acquisition times, skipped files, notes) and
    ``metadata.Signal.signal_type = "HRTEM"`` (so the signal is an
    :class:`~napari_hrtem_transfer.hyperspy.signals.HRTEM` with ``segment`` and
    ``ood_score`` when the package's HyperSpy extension is installed).

    Parameters and errors are those of :func:`read_session`.
    """
    from .hyperspy_integration import to_signal

    return to_signal(read_session(paths_or_folder, defocus_nm, resample, title=title))
