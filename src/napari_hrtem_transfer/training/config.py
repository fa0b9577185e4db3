"""The training configuration: one validated pydantic model for pretraining and fine-tuning.

Importing this module needs no torch, so GUIs can build and validate configs cheaply.
Pretraining and fine-tuning are the same loop; fine-tuning is a config with ``init_from``
(a checkpoint folder), usually a ``freeze`` protocol and a training-set size ``n_train``.
Defaults follow the study (Adam, batch 16, 10 epochs, learning rate x0.99 per epoch).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..models.config import CompactUNetConfig, ModelConfig, ResNet18UNetConfig
from ..models.normalization import PreprocessConfig

FreezeMode = Literal["none", "encoder", "decoder", "gradual"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Domains = list[float] | Literal["all"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainConfig(BaseModel):
    """Everything that defines a training run (one stage: pretraining or fine-tuning).

    Examples
    --------
    >>> pre = TrainConfig(train_defocus_nm=[-10.0], epochs=10, lr=1e-3)
    >>> ft = TrainConfig.finetune("models/pre", train_defocus_nm=[5.0], freeze="encoder",
    ...                           n_train=64)
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    version: Literal["1"] = "1"
    """Config format version."""

    model: ModelConfig | None = None
    """Architecture.  None: the CPU-sized ``compact`` U-Net when pretraining, the
    checkpoint's own architecture when fine-tuning (``init_from``)."""

    init_from: Path | None = None
    """Checkpoint folder to start from (fine-tuning); None trains from random weights."""

    init_which: Literal["best", "last"] = "best"
    """Which checkpoint of ``init_from`` to start from."""

    train_defocus_nm: Domains = "all"
    """Training domains: nominal defoci [nm] of the dataset, or ``"all"`` (the study's
    "mixture" baseline).  The best epoch is chosen by validation loss on these domains."""

    eval_defocus_nm: Domains = "all"
    """Domains whose validation loss is recorded every epoch [nm] (the training domains are
    always included)."""

    n_train: int | None = Field(default=None, ge=1)
    """Size of the training set in images, drawn (seeded) from the training structures of the
    training domains; None uses all of them.  The study fine-tunes with 64-512."""

    subset_seed: int | None = None
    """Seed of the ``n_train`` draw; None uses ``seed``."""

    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Fraction of the structures held out for validation (split by structure id)."""

    split_seed: int = 0
    """Seed of the train/validation split.  Keep it equal for a pretraining and its
    fine-tunings on the same dataset, so that no validation structure is ever trained on."""

    max_val_images: int | None = Field(default=None, ge=1)
    """Use at most this many validation structures per domain (None: all)."""

    freeze: FreezeMode = "none"
    """Freezing protocol: ``none``, ``encoder``, ``decoder`` (the head stays trainable) or
    ``gradual`` (unfreeze from the head backwards over the epochs)."""

    epochs: int = Field(default=10, ge=1, le=100_000)
    """Number of epochs."""

    batch_size: int = Field(default=16, ge=1, le=4096)
    """Images per optimisation step."""

    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    """Initial learning rate of Adam."""

    lr_decay: float = Field(default=0.99, gt=0.0, le=1.0)
    """Learning rate factor per epoch (exponential decay)."""

    patch_size: int | None = Field(default=256, ge=32, le=8192)
    """Side of the random training crops [px], a multiple of 32; None trains on whole images
    (the study: 512).  Frames smaller than the patch train on the largest square crop whose side
    is a multiple of the model's stride (16 px compact, 32 px ResNet-18) and fits (a warning
    says so); whole images are cut to multiples of the stride.  No padding."""

    samples_per_epoch: int | None = Field(default=None, ge=1)
    """Augmented samples per epoch (the study: 1024); None: each training image once."""

    augment: bool = True
    """Random D4 (8 dihedral) transforms."""

    preprocessing: PreprocessConfig = Field(default_factory=PreprocessConfig)
    """Input preprocessing of a new model (flat-field correction, standardisation); stored in
    the checkpoint as its ``normalization`` record and applied identically in training and
    inference.  Fine-tuning and resuming keep the checkpoint's own record.  Default:
    standardisation only."""

    pixel_size_augment: float = Field(default=1.0, ge=1.0, le=4.0)
    """Pixel-size augmentation r: each training crop is rescaled by a factor drawn
    log-uniformly in [1/r, r] around the dataset's (the model's native) pixel size, the crop
    size kept (image: linear interpolation, mask: linear then thresholded at 0.5; regions
    beyond the frame are mirrored).  1: off."""

    resolution_augment: float = Field(default=1.0, ge=1.0, le=4.0)
    """Resolution augmentation c: half of the training samples are drawn from the frame
    with the detail of one recorded at a pixel size up to c times coarser and upsampled to
    the model's, in ``segment``'s order: the raw frame is resampled (a Gaussian of 0.4 g px,
    linear down-sampling by g, linear up-sampling back; g log-uniform in [1, c]), then
    preprocessed; the mask is unchanged.  1: off."""

    dose_augment_e_per_A2: tuple[float, float] | None = None
    """Dose (noise) augmentation: a range [low, high] [e/Å²]; each re-noised training frame
    gets a dose drawn log-uniformly in it.  Noise-free datasets are Poisson-sampled at that
    dose; datasets of counts at dose D are binomially thinned to it (exact Poisson statistics
    at the lower dose), and keep their own noise where the drawn dose is >= D.  None: off."""

    dose_augment_probability: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of training samples re-noised when ``dose_augment_e_per_A2`` is set."""

    validation_dose: Literal["recorded", "augmented"] = "recorded"
    """The dose of the validation frames (which select the ``best`` checkpoint):
    ``recorded``: as simulated; ``augmented``: with ``dose_augment_e_per_A2`` set, each
    validation frame re-noised once to its own dose drawn from that range (seeded by
    ``seed`` and the frame, the same every epoch), so the best epoch is the best over the
    doses the model is trained for."""

    loss: Literal["bce", "bce_dice"] = "bce"
    """Training loss on logits: binary cross-entropy, optionally plus soft Dice.  Validation
    losses are always the binary cross-entropy."""

    dice_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the Dice term when ``loss="bce_dice"``."""

    seed: int = 0
    """Seed of the weight initialisation, the sample order, crops and augmentation."""

    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

    precision: Precision = "auto"
    """``auto`` (bf16 autocast on CUDA/CPUs with native bf16, else fp16 AMP on CUDA, else
    fp32), or explicit."""

    channels_last: bool = True
    """Use the channels-last memory format (faster convolutions on CPU and CUDA)."""

    deterministic: bool = False
    """Use deterministic algorithms only (bitwise reproducible on CPU; slower)."""

    num_threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch during training (None: torch's default)."""

    cache_bytes: int = Field(default=4 * 2**30, ge=0)
    """Read the selected images into memory if they fit in this many bytes; else read each
    image from the (lazy) dataset when needed."""

    @field_validator("train_defocus_nm", "eval_defocus_nm")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("the domain selection is empty; give defoci [nm] or 'all'")
            if len(set(v)) != len(v):
                raise ValueError(f"defocus values are repeated (got {v})")
        return v

    @field_validator("dose_augment_e_per_A2")
    @classmethod
    def _dose_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"the dose range must be 0 < low <= high [e/Å²] (got {v})")
        return v

    @field_validator("init_from")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser().resolve()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE_RE.match(v):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch_multiple(cls, v: int | None) -> int | None:
        if v is not None and v % 32:
            raise ValueError(f"patch_size must be a multiple of 32 (got {v})")
        return v

    @model_validator(mode="after")
    def _finetune_consistency(self) -> TrainConfig:
        if self.init_from is None and self.freeze != "none":
            raise ValueError(
                f"freeze={self.freeze!r} needs init_from (a pretrained checkpoint); freezing "
                "randomly initialised weights makes no sense"
            )
        return self

    @property
    def stage(self) -> Literal["pretrain", "finetune"]:
        """``"finetune"`` when starting from a checkpoint, else ``"pretrain"``."""
        return "finetune" if self.init_from is not None else "pretrain"

    def resolved_model(self) -> CompactUNetConfig | ResNet18UNetConfig:
        """The architecture to build when pretraining (``model`` or the compact default)."""
        return self.model if self.model is not None else CompactUNetConfig()

    @classmethod
    def pretrain(cls, train_defocus_nm: Domains = "all", **kwargs: Any) -> TrainConfig:
        """Config for pretraining on ``train_defocus_nm`` (defaults: lr 1e-3, compact model)."""
        return cls(train_defocus_nm=train_defocus_nm, **kwargs)

    @classmethod
    def finetune(
        cls,
        init_from: str | Path,
        train_defocus_nm: Domains,
        freeze: FreezeMode = "none",
        n_train: int | None = None,
        **kwargs: Any,
    ) -> TrainConfig:
        """Config for fine-tuning checkpoint ``init_from`` (default lr 1e-4, as the study)."""
        kwargs.setdefault("lr", 1e-4)
        return cls(
            init_from=Path(init_from),
            train_defocus_nm=train_defocus_nm,
            freeze=freeze,
            n_train=n_train,
            **kwargs,
        )
