"""Progress reporting: the callback protocol and the update records it receives.

A callback is any object with some of the methods of :class:`TrainCallback`; missing methods
are skipped.  Callbacks run in the training thread and must return quickly (a GUI should
forward the update to its own thread, e.g. through a queue or a psygnal signal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class TrainStart:
    """Sent once before the first step.

    Attributes
    ----------
    stage
        ``"pretrain"`` or ``"finetune"``.
    n_epochs, steps_per_epoch
        Size of the run.
    start_epoch, start_step
        Where the run starts (non-zero when resuming).
    n_train_images, n_val_structures
        Size of the training set and of the validation split.
    device, precision
        What is actually used (e.g. ``"cpu"``, ``"bf16"``).
    n_parameters, n_trainable
        Parameter counts (trainable at the start; ``gradual`` changes it per epoch).
    crop_px
        Size (cy, cx) [px] of the training crops actually used (``patch_size``, or less for
        smaller frames; see :func:`~napari_hrtem_transfer.training.data.training_crop`).
    """

    stage: str
    n_epochs: int
    steps_per_epoch: int
    start_epoch: int
    start_step: int
    n_train_images: int
    n_val_structures: int
    device: str
    precision: str
    n_parameters: int
    n_trainable: int
    crop_px: tuple[int, int] | None = None


@dataclass(frozen=True)
class StepUpdate:
    """Sent after every optimisation step.

    Attributes
    ----------
    epoch, step
        0-based epoch and step within the epoch.
    n_epochs, n_steps
        Totals.
    loss
        Training loss of this batch.
    lr
        Learning rate.
    images_per_s
        Throughput of this step [images/s].
    """

    epoch: int
    n_epochs: int
    step: int
    n_steps: int
    loss: float
    lr: float
    images_per_s: float


@dataclass(frozen=True)
class EpochUpdate:
    """Sent after every epoch's validation.

    Attributes
    ----------
    epoch
        0-based epoch that finished.
    train_loss
        Mean training loss over the epoch.
    val_loss
        Validation loss (binary cross-entropy) per evaluated domain, keyed by defocus [nm]
        formatted with ``%g`` (e.g. ``"-10"``, ``"2.5"``).
    val_loss_own
        Mean validation loss over the training domains (selects the best epoch).
    is_best, best_epoch, best_val_loss
        Best epoch so far.
    lr, time_s, frozen_parts
        Learning rate, epoch duration [s], parts frozen during the epoch.
    record
        The full history record written to the checkpoint.
    """

    epoch: int
    n_epochs: int
    train_loss: float
    val_loss: dict[str, float]
    val_loss_own: float
    is_best: bool
    best_epoch: int
    best_val_loss: float
    lr: float
    time_s: float
    frozen_parts: tuple[str, ...]
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`~napari_hrtem_transfer.training.train` returns.

    Attributes
    ----------
    out_dir
        The checkpoint folder (``best`` and ``last``).
    stopped
        True if a stop request ended the run early; ``train(..., resume=True)`` continues.
    epochs_completed
        Number of finished epochs.
    best_epoch, best_val_loss
        Best epoch (0-based) by validation loss on the training domains; None if no epoch
        finished.
    history
        One record per finished epoch (losses per domain, lr, time, frozen parts).
    device, precision
        What was actually used.
    time_s
        Wall time of this call [s].
    """

    out_dir: Path
    stopped: bool
    epochs_completed: int
    best_epoch: int | None
    best_val_loss: float | None
    history: list[dict[str, Any]]
    device: str
    precision: str
    time_s: float


@runtime_checkable
class TrainCallback(Protocol):
    """Receives progress; implement any subset of these methods."""

    def on_train_start(self, start: TrainStart) -> None:
        """Called once before the first step."""

    def on_step(self, update: StepUpdate) -> None:
        """Called after every optimisation step."""

    def on_epoch(self, update: EpochUpdate) -> None:
        """Called after every epoch (after validation and checkpointing)."""

    def on_train_end(self, result: TrainResult) -> None:
        """Called once at the end, also when stopped."""


class Callback:
    """Convenience base class with no-op methods; override what you need."""

    def on_train_start(self, start: TrainStart) -> None:
        """Called once before the first step."""

    def on_step(self, update: StepUpdate) -> None:
        """Called after every optimisation step."""

    def on_epoch(self, update: EpochUpdate) -> None:
        """Called after every epoch."""

    def on_train_end(self, result: TrainResult) -> None:
        """Called once at the end."""


def dispatch(callbacks: list[Any], method: str, arg: Any) -> None:
    """Call ``method(arg)`` on every callback that has it."""
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            fn(arg)
