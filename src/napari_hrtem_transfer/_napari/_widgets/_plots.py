"""Plots in the docks, in napari's theme: a matplotlib canvas and a cheap Qt line plot."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QSizePolicy, QWidget

if TYPE_CHECKING:
    import napari


class ThemedPlot:
    """A matplotlib canvas whose colours follow napari's theme; redraws are throttled.

    Call :meth:`request_draw` as often as you like: the figure is redrawn at most every
    ``min_interval_ms`` (and only when something changed).
    """

    def __init__(self, viewer: napari.Viewer, figsize=(3.4, 2.2), min_height: int = 160,
                 min_interval_ms: int = 400) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._viewer = viewer
        self.figure = Figure(figsize=figsize, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(min_height)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.canvas.setFixedHeight(min_height)
        self.ax = self.figure.add_subplot(111)
        self.colors: dict[str, str] = {}
        self._dirty = False
        self._last_draw = 0.0
        self._min_interval = min_interval_ms / 1000.0
        self._timer = QTimer(self.canvas)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._draw_now)
        self.n_draws = 0
        #: called after a theme change (redraw what depends on the colours)
        self.on_theme_change: list[Any] = []
        self.apply_theme()
        events = getattr(viewer, "events", None)
        if events is not None and hasattr(events, "theme"):
            events.theme.connect(self._on_theme)

    def _on_theme(self, *_: Any) -> None:
        try:
            self.apply_theme()
            for redraw in list(self.on_theme_change):
                redraw()
        except RuntimeError:  # canvas deleted
            return
        self.request_draw(now=True)

    def apply_theme(self) -> None:
        """Take the background and text colours from the viewer's current theme."""
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self._viewer.theme)
            bg, fg, text = (theme.background.as_hex(), theme.foreground.as_hex(),
                            theme.text.as_hex())
            accent = theme.highlight.as_hex()
            warn = theme.warning.as_hex()
        except Exception:  # noqa: BLE001 - no theme: matplotlib's defaults
            bg, fg, text, accent, warn = "#ffffff", "#dddddd", "#000000", "#1f77b4", "#ff7f0e"
        self.colors = {"background": bg, "foreground": fg, "text": text, "accent": accent,
                       "warning": warn}
        self.figure.patch.set_facecolor(bg)
        for ax in self.figure.axes or [self.ax]:  # every panel, colour bars included
            self.style_axes(ax)

    def style_axes(self, ax: Any) -> None:
        """Colour ``ax`` (and the figure) with the theme."""
        c = self.colors
        self.figure.patch.set_facecolor(c["background"])
        ax.set_facecolor(c["background"])
        for spine in ax.spines.values():
            spine.set_color(c["text"])
        ax.tick_params(colors=c["text"], labelsize=7)
        ax.xaxis.label.set_color(c["text"])
        ax.yaxis.label.set_color(c["text"])
        ax.title.set_color(c["text"])
        legend = ax.get_legend()
        if legend is not None:
            legend.get_frame().set_facecolor(c["background"])
            legend.get_frame().set_edgecolor(c["text"])
            for t in legend.get_texts():
                t.set_color(c["text"])

    def request_draw(self, now: bool = False) -> None:
        """Redraw soon (at most every ``min_interval_ms``)."""
        self._dirty = True
        wait = self._min_interval - (time.monotonic() - self._last_draw)
        if now or wait <= 0:
            self._draw_now()
        elif not self._timer.isActive():
            self._timer.start(int(wait * 1000) + 1)

    def _draw_now(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self._last_draw = time.monotonic()
        self.n_draws += 1
        try:
            self.canvas.draw_idle()
        except RuntimeError:  # deleted
            pass


def theme_colors(viewer: Any) -> dict[str, str]:
    """Background, text, accent and warning colours of the viewer's napari theme."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        return {"background": theme.background.as_hex(), "foreground": theme.foreground.as_hex(),
                "text": theme.text.as_hex(), "accent": theme.highlight.as_hex(),
                "warning": theme.warning.as_hex(), "canvas": theme.canvas.as_hex()}
    except Exception:  # noqa: BLE001 - no theme
        return {"background": "#ffffff", "foreground": "#dddddd", "text": "#000000",
                "accent": "#1f77b4", "warning": "#ff7f0e", "canvas": "#ffffff"}


class LivePlot(QWidget):
    """A small line plot painted with Qt (cheap enough to update at every training step).

    Series are lists of ``(x, y)`` points; call :meth:`update` after changing them (Qt
    coalesces repaints). Colours follow napari's theme.
    """

    def __init__(self, viewer: Any, xlabel: str = "", ylabel: str = "",
                 height: int = 160, logy: bool = False) -> None:
        super().__init__()
        self._viewer = viewer
        self.xlabel, self.ylabel = xlabel, ylabel
        #: logarithmic y axis (used when every value is positive)
        self.logy = logy
        self.series: list[dict[str, Any]] = []
        self.setFixedHeight(height)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.colors = theme_colors(viewer)
        self.n_paints = 0
        events = getattr(viewer, "events", None)
        if events is not None and hasattr(events, "theme"):
            events.theme.connect(self._on_theme)

    def _on_theme(self, *_: Any) -> None:
        self.colors = theme_colors(self._viewer)
        try:
            self.update()
        except RuntimeError:  # deleted
            pass

    def add_series(self, name: str, color: str, marker: bool = False, alpha: float = 1.0,
                   width: float = 1.2) -> list[tuple[float, float]]:
        """A new series; returns its (mutable) list of points."""
        points: list[tuple[float, float]] = []
        self.series.append({"name": name, "color": color, "marker": marker, "alpha": alpha,
                            "width": width, "points": points})
        return points

    def clear(self) -> None:
        """Empty every series."""
        for s in self.series:
            s["points"].clear()
        self.update()

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 - Qt API
        from qtpy.QtCore import QPointF, QRectF
        from qtpy.QtGui import QColor, QFont, QPainter, QPen, QPolygonF

        self.n_paints += 1
        c = self.colors
        p = QPainter(self)
        try:
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            p.fillRect(self.rect(), QColor(c["background"]))
            font = QFont(p.font())
            font.setPointSizeF(7.5)
            p.setFont(font)
            text = QColor(c["text"])
            w, h = self.width(), self.height()
            left, right, top, bottom = 44, 8, 18, 26
            box = QRectF(left, top, max(1, w - left - right), max(1, h - top - bottom))
            p.setPen(QPen(text, 1))
            p.drawRect(box)
            p.drawText(QRectF(0, h - 13, w, 13), Qt.AlignmentFlag.AlignHCenter, self.xlabel)
            pts = [pt for s in self.series for pt in s["points"] if np.isfinite(pt[1])]
            log = self.logy and bool(pts) and min(pt[1] for pt in pts) > 0
            tf = (lambda v: float(np.log10(v))) if log else float
            # legend
            x_leg = left + 4
            for s in self.series:
                col = QColor(c["text"] if s["color"] == "text" else s["color"])
                col.setAlphaF(s["alpha"])
                p.setPen(QPen(col, 2))
                p.drawLine(QPointF(x_leg, 8), QPointF(x_leg + 12, 8))
                p.setPen(text)
                p.drawText(QPointF(x_leg + 15, 11), s["name"])
                x_leg += 20 + p.fontMetrics().horizontalAdvance(s["name"])
            if not pts:
                p.drawText(box, Qt.AlignmentFlag.AlignCenter, self.ylabel)
                return
            xs = np.array([pt[0] for pt in pts])
            ys = np.array([tf(pt[1]) for pt in pts])
            x0, x1 = float(xs.min()), float(xs.max())
            y0, y1 = float(ys.min()), float(ys.max())
            if x1 <= x0:
                x0, x1 = x0 - 0.5, x1 + 0.5
            if y1 <= y0:
                y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)
            pad = 0.05 * (y1 - y0)
            y0, y1 = y0 - pad, y1 + pad

            def map_pt(x: float, y: float) -> QPointF:
                return QPointF(box.left() + (x - x0) / (x1 - x0) * box.width(),
                               box.bottom() - (y - y0) / (y1 - y0) * box.height())

            p.setPen(text)
            for yv in (y0 + pad, y1 - pad):
                pt = map_pt(x0, yv)
                p.drawText(QRectF(0, pt.y() - 7, left - 4, 14),
                           Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                           f"{10 ** yv if log else yv:.3g}")
            for xv in (x0, x1):
                pt = map_pt(xv, y0)
                p.drawText(QRectF(pt.x() - 20, box.bottom() + 1, 40, 12),
                           Qt.AlignmentFlag.AlignHCenter, f"{xv:.3g}")
            for s in self.series:
                spts = [pt for pt in s["points"] if np.isfinite(pt[1])]
                if not spts:
                    continue
                col = QColor(c["text"] if s["color"] == "text" else s["color"])
                col.setAlphaF(s["alpha"])
                p.setPen(QPen(col, s["width"]))
                poly = QPolygonF([map_pt(x, tf(y)) for x, y in spts])
                p.drawPolyline(poly)
                if s["marker"]:
                    p.setBrush(col)
                    for q in poly:
                        p.drawEllipse(q, 2.5, 2.5)
        finally:
            p.end()
