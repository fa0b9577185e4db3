"""Running one job from a dock: Run/Stop, progress with elapsed time and ETA, status lines.

:class:`JobDock` runs its job through
:class:`~napari_hrtem_transfer._napari._workers.JobRunner`: updates are polled by a timer in
the GUI thread (never a Qt call from the job's thread), so redraws are throttled. Closing the
dock or the viewer stops the job at its next step and waits for it, so no job outlives the
widgets it reports to and the process exits cleanly.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QProgressBar, QPushButton

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
from ._dock import DockWidget
from ._text import WrapLabel, format_duration, notify

if TYPE_CHECKING:
    import napari

#: How often the GUI takes the job's updates [ms] (redraws are throttled to this or slower).
POLL_MS = 50


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
