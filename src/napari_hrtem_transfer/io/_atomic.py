"""Write files under a temporary name and rename them when complete."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that ``path`` can be created, before any expensive work starts.

    Parameters
    ----------
    path
        The file that will be written.
    flag
        Name of the option that gave the path, used in the error message.

    Returns
    -------
    Path
        The path, resolved.

    Raises
    ------
    ConfigError
        If the folder does not exist, is not a folder, or is not writable.
    """
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise ConfigError(
            f"{flag} {p} is a folder; give a file name such as {p / 'data.hspy'}.", flag
        )
    if not parent.exists():
        raise ConfigError(
            f"{flag} {p}: the folder {parent} does not exist. Create it first (mkdir -p {parent}) "
            "or choose another path.",
            flag,
        )
    if not os.access(parent, os.W_OK):
        raise ConfigError(
            f"{flag} {p}: the folder {parent} is not writable. Choose another path.", flag
        )
    return p.resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it over ``path`` on success.

    The temporary file keeps the suffix of ``path`` (writers choose their format from it) and
    is removed if the body raises, so an interrupted write never leaves a partial file under
    the final name.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()
