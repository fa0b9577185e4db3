"""The schema of a checkpoint sidecar (the JSON file that commits a checkpoint) and its check.

:func:`validate_sidecar` validates a parsed sidecar against the pydantic schema of its
``format_version`` (:class:`SidecarV1`): a missing or malformed field raises
:class:`~..errors.CheckpointError` naming the file and the field; ``weights_file`` and
``optimizer_file`` must be plain ``.safetensors`` file names (no paths).  Written and read by
:mod:`.checkpoint` (which re-exports these names); lengths in Å, pixel sizes in Å/px.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import CheckpointError

FORMAT = "napari-hrtem-transfer checkpoint"
FORMAT_VERSION = "1"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _plain_safetensors_name(v: str) -> str:
    """Accept only a plain ``*.safetensors`` file name (no folder part, no drive, no '..')."""
    if (
        not v
        or v in (".", "..")
        or "\x00" in v
        or PurePosixPath(v).name != v
        or PureWindowsPath(v).name != v
    ):
        raise ValueError(
            f"must be a plain file name inside the checkpoint folder, not a path (got {v!r})"
        )
    if not v.endswith(".safetensors"):
        raise ValueError(f"must name a .safetensors file (got {v!r})")
    return v


def _sha256_hex(v: str) -> str:
    if not _HEX64.match(v):
        raise ValueError(f"must be 64 lower-case hex digits (got {v!r})")
    return v


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"must be a finite number (got {v!r})")
    return v


SafeFileName = Annotated[str, AfterValidator(_plain_safetensors_name)]
Sha256 = Annotated[str, AfterValidator(_sha256_hex)]
_Strict = ConfigDict(strict=True, extra="allow")


class SidecarNormalization(BaseModel):
    """The input preprocessing record (``models.normalization``; :class:`PreprocessConfig`).

    ``per_image_standardize`` (every older checkpoint) needs only ``eps``;
    ``flat_field_standardize`` also needs ``flat_field_sigma_A`` [Å] and ``sampling_A``
    [Å/px], the pixel size the record expects (the model's).
    """

    model_config = _Strict
    method: Literal["per_image_standardize", "flat_field_standardize"]
    """Standardisation only, or flat-field correction then standardisation."""
    eps: Annotated[float, AfterValidator(_finite), Field(ge=0.0)] = 1e-6
    """Added to the standard deviation."""
    flat_field_sigma_A: Annotated[float | None, AfterValidator(_finite), Field(gt=0.0)] = None
    """Sigma of the flat-field blur [Å]."""
    sampling_A: Annotated[float | None, AfterValidator(_finite), Field(gt=0.0)] = None
    """Pixel size of the images the record expects [Å/px]."""

    @model_validator(mode="after")
    def _complete(self) -> SidecarNormalization:
        if self.method == "flat_field_standardize" and (
            self.flat_field_sigma_A is None or self.sampling_A is None
        ):
            raise ValueError("flat_field_standardize needs flat_field_sigma_A and sampling_A")
        return self


class SidecarTraining(BaseModel):
    """How the checkpoint was trained (the config is validated when resuming)."""

    model_config = _Strict
    config: dict[str, Any]
    device: str | None = None
    precision: str | None = None


class SidecarResume(BaseModel):
    """Where a stopped run continues (``last`` checkpoints)."""

    model_config = _Strict
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    loss_sum: float
    loss_count: int = Field(ge=0)
    scaler: dict[str, Any] | None = None


class SidecarV1(BaseModel):
    """Schema of a checkpoint sidecar, ``format_version`` ``"1"``.

    Strict types (JSON numbers for numbers, no strings such as ``"0.2 A"``); keys not listed
    here are kept (additions that older readers may ignore).
    """

    model_config = _Strict
    format: Literal["napari-hrtem-transfer checkpoint"]
    format_version: Literal["1"]
    which: Literal["best", "last"]
    weights_file: SafeFileName
    weights_sha256: Sha256
    model: dict[str, Any]
    """Architecture config (validated by ``models.config.parse_model_config``)."""
    normalization: SidecarNormalization
    sampling_A: Annotated[float | None, AfterValidator(_finite), Field(gt=0.0)] = None
    """Pixel size of the training images [Å]."""
    output: dict[str, Any] | None = None
    stage: Literal["pretrain", "finetune"] | None = None
    training: SidecarTraining | None = None
    data: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    epochs_completed: int | None = Field(default=None, ge=0)
    best_epoch: int | None = Field(default=None, ge=0)
    best_val_loss: float | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    optimizer_file: SafeFileName | None = None
    optimizer_sha256: Sha256 | None = None
    optimizer: dict[str, Any] | None = None
    resume: SidecarResume | None = None

    @field_validator("model")
    @classmethod
    def _architecture(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ..models.config import parse_model_config

        try:
            parse_model_config(v)
        except ValidationError as exc:
            tag = v.get("architecture") if isinstance(v, dict) else None
            detail = "; ".join(
                f"{_field_name(tuple(e['loc'])[1:] if e['loc'][:1] == (tag,) else e['loc'])}: "
                f"{e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"not a valid architecture config ({detail})") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a valid architecture config ({exc})") from None
        return v


#: The sidecar schema of each readable ``format_version``.
SIDECAR_SCHEMAS: dict[str, type[BaseModel]] = {"1": SidecarV1}


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after",) or str(part).startswith(("function-", "nullable")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def validate_sidecar(side: Any, path: str | os.PathLike, which: str | None = None) -> BaseModel:
    """Validate a parsed sidecar against the schema of its ``format_version``.

    Parameters
    ----------
    side
        The JSON object read from the sidecar file.
    path
        The file (named in error messages).
    which
        The checkpoint the file is (``best``/``last``); the sidecar's ``which`` must agree.

    Returns
    -------
    BaseModel
        The validated record (a :class:`SidecarV1` for version 1).

    Raises
    ------
    CheckpointError
        Not a checkpoint sidecar, an unknown format version, or missing/malformed fields
        (each named in the message).
    """
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a napari-hrtem-transfer checkpoint sidecar.")
    version = side.get("format_version")
    schema = SIDECAR_SCHEMAS.get(str(version)) if isinstance(version, (str, int)) else None
    if schema is None:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this version of "
            f"napari-hrtem-transfer reads version(s) {', '.join(SIDECAR_SCHEMAS)}. Upgrade the "
            "package."
        )
    try:
        rec = schema.model_validate({**side, "format_version": str(version)})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = _field_name(err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "missing":
                problems.append(f"field {name!r} is missing")
            else:
                got = err.get("input")
                shown = "" if isinstance(got, (dict, list)) or "got" in msg else f" (got {got!r})"
                problems.append(f"field {name!r}: {msg}{shown}")
        raise CheckpointError(
            f"checkpoint sidecar {path} is invalid: " + "; ".join(problems) + ". The file was "
            "edited or damaged; restore it or write the checkpoint again."
        ) from None
    if which is not None and rec.which != which:
        raise CheckpointError(
            f"checkpoint sidecar {path} is invalid: field 'which' is {rec.which!r} but the file "
            f"is the {which!r} sidecar."
        )
    return rec
