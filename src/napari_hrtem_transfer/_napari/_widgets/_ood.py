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
#: Column of the frame table with the defocus the model estimates for a frame [nm] (or None).
ESTIMATED = "estimated_defocus_nm"
#: Separator of a frame's reasons in the features table (one string per cell).
REASON_SEP = "; "
NO_LAYER_TEXT = "Segment a stack to see per-frame OOD scores here."


def ood_layers(viewer: napari.Viewer) -> list[Any]:
    """Labels layers that carry per-frame OOD scores."""
    from napari.layers import Labels

    return [ly for ly in viewer.layers if isinstance(ly, Labels) and "ood" in ly.metadata
            and "ood_score" in ly.features.columns]


def coordinate_columns(columns: Any) -> list[str]:
    """The navigation-coordinate columns of frame rows: the column right after each
    ``<axis>_index`` (``frame_table`` writes them in that order), e.g. ``defocus_nm``.
    Verdict fields such as ``defocus_sign_determined`` or ``estimated_defocus_nm`` are not
    coordinates, whatever their names start with."""
    cols = list(columns)
    return [
        cols[k + 1]
        for k, c in enumerate(cols[:-1])
        if c.endswith("_index") and not cols[k + 1].endswith("_index")
    ]


def x_column(features: Any, nav_axes: list[str]) -> tuple[str, str]:
    """The column to plot against and its axis label: the defocus [nm] if there is one, else
    the model's estimated defocus [nm] (an experimental stack without a defocus axis), else
    the last navigation axis' coordinate, else the flat frame index."""
    cols = coordinate_columns(features.columns)
    for c in cols:
        if c == "defocus" or c.startswith("defocus_"):
            unit = c[len("defocus_"):] if c.startswith("defocus_") else ""
            return c, f"defocus [{unit}]" if unit else "defocus"
    if ESTIMATED in features.columns:
        est = np.asarray(features[ESTIMATED], dtype=float)  # None -> nan
        if np.isfinite(est).any():
            return ESTIMATED, "estimated defocus [nm]"
    for name in reversed(nav_axes):
        for c in cols:
            if c == name or c.startswith(name + "_"):
                unit = c[len(name) + 1:]
                return c, f"{name} [{unit}]" if unit else name
    return "frame", "frame"


def canvas_text(viewer: Any) -> Any:
    """napari's canvas text overlay (``viewer.canvas.overlays.text`` since napari 0.9;
    the deprecated ``viewer.text_overlay`` before)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    text = getattr(overlays, "text", None)
    return text if text is not None else viewer.text_overlay


def frame_reasons(row: dict[str, Any]) -> list[str]:
    """Why a frame is out of domain, in words (empty when in domain or not known)."""
    r = row.get("reasons")
    if r is None or (isinstance(r, float) and not np.isfinite(r)):
        return []
    if isinstance(r, str):
        return [p for p in (x.strip() for x in r.split(REASON_SEP)) if p]
    return [str(x) for x in r if str(x).strip()]


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
        self.summary = WrapLabel(NO_LAYER_TEXT)
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
        self._owns_overlay = False
        self.rows: list[dict[str, Any]] = []
        self.points: Any = None
        self.marker: Any = None
        self.current_frame: int | None = None
        self.plot.canvas.mpl_connect("pick_event", self._on_pick)
        self.plot.canvas.mpl_connect("draw_event", self._on_canvas_draw)
        self._background: Any = None
        self.n_marker_blits = 0
        self.nav_axes: list[str] = []
        self.caution = 1.0
        self.training_range_nm: tuple[float, float] | None = None
        self.xcol, self.xlabel = "frame", "frame"
        self.layer_combo.changed.connect(lambda v: self.set_layer(v))
        self.n_suggest.changed.connect(lambda *_: self._fill_table())
        napari_viewer.dims.events.current_step.connect(self._on_dims)
        self.plot.on_theme_change.append(self._on_theme)
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
        except Exception:  # noqa: BLE001 - the viewer is going away
            pass
        self._clear_overlay()

    def _clear_overlay(self) -> None:
        """Empty the canvas text (never hide it: see below)."""
        # Hiding napari's text overlay in the same event-loop turn as a layer is removed,
        # then showing it again, makes vispy's next draw segfault in glDrawArrays (napari
        # 0.9, vispy 0.17, Mesa: segment -> delete the result -> segment again). An empty
        # text draws nothing and never touches the overlay's visibility.
        try:
            ov = canvas_text(self._viewer)
            if self._owns_overlay and ov.text:
                ov.text = ""
        except Exception:  # noqa: BLE001 - the viewer is going away
            pass

    # -- data
    def set_layer(self, layer: Any) -> None:
        """Show the OOD scores of a segmentation Labels layer (None clears)."""
        self.layer = layer
        if layer is None:
            self.rows = []
            self.current_frame = None
            self.points = self.marker = None
            self.plot.ax.clear()
            self.plot.style_axes(self.plot.ax)
            self.plot.request_draw(now=True)
            self.table.setRowCount(0)
            self.ranking = []
            self.summary.set_message(NO_LAYER_TEXT)
            self.suggest.set_message("")
            self._clear_overlay()
            return
        if self.layer_combo.value is not layer:
            self.layer_combo.reset_choices()
            if layer in [c for c in self.layer_combo.choices]:
                self.layer_combo.value = layer
        feats = layer.features
        self.rows = feats.to_dict("records")
        meta = layer.metadata.get("ood", {})
        self.nav_axes = list(meta.get("nav_axes", []))
        self.caution = float(meta.get("caution", 1.0))
        rng = (meta.get("imaging_domain") or {}).get("defocus_nm_range")
        self.training_range_nm = (tuple(float(v) for v in rng[:2])
                                  if rng is not None and len(rng) >= 2 else None)
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
        """Draw the whole figure (a new layer or theme); slider steps only move the marker."""
        ax = self.plot.ax
        ax.clear()
        self.plot.style_axes(ax)
        self._background = None
        c = self.plot.colors
        x = np.asarray([r.get(self.xcol) for r in self.rows], dtype=float)
        y = np.asarray([r["ood_score"] for r in self.rows], dtype=float)
        rng = self.training_range_nm
        if rng is not None and self.xlabel.startswith(("defocus", "estimated defocus")):
            ax.axvspan(rng[0], rng[1], color=c["accent"], alpha=0.15, lw=0,
                       label="model's training defoci")
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
        # the current frame: an animated artist, drawn over a cached background (blit)
        (self.marker,) = ax.plot([], [], "o", ms=11, mfc="none", mec=c["warning"], mew=2,
                                 zorder=4, label="current", animated=True)
        if self.current_frame is not None and self.current_frame < len(self.rows):
            row = self.rows[self.current_frame]
            self.marker.set_data([row.get(self.xcol)], [row["ood_score"]])
        ax.set_xlabel(self.xlabel, fontsize=8)
        ax.set_ylabel("OOD score", fontsize=8)
        self.plot.request_draw(now=True)

    def _on_canvas_draw(self, _event: Any = None) -> None:
        """After a full draw: cache the background, then draw the marker over it."""
        canvas = self.plot.canvas
        try:
            self._background = canvas.copy_from_bbox(self.plot.figure.bbox)
        except Exception:  # noqa: BLE001 - a backend without blitting: full draws
            self._background = None
        self._draw_marker(restore=False)

    def _draw_marker(self, restore: bool = True) -> bool:
        """Redraw only the current-frame marker (blit); False if a full draw is needed."""
        marker, bg = self.marker, self._background
        if marker is None or bg is None or marker.axes is None:
            return False
        canvas = self.plot.canvas
        try:
            if restore:
                canvas.restore_region(bg)
            marker.axes.draw_artist(marker)
            # an asynchronous repaint of the canvas widget (matplotlib's blit() repaints
            # synchronously, which made the whole window, napari's canvas included, repaint
            # at every slider step)
            canvas.update()
        except Exception:  # noqa: BLE001 - deleted canvas or no renderer yet
            return False
        self.n_marker_blits += 1
        return True

    def _on_theme(self, *_: Any) -> None:
        if self.closed:
            return
        try:
            if self.rows:
                self._draw()
                if self.current_frame is not None:
                    self._update_overlay(self.rows[self.current_frame])
        except RuntimeError:  # deleted
            pass

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
            why = ([CAUTION_WORD] if row.get("caution") else []) + frame_reasons(row)
            for col, text in enumerate((self.frame_text(i), f"{s:.3f}", REASON_SEP.join(why))):
                item = QTableWidgetItem(text)
                if col == 2 and text:
                    item.setToolTip(text)
                self.table.setItem(r, col, item)
        k = min(int(self.n_suggest.value), len(order))
        self.suggest.set_message(
            "Annotate these frames first (highest OOD score: least like the training data): "
            + "; ".join(self.frame_text(i) for i in order[:k]))

    def frame_text(self, i: int) -> str:
        """A frame's position in words: flat index and navigation coordinates."""
        row = self.rows[i]
        parts = [f"#{int(row['frame'])}"]
        coords = set(coordinate_columns(row))
        for c, v in row.items():
            if c not in coords:
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
        if frame is None or frame >= len(self.rows):
            return
        self.current_frame = frame
        row = self.rows[frame]
        if self.marker is not None:
            self.marker.set_data([row.get(self.xcol)], [row["ood_score"]])
            if not self._draw_marker():
                self.plot.request_draw()
        self._update_overlay(row)

    def _update_overlay(self, row: dict[str, Any]) -> None:
        s = float(row["ood_score"])
        text = f"{self.frame_text(int(row['frame']))} · OOD {s:.2f}"
        est = row.get(ESTIMATED)
        if self.xcol == ESTIMATED and est is not None and np.isfinite(float(est)):
            text += f" · estimated defocus {float(est):+.3g} nm"
        caution = bool(row.get("caution"))
        if caution:
            text += f" · {CAUTION_WORD} (> {self.caution:.3g})"
        reasons = frame_reasons(row)
        if reasons:
            text += "\n" + "\n".join(f"– {r}" for r in reasons)
        ov = canvas_text(self._viewer)
        # colour: napari's contrast with the canvas (follows the theme), the theme's warning
        # colour above the caution level
        try:
            ov.color = self.plot.colors["warning"] if caution else None
        except Exception:  # noqa: BLE001 - older napari: no colour
            pass
        ov.text = text
        self._owns_overlay = True
        if not ov.visible:  # made visible once; afterwards only its text changes
            ov.visible = True
