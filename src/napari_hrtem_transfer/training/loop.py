"""The training loop shared by pretraining and fine-tuning."""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import CheckpointError, ConfigError, DatasetError
from ..io.dataset import HRTEMDataset
from ..models.config import parse_model_config
from ..models.factory import build_model
from ..models.normalization import NORMALIZATION
from .callbacks import EpochUpdate, StepUpdate, TrainResult, TrainStart, dispatch
from .checkpoint import (
    _read_tensors,
    load_model_weights,
    load_optimizer_state,
    load_state_into,
    read_sidecar,
    save_checkpoint,
)
from .config import TrainConfig
from .data import TrainingData, domain_key, open_dataset
from .device import autocast, resolve_device, resolve_precision, torch_settings

StopRequest = threading.Event | Callable[[], bool] | None

#: Config fields that may change when resuming (they do not change the result on a CPU).
RESUMABLE_CHANGES = ("epochs", "num_threads", "cache_bytes", "device")


def _stop_fn(stop: StopRequest) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise ConfigError(
        f"stop must be a threading.Event or a callable returning bool (got {stop!r})", "stop"
    )


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
    cbs = list(callbacks or [])
    should_stop = _stop_fn(stop)
    _check_out_dir(out, resume)
    ds = open_dataset(data)

    resume_side: dict[str, Any] | None = None
    if resume:
        resume_side = read_sidecar(out, "last")
        saved = TrainConfig.model_validate(resume_side["training"]["config"])
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

    with torch_settings(cfg.num_threads, cfg.deterministic):
        parent = None
        if resume_side is not None:  # the run's own architecture; weights are loaded below
            model_cfg = parse_model_config(resume_side["model"])
            model = build_model(model_cfg)
            normalization = resume_side["normalization"]
            parent = resume_side.get("parent")
        elif cfg.init_from is not None:
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
            normalization = pside["normalization"]
            psamp = pside.get("sampling_A")
            if psamp is not None and abs(float(psamp) - ds.sampling_A) > 0.01 * float(psamp):
                warnings.warn(
                    f"the pretrained model was trained at {psamp:g} Å/px but the fine-tuning "
                    f"data has {ds.sampling_A:g} Å/px.",
                    stacklevel=2,
                )
            parent = _parent_summary(pside, cfg.init_from)
        else:
            torch.manual_seed(cfg.seed)
            model_cfg = cfg.resolved_model()
            model = build_model(model_cfg)
            normalization = dict(NORMALIZATION)

        tdata = TrainingData.prepare(cfg, ds, stride=model.output_stride)
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
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

        history: list[dict[str, Any]] = []
        start_epoch, start_step = 0, 0
        loss_sum, loss_count = 0.0, 0
        best_epoch: int | None = None
        best_val: float | None = None
        if resume_side is not None:
            wpath = out / resume_side["weights_file"]
            load_state_into(model, _read_tensors(wpath, resume_side.get("weights_sha256")), wpath)
            optimizer.load_state_dict(load_optimizer_state(resume_side))
            r = resume_side["resume"]
            start_epoch, start_step = int(r["epoch"]), int(r["step"])
            loss_sum, loss_count = float(r["loss_sum"]), int(r["loss_count"])
            history = list(resume_side.get("history") or [])
            best_epoch, best_val = resume_side.get("best_epoch"), resume_side.get("best_val_loss")
            if scaler is not None and r.get("scaler"):
                scaler.load_state_dict(r["scaler"])

        def sidecar(epochs_done: int, hist: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "model": model_cfg.model_dump(mode="json"),
                "normalization": normalization,
                "sampling_A": float(ds.sampling_A),
                "output": {
                    "kind": "binary_logits",
                    "activation": "sigmoid",
                    "classes": ["background", "particle"],
                },
                "stage": cfg.stage,
                "training": {
                    "config": cfg.model_dump(mode="json"),
                    "device": str(device),
                    "precision": precision,
                },
                "data": data_record,
                "parent": parent,
                "epochs_completed": epochs_done,
                "best_epoch": best_epoch,
                "best_val_loss": best_val,
                "history": hist,
            }

        def save_last(epoch: int, step: int) -> None:
            side = sidecar(len(history), history)
            side["resume"] = {
                "epoch": epoch,
                "step": step,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            save_checkpoint(out, "last", model, side, optimizer_state=optimizer.state_dict())

        n_steps = tdata.steps_per_epoch()
        own_keys = [domain_key(ds.defocus_nm[d]) for d in tdata.train_domains]
        model.freeze(cfg.freeze, start_epoch, cfg.epochs)
        dispatch(
            cbs,
            "on_train_start",
            TrainStart(
                stage=cfg.stage,
                n_epochs=cfg.epochs,
                steps_per_epoch=n_steps,
                start_epoch=start_epoch,
                start_step=start_step,
                n_train_images=tdata.n_train,
                n_val_structures=len(tdata.val_structures),
                device=str(device),
                precision=precision,
                n_parameters=model.n_parameters(),
                n_trainable=model.n_parameters(trainable_only=True),
            ),
        )

        stopped = False
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            frozen = model.freeze(cfg.freeze, epoch, cfg.epochs)
            lr = cfg.lr * cfg.lr_decay**epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            batches = tdata.batches(epoch)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                loss_sum, loss_count = 0.0, 0
            for step in range(first, len(batches)):
                if should_stop():
                    stopped = True
                    save_last(epoch, step)
                    break
                t_step = time.perf_counter()
                xb, yb = tdata.load_batch(batches[step])
                x = _to_device(xb, device, use_cl)
                y = torch.from_numpy(yb).to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    logits = model(x)
                loss = segmentation_loss(logits, y, cfg.loss, cfg.dice_weight)
                if not torch.isfinite(loss):
                    raise DatasetError(
                        f"the training loss became {float(loss)} in epoch {epoch}, step {step}; "
                        "lower the learning rate or check the data for extreme values."
                    )
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                lv = float(loss.detach())
                loss_sum += lv * len(xb)
                loss_count += len(xb)
                dt = time.perf_counter() - t_step
                dispatch(
                    cbs,
                    "on_step",
                    StepUpdate(
                        epoch=epoch,
                        n_epochs=cfg.epochs,
                        step=step,
                        n_steps=len(batches),
                        loss=lv,
                        lr=lr,
                        images_per_s=len(xb) / max(dt, 1e-9),
                    ),
                )
            if stopped:
                break
            val = evaluate_domains(model, tdata, device, precision, cfg.batch_size, use_cl)
            own = float(np.mean([val[k] for k in own_keys]))
            is_best = best_val is None or (math.isfinite(own) and own < best_val)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(loss_count, 1),
                "val_loss": val,
                "val_loss_own": own,
                "lr": lr,
                "time_s": time.perf_counter() - t_epoch,
                "frozen_parts": list(frozen),
                "n_trainable": model.n_parameters(trainable_only=True),
            }
            history.append(record)
            if is_best:
                best_epoch, best_val = epoch, own
                save_checkpoint(out, "best", model, sidecar(epoch + 1, history))
            loss_sum, loss_count = 0.0, 0
            save_last(epoch + 1, 0)
            dispatch(
                cbs,
                "on_epoch",
                EpochUpdate(
                    epoch=epoch,
                    n_epochs=cfg.epochs,
                    train_loss=record["train_loss"],
                    val_loss=val,
                    val_loss_own=own,
                    is_best=is_best,
                    best_epoch=int(best_epoch),
                    best_val_loss=float(best_val),
                    lr=lr,
                    time_s=record["time_s"],
                    frozen_parts=tuple(frozen),
                    record=record,
                ),
            )
        if start_epoch >= cfg.epochs and not stopped:
            save_last(cfg.epochs, 0)

    result = TrainResult(
        out_dir=out,
        stopped=stopped,
        epochs_completed=len(history),
        best_epoch=best_epoch,
        best_val_loss=best_val,
        history=history,
        device=str(device),
        precision=precision,
        time_s=time.perf_counter() - t0,
    )
    dispatch(cbs, "on_train_end", result)
    return result
