"""What the widgets do, as plain functions (no napari, no Qt): testable without a viewer.

Each job takes ``report`` (a callable receiving progress updates) as first argument, so it
can run in :func:`~napari_hrtem_transfer._napari._workers.run_with_updates`; called
directly, pass ``report=None``.

Units: defocus [nm] (abTEM sign: ``defocus = -C10``, positive = underfocus), dose [e/Å²],
pixel size [Å] inside, [nm] as napari layer scale.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._reader import LayerData, dataset_to_layer_data
from ._workers import JobProgress

Report = Callable[[Any], None] | None

_LENGTH_TO_A = {"nm": 10.0, "nanometer": 10.0, "Å": 1.0, "angstrom": 1.0, "pm": 0.01,
                "picometer": 0.01, "µm": 1e4, "um": 1e4, "micrometer": 1e4}


def _emit(report: Report, update: Any) -> None:
    if report is not None:
        report(update)


def parse_defoci(text: str | Sequence[float]) -> list[float]:
    """Defoci [nm] from ``"-10, -5, 0, 5, 10"`` (commas and/or spaces) or a sequence.

    Raises
    ------
    ConfigError
        If the text holds something that is not a number, or nothing.
    """
    if not isinstance(text, str):
        values = [float(v) for v in text]
    else:
        parts = [p for p in re.split(r"[,;\s]+", text.strip()) if p]
        try:
            values = [float(p) for p in parts]
        except ValueError as exc:
            raise ConfigError(
                f"defoci must be numbers in nm separated by commas, e.g. '-10, 0, 10' "
                f"(got {text!r})",
                "defocus_nm",
            ) from exc
    if not values:
        raise ConfigError("give at least one defocus in nm, e.g. '-10, 0, 10'", "defocus_nm")
    return values


def parse_domains(text: str) -> list[float] | str:
    """Training domains: ``"all"`` or defoci [nm] as in :func:`parse_defoci`."""
    if text.strip().lower() in ("", "all"):
        return "all"
    return parse_defoci(text)


# ------------------------------------------------------------------------- simulation


def build_simulation_config(
    *,
    preset: str = "laptop",
    material: str = "CdSe",
    n_structures: int = 4,
    defocus_nm: str | Sequence[float] = "-10, -5, 0, 5, 10",
    dose_e_per_A2: float | None = 400.0,
    seed: int = 0,
    image_size_px: int | None = None,
    **overrides: Any,
) -> Any:
    """A validated :class:`~napari_hrtem_transfer.simulate.SimulationConfig`.

    Parameters
    ----------
    preset
        ``"laptop"`` or ``"study"``.
    material
        Particle lattice (see ``napari_hrtem_transfer.simulate.MATERIALS``).
    n_structures
        Structures (images per defocus).
    defocus_nm
        Nominal defoci [nm], abTEM sign (positive = underfocus).
    dose_e_per_A2
        Dose [e/Å²]; None or 0 gives noise-free intensities.
    seed
        Master seed.
    image_size_px
        Image side [px]; None keeps the preset's.
    **overrides
        Any other :class:`SimulationConfig` field.

    Raises
    ------
    ConfigError
        With the validation message if a value is out of range.
    """
    from pydantic import ValidationError

    from ..simulate import SimulationConfig

    values: dict[str, Any] = dict(
        material=material,
        n_structures=int(n_structures),
        defocus_nm=parse_defoci(defocus_nm),
        seed=int(seed),
        image_size_px=image_size_px,
        **overrides,
    )
    try:
        config = SimulationConfig.from_preset(preset, **values)
        # from_preset drops None overrides; "noise-free" must be set explicitly
        if not dose_e_per_A2:
            config.dose_e_per_A2 = None
        else:
            config.dose_e_per_A2 = float(dose_e_per_A2)
    except ValidationError as exc:
        raise ConfigError(_pydantic_message(exc)) from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config


def _pydantic_message(exc: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "value"
        parts.append(f"{loc}: {err.get('msg', '')}")
    return "; ".join(parts)


def simulate_job(
    report: Report, config: Any, save_path: str | os.PathLike | None = None
) -> list[LayerData]:
    """Simulate ``config`` and return napari layers (images + ground-truth masks).

    Parameters
    ----------
    report
        Receives :class:`JobProgress` (structures done / total).
    config
        A :class:`~napari_hrtem_transfer.simulate.SimulationConfig`.
    save_path
        Also write the dataset to this ``.hspy`` file.
    """
    from ..simulate import simulate_dataset

    total = int(config.n_structures)
    _emit(report, JobProgress(0, total, f"simulating {total} structure(s) (abTEM)"))

    def progress(done: int, n: int) -> None:
        _emit(report, JobProgress(int(done), int(n), f"simulated {done}/{n} structures"))

    ds = simulate_dataset(config, progress=progress)
    name = f"simulated {config.material} ({config.preset})"
    if save_path:
        from ..io.dataset import save_dataset

        path = save_dataset(ds, save_path)
        ds.path = path
        _emit(report, JobProgress(total, total, f"saved {path}"))
    return dataset_to_layer_data(ds, name=name)


# ------------------------------------------------------------------------- training


class QueueCallback:
    """Training callback forwarding every update to ``report`` (from the training thread)."""

    def __init__(self, report: Report) -> None:
        self._report = report

    def on_train_start(self, start: Any) -> None:
        """Forward the :class:`~napari_hrtem_transfer.training.TrainStart` record."""
        _emit(self._report, start)

    def on_step(self, update: Any) -> None:
        """Forward a :class:`~napari_hrtem_transfer.training.StepUpdate`."""
        _emit(self._report, update)

    def on_epoch(self, update: Any) -> None:
        """Forward an :class:`~napari_hrtem_transfer.training.EpochUpdate`."""
        _emit(self._report, update)

    def on_train_end(self, result: Any) -> None:
        """Forward the :class:`~napari_hrtem_transfer.training.TrainResult`."""
        _emit(self._report, result)


def build_train_config(
    *,
    init_from: str | os.PathLike | None = None,
    train_defocus_nm: str | Sequence[float] = "all",
    freeze: str = "none",
    epochs: int = 10,
    lr: float | None = None,
    batch_size: int = 16,
    n_train: int | None = None,
    patch_size: int | None = 256,
    device: str = "auto",
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """A validated :class:`~napari_hrtem_transfer.training.TrainConfig`.

    ``init_from`` (a checkpoint folder) makes it a fine-tuning; ``lr=None`` takes the
    stage's default (1e-3 pretraining, 1e-4 fine-tuning, as in the study); ``n_train`` of
    0 or None uses every training image.

    Raises
    ------
    ConfigError
        With the validation message if a value is out of range.
    """
    from pydantic import ValidationError

    from ..training import TrainConfig

    domains = parse_domains(train_defocus_nm) if isinstance(train_defocus_nm, str) else list(
        train_defocus_nm
    )
    values: dict[str, Any] = dict(
        train_defocus_nm=domains,
        freeze=freeze,
        epochs=int(epochs),
        batch_size=int(batch_size),
        n_train=int(n_train) if n_train else None,
        patch_size=int(patch_size) if patch_size else None,
        device=device,
        seed=int(seed),
        **overrides,
    )
    if lr:
        values["lr"] = float(lr)
    try:
        if init_from:
            return TrainConfig.finetune(Path(init_from), **values)
        return TrainConfig.pretrain(**values)
    except ValidationError as exc:
        raise ConfigError(_pydantic_message(exc)) from exc


def train_job(
    report: Report,
    config: Any,
    data: Any,
    out_dir: str | os.PathLike,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> Any:
    """Run :func:`napari_hrtem_transfer.training.train`, reporting its progress records.

    ``report`` receives ``TrainStart``, one ``StepUpdate`` per step, one ``EpochUpdate``
    per epoch and the final ``TrainResult``; setting ``stop`` ends the run after the
    current step with a resumable checkpoint. A finished run also gets its label-free OOD
    reference (so the Segment widget can score frames). Returns the ``TrainResult``.
    """
    from ..training import train

    result = train(config, data, out_dir, callbacks=[QueueCallback(report)], stop=stop,
                   resume=resume)
    if not result.stopped:
        from ..evaluation.ood import fit_ood_reference_for_checkpoint
        from ..io import load_dataset

        ds = load_dataset(data) if isinstance(data, str | os.PathLike) else data
        fit_ood_reference_for_checkpoint(result.out_dir, ds)
    return result


# ------------------------------------------------------------------------- segmentation


def layer_sampling_A(layer_or_kwargs: Any) -> float | None:
    """Pixel size [Å] of an image layer (or its ``LayerData`` kwargs); None if unknown.

    Uses ``metadata["sampling_A"]`` (set by this plugin's reader), else the last axis'
    ``scale`` with length ``units`` (nm, Å, pm, µm).
    """
    if isinstance(layer_or_kwargs, dict):
        metadata = layer_or_kwargs.get("metadata") or {}
        scale = layer_or_kwargs.get("scale")
        units = layer_or_kwargs.get("units")
    else:
        metadata = getattr(layer_or_kwargs, "metadata", {}) or {}
        scale = getattr(layer_or_kwargs, "scale", None)
        units = getattr(layer_or_kwargs, "units", None)
    if metadata.get("sampling_A"):
        return float(metadata["sampling_A"])
    if scale is None or units is None or len(units) == 0:
        return None
    unit = str(units[-1]).strip()
    factor = _LENGTH_TO_A.get(unit)
    if factor is None:
        return None
    return float(scale[-1]) * factor


@dataclass
class SegmentationResult:
    """Output of :func:`segment_job`.

    Attributes
    ----------
    proba
        Particle probability, same shape as the input, float32 in [0, 1].
    labels
        ``proba >= threshold`` as uint8 (1 = particle).
    ood_score
        Per-frame OOD score (0 ~ training-like, grows with distance), or None when the
        model has no stored OOD reference or the score could not be computed.
    notes
        What was done (resampling, why there is no OOD score, ...).
    model_sampling_A
        Pixel size the model was trained at [Å] (None if unknown).
    """

    proba: np.ndarray
    labels: np.ndarray
    ood_score: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    model_sampling_A: float | None = None


def _zoom_stack(
    frames: np.ndarray, factor: float, shape: tuple[int, int] | None = None
) -> np.ndarray:
    from scipy import ndimage

    out = [ndimage.zoom(f, factor, order=1, mode="nearest", grid_mode=True) for f in frames]
    stack = np.stack(out).astype(np.float32)
    if shape is not None:  # crop or edge-pad to the exact shape
        ny, nx = shape
        stack = stack[:, :ny, :nx]
        pad = ((0, 0), (0, ny - stack.shape[1]), (0, nx - stack.shape[2]))
        if any(p[1] for p in pad):
            stack = np.pad(stack, pad, mode="edge")
    return stack


def segment_job(
    report: Report,
    images: Any,
    model_dir: str | os.PathLike,
    *,
    sampling_A: float | None = None,
    threshold: float = 0.5,
    which: str = "best",
    device: str = "auto",
    ood: bool = True,
    resample: bool = True,
) -> SegmentationResult:
    """Segment frames with a checkpoint and, if the model has one, score them OOD.

    Parameters
    ----------
    report
        Receives :class:`JobProgress` per frame.
    images
        (H, W), (N, H, W) or any (..., H, W) array of raw counts.
    model_dir
        Checkpoint folder (``load_checkpoint(model_dir).predict_proba``).
    sampling_A
        Pixel size of ``images`` [Å]. When it differs from the model's by more than 1 %
        and ``resample`` is True, frames are resampled to the model's pixel size and the
        probabilities back to the input grid.
    threshold
        Probability above which a pixel is labelled particle.
    which, device
        Passed to ``load_checkpoint``.
    ood
        Compute the per-frame OOD score
        (:func:`napari_hrtem_transfer.evaluation.ood_scores`) when the model folder holds an
        OOD reference.
    resample
        See ``sampling_A``.
    """
    from ..training import load_checkpoint

    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be between 0 and 1 (got {threshold})", "threshold")
    arr = np.asarray(images.compute() if hasattr(images, "compute") else images)
    if arr.ndim < 2:
        raise ConfigError(f"need an image (H, W) or a stack (..., H, W); got shape {arr.shape}")
    lead, (ny, nx) = arr.shape[:-2], arr.shape[-2:]
    frames = arr.reshape(-1, ny, nx).astype(np.float32)
    notes: list[str] = []
    _emit(report, JobProgress(0, len(frames), f"loading model {model_dir}"))
    model = load_checkpoint(model_dir, which=which, device=device)
    model_s = model.sampling_A
    factor = 1.0
    if sampling_A is None:
        notes.append(
            "the image has no pixel size; assumed the model's "
            f"({model_s:g} Å/px)" if model_s else "neither image nor model has a pixel size"
        )
    elif model_s and abs(sampling_A / model_s - 1.0) > 0.01:
        if resample:
            factor = float(sampling_A) / float(model_s)
            notes.append(
                f"resampled frames from {sampling_A:.4g} to the model's {model_s:.4g} Å/px "
                f"(zoom {factor:.3g}) and the probabilities back"
            )
        else:
            notes.append(
                f"image pixel size {sampling_A:.4g} Å differs from the model's {model_s:.4g} Å; "
                "results may be poor"
            )
    work = _zoom_stack(frames, factor) if factor != 1.0 else frames
    proba_work = np.empty(work.shape, dtype=np.float32)
    for i, frame in enumerate(work):
        proba_work[i] = model.predict_proba(frame[None])[0]
        _emit(report, JobProgress(i + 1, len(work), f"segmented frame {i + 1}/{len(work)}"))
    proba = _zoom_stack(proba_work, 1.0 / factor, (ny, nx)) if factor != 1.0 else proba_work
    proba = np.clip(proba, 0.0, 1.0)
    scores = None
    if ood:
        scores = _ood_scores(model, work, notes)
    return SegmentationResult(
        proba=proba.reshape(*lead, ny, nx),
        labels=(proba >= threshold).astype(np.uint8).reshape(*lead, ny, nx),
        ood_score=scores,
        notes=notes,
        model_sampling_A=model_s,
    )


def _ood_scores(model: Any, frames: np.ndarray, notes: list[str]) -> np.ndarray | None:
    """Per-frame OOD score, on the central crop whose sides are multiples of the stride."""
    try:
        from ..evaluation import load_ood_reference, ood_scores
    except ImportError as exc:  # the evaluation core is optional for segmentation
        notes.append(f"no OOD score: the evaluation module is not available ({exc})")
        return None
    reference = load_ood_reference(model.path)
    if reference is None:
        notes.append(
            "no OOD score: the model folder has no OOD reference (it is fitted at the end of "
            "training; see napari_hrtem_transfer.evaluation.fit_ood_reference)"
        )
        return None
    s = max(1, int(model.output_stride))
    ny, nx = frames.shape[1:]
    cy, cx = (ny // s) * s, (nx // s) * s
    if cy == 0 or cx == 0:
        notes.append(f"no OOD score: frames smaller than the model stride ({s} px)")
        return None
    y0, x0 = (ny - cy) // 2, (nx - cx) // 2
    crop = frames[:, y0 : y0 + cy, x0 : x0 + cx]
    try:
        return np.asarray(ood_scores(model, crop, reference=reference).score, dtype=float)
    except Exception as exc:  # noqa: BLE001 - a missing score must not lose the segmentation
        notes.append(f"no OOD score: {exc}")
        return None
