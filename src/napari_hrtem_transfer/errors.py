"""Exceptions that carry enough context to tell the user what to do.

Every error a user can cause with bad input derives from :class:`HrtemTransferError`;
the command line turns it into a one-paragraph message and exit code 2, and the napari
layer into a notification.
"""

from __future__ import annotations


class HrtemTransferError(Exception):
    """Base class of all errors caused by bad input or a bad environment."""


class ConfigError(HrtemTransferError, ValueError):
    """A parameter has an invalid value.

    Parameters
    ----------
    message
        What is wrong and how to fix it.
    field
        Name of the offending parameter (CLI flag or config field), if known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class SimulationError(HrtemTransferError, RuntimeError):
    """The simulation cannot be run with the given settings."""


class DatasetError(HrtemTransferError, ValueError):
    """A dataset file is missing, unreadable or lacks what the task needs."""


class ReaderError(HrtemTransferError, OSError):
    """An image file cannot be read."""


class CheckpointError(HrtemTransferError, ValueError):
    """A model checkpoint is missing, corrupted or does not match its architecture."""


class MissingDependencyError(HrtemTransferError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, purpose: str, extra: str | None = None) -> None:
        hint = (
            f"pip install 'napari-hrtem-transfer[{extra}]'" if extra else f"pip install {package}"
        )
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. "
                         f"Install it with: {hint}")
        self.package = package
