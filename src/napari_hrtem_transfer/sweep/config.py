"""The sweep configuration: one validated pydantic model, read from a TOML file.

A sweep is the study's grid of transfer experiments: every combination of pretraining defocus,
target (transfer) defocus, freezing, training-set size N, learning rates and seed.  Each
combination is one *run*: pretrain (or reuse a cached pretrained model with identical
settings), fine-tune, and evaluate both models on every domain of the transfer dataset.

Importing this module needs no torch or dask.  Example file (``configs/study_small.toml``)::

    version = "1"
    name = "study-small"

    [data]
    pretrain = "../data/study_small.hspy"   # relative to the TOML file

    [grid]
    pretrain_defocus_nm = [-10, -5, 0, 5, 10]
    transfer_defocus_nm = [-10, -5, 0, 5, 10]
    freeze = ["none", "encoder"]
    n_transfer = [16]
    pretrain_lr = [2e-3]
    transfer_lr = [5e-4]
    seeds = [0]

    [model]
    architecture = "compact"
    channels = [16, 32, 64, 96]

    [pretrain]
    epochs = 6

    [transfer]
    epochs = 4

Defocus in [nm], abTEM sign (``defocus = -C10``, positive = underfocus).
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, config_error_from_validation
from ..models.config import CompactUNetConfig, ModelConfig
from ..training.config import FreezeMode, Precision, TrainConfig

__all__ = [
    "DataSettings",
    "GridSettings",
    "RunPoint",
    "RunSettings",
    "StageSettings",
    "SweepConfig",
    "load_sweep_config",
]

_STRICT = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataSettings(BaseModel):
    """The labelled datasets (``.hspy`` files written by ``hrtem-transfer simulate``)."""

    model_config = _STRICT

    pretrain: Path
    """Dataset the pretraining runs on (every pretraining defocus must be in it)."""

    transfer: Path | None = None
    """Dataset of the fine-tuning and of the evaluation (every target defocus must be in it);
    None: the pretraining dataset."""

    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Fraction of the structures held out for validation and evaluation (split by structure
    id, the same split for pretraining and fine-tuning)."""

    split_seed: int = 0
    """Seed of the train/validation split (kept equal for both stages, so that no evaluated
    structure was ever trained on when both stages use the same file)."""

    max_val_images: int | None = Field(default=None, ge=1)
    """Use at most this many held-out structures per domain (None: all)."""

    @property
    def transfer_path(self) -> Path:
        """The transfer dataset (the pretraining one when not given)."""
        return self.transfer if self.transfer is not None else self.pretrain


def _unique(v: list, what: str) -> list:
    if not v:
        raise ValueError(f"{what} is empty; give at least one value")
    if len(set(v)) != len(v):
        raise ValueError(f"{what} has repeated values (got {v})")
    return v


class GridSettings(BaseModel):
    """The axes of the grid; every combination is one run."""

    model_config = _STRICT

    pretrain_defocus_nm: list[float]
    """Pretraining domains [nm] (the study: -10, -5, 0, +5, +10)."""

    transfer_defocus_nm: list[float]
    """Target (fine-tuning) domains [nm]."""

    freeze: list[FreezeMode] = ["none"]
    """Freezing options during fine-tuning: ``none``, ``encoder``, ``decoder``, ``gradual``."""

    n_transfer: list[int] = [64]
    """Fine-tuning set sizes N [images] (the study: 64, 128, 256, 512)."""

    pretrain_lr: list[float] = [1e-3]
    """Pretraining learning rates (the study: 1e-3, 1e-4)."""

    transfer_lr: list[float] = [1e-4]
    """Fine-tuning learning rates (the study: 1e-4, 1e-5)."""

    seeds: list[int] = [0]
    """Seeds (weights, sample order, augmentation, N-subset); one seed drives both stages."""

    include_same_domain: bool = False
    """Also run pairs whose target equals the pretraining domain (the study leaves them out)."""

    @field_validator("pretrain_defocus_nm", "transfer_defocus_nm", "freeze", "seeds")
    @classmethod
    def _non_empty_unique(cls, v: list, info) -> list:
        return _unique(v, info.field_name)

    @field_validator("n_transfer")
    @classmethod
    def _positive_n(cls, v: list[int]) -> list[int]:
        _unique(v, "n_transfer")
        if any(n < 1 for n in v):
            raise ValueError(f"every N must be at least 1 (got {v})")
        return v

    @field_validator("pretrain_lr", "transfer_lr")
    @classmethod
    def _positive_lr(cls, v: list[float], info) -> list[float]:
        _unique(v, info.field_name)
        if any(not 0 < x <= 1 for x in v):
            raise ValueError(f"learning rates must lie in (0, 1] (got {v})")
        return v


class StageSettings(BaseModel):
    """Training settings of one stage (pretraining or fine-tuning); see ``TrainConfig``."""

    model_config = _STRICT

    epochs: int = Field(default=10, ge=1, le=100_000)
    """Epochs (the study: 10)."""

    batch_size: int = Field(default=16, ge=1, le=4096)
    """Images per optimisation step (the study: 16)."""

    samples_per_epoch: int | None = Field(default=None, ge=1)
    """Augmented samples per epoch (the study: 1024); None: each training image once."""

    patch_size: int | None = Field(default=None, ge=32, le=8192)
    """Side of the random training crops [px], a multiple of 32; None: whole images."""

    lr_decay: float = Field(default=0.99, gt=0.0, le=1.0)
    """Learning-rate factor per epoch (the study: 0.99)."""

    loss: Literal["bce", "bce_dice"] = "bce"
    """Training loss on logits."""


class RunSettings(BaseModel):
    """How the runs are executed and evaluated."""

    model_config = _STRICT

    device: str = "auto"
    """Torch device of every worker: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``
    (on a GPU cluster: one GPU per worker, see ``resources``)."""

    precision: Precision = "auto"
    """``auto``, ``fp32``, ``bf16`` or ``fp16`` (see ``TrainConfig.precision``)."""

    deterministic: bool = True
    """Deterministic algorithms (bitwise reproducible runs on a CPU)."""

    threads_per_worker: int = Field(default=1, ge=1, le=256)
    """Torch threads per worker process (and dask threads per worker)."""

    reuse_pretrained: bool = True
    """Train each distinct pretrained model once and reuse it for every run that shares its
    settings (the study re-pretrained for every run)."""

    retries: int = Field(default=2, ge=0, le=100)
    """Attempts after a failed one (an exception in the run); a worker that dies is retried by
    the scheduler (``distributed.scheduler.allowed-failures``).  Then the run is recorded as
    failed with its error."""

    keep_models: bool = False
    """Keep every fine-tuned checkpoint (``<models>/runs/<run key>/``); pretrained models are
    always kept in the cache (``<models>/pretrained/<key>/``)."""

    model_dir: Path | None = None
    """Folder of the model cache; None: ``<database stem>_models/`` beside the database."""

    n_boot: int = Field(default=200, ge=1)
    """Bootstrap resamples of the per-domain confidence intervals."""

    eval_batch_size: int = Field(default=8, ge=1)
    """Images per forward pass in the evaluation."""

    resources: dict[str, float] = {}
    """Dask worker resources each run needs, e.g. ``{GPU = 1}`` on a GPU cluster (start each
    worker with ``--resources GPU=1``)."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        TrainConfig(device=v)  # one definition of the valid devices
        return v.strip().lower()


@dataclass(frozen=True)
class RunPoint:
    """One point of the grid (defocus in [nm])."""

    pretrain_defocus_nm: float
    transfer_defocus_nm: float
    freeze: str
    n_transfer: int
    pretrain_lr: float
    transfer_lr: float
    seed: int

    def label(self) -> str:
        """Short human-readable name."""
        return (
            f"{self.pretrain_defocus_nm:+g}->{self.transfer_defocus_nm:+g} nm, "
            f"freeze {self.freeze}, N={self.n_transfer}, lr {self.pretrain_lr:g}/"
            f"{self.transfer_lr:g}, seed {self.seed}"
        )


class SweepConfig(BaseModel):
    """A grid of transfer experiments (see the module docstring for a TOML example)."""

    model_config = _STRICT

    version: Literal["1"] = "1"
    """Config format version."""

    name: str = "sweep"
    """Name of the sweep (stored with every run)."""

    data: DataSettings
    """Datasets."""

    grid: GridSettings
    """The grid's axes."""

    model: ModelConfig = CompactUNetConfig()
    """Architecture (``compact`` or ``resnet18`` and their options)."""

    pretrain: StageSettings = StageSettings()
    """Pretraining stage settings."""

    transfer: StageSettings = StageSettings()
    """Fine-tuning stage settings."""

    run: RunSettings = RunSettings()
    """Execution and evaluation settings."""

    @model_validator(mode="after")
    def _stage_configs_valid(self) -> SweepConfig:
        # build one TrainConfig of each stage: patch sizes etc. are checked once, there
        pts = self.points()
        if not pts:
            raise ValueError(
                "the grid has no run: every target equals its pretraining domain "
                f"(pretrain {self.grid.pretrain_defocus_nm}, transfer "
                f"{self.grid.transfer_defocus_nm}); add targets or set "
                "grid.include_same_domain = true"
            )
        self.pretrain_config(pts[0])
        self.transfer_config(pts[0], init_from=Path("pretrained"))
        return self

    # ------------------------------------------------------------------ the grid
    def points(self) -> list[RunPoint]:
        """Every run of the grid, in a stable order."""
        g = self.grid
        out = []
        for p, t, f, n, plr, tlr, s in itertools.product(
            g.pretrain_defocus_nm,
            g.transfer_defocus_nm,
            g.freeze,
            g.n_transfer,
            g.pretrain_lr,
            g.transfer_lr,
            g.seeds,
        ):
            if not g.include_same_domain and abs(p - t) < 1e-9:
                continue
            out.append(RunPoint(float(p), float(t), str(f), int(n), float(plr), float(tlr), int(s)))
        return out

    def _common(self, stage: StageSettings) -> dict[str, Any]:
        out = {k: getattr(stage, k) for k in _STAGE_FIELDS}
        out.update({k: getattr(self.data, k) for k in _DATA_FIELDS})
        out.update({k: getattr(self.run, k) for k in ("device", "precision", "deterministic")})
        out["num_threads"] = self.run.threads_per_worker
        return out

    def pretrain_config(self, point: RunPoint) -> TrainConfig:
        """The pretraining ``TrainConfig`` of a run."""
        return TrainConfig(
            model=self.model,
            train_defocus_nm=[point.pretrain_defocus_nm],
            eval_defocus_nm=[point.pretrain_defocus_nm],
            lr=point.pretrain_lr,
            seed=point.seed,
            **self._common(self.pretrain),
        )

    def transfer_config(self, point: RunPoint, init_from: str | os.PathLike) -> TrainConfig:
        """The fine-tuning ``TrainConfig`` of a run, starting from ``init_from``."""
        return TrainConfig(
            init_from=Path(init_from),
            train_defocus_nm=[point.transfer_defocus_nm],
            eval_defocus_nm=[point.transfer_defocus_nm],
            freeze=point.freeze,
            n_train=point.n_transfer,
            lr=point.transfer_lr,
            seed=point.seed,
            **self._common(self.transfer),
        )


#: StageSettings fields passed to the stage's TrainConfig as they are.
_STAGE_FIELDS = ("epochs", "batch_size", "samples_per_epoch", "patch_size", "lr_decay", "loss")
#: DataSettings fields passed to both stages' TrainConfig.
_DATA_FIELDS = ("val_fraction", "split_seed", "max_val_images")


def load_sweep_config(path: str | os.PathLike) -> SweepConfig:
    """Read a sweep TOML file and validate it.

    Relative dataset and model paths are taken relative to the file's folder.

    Raises
    ------
    ConfigError
        The file is missing, is not valid TOML, or a value is invalid (the message names the
        key, e.g. ``grid.freeze[1]``, the allowed values and what was given).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"sweep config {p} does not exist.", "--config")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}", "--config") from None
    base = p.resolve().parent
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("pretrain", "transfer"):
            if isinstance(data.get(k), str) and not Path(data[k]).expanduser().is_absolute():
                data[k] = str((base / data[k]).resolve())
    run = raw.get("run")
    if isinstance(run, dict) and isinstance(run.get("model_dir"), str):
        if not Path(run["model_dir"]).expanduser().is_absolute():
            run["model_dir"] = str((base / run["model_dir"]).resolve())
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error_from_validation(exc, source=str(p)) from None


def validate_sweep_config(raw: dict[str, Any] | SweepConfig, source: str = "config") -> SweepConfig:
    """Validate a dict (or pass a config through), turning pydantic errors into ConfigError."""
    if isinstance(raw, SweepConfig):
        return raw
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error_from_validation(exc, source=source) from None
