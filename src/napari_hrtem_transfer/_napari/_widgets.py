"""Dock widgets: simulate a defocus series, train / fine-tune a U-Net, segment images.

Each widget is a thin magicgui ``Container`` over a plain job in :mod:`._jobs`; jobs run
in napari thread workers (:mod:`._workers`) and report typed progress updates; any
error becomes a napari notification, never a crash.

Defocus sign everywhere: abTEM's, ``defocus = -C10``; positive defocus = underfocus.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)

from ._jobs import (
    SegmentationResult,
    build_simulation_config,
    build_train_config,
    layer_sampling_A,
    segment_job,
    simulate_job,
    train_job,
)
from ._workers import JobDone, JobFailed, JobProgress, start_worker

if TYPE_CHECKING:
    import napari

DEFOCUS_TIP = "abTEM sign convention: defocus = -C10; positive = underfocus, negative = overfocus."


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning}.get(
        kind, notifications.show_info
    )(message)


def _add_layer_data(viewer: napari.Viewer, layers: list[tuple]) -> list[Any]:
    added = []
    for data, kwargs, layer_type in layers:
        add = getattr(viewer, f"add_{layer_type}")
        added.append(add(data, **kwargs))
    return added


class _JobWidget(Container):
    """Shared plumbing: a run button, a progress bar, a status line and one worker."""

    def __init__(self, viewer: napari.Viewer, run_text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._viewer = viewer
        self._worker: Any = None
        self.run_button = PushButton(text=run_text)
        self.progress = ProgressBar(min=0, max=1000, value=0, label="progress")
        self.status = Label(value="")
        self.run_button.changed.connect(self._start)
        #: the last job's outcome: JobDone or JobFailed (for scripts and tests)
        self.last_outcome: JobDone | JobFailed | None = None

    @property
    def running(self) -> bool:
        """Whether a job is running."""
        return self._worker is not None

    def _start(self) -> None:
        if self.running:
            return
        try:
            job, args, kwargs = self._prepare()
        except Exception as exc:  # noqa: BLE001 - bad input becomes a notification
            self.status.value = f"error: {exc}"
            _notify("error", str(exc))
            return
        self.last_outcome = None
        self.progress.value = 0
        self.run_button.enabled = False
        self._worker = start_worker(
            job, *args, on_update=self._on_update, on_finished=self._on_finished, **kwargs
        )

    def _prepare(self) -> tuple[Any, tuple, dict]:
        raise NotImplementedError

    def _on_update(self, update: Any) -> None:
        if isinstance(update, JobProgress):
            self.progress.value = int(round(1000 * update.fraction))
            if update.message:
                self.status.value = update.message
        elif isinstance(update, JobFailed):
            self.last_outcome = update
            self.status.value = f"failed: {update.message}"
            _notify("error", update.message)
        elif isinstance(update, JobDone):
            self.last_outcome = update
            self.progress.value = 1000
            try:
                self._on_done(update.result)
            except Exception as exc:  # noqa: BLE001 - keep napari alive
                self.last_outcome = JobFailed(exc)
                self.status.value = f"failed: {exc}"
                _notify("error", str(exc))
        else:
            self._on_other(update)

    def _on_other(self, update: Any) -> None:
        """Job-specific updates (training records)."""

    def _on_done(self, result: Any) -> None:
        raise NotImplementedError

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled = True


# ----------------------------------------------------------------------------- simulate


class SimulateWidget(_JobWidget):
    """Simulate a labelled HRTEM defocus series with abTEM and add it as layers.

    Adds the images (defocus, image, y, x) and the ground-truth masks (Labels), with the
    defocus axis in nm (abTEM sign: positive = underfocus) and the pixel size in nm.
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        from ..simulate import MATERIALS, PRESETS

        super().__init__(napari_viewer, "Simulate")
        self.preset = ComboBox(
            label="preset", choices=list(PRESETS), value="laptop",
            tooltip="laptop: 256 px, 2 phonons (seconds per structure); "
            "study: the published settings (512 px, 8 phonons; slow on a CPU).",
        )
        self.material = ComboBox(label="material", choices=list(MATERIALS), value="CdSe",
                                 tooltip="Particle lattice.")
        self.n_structures = SpinBox(label="structures", min=1, max=100_000, value=4,
                                    tooltip="Number of structures (images per defocus).")
        self.defocus_nm = LineEdit(
            label="defoci [nm]", value="-10, -5, 0, 5, 10",
            tooltip="Nominal defoci [nm], separated by commas. " + DEFOCUS_TIP,
        )
        self.dose = FloatSpinBox(
            label="dose [e/Å²]", min=0.0, max=1e7, step=10.0, value=400.0,
            tooltip="Electron dose [e/Å²] for Poisson noise; 0 = noise-free intensities.",
        )
        self.image_size = SpinBox(label="image size [px]", min=0, max=4096, value=0,
                                  tooltip="Image side [px]; 0 keeps the preset's.")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0,
                            tooltip="Master seed; the same seed gives the same images.")
        self.save_path = FileEdit(
            label="save as", mode="w", filter="*.hspy", value="",
            tooltip="Optional: also write the dataset to this .hspy file (needed to train on it).",
        )
        self.extend([self.preset, self.material, self.n_structures, self.defocus_nm, self.dose,
                     self.image_size, self.seed, self.save_path, self.run_button, self.progress,
                     self.status])
        self.added_layers: list[Any] = []
        self._presets = PRESETS
        self.preset.changed.connect(self._apply_preset)

    def _apply_preset(self, name: str) -> None:
        """Show the preset's defoci in the form (the user may edit them afterwards)."""
        defoci = self._presets.get(name, {}).get("defocus_nm")
        if defoci:
            self.defocus_nm.value = ", ".join(f"{d:g}" for d in defoci)

    def config(self) -> Any:
        """The :class:`~napari_hrtem_transfer.simulate.SimulationConfig` of the form."""
        return build_simulation_config(
            preset=self.preset.value,
            material=self.material.value,
            n_structures=self.n_structures.value,
            defocus_nm=self.defocus_nm.value,
            dose_e_per_A2=self.dose.value or None,
            seed=self.seed.value,
            image_size_px=self.image_size.value or None,
        )

    def _prepare(self) -> tuple[Any, tuple, dict]:
        config = self.config()
        save = str(self.save_path.value) if str(self.save_path.value) not in ("", ".") else None
        return simulate_job, (config,), {"save_path": save}

    def _on_done(self, layers: list[tuple]) -> None:
        self.added_layers = _add_layer_data(self._viewer, layers)
        self.status.value = f"added {len(self.added_layers)} layer(s)"


# ----------------------------------------------------------------------------- train


class LossPlot:
    """A small matplotlib plot of training (per step and epoch) and validation loss."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.5, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        self.ax = self.figure.add_subplot(111)
        self.steps: list[tuple[float, float]] = []
        self.train_epochs: list[tuple[float, float]] = []
        self.val_epochs: list[tuple[float, float]] = []
        self._draw()

    def clear(self) -> None:
        """Forget all points."""
        self.steps.clear()
        self.train_epochs.clear()
        self.val_epochs.clear()
        self._draw()

    def add_step(self, epoch_position: float, loss: float) -> None:
        """Training loss of one step, at fractional epoch ``epoch_position``."""
        self.steps.append((epoch_position, loss))

    def add_epoch(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """Mean training loss and validation loss (training domains) after ``epoch`` (1-based)."""
        self.train_epochs.append((float(epoch), train_loss))
        self.val_epochs.append((float(epoch), val_loss))
        self._draw()

    def _draw(self) -> None:
        ax = self.ax
        ax.clear()
        for pts, style, label in (
            (self.steps, dict(color="0.7", lw=0.8), "train (step)"),
            (self.train_epochs, dict(color="C0", marker="o"), "train (epoch)"),
            (self.val_epochs, dict(color="C1", marker="s"), "validation"),
        ):
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, label=label, **style)
        ax.set_xlabel("epoch")
        ax.set_ylabel("BCE loss")
        if self.steps or self.val_epochs:
            ax.legend(fontsize=7)
        self.canvas.draw_idle()


class TrainWidget(_JobWidget):
    """Pretrain a U-Net on a simulated dataset, or fine-tune a checkpoint.

    Leave "start from" empty to pretrain; pick a checkpoint folder to fine-tune it (the
    study fine-tunes with a learning rate of 1e-4 and 64-512 images). The Stop button ends
    the run after the current step and keeps a resumable checkpoint.
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer, "Train")
        self.dataset = FileEdit(label="dataset (.hspy)", mode="r", filter="*.hspy", value="",
                                tooltip="Simulated dataset (e.g. from the Simulate widget).")
        self.out_dir = FileEdit(label="output folder", mode="d", value="",
                                tooltip="Checkpoint folder (must be empty unless resuming).")
        self.init_from = FileEdit(label="start from (fine-tune)", mode="d", value="",
                                  tooltip="Checkpoint folder to fine-tune; empty = pretrain.")
        self.defocus_nm = LineEdit(
            label="train defoci [nm]", value="all",
            tooltip="Training domains: 'all' or defoci [nm] of the dataset, e.g. '-10, 10'. "
            + DEFOCUS_TIP,
        )
        self.freeze = ComboBox(label="freeze", choices=["none", "encoder", "decoder", "gradual"],
                               value="none", tooltip="Fine-tuning only: parts kept frozen.")
        self.epochs = SpinBox(label="epochs", min=1, max=100_000, value=10)
        self.lr = FloatSpinBox(
            label="learning rate (0=auto)", min=0.0, max=1.0, step=1e-4, value=0.0,
            tooltip="Adam learning rate; 0 = default (1e-3 pretrain, 1e-4 fine-tune).",
        )
        self.lr.native.setDecimals(6)
        self.batch_size = SpinBox(label="batch size", min=1, max=4096, value=16)
        self.n_train = SpinBox(label="training images", min=0, max=10**7, value=0,
                               tooltip="Size of the training set; 0 = all.")
        self.patch_size = SpinBox(label="patch [px]", min=0, max=8192, step=32, value=256,
                                  tooltip="Random crop side, multiple of 32; 0 = whole images.")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"],
                               value="auto")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.resume = CheckBox(label="resume", value=False,
                               tooltip="Continue the run in the output folder.")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.stop_button.changed.connect(self.stop)
        self.plot = LossPlot()
        self.extend([self.dataset, self.out_dir, self.init_from, self.defocus_nm, self.freeze,
                     self.epochs, self.lr, self.batch_size, self.n_train, self.patch_size,
                     self.device, self.seed, self.resume, self.run_button, self.stop_button,
                     self.progress, self.status])
        self.native.layout().addWidget(self.plot.canvas)
        self._stop = threading.Event()
        self._steps_per_epoch = 1
        self._n_epochs = 1
        self.result: Any = None
        # closing the widget (or napari) stops a running training cleanly
        self.native.destroyed.connect(self._stop.set)
        napari_viewer.layers.events.inserted.connect(self._suggest_dataset)
        for layer in napari_viewer.layers:
            self._suggest_dataset(layer=layer)

    def _suggest_dataset(self, event: Any = None, layer: Any = None) -> None:
        """Fill in the dataset file of a simulated series opened in the viewer."""
        layer = layer if layer is not None else getattr(event, "value", None)
        meta = getattr(layer, "metadata", None) or {}
        path = meta.get("path")
        if (
            meta.get("kind") == "simulated"
            and path
            and str(path).endswith(".hspy")
            and str(self.dataset.value) in ("", ".")
        ):
            self.dataset.value = path

    def config(self) -> Any:
        """The :class:`~napari_hrtem_transfer.training.TrainConfig` of the form."""
        init = str(self.init_from.value)
        return build_train_config(
            init_from=init if init not in ("", ".") else None,
            train_defocus_nm=self.defocus_nm.value,
            freeze=self.freeze.value,
            epochs=self.epochs.value,
            lr=self.lr.value or None,
            batch_size=self.batch_size.value,
            n_train=self.n_train.value or None,
            patch_size=self.patch_size.value or None,
            device=self.device.value,
            seed=self.seed.value,
        )

    def _prepare(self) -> tuple[Any, tuple, dict]:
        from ..errors import ConfigError

        config = self.config()
        data = str(self.dataset.value)
        out = str(self.out_dir.value)
        if data in ("", ".") or not Path(data).is_file():
            raise ConfigError(f"choose an existing dataset file (.hspy); got '{data}'", "dataset")
        if out in ("", "."):
            raise ConfigError("choose an output folder for the checkpoints", "out_dir")
        self._stop.clear()
        self.plot.clear()
        self.result = None
        self.stop_button.enabled = True
        return train_job, (config, data, out), {"stop": self._stop, "resume": self.resume.value}

    def stop(self) -> None:
        """Ask the running training to stop after the current step."""
        if self.running:
            self._stop.set()
            self.status.value = "stopping after this step..."

    def _on_other(self, update: Any) -> None:
        kind = type(update).__name__
        if kind == "TrainStart":
            self._steps_per_epoch = max(1, int(update.steps_per_epoch))
            self._n_epochs = max(1, int(update.n_epochs))
            self.status.value = (
                f"{update.stage}: {update.n_train_images} images, {update.n_epochs} epochs on "
                f"{update.device} ({update.precision})"
            )
        elif kind == "StepUpdate":
            n_steps = max(1, int(update.n_steps))
            pos = update.epoch + (update.step + 1) / n_steps
            self.plot.add_step(pos, float(update.loss))
            self.progress.value = int(round(1000 * pos / max(1, update.n_epochs)))
            self.status.value = (
                f"epoch {update.epoch + 1}/{update.n_epochs}, step {update.step + 1}/{n_steps}: "
                f"loss {update.loss:.4f}"
            )
        elif kind == "EpochUpdate":
            self.plot.add_epoch(update.epoch + 1, float(update.train_loss),
                                float(update.val_loss_own))
            self.status.value = (
                f"epoch {update.epoch + 1}/{update.n_epochs}: train {update.train_loss:.4f}, "
                f"validation {update.val_loss_own:.4f}" + (" (best)" if update.is_best else "")
            )
        elif kind == "TrainResult":
            self.result = update

    def _on_done(self, result: Any) -> None:
        self.result = result
        what = "stopped" if result.stopped else "finished"
        best = (
            f"; best epoch {result.best_epoch + 1} (validation {result.best_val_loss:.4f})"
            if result.best_epoch is not None else ""
        )
        self.status.value = f"{what} after {result.epochs_completed} epoch(s){best}"
        _notify("info", f"Training {what}: checkpoints in {result.out_dir}")

    def _on_finished(self) -> None:
        super()._on_finished()
        self.stop_button.enabled = False


# ----------------------------------------------------------------------------- segment


class SegmentWidget(_JobWidget):
    """Segment an image layer with a trained checkpoint; add a Labels layer.

    The image is resampled to the model's pixel size when its calibration differs. If the
    model folder holds an OOD reference, each frame also gets an out-of-distribution
    score (about 0 for training-like frames, growing with the distance from training).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer, "Segment")
        self.image = ComboBox(label="image", choices=self._image_layers,
                              tooltip="Image layer to segment (all frames).")
        self.model_dir = FileEdit(label="model folder", mode="d", value="",
                                  tooltip="Checkpoint folder written by training.")
        self.which = ComboBox(label="checkpoint", choices=["best", "last"], value="best")
        self.threshold = FloatSpinBox(label="threshold", min=0.01, max=0.99, step=0.05,
                                      value=0.5, tooltip="Probability above which a pixel "
                                      "is labelled particle.")
        self.add_proba = CheckBox(label="add probability map", value=False)
        self.ood_label = Label(value="")
        self.extend([self.image, self.model_dir, self.which, self.threshold, self.add_proba,
                     self.run_button, self.progress, self.status, self.ood_label])
        events = napari_viewer.layers.events
        events.inserted.connect(self._refresh)
        events.removed.connect(self._refresh)
        events.reordered.connect(self._refresh)
        self.result: SegmentationResult | None = None
        self.added_layers: list[Any] = []
        self._source: Any = None

    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _refresh(self, _event: Any = None) -> None:
        self.image.reset_choices()

    def _prepare(self) -> tuple[Any, tuple, dict]:
        from ..errors import ConfigError

        layer = self.image.value
        if layer is None:
            raise ConfigError("add or open an image layer to segment", "image")
        if getattr(layer, "rgb", False):
            raise ConfigError(f"layer '{layer.name}' is RGB; segment a grey-level image", "image")
        model = str(self.model_dir.value)
        if model in ("", "."):
            raise ConfigError("choose the model folder (a training checkpoint)", "model_dir")
        self._source = layer
        self.ood_label.value = ""
        return segment_job, (np.asarray(layer.data), model), {
            "sampling_A": layer_sampling_A(layer),
            "threshold": self.threshold.value,
            "which": self.which.value,
        }

    def _on_done(self, result: SegmentationResult) -> None:
        self.result = result
        src = self._source
        common = {
            "scale": tuple(src.scale),
            "translate": tuple(src.translate),
            "units": tuple(str(u) for u in src.units),
            "axis_labels": tuple(src.axis_labels),
        }
        meta = {
            "source_layer": src.name,
            "model_dir": str(self.model_dir.value),
            "threshold": self.threshold.value,
            "model_sampling_A": result.model_sampling_A,
            "notes": list(result.notes),
            "ood_score": None if result.ood_score is None else result.ood_score.tolist(),
        }
        self.added_layers = [
            self._viewer.add_labels(result.labels, name=f"{src.name} segmentation",
                                    metadata=meta, opacity=0.5, **common)
        ]
        if self.add_proba.value:
            self.added_layers.append(
                self._viewer.add_image(result.proba, name=f"{src.name} probability",
                                       colormap="magma", blending="additive",
                                       contrast_limits=(0.0, 1.0), metadata=meta, **common)
            )
        self.ood_label.value = format_ood(result.ood_score) if result.ood_score is not None else (
            next((n for n in result.notes if n.startswith("no OOD score")), "")
        )
        frac = float(result.labels.mean()) if result.labels.size else 0.0
        self.status.value = f"done: {100 * frac:.1f}% of pixels labelled particle"
        for note in result.notes:
            if note.startswith("resampled") or "differs" in note or "no pixel size" in note:
                _notify("info", note)


def format_ood(scores: np.ndarray, max_lines: int = 12) -> str:
    """Readable per-frame OOD scores (0 ~ training-like; 1 = twice as far as typical)."""
    scores = np.asarray(scores, dtype=float).reshape(-1)
    lines = ["OOD score per frame (0 ≈ like training, larger = further away):"]
    for i, s in enumerate(scores[:max_lines]):
        lines.append(f"  frame {i}: {s:+.2f}")
    if scores.size > max_lines:
        lines.append(f"  ... {scores.size - max_lines} more; median {np.median(scores):+.2f}, "
                     f"max {scores.max():+.2f}")
    return "\n".join(lines)
