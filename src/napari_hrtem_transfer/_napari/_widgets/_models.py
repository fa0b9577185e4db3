"""The model picker shared by Train and Segment: shipped and recently trained models, with
the model's card (architecture, training defoci, pixel size, epochs, best validation loss,
OOD reference) read from the checkpoint's JSON sidecar (never executing code)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, FileEdit
from psygnal import Signal

from ...io.atomic import write_text_atomic
from ._base import WrapLabel

PRETRAINED = "pretrained"
#: At most this many recently trained models are offered.
MAX_RECENT = 12


def _recent_file() -> Path:
    env = os.environ.get("HRTEM_TRANSFER_RECENT_MODELS")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-hrtem-transfer")) / "recent_models.json"


class _RecentModels:
    """Models trained in napari (this session and earlier ones), newest first."""

    changed = Signal()

    def __init__(self) -> None:
        self._paths: list[str] | None = None

    def paths(self) -> list[str]:
        """Existing model folders, newest first."""
        if self._paths is None:
            try:
                self._paths = [str(p) for p in json.loads(_recent_file().read_text())]
            except (OSError, ValueError, TypeError):
                self._paths = []
        return [p for p in self._paths if Path(p, "best.json").is_file()]

    def add(self, path: str | os.PathLike) -> None:
        """Put ``path`` first (and tell every model picker)."""
        p = str(Path(path).expanduser().resolve())
        paths = [p] + [q for q in self.paths() if q != p]
        self._paths = paths[:MAX_RECENT]
        try:
            _recent_file().parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(_recent_file(), json.dumps(self._paths, indent=1), fsync=False)
        except OSError:
            pass  # remembering is a convenience; the model itself is on disk
        self.changed.emit()

    def reload(self) -> None:
        """Forget the cached list (tests point the file elsewhere)."""
        self._paths = None


recent_models = _RecentModels()


def resolve_model(spec: str | os.PathLike) -> Path | None:
    """The checkpoint folder of ``spec``; None if unavailable (no weights are read).

    ``spec`` is ``"pretrained"``, a checkpoint folder, or a bioimage.io model package
    (``.zip``, ``rdf.yaml``/``bioimageio.yaml``), which is unpacked into the package cache by
    the same importer as ``segment --model`` (:func:`napari_hrtem_transfer.segmentation.
    open_model_spec`, then the path step of the one loader; no code from the package is run;
    a refused package raises its :class:`~napari_hrtem_transfer.errors.CheckpointError`,
    shown in the model card).  The weights are loaded by
    :func:`napari_hrtem_transfer.inference.load_model` when the model runs.
    """
    from ...inference import resolve_model_path
    from ...segmentation import open_model_spec

    if str(spec) == PRETRAINED:
        try:
            return resolve_model_path(PRETRAINED)
        except Exception:  # noqa: BLE001 - not shipped in this installation
            return None
    return resolve_model_path(open_model_spec(spec))


def model_card(spec: str | os.PathLike, which: str = "best") -> str:
    """A short card of a model, from its sidecar: what it is and what it was trained on."""
    from ...training import read_sidecar

    try:
        path = resolve_model(spec)
    except Exception as exc:  # noqa: BLE001 - a refused package: shown in the card
        return f"not a usable model: {exc}"
    if path is None:
        return ("the shipped pretrained model is not available in this installation; "
                "pick a trained model folder (Browse…).")
    try:
        side = read_sidecar(path, which)
    except Exception as exc:  # noqa: BLE001 - shown in the card
        return f"not a usable model: {exc}"
    arch = (side.get("model") or {}).get("architecture", "?")
    data = side.get("data") or {}
    doms = data.get("train_defocus_nm") or []
    dom_txt = ", ".join(f"{d:+g}" for d in doms) if doms else "?"
    samp = side.get("sampling_A")
    best = side.get("best_val_loss")
    n_epochs = side.get("epochs_completed", "?")
    epochs_text = f"best checkpoint after {n_epochs} epoch(s)"
    try:  # the run's total (the best checkpoint may be from an earlier epoch)
        n_epochs = read_sidecar(path, "last").get("epochs_completed", n_epochs)
        epochs_text = f"{n_epochs} epoch(s)"
    except Exception:  # noqa: BLE001 - shipped models may carry only "best"
        pass
    best_epoch = side.get("best_epoch")
    from ...bioimageio import is_bioimageio_package

    if str(spec) == PRETRAINED:
        title = "shipped pretrained model"
    elif is_bioimageio_package(spec):  # unpacked under its sha256: name the package
        title = f"bioimage.io package {Path(spec).name}"
    else:
        title = path.name
    lines = [
        f"{title}: "
        f"{arch} U-Net, {side.get('stage', '?')}",
        f"trained on defoci {dom_txt} nm at {samp:g} Å/px" if samp else
        f"trained on defoci {dom_txt} nm",
        f"{epochs_text}; best validation loss "
        + (f"{best:.4f}" if isinstance(best, int | float) else "?")
        + (f" (epoch {best_epoch + 1})" if isinstance(best_epoch, int) else ""),
        "OOD reference: " + ("yes" if (path / "ood_reference.json").is_file() else
                             "no (no OOD scores; fine-tune in napari to get one)"),
    ]
    return "\n".join(lines)


def model_sampling_A(spec: str | os.PathLike) -> float | None:
    """Pixel size [Å] a model was trained at (None if unknown)."""
    from ...training import read_sidecar

    try:
        path = resolve_model(spec)
        samp = read_sidecar(path).get("sampling_A") if path is not None else None
    except Exception:  # noqa: BLE001
        return None
    return float(samp) if samp else None


#: Longest model name shown in a closed combo box [characters] (the path is the tooltip).
MAX_NAME_CHARS = 26


def short_name(name: str, limit: int = MAX_NAME_CHARS) -> str:
    """``name`` shortened in the middle (``start…end``) to at most ``limit`` characters."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[-(limit - 1 - head):]}"


class ModelPicker:
    """A model choice (shipped, recent, browsed) with its card below.

    ``value`` is ``"pretrained"`` or a folder path (str); ``""`` when the picker offers
    "none" (pretraining from random weights) and it is chosen.
    """

    def __init__(self, label: str = "model", allow_none: str | None = None,
                 tooltip: str = "") -> None:
        self._none = allow_none
        self._browsed: list[str] = []
        self.combo = ComboBox(label=label, choices=self._choices, tooltip=tooltip
                              or "The shipped pretrained model, models trained in napari, "
                              "or a checkpoint folder picked with Browse.")
        self.browse = FileEdit(label="browse model", mode="d", value="",
                               tooltip="Pick a checkpoint folder (best.json + .safetensors).")
        self.browse_package = FileEdit(
            label="or a package", mode="r", value="", filter="*.zip *.yaml",
            tooltip="Pick a bioimage.io model package (.zip or rdf.yaml): ours come back with "
                    "their OOD reference; others of our architectures segment without one.")
        self.card = WrapLabel("")
        self.card.setStyleSheet("QLabel { font-size: 11px; }")
        self.browse.changed.connect(self._on_browse)
        self.browse_package.changed.connect(self._on_browse)
        self.combo.changed.connect(self._show_card)
        self.combo.changed.connect(self._show_path)
        recent_models.changed.connect(self.refresh)
        self.widgets = [self.combo, self.browse, self.browse_package]
        self._tip = self.combo.tooltip or ""
        self._show_card()

    def _choices(self, *_: Any) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        if self._none is not None:
            items.append((self._none, ""))
        items.append(("pretrained (shipped)", PRETRAINED))
        seen = set()
        paths = [p for p in [*self._browsed, *recent_models.paths()]
                 if not (p in seen or seen.add(p))]
        names = [Path(p).name for p in paths]
        for p, name in zip(paths, names, strict=True):
            if names.count(name) > 1:  # the same name in two folders: say which
                name = f"{Path(p).parent.name}/{name}"
            items.append((short_name(name), p))  # the full path: the tooltip
        return items

    def _show_path(self, *_: Any) -> None:
        v = self.value
        try:
            self.combo.tooltip = (self._tip if v in ("", PRETRAINED)
                                  else f"{v}\n\n{self._tip}")
        except RuntimeError:  # deleted
            pass

    def refresh(self) -> None:
        """Re-read the recent models (keeps the selection when it is still offered)."""
        try:
            self.combo.reset_choices()
        except RuntimeError:  # widget deleted
            return
        self._show_card()

    def _on_browse(self, value: Any) -> None:
        p = str(value)
        if p in ("", "."):
            return
        p = str(Path(p).expanduser().resolve())
        if p not in self._browsed:
            self._browsed.insert(0, p)
        self.combo.reset_choices()
        self.combo.value = p

    def _show_card(self, *_: Any) -> None:
        v = self.value
        self.card.set_message("a new model from random weights (pretraining)" if v == "" else
                              model_card(v))

    @property
    def value(self) -> str:
        """The chosen model."""
        v = self.combo.value
        return "" if v is None else str(v)

    @value.setter
    def value(self, v: str | os.PathLike) -> None:
        v = str(v)
        if v not in ("", PRETRAINED):
            v = str(Path(v).expanduser().resolve())
            if v not in self._browsed:
                self._browsed.insert(0, v)
            self.combo.reset_choices()
        self.combo.value = v
