"""README screenshots of each napari dock in use, from a real viewer (run under Xvfb).

    xvfb-run -a python scripts/screenshots.py [--out docs/images] [--epochs 3]

Opens the packaged sample defocus series, trains a small model in the Train dock (a few
epochs on the sample, CPU), segments the series with it in the Segment dock (per-frame OOD
in the Labels layer's features, the OOD dock and the canvas overlay), shows the published
study's generalization in the Evaluate dock, and saves one PNG per dock plus the whole
window into ``docs/images/napari_*.png``. Everything shown is computed by the run itself.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--theme", default="dark", choices=["dark", "light"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hrtem_screenshots_"))
    os.environ.setdefault("HRTEM_TRANSFER_RECENT_MODELS", str(tmp / "recent.json"))

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hrtem_transfer._napari._widgets import (
        EvaluateWidget,
        SegmentWidget,
        SimulateWidget,
        TrainWidget,
    )

    viewer = napari.Viewer(show=True, title="napari-hrtem-transfer")
    viewer.theme = args.theme
    viewer.window._qt_window.resize(1600, 1000)
    sample = ROOT / "sample_data" / "defocus_series_small.hspy"
    layers = viewer.open(str(sample), plugin="napari-hrtem-transfer")
    image = layers[0]

    def wait(pred, timeout: float = 1800.0) -> None:
        t0 = time.monotonic()
        while not pred():
            QApplication.processEvents()
            time.sleep(0.02)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("the dock did not finish in time")
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.01)

    def save(widget, name: str) -> None:
        path = args.out / f"napari_{name}.png"
        from qtpy.QtCore import QRect

        body = getattr(widget, "body", widget)  # the whole form, not the scrolled view
        height = min(body.height(), body.sizeHint().height())
        body.grab(QRect(0, 0, body.width(), height)).save(str(path))
        print(f"wrote {path}", flush=True)

    sim = SimulateWidget(viewer)
    viewer.window.add_dock_widget(sim, name="Simulate", area="right")
    wait(lambda: True)
    save(sim, "simulate")

    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train", area="right", tabify=True)
    train.dataset.value = sample
    from napari_hrtem_transfer._napari._widgets._models import PRETRAINED, resolve_model

    # fine-tune the shipped model on the sample when it is installed, else pretrain on it
    train.model.value = PRETRAINED if resolve_model(PRETRAINED) is not None else ""
    train.out_dir.value = tmp / "model"
    train.epochs.value = args.epochs
    train.batch_size.value = 4
    train.patch_size.value = 128
    train.device.value = "cpu"
    train.start()
    wait(lambda: not train.running)
    print(f"train: {train.status.value} | {train.ood_status.value}", flush=True)
    save(train, "train")

    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment", area="right", tabify=True)
    seg.image.value = image
    seg.model.value = tmp / "model"
    seg.start()
    wait(lambda: not seg.running)
    print(f"segment: {seg.status.value} | {seg.ood_label.value}", flush=True)
    save(seg, "segment")
    if seg.ood_view is not None:
        seg.ood_view.go_to(int(seg.ood_view.ranking[0]))  # the least training-like frame
        wait(lambda: True)
        save(seg.ood_view, "ood")

    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev, name="Evaluate", area="right", tabify=True)
    wait(lambda: True)
    save(ev, "evaluate")

    if seg.ood_view is not None:
        seg.ood_view.parent().raise_()
    try:  # close the notification toasts covering the canvas overlay
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
    except ImportError:
        pass
    t_end = time.monotonic() + 1.0
    wait(lambda: time.monotonic() > t_end)
    path = args.out / "napari_window.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}", flush=True)
    viewer.close()


if __name__ == "__main__":
    main()
