"""Text in the docks: wrapping labels, notifications, durations, the defocus tip."""

from __future__ import annotations

import re

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSizePolicy, QWidget

DEFOCUS_TIP = "abTEM sign convention: defocus = -C10; positive = underfocus, negative = overfocus."
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
