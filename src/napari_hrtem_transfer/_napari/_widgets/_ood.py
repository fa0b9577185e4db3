"""Per-frame OOD where the user looks: a plot of the OOD score over the defocus (or
frame/time) axis that follows the dims slider, a ranking of frames to annotate first, and a
canvas text overlay for the current frame.

The scores come from a segmentation Labels layer's ``features`` (one row per frame, written
by the Segment dock): ``frame`` (flat index), ``<axis>_index`` per navigation axis, the
frame's coordinates (``defocus_nm``, ...), ``ood_score`` and ``caution``; the layer's
metadata ``ood`` holds the navigation axis names and the model's caution level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, SpinBox
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
)

from ._base import DockWidget, ThemedPlot, WrapLabel

if TYPE_CHECKING:
    import napari

CAUTION_WORD = "treat with caution"


def ood_layers(viewer: napari.Viewer) -> list[Any]:
    """Labels layers that carry per-frame OOD scores."""
    from napari.layers import Labels

    return [ly for ly in viewer.layers if isinstance(ly, Labels) and "ood" in ly.metadata
            and "ood_score" in ly.features.columns]


def x_column(features: Any, nav_axes: list[str]) -> tuple[str, str]:
    """The column to plot against and its axis label: the defocus [nm] if there is one, else
    the last navigation axis' coordinate, else the flat frame index."""
    cols = [c for c in features.columns if not c.endswith("_index")]
    for c in cols:
        if c.startswith("defocus"):
            unit = c[len("defocus_"):] if c.startswith("defocus_") else ""
            return c, f"defocus [{unit}]" if unit else "defocus"
    for name in reversed(nav_axes):
        for c in cols:
            if c == name or c.startswith(name + "_"):
                unit = c[len(name) + 1:]
                return c, f"{name} [{unit}]" if unit else name
    return "frame", "frame"


class OODView(DockWidget):
    """The OOD score of every frame over the defocus (or frame/time) axis.

    Each image is a line (or a point), the median per defocus is bold, the current frame is
    marked and follows the dims slider; clicking a point or a row of the ranking moves the
    viewer to that frame. A text overlay on the canvas shows the current frame's defocus and
    OOD score, and the words "treat with caution" above the model's caution level.
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer)
        self.layer_combo = ComboBox(label="segmentation", choices=self._layer_choices,
                                    tooltip="A Labels layer made by the Segment dock.")
        self.n_suggest = SpinBox(label="suggest", value=5, min=1, max=100,
                                 tooltip="How many frames to suggest for annotation.")
        self.form.extend([self.layer_combo, self.n_suggest])
        self.summary = WrapLabel("Segment a stack to see per-frame OOD scores here.")
        self.add_row(self.summary)
        self.plot = ThemedPlot(napari_viewer, figsize=(3.4, 2.2), min_height=190,
                               min_interval_ms=50)
        self.add_row(self.plot.canvas)
        self.suggest = WrapLabel("")
        self.add_row(self.suggest)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["frame", "OOD score", ""])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(120)
        self.table.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Expanding)
        self.table.cellClicked.connect(self._on_row)
        self.add_row(self.table)
        self.layer: Any = None
        self.rows: list[dict[str, Any]] = []
        self.points: Any = None
        self.marker: Any = None
        self.current_frame: int | None = None
        self.plot.canvas.mpl_connect("pick_event", self._on_pick)
        self.layer_combo.changed.connect(lambda v: self.set_layer(v))
        self.n_suggest.changed.connect(lambda *_: self._fill_table())
        napari_viewer.dims.events.current_step.connect(self._on_dims)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._on_layers)
        self._on_layers()

    def _layer_choices(self, *_: Any) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in ood_layers(self._viewer)]

    def _on_layers(self, *_: Any) -> None:
        if self.closed:
            return
        self.layer_combo.reset_choices()
        if self.layer is not None and self.layer not in self._viewer.layers:
            self.set_layer(None)
        if self.layer is None and self.layer_combo.value is not None:
            self.set_layer(self.layer_combo.value)

    def on_closed(self) -> None:  # noqa: D102
        super().on_closed()
        try:
            self._viewer.dims.events.current_step.disconnect(self._on_dims)
            self._viewer.text_overlay.visible = False
        except Exception:  # noqa: BLE001 - the viewer is going away
            pass

    # -- data
    def set_layer(self, layer: Any) -> None:
        """Show the OOD scores of a segmentation Labels layer (None clears)."""
        self.layer = layer
        if layer is None:
            self.rows = []
            self.plot.ax.clear()
            self.plot.style_axes(self.plot.ax)
            self.plot.request_draw(now=True)
            self.table.setRowCount(0)
            self._viewer.text_overlay.visible = False
            return
        if self.layer_combo.value is not layer:
            self.layer_combo.reset_choices()
            if layer in [c for c in self.layer_combo.choices]:
                self.layer_combo.value = layer
        feats = layer.features
        self.rows = feats.to_dict("records")
        meta = layer.metadata.get("ood", {})
        self.nav_axes: list[str] = list(meta.get("nav_axes", []))
        self.caution = float(meta.get("caution", 1.0))
        self.xcol, self.xlabel = x_column(feats, self.nav_axes)
        scores = np.asarray(feats["ood_score"], dtype=float)
        n_bad = int(np.nansum(scores > self.caution))
        if np.isfinite(scores).any():
            self.summary.set_message(
                f"{layer.name}: {len(scores)} frame(s); OOD median {np.nanmedian(scores):.2f}, "
                f"max {np.nanmax(scores):.2f}; {n_bad} above the caution level "
                f"{self.caution:.3g} (0 ≈ like the training data).")
        else:
            self.summary.set_message(f"{layer.name}: no OOD scores ("
                                     + "; ".join(meta.get("notes", [])) + ")")
        self._draw()
        self._fill_table()
        self._on_dims()

    def _draw(self) -> None:
        ax = self.plot.ax
        ax.clear()
        self.plot.style_axes(ax)
        c = self.plot.colors
        x = np.asarray([r[self.xcol] for r in self.rows], dtype=float)
        y = np.asarray([r["ood_score"] for r in self.rows], dtype=float)
        # one line per image along the defocus axis (2-D navigation: defocus x image)
        other = [a for a in self.nav_axes if not self.xcol.startswith(a)]
        if self.xcol.startswith("defocus") and other:
            key = f"{other[0]}_index"
            ids = np.asarray([r.get(key, 0) for r in self.rows])
            for i in np.unique(ids):
                sel = ids == i
                order = np.argsort(x[sel])
                ax.plot(x[sel][order], y[sel][order], lw=0.6, alpha=0.4, color=c["text"])
        ux = np.unique(x[np.isfinite(x)])
        if len(ux) < len(x):  # several frames per x: the median per x, bold
            med = [np.nanmedian(y[x == v]) for v in ux]
            ax.plot(ux, med, lw=2.4, color=c["accent"], label="median")
        self.points = ax.scatter(x, y, s=14, color="C0", picker=True, pickradius=5, zorder=3,
                                 label="frame")
        ax.axhline(self.caution, ls="--", lw=0.8, color=c["warning"], label="caution")
        # a frame in which the model finds no particle can score 100x the caution level:
        # a symmetric log axis keeps the others readable
        lin = max(abs(self.caution), 1.0)
        if np.isfinite(y).any() and np.nanmax(np.abs(y)) > 20 * lin:
            ax.set_yscale("symlog", linthresh=lin)
        (self.marker,) = ax.plot([], [], "o", ms=11, mfc="none", mec=c["warning"], mew=2,
                                 zorder=4, label="current")
        ax.set_xlabel(self.xlabel, fontsize=8)
        ax.set_ylabel("OOD score", fontsize=8)
        self.plot.request_draw(now=True)

    def _fill_table(self) -> None:
        if not self.rows:
            self.table.setRowCount(0)
            return
        order = sorted(range(len(self.rows)),
                       key=lambda i: -np.nan_to_num(float(self.rows[i]["ood_score"]), nan=-1e9))
        self.ranking = order
        self.table.setRowCount(len(order))
        for r, i in enumerate(order):
            row = self.rows[i]
            s = float(row["ood_score"])
            for col, text in enumerate((self.frame_text(i), f"{s:.3f}",
                                        CAUTION_WORD if row.get("caution") else "")):
                item = QTableWidgetItem(text)
                self.table.setItem(r, col, item)
        k = min(int(self.n_suggest.value), len(order))
        self.suggest.set_message(
            "Annotate these frames first (highest OOD score: least like the training data): "
            + "; ".join(self.frame_text(i) for i in order[:k]))

    def frame_text(self, i: int) -> str:
        """A frame's position in words: flat index and coordinates."""
        row = self.rows[i]
        parts = [f"#{int(row['frame'])}"]
        for c, v in row.items():
            if c in ("frame", "index", "ood_score", "caution") or c.endswith("_index"):
                continue
            if isinstance(v, int | float | np.floating) and np.isfinite(v):
                name, _, unit = c.partition("_")
                parts.append(f"{name} {v:+g} {unit}".strip() if name == "defocus"
                             else f"{name} {v:g} {unit}".strip())
        return ", ".join(parts)

    # -- navigation
    def _layer_nav_index(self) -> tuple[int, ...] | None:
        layer = self.layer
        if layer is None or layer not in self._viewer.layers:
            return None
        n_nav = layer.ndim - 2
        off = self._viewer.dims.ndim - layer.ndim
        point = self._viewer.dims.point
        idx = []
        for a in range(n_nav):
            i = int(round((point[a + off] - layer.translate[a]) / layer.scale[a]))
            idx.append(int(np.clip(i, 0, layer.data.shape[a] - 1)))
        return tuple(idx)

    def frame_at_slider(self) -> int | None:
        """Flat frame index the dims slider shows (None without a layer)."""
        idx = self._layer_nav_index()
        if idx is None:
            return None
        return int(np.ravel_multi_index(idx, self.layer.data.shape[:-2])) if idx else 0

    def go_to(self, frame: int) -> None:
        """Move the viewer's sliders to flat frame ``frame`` of the layer."""
        layer = self.layer
        if layer is None:
            return
        idx = np.unravel_index(int(frame), layer.data.shape[:-2])
        off = self._viewer.dims.ndim - layer.ndim
        for a, i in enumerate(idx):
            self._viewer.dims.set_point(a + off, layer.translate[a] + int(i) * layer.scale[a])

    def _on_pick(self, event: Any) -> None:
        if event.artist is self.points and len(event.ind):
            self.go_to(int(self.rows[int(event.ind[0])]["frame"]))

    def _on_row(self, row: int, _col: int = 0) -> None:
        if 0 <= row < len(getattr(self, "ranking", [])):
            self.go_to(int(self.rows[self.ranking[row]]["frame"]))

    def _on_dims(self, *_: Any) -> None:
        if self.closed or not self.rows:
            return
        frame = self.frame_at_slider()
        if frame is None:
            return
        self.current_frame = frame
        row = self.rows[frame]
        if self.marker is not None:
            self.marker.set_data([row[self.xcol]], [row["ood_score"]])
            self.plot.request_draw()
        self._update_overlay(row)

    def _update_overlay(self, row: dict[str, Any]) -> None:
        s = float(row["ood_score"])
        text = f"{self.frame_text(int(row['frame']))} · OOD {s:.2f}"
        caution = bool(row.get("caution"))
        if caution:
            text += f" · {CAUTION_WORD} (> {self.caution:.3g})"
        ov = self._viewer.text_overlay
        ov.text = text
        ov.visible = True
        try:
            ov.color = self.plot.colors["warning"] if caution else self.plot.colors["text"]
        except Exception:  # noqa: BLE001 - older napari: no colour
            pass
