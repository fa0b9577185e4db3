"""Background jobs for the widgets: typed updates and a thread-to-generator bridge.

A long job (simulation, training, segmentation) is a plain function ``job(report, ...)``
that calls ``report(update)`` whenever it has news. :func:`run_with_updates` runs it on a
helper thread and turns the reports into a generator, which napari's ``thread_worker``
runs off the GUI thread; every yielded value reaches the widget in the GUI thread through
the worker's ``yielded`` signal. Exceptions do not escape: they travel as a
:class:`JobFailed` update, so a failing job shows a notification and never kills napari.

Nothing here imports Qt; the generator can be iterated directly in tests.
"""

from __future__ import annotations

import queue
import threading
import traceback
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


def start_worker(
    job: Callable[..., Any],
    *args: Any,
    on_update: Callable[[Any], None],
    on_finished: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Start ``job`` in a napari ``thread_worker``; ``on_update`` gets every update.

    Returns the started worker (a ``GeneratorWorker``).
    """
    from napari.qt.threading import create_worker

    worker = create_worker(run_with_updates, job, *args, _start_thread=False, **kwargs)
    worker.yielded.connect(on_update)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    worker.start()
    return worker
