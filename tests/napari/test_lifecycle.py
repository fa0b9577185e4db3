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


@pytest.mark.slow
def test_segment_delete_the_result_and_segment_again_does_not_crash(tmp_path):
    """Real soot sample, Segment, delete the segmentation layer, Segment again: no crash in
    vispy's glDrawArrays (the OOD dock must not hide napari's text overlay in the same
    event-loop turn as the layer removal). A real viewer, in a subprocess."""
    env = dict(os.environ, HRTEM_TRANSFER_RECENT_MODELS=str(tmp_path / "recent.json"),
               OMP_NUM_THREADS="1")
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    script = Path(__file__).with_name("_segment_delete_segment.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=540, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Segmentation fault" not in log, log[-4000:]
    assert "segmentation 2:" in log and "viewer survived" in log, log[-4000:]
