"""Shared plumbing of the dock widgets: a scrolling dock, job running, progress, plots.

* :class:`DockWidget` is a ``QScrollArea`` holding a magicgui form, so every dock fits a
  small screen (1280 x 800 with three docks) and scrolls instead of growing.
* :class:`JobDock` adds a Run/Stop pair, a progress bar with elapsed time and ETA, a status
  line that wraps (long messages never widen the dock) and job running through
  :class:`~napari_hrtem_transfer._napari._workers.JobRunner`: updates are polled by a timer
  in the GUI thread (never a Qt call from the job's thread), so redraws are throttled.
  Closing the dock or the viewer stops the job at its next step and waits for it, so no job
  outlives the widgets it reports to and the process exits cleanly.
* :class:`ThemedPlot` is a matplotlib canvas following napari's theme (dark/light).
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from .._workers import (
    NOTE_STAGE,
    WARNING_STAGE,
    JobDone,
    JobFailed,
    JobProgress,
    JobRunner,
    JobStage,
    JobStopped,
)

if TYPE_CHECKING:
    import napari

DEFOCUS_TIP = "abTEM sign convention: defocus = -C10; positive = underfocus, negative = overfocus."
#: How often the GUI takes the job's updates [ms] (redraws are throttled to this or slower).
POLL_MS = 50
#: Longest message shown in full in a status line; the whole text is in its tooltip.
MAX_STATUS_CHARS = 600


def notify(kind: str, message: str) -> None:
    """A napari notification (``error``, ``warning`` or ``info``)."""
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning}.get(
        kind, notifications.show_info
    )(message)


def breakable(text: str) -> str:
    """``text`` with zero-width spaces after path separators and in very long words, so a
    wrapping label can break file paths and identifiers."""
    text = re.sub(r"([/\\_=;])", "\\1\u200b", text)
    return re.sub(r"(\S{40})(?=\S)", "\\1\u200b", text)


class WrapLabel(QLabel):
    """A label that wraps and never asks for more width than the dock has."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # vertically Preferred, not Minimum: a wrapped label's size hint is its height at a
        # narrow default width (a paragraph becomes hundreds of px), and with Minimum that
        # hint is the layout's minimum, so the dock scrolled over 2-3x its content; the
        # scroll area sizes the body by height-for-width at the dock's real width instead
        policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.setMinimumWidth(10)
        self.set_message(text)

    def set_message(self, text: str) -> None:
        """Show ``text`` (shortened to :data:`MAX_STATUS_CHARS`; the full text in the tooltip)."""
        self.full_text = text
        shown = text if len(text) <= MAX_STATUS_CHARS else text[:MAX_STATUS_CHARS] + " …"
        self.setText(breakable(shown))
        self.setToolTip(text if len(text) > 80 else "")

    # plain-text accessors (without the zero-width spaces)
    @property
    def value(self) -> str:
        """The message, as given."""
        return self.full_text


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class DockWidget(QScrollArea):
    """A dock: a magicgui form (``self.form``) and extra Qt rows, in a vertical scroll area.

    Closing the dock (its "x": napari takes the widget out of its dock) calls
    :meth:`on_closed`; so does closing the viewer's window (an event filter on the top-level
    Qt window: once it is closed and hidden) and quitting the application. Only public Qt and
    napari API is used.
    """

    #: width the dock asks for [px]; narrower docks scroll nothing but wrap their text
    preferred_width = 360

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        self._was_docked = False
        self.closed = False
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.body = QWidget()
        self.body_layout = QVBoxLayout(self.body)
        self.body_layout.setContentsMargins(4, 4, 4, 4)
        self.form = Container(labels=True)
        self.form.native.setSizePolicy(QSizePolicy.Policy.Ignored,
                                       QSizePolicy.Policy.Preferred)
        self.body_layout.addWidget(self.form.native)
        self.body_layout.addStretch(1)  # rows stay packed at the top; spare height goes here
        self.setWidget(self.body)
        self.body.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        app = QApplication.instance()
        if app is not None:  # a weak link: the application must not keep closed docks alive
            ref = weakref.ref(self)

            def _quit() -> None:
                dock = ref()
                if dock is not None:
                    dock.on_closed()

            app.aboutToQuit.connect(_quit)

    # -- size: small minimum so several docks fit a 1280 x 800 screen (the rest scrolls)
    def minimumSizeHint(self):  # noqa: N802 - Qt API
        hint = super().minimumSizeHint()
        hint.setHeight(min(hint.height(), 120))
        hint.setWidth(min(hint.width(), 220))
        return hint

    def sizeHint(self):  # noqa: N802 - Qt API
        # constant: a hint following the contents (a message growing by a line) would make
        # the main window re-lay out its docks and the canvas at every status update
        from qtpy.QtCore import QSize

        return QSize(self.preferred_width, 420)

    def add_row(self, *widgets: QWidget) -> QWidget:
        """Add Qt widgets below the form, side by side; returns the row."""
        at = self.body_layout.count() - 1  # before the trailing stretch
        if len(widgets) == 1:
            self.body_layout.insertWidget(at, widgets[0])
            return widgets[0]
        row = QWidget()
        lay = QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in widgets:
            lay.addWidget(w)
        self.body_layout.insertWidget(at, row)
        return row

    def reset_choices(self, *_: Any) -> None:
        """Refresh layer choices (napari calls this when layers change).

        magicgui's ``reset_choices`` puts every combo box back to its first choice; a value
        still offered afterwards is kept (a filter stays set when a layer is added), and
        ``changed`` fires only for a combo box whose value really changed.
        """
        from contextlib import ExitStack

        from magicgui.widgets.bases import CategoricalWidget

        combos = [w for w in self.form if isinstance(w, CategoricalWidget)]
        before = [w.value for w in combos]
        with ExitStack() as stack:
            for w in combos:
                stack.enter_context(w.changed.blocked())
            self.form.reset_choices()
            for w, v in zip(combos, before, strict=True):
                if any(c is v or (type(c) is type(v) and c == v) for c in w.choices):
                    w.value = v
        for w, v in zip(combos, before, strict=True):
            if w.value is not v and w.value != v:
                w.changed.emit(w.value)

    def event(self, ev: QEvent) -> bool:  # noqa: D102 - Qt API
        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._was_docked = True
                self._watch_window()
            elif self._was_docked:  # napari took us out of our dock: the dock was closed
                self.on_closed()
        return super().event(ev)

    def _watch_window(self) -> None:
        top = self.window()
        if top is self or top is getattr(self, "_top_window", None):
            return
        self._top_window = top
        top.installEventFilter(self)

    def eventFilter(self, obj: Any, ev: QEvent) -> bool:  # noqa: N802 - Qt API
        if obj is getattr(self, "_top_window", None) and ev.type() == QEvent.Type.Close:
            # the close may still be refused (napari's confirmation): judge after it
            QTimer.singleShot(0, self._after_window_close)
        return False

    def _after_window_close(self) -> None:
        top = getattr(self, "_top_window", None)
        try:
            gone = top is None or not top.isVisible()
        except RuntimeError:  # deleted
            gone = True
        if gone:
            self.on_closed()

    def on_closed(self) -> None:
        """The dock or the viewer was closed; subclasses stop their work here."""
        self.closed = True


_PREWARMED: set[str] = set()


def prewarm(modules: tuple[Any, ...]) -> None:
    """Import ``modules`` (names, or callables to run) on a background thread, once each.

    Importing torch loads large shared libraries, and its first optimiser step imports about
    a thousand more modules (torch._dynamo, sympy, ...), all while holding the GIL (up to a
    second each on a busy 2-core machine); doing it when a dock opens keeps these pauses out
    of the run the user watches.
    """
    todo = tuple(m for m in modules if m not in _PREWARMED)
    if not todo:
        return
    _PREWARMED.update(todo)

    def run() -> None:
        import importlib

        for m in todo:
            try:
                m() if callable(m) else importlib.import_module(m)
            except Exception:  # noqa: BLE001 - the job itself will report a real problem
                pass

    threading.Thread(target=run, name="hrtem-prewarm", daemon=False).start()


class JobDock(DockWidget):
    """A dock that runs one job at a time, with Run, Stop, progress, elapsed time and ETA."""

    #: what the job is called in napari's "tasks running" close dialog
    job_title = "job"
    #: modules the job needs, imported in the background when the dock opens
    prewarm_modules: tuple[Any, ...] = ()

    def __init__(self, viewer: napari.Viewer, run_text: str) -> None:
        super().__init__(viewer)
        self.runner: JobRunner | None = None
        self.run_button = QPushButton(run_text)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.setToolTip("Stop after the current step (training keeps a resumable "
                                    "checkpoint).")
        self.run_button.clicked.connect(lambda *_: self.start())
        self.stop_button.clicked.connect(lambda *_: self.stop())
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.time_label = WrapLabel("")
        self.status = WrapLabel("")
        self.device_label = WrapLabel("")
        self.device_label.setVisible(False)
        #: the warnings and notes of the current (or last) run, each shown as a notification
        self.warnings_shown: list[str] = []
        #: the last job's outcome: JobDone, JobFailed or JobStopped (for scripts and tests)
        self.last_outcome: Any = None
        self.state = "idle"  # idle | running | stopping | finished | stopped | failed
        self._t0 = 0.0
        self._fraction = 0.0
        self._eta_fraction, self._t_eta = 0.0, 0.0
        self._left_at_eta: float | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        if self.prewarm_modules:
            prewarm(self.prewarm_modules)

    def add_job_rows(self) -> None:
        """Add the Run/Stop row, the progress bar and the status lines (call once)."""
        self.add_row(self.run_button, self.stop_button)
        self.add_row(self.progress)
        self.add_row(self.time_label)
        self.add_row(self.device_label)
        self.add_row(self.status)

    @property
    def running(self) -> bool:
        """Whether a job is running (also while it is stopping)."""
        return self.runner is not None

    # -- starting
    def start(self) -> None:
        """Validate the form, then run the job (bad input: a notification, nothing started)."""
        if self.running or self.closed:
            return
        try:
            job, args, kwargs = self._prepare()
        except Exception as exc:  # noqa: BLE001 - bad input becomes a notification
            self.set_status(f"error: {exc}")
            notify("error", str(exc))
            return
        self.last_outcome = None
        self.warnings_shown = []
        self.state = "running"
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self._fraction = 0.0
        self._t0 = time.monotonic()
        self._eta_fraction, self._t_eta, self._left_at_eta = 0.0, self._t0, None
        self.time_label.set_message("starting…")
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        stop_event = threading.Event()
        self.runner = JobRunner(job, *args, stop=stop_event, **kwargs)
        self.runner.stop_event = stop_event  # the event the job checks
        self.runner.start()
        self._timer.start()

    def _prepare(self) -> tuple[Any, tuple, dict]:
        """The job and its arguments from the form; raise with a message on bad input."""
        raise NotImplementedError

    # -- stopping
    def stop(self) -> None:
        """Ask the running job to stop after its current step."""
        if self.runner is not None:
            self.runner.request_stop()
            self.state = "stopping"
            self.stop_button.setEnabled(False)
            self.set_status("stopping after this step…")

    def on_closed(self) -> None:
        """Dock or viewer closed: stop the job, wait for it, never touch the widgets again."""
        if self.closed:
            return
        super().on_closed()
        self._stop_and_wait()

    def _stop_and_wait(self, timeout: float = 120.0) -> bool:
        runner = self.runner
        if runner is None:
            return True
        runner.request_stop()
        ended = runner.join(timeout)
        try:
            self._timer.stop()
        except RuntimeError:  # already deleted with the window
            pass
        return ended

    # -- updates (GUI thread, from the timer)
    def _poll(self) -> None:
        runner = self.runner
        if runner is None:
            self._timer.stop()
            return
        items, ended = runner.poll()
        if self.closed:  # nothing may touch widgets being deleted
            if ended:
                self._timer.stop()
                self.runner = None
            return
        for item in items:
            try:
                self._dispatch(item)
            except Exception as exc:  # noqa: BLE001 - keep napari alive
                self.last_outcome = JobFailed(exc)
                self.set_status(f"failed while showing the result: {exc}")
                notify("error", str(exc))
        self._update_time()
        self.on_tick()
        if ended:
            runner.join(5.0)
            self._timer.stop()
            self.runner = None
            self.run_button.setEnabled(True)
            self.stop_button.setEnabled(False)
            self.on_finished()

    def _dispatch(self, update: Any) -> None:
        if isinstance(update, JobProgress):
            self.set_fraction(update.fraction)
            if update.message:
                self.set_status(update.message)
        elif isinstance(update, JobStage):
            self.on_stage(update)
        elif isinstance(update, JobFailed):
            if isinstance(update.error, JobStopped):
                self.last_outcome = update.error
                self.state = "stopped"
                self.progress.setFormat("stopped at %p%")
                self.set_status(str(update.error))
                notify("info", f"{self.job_title}: {update.error}")
            else:
                self.last_outcome = update
                self.state = "failed"
                self.progress.setFormat("failed at %p%")
                self.set_status(f"failed: {update.message}")
                notify("error", update.message)
        elif isinstance(update, JobDone):
            self.last_outcome = update
            self.state = "finished"
            self.on_done(update.result)
        else:
            self.on_other(update)

    def set_fraction(self, fraction: float, eta: float | None = None) -> None:
        """Progress in [0, 1] (drives the bar and the ETA).

        ``eta`` is the fraction of *this run's* work done, when it differs from the bar's
        (a resumed training starts at its checkpoint's epoch). The time left is estimated
        when the fraction changes, from the rate of the work done so far, and counts down
        between updates (it never grows while a step runs).
        """
        self._fraction = max(0.0, min(1.0, float(fraction)))
        self.progress.setValue(int(round(1000 * self._fraction)))
        f = self._fraction if eta is None else max(0.0, min(1.0, float(eta)))
        if f != self._eta_fraction:
            now = time.monotonic()
            self._eta_fraction, self._t_eta = f, now
            self._left_at_eta = (now - self._t0) * (1.0 - f) / f if 0.0 < f < 1.0 else None

    def time_left(self) -> float | None:
        """Estimated seconds left (None before the first progress or when done)."""
        if self._left_at_eta is None:
            return None
        return max(0.0, self._left_at_eta - (time.monotonic() - self._t_eta))

    def set_status(self, text: str) -> None:
        """Show ``text`` in the wrapping status line."""
        self.status.set_message(text)

    def _update_time(self) -> None:
        elapsed = time.monotonic() - self._t0
        text = f"{format_duration(elapsed)} elapsed"
        left = self.time_left()
        if self.state in ("running", "stopping") and left is not None:
            text += f" · about {format_duration(left)} left"
        elif self.state == "stopping":
            text += " · stopping"
        self.time_label.set_message(text)

    def on_stage(self, stage: JobStage) -> None:
        """A stage update: ``device`` is shown for the whole run; each warning and note of
        the core becomes a notification (every run, each text once per run); others are for
        subclasses."""
        if stage.name == "device":
            self.device_label.set_message(f"device: {stage.message}")
            self.device_label.setVisible(True)
        elif stage.name in (WARNING_STAGE, NOTE_STAGE):
            self.tell(stage.message, "warning" if stage.name == WARNING_STAGE else "info")

    def tell(self, message: str, kind: str = "info") -> None:
        """Show ``message`` as a notification unless this run already showed it."""
        if message and message not in self.warnings_shown:
            self.warnings_shown.append(message)
            notify(kind, message)

    def on_tick(self) -> None:
        """Called after each batch of updates (throttled redraws go here)."""

    def on_other(self, update: Any) -> None:
        """Job-specific updates (training records)."""

    def on_done(self, result: Any) -> None:
        """The job returned ``result`` (GUI thread)."""
        raise NotImplementedError

    def on_finished(self) -> None:
        """After the job ended, whatever the outcome."""


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
