"""Command-line options derived from a pydantic config: one source for types, choices and help.

A front end lists which config field gets which flag (the flag names are its interface); the
type, ``nargs``, choices and help text come from the field, so that a default or a
description is written once, in the config.  Used by ``simulate``; ``train`` has the same rule
written for TrainConfig (``_cli/train.py``).

Nothing heavy is imported here; the config classes are passed in.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line.

    Parameters
    ----------
    flag
        The option, e.g. ``"--size"``.
    scale
        Factor from the flag's unit to the field's (``--voltage`` kV -> ``energy_eV``: 1e3).
    help
        Help text replacing the field's description (needed where the unit differs).
    metavar
        argparse metavar (default: argparse's).
    nargs
        argparse nargs replacing the derived one (``"*"`` lets a front end explain an empty
        list itself).
    dest_name
        argparse destination (default: from the flag, ``--n-structures`` -> ``n_structures``;
        give the field's name to read parsed options by field).
    """

    flag: str
    scale: float = 1.0
    help: str | None = None
    metavar: str | None = None
    nargs: str | None = None
    dest_name: str | None = None

    @property
    def dest(self) -> str:
        """The argparse destination of the option."""
        return self.dest_name or self.flag.lstrip("-").replace("-", "_")


def field_help(model: type, name: str) -> str:
    """A field's description as one line of help text (``%`` escaped for argparse)."""
    f = model.model_fields[name]
    return " ".join((f.description or name).split()).replace("%", "%%")


def _strip_optional(ann: Any) -> Any:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return ann


def _shown(value: Any, scale: float) -> str:
    """A default as the user types it, in the flag's unit."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v, scale) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value / scale:g}"
    return str(value)


def describe_defaults(defaults: dict[str, Any], scale: float = 1.0) -> str:
    """``"default: X"``, or ``"laptop: X; study: Y"`` where the starting points differ.

    ``defaults`` maps a starting point's name (a preset) to the field's value there.
    """
    shown = {name: _shown(v, scale) for name, v in defaults.items()}
    if len(set(shown.values())) == 1:
        return f"default: {next(iter(shown.values()))}"
    return "; ".join(f"{name}: {v}" for name, v in shown.items())


def flag_kwargs(
    model: type,
    name: str,
    spec: Flag,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """argparse keyword arguments of ``spec`` for the field ``name`` of ``model``.

    The option's default is ``argparse.SUPPRESS``: an option left out is absent from the
    parsed namespace and the config keeps its own value; the help text shows that value
    (``defaults``: starting point -> value; default: the field's default).

    Lists and tuples take several values (``nargs="+"``); ``Literal`` fields get ``choices``;
    ``int``/``float``/``str`` fields (or their elements) get that ``type``.
    """
    f = model.model_fields[name]
    ann = _strip_optional(f.annotation)
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": spec.dest}
    origin = typing.get_origin(ann)
    element = ann
    if origin in (list, tuple):
        kw["nargs"] = "+"
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        element = _strip_optional(args[0]) if args else str
    elif origin in (typing.Union, types.UnionType):
        # e.g. list[float] | Literal["all"]: several values, given as text (the config
        # converts them; a front end may read words such as "all" itself)
        if any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(ann)):
            kw["nargs"] = "+"
        element = None
    if typing.get_origin(element) is typing.Literal:
        kw["choices"] = typing.get_args(element)
    elif element in (int, float, str):
        kw["type"] = element
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.nargs:
        kw["nargs"] = spec.nargs
    if defaults is None:
        defaults = {"default": f.get_default(call_default_factory=True)}
    text = spec.help if spec.help is not None else field_help(model, name)
    text = re.sub(r"\.\s*$", "", text)
    kw["help"] = f"{text} ({describe_defaults(defaults, spec.scale)})"
    return kw


def add_config_flags(
    parser: argparse.ArgumentParser,
    model: type,
    flags: dict[str, Flag],
    defaults: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Add one option per entry of ``flags`` (field -> :class:`Flag`) to ``parser``.

    ``defaults`` maps a field to ``{starting point: value}`` for the help text.
    """
    for name, spec in flags.items():
        parser.add_argument(spec.flag, **flag_kwargs(model, name, spec, (defaults or {}).get(name)))


def overrides_from_args(args: argparse.Namespace, flags: dict[str, Flag]) -> dict[str, Any]:
    """The fields whose options were given, in the fields' units (``scale`` applied)."""
    out: dict[str, Any] = {}
    for name, spec in flags.items():
        if not hasattr(args, spec.dest):
            continue
        value = getattr(args, spec.dest)
        if spec.scale != 1 and value is not None:
            if isinstance(value, list):
                value = [v * spec.scale for v in value]
            else:
                value = value * spec.scale
        out[name] = value
    return out


def add_required_path(p: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    """Declare a required option that names a file or folder (parsed as a :class:`Path`)."""
    p.add_argument(flag, required=True, type=Path, metavar=metavar, help=help)
