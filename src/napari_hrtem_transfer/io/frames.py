"""One model of calibrated frames: what every reader produces and every writer consumes.

:class:`Frames` (public name also :class:`ExperimentalImage`, see docs/CONTRACTS.md) holds

* ``data``: the frames (n_frames, ny, nx), eager (numpy float32) or lazy (dask), the
  navigation flattened in C order;
* every axis: :attr:`Frames.nav_axes` (outermost first) and the y, x signal axes in
  ``axes[1:]``, each a rosettasciio-style dict (``name``, ``size``, ``scale``, ``offset``,
  ``units``, ``navigate``; ``axis`` values for a non-uniform axis such as a defocus series);
* the pixel size ``sampling_A`` [Å/px] and where it came from (``sampling_source``);
* beam energy, acquisition mode, Cs, defocus when known (``metadata``), the notes of what
  was guessed or converted (``metadata["reader_notes"]``), the per-frame source files
  (``sources``) and provenance.

This module is also the one place for the rules every input goes through: the length-unit
table (:func:`length_unit_to_A`), pixel-size discovery from axes (:func:`calibration`),
RGB -> grey (:func:`to_grey`), the STEM / label-image input warnings
(:func:`input_warnings`) and the resampling rule and its limits (:class:`ResampleConfig`,
:func:`check_zoom`, :func:`zoom`).  HyperSpy signals convert in
:mod:`napari_hrtem_transfer.io.hyperspy_integration` (both ways) and files are written by
:func:`napari_hrtem_transfer.io.writers.write_frames`.

Nothing heavy is imported at module level (SciPy inside :func:`zoom`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, ReaderError
from .geometry import (
    NotAnImage,
    PixelGrid,
    ReaderWarning,
    axis_dict,
    axis_from_values,
    calibration,
    check_real_space,
    default_axes,
    length_unit_to_A,
    normalise_units,
    sampling_from_axes,
    unit_kind,
)

__all__ = [
    "RESAMPLING",
    "ExperimentalImage",
    "Frames",
    "ReaderWarning",
    "ResampleConfig",
    "axis_dict",
    "axis_from_values",
    "calibration",
    "check_zoom",
    "input_warnings",
    "length_unit_to_A",
    "normalise_units",
    "to_grey",
    "unit_kind",
    "zoom",
]


# ----------------------------------------------------------------------------- resampling


class ResampleConfig(BaseModel):
    """The resampling rule's limits: one definition for segmentation and sessions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_zoom: float = Field(default=8.0, ge=1.0, le=64.0)
    """Largest resampling factor, up or down (image px / target px); beyond it the input
    is refused (segmentation) or the frame left out (sessions)."""

    max_resampled_px: int = Field(default=16384, ge=64)
    """Largest side of a resampled frame [px]."""

    tolerance: float = Field(default=0.05, ge=0.0, le=1.0)
    """Relative pixel-size difference above which segmentation resamples."""

    same_pixel_rtol: float = Field(default=0.01, ge=0.0, le=0.5)
    """Relative difference of pixel sizes still counted as "the same" within a session."""


#: The defaults (``SegmentConfig.max_zoom`` and the session resampling use these values).
RESAMPLING = ResampleConfig()


def check_zoom(
    sampling_A: float,
    model_sampling_A: float,
    frame_shape: tuple[int, int],
    name: str,
    *,
    max_zoom: float = RESAMPLING.max_zoom,
    max_resampled_px: int = RESAMPLING.max_resampled_px,
) -> float:
    """The zoom factor (image px / model px) to resample frames by; refuse absurd ones.

    Raises
    ------
    ConfigError
        If the factor is beyond ``max_zoom`` either way or the resampled frame would be
        larger than ``max_resampled_px``; the message names ``name`` and what to do.
    """
    ratio = float(sampling_A) / float(model_sampling_A)
    big = max(int(frame_shape[0]), int(frame_shape[1])) * ratio
    if ratio > max_zoom or ratio < 1.0 / max_zoom or big > max_resampled_px:
        raise ConfigError(
            f"{name}: pixel size {sampling_A:.4g} Å/px is {ratio:.3g} times the model's "
            f"{model_sampling_A:.4g} Å/px; resampling by more than x{max_zoom:g} (or to "
            f"frames over {max_resampled_px} px) is refused. This model is for images near "
            f"{model_sampling_A:.4g} Å/px: use a model trained at this pixel size (simulate "
            "with sampling_A / --sampling), or segment without resampling (resample=False / "
            "--no-resample) if you know better.",
            "resample",
        )
    return ratio


def zoom(frame: np.ndarray, factor: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resample one frame by ``factor`` (linear); with ``shape``, to exactly that shape."""
    from scipy import ndimage

    if shape is None:
        shape = (max(1, round(frame.shape[0] * factor)), max(1, round(frame.shape[1] * factor)))
    zy, zx = shape[0] / frame.shape[0], shape[1] / frame.shape[1]
    return ndimage.zoom(
        frame.astype(np.float32, copy=False), (zy, zx), order=1, mode="nearest", grid_mode=True
    ).astype(np.float32, copy=False)


# ITU-R BT.601 luma weights (what Pillow's convert("L") uses).
_LUMA = {"R": 0.299, "G": 0.587, "B": 0.114}

# ----------------------------------------------------------------------------- pixels


def to_grey(data: Any, label: str, notes: list[str]) -> Any:
    """Structured RGB(A) arrays -> float32 grey (BT.601 luma); other data unchanged.

    The conversion is recorded in ``notes`` and warned (:class:`ReaderWarning`).
    """
    names = data.dtype.names
    if names:
        channels = [n for n in names if n.upper() in _LUMA]
        if len(channels) != 3:
            raise NotAnImage(f"structured pixel type {data.dtype} is not RGB")
        grey = sum(_LUMA[n.upper()] * data[n].astype(np.float32) for n in channels)
        note = (
            f"{label}: RGB colour image converted to grey "
            "(0.299 R + 0.587 G + 0.114 B); use the raw detector file if you have it."
        )
        notes.append(note)
        warnings.warn(note, ReaderWarning, stacklevel=4)
        return grey if _is_lazy(grey) else np.asarray(grey, dtype=np.float32)
    if np.iscomplexobj(data):
        raise NotAnImage("complex-valued data (an FFT or exit wave?), not an intensity image")
    return data


def trailing_rgb_to_grey(data: np.ndarray, label: str, notes: list[str]) -> np.ndarray:
    """A (ny, nx, 3|4) array -> grey, recorded in ``notes`` and warned."""
    note = f"{label}: (ny, nx, {data.shape[-1]}) array read as RGB(A) and converted to grey."
    notes.append(note)
    warnings.warn(note, ReaderWarning, stacklevel=3)
    w = np.array([_LUMA["R"], _LUMA["G"], _LUMA["B"]], dtype=np.float32)
    return data[..., :3].astype(np.float32) @ w


_STEM_WORDS = re.compile(r"\b(HAADF|ADF|DF\d?|BF|ABF|STEM|DPC|iDPC|SE)\b", re.IGNORECASE)


def acquisition_warning(meta: dict[str, Any], name: str) -> str | None:
    """A warning when the metadata say STEM (mode or detector name), else None."""
    mode = str(meta.get("acquisition_mode") or "").upper()
    title = str(meta.get("title") or "")
    if mode == "STEM" or _STEM_WORDS.search(title):
        what = f"acquisition mode {mode}" if mode == "STEM" else f"detector '{title}'"
        return (
            f"{name}: {what}: this looks like a STEM image. The models are trained on HRTEM "
            "(phase-contrast) images; STEM contrast differs, so the segmentation is likely "
            "wrong and the OOD score will say so."
        )
    return None


def label_image_warning(frame: Any, name: str) -> str | None:
    """A warning when a frame holds two grey levels or fewer (a label mask, not an image)."""
    a = np.asarray(frame)
    step = max(1, int(math.sqrt(a.size / 2**20)))  # look at about a million pixels
    values = np.unique(a[::step, ::step])
    if values.size <= 2:
        shown = ", ".join(f"{v:g}" for v in values.astype(float))
        return (
            f"{name}: the frame holds only the value(s) {shown}: this looks like a label "
            "mask or a binary image, not an HRTEM micrograph. Segment the raw image (the "
            "masks are what this tool writes); at a dose well below 1 e/px a raw frame can "
            "hold only 0 and 1 counts, and then this warning does not apply."
        )
    return None


def input_warnings(frames: Frames) -> list[str]:
    """Warnings about what the input is (STEM, a label mask) for the segmentation notes.

    Only the first frame is looked at for the label check (one frame of a lazy stack is
    read).
    """
    out = []
    name = frames.name or "image"
    stem = acquisition_warning(frames.metadata, name)
    if stem:
        out.append(stem)
    if frames.n_frames:
        first = frames.data[0]
        if _is_lazy(first):
            first = first.compute()
        label = label_image_warning(first, name)
        if label:
            out.append(label)
    return out


def _is_lazy(data: Any) -> bool:
    return hasattr(data, "dask") or (hasattr(data, "compute") and not isinstance(data, np.ndarray))


# ----------------------------------------------------------------------------- the model


@dataclass
class Frames(PixelGrid):
    """Grey-level frames with every axis and their calibration (what readers return).

    Attributes
    ----------
    data
        Array (n_frames, ny, nx): numpy float32 (the file's intensities: counts, not
        standardised) or, for lazy inputs, a dask array read frame by frame. A single
        image has ``n_frames == 1``; stacks and series keep their navigation axes flattened
        in array order (:attr:`nav_axes` and :meth:`frames` restore the shape).
    sampling_A
        Pixel size [Å/px] (the x pixel size when pixels are not square), or None when
        the input has no real-space calibration.
    axes
        Three rosettasciio-style axis dicts (``name``, ``size``, ``scale``, ``offset``,
        ``units``, ``navigate``) describing ``data``'s axes (frame, y, x) as stored in
        the file; ``units`` is None where the file has none (never ``"<undefined>"``).
    metadata
        Flat dict of plain values: ``format``, ``title``, ``reader_notes`` (list of str),
        ``hyperspy`` (the signal's HyperSpy metadata as a dict, empty for ``.npy``), and when
        known ``energy_eV``, ``acquisition_mode``, ``Cs_A``, ``defocus_nm`` (see
        :mod:`napari_hrtem_transfer.io.readers`).
    original_metadata
        The vendor tags as HyperSpy reports them.
    name
        Human-readable name (file stem plus signal title or index).
    path
        File the frames were read from, or None.
    nav_axes
        The navigation axes as axis dicts, in array order (outermost first), exactly as
        stored (names, units, scales, offsets; ``axis`` values for non-uniform axes such as
        a defocus series): ``[]`` for a single image, one entry for a stack, two for a
        defocus x image series.
    sampling_source
        Where ``sampling_A`` came from (e.g. "file axes (nm)", "user", "none").
    sources
        The file each frame came from (sessions), flat in frame order; empty when all came
        from ``path``.
    provenance
        What produced the frames (reader, session table, resampling), plain values.
    """

    data: Any
    sampling_A: float | None
    axes: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    original_metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    path: Path | None = None
    nav_axes: list[dict[str, Any]] | None = None
    sampling_source: str = ""
    sources: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = self.data
        if not _is_lazy(data):
            data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ReaderError(
                f"{self.name or 'image'}: data must have shape (n_frames, ny, nx); "
                f"got shape {tuple(data.shape)}."
            )
        if _is_lazy(data):
            self.data = data if data.dtype == np.float32 else data.astype(np.float32)
        else:
            self.data = np.ascontiguousarray(data, dtype=np.float32)
        if self.sampling_A is not None:
            s = float(self.sampling_A)
            if not (math.isfinite(s) and s > 0):
                raise ReaderError(
                    f"{self.name or 'image'}: sampling_A must be a positive pixel size [Å]; "
                    f"got {self.sampling_A!r}."
                )
            self.sampling_A = s
        if not self.sampling_source:
            self.sampling_source = "none" if self.sampling_A is None else "given"
        if len(self.axes) != 3:
            n, ny, nx = (int(v) for v in self.data.shape)
            self.axes = default_axes((n, ny, nx), self.sampling_A)
        if self.nav_axes is None:
            n = self.data.shape[0]
            self.nav_axes = [] if n == 1 else [dict(self.axes[0])]
        self.nav_axes = [dict(a) for a in self.nav_axes]
        if int(np.prod(self.nav_shape, dtype=np.int64)) != self.data.shape[0]:
            raise ReaderError(
                f"{self.name or 'image'}: navigation axes of shape {self.nav_shape} do not "
                f"match {self.data.shape[0]} frames."
            )
        if self.sources and len(self.sources) != self.n_frames:
            raise ReaderError(
                f"{self.name or 'image'}: {len(self.sources)} source files for "
                f"{self.n_frames} frames."
            )
        self.metadata.setdefault("reader_notes", [])

    @property
    def nav_shape(self) -> tuple[int, ...]:
        """Navigation shape in array order (``()`` for a single image)."""
        return tuple(int(a["size"]) for a in self.nav_axes or [])

    @property
    def full_axes(self) -> list[dict[str, Any]]:
        """Navigation axes then the y and x signal axes, in array order."""
        return [dict(a) for a in self.nav_axes or []] + [dict(self.axes[1]), dict(self.axes[2])]

    def frames(self) -> Any:
        """``data`` with its navigation shape restored: ``nav_shape + (ny, nx)``."""
        return self.data.reshape(*self.nav_shape, *self.image_shape)

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.data.shape[0])

    @property
    def sampling_nm(self) -> float | None:
        """Pixel size [nm/px], or None when uncalibrated."""
        return None if self.sampling_A is None else self.sampling_A / 10.0

    @property
    def is_calibrated(self) -> bool:
        """Whether the frames have a real-space pixel size."""
        return self.sampling_A is not None

    @property
    def is_lazy(self) -> bool:
        """Whether ``data`` is a lazy (dask) array."""
        return _is_lazy(self.data)

    @property
    def notes(self) -> list[str]:
        """What was guessed or converted on the way in (``metadata["reader_notes"]``)."""
        return list(self.metadata.get("reader_notes") or [])

    @property
    def session(self) -> dict[str, Any] | None:
        """The session table (per-frame files, defocus and their sources), or None."""
        hs_md = self.metadata.get("hyperspy") or {}
        node = (hs_md.get("HRTEM_transfer") or {}).get("session")
        return node if node else None


#: The public name of :class:`Frames` (docs/CONTRACTS.md).
ExperimentalImage = Frames


# ----------------------------------------------------------------------------- any input


def as_frames(
    data: Any, sampling_A: float | None = None, axes: list[dict[str, Any]] | None = None
) -> Frames:
    """Any segmentation input as :class:`Frames`: an array, Frames, or a HyperSpy signal.

    Arrays (numpy or dask, ``(ny, nx)`` or ``(..., ny, nx)``) take ``axes`` when given
    (navigation axes first, then y and x; the pixel size then comes from them) and are
    named "data" in messages.  ``sampling_A`` overrides any calibration.

    Raises
    ------
    ConfigError
        RGB arrays, fewer than two dimensions, non-real dtypes, axes that do not fit,
        reciprocal-space axes.
    """
    if hasattr(data, "axes_manager") and hasattr(data, "data"):  # a HyperSpy signal
        from .hyperspy_integration import from_signal

        data = from_signal(data, allow_reciprocal=True, compute=False)
    if isinstance(data, Frames):
        name = data.name or "image"
        full = [dict(a) for a in axes] if axes else data.full_axes
        if data.sampling_A is None and data.metadata.get("reciprocal_sampling"):
            check_real_space(full, name)
        if sampling_A is None and not axes:
            return data
        nav = full[:-2]
        return Frames(
            data=data.data,
            sampling_A=sampling_A if sampling_A is not None else data.sampling_A,
            axes=[dict(nav[0]) if len(nav) == 1 else dict(data.axes[0]), *full[-2:]],
            metadata=data.metadata,
            original_metadata=data.original_metadata,
            name=data.name,
            path=data.path,
            nav_axes=nav,
            sampling_source="user" if sampling_A is not None else data.sampling_source,
            sources=list(data.sources),
            provenance=dict(data.provenance),
        )
    arr = data
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        arr = np.asarray(arr)
    shape = tuple(int(v) for v in arr.shape)
    if getattr(arr.dtype, "names", None) or (
        len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4
    ):
        raise ConfigError(
            f"an array of shape {shape} looks like an RGB(A) colour image; convert it to grey "
            "first (or read the file with napari_hrtem_transfer.io.read_images, which does).",
            "data",
        )
    if len(shape) < 2:
        raise ConfigError(
            f"need an image (ny, nx) or a stack (..., ny, nx); got shape {shape}.", "data"
        )
    if np.dtype(arr.dtype).kind not in "biuf":
        raise ConfigError(f"images must be real numbers; got dtype {arr.dtype}.", "data")
    source = "user" if sampling_A is not None else "none"
    if axes is not None:
        axes = [dict(a) for a in axes]
        if len(axes) != len(shape):
            raise ConfigError(
                f"{len(axes)} axes given for data of shape {shape}; give one axis dict per "
                "dimension (navigation axes first, then y and x).",
                "axes",
            )
        check_real_space(axes, "data")
        if sampling_A is None:
            sampling_A = sampling_from_axes(axes)
            source = "none" if sampling_A is None else "axes"
    else:
        axes = default_axes(shape, sampling_A)
    ny, nx = shape[-2:]
    nav = axes[:-2]
    n = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
    frame_ax = dict(nav[0]) if len(nav) == 1 else default_axes((n, ny, nx), None)[0]
    return Frames(
        data=arr.reshape(-1, ny, nx),
        sampling_A=sampling_A,
        axes=[frame_ax, *axes[-2:]],
        metadata={"format": "array", "title": "", "reader_notes": [], "hyperspy": {}},
        name="data",
        nav_axes=nav,
        sampling_source=source,
    )
