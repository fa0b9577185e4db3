"""Run by test_lifecycle.py in a subprocess: start training in the Train dock of a real
viewer, close the viewer mid-training, check the process ends cleanly with a checkpoint.

Usage: python _close_mid_training.py DATASET.hspy OUT_DIR
"""

from __future__ import annotations

import sys
import threading
import time


def main(dataset: str, out: str) -> int:
    import napari
    from qtpy.QtCore import QTimer

    from napari_hrtem_transfer._napari._widgets import TrainWidget

    viewer = napari.Viewer(show=True)
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="train")
    w.dataset.value = dataset
    w.out_dir.value = out
    w.model.value = ""
    w.epochs.value = 1000
    w.batch_size.value = 4
    w.patch_size.value = 32
    w.device.value = "cpu"
    w.start()
    assert w.running, w.status.value
    runner = w.runner
    state = {"t_close": None}

    def close_when_training() -> None:
        if len(w.plot.steps) >= 2:
            print(f"closing the viewer at step {len(w.plot.steps)}", flush=True)
            state["t_close"] = time.monotonic()
            viewer.close()
        else:
            QTimer.singleShot(20, close_when_training)

    QTimer.singleShot(20, close_when_training)
    napari.run()
    waited = time.monotonic() - state["t_close"]
    alive = [t.name for t in threading.enumerate() if t.name.startswith("hrtem-")]
    print(f"event loop ended {waited:.2f} s after close; job threads alive: {alive}", flush=True)
    if alive or runner.alive:
        return 3
    result = runner.result
    print(f"stopped={result.stopped} epochs_completed={result.epochs_completed}", flush=True)
    if not result.stopped:
        return 4
    from napari_hrtem_transfer.training import load_checkpoint

    lm = load_checkpoint(out, which="last")
    print(f"checkpoint loads: {type(lm.model).__name__}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
