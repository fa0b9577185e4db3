"""Closing the viewer while a job runs: the job stops within a step, the checkpoint stays
loadable and the process exits cleanly (no abort, no update of deleted widgets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui


@pytest.mark.slow
def test_closing_the_viewer_mid_training_exits_cleanly(tmp_path, tiny_dataset_path):
    env = dict(os.environ, HRTEM_TRANSFER_RECENT_MODELS=str(tmp_path / "recent.json"))
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    script = Path(__file__).with_name("_close_mid_training.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tiny_dataset_path), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "terminate called" not in log and "wrapped C/C++ object" not in log, log
    assert "closing the viewer at step" in log and "stopped=True" in log, log
    assert "checkpoint loads" in log, log
