"""Segment nanoparticles in any HRTEM frame or stack: the one segmentation job.

:func:`segment` is the only place where frames are checked, resampled, padded, tiled,
segmented and scored out of distribution.  The CLI (``hrtem-transfer segment``), the napari
Segment widget and the HyperSpy ``HRTEM.segment`` / ``HRTEM.ood_score`` methods are thin
callers of it.

Policy (defaults live once, in :class:`SegmentConfig`)
------------------------------------------------------
* **Any frame size.**  Frames are reflect-padded to the model's stride (and up to
  ``min_frame_px``) and cropped back; large frames are processed in overlapping tiles, so
  memory is bounded by the tile, not the frame.  The label-free OOD pass is padded and tiled
  the same way and reuses the segmentation's probabilities (no second prediction).
* **One resampling rule.**  When the image's pixel size differs from the model's by more than
  ``resample_tolerance`` (relative), frames are resampled to the model's pixel size, segmented,
  and the probabilities resampled back: the output is always on the input's own pixel grid.
  Zoom factors beyond ``max_zoom`` are refused with a message that says what to do.
* **Axes kept.**  The output has exactly the input's shape; the input's axes (navigation and
  signal: names, units, scales, offsets, non-uniform values such as a defocus series in nm)
  are returned unchanged in :attr:`SegmentationResult.axes`.
* **Honest about its domain.**  The models are trained on HRTEM phase-contrast images: STEM
  (HAADF/ADF/BF detector) images give a :class:`SegmentationWarning`, reciprocal-space data
  (diffraction) a :class:`~napari_hrtem_transfer.errors.ConfigError`.  The OOD reference is
  used only when it was fitted on exactly these weights (sha256).

Defocus sign convention: abTEM's, ``defocus = -C10`` (positive = underfocus), in nm.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, HrtemTransferError, config_error_from_validation
from .io.frames import RESAMPLING
from .io.frames import zoom as _zoom
from .training.progress import Progress, StopRequest

__all__ = [
    "PRETRAINED",
    "SegmentConfig",
    "SegmentationResult",
    "SegmentationStopped",
    "SegmentationWarning",
    "ood_reference",
    "pretrained_model_dir",
    "resolve_model",
    "segment",
]

#: Name of the model shipped inside the package (``--model pretrained``).
PRETRAINED = "pretrained"


class SegmentationWarning(UserWarning):
    """The frames are outside what the model was made for (STEM, no pixel size, ...)."""


class SegmentationStopped(HrtemTransferError):
    """A stop was requested; nothing was returned or written."""


class SegmentConfig(BaseModel):
    """Every choice of a segmentation run, with its default (one source for CLI and GUIs)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Probability above which a pixel is labelled particle."""

    which: Literal["best", "last"] = "best"
    """Which checkpoint of the model folder to use."""

    device: str = "auto"
    """Torch device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""

    resample: bool = True
    """Resample frames to the model's pixel size when they differ by more than
    ``resample_tolerance``; False segments at the image's own pixel size (with a warning)."""

    resample_tolerance: float = Field(default=RESAMPLING.tolerance, ge=0.0, le=1.0)
    """Relative pixel-size difference above which frames are resampled."""

    max_zoom: float = Field(default=RESAMPLING.max_zoom, ge=1.0, le=64.0)
    """Largest resampling factor, up or down; beyond it the run is refused."""

    max_resampled_px: int = Field(default=RESAMPLING.max_resampled_px, ge=64)
    """Largest side of a resampled frame [px]."""

    tile_size: int | None = Field(default=None, ge=64, le=16384)
    """Largest tile side for prediction and the OOD pass [px]; None: the largest that
    ``tile_memory_MiB`` allows (never less than the receptive field needs)."""

    tile_memory_MiB: int = Field(default=768, ge=64, le=1 << 20)
    """Working memory of one forward pass [MiB]: sets the tile side and the batch."""

    batch_size: int = Field(default=4, ge=1, le=256)
    """Most tiles (or small frames) per forward pass, within ``tile_memory_MiB``."""

    min_frame_px: int = Field(default=32, ge=8, le=4096)
    """Smaller frames are reflect-padded up to this side (and cropped back)."""

    ood: bool = True
    """Compute each frame's label-free OOD score when the model has an OOD reference."""

    probabilities: bool = True
    """Also return the probability map."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Inference precision (``auto``: bf16 where the hardware has it natively)."""


@dataclass
class SegmentationResult:
    """What :func:`segment` returns.

    Attributes
    ----------
    labels
        uint8 array with exactly the input's shape (..., ny, nx); 1 = particle.
    proba
        float32 particle probability, same shape, or None when not requested.
    ood_score
        float64 array of the navigation shape (``()`` for a single image): about 0 for
        training-like frames, growing as the model gets less sure of the particle edges (or
        finds none) and as the input looks less like its training images
        (:mod:`napari_hrtem_transfer.evaluation.ood`); None when the model has no OOD
        reference (see ``notes``).
    ood_caution
        The model's calibrated "treat with caution" level of the OOD score.
    ood_flag
        bool array of the navigation shape: the verdict's caution flag per frame (score above
        ``ood_caution`` or a physics reason); None without an OOD reference.
    ood_reasons
        Per frame (flat, frame order), short strings naming each cause of a flag and its
        value; empty lists for frames in domain.
    estimated_defocus_nm
        float64 array of the navigation shape: each frame's defocus estimated from its Thon
        rings [nm] (abTEM sign; the magnitude where the sign is not determined); NaN where
        there are no rings.
    defocus_sign_determined
        bool array of the navigation shape: whether the estimate's sign is known.
    ood_components
        Per frame (flat), the verdict's component values (network terms, power-spectrum
        distance, CTF overlap, ...; see ``docs/ood_score.md``).
    imaging_domain
        The model's training imaging domain: ``defocus_nm_range``, ``energy_eV``, ``Cs_mm``,
        ``focal_spread_A``, ``dose_e_per_A2``, ``sampling_A`` (None without a reference).
    axes
        The input's axes, navigation then y, x (rosettasciio-style dicts), unchanged.
    sampling_A, model_sampling_A
        Pixel size of the input and of the model's training images [Å/px].
    resampled
        The zoom factor applied to the frames (image px / model px), or None.
    notes
        What was done and why (resampling, missing OOD reference, STEM warning, ...).
    provenance
        Model, weights sha256, threshold, package version, date: for the output's metadata.
    """

    labels: np.ndarray
    proba: np.ndarray | None
    ood_score: np.ndarray | None
    ood_caution: float | None
    axes: list[dict[str, Any]]
    sampling_A: float | None
    model_sampling_A: float | None
    resampled: float | None = None
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    ood_flag: np.ndarray | None = None
    ood_reasons: list[list[str]] | None = None
    estimated_defocus_nm: np.ndarray | None = None
    defocus_sign_determined: np.ndarray | None = None
    ood_components: list[dict[str, Any]] | None = None
    imaging_domain: dict[str, Any] | None = None

    @property
    def nav_shape(self) -> tuple[int, ...]:
        """Navigation shape (``()`` for a single image)."""
        return tuple(self.labels.shape[:-2])

    def frame_table(self) -> list[dict[str, Any]]:
        """One row per frame: navigation indices and coordinates, and the OOD verdict.

        Coordinates are named ``<axis>_<units>`` (e.g. ``defocus_nm``, ``time_s``) or the
        axis name when it has no units; non-uniform axes give their stored values.  With an
        OOD reference each row has ``ood_score``, ``caution`` (the verdict's flag),
        ``reasons`` (list of strings, empty in domain), ``estimated_defocus_nm`` (number or
        None), ``defocus_sign_determined`` and ``ood_components`` (dict).
        """
        nav_axes = self.axes[: len(self.nav_shape)]
        rows = []
        n = int(np.prod(self.nav_shape, dtype=np.int64)) if self.nav_shape else 1
        scores = None if self.ood_score is None else np.asarray(self.ood_score).reshape(-1)
        for flat in range(n):
            idx = np.unravel_index(flat, self.nav_shape) if self.nav_shape else ()
            row: dict[str, Any] = {"frame": flat}
            for k, (i, ax) in enumerate(zip(idx, nav_axes, strict=True)):
                name = str(ax.get("name") or f"axis{k}")
                row[f"{name}_index"] = int(i)
                key = _coordinate_key(ax, k)
                if key in ("frame", "ood_score", "caution") or key.endswith("_index"):
                    key = f"{key}_coordinate"
                row[key] = _coordinate(ax, int(i))
            if scores is not None:
                row["ood_score"] = float(scores[flat])
                if self.ood_flag is not None:
                    row["caution"] = bool(np.asarray(self.ood_flag).reshape(-1)[flat])
                else:
                    level = math.inf if self.ood_caution is None else float(self.ood_caution)
                    row["caution"] = bool(scores[flat] > level)
                row["reasons"] = list(self.ood_reasons[flat]) if self.ood_reasons else []
                d = (
                    None
                    if self.estimated_defocus_nm is None
                    else float(np.asarray(self.estimated_defocus_nm).reshape(-1)[flat])
                )
                row["estimated_defocus_nm"] = d if d is not None and math.isfinite(d) else None
                row["defocus_sign_determined"] = bool(
                    self.defocus_sign_determined is not None
                    and np.asarray(self.defocus_sign_determined).reshape(-1)[flat]
                )
                row["ood_components"] = (
                    dict(self.ood_components[flat]) if self.ood_components else {}
                )
            rows.append(row)
        return rows


def _coordinate_key(ax: dict[str, Any], k: int) -> str:
    name = re.sub(r"\W+", "_", str(ax.get("name") or f"axis{k}")).strip("_") or f"axis{k}"
    units = ax.get("units")
    if not units:
        return name
    units = re.sub(r"\W+", "", str(units).replace("µ", "u").replace("Å", "A")) or "units"
    return f"{name}_{units}"


def _coordinate(ax: dict[str, Any], i: int) -> float:
    values = ax.get("axis")
    if values is not None and len(values) > i:
        return float(np.asarray(values)[i])
    return float(ax.get("offset", 0.0)) + i * float(ax.get("scale", 1.0))


# ----------------------------------------------------------------------------- models


def pretrained_model_dir() -> Path:
    """Folder of the model shipped in the package (see ``docs/pretrained_model.md``).

    Raises
    ------
    CheckpointError
        If this installation has no shipped model.
    """
    from .inference import pretrained_model_dir as shipped

    return shipped()


def resolve_model(model: Any = PRETRAINED, which: str = "best", device: str = "auto") -> Any:
    """A :class:`~napari_hrtem_transfer.training.LoadedModel` for ``model``.

    The one loader, :func:`napari_hrtem_transfer.inference.load_model`: ``model`` is
    ``"pretrained"`` (the shipped model), a checkpoint folder, a bioimage.io model package
    (``.zip``, ``rdf.yaml``/``bioimageio.yaml``: unpacked once into a cache folder by
    :func:`napari_hrtem_transfer.bioimageio.import_bioimageio`, which refuses architectures
    that are not ours and pickles), or an already loaded model (returned as is).  Loaded
    folders are cached by path, file time, which and device, so repeated calls from a GUI
    do not reload the weights.
    """
    from .inference import load_model

    return load_model(open_model_spec(model, which), which, device)


def open_model_spec(model: Any, which: str = "best") -> Any:
    """``model`` with a bioimage.io package replaced by its unpacked checkpoint folder.

    Raises
    ------
    ConfigError
        ``which`` is not ``"best"`` for a package (a package holds one checkpoint).
    CheckpointError
        The package is refused (not our architecture, pickled weights, ...).
    """
    from .bioimageio import import_bioimageio, is_bioimageio_package

    if not is_bioimageio_package(model):
        return model
    if which != "best":
        raise ConfigError(
            f"{model}: a bioimage.io package holds one checkpoint; use which='best' "
            f"(got {which!r}).",
            "which",
        )
    return import_bioimageio(Path(model).expanduser())


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Frames:
    frames: Any  # (n, ny, nx) numpy or dask
    nav_shape: tuple[int, ...]
    axes: list[dict[str, Any]]
    sampling_A: float | None
    metadata: dict[str, Any]
    name: str
    model: Any = None  # the io.frames.Frames these came from


def _as_frames(data: Any, sampling_A: float | None, axes: list[dict] | None) -> _Frames:
    """Any input through the one frames model (:func:`.io.frames.as_frames`)."""
    from .io.frames import as_frames

    f = as_frames(data, sampling_A, axes)
    return _Frames(
        f.data, f.nav_shape, f.full_axes, f.sampling_A, dict(f.metadata), f.name or "image", f
    )


# ----------------------------------------------------------------------------- numerics


def _pad_to(frame: np.ndarray, min_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad a frame to at least ``min_px`` per side (repeated reflection if needed)."""
    ny, nx = frame.shape
    py, px = max(0, min_px - ny), max(0, min_px - nx)
    if py == 0 and px == 0:
        return frame, (ny, nx)
    mode = "reflect" if min(ny, nx) > 1 else "edge"
    return np.pad(frame, ((0, py), (0, px)), mode=mode), (ny, nx)


def _with_sampling(domain: dict | None, model_s: float | None) -> dict | None:
    """The imaging domain with the model's pixel size where the reference has none."""
    if domain is None:
        return None
    out = dict(domain)
    if out.get("sampling_A") is None:
        out["sampling_A"] = model_s
    return out


def ood_reference(lm: Any, notes: list[str]) -> Any:
    """The loaded model's OOD reference tied to its weights, or None (why: in ``notes``)."""
    from .evaluation.ood import OOD_ARRAYS, load_ood_reference

    ref = load_ood_reference(lm.path, lm.info.get("weights_sha256"))
    if ref is None:

        pkg = ((lm.info.get("extra") or {}).get("bioimageio")) or {}
        if pkg.get("foreign"):
            notes.append(
                f"no OOD score: the bioimage.io package {pkg.get('source') or pkg.get('name')} "
                "was not made by napari-hrtem-transfer and has no OOD reference (it is used as "
                "a plain segmenter); a model fine-tuned from it here gets one."
            )
        elif (Path(lm.path) / OOD_ARRAYS).is_file():
            notes.append(
                "no OOD score: the model folder's OOD reference belongs to other weights "
                "(the checkpoint was replaced); refit it with 'hrtem-transfer evaluate "
                f"--model {lm.path} --data DATASET --fit-ood'."
            )
        else:
            notes.append(
                "no OOD score: the model folder has no OOD reference; fit one with "
                f"'hrtem-transfer evaluate --model {lm.path} --data DATASET --fit-ood'."
            )
    return ref


# ----------------------------------------------------------------------------- the job


def segment(
    data: Any,
    model: Any = PRETRAINED,
    *,
    sampling_A: float | None = None,
    axes: list[dict[str, Any]] | None = None,
    config: SegmentConfig | None = None,
    progress: Progress | None = None,
    stop: StopRequest = None,
    **options: Any,
) -> SegmentationResult:
    """Segment nanoparticles in an image or a stack, and score each frame out of distribution.

    Parameters
    ----------
    data
        Raw intensities: an array (ny, nx) or (..., ny, nx) (numpy or dask; a lazy stack is
        read one frame at a time), an :class:`~napari_hrtem_transfer.io.ExperimentalImage`,
        or a HyperSpy ``Signal2D`` (its axes and pixel size are used).
    model
        ``"pretrained"`` (shipped with the package), a checkpoint folder, or a loaded model.
    sampling_A
        Pixel size of ``data`` [Å/px]; by default taken from the image/signal/axes.  Unknown:
        the model's pixel size is assumed (with a warning).
    axes
        Axis dicts of ``data`` (navigation axes, then y and x): ``name``, ``size``,
        ``scale``, ``offset``, ``units`` (and ``axis`` for non-uniform axes).  Returned
        unchanged in the result.
    config
        A :class:`SegmentConfig`; ``**options`` override its fields (``threshold=0.3``).
    progress
        Called as ``progress(done, total, message)`` after each frame.
    stop
        ``threading.Event`` or callable; checked between frames.  When set,
        :class:`SegmentationStopped` is raised.

    Returns
    -------
    SegmentationResult

    Raises
    ------
    ConfigError
        Bad input (RGB array, reciprocal-space axes, zoom beyond ``max_zoom``, bad option).
    CheckpointError
        The model cannot be loaded.
    SegmentationStopped
        A stop was requested.

    Warns
    -----
    SegmentationWarning
        STEM images, frames without a pixel size, pixel size far from the model's with
        ``resample=False``.
    """
    base = config if config is not None else SegmentConfig()
    try:
        cfg = SegmentConfig(**{**base.model_dump(), **options}) if options else base
    except ValidationError as exc:
        raise config_error_from_validation(exc, first_only=True) from None
    from .training.progress import stop_checker

    stopped = stop_checker(stop)
    inp = _as_frames(data, sampling_A, axes)
    from .io.frames import input_warnings

    notes: list[str] = []
    for warn in input_warnings(inp.model):
        notes.append(warn)
        warnings.warn(warn, SegmentationWarning, stacklevel=2)
    lm = resolve_model(model, cfg.which, cfg.device)
    factor = _resampling(inp, lm.sampling_A, cfg, notes)
    job = _Job(inp, lm, cfg, factor, notes, ood_reference(lm, notes) if cfg.ood else None)
    n = job.n
    for g0 in range(0, n, job.per_group):
        if stopped():
            raise SegmentationStopped(f"stopped after {g0} of {n} frames; nothing was written")
        job.run_group(range(g0, min(n, g0 + job.per_group)))
        if progress is not None:
            done = min(n, g0 + job.per_group)
            progress(done, n, f"segmented frame {done}/{n}")
    return job.result(model)


def _resampling(inp: _Frames, model_s: float | None, cfg: SegmentConfig, notes: list[str]):
    """The zoom factor to the model's pixel size (None: none), with its notes and warnings."""
    from .io.frames import check_zoom

    ny, nx = (int(v) for v in inp.frames.shape[-2:])
    if inp.sampling_A is None:
        msg = (
            f"{inp.name}: the pixel size is unknown; assumed the model's "
            f"{model_s:g} Å/px. Give the pixel size (sampling_A / --sampling) to check."
            if model_s
            else f"{inp.name}: neither the image nor the model has a pixel size."
        )
        notes.append(msg)
        warnings.warn(msg, SegmentationWarning, stacklevel=3)
        return None
    if not model_s or abs(inp.sampling_A / model_s - 1.0) <= cfg.resample_tolerance:
        return None
    ratio = inp.sampling_A / model_s
    if not cfg.resample:
        msg = (
            f"{inp.name}: pixel size {inp.sampling_A:.4g} Å differs from the model's "
            f"{model_s:.4g} Å (x{ratio:.3g}) and resampling is off; results may be poor."
        )
        notes.append(msg)
        warnings.warn(msg, SegmentationWarning, stacklevel=3)
        return None
    factor = check_zoom(
        inp.sampling_A,
        model_s,
        (ny, nx),
        inp.name,
        max_zoom=cfg.max_zoom,
        max_resampled_px=cfg.max_resampled_px,
    )
    notes.append(
        f"resampled frames from {inp.sampling_A:.4g} to the model's {model_s:.4g} Å/px "
        f"(zoom x{ratio:.3g}) and the probabilities back to the input grid"
    )
    return factor


class _Job:
    """The state of one :func:`segment` run: outputs, tiles and the OOD verdicts."""

    def __init__(self, inp, lm, cfg: SegmentConfig, factor, notes: list[str], ref) -> None:
        from .inference import DEFAULT_BYTES_PER_PX, overlap_for, tile_for_budget
        from .training.device import resolve_precision

        self.inp, self.lm, self.cfg, self.factor, self.notes, self.ref = (
            inp,
            lm,
            cfg,
            factor,
            notes,
            ref,
        )
        n, (ny, nx) = int(inp.frames.shape[0]), (int(v) for v in inp.frames.shape[-2:])
        self.n, self.ny, self.nx = n, ny, nx
        self.labels = np.empty((n, ny, nx), dtype=np.uint8)
        self.proba = np.empty((n, ny, nx), dtype=np.float32) if cfg.probabilities else None
        self.verdicts: dict[int, tuple] = {}
        self.scorer = None
        if ref is not None:
            from .evaluation import ScoringModel

            self.scorer = ScoringModel(lm)
            self.scorer.precision = cfg.precision
        stride = max(1, int(lm.output_stride))
        self.min_px = max(cfg.min_frame_px, stride)
        overlap = overlap_for(int(getattr(lm.model, "receptive_field", 0)), stride)
        budget = cfg.tile_memory_MiB * 2**20
        self.bytes_per_px = DEFAULT_BYTES_PER_PX[resolve_precision(cfg.precision, lm.device)]
        tile = cfg.tile_size or tile_for_budget(budget, self.bytes_per_px, stride, overlap)
        # prediction tiles must hold the model's reach on both sides of their useful centre
        self.tile = max(tile // stride * stride, 2 * overlap + stride)
        self.budget_px = max(budget // self.bytes_per_px, self.tile**2)
        # small frames are processed several at a time (at most one tile's worth of pixels)
        zy, zx = (ny, nx) if factor is None else (round(ny * factor), round(nx * factor))
        per_px = max(zy, self.min_px) * max(zx, self.min_px)
        self.per_group = max(1, (tile * tile) // max(1, per_px))
        self.small_warned = False

    def _work(self, chunk: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Frames at the model's pixel size (resampled once), padded to ``min_px``."""
        works = []
        for frame in chunk:
            work = _zoom(frame, self.factor) if self.factor is not None else frame
            work, (wy, wx) = _pad_to(work, self.min_px)
            works.append(work)
        if (wy, wx) != works[0].shape and not self.small_warned:
            self.small_warned = True
            self.notes.append(
                f"frames of {wy}x{wx} px (at the model's pixel size) are smaller than "
                f"{self.min_px} px and were reflect-padded; the model sees little context, "
                "so treat the result with caution"
            )
        return (works[0][None] if len(works) == 1 else np.stack(works)), (wy, wx)

    def _batch(self, shape: tuple[int, ...]) -> int:
        ty, tx = min(self.tile, shape[-2]), min(self.tile, shape[-1])
        return max(1, min(self.cfg.batch_size, self.budget_px // max(1, ty * tx)))

    def run_group(self, idx: range) -> None:
        """Segment (and score) frames ``idx``: one network pass, probabilities back."""
        cfg = self.cfg
        chunk = self.inp.frames[idx.start : idx.stop]
        chunk = np.asarray(chunk.compute() if hasattr(chunk, "compute") else chunk, np.float32)
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            bad = [idx.start + int(k) for k in np.flatnonzero(~finite)[:10]]
            raise ConfigError(
                f"frame(s) {bad} contain NaN or infinite pixels; fill them (for example with "
                "the frame's median) or crop them away before segmenting",
                "data",
            )
        work, (wy, wx) = self._work(chunk)
        bs = self._batch(work.shape)
        if self.scorer is None:
            p = self.lm.predict_proba(
                work, tile_size=self.tile, batch_size=bs, precision=cfg.precision
            )
        else:  # features, entropy and probabilities from the same forward passes
            from .evaluation.ood.verdict import ENCODER_MAX_TILES

            st = self.scorer.frame_stats(
                work, want_proba=True, tile_px=self.tile, batch_size=bs, max_tiles=ENCODER_MAX_TILES
            )
            p = st.proba
            self._verdict(idx, st, work, chunk, (wy, wx))
        for k, i in enumerate(idx):
            pk = p[k, :wy, :wx]
            if self.factor is not None:
                pk = np.clip(_zoom(pk, 0.0, (self.ny, self.nx)), 0.0, 1.0)
            self.labels[i] = pk >= cfg.threshold
            if self.proba is not None:
                self.proba[i] = pk

    def _verdict(self, idx: range, st, work: np.ndarray, chunk: np.ndarray, hw: tuple) -> None:
        from .evaluation.ood import verdict

        try:
            sc = verdict(
                self.ref,
                st,
                work,
                native_frames=chunk,  # unpadded: the input checks see the frame itself
                native_sampling_A=self.inp.sampling_A,
                model_sampling_A=self.scorer.sampling_A,
                zoom=self.factor,
                conditions=self.inp.metadata, work_size_px=hw,  # hw: before padding
            )
        except Exception as exc:  # noqa: BLE001 - a missing score must not lose the masks
            self.notes.append(f"no OOD score for frames {idx.start}-{idx.stop - 1}: {exc}")
            return
        for k, i in enumerate(idx):
            d = sc.estimated_defocus_nm[k]
            self.verdicts[i] = (
                float(np.asarray(sc.score, dtype=float).reshape(-1)[k]),
                bool(np.asarray(sc.caution).reshape(-1)[k]),
                list(sc.reasons[k]),
                dict(sc.components[k]),
                np.nan if d is None else float(d),
                bool(np.asarray(sc.defocus_sign_determined).reshape(-1)[k]),
            )

    def _ood_arrays(self, nav: tuple[int, ...]) -> dict[str, Any]:
        """The result's OOD fields (None without a reference)."""
        if self.ref is None:
            return {
                k: None
                for k in (
                    "ood_score",
                    "ood_caution",
                    "ood_flag",
                    "ood_reasons",
                    "estimated_defocus_nm",
                    "defocus_sign_determined",
                    "ood_components",
                    "imaging_domain",
                )
            }
        blank = (np.nan, False, [], {}, np.nan, False)
        rows = [self.verdicts.get(i, blank) for i in range(self.n)]
        return {
            "ood_score": np.array([r[0] for r in rows], float).reshape(nav),
            "ood_caution": float(self.ref.caution),
            "ood_flag": np.array([r[1] for r in rows], bool).reshape(nav),
            "ood_reasons": [r[2] for r in rows],
            "ood_components": [r[3] for r in rows],
            "estimated_defocus_nm": np.array([r[4] for r in rows], float).reshape(nav),
            "defocus_sign_determined": np.array([r[5] for r in rows], bool).reshape(nav),
            "imaging_domain": _with_sampling(self.ref.domain, self.lm.sampling_A),
        }

    def result(self, model: Any) -> SegmentationResult:
        """The :class:`SegmentationResult` of the frames segmented so far."""
        from . import __version__

        inp, lm, cfg = self.inp, self.lm, self.cfg
        shape = (*inp.nav_shape, self.ny, self.nx)
        ood = self._ood_arrays(inp.nav_shape if inp.nav_shape else ())
        provenance = {
            "model": PRETRAINED if str(model) == PRETRAINED else str(lm.path),
            "model_path": str(lm.path),
            "which": cfg.which,
            "weights_sha256": lm.info.get("weights_sha256"),
            "model_sampling_A": lm.sampling_A,
            "threshold": cfg.threshold,
            "resampled_zoom": self.factor,
            "package": "napari-hrtem-transfer",
            "version": __version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "ood_reference": self.ref is not None,
            "ood_caution": ood["ood_caution"],
        }
        return SegmentationResult(
            labels=self.labels.reshape(shape),
            proba=None if self.proba is None else self.proba.reshape(shape),
            axes=[dict(a) for a in inp.axes],
            sampling_A=inp.sampling_A,
            model_sampling_A=lm.sampling_A,
            resampled=self.factor,
            notes=self.notes,
            provenance=provenance,
            **ood,
        )
