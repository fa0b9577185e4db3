"""The scrolling dock every widget of the plugin is: a magicgui form and Qt rows.

:class:`DockWidget` is a ``QScrollArea`` holding a magicgui form, so every dock fits a small
screen (1280 x 800 with three docks) and scrolls instead of growing; closing the dock or the
viewer calls :meth:`DockWidget.on_closed`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QFrame,
    QHBoxLayout,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari


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
