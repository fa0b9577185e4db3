"""What the widgets do, as plain functions (no napari, no Qt): testable without a viewer.

Each job takes ``report`` (a callable receiving progress updates) as first argument, so it
can run in :func:`~napari_hrtem_transfer._napari._workers.run_with_updates`; called
directly, pass ``report=None``.

Units: defocus [nm] (abTEM sign: ``defocus = -C10``, positive = underfocus), dose [e/Å²],
pixel size [Å] inside, [nm] as napari layer scale.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, config_error_from_validation
from ._reader import LayerData, dataset_to_layer_data
from ._workers import NOTE_STAGE, WARNING_STAGE, JobProgress, JobStage, JobStopped

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
        raise config_error_from_validation(exc) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config


def simulate_job(
    report: Report,
    config: Any,
    save_path: str | os.PathLike | None = None,
    stop: threading.Event | None = None,
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
    stop
        When set, the simulation ends after the current structure with :class:`JobStopped`
        (a series is only useful whole, so nothing is kept).
    """
    from ..simulate import simulate_dataset

    total = int(config.n_structures)
    _emit(report, JobProgress(0, total, f"simulating {total} structure(s) (abTEM)"))

    def progress(done: int, n: int) -> None:
        _emit(report, JobProgress(int(done), int(n), f"simulated {done}/{n} structures"))
        if stop is not None and stop.is_set() and done < n:
            raise JobStopped(
                f"stopped after {done} of {n} structures; nothing was added or written "
                "(a simulated series is kept only when complete)"
            )

    if stop is not None and stop.is_set():
        raise JobStopped("stopped before the first structure; nothing was added")
    with forward_warnings(report):
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
        raise config_error_from_validation(exc) from None


def device_description(spec: str = "auto") -> str:
    """The torch device ``spec`` resolves to, with the torch (and CUDA) version, in words.

    Imports torch: call it in a job's thread, not while building a widget.
    """
    import torch

    from ..training.device import resolve_device

    dev = resolve_device(spec)
    text = str(dev)
    if dev.type == "cuda":
        text += f" ({torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda})"
    return f"{text} · torch {torch.__version__}"


def _ood_stage(report: Report) -> Callable[..., None]:
    def progress(done: int, total: int, message: str = "") -> None:
        _emit(report, JobStage("ood", "running",
                               message or f"OOD reference: batch {done} of {total}"))

    return progress


def _report_ood_result(report: Report, res: Any) -> None:
    ok = bool(getattr(res, "ok", False))
    state = "done" if ok else ("skipped" if getattr(res, "error", None) == "stopped" else "failed")
    _emit(report, JobStage("ood", state, str(getattr(res, "message", res))))


def train_job(
    report: Report,
    config: Any,
    data: Any,
    out_dir: str | os.PathLike,
    stop: threading.Event | None = None,
    resume: bool = False,
) -> Any:
    """Run :func:`napari_hrtem_transfer.training.train`, reporting its progress records.

    ``report`` receives a device :class:`JobStage`, ``TrainStart``, one ``StepUpdate`` per
    step, one ``EpochUpdate`` per epoch and the final ``TrainResult``; setting ``stop`` ends
    the run after the current step with a resumable checkpoint. A finished run also gets its
    label-free OOD reference, reported as the ``"ood"`` :class:`JobStage`. Returns the
    ``TrainResult``.
    """
    from ..evaluation.workflows import train_stage

    _emit(report, JobStage("device", "running", device_description(config.device)))
    with forward_warnings(report):
        stage = train_stage(config, data, out_dir, stop=stop, resume=resume,
                            callbacks=[_OODStageCallback(report, "the training images")],
                            ood_progress=_ood_stage(report))
    _report_stage_end(report, stage.train, stage.ood)
    return stage.train


def _report_stage_end(report: Report, train_result: Any, ood: Any) -> None:
    """The OOD stage after a training: skipped (stopped), or the fit's result."""
    if train_result.stopped:
        _emit(report, JobStage("ood", "skipped",
                               "no OOD reference: the run was stopped (resume it to finish)"))
    elif ood is not None:
        _report_ood_result(report, ood)


class _OODStageCallback(QueueCallback):
    """Forwards training records and announces the OOD fit that follows a finished run."""

    def __init__(self, report: Report, what: str = "the annotated frames") -> None:
        super().__init__(report)
        self._what = what

    def on_train_end(self, result: Any) -> None:
        """Forward the result; the core fits the OOD reference right after."""
        _emit(self._report, result)
        if not result.stopped:
            _emit(self._report, JobStage("ood", "running",
                                         f"fitting the OOD reference on {self._what}"))


def check_annotation_layers(images: Any, labels: Any) -> np.ndarray:
    """Check an (image, labels) layer pair for fine-tuning; the annotated frame indices.

    Raises
    ------
    ConfigError
        Naming the problem and the fix: shapes differ (labels on frames outside the stack),
        or no painted pixel.
    """
    ishape, lshape = tuple(np.shape(images)), tuple(np.shape(labels))
    if ishape != lshape:
        if len(lshape) == len(ishape) and lshape[-2:] == ishape[-2:]:
            what = (f"the Labels layer has {lshape[:-2]} frames but the image {ishape[:-2]}: "
                    "labels lie on frames outside the stack")
        else:
            what = f"the Labels layer's shape {lshape} differs from the image's {ishape}"
        raise ConfigError(
            f"{what}. Fix: create the Labels layer from the image (Layers > New Labels layer "
            "with the image selected) and paint particles on it.", "labels")
    lab = np.asarray(labels)
    flat = lab.reshape(-1, *lab.shape[-2:]) if lab.ndim >= 2 else lab[None, None]
    painted = np.flatnonzero(flat.reshape(len(flat), -1).any(axis=1))
    if painted.size == 0:
        raise ConfigError(
            "the Labels layer has no painted pixel. Fix: paint the particles (any label value "
            "> 0) on a few frames, then train again.", "labels")
    return painted


def finetune_layers_job(
    report: Report,
    images: Any,
    labels: Any,
    *,
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    sampling_A: float | None,
    freeze: str,
    epochs: int,
    lr: float | None,
    device: str = "auto",
    batch_size: int | None = None,
    patch_size: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    stop: threading.Event | None = None,
) -> Any:
    """Fine-tune ``model`` on the frames of an image layer annotated in a Labels layer.

    A thin call of
    :func:`napari_hrtem_transfer.annotations.finetune_on_annotations` (frames
    without painted pixels are dropped, the split is by frame, the OOD reference is fitted at
    the end and reported as the ``"ood"`` :class:`JobStage`). ``batch_size``, ``patch_size``
    [px] and ``seed`` are passed on when given (None: the core's choice); ``resume``
    continues a stopped run in ``out_dir`` (see :func:`annotations_can_resume`). Returns the
    ``TrainResult``.
    """
    from ..annotations import finetune_on_annotations

    _emit(report, JobStage("device", "running", device_description(device)))
    images = images.compute() if hasattr(images, "compute") else images
    labels = labels.compute() if hasattr(labels, "compute") else labels
    options: dict[str, Any] = {}
    if batch_size:
        options["batch_size"] = int(batch_size)
    if patch_size:
        options["patch_size"] = int(patch_size)
    if seed is not None:
        options["seed"] = int(seed)
    if resume:
        if not annotations_can_resume():
            raise ConfigError("resuming a fine-tuning on annotated frames is not supported by "
                              "this version; untick 'resume' to start a new run.", "resume")
        options["resume"] = True
    with forward_warnings(report):
        result = finetune_on_annotations(
            np.asarray(images), np.asarray(labels), model=model, out_dir=out_dir,
            sampling_A=sampling_A, freeze=freeze, epochs=int(epochs), lr=lr, device=device,
            callbacks=[_OODStageCallback(report)], stop=stop, ood_progress=_ood_stage(report),
            **options)
    for note in result.notes:
        _emit(report, JobStage(NOTE_STAGE, "done", note))
    _report_stage_end(report, result.train, result.ood)
    return result.train


def annotations_can_resume() -> bool:
    """Whether the core's ``finetune_on_annotations`` takes ``resume`` (continue a stopped
    fine-tuning in its folder)."""
    import inspect

    from ..annotations import finetune_on_annotations

    return "resume" in inspect.signature(finetune_on_annotations).parameters


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


_UNIT_ABBREV = {"nanometer": "nm", "angstrom": "Å", "picometer": "pm", "micrometer": "µm",
                "second": "s", "millisecond": "ms", "pixel": None, "": None}


def axes_from_layer(layer: Any) -> list[dict[str, Any]]:
    """Rosettasciio-style axes dicts (navigation..., y, x) of a napari image layer.

    Names come from ``axis_labels`` (napari's default numeric labels become ``frame``),
    units from ``units`` (``pixel`` -> None), scale and offset from ``scale`` and
    ``translate``. A defocus axis whose values the layer's metadata lists (``defocus_nm``,
    set by this plugin's reader) gets them as non-uniform ``axis`` values [nm]; another
    navigation axis listed in ``axis_values`` (a non-uniform axis of the file) gets its values
    and the unit of ``axis_units``.
    """
    shape = tuple(np.shape(layer.data))
    meta = getattr(layer, "metadata", {}) or {}
    labels = list(getattr(layer, "axis_labels", ())) or [str(i) for i in range(len(shape))]
    units = [str(u) for u in getattr(layer, "units", ())] or ["pixel"] * len(shape)
    axes = []
    for i, n in enumerate(shape):
        name = labels[i] if i < len(labels) else str(i)
        nav = i < len(shape) - 2
        if nav and (name.lstrip("-").isdigit() or not name):
            name = "frame" if len(shape) == 3 else f"axis{i}"
        unit = _UNIT_ABBREV.get(units[i], units[i]) if i < len(units) else None
        ax: dict[str, Any] = {"name": name, "size": int(n), "units": unit,
                              "scale": float(layer.scale[i]), "offset": float(layer.translate[i]),
                              "navigate": nav}
        values = meta.get("defocus_nm")
        if nav and name == "defocus" and np.ndim(values) == 1 and len(values) == n:
            ax.update(axis=[float(v) for v in values], units="nm")
        listed, unit_of = meta.get("axis_values"), meta.get("axis_units")
        other = listed.get(name) if isinstance(listed, dict) else None
        if nav and name != "defocus" and np.ndim(other) == 1 and len(other) == n:
            unit = unit_of.get(name) if isinstance(unit_of, dict) else None
            ax.update(axis=[float(v) for v in other], units=_UNIT_ABBREV.get(unit, unit))
        axes.append(ax)
    return axes


def segment_job(
    report: Report,
    images: Any,
    model: Any,
    *,
    sampling_A: float | None = None,
    axes: list[dict[str, Any]] | None = None,
    threshold: float | None = None,
    which: str = "best",
    device: str = "auto",
    ood: bool = True,
    stop: threading.Event | None = None,
) -> Any:
    """Segment frames and score them OOD: a thin call of the core's
    :func:`napari_hrtem_transfer.segmentation.segment`.

    Parameters
    ----------
    report
        Receives a device :class:`JobStage` and :class:`JobProgress` per frame.
    images
        (H, W) or any (..., H, W) array of raw counts (numpy or dask: read frame by frame).
    model
        ``"pretrained"``, a checkpoint folder or a ``LoadedModel``.
    sampling_A
        Pixel size of ``images`` [Å] (None: assume the model's).
    axes
        Rosettasciio-style axes dicts of ``images`` (see :func:`axes_from_layer`).
    threshold, which, device, ood
        :class:`~napari_hrtem_transfer.segmentation.SegmentConfig` options (None: default).
    stop
        Checked between frames; a stopped run raises :class:`JobStopped`.

    Returns
    -------
    napari_hrtem_transfer.segmentation.SegmentationResult
    """
    from ..segmentation import SegmentationStopped, segment

    if report is not None:
        _emit(report, JobStage("device", "running", device_description(device)))

    def progress(done: int, total: int, message: str = "") -> None:
        _emit(report, JobProgress(int(done), int(total), message or f"segmented {done}/{total}"))

    options: dict[str, Any] = dict(which=which, device=device, ood=ood, probabilities=True)
    if threshold is not None:
        options["threshold"] = float(threshold)
    with forward_warnings(report):
        try:
            return segment(images, model, sampling_A=sampling_A, axes=axes,
                           progress=progress, stop=stop, **options)
        except SegmentationStopped as exc:
            raise JobStopped(f"segmentation stopped: {exc}; no layer was added") from exc


#: Warning categories meant for developers, not forwarded to the user.
_DEV_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ResourceWarning, ImportWarning)
#: Categories recorded every time while a job runs (the core's warnings are UserWarnings).
_USER_WARNINGS = (UserWarning, RuntimeWarning, FutureWarning)

_capture_lock = threading.Lock()
#: thread id -> the warnings recorded for the job running on that thread
_capture: dict[int, list[warnings.WarningMessage]] = {}
_saved: dict[str, Any] = {}


def _route_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` while jobs run: a job thread's warnings are recorded for it,
    every other thread's go where they went before (napari's notifications)."""
    caught = _capture.get(threading.get_ident())
    if caught is not None:
        caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
        return
    show = _saved.get("showwarning")
    if show is not None:
        show(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def forward_warnings(report: Report) -> Iterator[list[str]]:
    """Record every warning raised inside, on this thread (all of them, every time: Python's
    once-per-place filter is off for user warnings) and report each as a
    ``JobStage("warning", "done", message)``.

    Thread-safe, unlike :class:`warnings.catch_warnings` (whose module-wide state two jobs
    ending out of order would leave behind): one routing ``showwarning`` is installed while
    any job runs, and other threads' warnings pass through it unchanged. The warnings are
    reported when the block ends, also when it raises; developer warnings (deprecations,
    resources) are left out and a repeated message is reported once. Without a ``report``
    they are issued again as warnings. Yields the list of the messages reported (filled when
    the block ends).
    """
    ident = threading.get_ident()
    messages: list[str] = []
    if ident in _capture:  # nested: the outer block reports
        yield messages
        return
    caught: list[warnings.WarningMessage] = []
    with _capture_lock:
        if not _capture:
            _saved.update(showwarning=warnings.showwarning, filters=list(warnings.filters))
            warnings.showwarning = _route_warning
            for category in _USER_WARNINGS:
                warnings.filterwarnings("always", category=category)
        _capture[ident] = caught
    try:
        yield messages
    finally:
        with _capture_lock:
            del _capture[ident]
            if not _capture:
                warnings.filters[:] = _saved.pop("filters")
                warnings.filterwarnings("default", category=Warning, append=True)
                warnings.filters.pop()  # (tells the warnings module its filters changed)
                warnings.showwarning = _saved.pop("showwarning")
        for w in caught:
            text = str(w.message)
            if issubclass(w.category, _DEV_WARNINGS) or text in messages:
                continue
            messages.append(text)
            if report is not None:
                _emit(report, JobStage(WARNING_STAGE, "done", text))
            else:
                warnings.warn(text, w.category, stacklevel=3)


def result_frame_table(result: Any) -> list[dict[str, Any]]:
    """The per-frame table of a segmentation result (one dict per frame)."""
    return list(result.frame_table())
