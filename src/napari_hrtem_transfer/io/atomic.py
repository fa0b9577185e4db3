"""Write files under a temporary name and rename them when complete.

The one home of atomic writes for the package: :func:`atomic_path` (a temporary path renamed
over the target on success), :func:`write_text_atomic` / :func:`write_bytes_atomic`,
:class:`AtomicGroup` (several files renamed together, all or none), :func:`check_writable`
(fail before expensive work) and :func:`deferred_interrupt` (Ctrl+C waits for the renames).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "AtomicGroup",
    "atomic_path",
    "check_writable",
    "deferred_interrupt",
    "write_bytes_atomic",
    "write_text_atomic",
]


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened."""
    if os.name != "posix":  # pragma: no cover - Windows cannot open folders
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it over ``path`` on success.

    The temporary file keeps the suffix of ``path`` (writers choose their format from it) and
    is removed if the body raises, so an interrupted write never leaves a partial file under
    the final name.

    Parameters
    ----------
    path
        The final file.
    fsync
        Flush the file to disk before the rename, and the folder after it, so that after a
        power loss the file is either the old or the complete new one (checkpoints, sidecars).
    """
    final = Path(path)
    tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` under a temporary name, flush it, then rename it.

    Returns
    -------
    Path
        ``path``.
    """
    final = Path(path)
    with atomic_path(final, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return final


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` under a temporary name, flush it, then rename it.

    Returns
    -------
    Path
        ``path``.
    """
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


class AtomicGroup:
    """Several files written under temporary names and renamed together at the end.

    Use as a context manager: :meth:`path` gives the temporary name to write a final file
    to; when the block ends without an exception every file is renamed into place, and when
    it raises (a ``KeyboardInterrupt`` included) every temporary file is removed, so that a
    run leaves either all its outputs or none of them.
    """

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike) -> Path:
        """The temporary sibling to write ``final`` to (same suffix)."""
        final = Path(final)
        tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
        self._pending.append((tmp, final))
        return tmp

    def __enter__(self) -> AtomicGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for tmp, final in self._pending:
                    if self.fsync:
                        _fsync_file(tmp)
                    os.replace(tmp, final)
                if self.fsync and self._pending:
                    _fsync_dir(self._pending[0][1].parent)
        finally:
            for tmp, _ in self._pending:
                if tmp.exists():
                    with contextlib.suppress(OSError):
                        tmp.unlink()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], None]]:
    """Hold Ctrl-C (SIGINT) while files are written; yield ``check()`` to act on it.

    A Ctrl-C that arrives inside a library's write (h5py, tifffile) can be raised in a
    finaliser, where Python only prints "Exception ignored ..." and the program carries on
    as if nothing had happened.  Inside this block SIGINT only sets a flag; ``check()``
    raises :class:`KeyboardInterrupt` at a point of our choosing (between files), and the
    block's end raises it if ``check()`` was not called since.  Outside the main thread it
    does nothing (signals are delivered to the main thread only).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    hit: list[int] = []

    def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        hit.append(signum)

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield check
        check()
    finally:
        signal.signal(signal.SIGINT, previous)
