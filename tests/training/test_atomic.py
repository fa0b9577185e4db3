"""The shared atomic writers (io.atomic) used by checkpoints: all or nothing, no leftovers."""

from __future__ import annotations

import os

import pytest

from napari_hrtem_transfer.io import atomic
from napari_hrtem_transfer.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "side.json"
    write_text_atomic(target, "old")
    write_bytes_atomic(target, b"new \xce\xbc")
    assert target.read_bytes() == b"new \xce\xbc"
    assert sorted(os.listdir(tmp_path)) == ["side.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "w.safetensors"
    write_bytes_atomic(target, b"complete")
    with pytest.raises(RuntimeError), atomic_path(target, fsync=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"complete"
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_fsync_flushes_file_then_folder(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(fd) or real(fd))
    write_bytes_atomic(tmp_path / "a", b"x")
    assert len(calls) == (2 if os.name == "posix" else 1)  # the file, then its folder
    calls.clear()
    write_bytes_atomic(tmp_path / "b", b"x", fsync=False)
    assert calls == []
