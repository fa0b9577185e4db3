"""The transfer experiment, once: pretrain -> fine-tune -> evaluate.

Every front end that runs the study's experiment calls :func:`run_transfer`: the demo
(:func:`~napari_hrtem_transfer.evaluation.protocol.run_protocol`), each run of a sweep
(:func:`napari_hrtem_transfer.sweep.tasks.run_task`) and fine-tuning on annotated frames
(:func:`napari_hrtem_transfer.annotations.finetune_on_annotations`, CLI, napari, HyperSpy).

A training stage (:func:`train_stage`) is the training loop followed by the fit of the
model's label-free OOD reference, with one failure behaviour everywhere:

- a stop request during training leaves the resumable ``last`` checkpoint and skips the
  rest (no OOD fit, no later stage): the result says ``stopped``;
- the OOD fit never raises: a failure (or a stop during the fit) leaves the trained
  checkpoint complete and usable, and the stage's :class:`OODFitResult` says what happened
  and how to retry. A caller that needs the reference (a sweep row) calls
  :meth:`TransferResult.require_ood`, which raises :class:`OODFitFailed` with that message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..training.progress import Progress, StopRequest

__all__ = [
    "OODFitFailed",
    "StageResult",
    "TransferEvaluation",
    "TransferResult",
    "run_transfer",
    "train_stage",
]

Log = Callable[[str], None]


class OODFitFailed(RuntimeError):
    """A stage's OOD-reference fit failed where the caller needs the reference."""


@dataclass
class StageResult:
    """One training stage: the training loop and the OOD-reference fit after it.

    Attributes
    ----------
    out_dir
        The checkpoint folder.
    train
        The loop's :class:`~napari_hrtem_transfer.training.TrainResult`.
    ood
        The :class:`~napari_hrtem_transfer.evaluation.ood.OODFitResult`; None when the
        training stopped or the fit was not asked for.
    time_train_s, time_ood_s
        Wall time of training and of the OOD fit [s].
    cpu_s
        Process CPU time of the whole stage [s].
    """

    out_dir: Path
    train: Any
    ood: Any = None
    time_train_s: float = 0.0
    time_ood_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def stopped(self) -> bool:
        """Stopped on request: in training (a resumable ``last`` checkpoint is written) or
        in the OOD fit (nothing of it written)."""
        return bool(self.train.stopped) or (self.ood is not None and self.ood.error == "stopped")


def _ood_device(config: Any) -> str | None:
    return None if config.device == "auto" else config.device


def train_stage(
    config: Any,
    data: Any,
    out_dir: str | os.PathLike,
    *,
    callbacks: Iterable[Any] | None = None,
    stop: StopRequest = None,
    resume: bool = False,
    fit_ood: bool = True,
    ood_progress: Progress | None = None,
) -> StageResult:
    """Train ``config`` on ``data`` into ``out_dir``, then fit the model's OOD reference.

    Parameters
    ----------
    config
        A :class:`~napari_hrtem_transfer.training.TrainConfig` (pretraining or fine-tuning).
    data
        The training :class:`~napari_hrtem_transfer.io.HRTEMDataset` (or its path).
    out_dir
        Checkpoint folder.
    callbacks, stop, resume
        As for :func:`~napari_hrtem_transfer.training.train`.
    fit_ood
        Fit the label-free OOD reference after a complete training (on the device of
        ``config``; ``"auto"``: where the checkpoint loads).
    ood_progress
        ``progress(done, total, message)`` of the OOD fit.
    """
    from ..training.loop import train
    from .ood import fit_ood_after_training

    cpu = time.process_time()
    t = time.perf_counter()
    result = train(config, data, out_dir, callbacks=callbacks, stop=stop, resume=resume)
    stage = StageResult(Path(result.out_dir), result, time_train_s=time.perf_counter() - t)
    if fit_ood and not result.stopped:
        t = time.perf_counter()
        stage.ood = fit_ood_after_training(
            stage.out_dir, data, progress=ood_progress, device=_ood_device(config), stop=stop
        )
        stage.time_ood_s = time.perf_counter() - t
    stage.cpu_s = time.process_time() - cpu
    return stage


@dataclass(frozen=True)
class TransferEvaluation:
    """How :func:`run_transfer` evaluates the pretrained and the fine-tuned model.

    Attributes
    ----------
    model_ids
        ``model_id`` of the two models in the records (before, after).
    stages
        The ``stage`` provenance of the two models (used with ``provenance``).
    provenance
        Provenance columns of both models (``pretrain_defocus_nm``, ``freeze``, ...);
        None: read from the checkpoints.
    same_structures
        Evaluate both models on the held-out structures of the fine-tuned checkpoint (a
        like-for-like comparison, as a sweep records it); False: each model on its own
        (``structures="validation"``) unless ``options`` names them.
    options
        Other keyword arguments of
        :func:`~napari_hrtem_transfer.evaluation.labelled.evaluate_model` (``n_boot``,
        ``structures``, ``batch_size``, ``device``, ``n_samples``).
    """

    model_ids: tuple[str, str] = ("pretrained", "finetuned")
    stages: tuple[str, str] = ("pretrain", "transfer")
    provenance: Mapping[str, Any] | None = None
    same_structures: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TransferResult:
    """What :func:`run_transfer` did.

    Attributes
    ----------
    pretrained_dir, finetuned_dir
        The two checkpoint folders.
    pretrain
        The pretraining stage (None when an existing model was fine-tuned).
    finetune
        The fine-tuning stage (None when the pretraining stopped).
    before, after
        :class:`~napari_hrtem_transfer.evaluation.EvaluationResult` of both models (None
        without ``evaluation`` or after a stop).
    time_evaluate_s
        Wall time of the evaluation [s].
    """

    pretrained_dir: Path
    finetuned_dir: Path
    pretrain: StageResult | None = None
    finetune: StageResult | None = None
    before: Any = None
    after: Any = None
    time_evaluate_s: float = 0.0

    @property
    def stopped(self) -> bool:
        """A stage stopped on request; the later stages did not run."""
        stages = (self.pretrain, self.finetune)
        return self.finetune is None or any(s is not None and s.stopped for s in stages)

    def require_ood(self) -> None:
        """Raise :class:`OODFitFailed` unless every stage's OOD reference was fitted."""
        for stage in (self.pretrain, self.finetune):
            if stage is not None and stage.ood is not None and not stage.ood.ok:
                raise OODFitFailed(stage.ood.message)


def _evaluate(result: TransferResult, data: Any, evaluation: TransferEvaluation) -> None:
    from .labelled import evaluate_model

    t = time.perf_counter()
    options = dict(evaluation.options)
    if evaluation.same_structures:
        from ..training.checkpoint import read_sidecar

        side = read_sidecar(result.finetuned_dir)
        val = [str(s) for s in (side.get("data") or {}).get("val_structures") or []]
        options["structures"] = val or "validation"
    out = []
    for model_dir, mid, stage in zip(
        (result.pretrained_dir, result.finetuned_dir),
        evaluation.model_ids,
        evaluation.stages,
        strict=True,
    ):
        prov = None if evaluation.provenance is None else {**evaluation.provenance, "stage": stage}
        out.append(evaluate_model(model_dir, data, model_id=mid, provenance=prov, **options))
    result.before, result.after = out
    result.time_evaluate_s = time.perf_counter() - t


def run_transfer(
    finetune: Any,
    data: Any,
    finetuned_dir: str | os.PathLike,
    *,
    pretrain: Any = None,
    pretrain_data: Any = None,
    evaluation: TransferEvaluation | None = None,
    callbacks: Iterable[Any] | None = None,
    stop: StopRequest = None,
    resume: bool = False,
    fit_ood: bool = True,
    ood_progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
    log: Log | None = None,
) -> TransferResult:
    """Pretrain (optional) -> fine-tune -> evaluate both models (optional).

    Parameters
    ----------
    finetune
        The fine-tuning :class:`~napari_hrtem_transfer.training.TrainConfig`; its
        ``init_from`` is the pretrained checkpoint (written there by the pretraining stage
        when ``pretrain`` is given).
    data
        The target-domain dataset: fine-tuning and evaluation.
    finetuned_dir
        Checkpoint folder of the fine-tuned model.
    pretrain
        The pretraining ``TrainConfig``; None fine-tunes the existing ``finetune.init_from``.
    pretrain_data
        The pretraining dataset (default: ``data``).
    evaluation
        Evaluate both models on ``data`` (None: no evaluation).
    callbacks, stop
        Training callbacks (every training stage; ``TrainStart.stage`` names it) and the
        stop request of every stage (training and OOD fit).
    resume
        Continue a stopped fine-tuning in ``finetuned_dir`` (not with ``pretrain``).
    fit_ood, ood_progress
        Fit each trained model's OOD reference (see :func:`train_stage`).
    on_stage
        Called with ``"pretrain"``, ``"finetune"`` and ``"evaluate"`` as each stage starts.
    log
        Receives the OOD fit's message after each training stage.

    Returns
    -------
    TransferResult
    """
    if finetune.init_from is None:
        raise ConfigError(
            "the fine-tuning config needs init_from (the pretrained model).", "init_from"
        )
    if resume and pretrain is not None:
        raise ConfigError(
            "resume continues a fine-tuning; give no pretrain config with it.", "resume"
        )
    pre_dir = Path(finetune.init_from)
    result = TransferResult(pre_dir, Path(finetuned_dir))
    kw: dict[str, Any] = dict(
        callbacks=callbacks, stop=stop, fit_ood=fit_ood, ood_progress=ood_progress
    )
    stages: list[tuple[str, Any, Any, bool]] = []
    if pretrain is not None:
        stages.append(
            ("pretrain", pretrain, pretrain_data if pretrain_data is not None else data, False)
        )
    stages.append(("finetune", finetune, data, resume))
    for name, config, stage_data, res in stages:
        if on_stage is not None:
            on_stage(name)
        out = pre_dir if name == "pretrain" else result.finetuned_dir
        stage = train_stage(config, stage_data, out, resume=res, **kw)
        setattr(result, name, stage)
        if log is not None and stage.ood is not None:
            log(stage.ood.message)
        if stage.stopped:
            return result
    if evaluation is not None:
        if on_stage is not None:
            on_stage("evaluate")
        _evaluate(result, data, evaluation)
    return result
