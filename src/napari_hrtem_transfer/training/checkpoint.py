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
(:class:`.sidecar.SidecarV1`, in :mod:`.sidecar`): a missing or malformed field raises
:class:`CheckpointError` naming the file and the field, and ``weights_file``/``optimizer_file``
must be plain file names of ``.safetensors`` files inside the checkpoint folder (no paths, no
links leading out of it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..io.atomic import write_bytes_atomic, write_text_atomic
from .sidecar import FORMAT, FORMAT_VERSION, _plain_safetensors_name, validate_sidecar
from .sidecar import SIDECAR_SCHEMAS as SIDECAR_SCHEMAS  # re-exported: the schema's names
from .sidecar import SidecarNormalization as SidecarNormalization
from .sidecar import SidecarResume as SidecarResume
from .sidecar import SidecarTraining as SidecarTraining
from .sidecar import SidecarV1 as SidecarV1

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
