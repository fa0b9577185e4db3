"""Package versions and the provenance stamp written into every file the package produces.

One home for "which software made this file": datasets (``.hspy``), checkpoints, sweep
records, bioimage.io packages and segmentation results all build their ``versions`` and
``package``/``version``/``date`` fields here, and the file hashes that tie a record to
the bytes it describes. Only :mod:`importlib.metadata` is read: no
package is imported to learn its version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from datetime import UTC, datetime

__all__ = [
    "DISTRIBUTION",
    "SIMULATION_PACKAGES",
    "SWEEP_PACKAGES",
    "TRAINING_PACKAGES",
    "package_version",
    "package_versions",
    "sha256_file",
    "stamp",
    "utc_now",
]

#: The distribution name of this package.
DISTRIBUTION = "napari-hrtem-transfer"

#: What a simulated dataset records.
SIMULATION_PACKAGES = (DISTRIBUTION, "abtem", "ase", "hyperspy", "rosettasciio", "numpy")
#: What a checkpoint records.
TRAINING_PACKAGES = (DISTRIBUTION, "torch", "numpy", "safetensors", "pydantic")
#: What a sweep records (a checkpoint's packages plus the dask scheduler).
SWEEP_PACKAGES = (*TRAINING_PACKAGES, "distributed")


def package_version() -> str:
    """The installed version of napari-hrtem-transfer (``0.0.0+unknown`` when not installed)."""
    from .. import __version__

    return __version__


def package_versions(packages: Iterable[str] = TRAINING_PACKAGES) -> dict[str, str]:
    """``{distribution: version}`` for each of ``packages`` that is installed.

    Parameters
    ----------
    packages
        Distribution names (as on PyPI). Those not installed are left out, so the record
        says what was there rather than failing.
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def stamp() -> dict[str, str]:
    """``{"package", "version", "date"}``: who made a result and when (UTC, to the second)."""
    return {
        "package": DISTRIBUTION,
        "version": package_version(),
        "date": utc_now(),
    }


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (``2026-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
