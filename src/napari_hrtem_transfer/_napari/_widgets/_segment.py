"""The Segment dock: a thin caller of the segmentation core; results become layers, with
the per-frame OOD scores in the Labels layer's features and in the OOD dock."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox

from ...errors import ConfigError
from .._jobs import (
    axes_from_layer,
    layer_sampling_A,
    result_frame_table,
    segment_job,
)
from ._base import JobDock, WrapLabel, notify
from ._models import PRETRAINED, ModelPicker, recent_models, resolve_model
from ._ood import ESTIMATED, REASON_SEP

if TYPE_CHECKING:
    import napari

#: Colour of segmented particles (every frame's label value gets it).
PARTICLE_COLOR = "cyan"


def _threshold_default() -> float:
    try:
        from ...segmentation import SegmentConfig

        return float(SegmentConfig.model_fields["threshold"].default)
    except Exception:  # noqa: BLE001 - the core's default when it exists
        return 0.5


def frame_labels(labels: np.ndarray) -> np.ndarray:
    """Particle masks numbered by frame: value ``k + 1`` on the particles of flat frame ``k``
    (so hovering a particle shows its frame's row of the layer's features)."""
    lab = np.asarray(labels)
    nav = lab.shape[:-2]
    n = int(np.prod(nav)) if nav else 1
    dtype = np.uint8 if n < 255 else np.uint16 if n < 65535 else np.uint32
    numbers = (np.arange(n, dtype=dtype) + 1).reshape(*nav, 1, 1) if nav else dtype(1)
    return (lab > 0).astype(dtype) * numbers


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """One frame's row with plain cells: a dict (e.g. the OOD score's components) becomes
    ``<key>_<part>`` columns; lists other than ``reasons`` become text."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for part, x in v.items():
                out[f"{k}_{part}"] = x
        elif isinstance(v, list | tuple) and k != "reasons":
            out[k] = ", ".join(str(x) for x in v)
        else:
            out[k] = v
    return out


def features_table(result: Any) -> Any:
    """The Labels layer's features: one row per frame (``index`` = its label value)."""
    import pandas as pd

    rows = [_flat_row(r) for r in result_frame_table(result)]
    table = pd.DataFrame(rows)
    table = table.rename(columns={"index": "frame"})
    table.insert(0, "index", table["frame"].astype(int) + 1)
    if "ood_score" not in table:
        table["ood_score"] = np.nan
        table["caution"] = False
    table["ood_score"] = pd.to_numeric(table["ood_score"], errors="coerce").astype(float)
    if ESTIMATED in table:  # float or None per frame -> float (nan: no estimate)
        table[ESTIMATED] = pd.to_numeric(table[ESTIMATED], errors="coerce").astype(float)
    if "reasons" in table:  # a list of words per frame -> one string per cell
        table["reasons"] = [
            REASON_SEP.join(str(x) for x in r) if isinstance(r, list | tuple) else
            ("" if r is None or (isinstance(r, float) and r != r) else str(r))
            for r in table["reasons"]]
    return table


def _imaging_domain(result: Any) -> dict[str, Any] | None:
    """The model's imaging domain (training defocus range [nm], energy [eV], Cs [mm],
    pixel size [Å]) as plain JSON values, when the result carries one."""
    dom = getattr(result, "imaging_domain", None)
    if not dom:
        return None
    out: dict[str, Any] = {}
    for k, v in dict(dom).items():
        if isinstance(v, list | tuple | np.ndarray):
            out[k] = [float(x) for x in v]
        elif isinstance(v, int | float | np.floating | np.integer):
            out[k] = float(v)
        else:
            out[k] = v
    return out


class SegmentWidget(JobDock):
    """Segment an image layer with a model; add a Labels layer (and the probabilities).

    The model is the shipped pretrained model by default, or one trained in napari or picked
    from disk (its card shows what it was trained on). Each frame gets a label-free OOD
    score when the model carries an OOD reference: in the Labels layer's features (with the
    frame's defocus in nm and other coordinates), in the "OOD per frame" dock and on the
    canvas.
    """

    job_title = "Segmentation"
    prewarm_modules = ("torch", "napari_hrtem_transfer.segmentation")

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer, "Segment")
        self.image = ComboBox(label="image", choices=self._image_layers,
                              tooltip="Image layer to segment (all frames).")
        self.model = ModelPicker(label="model")
        if resolve_model(PRETRAINED) is None and recent_models.paths():
            self.model.value = recent_models.paths()[0]
        else:
            self.model.value = PRETRAINED
        self.which = ComboBox(label="checkpoint", choices=["best", "last"], value="best")
        self.threshold = FloatSpinBox(label="threshold", min=0.01, max=0.99, step=0.05,
                                      value=_threshold_default(),
                                      tooltip="Probability above which a pixel is particle.")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"],
                               value="auto")
        self.add_proba = CheckBox(label="add probability map", value=False)
        self.show_ood = CheckBox(label="show OOD dock", value=True,
                                 tooltip="Open the per-frame OOD plot and ranking after "
                                 "segmenting a stack.")
        self.rescore = CheckBox(label="re-segment after fine-tuning", value=True,
                                tooltip="When a model is fine-tuned in the Train dock, segment "
                                "the last segmented image again with it (new OOD scores).")
        self.form.extend([self.image, *self.model.widgets, self.which, self.threshold,
                          self.device, self.add_proba, self.show_ood, self.rescore])
        self.add_row(self.model.card)
        self.add_job_rows()
        self.ood_label = WrapLabel("")
        self.add_row(self.ood_label)
        events = napari_viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh)
        self.result: Any = None
        self.added_layers: list[Any] = []
        self.ood_view: Any = None
        self._source: Any = None
        recent_models.changed.connect(self._on_new_model)

    def _on_new_model(self) -> None:
        """A model was just trained: pick it, and re-score the last segmented image."""
        if self.closed or not recent_models.paths():
            return
        try:
            self.model.value = recent_models.paths()[0]
        except RuntimeError:  # deleted
            return
        src = self._source
        if (self.rescore.value and self.result is not None and not self.running
                and src is not None and src in self._viewer.layers):
            self.image.value = src
            self.start()

    def _image_layers(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Image)]

    def _refresh(self, *_: Any) -> None:
        if not self.closed:
            self.image.reset_choices()

    def _prepare(self) -> tuple[Any, tuple, dict]:
        layer = self.image.value
        if layer is None:
            raise ConfigError("'image': add or open an image layer to segment.", "image")
        if getattr(layer, "rgb", False):
            raise ConfigError(f"'image': layer '{layer.name}' is RGB; segment a grey-level "
                              "image (convert it, or open the original file).", "image")
        model = self.model.value
        path = resolve_model(model)
        if path is None:
            raise ConfigError("'model': the shipped pretrained model is not available in this "
                              "installation. Fix: train one in the Train dock or pick a model "
                              "folder with 'browse model'.", "model")
        if model != PRETRAINED and not (path / "ood_reference.json").is_file():
            notify("warning", f"model {path.name} has no OOD reference: frames get no OOD "
                   "score. Fix: fine-tune it in the Train dock (the reference is fitted at the "
                   "end) or fit one with napari_hrtem_transfer.evaluation.fit_ood_reference.")
        self._source = layer
        self.ood_label.set_message("")
        self.device_label.set_message("")
        return segment_job, (layer.data, model if model == PRETRAINED else str(path)), {
            "sampling_A": layer_sampling_A(layer),
            "axes": axes_from_layer(layer),
            "threshold": self.threshold.value,
            "which": self.which.value,
            "device": self.device.value,
        }

    def on_done(self, result: Any) -> None:
        """Add the Labels layer (frame-numbered particles, per-frame features) and the OOD
        view."""
        from napari.utils.colormaps import DirectLabelColormap

        self.result = result
        src = self._source
        common = {
            "scale": tuple(src.scale),
            "translate": tuple(src.translate),
            "units": tuple(str(u) for u in src.units),
            "axis_labels": tuple(src.axis_labels),
        }
        labels = np.asarray(result.labels)
        nav_shape = labels.shape[:-2]
        features = features_table(result)
        axes = getattr(result, "axes", None) or axes_from_layer(src)
        caution = getattr(result, "ood_caution", None)
        meta = {
            "source_layer": src.name,
            "model": self.model.value,
            "threshold": self.threshold.value,
            "model_sampling_A": getattr(result, "model_sampling_A", None),
            "notes": list(getattr(result, "notes", [])),
            "provenance": dict(getattr(result, "provenance", {}) or {}),
            "label_values": "particles of flat frame k have the value k + 1",
            "ood": {"nav_axes": [a.get("name") for a in axes[: len(nav_shape)]],
                    "caution": 1.0 if caution is None else float(caution),
                    "notes": [n for n in getattr(result, "notes", []) if "OOD" in n],
                    "imaging_domain": _imaging_domain(result)},
        }
        if np.ndim(src.metadata.get("defocus_nm")) == 1:  # a non-uniform defocus axis' values
            meta["defocus_nm"] = [float(v) for v in src.metadata["defocus_nm"]]
        layer = self._viewer.add_labels(frame_labels(labels), name=f"{src.name} segmentation",
                                        metadata=meta, opacity=0.5, features=features,
                                        **common)
        try:
            layer.colormap = DirectLabelColormap(color_dict={None: PARTICLE_COLOR,
                                                             0: "transparent"})
        except Exception:  # noqa: BLE001 - cosmetic
            pass
        self.added_layers = [layer]
        if self.add_proba.value and getattr(result, "proba", None) is not None:
            self.added_layers.append(
                self._viewer.add_image(result.proba, name=f"{src.name} probability",
                                       colormap="magma", blending="additive",
                                       contrast_limits=(0.0, 1.0), metadata=meta, **common))
        scores = features["ood_score"].to_numpy(dtype=float)
        if np.isfinite(scores).any():
            n_bad = int(np.nansum(scores > meta["ood"]["caution"]))
            self.ood_label.set_message(
                f"OOD score per frame: median {np.nanmedian(scores):.2f}, max "
                f"{np.nanmax(scores):.2f}; {n_bad} of {len(scores)} frame(s) above the "
                f"caution level {meta['ood']['caution']:.3g} (0 ≈ like the training data).")
        else:
            self.ood_label.set_message(next((n for n in meta["notes"] if "OOD" in n),
                                            "no OOD score"))
        frac = float((labels > 0).mean()) if labels.size else 0.0
        self.set_fraction(1.0)
        self.set_status(f"done: {100 * frac:.1f}% of pixels labelled particle")
        # every note of the core reaches the user, every run (warnings came as stages)
        for note in meta["notes"]:
            self.tell(note, "info")
        if self.show_ood.value and np.isfinite(scores).any():
            self._show_ood(layer)

    def _show_ood(self, layer: Any) -> None:
        from ._ood import OODView

        if self.ood_view is None or self.ood_view.closed:
            self.ood_view = OODView(self._viewer)
            try:
                self._viewer.window.add_dock_widget(self.ood_view, name="OOD per frame",
                                                    area="right", tabify=True)
            except Exception:  # noqa: BLE001 - no window (headless use)
                pass
        self.ood_view.set_layer(layer)
