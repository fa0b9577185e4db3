"""The training loop shared by pretraining and fine-tuning.

:func:`train` runs four steps on a :class:`_Run` (the state of one run):

1. setup (:func:`_setup`): check the output folder, build or load the model, prepare the
   data, choose device and precision, create the optimizer;
2. restore (:func:`_restore`): when resuming, load the weights, optimizer state, counters and
   history of the ``last`` checkpoint;
3. epochs (:func:`_run_epoch`): optimisation steps, stopping (with a resumable ``last``
   checkpoint) when asked;
4. checkpoints (:func:`_end_epoch`): validation of every evaluated domain, ``best`` and
   ``last`` checkpoints, the epoch callback.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import CheckpointError, ConfigError, DatasetError
from ..io.dataset import HRTEMDataset
from ..models.config import parse_model_config
from ..models.factory import build_model
from .callbacks import EpochUpdate, StepUpdate, TrainResult, TrainStart, dispatch
from .checkpoint import (
    load_model_weights,
    load_optimizer_state,
    load_state_into,
    read_checkpoint_tensors,
    read_sidecar,
    save_checkpoint,
)
from .config import TrainConfig
from .data import TrainingData, domain_key, open_dataset
from .device import autocast, resolve_device, resolve_precision, torch_settings
from .progress import StopRequest, stop_checker

#: Config fields that may change when resuming (they do not change the result on a CPU).
RESUMABLE_CHANGES = ("epochs", "num_threads", "cache_bytes", "device")

def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, kind: str = "bce", dice_weight: float = 1.0
) -> torch.Tensor:
    """Loss on logits (N, 1, H, W) against a {0, 1} target of the same shape.

    ``"bce"``: mean binary cross-entropy; ``"bce_dice"``: plus ``dice_weight`` times the soft
    Dice loss (1 - Dice, averaged over images).
    """
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce_dice":
        p = torch.sigmoid(logits)
        inter = (p * target).sum(dim=(1, 2, 3))
        denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
        dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
        loss = loss + dice_weight * dice.mean()
    return loss


def _to_device(x: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    t = torch.from_numpy(x).to(device, non_blocking=True)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def evaluate_domains(
    model: torch.nn.Module,
    data: TrainingData,
    device: torch.device,
    precision: str,
    batch_size: int,
    channels_last: bool = True,
) -> dict[str, float]:
    """Validation loss (mean binary cross-entropy per pixel) of every evaluated domain.

    Returns
    -------
    dict
        Loss keyed by defocus [nm] formatted with ``%g``.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.inference_mode(), autocast(device, precision):
            for d in data.eval_domains:
                total, count = 0.0, 0
                for x, y in data.val_batches(d, batch_size):
                    logits = model(_to_device(x, device, channels_last)).float()
                    yt = torch.from_numpy(y).to(device)
                    total += float(F.binary_cross_entropy_with_logits(logits, yt, reduction="sum"))
                    count += y.size
                out[domain_key(data.dataset.defocus_nm[d])] = total / max(count, 1)
    finally:
        model.train(was_training)
    return out


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} exists and is not a folder.", "out")
    has_ckpt = out_dir.is_dir() and any((out_dir / f"{w}.json").exists() for w in ("best", "last"))
    if resume:
        if not (out_dir / "last.json").exists():
            raise CheckpointError(f"nothing to resume: {out_dir / 'last.json'} does not exist.")
        return
    if has_ckpt:
        raise ConfigError(
            f"{out_dir} already holds a checkpoint; resume it (resume=True, CLI --resume) or "
            "choose another output folder.",
            "out",
        )
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create {out_dir}: {parent} is not writable.", "out")


def _parent_summary(side: dict[str, Any], init_from: Path) -> dict[str, Any]:
    hist = side.get("history") or []
    best = side.get("best_epoch")
    rec = next((h for h in hist if h.get("epoch") == best), None)
    return {
        "path": str(Path(init_from).resolve()),
        "which": side.get("which"),
        "weights_sha256": side.get("weights_sha256"),
        "stage": side.get("stage"),
        "train_defocus_nm": (side.get("data") or {}).get("train_defocus_nm"),
        "data_fingerprint": (side.get("data") or {}).get("fingerprint"),
        "best_epoch": best,
        "best_val_loss": side.get("best_val_loss"),
        "val_loss_at_best": rec.get("val_loss") if rec else None,
        "parent": side.get("parent"),
    }


# ---------------------------------------------------------------------- the run's state
@dataclass
class _Run:
    """Everything one training run carries from step to step."""

    cfg: TrainConfig
    out: Path
    callbacks: list[Any]
    ds: HRTEMDataset
    data: TrainingData
    data_record: dict[str, Any]
    model: torch.nn.Module
    model_cfg: Any
    normalization: dict[str, Any]
    parent: dict[str, Any] | None
    device: torch.device
    precision: str
    channels_last: bool
    optimizer: torch.optim.Optimizer
    scaler: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    start_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_epoch: int | None = None
    best_val: float | None = None

    @property
    def own_keys(self) -> list[str]:
        """History keys of the training domains (their mean selects the best epoch)."""
        return [domain_key(self.ds.defocus_nm[d]) for d in self.data.train_domains]


# ---------------------------------------------------------------------- 1. setup
def _resume_sidecar(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """The ``last`` sidecar of ``out``, checked to be resumable with ``cfg``.

    Raises
    ------
    CheckpointError
        No resume state, or a saved config that does not validate.
    ConfigError
        ``cfg`` differs from the saved config in a field outside :data:`RESUMABLE_CHANGES`.
    """
    from pydantic import ValidationError

    side = read_sidecar(out, "last")
    if side.get("training") is None or side.get("resume") is None:
        raise CheckpointError(
            f"{side['_path']} has no training config or resume state; it cannot be resumed."
        )
    try:
        saved = TrainConfig.model_validate(side["training"]["config"])
    except ValidationError as exc:
        fields = ", ".join(
            "training.config." + ".".join(str(p) for p in e["loc"]) for e in exc.errors()
        )
        raise CheckpointError(
            f"checkpoint sidecar {side['_path']} is invalid: field(s) {fields}: "
            f"{exc.errors()[0]['msg']}."
        ) from None
    diff = [
        k
        for k in TrainConfig.model_fields
        if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(cfg, k)
    ]
    if diff:
        raise ConfigError(
            f"cannot resume {out}: the config differs from the saved one in "
            f"{', '.join(diff)} (only {', '.join(RESUMABLE_CHANGES)} may change).",
            diff[0],
        )
    return side


def _init_model(
    cfg: TrainConfig, out: Path, ds: HRTEMDataset, resume_side: dict[str, Any] | None
) -> tuple[torch.nn.Module, Any, dict[str, Any], dict[str, Any] | None]:
    """Build the model: the run's own architecture (resume), a checkpoint's weights
    (fine-tuning) or a seeded random initialisation (pretraining).

    Returns
    -------
    model, model_cfg, normalization, parent
    """
    if resume_side is not None:  # the run's own architecture; weights are loaded by _restore
        model_cfg = parse_model_config(resume_side["model"])
        return (
            build_model(model_cfg),
            model_cfg,
            resume_side["normalization"],
            resume_side.get("parent"),
        )
    if cfg.init_from is not None:
        if Path(cfg.init_from).expanduser().resolve() == out.resolve():
            raise ConfigError("the output folder must differ from init_from.", "out")
        model, pside = load_model_weights(cfg.init_from, cfg.init_which)
        model_cfg = parse_model_config(pside["model"])
        if cfg.model is not None and cfg.model != model_cfg:
            raise ConfigError(
                f"model {cfg.model.model_dump()} differs from the architecture of "
                f"{cfg.init_from} ({model_cfg.model_dump()}); leave model unset to fine-tune.",
                "model",
            )
        psamp = pside.get("sampling_A")
        if psamp is not None and abs(float(psamp) - ds.sampling_A) > 0.01 * float(psamp):
            warnings.warn(
                f"the pretrained model was trained at {psamp:g} Å/px but the fine-tuning "
                f"data has {ds.sampling_A:g} Å/px.",
                stacklevel=4,
            )
        return model, model_cfg, pside["normalization"], _parent_summary(pside, cfg.init_from)
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.resolved_model()
    normalization = cfg.preprocessing.record(ds.sampling_A)
    return build_model(model_cfg), model_cfg, normalization, None


def _setup(
    cfg: TrainConfig,
    out: Path,
    callbacks: list[Any],
    ds: HRTEMDataset,
    resume_side: dict[str, Any] | None,
) -> _Run:
    """Model, data, device, precision and optimizer of a run (nothing is written)."""
    model, model_cfg, normalization, parent = _init_model(cfg, out, ds, resume_side)
    tdata = TrainingData.prepare(cfg, ds, stride=model.output_stride, normalization=normalization)
    data_record = tdata.describe()
    if resume_side is not None:
        fp = (resume_side.get("data") or {}).get("fingerprint")
        if fp != data_record["fingerprint"]:
            raise DatasetError(
                f"cannot resume {out}: the dataset differs from the one it was trained on "
                f"({data_record['path']})."
            )
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_cl = cfg.channels_last and device.type in ("cpu", "cuda")
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    return _Run(
        cfg=cfg,
        out=out,
        callbacks=callbacks,
        ds=ds,
        data=tdata,
        data_record=data_record,
        model=model,
        model_cfg=model_cfg,
        normalization=normalization,
        parent=parent,
        device=device,
        precision=precision,
        channels_last=use_cl,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
    )


# ---------------------------------------------------------------------- 2. restore
def _restore(run: _Run, side: dict[str, Any]) -> None:
    """Load weights, optimizer state, counters and history of a ``last`` checkpoint."""
    load_state_into(
        run.model, read_checkpoint_tensors(side, "weights"), run.out / side["weights_file"]
    )
    run.optimizer.load_state_dict(load_optimizer_state(side))
    r = side["resume"]
    run.start_epoch, run.start_step = int(r["epoch"]), int(r["step"])
    run.loss_sum, run.loss_count = float(r["loss_sum"]), int(r["loss_count"])
    run.history = list(side.get("history") or [])
    run.best_epoch, run.best_val = side.get("best_epoch"), side.get("best_val_loss")
    if run.scaler is not None and r.get("scaler"):
        run.scaler.load_state_dict(r["scaler"])


# ---------------------------------------------------------------------- 4. checkpoints
def _sidecar(run: _Run, epochs_done: int) -> dict[str, Any]:
    """The sidecar of the current state (see :mod:`.checkpoint` for the keys)."""
    return {
        "model": run.model_cfg.model_dump(mode="json"),
        "normalization": run.normalization,
        "sampling_A": float(run.ds.sampling_A),
        "output": {
            "kind": "binary_logits",
            "activation": "sigmoid",
            "classes": ["background", "particle"],
        },
        "stage": run.cfg.stage,
        "training": {
            "config": run.cfg.model_dump(mode="json"),
            "device": str(run.device),
            "precision": run.precision,
        },
        "data": run.data_record,
        "parent": run.parent,
        "epochs_completed": epochs_done,
        "best_epoch": run.best_epoch,
        "best_val_loss": run.best_val,
        "history": run.history,
    }


def _save_last(run: _Run, epoch: int, step: int) -> None:
    """Write the resumable ``last`` checkpoint; the run continues at (``epoch``, ``step``)."""
    side = _sidecar(run, len(run.history))
    side["resume"] = {
        "epoch": epoch,
        "step": step,
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }
    save_checkpoint(run.out, "last", run.model, side, optimizer_state=run.optimizer.state_dict())


def _end_epoch(
    run: _Run, epoch: int, lr: float, frozen: tuple[str, ...] | list[str], t_epoch: float
) -> None:
    """Validate, record the epoch, write ``best`` (if improved) and ``last``, notify."""
    cfg = run.cfg
    val = evaluate_domains(
        run.model, run.data, run.device, run.precision, cfg.batch_size, run.channels_last
    )
    own = float(np.mean([val[k] for k in run.own_keys]))
    is_best = run.best_val is None or (math.isfinite(own) and own < run.best_val)
    record = {
        "epoch": epoch,
        "train_loss": run.loss_sum / max(run.loss_count, 1),
        "val_loss": val,
        "val_loss_own": own,
        "lr": lr,
        "time_s": time.perf_counter() - t_epoch,
        "frozen_parts": list(frozen),
        "n_trainable": run.model.n_parameters(trainable_only=True),
    }
    run.history.append(record)
    if is_best:
        run.best_epoch, run.best_val = epoch, own
        save_checkpoint(run.out, "best", run.model, _sidecar(run, epoch + 1))
    run.loss_sum, run.loss_count = 0.0, 0
    _save_last(run, epoch + 1, 0)
    dispatch(
        run.callbacks,
        "on_epoch",
        EpochUpdate(
            epoch=epoch,
            n_epochs=cfg.epochs,
            train_loss=record["train_loss"],
            val_loss=val,
            val_loss_own=own,
            is_best=is_best,
            best_epoch=int(run.best_epoch),
            best_val_loss=float(run.best_val),
            lr=lr,
            time_s=record["time_s"],
            frozen_parts=tuple(frozen),
            record=record,
        ),
    )


# ---------------------------------------------------------------------- 3. epochs
def _announce(run: _Run) -> None:
    """Set the starting freeze state and send :class:`TrainStart`."""
    cfg, model = run.cfg, run.model
    model.freeze(cfg.freeze, run.start_epoch, cfg.epochs)
    dispatch(
        run.callbacks,
        "on_train_start",
        TrainStart(
            stage=cfg.stage,
            n_epochs=cfg.epochs,
            steps_per_epoch=run.data.steps_per_epoch(),
            start_epoch=run.start_epoch,
            start_step=run.start_step,
            n_train_images=run.data.n_train,
            n_val_structures=len(run.data.val_structures),
            device=str(run.device),
            precision=run.precision,
            n_parameters=model.n_parameters(),
            n_trainable=model.n_parameters(trainable_only=True),
            crop_px=tuple(run.data.crop_size),
        ),
    )


def _train_step(run: _Run, rows: np.ndarray, epoch: int, step: int) -> tuple[float, int]:
    """One optimisation step on the batch ``rows``; returns (loss, batch size)."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    xb, yb = run.data.load_batch(rows)
    x = _to_device(xb, run.device, run.channels_last)
    y = torch.from_numpy(yb).to(run.device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(run.device, run.precision):
        logits = model(x)
    loss = segmentation_loss(logits, y, cfg.loss, cfg.dice_weight)
    if not torch.isfinite(loss):
        raise DatasetError(
            f"the training loss became {float(loss)} in epoch {epoch}, step {step}; "
            "lower the learning rate or check the data for extreme values."
        )
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach()), len(xb)


def _run_epoch(run: _Run, epoch: int, should_stop: Callable[[], bool]) -> bool:
    """Train epoch ``epoch`` (from ``start_step`` when resuming) and checkpoint it.

    Returns
    -------
    bool
        True if a stop was requested (a resumable ``last`` checkpoint was written).
    """
    cfg = run.cfg
    t_epoch = time.perf_counter()
    frozen = run.model.freeze(cfg.freeze, epoch, cfg.epochs)
    lr = cfg.lr * cfg.lr_decay**epoch
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    batches = run.data.batches(epoch)
    first = run.start_step if epoch == run.start_epoch else 0
    if first == 0:
        run.loss_sum, run.loss_count = 0.0, 0
    for step in range(first, len(batches)):
        if should_stop():
            _save_last(run, epoch, step)
            return True
        t_step = time.perf_counter()
        lv, n = _train_step(run, batches[step], epoch, step)
        run.loss_sum += lv * n
        run.loss_count += n
        dt = time.perf_counter() - t_step
        dispatch(
            run.callbacks,
            "on_step",
            StepUpdate(
                epoch=epoch,
                n_epochs=cfg.epochs,
                step=step,
                n_steps=len(batches),
                loss=lv,
                lr=lr,
                images_per_s=n / max(dt, 1e-9),
            ),
        )
    if should_stop():  # before the validation pass: a Stop (or a closed window) waits no longer
        _save_last(run, epoch, len(batches))
        return True
    _end_epoch(run, epoch, lr, frozen, t_epoch)
    return False


def train(
    config: TrainConfig | dict[str, Any],
    data: HRTEMDataset | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    callbacks: Iterable[Any] | None = None,
    stop: StopRequest = None,
    resume: bool = False,
) -> TrainResult:
    """Pretrain or fine-tune a U-Net; write ``best`` and ``last`` checkpoints to ``out_dir``.

    Parameters
    ----------
    config
        The :class:`TrainConfig` (or a dict validating into one).  With ``init_from`` it is a
        fine-tuning of that checkpoint.
    data
        An :class:`~napari_hrtem_transfer.io.HRTEMDataset` or the path of its ``.hspy`` file
        (read lazily).
    out_dir
        Checkpoint folder; must not hold a checkpoint unless ``resume``.
    callbacks
        Objects implementing (some of) :class:`TrainCallback`.
    stop
        A ``threading.Event`` or a callable; checked before every step.  When it is set the
        run writes a resumable ``last`` checkpoint and returns with ``stopped=True``.
    resume
        Continue the run in ``out_dir`` from its ``last`` checkpoint.  With the same config
        (``epochs`` may be raised) the result equals an uninterrupted run on a CPU in
        deterministic mode.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError, DatasetError, CheckpointError
        For bad settings, data or checkpoints; raised before anything is written.
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    out = Path(out_dir).expanduser()
    should_stop = stop_checker(stop)
    _check_out_dir(out, resume)
    ds = open_dataset(data)
    resume_side = _resume_sidecar(cfg, out) if resume else None

    with torch_settings(cfg.num_threads, cfg.deterministic):
        run = _setup(cfg, out, list(callbacks or []), ds, resume_side)
        if resume_side is not None:
            _restore(run, resume_side)
        _announce(run)
        stopped = False
        for epoch in range(run.start_epoch, cfg.epochs):
            stopped = _run_epoch(run, epoch, should_stop)
            if stopped:
                break
        if run.start_epoch >= cfg.epochs and not stopped:
            _save_last(run, cfg.epochs, 0)

    result = TrainResult(
        out_dir=out,
        stopped=stopped,
        epochs_completed=len(run.history),
        best_epoch=run.best_epoch,
        best_val_loss=run.best_val,
        history=run.history,
        device=str(run.device),
        precision=run.precision,
        time_s=time.perf_counter() - t0,
    )
    dispatch(run.callbacks, "on_train_end", result)
    return result
