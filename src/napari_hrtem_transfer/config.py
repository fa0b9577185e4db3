"""Every configuration of the package in one place, and one versioned file format for them.

Each job has one validated pydantic model, defined next to the code that uses it (the one
source of its defaults); this module re-exports them all, lazily, so that
``from napari_hrtem_transfer.config import SimulationConfig`` works without importing the
other jobs:

==========================  ===========================================================
``SimulationConfig``        a simulated defocus series (:mod:`.simulate.config`)
``TrainConfig``             a pretraining or fine-tuning run (:mod:`.training.config`)
``CompactUNetConfig``,      the architectures (:mod:`.models.config`; ``ModelConfig`` is
``ResNet18UNetConfig``      their union)
``SegmentConfig``           segmenting images with a trained model (:mod:`.segmentation`)
``OODFitConfig``            fitting the label-free OOD reference (:mod:`.evaluation.ood`)
``VerdictConfig``           the per-frame OOD verdict's weights and limits (ditto)
``BioimageioExportConfig``  exporting a model as a bioimage.io package (:mod:`.bioimageio`)
``SweepConfig``, ...        a grid of transfer experiments (:mod:`.sweep.config`; with
                            ``DataSettings``, ``GridSettings``, ``StageSettings``,
                            ``RunSettings``)
``ResampleConfig``          the limits of resampling frames to a model's pixel size
                            (:mod:`.io.frames`)
``SidecarV1``, ...          file schemas, read and written by their own code, not by this
``ReferenceFile``, ...      module: the checkpoint sidecar (:mod:`.training.sidecar`),
                            the OOD reference (:mod:`.evaluation.ood`, with
                            ``ImagingDomain``)
==========================  ===========================================================

Files (TOML)::

    kind = "simulation"          # which config: see KINDS
    version = "1"                # the kind's format version
    null = ["dose_e_per_A2"]     # fields set to None (TOML has no null); optional

    [fields]
    material = "Au"
    defocus_nm = [-5.0, 0.0, 5.0]
    ...

:func:`save_config` writes every field (atomically), :func:`load_config` validates a file with
the kind's pydantic model and refuses an unknown kind or version, a missing or misspelled
field or a bad value with a :class:`~.errors.ConfigError` that names the file, the field and
the fix.  Fields left out of a file keep their defaults.  Paths are read as written (relative
ones relative to the working directory).  Units as in the models: lengths in Å (``*_A``)
unless the name says nm (``*_nm``), dose in e/Å², energy in eV; defocus as abTEM
(``defocus = -C10``, positive = underfocus).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, config_error_from_validation
from .lazy import lazy_exports

# ----------------------------------------------------------------------- lazy re-exports
# The home module of every name, imported when one of its names is first asked for.  The
# same imports stand in the TYPE_CHECKING block for type checkers and for the import graph
# (import-linter sees the dependencies) but never run; the names are public through __all__.
if TYPE_CHECKING:
    from .bioimageio import BioimageioExportConfig  # noqa: F401
    from .evaluation.independent import IndependentConfig  # noqa: F401
    from .evaluation.ood import ImagingDomain, OODFitConfig, ReferenceFile, VerdictConfig  # noqa: F401
    from .io.frames import ResampleConfig  # noqa: F401
    from .models.config import (  # noqa: F401
        CompactUNetConfig,
        ModelConfig,
        ResNet18UNetConfig,
    )
    from .models.normalization import PreprocessConfig  # noqa: F401
    from .segmentation import SegmentConfig  # noqa: F401
    from .simulate.config import SimulationConfig  # noqa: F401
    from .sweep.config import DataSettings, GridSettings, RunSettings, StageSettings, SweepConfig  # noqa: F401
    from .training.config import TrainConfig  # noqa: F401
    from .training.sidecar import SidecarNormalization, SidecarResume, SidecarTraining, SidecarV1  # noqa: F401

_HOMES: dict[str, str] = {
    "SimulationConfig": ".simulate.config",
    "TrainConfig": ".training.config",
    "CompactUNetConfig": ".models.config",
    "ResNet18UNetConfig": ".models.config",
    "ModelConfig": ".models.config",
    "SegmentConfig": ".segmentation",
    "OODFitConfig": ".evaluation.ood",
    "SweepConfig": ".sweep.config",
    "DataSettings": ".sweep.config",
    "GridSettings": ".sweep.config",
    "StageSettings": ".sweep.config",
    "RunSettings": ".sweep.config",
    "SidecarV1": ".training.sidecar",
    "SidecarNormalization": ".training.sidecar",
    "SidecarTraining": ".training.sidecar",
    "SidecarResume": ".training.sidecar",
    "ResampleConfig": ".io.frames",
    "VerdictConfig": ".evaluation.ood",
    "ImagingDomain": ".evaluation.ood",
    "ReferenceFile": ".evaluation.ood",
    "BioimageioExportConfig": ".bioimageio",
    "IndependentConfig": ".evaluation.independent",
    "PreprocessConfig": ".models.normalization",
}

#: File kind -> the name of its model.  A kind names a job, not a class, so that a class can
#: move or be renamed without breaking users' files.
KINDS: dict[str, str] = {
    "simulation": "SimulationConfig",
    "train": "TrainConfig",
    "segment": "SegmentConfig",
    "ood-fit": "OODFitConfig",
    "sweep": "SweepConfig",
    "compact-unet": "CompactUNetConfig",
    "resnet18-unet": "ResNet18UNetConfig",
    "resample": "ResampleConfig",
    "ood-verdict": "VerdictConfig",
    "bioimageio-export": "BioimageioExportConfig",
    "independent-check": "IndependentConfig",
    "preprocess": "PreprocessConfig",
}

#: Format version of a kind whose model has no ``version`` field of its own.
DEFAULT_VERSION = "1"

__all__ = [
    "DEFAULT_VERSION",
    "KINDS",
    "config_class",
    "kind_of",
    "load_config",
    "save_config",
    "supported_versions",
    *_HOMES,
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)


# ----------------------------------------------------------------------- kinds
def config_class(kind: str) -> type:
    """The pydantic model of a file kind (see :data:`KINDS`)."""
    name = KINDS.get(kind)
    if name is None:
        raise ConfigError(
            f"unknown config kind {kind!r}; this version of napari-hrtem-transfer reads the "
            f"kinds {', '.join(repr(k) for k in KINDS)}",
            "kind",
        )
    return globals()[name] if name in globals() else __getattr__(name)


def kind_of(cfg: Any) -> str:
    """The file kind of a config object."""
    for kind, name in KINDS.items():
        # compare names first: only the one candidate's home module is imported
        if type(cfg).__name__ == name and type(cfg) is config_class(kind):
            return kind
    raise ConfigError(
        f"a {type(cfg).__name__} cannot be saved as a config file; give one of "
        f"{', '.join(KINDS.values())}",
        "cfg",
    )


def supported_versions(kind: str) -> tuple[str, ...]:
    """Format versions of ``kind`` that this package reads (the model's ``version`` field, if
    it has one, else :data:`DEFAULT_VERSION`)."""
    import typing

    cls = config_class(kind)
    field = cls.model_fields.get("version")
    if field is None:
        return (DEFAULT_VERSION,)
    if typing.get_origin(field.annotation) is typing.Literal:
        return tuple(str(v) for v in typing.get_args(field.annotation))
    return (str(field.default),)


def _version_of(cfg: Any) -> str:
    return str(getattr(cfg, "version", DEFAULT_VERSION))


# ----------------------------------------------------------------------- None <-> TOML
def _strip_none(value: Any, path: str, nulls: list[str]) -> Any:
    """``value`` without None entries (their dotted paths appended to ``nulls``)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if v is None:
                nulls.append(sub)
            else:
                out[k] = _strip_none(v, sub, nulls)
        return out
    if isinstance(value, (list, tuple)):
        if any(v is None for v in value):
            raise ConfigError(
                f"{path}: a list holding None cannot be written to TOML; give values only",
                path,
            )
        return [_strip_none(v, f"{path}[{i}]", nulls) for i, v in enumerate(value)]
    return value


def _put_none(fields: dict[str, Any], nulls: Any, source: str) -> None:
    if not isinstance(nulls, list) or not all(isinstance(n, str) for n in nulls):
        raise ConfigError(f"{source}: 'null' must be a list of field names (got {nulls!r})", "null")
    for dotted in nulls:
        *parents, last = dotted.split(".")
        d = fields
        for p in parents:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"{source}: null entry {dotted!r} does not name a field", "null")
        if last in d:
            raise ConfigError(
                f"{source}: {dotted} is both given a value and listed in 'null'; keep one",
                dotted,
            )
        d[last] = None


# ----------------------------------------------------------------------- save / load
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    """One TOML value, inline (arrays and tables on one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, str):
        # a JSON string is a valid TOML basic string (same escapes)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise ConfigError(f"a value of type {type(value).__name__} cannot be written to TOML", None)


def _toml_table(table: dict[str, Any], name: str, lines: list[str]) -> None:
    """``[name]`` with its values, then its sub-tables as ``[name.key]``."""
    lines.append(f"[{name}]")
    subs = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            subs.append((key, value))
        else:
            lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    for key, value in subs:
        lines.append("")
        _toml_table(value, f"{name}.{_toml_key(str(key))}", lines)


def config_to_toml(cfg: Any) -> str:
    """The TOML text :func:`save_config` writes for ``cfg``."""
    kind = kind_of(cfg)
    fields = cfg.model_dump(mode="json")
    fields.pop("version", None)  # the file's own version says it
    nulls: list[str] = []
    fields = _strip_none(fields, "", nulls)
    lines = [
        f"# napari-hrtem-transfer {kind} config (napari_hrtem_transfer.config.save_config)",
        f"kind = {_toml_value(kind)}",
        f"version = {_toml_value(_version_of(cfg))}",
    ]
    if nulls:
        lines.append(f"null = {_toml_value(nulls)}  # fields set to None")
    lines.append("")
    _toml_table(fields, "fields", lines)
    return "\n".join(lines) + "\n"


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``cfg`` (any model of :data:`KINDS`) to a versioned TOML file, atomically.

    Returns the path written.  :func:`load_config` reads it back to an equal config.
    """
    from .io.atomic import write_text_atomic

    text = config_to_toml(cfg)
    return write_text_atomic(Path(path).expanduser(), text)


def config_from_toml(text: str, kind: str | None = None, *, source: str = "config") -> Any:
    """Validate the TOML text of a config file (see :func:`load_config`)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}", "config") from None
    extra = sorted(set(doc) - {"kind", "version", "null", "fields"})
    if "kind" not in doc or "fields" not in doc:
        raise ConfigError(
            f"{source} is not a napari-hrtem-transfer config file: it needs a top-level "
            "'kind' (e.g. kind = \"simulation\"), a 'version' and a [fields] table; write one "
            "with napari_hrtem_transfer.config.save_config",
            "config",
        )
    if extra:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(extra)}; put config values under "
            "[fields]",
            extra[0],
        )
    file_kind = doc["kind"]
    if not isinstance(file_kind, str) or file_kind not in KINDS:
        raise ConfigError(
            f"{source}: unknown config kind {file_kind!r}; this version of "
            f"napari-hrtem-transfer reads {', '.join(repr(k) for k in KINDS)}",
            "kind",
        )
    if kind is not None and file_kind != kind:
        config_class(kind)  # an unknown expected kind is the caller's error: say so
        raise ConfigError(
            f"{source} holds a {file_kind!r} config, but a {kind!r} config is needed here",
            "kind",
        )
    version = str(doc.get("version", ""))
    versions = supported_versions(file_kind)
    if version not in versions:
        raise ConfigError(
            f"{source}: {file_kind!r} config format version {doc.get('version')!r} is not "
            f"supported; this version of napari-hrtem-transfer reads version(s) "
            f"{', '.join(versions)} (upgrade the package to read newer files)",
            "version",
        )
    fields = doc["fields"]
    if not isinstance(fields, dict):
        raise ConfigError(f"{source}: [fields] must be a table of config values", "fields")
    if "null" in doc:
        _put_none(fields, doc["null"], source)
    cls = config_class(file_kind)
    unknown = sorted(set(fields) - set(cls.model_fields))
    if unknown:
        # refused for every kind, also for models that ignore extra keys: a misspelled
        # field in a file must not silently keep its default
        raise ConfigError(
            f"{source} [fields]: unknown field(s) {', '.join(unknown)}; {file_kind!r} configs "
            f"have {', '.join(cls.model_fields)}",
            unknown[0],
            fields=unknown,
        )
    if "version" in cls.model_fields:
        if "version" in fields and str(fields["version"]) != version:
            raise ConfigError(
                f"{source}: fields.version {fields['version']!r} differs from the file's "
                f"version {version!r}; remove fields.version",
                "version",
            )
        fields["version"] = version
    from pydantic import ValidationError

    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        raise config_error_from_validation(exc, source=f"{source} [fields]") from None


def load_config(path: str | os.PathLike, kind: str | None = None) -> Any:
    """Read and validate a config file written by :func:`save_config` (or by hand).

    Parameters
    ----------
    path
        The TOML file.
    kind
        The kind the caller needs (``"simulation"``, ...); None accepts any of :data:`KINDS`.

    Returns
    -------
    The validated model of the file's kind.

    Raises
    ------
    ConfigError
        The file is missing or unreadable, not TOML, not a config file, of an unknown or
        unexpected kind or an unsupported version, or a field is unknown or invalid (the
        message names the file and the field).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"config file {p} does not exist; write one with save_config (or check the path)",
            "config",
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc}", "config") from None
    return config_from_toml(text, kind, source=str(p))
