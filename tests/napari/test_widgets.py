"""Dock widgets in a real napari viewer (Qt under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


@pytest.fixture
def fake_simulation(monkeypatch, tiny_dataset):
    """Replace the abTEM simulation by the tiny dataset (the real one is tested in test_jobs)."""
    import napari_hrtem_transfer.simulate as simulate

    calls = []

    def fake(config, progress=False, **kwargs):
        calls.append(config)
        for i in range(config.n_structures):
            progress(i + 1, config.n_structures)
        return tiny_dataset

    monkeypatch.setattr(simulate, "simulate_dataset", fake)
    return calls


def test_simulate_widget_adds_images_and_masks(make_napari_viewer, qtbot, fake_simulation,
                                               tmp_path):
    from napari_hrtem_transfer._napari._widgets import SimulateWidget
    from napari_hrtem_transfer._napari._workers import JobDone

    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert "positive = underfocus" in w.defocus_nm.tooltip
    w.preset.value = "study"
    assert w.defocus_nm.value.startswith("-25, -20") and w.defocus_nm.value.endswith("20, 25")
    w.preset.value = "laptop"
    w.material.value = "Au"
    w.n_structures.value = 2
    w.defocus_nm.value = "-5, 5"
    w.save_path.value = tmp_path / "sim.hspy"
    w.run_button.clicked.emit()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobDone)
    (cfg,) = fake_simulation
    assert cfg.material == "Au" and cfg.n_structures == 2 and cfg.defocus_nm == [-5.0, 5.0]
    assert [layer.__class__.__name__ for layer in viewer.layers] == ["Image", "Labels"]
    img = viewer.layers[0]
    assert img.data.shape == (2, 8, 64, 64)
    assert [str(u) for u in img.units] == ["nanometer", "pixel", "nanometer", "nanometer"]
    assert viewer.layers[1].data.shape == img.data.shape
    assert (tmp_path / "sim.hspy").is_file()
    assert w.progress.value == 1000


def test_simulate_widget_bad_input_is_a_notification_not_a_crash(make_napari_viewer, qtbot,
                                                                 fake_simulation):
    from napari_hrtem_transfer._napari._widgets import SimulateWidget

    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    w.defocus_nm.value = "-5, five"
    w.run_button.clicked.emit()
    assert not w.running
    assert w.status.value.startswith("error:") and "numbers in nm" in w.status.value
    assert not fake_simulation and len(viewer.layers) == 0


def test_simulate_widget_job_failure_is_reported(make_napari_viewer, qtbot, monkeypatch):
    import napari_hrtem_transfer.simulate as simulate
    from napari_hrtem_transfer._napari._widgets import SimulateWidget
    from napari_hrtem_transfer._napari._workers import JobFailed

    def broken(config, **kwargs):
        raise RuntimeError("abTEM ran out of memory")

    monkeypatch.setattr(simulate, "simulate_dataset", broken)
    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    w.run_button.clicked.emit()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobFailed)
    assert "out of memory" in w.status.value
    assert w.run_button.enabled


def test_train_widget_trains_plots_and_stops(make_napari_viewer, qtbot, tmp_path,
                                             tiny_dataset_path):
    from napari_hrtem_transfer._napari._widgets import TrainWidget
    from napari_hrtem_transfer._napari._workers import JobDone

    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.dataset.value = tiny_dataset_path
    w.out_dir.value = tmp_path / "run"
    w.epochs.value = 2
    w.batch_size.value = 4
    w.patch_size.value = 32
    w.device.value = "cpu"
    w.run_button.clicked.emit()
    assert w.running and w.stop_button.enabled
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobDone), w.status.value
    result = w.result
    assert not result.stopped and result.epochs_completed == 2
    assert len(w.plot.val_epochs) == 2 and len(w.plot.steps) >= 2
    assert all(np.isfinite(v) for _, v in w.plot.val_epochs)
    assert w.plot.ax.get_lines(), "the loss plot should show lines"
    assert (tmp_path / "run" / "best.json").is_file()
    assert "finished after 2 epoch(s)" in w.status.value
    assert not w.stop_button.enabled

    # fine-tune from it, and press Stop at the first step
    w.init_from.value = tmp_path / "run"
    w.out_dir.value = tmp_path / "ft"
    w.freeze.value = "encoder"
    w.epochs.value = 50

    def stop_on_first_step(update):
        if type(update).__name__ == "StepUpdate":
            w.stop()

    w.run_button.clicked.emit()
    w._worker.yielded.connect(stop_on_first_step)
    _wait_idle(qtbot, w)
    assert w.result.stopped and w.result.epochs_completed < 50
    assert "stopped" in w.status.value


def test_train_widget_needs_a_dataset(make_napari_viewer, tmp_path):
    from napari_hrtem_transfer._napari._widgets import TrainWidget

    w = TrainWidget(make_napari_viewer())
    w.out_dir.value = tmp_path
    w.run_button.clicked.emit()
    assert not w.running and "dataset" in w.status.value


def test_segment_widget_adds_labels_aligned_with_the_image(make_napari_viewer, qtbot,
                                                           tiny_model_dir, tiny_dataset):
    from napari_hrtem_transfer._napari._reader import dataset_to_layer_data
    from napari_hrtem_transfer._napari._widgets import SegmentWidget

    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.image.choices == ()
    data, kwargs, _ = dataset_to_layer_data(tiny_dataset)[0]
    src = viewer.add_image(np.asarray(data)[:, :2], **kwargs)
    viewer.add_image(np.zeros((3, 3, 3), np.uint8), rgb=True, name="photo")
    assert [c.name for c in w.image.choices] == [src.name, "photo"]
    w.image.value = src
    w.model_dir.value = tiny_model_dir
    w.add_proba.value = True
    w.run_button.clicked.emit()
    _wait_idle(qtbot, w)
    labels, proba = w.added_layers
    assert labels.data.shape == src.data.shape and labels.data.dtype == np.uint8
    np.testing.assert_allclose(labels.scale, src.scale)
    np.testing.assert_allclose(labels.translate, src.translate)
    assert proba.data.max() <= 1.0
    np.testing.assert_array_equal(labels.data, (proba.data >= 0.5).astype(np.uint8))
    # the model was trained by train_job, which fitted its OOD reference: one score per frame
    scores = labels.metadata["ood_score"]
    assert scores is not None and len(scores) == int(np.prod(labels.data.shape[:-2]))
    assert all(np.isfinite(scores))
    assert "OOD" in w.ood_label.value and "no OOD score" not in w.ood_label.value

    # RGB layers are refused with a message
    w.image.value = viewer.layers["photo"]
    w.run_button.clicked.emit()
    assert not w.running and "RGB" in w.status.value


def test_format_ood():
    from napari_hrtem_transfer._napari._widgets import format_ood

    text = format_ood(np.arange(20) / 10, max_lines=3)
    assert "frame 0: +0.00" in text and "17 more" in text and "max +1.90" in text


def test_reader_opens_files_in_the_viewer(make_napari_viewer, tmp_path, tiny_dataset):
    from napari_hrtem_transfer.io import save_dataset

    path = save_dataset(tiny_dataset, tmp_path / "series.hspy")
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-hrtem-transfer")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    assert layers[0].axis_labels == ("defocus", "image", "y", "x")
    # the defocus slider is in nm: -5 .. +5
    assert viewer.dims.range[0].start == pytest.approx(-5.0)
    assert viewer.dims.range[0].stop == pytest.approx(5.0)


def test_widget_contributions_build_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in ("Simulate defocus series", "Train / fine-tune", "Segment"):
        dock, widget = viewer.window.add_plugin_dock_widget("napari-hrtem-transfer", name)
        assert widget is not None


def test_train_widget_picks_up_an_opened_dataset(make_napari_viewer, tmp_path, tiny_dataset):
    from napari_hrtem_transfer._napari._widgets import TrainWidget
    from napari_hrtem_transfer.io import save_dataset

    path = save_dataset(tiny_dataset, tmp_path / "series.hspy")
    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    assert str(w.dataset.value) in ("", ".")
    viewer.open(str(path), plugin="napari-hrtem-transfer")
    assert w.dataset.value == path
