"""The progress and stop conventions every long job of the package shares.

A job (training, the OOD-reference fit, evaluation, segmentation, a sweep, an export) reports
progress to a :data:`Progress` callable and checks a :data:`StopRequest` between units of
work. :func:`stop_checker` turns any stop request into one ``() -> bool`` function. This
module imports nothing heavy (no torch), so every layer from training up can use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import ConfigError

__all__ = ["Progress", "StopRequest", "stop_checker"]

#: ``progress(done, total, message)``: units done so far, units in all, what was just done.
Progress = Callable[[int, int, str], None]

#: A ``threading.Event`` (set = stop), a callable returning True to stop, or None (never).
StopRequest = threading.Event | Callable[[], bool] | None


def stop_checker(stop: StopRequest) -> Callable[[], bool]:
    """The function a job calls between units of work: True once a stop is requested.

    Parameters
    ----------
    stop
        A ``threading.Event``, a callable returning bool, or None (the job never stops).

    Raises
    ------
    ConfigError
        ``stop`` is none of these.
    """
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise ConfigError(
        f"stop must be a threading.Event or a callable returning bool (got {stop!r})", "stop"
    )
