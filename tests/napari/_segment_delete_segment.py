"""Run by test_lifecycle.py in a subprocess (a real viewer under Xvfb): open the real soot
sample, Segment, delete the segmentation layer, Segment again; exit 0 when the viewer
survives (the sequence must not crash vispy's glDrawArrays).

Usage: python _segment_delete_segment.py
"""

from __future__ import annotations

import faulthandler
import sys
import time


def main() -> int:
    faulthandler.enable()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hrtem_transfer._napari._sample_data import real_hrtem_soot
    from napari_hrtem_transfer._napari._widgets import SegmentWidget
    from napari_hrtem_transfer._napari._workers import JobDone

    viewer = napari.Viewer(show=True)
    for data, kwargs, _ in real_hrtem_soot():  # File > Open Sample > real HRTEM image
        viewer.add_image(data, **kwargs)
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Segment")
    app = QApplication.instance()

    def pump(seconds: float = 0.4) -> None:  # let the canvas draw, several frames
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            viewer.window._qt_viewer.canvas.native.update()
            time.sleep(0.01)

    def segment_once(k: int) -> int:
        w.image.value = viewer.layers[0]
        w.start()
        t0 = time.monotonic()
        while w.running and time.monotonic() - t0 < 300:
            pump(0.05)
        pump()
        if not isinstance(w.last_outcome, JobDone):
            print(f"segmentation {k} did not finish: {w.status.value}", flush=True)
            return 3
        print(f"segmentation {k}: {[ly.name for ly in viewer.layers]}", flush=True)
        return 0

    if segment_once(1):
        return 3
    (seg,) = [ly for ly in viewer.layers if ly.name.endswith("segmentation")]
    viewer.layers.remove(seg)
    pump()
    print("deleted the segmentation layer", flush=True)
    if segment_once(2):
        return 3
    from napari_hrtem_transfer._napari._widgets._ood import canvas_text

    overlay = canvas_text(viewer).text
    print(f"canvas text: {overlay!r}", flush=True)
    if w.ood_view is not None and w.ood_view.layer is not viewer.layers[-1]:
        print("the OOD dock does not show the new segmentation", flush=True)
        return 4
    viewer.close()
    print("viewer survived", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
