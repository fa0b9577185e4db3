"""Checkpoints: safetensors weights + a JSON sidecar, written atomically, loaded without pickle.

A model folder holds up to two checkpoints, ``best`` and ``last``::

    best.json                       sidecar (the commit point; names the weights file)
    best-<sha256[:12]>.safetensors  model weights (state dict, incl. BatchNorm statistics)
    last.json
    last-<sha256[:12]>.safetensors
    last-<sha256[:12]>.optim.safetensors   Adam state tensors (scalars are in last.json)

Writing: the tensor files are written under temporary names, hashed and renamed; then the
sidecar is written to a temporary file and renamed over ``<which>.json``.  A reader therefore
sees either the old or the new checkpoint, never a mixture; files of older checkpoints are
removed afterwards.  Loading checks the sha256 recorded in the sidecar, parses the tensors
with safetensors (never pickle) and loads them strictly into the architecture the sidecar
describes.

The sidecar (JSON object) has the keys ``format``, ``format_version``, ``which``,
``weights_file``, ``weights_sha256``, ``model`` (architecture config), ``normalization``,
``sampling_A``, ``output``, ``stage``, ``training`` (config, device, precision),
``data`` (dataset path, fingerprint, domains, split), ``parent`` (the checkpoint a fine-tuning
started from), ``epochs_completed``, ``best_epoch``, ``best_val_loss``, ``history``,
``versions``, ``created`` and ``extra`` (free-form, see :func:`update_checkpoint_extra`);
``last`` also has ``optimizer_file``, ``optimizer_sha256`` and ``resume``.

Reading validates the sidecar against the pydantic schema of its ``format_version``
(:class:`SidecarV1`): a missing or malformed field raises :class:`CheckpointError` naming the
file and the field, and ``weights_file``/``optimizer_file`` must be plain file names of
``.safetensors`` files inside the checkpoint folder (no paths, no links leading out of it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import CheckpointError, ConfigError
from ..io.atomic import write_bytes_atomic, write_text_atomic

FORMAT = "napari-hrtem-transfer checkpoint"
FORMAT_VERSION = "1"
WHICH = ("best", "last")
if TYPE_CHECKING:  # pragma: no cover
    from .inference import LoadedModel

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".npz")


# ---------------------------------------------------------------------- helpers
def package_versions() -> dict[str, str]:
    """Versions of the packages that matter for reproducing a checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("napari-hrtem-transfer", "torch", "numpy", "safetensors", "pydantic"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=True), fsync=True)


def _write_tensors(
    folder: Path, stem: str, tensors: dict[str, Any], suffix: str
) -> tuple[str, str]:
    """Write ``tensors`` to ``folder/<stem>-<hash>.<suffix>``; return (file name, sha256).

    The file is serialised in memory, named after its sha256 and written atomically (a
    temporary name, flushed to disk, then renamed).
    """
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt"})
    sha = _sha256_bytes(data)
    name = f"{stem}-{sha[:12]}.{suffix}"
    write_bytes_atomic(folder / name, data, fsync=True)
    return name, sha


def state_tensors(model: Any) -> dict[str, Any]:
    """The model's state dict as contiguous CPU tensors (safe to write with safetensors)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a torch optimizer state dict into named tensors and a JSON-able remainder.

    Tensors become ``"state.<param index>.<key>"``; non-tensor per-parameter values and the
    ``param_groups`` go to the JSON part.
    """
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = val.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = val
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for key, val in g.items():  # JSON turned tuples (e.g. Adam's betas) into lists
            if isinstance(val, list) and key != "params":
                g[key] = tuple(val)
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------- writing
def save_checkpoint(
    model_dir: str | os.PathLike,
    which: str,
    model: Any,
    sidecar: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``which`` (``"best"`` or ``"last"``) of ``model`` into ``model_dir``.

    Parameters
    ----------
    model_dir
        Folder (created if missing).
    which
        ``"best"`` or ``"last"``.
    model
        The torch module whose ``state_dict`` is saved.
    sidecar
        JSON-serialisable metadata; ``format``, file names, hashes, ``versions``,
        ``created`` and (if absent) ``extra`` are filled in here.
    optimizer_state
        ``optimizer.state_dict()`` to store alongside (for resumable ``last`` checkpoints).

    Returns
    -------
    Path
        The sidecar file.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH} (got {which!r})")
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    side = _json_safe(dict(sidecar))
    wname, wsha = _write_tensors(folder, which, state_tensors(model), "safetensors")
    keep = {wname}
    side.update({"format": FORMAT, "format_version": FORMAT_VERSION, "which": which})
    side["weights_file"], side["weights_sha256"] = wname, wsha
    if optimizer_state is not None:
        tensors, meta = flatten_optimizer_state(optimizer_state)
        oname, osha = _write_tensors(folder, which, tensors, "optim.safetensors")
        keep.add(oname)
        side["optimizer_file"], side["optimizer_sha256"] = oname, osha
        side["optimizer"] = _json_safe(meta)
    side.setdefault("versions", package_versions())
    side["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    side.setdefault("extra", {})
    _write_json_atomic(folder / f"{which}.json", side)
    for f in folder.glob(f"{which}-*.safetensors"):
        if f.name not in keep:
            with contextlib.suppress(OSError):
                f.unlink()
    return folder / f"{which}.json"


def update_checkpoint_extra(
    model_dir: str | os.PathLike, key: str, value: Any, which: str | tuple[str, ...] = "best"
) -> None:
    """Store ``value`` under ``extra[key]`` in the sidecar of checkpoint(s) ``which``.

    The sidecar is rewritten atomically; the weights are untouched.  Use it to attach results
    computed from a checkpoint (e.g. OOD statistics) to it.  A later training step that
    replaces the weights of that checkpoint starts a fresh ``extra``.

    Parameters
    ----------
    model_dir
        The checkpoint folder.
    key
        Name of the entry (overwritten if present).
    value
        Any JSON-serialisable value (numpy scalars and arrays are converted).
    which
        ``"best"``, ``"last"`` or a tuple of both.

    Raises
    ------
    CheckpointError
        If the sidecar is missing or unreadable.
    ConfigError
        If ``value`` cannot be written as JSON.
    """
    names = (which,) if isinstance(which, str) else tuple(which)
    for w in names:
        path = _sidecar_path(Path(model_dir), w)
        side = read_sidecar(model_dir, w)
        side.pop("_path", None)
        extra = dict(side.get("extra") or {})
        extra[str(key)] = _json_safe(value)
        side["extra"] = extra
        try:
            json.dumps(side)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra[{key!r}] is not JSON-serialisable: {exc}", "value") from exc
        _write_json_atomic(path, side)


# ---------------------------------------------------------------------- sidecar schema
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


# ---------------------------------------------------------------------- reading
def _sidecar_path(model_dir: Path, which: str) -> Path:
    if which not in WHICH:
        raise ConfigError(f"which must be 'best' or 'last' (got {which!r})", "which")
    return model_dir / f"{which}.json"


def _resolve_dir(model_dir: str | os.PathLike, which: str) -> tuple[Path, str]:
    p = Path(model_dir).expanduser()
    if p.suffix.lower() in _PICKLE_SUFFIXES or (p.is_file() and p.suffix.lower() != ".json"):
        raise CheckpointError(
            f"{p}: refusing to load this file; napari-hrtem-transfer loads only checkpoint "
            "folders with safetensors weights and a JSON sidecar (pickle-based .pt/.pth/.bin/"
            ".ckpt files can execute code when loaded)."
        )
    if p.suffix.lower() == ".json":
        w = p.stem if p.stem in WHICH else which
        return p.parent, w
    return p, which


def read_sidecar(model_dir: str | os.PathLike, which: str = "best") -> dict[str, Any]:
    """Read the JSON sidecar of checkpoint ``which`` in ``model_dir`` and validate it.

    The sidecar is checked against the schema of its ``format_version``
    (:func:`validate_sidecar`); the returned dict is the file's content plus ``"_path"``.

    Raises
    ------
    CheckpointError
        If the folder or the sidecar is missing, unreadable, not a checkpoint sidecar, of an
        unknown format version, or has a missing or malformed field (named in the message).
    """
    folder, which = _resolve_dir(model_dir, which)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder.")
    path = _sidecar_path(folder, which)
    if not path.exists():
        present = sorted(f.name for f in folder.iterdir())
        hint = ""
        if which == "best" and (folder / "last.json").exists():
            hint = (
                " The run stopped before its first epoch finished; load which='last' or "
                "resume the training."
            )
        elif any(Path(n).suffix in _PICKLE_SUFFIXES for n in present):
            hint = " Pickle-based files (.pt/.pth/.bin/.ckpt) are never loaded."
        raise CheckpointError(
            f"missing checkpoint sidecar {path} "
            f"(folder contains: {', '.join(present) or 'nothing'})." + hint
        )
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint sidecar {path} is unreadable or corrupted: {exc}"
        ) from exc
    validate_sidecar(side, path, which)
    side["_path"] = str(path)
    return side


def _checked_file(folder: Path, name: Any, field: str, sidecar: str | os.PathLike) -> Path:
    """``folder/name`` if ``name`` is a plain .safetensors name whose file stays in ``folder``.

    Raises
    ------
    CheckpointError
        For a path instead of a name, another suffix, or a link leading out of the folder.
    """
    try:
        if not isinstance(name, str):
            raise ValueError(f"must be a file name (got {name!r})")
        _plain_safetensors_name(name)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar}: field {field!r} {exc}.") from None
    path = folder / name
    if path.is_symlink() or path.resolve().parent != folder.resolve():
        raise CheckpointError(
            f"checkpoint sidecar {sidecar}: field {field!r} names {name}, which is a link; "
            f"checkpoints load only regular files inside their folder ({folder}). Copy the "
            "file itself into the folder."
        )
    return path


def _read_tensors(path: Path, sha: str | None) -> dict[str, Any]:
    from safetensors.torch import load

    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints must reference .safetensors files only.")
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing.")
    data = path.read_bytes()
    if sha is not None and _sha256_bytes(data) != sha:
        raise CheckpointError(
            f"checkpoint file {path} is corrupted or was modified: its sha256 does not match "
            "the one recorded in the sidecar."
        )
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(
            f"checkpoint file {path} is not a valid safetensors file: {exc}"
        ) from exc


def read_checkpoint_tensors(side: dict[str, Any], kind: str = "weights") -> dict[str, Any]:
    """The tensors of a sidecar's weights (``kind="weights"``) or optimizer state file.

    The file must be a plain name inside the sidecar's folder and match its recorded sha256.

    Raises
    ------
    CheckpointError
        Missing, unsafe, modified or invalid file.
    """
    folder = Path(side["_path"]).parent
    field = f"{kind}_file"
    if field not in side:
        raise CheckpointError(f"checkpoint sidecar {side['_path']} has no {field!r}.")
    path = _checked_file(folder, side[field], field, side["_path"])
    return _read_tensors(path, side.get(f"{kind}_sha256"))


def load_state_into(model: Any, tensors: dict[str, Any], path: Path) -> None:
    """Load ``tensors`` strictly into ``model``; a mismatch raises :class:`CheckpointError`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of a different shape (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"weights in {path} do not match the architecture in its sidecar: "
            + ", ".join(parts)
            + "."
        )
    model.load_state_dict(tensors, strict=True)


def load_model_weights(
    model_dir: str | os.PathLike, which: str = "best"
) -> tuple[Any, dict[str, Any]]:
    """Build the sidecar's architecture and load its weights (CPU, float32, eval mode).

    Returns
    -------
    model, sidecar

    Raises
    ------
    CheckpointError
        Missing/corrupted sidecar or weights, or weights that do not fit the architecture.
    """
    from ..models.factory import build_model

    side = read_sidecar(model_dir, which)
    folder = Path(side["_path"]).parent
    try:
        model = build_model(side["model"])
    except Exception as exc:  # noqa: BLE001 - pydantic / config errors
        raise CheckpointError(f"{side['_path']}: invalid architecture config: {exc}") from exc
    tensors = read_checkpoint_tensors(side, "weights")
    load_state_into(model, tensors, folder / side["weights_file"])
    model.eval()
    return model, side


def load_optimizer_state(side: dict[str, Any]) -> dict[str, Any]:
    """Read the optimizer state of a ``last`` checkpoint (sidecar from :func:`read_sidecar`)."""
    if "optimizer_file" not in side:
        raise CheckpointError(f"{side['_path']} has no optimizer state; it cannot be resumed.")
    tensors = read_checkpoint_tensors(side, "optimizer")
    return unflatten_optimizer_state(tensors, side.get("optimizer") or {})


def load_checkpoint(
    model_dir: str | os.PathLike, which: str = "best", device: str = "auto"
) -> LoadedModel:
    """Load a trained model for inference.

    Parameters
    ----------
    model_dir
        Checkpoint folder (or the path of its ``best.json``/``last.json``).
    which
        ``"best"`` (lowest validation loss on the training domains) or ``"last"``.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ...

    Returns
    -------
    LoadedModel
        The model (eval mode) with its sidecar and a ``predict_proba`` method.

    Raises
    ------
    CheckpointError
        Missing or corrupted files, pickle files, weights that do not match the architecture.
    """
    from .device import resolve_device
    from .inference import LoadedModel

    model, side = load_model_weights(model_dir, which)
    dev = resolve_device(device)
    model.to(dev)
    return LoadedModel(
        model=model, info=side, path=Path(side["_path"]).parent, which=side["which"], device=dev
    )
