"""Exceptions that carry enough context to tell the user what to do.

Every error a user can cause with bad input derives from :class:`HrtemTransferError`;
the command line turns it into a one-paragraph message and exit code 2, and the napari
layer into a notification.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


class HrtemTransferError(Exception):
    """Base class of all errors caused by bad input or a bad environment."""


def reword(message: str, names: Mapping[str, str], only: Iterable[str] | None = None) -> str:
    """Replace parameter names in ``message`` by a front end's names for them.

    Parameters
    ----------
    message
        Text that names config fields, e.g. ``"use a larger image_size_px"``.
    names
        Config field -> the front end's name (``{"image_size_px": "--size"}``).
    only
        Replace only these fields (default: every field of ``names``).

    A name is replaced only where it stands alone (not inside a longer name or a path).
    """
    keys = [k for k in names if only is None or k in set(only)]
    for key in sorted(keys, key=len, reverse=True):
        message = re.sub(rf"(?<![\w./-]){re.escape(key)}(?![\w/-])", names[key], message)
    return message


class ConfigError(HrtemTransferError, ValueError):
    """A parameter has an invalid value.

    The core names its config fields (``image_size_px``, ``radius_nm``), never a front end's
    spelling of them; each front end rewords the error for its users with :meth:`reworded`
    (the command line maps fields to flags).

    Parameters
    ----------
    message
        What is wrong and how to fix it, naming the offending config field(s).
    field
        Name of the offending parameter (config field, or a front end's name), if known.
    fields
        Every parameter the message names (``field`` first; default ``(field,)``).

    Attributes
    ----------
    field
        As given (``None`` if unknown).
    fields
        Tuple of every named parameter.
    message
        The message as given.
    """

    def __init__(
        self, message: str, field: str | None = None, *, fields: Iterable[str] | None = None
    ) -> None:
        named = tuple(fields) if fields is not None else ()
        if field is not None and field not in named:
            named = (field, *named)
        self.field = field if field is not None else (named[0] if named else None)
        self.fields = named
        self.message = message
        super().__init__(message)

    def reworded(self, names: Mapping[str, str]) -> ConfigError:
        """The same error in a front end's words: its fields renamed with ``names``.

        Fields without an entry in ``names`` keep their config names.
        """
        field = names.get(self.field, self.field) if self.field is not None else None
        return ConfigError(
            reword(self.message, names, self.fields),
            field,
            fields=[names.get(f, f) for f in self.fields],
        )


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


def _location(loc: Iterable[object]) -> str:
    """A pydantic error location as a config path: ``grid.freeze[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def config_error_from_validation(
    exc: Exception,
    names: Mapping[str, str] | None = None,
    *,
    source: str | None = None,
    first_only: bool = False,
) -> ConfigError:
    """One :class:`ConfigError` from a pydantic ``ValidationError``: the conversion of every job.

    Each problem reads ``location: message (got value)``, problems joined by ``"; "``.

    Parameters
    ----------
    exc
        A ``pydantic.ValidationError`` (anything with pydantic's ``errors()`` list).
    names
        Config field -> a front end's name for it (``{"image_size_px": "--size"}``): the
        location of a problem is shown with it, and field names standing alone in the
        messages are reworded (see :func:`reword`; only names with an underscore, which
        cannot be ordinary words).  Default: the config's own field names.
    source
        What was validated (a file name): prefixes the message.
    first_only
        Report only the first problem.

    Returns
    -------
    ConfigError
        ``field`` is the first problem's (renamed) top-level field, ``fields`` all of them.
        Raise it ``from None``: the pydantic traceback says nothing more to a user.
    """
    names = dict(names or {})
    identifiers = [k for k in names if "_" in k]
    errors = list(exc.errors())  # type: ignore[attr-defined]
    if first_only:
        errors = errors[:1]
    parts: list[str] = []
    fields: list[str] = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        top = str(loc[0]) if loc else ""
        shown = names.get(top, top)
        where = _location((shown, *loc[1:])) if loc else ""
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if identifiers:
            msg = reword(msg, names, identifiers)
        if err.get("type") == "missing":
            msg = "is missing; give a value"
        else:
            got = err.get("input")
            if not isinstance(got, (dict, list)) and "got" not in msg:
                msg += f" (got {got!r})"
        parts.append(f"{where}: {msg}" if where else msg)
        if shown and shown not in fields:
            fields.append(shown)
    text = "; ".join(parts) or str(exc)
    if source:
        text = f"{source}: {text}"
    return ConfigError(text, fields[0] if fields else None, fields=fields)
