"""Background jobs for the widgets: typed updates, a job runner and a generator bridge.

A long job (simulation, training, segmentation) is a plain function ``job(report, ...)``
that calls ``report(update)`` whenever it has news. The docks run it with
:class:`JobRunner` (a thread whose updates a timer in the GUI thread polls);
:func:`run_with_updates` turns the reports into a generator (for scripts and tests).
Exceptions do not escape: they travel as a :class:`JobFailed` update, so a failing job
shows a notification and never kills napari.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import queue
import threading
import traceback
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobProgress:
    """Progress of a job.

    Attributes
    ----------
    done, total
        Units of work finished and in all (e.g. structures simulated, frames segmented).
    message
        What is happening, for a status line.
    """

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True)
class JobFailed:
    """The job raised; ``error`` is the exception and ``trace`` its formatted traceback."""

    error: BaseException
    trace: str = ""

    @property
    def message(self) -> str:
        """One line for a notification: the error's message (its type if it has none)."""
        text = str(self.error).strip()
        return text or type(self.error).__name__


@dataclass(frozen=True)
class JobStage:
    """A job entered a new stage (e.g. the OOD-reference fit after training).

    ``name`` identifies the stage (``"ood"``), ``state`` is ``"running"``, ``"done"``,
    ``"skipped"`` or ``"failed"`` and ``message`` says what happened, in words.
    """

    name: str
    state: str
    message: str = ""


#: :class:`JobStage` names that carry words for the user: one warning of the core, one note.
WARNING_STAGE = "warning"
NOTE_STAGE = "notes"


class JobStopped(Exception):
    """Raised inside a job (e.g. from a progress callback) when the user pressed Stop."""


@dataclass(frozen=True)
class JobDone:
    """The job returned ``result``; always the last update of a successful job."""

    result: Any


_END = object()


def run_with_updates(
    job: Callable[..., Any], *args: Any, **kwargs: Any
) -> Generator[Any, None, Any]:
    """Run ``job(report, *args, **kwargs)`` on a helper thread and yield its reports.

    Parameters
    ----------
    job
        A function whose first argument is ``report``, a callable taking one update.
    *args, **kwargs
        Passed on to ``job``.

    Yields
    ------
    object
        Every update the job reports, in order, then :class:`JobDone` with its return
        value, or :class:`JobFailed` if it raised.

    Returns
    -------
    object
        The job's return value (None if it failed).
    """
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = job(updates.put, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the GUI, never lost
            outcome["error"] = exc
            outcome["trace"] = traceback.format_exc()
        finally:
            updates.put(_END)

    thread = threading.Thread(target=target, name=f"hrtem-{getattr(job, '__name__', 'job')}",
                              daemon=True)
    thread.start()
    while True:
        item = updates.get()
        if item is _END:
            break
        yield item
    thread.join()
    if "error" in outcome:
        yield JobFailed(outcome["error"], outcome.get("trace", ""))
        return None
    yield JobDone(outcome.get("result"))
    return outcome.get("result")


class JobRunner:
    """Run ``job(report, *args, **kwargs)`` on a thread; collect its updates in a queue.

    The GUI polls :meth:`poll` from a timer (so redraws are throttled and no Qt object is
    touched from the job's thread), :meth:`request_stop` sets the ``stop`` event the job
    checks between steps, and :meth:`join` waits for the thread (closing a window waits
    for the current step, so no job outlives the widgets it reports to).

    Nothing here imports Qt.
    """

    def __init__(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.stop_event = threading.Event()
        self._updates: queue.Queue = queue.Queue()
        self._job, self._args, self._kwargs = job, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._target, name=f"hrtem-{getattr(job, '__name__', 'job')}", daemon=False
        )
        _RUNNERS.add(self)

    def _target(self) -> None:
        try:
            self.result = self._job(self._updates.put, *self._args, **self._kwargs)
            self._updates.put(JobDone(self.result))
        except BaseException as exc:  # noqa: BLE001 - reported to the GUI, never lost
            self.error = exc
            self._updates.put(JobFailed(exc, traceback.format_exc()))
        finally:
            self._updates.put(_END)

    def start(self) -> JobRunner:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the job's thread still runs."""
        return self._thread.is_alive()

    def request_stop(self) -> None:
        """Ask the job to stop at its next check (between steps, frames or structures)."""
        self.stop_event.set()

    def poll(self, max_items: int = 10_000) -> tuple[list[Any], bool]:
        """Updates received since the last call, and whether the job has ended."""
        items: list[Any] = []
        ended = False
        for _ in range(max_items):
            try:
                item = self._updates.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                ended = True
                break
            items.append(item)
        return items, ended

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            _RUNNERS.discard(self)
        return ended


_RUNNERS: weakref.WeakSet[JobRunner] = weakref.WeakSet()


def stop_all_jobs(timeout: float = 120.0) -> bool:
    """Ask every running job to stop and wait for them (at most ``timeout`` s in all)."""
    import time

    runners = list(_RUNNERS)
    for r in runners:
        r.request_stop()
    deadline = time.monotonic() + timeout
    ok = True
    for r in runners:
        ok &= r.join(max(0.0, deadline - time.monotonic()))
    return ok


def _stop_jobs_at_exit() -> None:  # before Python joins non-daemon threads
    stop_all_jobs(timeout=120.0)


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_stop_jobs_at_exit)
