"""What export and import share: the package format's names, the export config, the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..training.progress import Progress as Progress

#: Key of our section in the package's ``config``.
CONFIG_KEY = "napari_hrtem_transfer"
#: ``config.napari_hrtem_transfer.format`` of the packages we write.
PACKAGE_FORMAT = "napari-hrtem-transfer bioimageio package"
PACKAGE_FORMAT_VERSION = "1"
#: The architecture callable written into every package (``import_from`` / ``callable``).
ARCHITECTURE_IMPORT = "napari_hrtem_transfer.models.factory"
ARCHITECTURE_CALLABLE = "build_model"
#: Architecture callables of this package that an imported package may name.
OUR_CALLABLES: dict[tuple[str, str], str] = {
    ("napari_hrtem_transfer.models.factory", "build_model"): "config",
    ("napari_hrtem_transfer.models", "build_model"): "config",
    ("napari_hrtem_transfer.models.unet", "compact_unet"): "compact",
    ("napari_hrtem_transfer.models", "compact_unet"): "compact",
    ("napari_hrtem_transfer.models.unet", "resnet18_unet"): "resnet18",
    ("napari_hrtem_transfer.models", "resnet18_unet"): "resnet18",
}
#: Environment variable: where imported packages are unpacked (default: the user cache).
CACHE_ENV = "HRTEM_TRANSFER_CACHE_DIR"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
STUDY_CITATION = (
    'L. Rangel DaCosta, H. Oill, M. Scott, "Strategies for effective transfer learning for '
    'HRTEM analysis with neural networks", Elemental Microscopy EM000010 (2025).'
)
#: bioimage.io requires a DOI or a URL with each citation; the journal's site (no DOI known).
STUDY_URL = "https://elementalmicroscopy.com"
#: bioimage.io space units -> Å.
UNIT_TO_A = {
    "picometer": 0.01,
    "angstrom": 1.0,
    "nanometer": 10.0,
    "micrometer": 1e4,
    "millimeter": 1e7,
    "centimeter": 1e8,
    "meter": 1e10,
}
MAX_MEMBER_BYTES = 2 << 30  # refuse zip members above 2 GiB (zip bombs)



class BioimageioExportConfig(BaseModel):
    """Choices of an export, with their defaults (one source for the CLI and Python)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    which: str = Field(default="best", pattern="^(best|last)$")
    """Which checkpoint of the model folder to export."""

    name: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9_+\- ()]+$")
    """Package name: letters, digits, spaces and _+-() only (bioimage.io's rule; default:
    from the model and its training stage)."""

    description: str | None = Field(default=None, max_length=1024)
    """One-paragraph description (default: generated from the checkpoint)."""

    authors: list[str] = Field(default_factory=lambda: ["napari-hrtem-transfer developers"])
    """Authors of the model (the people who trained it)."""

    license: str = "BSD-3-Clause"
    """SPDX licence identifier of the weights."""

    torchscript: bool = False
    """Also write TorchScript weights (traced; +the weights' size again), for consumers that
    cannot import napari-hrtem-transfer, such as deepImageJ in Fiji."""

    test: bool = True
    """Run ``bioimageio.core.test_model`` on the written package (fails the export if the
    package does not reproduce its test output)."""

    overwrite: bool = False
    """Replace an existing output file."""


@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote."""

    path: Path
    sha256: str
    name: str
    n_bytes: int
    ood_reference: bool
    caution_level: float | None
    test_passed: bool | None
    notes: list[str] = field(default_factory=list)


def need_spec() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError as exc:
        raise ConfigError(
            "exporting a bioimage.io package needs bioimageio.spec and bioimageio.core: "
            "pip install 'napari-hrtem-transfer[bioimageio]'",
            "bioimageio",
        ) from exc
    return spec


def format_version() -> str:
    """The newest model spec version of the installed bioimageio.spec (0.5.x)."""
    from bioimageio.spec.model.v0_5 import ModelDescr

    return str(ModelDescr.implemented_format_version)


def torch_version() -> str:
    import torch

    return str(torch.__version__).split("+", 1)[0]


def is_bioimageio_package(model: Any) -> bool:
    """True if ``model`` names a bioimage.io package: a ``.zip``, an ``rdf.yaml`` /
    ``bioimageio.yaml`` file, or a folder with one of them and no ``best.json``/``last.json``."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    p = Path(model).expanduser()
    if p.suffix.lower() == ".zip" or p.name in RDF_NAMES:
        return True
    if p.is_dir() and not (p / "best.json").exists() and not (p / "last.json").exists():
        return any((p / n).is_file() for n in RDF_NAMES)
    return False


def package_cache_dir() -> Path:
    """Where imported packages are unpacked: ``$HRTEM_TRANSFER_CACHE_DIR``, else the user's
    cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) ``/napari-hrtem-transfer``; a
    ``bioimageio/<sha256>`` folder per package."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        try:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("napari-hrtem-transfer"))
        except ImportError:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            root = Path(base) / "napari-hrtem-transfer"
    return root / "bioimageio"
