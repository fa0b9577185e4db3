"""The Train dock: pretrain on a simulated dataset, or fine-tune on frames annotated in
napari (an Image layer + a Labels layer), with a live loss plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, FileEdit, LineEdit

from ...errors import ConfigError
from .._jobs import (
    annotations_can_resume,
    build_train_config,
    check_annotation_layers,
    finetune_layers_job,
    layer_sampling_A,
    train_job,
)
from .._workers import JobStage
from ._base import DEFOCUS_TIP, JobDock, LivePlot, WrapLabel, notify
from ._fields import choice_widget, field_info, float_widget, int_widget, widget_message
from ._models import PRETRAINED, ModelPicker, model_sampling_A, recent_models, resolve_model

if TYPE_CHECKING:
    import napari

FROM_FILE = "simulated dataset (.hspy)"
FROM_LAYERS = "image + labels layers"

TRAIN_LABELS = {
    "train_defocus_nm": "train defoci [nm]",
    "freeze": "freeze",
    "epochs": "epochs",
    "lr": "learning rate",
    "batch_size": "batch size",
    "n_train": "training images",
    "patch_size": "patch [px]",
    "device": "device",
    "seed": "seed",
    "init_from": "start from",
    "out": "output folder",
    "out_dir": "output folder",
}


def warm_optimizer() -> None:
    """One Adam step on a scalar: triggers torch's lazy imports of its first step."""
    import torch

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-3)
    (w * 2).sum().backward()
    opt.step()


def _max_zoom() -> float:
    """The segmentation core's limit on resampling (one policy, in SegmentConfig)."""
    from ...segmentation import SegmentConfig

    return float(SegmentConfig().max_zoom)


class LossPlot(LivePlot):
    """Training loss per step and per epoch, and validation loss, drawn live.

    A light Qt plot (not matplotlib): painting it costs about a millisecond, so per-step
    updates never stall napari's event loop while the training thread runs.
    """

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__(viewer, xlabel="epoch (loss on a log scale)", ylabel="BCE loss",
                         height=170, logy=True)
        self.steps = self.add_series("train (step)", color="text", alpha=0.45, width=1.0)
        self.train_epochs = self.add_series("train (epoch)", color="#1f77b4", marker=True,
                                            width=1.6)
        self.val_epochs = self.add_series("validation", color="#ff7f0e", marker=True,
                                          width=1.6)

    def add_step(self, epoch_position: float, loss: float) -> None:
        """Training loss of one step, at fractional epoch ``epoch_position``."""
        self.steps.append((float(epoch_position), float(loss)))
        self.update()

    def add_epoch(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """Mean training loss and validation loss after ``epoch`` (1-based)."""
        self.train_epochs.append((float(epoch), float(train_loss)))
        self.val_epochs.append((float(epoch), float(val_loss)))
        self.update()


class TrainWidget(JobDock):
    """Pretrain a U-Net on a simulated dataset, or fine-tune a model.

    Data: a simulated ``.hspy`` dataset, or an Image layer with a Labels layer painted on a
    few frames (any non-zero label = particle; frames with no painted pixel are not used).
    The model to start from is the shipped pretrained model by default. Stop ends the run
    after the current step and keeps a resumable checkpoint; the fine-tuned model appears in
    the Segment dock's model list at once.
    """

    job_title = "Training"
    prewarm_modules = ("torch", "dask.array", "scipy.ndimage", "hyperspy.api", "distributed",
                       "napari_hrtem_transfer.training.loop",
                       "napari_hrtem_transfer.evaluation.ood", warm_optimizer)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        from ...training import TrainConfig as T

        super().__init__(napari_viewer, "Train")
        self.source = ComboBox(label="data", choices=[("simulated .hspy", FROM_FILE),
                                                      ("image + labels", FROM_LAYERS)],
                               value=FROM_FILE,
                               tooltip="Train on a simulated dataset file, or on frames you "
                               "annotated in a Labels layer over an Image layer.")
        self.dataset = FileEdit(label="dataset (.hspy)", mode="r", filter="*.hspy", value="",
                                tooltip="Simulated dataset (e.g. from the Simulate widget).")
        self.image_layer = ComboBox(label="image layer", choices=self._image_layers,
                                    tooltip="The frames (one image, a stack or a series).")
        self.labels_layer = ComboBox(label="labels layer", choices=self._labels_layers,
                                     tooltip="Particles painted on some frames of the image "
                                     "(any label > 0 = particle; unpainted frames are skipped).")
        self.model = ModelPicker(label="start from", allow_none="none (random init)")
        self.model.value = PRETRAINED
        self.out_dir = FileEdit(label="output folder", mode="d", value="",
                                tooltip="Checkpoint folder (must be empty unless resuming); "
                                "empty: a new folder in your user data folder.")
        self.defocus_nm = LineEdit(
            label=TRAIN_LABELS["train_defocus_nm"], value="all",
            tooltip="Training domains: 'all' or defoci [nm] of the dataset, e.g. '-10, 10'. "
            + DEFOCUS_TIP,
        )
        self.freeze = choice_widget(T, "freeze", TRAIN_LABELS["freeze"])
        self.epochs = int_widget(T, "epochs", TRAIN_LABELS["epochs"])
        self.lr = float_widget(T, "lr", TRAIN_LABELS["lr"], decimals=6, value=0.0, min=0.0,
                               step=1e-4, tooltip="Adam learning rate; 0 = the stage's "
                               "default (1e-3 pretraining, 1e-4 fine-tuning, as the study).")
        self.batch_size = int_widget(T, "batch_size", TRAIN_LABELS["batch_size"])
        self.n_train = int_widget(T, "n_train", TRAIN_LABELS["n_train"], min=0,
                                  max=10**7, tooltip="Size of the training set; 0 = all.")
        self.patch_size = int_widget(T, "patch_size", TRAIN_LABELS["patch_size"], step=32,
                                     min=0)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"],
                               value=field_info(T, "device")["default"],
                               tooltip=field_info(T, "device")["description"])
        self.seed = int_widget(T, "seed", TRAIN_LABELS["seed"])
        self.resume = CheckBox(label="resume", value=False,
                               tooltip="Continue the stopped run in the output folder.")
        self.form.extend([self.source, self.dataset, self.image_layer, self.labels_layer,
                          *self.model.widgets, self.out_dir, self.defocus_nm, self.freeze,
                          self.epochs, self.lr, self.batch_size, self.n_train, self.patch_size,
                          self.device, self.seed, self.resume])
        self.add_row(self.model.card)
        self.add_job_rows()
        self.ood_status = WrapLabel("")
        self.add_row(self.ood_status)
        self.plot = LossPlot(napari_viewer)
        self.add_row(self.plot)
        self.result: Any = None
        self._last_step: Any = None
        self._start: Any = None
        self._t_start_pos = 0.0
        self._auto_out: str | None = None
        self.source.changed.connect(self._on_source)
        self._on_source(self.source.value)
        events = napari_viewer.layers.events
        events.inserted.connect(self._suggest_dataset)
        for ev in (events.inserted, events.removed):
            ev.connect(self._refresh_layers)
        for layer in napari_viewer.layers:
            self._suggest_dataset(layer=layer)

    # -- layers
    def _image_layers(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Image)]

    def _labels_layers(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Labels

        return [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Labels)]

    def _refresh_layers(self, *_: Any) -> None:
        if self.closed:
            return
        self.image_layer.reset_choices()
        self.labels_layer.reset_choices()

    def _on_source(self, value: str) -> None:
        layers = value == FROM_LAYERS
        for w in (self.image_layer, self.labels_layer):
            w.visible = layers
        for w in (self.dataset, self.defocus_nm, self.n_train):
            w.visible = not layers
        # batch size, patch and seed are used in both modes (passed on to the core)
        self.resume.visible = self.resume_offered()
        if layers and self.freeze.value == "none":
            self.freeze.value = "encoder"  # a few annotated frames: keep the features

    def resume_offered(self) -> bool:
        """Whether the form offers 'resume' (always with a dataset; with layers when the
        core can resume a fine-tuning on annotated frames)."""
        return self.source.value != FROM_LAYERS or self._layers_can_resume()

    def _layers_can_resume(self) -> bool:
        try:
            return annotations_can_resume()
        except Exception:  # noqa: BLE001 - the core's API decides; without it no resume
            return False

    def _suggest_dataset(self, event: Any = None, layer: Any = None) -> None:
        """Fill in the dataset file of a simulated series opened in the viewer."""
        layer = layer if layer is not None else getattr(event, "value", None)
        meta = getattr(layer, "metadata", None) or {}
        path = meta.get("path")
        if (meta.get("kind") == "simulated" and path and str(path).endswith(".hspy")
                and str(self.dataset.value) in ("", ".")):
            self.dataset.value = path

    # -- config
    def _init_from(self) -> str | None:
        v = self.model.value
        if v == "":
            return None
        path = resolve_model(v)
        if path is None:
            raise ConfigError("the shipped pretrained model is not available in this "
                              "installation. Fix: choose 'none (pretrain …)' or a trained "
                              "model folder in 'start from'.", "init_from")
        return str(path)

    def config(self) -> Any:
        """The :class:`~napari_hrtem_transfer.training.TrainConfig` of the form (dataset)."""
        try:
            return build_train_config(
                init_from=self._init_from(),
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
        except ConfigError as exc:
            raise ConfigError(widget_message(str(exc), TRAIN_LABELS, exc.field),
                              exc.field) from exc

    def _out_dir(self, default_name: str) -> str:
        """The output folder: the user's, else a new one in the user data folder.

        A folder this dock chose for an earlier run is replaced by a new one unless the run
        is resumed (so Train after a finished run never meets a non-empty folder).
        """
        out = str(self.out_dir.value)
        resuming = bool(self.resume.value) and self.resume_offered()
        if out not in ("", ".") and (out != self._auto_out or resuming):
            return out
        from platformdirs import user_data_dir

        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = Path(user_data_dir("napari-hrtem-transfer")) / "models"
        path = root / f"{default_name}-{stamp}"
        k = 1
        while path.exists():
            k += 1
            path = root / f"{default_name}-{stamp}-{k}"
        self.out_dir.value = path
        self._auto_out = str(path)
        return str(path)

    def _check_resume_folder(self, out: str) -> None:
        if not (Path(out) / "last.json").is_file():
            raise ConfigError(f"'resume': {out} holds no stopped run (no last.json). Fix: "
                              "pick the stopped run's folder in 'output folder', or untick "
                              "'resume'.", "resume")

    def _prepare(self) -> tuple[Any, tuple, dict]:
        if self.source.value == FROM_LAYERS:
            job = self._prepare_layers()
        else:
            data = str(self.dataset.value)
            if data in ("", ".") or not Path(data).is_file():
                raise ConfigError(f"'dataset (.hspy)': choose an existing dataset file; got "
                                  f"'{data}'. Fix: simulate one in the Simulate dock (save "
                                  "as …) or pick image + labels layers as data.", "dataset")
            config = self.config()
            out = self._out_dir(Path(data).stem)
            if self.resume.value:
                self._check_resume_folder(out)
            job = (train_job, (config, data, out), {"resume": self.resume.value})
        self.plot.clear()
        self.result = None
        self._last_step = None
        self._start = None
        self.ood_status.set_message("")
        self.device_label.set_message("")
        return job

    def _prepare_layers(self) -> tuple[Any, tuple, dict]:
        image, labels = self.image_layer.value, self.labels_layer.value
        if image is None:
            raise ConfigError("'image layer': add or open the image you annotated.", "image")
        if labels is None:
            raise ConfigError("'labels layer': add a Labels layer over the image (Layers > New "
                              "Labels layer) and paint particles on a few frames.", "labels")
        if getattr(image, "rgb", False):
            raise ConfigError(f"'image layer': '{image.name}' is RGB; use a grey-level image.",
                              "image")
        check_annotation_layers(image.data, labels.data)
        model = self.model.value
        if model == "":
            raise ConfigError("'start from': fine-tuning on annotated frames needs a model to "
                              "start from (the shipped pretrained model or a trained one).",
                              "init_from")
        if model == PRETRAINED and resolve_model(model) is None:
            self._init_from()  # raises the clear message
        sampling = layer_sampling_A(image)
        model_s = model_sampling_A(model)
        if sampling is None:
            notify("warning", f"'{image.name}' has no pixel size; assuming the model's "
                   f"({model_s:g} Å/px)." if model_s else f"'{image.name}' has no pixel size.")
            sampling = model_s
        elif model_s and max(sampling / model_s, model_s / sampling) > _max_zoom():
            raise ConfigError(
                f"'image layer': its pixel size {sampling:.3g} Å differs from the model's "
                f"{model_s:.3g} Å by more than {_max_zoom():g}x. Fix: check the image's "
                "calibration (layer scale, in nm) or start from a model trained near this "
                "pixel size.", "image")
        out = self._out_dir(f"finetuned-{image.name}".replace(" ", "_"))
        resume = bool(self.resume.value) and self.resume_offered()
        if resume:
            self._check_resume_folder(out)
        elif Path(out).is_dir() and any(Path(out).iterdir()):
            raise ConfigError(f"'output folder': {out} is not empty. Fix: choose an empty or "
                              "new folder (or clear the field: a new one is made); nothing "
                              "was overwritten.", "out_dir")
        return finetune_layers_job, (image.data, labels.data), {
            "model": str(resolve_model(model)) if model != PRETRAINED else PRETRAINED,
            "out_dir": out, "sampling_A": sampling, "freeze": self.freeze.value,
            "epochs": self.epochs.value, "lr": self.lr.value or None,
            "device": self.device.value, "batch_size": self.batch_size.value,
            "patch_size": self.patch_size.value or None, "seed": self.seed.value,
            "resume": resume,
        }

    # -- updates
    def on_other(self, update: Any) -> None:  # noqa: D102
        kind = type(update).__name__
        if kind == "TrainStart":
            self._start = update
            self._t_start_pos = update.start_epoch + update.start_step / max(
                1, update.steps_per_epoch)
            self.set_status(
                f"{update.stage}: {update.n_train_images} images, {update.n_epochs} epochs, "
                f"{update.steps_per_epoch} steps each ({update.precision})")
            dev = self.device_label.value or f"device: {update.device}"
            self.device_label.set_message(f"{dev} · {update.precision}")
            self.device_label.setVisible(True)
        elif kind == "StepUpdate":
            self._last_step = update
            n_steps = max(1, int(update.n_steps))
            pos = update.epoch + (update.step + 1) / n_steps
            self.plot.add_step(pos, float(update.loss))
            self.set_fraction(pos / max(1, update.n_epochs),
                              eta=(pos - self._t_start_pos) / max(
                                  1e-9, update.n_epochs - self._t_start_pos))
            self.set_status(
                f"epoch {update.epoch + 1} of {update.n_epochs}, step {update.step + 1} of "
                f"{n_steps}: loss {update.loss:.4f}")
        elif kind == "EpochUpdate":
            self.plot.add_epoch(update.epoch + 1, float(update.train_loss),
                                float(update.val_loss_own))
            self.set_status(
                f"epoch {update.epoch + 1} of {update.n_epochs}: train {update.train_loss:.4f}, "
                f"validation {update.val_loss_own:.4f}" + (" (best)" if update.is_best else ""))
        elif kind == "TrainResult":
            self.result = update
            self._show_result(update)

    def on_stage(self, stage: JobStage) -> None:  # noqa: D102
        super().on_stage(stage)
        if stage.name != "ood":
            return
        text = {"running": "OOD reference: fitting… ", "done": "OOD reference: ",
                "skipped": "OOD reference: ", "failed": "OOD reference failed: "}[stage.state]
        self.ood_status.set_message(text + stage.message)
        if stage.state == "running":
            self.progress.setFormat("training done · fitting the OOD reference")
            self.set_status("training done; fitting the OOD reference (label-free scores)…")
        elif stage.state == "failed":
            notify("warning", stage.message)

    def _show_result(self, result: Any) -> None:
        n = result.epochs_completed
        total = self._start.n_epochs if self._start is not None else n
        best = (f"; best epoch {result.best_epoch + 1} (validation {result.best_val_loss:.4f})"
                if result.best_epoch is not None else "")
        if result.stopped:
            st = self._last_step
            where = (f"epoch {st.epoch + 1} of {st.n_epochs} (after step {st.step + 1} of "
                     f"{st.n_steps})" if st is not None else f"epoch {n + 1} of {total}")
            self.state = "stopped"
            self.progress.setFormat(f"stopped at {where.split(' (')[0]}")
            if self.resume_offered():
                how = (f"A resumable checkpoint is in {result.out_dir}: tick 'resume' (the "
                       "output folder is kept) and Train to continue.")
            else:
                how = (f"The checkpoint so far is in {result.out_dir}; fine-tuning on layers "
                       "cannot be resumed here: Train again starts a new run in a new folder.")
            self.set_status(f"stopped at {where}; {n} epoch(s) completed{best}. {how}")
        else:
            self.set_fraction(1.0)
            self.set_status(f"finished {n} epoch(s){best}.")
        self._result_text = self.status.value

    def on_done(self, result: Any) -> None:  # noqa: D102
        self.result = result
        out = Path(result.out_dir)
        if result.stopped:
            self.state = "stopped"
            notify("info", f"Training stopped; {'resumable ' if self.resume_offered() else ''}"
                   f"checkpoint in {out}")
            return
        self.resume.value = False  # a finished run has nothing to resume
        if (out / "best.json").is_file():
            recent_models.add(out)
            self.model.refresh()
        self.progress.setFormat("%p%")
        self.set_status(f"{getattr(self, '_result_text', 'finished.')} Model in {out}; it is "
                        "offered in Segment's model list.")
        notify("info", f"Training finished: model in {out}")
