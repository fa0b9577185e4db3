"""The one model loader: every front end (CLI, napari, HyperSpy, evaluation) loads here.

:func:`load_model` turns a model spec (``"pretrained"``, a checkpoint folder, a bioimage.io
package, or an already loaded model) into a
:class:`~napari_hrtem_transfer.training.LoadedModel`, cached by (resolved path, sidecar
modification time, which, device), so a GUI asking again does not reload the weights.
BatchNorm is folded into the convolutions once, at load.
"""

from __future__ import annotations

import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

#: Name of the model shipped inside the package (``--model pretrained``).
PRETRAINED = "pretrained"

#: Loaded models kept in memory (least recently loaded ones are dropped first).
CACHE_SIZE = 4

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_THREADS_SET = False


def pretrained_model_dir() -> Path:
    """Folder of the model shipped in the package (see ``docs/pretrained_model.md``).

    Raises
    ------
    CheckpointError
        If this installation has no shipped model.
    """
    root = resources.files("napari_hrtem_transfer") / "models" / "pretrained"
    path = Path(str(root))
    if not (path / "best.json").is_file():
        raise CheckpointError(
            f"the pretrained model is missing from this installation ({path}); reinstall "
            "napari-hrtem-transfer, or pass a checkpoint folder you trained yourself."
        )
    return path


def is_loaded_model(model: Any) -> bool:
    """True for an already loaded checkpoint (an object with ``predict_proba`` and ``info``)."""
    return hasattr(model, "predict_proba") and hasattr(model, "info")


def _looks_like_package(path: Path) -> bool:
    """A bioimage.io package name: a ``.zip``, an ``rdf.yaml``/``bioimageio.yaml``, or a
    folder holding one of them and no checkpoint sidecar."""
    names = ("rdf.yaml", "bioimageio.yaml")
    if path.suffix.lower() == ".zip" or path.name in names:
        return True
    if path.is_dir() and not (path / "best.json").exists() and not (path / "last.json").exists():
        return any((path / n).is_file() for n in names)
    return False


def resolve_model_path(spec: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint folder of ``spec`` (no weights are read).

    ``spec`` is ``"pretrained"`` or a checkpoint folder.  A bioimage.io model package is
    opened one layer up, by :func:`napari_hrtem_transfer.segmentation.resolve_model` (the
    front ends' entry), which unpacks it into a checkpoint folder with
    :func:`napari_hrtem_transfer.bioimageio.import_bioimageio` and then calls
    :func:`load_model` on that folder.

    Raises
    ------
    CheckpointError
        The shipped model is missing, or ``spec`` is a package given to this layer directly.
    """
    if str(spec) == PRETRAINED:
        return pretrained_model_dir()
    path = Path(spec).expanduser()
    if _looks_like_package(path):
        raise CheckpointError(
            f"{path} is a bioimage.io package; open it with "
            "napari_hrtem_transfer.segmentation.resolve_model(...) or "
            "napari_hrtem_transfer.bioimageio.import_bioimageio(...) first (the CLI, napari "
            "and HyperSpy do this for you)."
        )
    return path


def configure_threads() -> int:
    """Set torch's CPU threads once per process; returns the number in use.

    ``HRTEM_TRANSFER_NUM_THREADS`` overrides torch's default (one per physical core).
    """
    import torch

    global _THREADS_SET
    with _LOCK:
        if not _THREADS_SET:
            env = os.environ.get("HRTEM_TRANSFER_NUM_THREADS")
            if env and env.strip().isdigit() and int(env) > 0:
                torch.set_num_threads(int(env))
            _THREADS_SET = True
    return int(torch.get_num_threads())


def _load(path: Path, which: str, device: str) -> Any:
    """Read the weights (the one place where a checkpoint is turned into a model)."""
    from ..training.checkpoint import load_checkpoint

    return load_checkpoint(path, which, device=device)


def load_model(spec: Any = PRETRAINED, which: str = "best", device: str = "auto") -> Any:
    """A :class:`~napari_hrtem_transfer.training.LoadedModel` for ``spec``, ready to run.

    Parameters
    ----------
    spec
        ``"pretrained"``, a checkpoint folder, a bioimage.io package, or a loaded model
        (returned as is).
    which
        ``"best"`` or ``"last"``.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ...

    Raises
    ------
    CheckpointError
        Missing, refused or corrupted files.
    """
    if is_loaded_model(spec):
        return spec
    path = resolve_model_path(spec, which)
    sidecar = path / f"{which}.json"
    key = (
        str(path.resolve()),
        sidecar.stat().st_mtime_ns if sidecar.exists() else 0,
        which,
        device,
    )
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    configure_threads()
    loaded = _load(path, which, device)
    prepare = getattr(loaded, "inference_model", None)
    if callable(prepare):
        prepare()  # fold BatchNorm once, at load
    with _LOCK:
        while len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = loaded
    return loaded


def clear_cache() -> None:
    """Forget every loaded model (tests; a checkpoint rewritten within the clock's tick)."""
    with _LOCK:
        _CACHE.clear()
