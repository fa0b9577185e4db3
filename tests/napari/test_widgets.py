"""Dock widgets in a real napari viewer (Qt under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer._napari._widgets._ood import canvas_text

from .test_reader import needs_data

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000


def _wait_idle(qtbot, widget, timeout=TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


@pytest.fixture(autouse=True)
def _recent_models_file(tmp_path, monkeypatch):
    """Keep the 'recently trained models' list of each test in its own file."""
    from napari_hrtem_transfer._napari._widgets._models import recent_models

    monkeypatch.setenv("HRTEM_TRANSFER_RECENT_MODELS", str(tmp_path / "recent.json"))
    recent_models.reload()
    yield
    recent_models.reload()


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
    # defaults and limits come from SimulationConfig
    from napari_hrtem_transfer.simulate import SimulationConfig

    assert w.n_structures.min == SimulationConfig.model_fields["n_structures"].metadata[0].ge
    assert w.dose.value == SimulationConfig.model_fields["dose_e_per_A2"].default
    w.preset.value = "study"
    assert w.defocus_nm.value.startswith("-25, -20") and w.defocus_nm.value.endswith("20, 25")
    w.preset.value = "laptop"  # back to the laptop preset's defoci (the field default)
    assert w.defocus_nm.value == "-10, -5, 0, 5, 10"
    w.material.value = "Au"
    w.n_structures.value = 2
    w.defocus_nm.value = "-5, 5"
    w.save_path.value = tmp_path / "sim.hspy"
    w.run_button.click()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobDone)
    (cfg,) = fake_simulation
    assert cfg.material == "Au" and cfg.n_structures == 2 and cfg.defocus_nm == [-5.0, 5.0]
    assert [layer.__class__.__name__ for layer in viewer.layers] == ["Image", "Labels"]
    img = viewer.layers[0]
    assert img.data.shape == (2, 8, 64, 64)
    assert [str(u) for u in img.units] == ["nanometer", "pixel", "nanometer", "nanometer"]
    assert (tmp_path / "sim.hspy").is_file()
    assert w.progress.value() == 1000
    assert "elapsed" in w.time_label.value


def test_simulate_widget_errors_name_the_form_fields(make_napari_viewer, fake_simulation):
    from napari_hrtem_transfer._napari._widgets import SimulateWidget

    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    w.defocus_nm.value = "-5, five"
    w.run_button.click()
    assert not w.running
    assert w.status.value.startswith("error:") and "numbers in nm" in w.status.value
    w.defocus_nm.value = "5, 5"  # the config's message mentions the CLI flag --defocus
    w.run_button.click()
    assert "'defoci [nm]'" in w.status.value and "--" not in w.status.value
    assert not fake_simulation and len(viewer.layers) == 0


def test_simulate_widget_stop_is_honest(make_napari_viewer, qtbot, monkeypatch, tiny_dataset):
    import threading

    import napari_hrtem_transfer.simulate as simulate
    from napari_hrtem_transfer._napari._widgets import SimulateWidget
    from napari_hrtem_transfer._napari._workers import JobStopped

    go_on = threading.Event()

    def slow(config, progress=False, **kwargs):
        for i in range(config.n_structures):
            progress(i + 1, config.n_structures)
            go_on.wait(5)
        return tiny_dataset

    monkeypatch.setattr(simulate, "simulate_dataset", slow)
    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    w.n_structures.value = 8
    w.run_button.click()
    qtbot.waitUntil(lambda: w.progress.value() > 0, timeout=10_000)
    w.stop_button.click()
    go_on.set()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobStopped) and w.state == "stopped"
    # structure 1 was done when Stop was pressed; structure 2 was running and finished
    assert "stopped after 2 of 8 structures" in w.status.value
    assert w.progress.value() < 1000 and len(viewer.layers) == 0


def test_simulate_widget_job_failure_is_reported(make_napari_viewer, qtbot, monkeypatch):
    import napari_hrtem_transfer.simulate as simulate
    from napari_hrtem_transfer._napari._widgets import SimulateWidget
    from napari_hrtem_transfer._napari._workers import JobFailed

    def broken(config, **kwargs):
        raise RuntimeError("abTEM ran out of memory")

    monkeypatch.setattr(simulate, "simulate_dataset", broken)
    viewer = make_napari_viewer()
    w = SimulateWidget(viewer)
    w.run_button.click()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobFailed)
    assert "out of memory" in w.status.value
    assert w.run_button.isEnabled()


def _tiny_train(w, data, out, epochs):
    from napari_hrtem_transfer._napari._widgets._train import FROM_FILE

    w.source.value = FROM_FILE
    w.dataset.value = data
    w.out_dir.value = out
    w.model.value = ""  # pretrain
    w.freeze.value = "none"
    w.epochs.value = epochs
    w.batch_size.value = 4
    w.patch_size.value = 32
    w.device.value = "cpu"


@pytest.mark.slow
def test_train_widget_trains_plots_stops_and_offers_the_model(make_napari_viewer, qtbot,
                                                              tmp_path, tiny_dataset_path):
    from napari_hrtem_transfer._napari._widgets import SegmentWidget, TrainWidget
    from napari_hrtem_transfer._napari._workers import JobDone

    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    _tiny_train(w, tiny_dataset_path, tmp_path / "run", 2)
    w.run_button.click()
    assert w.running and w.stop_button.isEnabled()
    _wait_idle(qtbot, w)
    assert isinstance(w.last_outcome, JobDone), w.status.value
    result = w.result
    assert not result.stopped and result.epochs_completed == 2
    assert len(w.plot.val_epochs) == 2 and len(w.plot.steps) >= 2
    assert all(np.isfinite(v) for _, v in w.plot.val_epochs)
    w.plot.resize(360, 170)
    image = w.plot.grab().toImage()  # paints the plot off screen
    assert w.plot.n_paints > 0
    colours = {image.pixel(x, y) for x in range(0, 360, 3) for y in range(20, 140, 3)}
    assert len(colours) > 3, "the loss plot should show lines, not an empty box"
    assert (tmp_path / "run" / "best.json").is_file()
    assert "finished 2 epoch(s)" in w.status.value
    assert w.device_label.value.startswith("device: cpu") and "torch" in w.device_label.value
    # the OOD reference fit after training has its own status
    assert w.ood_status.value.startswith("OOD reference: ") and "fitted" in w.ood_status.value
    assert (tmp_path / "run" / "ood_reference.json").is_file()
    assert not w.stop_button.isEnabled()
    # the new model is offered in Segment at once, with its card
    model = str((tmp_path / "run").resolve())
    assert model in [v for v in seg.model.combo.choices]
    seg.model.value = model
    card = seg.model.card.value
    assert "compact U-Net" in card and "2 epoch(s)" in card and "0.2 Å/px" in card
    assert "-5, +5 nm" in card and "OOD reference: yes" in card

    # fine-tune from it, and press Stop at the first step: an honest state
    w.model.value = tmp_path / "run"
    w.out_dir.value = tmp_path / "ft"
    w.freeze.value = "encoder"
    w.epochs.value = 8
    w.run_button.click()
    qtbot.waitUntil(lambda: len(w.plot.steps) >= 1, timeout=TIMEOUT_MS)
    w.stop_button.click()
    _wait_idle(qtbot, w)
    assert w.result.stopped and w.result.epochs_completed < 8
    assert w.state == "stopped"
    assert "stopped at epoch 1 of 8" in w.status.value, w.status.value
    assert w.progress.value() < 1000 and "stopped at epoch 1 of 8" in w.progress.format()
    assert "OOD reference: " in w.ood_status.value and "stopped" in w.ood_status.value
    assert (tmp_path / "ft" / "last.json").is_file()


@pytest.mark.slow
def test_closing_the_train_dock_stops_training(make_napari_viewer, qtbot, tmp_path,
                                               tiny_dataset_path):
    from napari_hrtem_transfer._napari._widgets import TrainWidget

    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="train")
    _tiny_train(w, tiny_dataset_path, tmp_path / "run", 500)
    w.run_button.click()
    qtbot.waitUntil(lambda: len(w.plot.steps) >= 1, timeout=TIMEOUT_MS)
    runner = w.runner
    viewer.window.remove_dock_widget(w)  # what the dock's close button does
    assert w.closed
    assert not runner.alive  # stopped and waited for within the step
    assert runner.result.stopped and runner.result.epochs_completed < 500
    from napari_hrtem_transfer.training import load_checkpoint

    assert load_checkpoint(tmp_path / "run", which="last").model is not None


def test_train_widget_needs_a_dataset(make_napari_viewer, tmp_path):
    from napari_hrtem_transfer._napari._widgets import TrainWidget

    w = TrainWidget(make_napari_viewer())
    w.out_dir.value = tmp_path
    w.run_button.click()
    assert not w.running and "dataset" in w.status.value and "Fix" in w.status.value


def test_train_widget_bad_annotation_layers_are_notifications(make_napari_viewer, tmp_path):
    from napari_hrtem_transfer._napari._widgets import TrainWidget
    from napari_hrtem_transfer._napari._widgets._train import FROM_LAYERS

    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    img = viewer.add_image(np.zeros((3, 64, 64), np.float32), name="frames")
    w.source.value = FROM_LAYERS
    w.image_layer.value = img
    w.out_dir.value = tmp_path / "ft"
    w.model.value = tmp_path  # any folder: the checks come first
    lab = viewer.add_labels(np.zeros((3, 64, 64), np.uint8), name="empty")
    w.labels_layer.value = lab
    w.run_button.click()
    assert not w.running and "no painted pixel" in w.status.value and "Fix" in w.status.value
    outside = viewer.add_labels(np.ones((4, 64, 64), np.uint8), name="outside")
    w.labels_layer.value = outside
    w.run_button.click()
    assert "outside the stack" in w.status.value
    other = viewer.add_labels(np.ones((3, 32, 64), np.uint8), name="other")
    w.labels_layer.value = other
    w.run_button.click()
    assert "differs from the image's" in w.status.value
    assert not (tmp_path / "ft").exists()  # nothing written


@pytest.mark.slow
def test_finetune_on_frames_annotated_in_layers_improves_them(make_napari_viewer, qtbot,
                                                              tmp_path, tiny_model_dir):
    """Two frames painted in a Labels layer: the fine-tuned model segments them better."""
    from napari_hrtem_transfer._napari._widgets import SegmentWidget, TrainWidget
    from napari_hrtem_transfer._napari._widgets._train import FROM_LAYERS
    from napari_hrtem_transfer.evaluation.metrics import dice
    from napari_hrtem_transfer.segmentation import segment

    from .conftest import make_tiny_dataset

    # a session unlike the training data: brighter particles on a darker, noisier film
    ds = make_tiny_dataset(n_images=4, defocus_nm=(0.0,), seed=7)
    rng = np.random.default_rng(1)
    truth = ds.masks
    frames = rng.poisson(np.where(truth, 90.0, 40.0)).astype(np.float32)
    viewer = make_napari_viewer()
    img = viewer.add_image(frames, scale=(1, 0.02, 0.02), units=("pixel", "nm", "nm"),
                           name="session")
    painted = np.zeros(frames.shape, np.uint8)
    painted[[0, 2]] = truth[[0, 2]] * 2  # any non-zero label = particle
    lab = viewer.add_labels(painted, scale=img.scale, name="annotations")
    w = TrainWidget(viewer)
    seg = SegmentWidget(viewer)
    w.source.value = FROM_LAYERS
    w.image_layer.value, w.labels_layer.value = img, lab
    w.model.value = tiny_model_dir
    w.freeze.value = "none"
    w.epochs.value = 6
    w.lr.value = 3e-3
    w.device.value = "cpu"
    w.out_dir.value = tmp_path / "ft"
    w.run_button.click()
    _wait_idle(qtbot, w, timeout=600_000)
    assert not w.result.stopped, w.status.value
    out = str((tmp_path / "ft").resolve())
    assert "OOD reference: " in w.ood_status.value
    assert out in list(seg.model.combo.choices)  # offered in Segment at once
    assert seg.model.value == out

    def score(model):
        res = segment(frames[[0, 2]], model, sampling_A=0.2, ood=False)
        return float(np.mean([dice(res.labels[i] > 0, truth[[0, 2]][i]) for i in range(2)]))

    before, after = score(tiny_model_dir), score(out)
    print(f"Dice on the annotated frames: start model {before:.3f}, fine-tuned {after:.3f}")
    assert after > before + 0.05, (before, after)


def test_long_error_wraps_and_docks_fit_a_small_screen(make_napari_viewer, qtbot):
    from napari_hrtem_transfer._napari._widgets import SegmentWidget, SimulateWidget, TrainWidget

    viewer = make_napari_viewer(show=True)
    win = viewer.window._qt_window
    win.resize(1280, 800)
    docks = [W(viewer) for W in (SimulateWidget, TrainWidget, SegmentWidget)]
    for i, d in enumerate(docks):
        viewer.window.add_dock_widget(d, name=f"dock{i}", area="right")
    qtbot.wait(50)
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() > 0
    # three docks fit 1280 x 800 together (the rest scrolls)
    assert sum(d.minimumSizeHint().height() for d in docks) < 800 - 100
    long_message = "x" * 1000 + " " + "/very/long/path" * 67
    assert len(long_message) >= 2000
    for _ in range(3):
        docks[1].set_status(f"error: {long_message}")
        docks[1].dataset.value = long_message
        docks[1].run_button.click()
    qtbot.wait(100)
    assert canvas.width() > 0
    assert max(d.width() for d in docks) < 1280 // 2
    assert docks[1].status.toolTip()  # the whole text is kept


def _stack_viewer(viewer, n_defocus=3, n_images=2):
    """A defocus x image stack with the reader's conventions (defocus axis in nm)."""
    from napari_hrtem_transfer._napari._reader import dataset_to_layer_data

    from .conftest import make_tiny_dataset

    ds = make_tiny_dataset(n_images=n_images, defocus_nm=(-5.0, 0.0, 5.0)[:n_defocus])
    data, kwargs, _ = dataset_to_layer_data(ds)[0]
    return viewer.add_image(np.asarray(data), **kwargs)


@pytest.mark.slow
def test_segment_fills_features_per_frame_and_the_ood_plot_follows(make_napari_viewer, qtbot,
                                                                   tiny_model_dir):
    from napari_hrtem_transfer._napari._widgets import SegmentWidget

    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    src = _stack_viewer(viewer)
    viewer.add_image(np.zeros((3, 3, 3), np.uint8), rgb=True, name="photo")
    assert [c.name for c in w.image.choices] == [src.name, "photo"]
    w.image.value = src
    w.model.value = tiny_model_dir
    w.add_proba.value = True
    w.run_button.click()
    _wait_idle(qtbot, w)
    assert w.device_label.value.startswith("device: cpu")
    labels, proba = w.added_layers
    assert labels.data.shape == src.data.shape
    np.testing.assert_allclose(labels.scale, src.scale)
    np.testing.assert_allclose(labels.translate, src.translate)
    assert proba.data.max() <= 1.0
    # particles are numbered by frame: value k + 1 on flat frame k, where proba >= 0.5
    frame_no = np.arange(6).reshape(3, 2, 1, 1) + 1
    np.testing.assert_array_equal(labels.data, (proba.data >= 0.5) * frame_no)
    # one feature row per frame: its defocus [nm], image index and OOD score
    f = labels.features
    assert len(f) == 6
    assert list(f["index"]) == list(range(1, 7))
    np.testing.assert_allclose(f["defocus_nm"], [-5, -5, 0, 0, 5, 5])
    assert list(f["image_index"]) == [0, 1, 0, 1, 0, 1]
    assert np.all(np.isfinite(f["ood_score"]))
    # the OOD dock: one point per frame, following the slider
    view = w.ood_view
    assert view is not None and view.layer is labels
    assert len(view.points.get_offsets()) == 6
    np.testing.assert_allclose(view.points.get_offsets()[:, 0], [-5, -5, 0, 0, 5, 5])
    viewer.dims.set_point(0, 5.0)  # defocus +5 nm
    viewer.dims.set_point(1, 1)  # image 1
    assert view.current_frame == 5
    np.testing.assert_allclose(view.marker.get_xydata(), [[5.0, f["ood_score"][5]]])
    assert "defocus +5 nm" in canvas_text(viewer).text and "OOD" in canvas_text(viewer).text
    # a model fine-tuned in the Train dock: picked, and the session re-scored with it
    from napari_hrtem_transfer._napari._widgets._models import recent_models

    recent_models.add(tiny_model_dir)
    assert w.running and w.model.value == str(tiny_model_dir.resolve())
    _wait_idle(qtbot, w)
    from napari_hrtem_transfer._napari._widgets._ood import ood_layers

    assert len(ood_layers(viewer)) == 2
    assert view.layer is w.added_layers[0] and len(view.points.get_offsets()) == 6
    # RGB layers are refused with a message
    w.image.value = viewer.layers["photo"]
    w.run_button.click()
    assert not w.running and "RGB" in w.status.value


def test_ood_view_ranking_click_and_caution_overlay(make_napari_viewer, qtbot):
    import pandas as pd

    from napari_hrtem_transfer._napari._widgets import OODView
    from napari_hrtem_transfer._napari._widgets._ood import CAUTION_WORD

    viewer = make_napari_viewer()
    img = viewer.add_image(np.zeros((4, 16, 16)), scale=(0.8, 1, 1), translate=(2.0, 0, 0),
                           axis_labels=("time", "y", "x"))
    scores = [0.1, 2.5, 0.4, 1.2]
    feats = pd.DataFrame({"index": [1, 2, 3, 4], "frame": [0, 1, 2, 3],
                          "time_index": [0, 1, 2, 3], "time_s": [2.0, 2.8, 3.6, 4.4],
                          "ood_score": scores, "caution": [s > 1.0 for s in scores]})
    lab = viewer.add_labels(np.zeros((4, 16, 16), np.uint8), scale=img.scale,
                            translate=img.translate, features=feats, name="seg",
                            metadata={"ood": {"nav_axes": ["time"], "caution": 1.0}})
    view = OODView(viewer)
    viewer.window.add_dock_widget(view)
    assert view.layer is lab  # picked up the layer with scores
    assert view.xlabel == "time [s]"
    np.testing.assert_allclose(view.points.get_offsets()[:, 0], [2.0, 2.8, 3.6, 4.4])
    # ranking: highest score first; the suggestion names the top frames
    assert [view.table.item(r, 1).text() for r in range(4)] == ["2.500", "1.200", "0.400",
                                                                "0.100"]
    assert "#1, time 2.8 s" in view.suggest.value.split(";")[0]
    view._on_row(0)  # clicking the first row jumps to frame 1 (t = 2.8 s)
    assert viewer.dims.point[0] == pytest.approx(2.8)
    assert view.current_frame == 1
    assert CAUTION_WORD in canvas_text(viewer).text
    view.go_to(2)
    assert view.current_frame == 2 and CAUTION_WORD not in canvas_text(viewer).text
    assert "OOD 0.40" in canvas_text(viewer).text


def _ood_layer(viewer, n=6, **extra):
    import pandas as pd

    img = viewer.add_image(np.zeros((n, 16, 16)), axis_labels=("frame", "y", "x"), name="stack")
    scores = np.linspace(0.2, 3.0, n)
    feats = pd.DataFrame({"index": np.arange(n) + 1, "frame": np.arange(n),
                          "frame_index": np.arange(n), "ood_score": scores,
                          "caution": scores > 1.0, **extra})
    return img, viewer.add_labels(
        np.zeros((n, 16, 16), np.uint8), features=feats, name="stack segmentation",
        metadata={"ood": {"nav_axes": ["frame"], "caution": 1.0,
                          "imaging_domain": {"defocus_nm_range": [-10.0, 10.0]}}})


def test_ood_view_slider_moves_only_the_marker_and_a_deleted_layer_leaves_nothing(
        make_napari_viewer):
    import time

    from napari_hrtem_transfer._napari._widgets import OODView
    from napari_hrtem_transfer._napari._widgets._ood import NO_LAYER_TEXT

    viewer = make_napari_viewer()
    _, lab = _ood_layer(viewer)
    view = OODView(viewer)
    viewer.window.add_dock_widget(view)
    assert view.layer is lab and view.xlabel == "frame"
    view.plot.canvas.draw()  # the first full draw caches the background
    draws, blits = view.plot.n_draws, view.n_marker_blits
    t0 = time.perf_counter()
    for k in range(6):
        viewer.dims.set_current_step(0, k)
        assert view.current_frame == k
        np.testing.assert_allclose(view.marker.get_xydata(), [[k, lab.features["ood_score"][k]]])
    per_step_ms = 1000 * (time.perf_counter() - t0) / 6
    print(f"OOD dock: {per_step_ms:.1f} ms per slider step")
    assert view.plot.n_draws == draws  # no full redraw of the figure per step
    assert view.n_marker_blits >= blits + 5
    assert canvas_text(viewer).text.startswith("#5")
    # deleting the layer: no stale plot, summary, ranking or canvas text
    viewer.layers.remove(lab)
    assert view.layer is None and view.rows == []
    assert view.summary.value == NO_LAYER_TEXT and view.suggest.value == ""
    assert view.table.rowCount() == 0 and canvas_text(viewer).text == ""
    assert not view.plot.ax.collections and not view.plot.ax.lines


def test_ood_view_draws_the_verdict_estimated_defocus_training_range_and_reasons(
        make_napari_viewer):
    from napari_hrtem_transfer._napari._widgets import OODView

    viewer = make_napari_viewer()
    est = [-20.0, -5.0, None, 0.0, 5.0, 30.0]
    reasons = ["defocus -20 nm outside the training range", "", "", "", "",
               "defocus +30 nm outside the training range; boundary blurred"]
    _, lab = _ood_layer(viewer, estimated_defocus_nm=est, reasons=reasons)
    view = OODView(viewer)
    assert view.xcol == "estimated_defocus_nm" and view.xlabel == "estimated defocus [nm]"
    x = view.points.get_offsets()[:, 0]
    np.testing.assert_allclose(x, [-20, -5, np.nan, 0, 5, 30])
    (span,) = [p for p in view.plot.ax.patches if p.get_label() == "model's training defoci"]
    assert (span.get_x(), span.get_x() + span.get_width()) == (-10.0, 10.0)
    viewer.dims.set_current_step(0, 5)
    text = canvas_text(viewer).text
    assert "estimated defocus +30 nm" in text
    assert "– defocus +30 nm outside the training range" in text and "– boundary blurred" in text
    viewer.dims.set_current_step(0, 3)
    assert "–" not in canvas_text(viewer).text  # in domain: no reasons
    top = view.ranking[0]  # frame 5 has the highest score: its reasons in the ranking
    assert top == 5 and "boundary blurred" in view.table.item(0, 2).text()


def test_plots_follow_the_theme(make_napari_viewer):
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    from napari_hrtem_transfer._napari._widgets import OODView, TrainWidget

    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    ood = OODView(viewer)
    viewer.theme = "dark"
    dark = (w.plot.colors["background"], to_hex(ood.plot.figure.get_facecolor()))
    viewer.theme = "light"
    light = (w.plot.colors["background"], to_hex(ood.plot.figure.get_facecolor()))
    assert dark[0] != light[0] and dark[1] != light[1]
    assert light == (get_theme("light").background.as_hex(),) * 2
    assert dark == (get_theme("dark").background.as_hex(),) * 2


def test_every_panel_and_the_canvas_text_follow_the_theme(make_napari_viewer):
    """The Evaluate figure's second (Dice) panel and the OOD canvas text follow the theme."""
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    from napari_hrtem_transfer._napari._widgets import EvaluateWidget, OODView

    viewer = make_napari_viewer()
    viewer.theme = "dark"
    ev = EvaluateWidget(viewer)
    fig = ev.plot.figure
    fig.clear()
    ax1, ax2 = fig.add_subplot(211), fig.add_subplot(212)
    ev.plot.ax = ax1
    for ax in (ax1, ax2):
        ev.plot.style_axes(ax)
    _, lab = _ood_layer(viewer)
    view = OODView(viewer)
    viewer.dims.set_current_step(0, 0)  # score 0.2: not a caution frame
    viewer.theme = "light"
    light = get_theme("light")
    for ax in (ax1, ax2):
        assert to_hex(ax.get_facecolor()) == light.background.as_hex()
        assert to_hex(ax.xaxis.label.get_color()) == light.text.as_hex()
    # the canvas text: napari's contrast with the canvas (None), or the theme's warning colour
    assert canvas_text(viewer).color is None
    viewer.dims.set_current_step(0, 5)
    assert to_hex(canvas_text(viewer).color) == light.warning.as_hex()
    assert to_hex(view.plot.ax.get_facecolor()) == light.background.as_hex()


def test_widget_contributions_build_from_the_manifest(make_napari_viewer):
    """Each manifest widget name builds its own dock class, docked in the viewer and shown."""
    from napari_hrtem_transfer._napari._widgets import (
        EvaluateWidget,
        OODView,
        SegmentWidget,
        SimulateWidget,
        TrainWidget,
    )

    viewer = make_napari_viewer()
    expected = {
        "Simulate defocus series": SimulateWidget,
        "Train / fine-tune": TrainWidget,
        "Segment": SegmentWidget,
        "OOD per frame": OODView,
        "Evaluate / explore": EvaluateWidget,
    }
    for name, cls in expected.items():
        dock, widget = viewer.window.add_plugin_dock_widget("napari-hrtem-transfer", name)
        assert type(widget) is cls, (name, type(widget))
        assert dock.inner_widget() is widget
        assert viewer.window.dock_widgets[dock.name] is widget
        # visible within the main window (the window itself is not shown in tests)
        assert dock.isVisibleTo(viewer.window._qt_window), name
    assert len(viewer.window.dock_widgets) == len(expected)


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


def test_train_widget_picks_up_an_opened_dataset(make_napari_viewer, tmp_path, tiny_dataset):
    from napari_hrtem_transfer._napari._widgets import TrainWidget
    from napari_hrtem_transfer.io import save_dataset

    path = save_dataset(tiny_dataset, tmp_path / "series.hspy")
    viewer = make_napari_viewer()
    w = TrainWidget(viewer)
    assert str(w.dataset.value) in ("", ".")
    viewer.open(str(path), plugin="napari-hrtem-transfer")
    assert w.dataset.value == path


def test_evaluate_panel_shows_the_published_generalization(make_napari_viewer):
    from napari_hrtem_transfer._napari._widgets import EvaluateWidget
    from napari_hrtem_transfer._napari._widgets._evaluate import VIEWS

    viewer = make_napari_viewer()
    w = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(w)
    # the study's median generalization after pretraining: 0 nm -> 0.0028, +10 nm -> 0.058
    assert w.values[0.0] == pytest.approx(0.0028, abs=5e-5)
    assert w.values[10.0] == pytest.approx(0.058, abs=5e-4)
    assert "+0 nm → 0.0028" in w.summary.value and "+10 nm → 0.058" in w.summary.value
    assert len(w.plot.ax.patches) == 5  # one bar per pretraining defocus
    w.reduction.value = "mean"
    assert w.values[10.0] != pytest.approx(0.058, abs=5e-4)
    w.reduction.value = "median"
    w.view.value = VIEWS[1]
    m = w.values
    assert m.values.shape == (5, 11) and np.isnan(m.at(0.0, 0.0))
    w.freeze.value = "encoder"
    assert w.values.counts.max() < m.counts.max()  # fewer models per cell when filtered


def test_evaluate_filters_survive_layer_changes_and_n_is_a_whole_number(make_napari_viewer):
    from napari_hrtem_transfer._napari._widgets import EvaluateWidget
    from napari_hrtem_transfer._napari._widgets._evaluate import VIEWS

    viewer = make_napari_viewer()
    w = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert "64" in w.n_transfer.choices and "64.0" not in w.n_transfer.choices
    w.view.value = VIEWS[1]
    w.freeze.value, w.n_transfer.value = "encoder", "64"
    filtered = w.values.counts.copy()
    layer = viewer.add_image(np.zeros((8, 8)))  # napari calls reset_choices on the docks
    viewer.layers.remove(layer)
    w.reset_choices()
    assert (w.freeze.value, w.n_transfer.value) == ("encoder", "64")
    np.testing.assert_array_equal(w.values.counts, filtered)


@pytest.mark.slow
def test_evaluate_two_models_and_jump_to_a_defocus(make_napari_viewer, qtbot, tiny_model_dir,
                                                   tiny_dataset_path):
    from napari_hrtem_transfer._napari._widgets import EvaluateWidget

    viewer = make_napari_viewer()
    viewer.open(str(tiny_dataset_path), plugin="napari-hrtem-transfer")
    w = EvaluateWidget(viewer)
    w.dataset.value = tiny_dataset_path
    w.before.value = tiny_model_dir
    w.after.value = tiny_model_dir
    w.run_button.click()
    _wait_idle(qtbot, w)
    assert len(w.results) == 2, w.status.value
    assert "generalization" in w.status.value and "shift +0" in w.status.value
    assert len(w._bars) == 2 * 2 * 2  # 2 models x 2 defoci x (loss, Dice)
    assert w.go_to_defocus(5.0)
    assert viewer.dims.point[0] == pytest.approx(5.0)


@pytest.mark.slow
def test_the_shipped_model_is_the_default_with_its_card(make_napari_viewer, qtbot):
    from napari_hrtem_transfer._napari._widgets import SegmentWidget, TrainWidget
    from napari_hrtem_transfer._napari._widgets._models import PRETRAINED, resolve_model

    assert resolve_model(PRETRAINED) is not None, "the package must ship its pretrained model"
    viewer = make_napari_viewer()
    train, seg = TrainWidget(viewer), SegmentWidget(viewer)
    assert train.model.value == PRETRAINED and seg.model.value == PRETRAINED
    card = seg.model.card.value
    assert card.startswith("shipped pretrained model: compact U-Net")
    assert "at 0.2 Å/px" in card and "OOD reference: yes" in card
    assert "best validation loss 0.0" in card
    # segments a frame with it, scores included
    img = viewer.add_image(np.random.default_rng(0).poisson(50.0, (2, 96, 96)).astype(np.float32),
                           scale=(1, 0.02, 0.02), units=("pixel", "nm", "nm"))
    seg.image.value = img
    seg.run_button.click()
    _wait_idle(qtbot, seg)
    (labels,) = seg.added_layers
    assert labels.data.shape == img.data.shape and len(labels.features) == 2
    assert np.all(np.isfinite(labels.features["ood_score"]))


@pytest.fixture
def notifications(monkeypatch):
    """Every napari notification the docks show: a list of (kind, message)."""
    from napari.utils import notifications as n

    shown = []
    for kind in ("error", "warning", "info"):
        monkeypatch.setattr(n, f"show_{kind}", lambda msg, kind=kind: shown.append((kind, msg)))
    return shown


def test_a_plain_hspy_defocus_series_is_segmented_with_its_defocus(make_napari_viewer, qtbot,
                                                                   tmp_path, notifications):
    """A HyperSpy defocus x image file with a non-uniform defocus axis, opened with the
    plugin's reader: the features carry each frame's defocus [nm], the OOD dock plots it."""
    from napari_hrtem_transfer._napari._widgets import SegmentWidget

    from .test_reader import _defocus_series_hspy

    defocus = [-8.0, 0.0, 12.0]
    _defocus_series_hspy(tmp_path / "series.hspy", defocus, uniform=False)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "series.hspy", plugin="napari-hrtem-transfer")
    assert layer.ndim == 4 and layer.axis_labels[:2] == ("defocus", "image")
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value = layer
    w.run_button.click()
    _wait_idle(qtbot, w)
    (labels,) = w.added_layers
    f = labels.features
    np.testing.assert_allclose(f["defocus_nm"], np.repeat(defocus, 6))
    assert list(f["image_index"]) == list(range(6)) * 3
    assert w.ood_view is not None  # the shipped model has an OOD reference
    assert w.ood_view.xlabel == "defocus [nm]"
    np.testing.assert_allclose(w.ood_view.points.get_offsets()[:, 0], np.repeat(defocus, 6))
    # whatever the core noted (none at the model's pixel size): each one was shown
    for note in labels.metadata["notes"]:
        assert any(note == m for _, m in notifications), (note, notifications)


@needs_data
def test_a_real_velox_time_stack_is_segmented_in_the_dock(make_napari_viewer, qtbot,
                                                          notifications):
    """The Velox Ceta time stack of ../shared (2 frames, vendor defocus in its metadata): the
    Segment dock adds a labels layer on the time axis (it failed with "'float' object is not
    iterable" when the file's one defocus value was taken for a list of frame values)."""
    from napari_hrtem_transfer._napari._widgets import SegmentWidget

    from .test_reader import DATA

    viewer = make_napari_viewer()
    (layer,) = viewer.open(DATA / "emd_velox" / "rsciio_fei_example_tem_stack.emd",
                           plugin="napari-hrtem-transfer")
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value = layer
    w.run_button.click()
    _wait_idle(qtbot, w)
    assert not [m for kind, m in notifications if kind == "error"], notifications
    (labels,) = w.added_layers
    assert labels.data.shape == layer.data.shape
    assert tuple(labels.axis_labels) == tuple(layer.axis_labels)
    np.testing.assert_allclose(labels.scale, layer.scale)
    assert "defocus_nm" not in labels.metadata


def test_every_core_warning_is_a_notification_every_time(make_napari_viewer, qtbot,
                                                         notifications):
    """Two uncalibrated images: the 'pixel size is unknown' warning of the core is shown
    for each (not once per session, not through a string filter)."""
    import re
    import warnings
    from pathlib import Path

    import napari_hrtem_transfer._napari as plugin
    from napari_hrtem_transfer._napari._widgets import SegmentWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(2):
            img = viewer.add_image(rng.poisson(40, (64, 64)).astype(np.float32),
                                   name=f"raw {k}")
            w.image.value = img
            w.run_button.click()
            _wait_idle(qtbot, w)
            unknown = [m for kind, m in notifications
                       if kind == "warning" and "pixel size is unknown" in m]
            assert len(unknown) == k + 1, notifications
            assert w.warnings_shown and unknown[-1] in w.warnings_shown
    # no deprecated (or private) napari API from the plugin: napari would show it as a toast
    # (napari's own deprecations point at odd frames, so judge by file and by message)
    ours = Path(plugin.__file__).parent
    mine = [f"{c.filename}:{c.lineno}: {c.message}" for c in caught
            if issubclass(c.category, DeprecationWarning | FutureWarning)
            and (Path(c.filename).is_relative_to(ours)
                 or re.search(r"napari|viewer\.|[Ww]indow\.", str(c.message)))]
    assert not mine, mine


def _dock_all(viewer):
    from qtpy.QtWidgets import QApplication

    from napari_hrtem_transfer._napari._widgets import (
        EvaluateWidget,
        OODView,
        SegmentWidget,
        SimulateWidget,
        TrainWidget,
    )

    viewer.window._qt_window.resize(1280, 800)
    docks = [cls(viewer) for cls in (SimulateWidget, TrainWidget, SegmentWidget, OODView,
                                     EvaluateWidget)]
    for w in docks:
        viewer.window.add_dock_widget(w, name=type(w).__name__, area="right", tabify=True)
    viewer.window._qt_window.show()
    for _ in range(5):
        QApplication.processEvents()
    return docks


def test_docks_scroll_only_over_their_content_and_combos_show_whole_values(
        make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QApplication, QComboBox, QStyle, QStyleOptionComboBox

    viewer = make_napari_viewer(show=True)
    for w in _dock_all(viewer):
        w.parent().raise_()
        for _ in range(3):
            QApplication.processEvents()
        body, name = w.widget(), type(w).__name__
        content = body.heightForWidth(body.width())
        # the scrollable body is its content's height (or the visible height), not 2-3x
        assert body.height() <= 1.1 * max(w.viewport().height(), content), (
            name, body.height(), content)
        for cb in body.findChildren(QComboBox):
            if not cb.isVisible():
                continue
            opt = QStyleOptionComboBox()
            cb.initStyleOption(opt)
            field = cb.style().subControlRect(QStyle.ComplexControl.CC_ComboBox, opt,
                                              QStyle.SubControl.SC_ComboBoxEditField, cb)
            for i in range(cb.count()):
                text = cb.itemText(i)
                assert cb.fontMetrics().horizontalAdvance(text) <= field.width(), (
                    name, text, field.width())


def test_eta_counts_down_between_steps(make_napari_viewer, monkeypatch):
    """The time left comes from the rate of completed work and does not grow while a step
    runs."""
    from napari_hrtem_transfer._napari._widgets import SegmentWidget, _job

    now = [100.0]
    monkeypatch.setattr(_job.time, "monotonic", lambda: now[0])
    w = SegmentWidget(make_napari_viewer())
    w.state, w._t0 = "running", 100.0
    w._eta_fraction, w._left_at_eta = 0.0, None
    now[0] = 110.0
    w.set_fraction(0.25)  # 25 % in 10 s: 30 s left
    assert w.time_left() == pytest.approx(30.0)
    now[0] = 115.0  # 5 s into the next step, no news
    w._update_time()
    assert w.time_left() == pytest.approx(25.0)
    assert "about 0:25 left" in w.time_label.value
    now[0] = 130.0
    w.set_fraction(0.5)  # 50 % in 30 s: 30 s left again
    assert w.time_left() == pytest.approx(30.0)


class TrainResult:  # what the training callbacks report (the name is what the dock reads)
    def __init__(self, out_dir, stopped):
        self.out_dir, self.stopped = out_dir, stopped
        self.epochs_completed, self.best_epoch, self.best_val_loss = 0 if stopped else 2, None, None


def test_train_on_layers_uses_the_form_and_never_meets_its_own_folder(make_napari_viewer,
                                                                      qtbot, monkeypatch,
                                                                      tmp_path):
    """Image + labels mode: batch size, patch and seed reach the core; a second Train after a
    finished run gets a new folder; after Stop the message matches what the dock offers."""
    import napari_hrtem_transfer.annotations as annotations
    from napari_hrtem_transfer._napari._widgets import TrainWidget
    from napari_hrtem_transfer._napari._widgets._train import FROM_LAYERS

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    calls = []

    def fake(images, labels, *, out_dir, callbacks, stop, **kwargs):
        from pathlib import Path
        from types import SimpleNamespace

        calls.append(dict(kwargs, out_dir=out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "last.json").write_text("{}")
        res = TrainResult(out_dir, stopped=len(calls) == 3)
        for cb in callbacks:
            cb.on_train_end(res)
        return SimpleNamespace(train=res, ood=None, notes=[])

    monkeypatch.setattr(annotations, "finetune_on_annotations", fake)
    viewer = make_napari_viewer()
    img = viewer.add_image(np.zeros((3, 64, 64), np.float32), name="frames")
    lab = viewer.add_labels(np.ones((3, 64, 64), np.uint8), name="painted")
    w = TrainWidget(viewer)
    w.source.value = FROM_LAYERS
    w.image_layer.value, w.labels_layer.value = img, lab
    assert not any(x.native.isHidden() for x in (w.batch_size, w.patch_size, w.seed))
    w.batch_size.value, w.patch_size.value, w.seed.value = 3, 32, 11
    w.device.value = "cpu"
    for _ in range(3):
        w.run_button.click()
        _wait_idle(qtbot, w)
        assert w.state != "failed", w.status.value
    assert [c["batch_size"] for c in calls] == [3, 3, 3]
    assert [c["patch_size"] for c in calls] == [32, 32, 32]
    assert [c["seed"] for c in calls] == [11, 11, 11]
    assert len({c["out_dir"] for c in calls}) == 3  # a new folder per run
    # the third run was stopped: say only what this dock can do
    assert w.resume.native.isHidden() is not w.resume_offered()
    if w.resume_offered():
        assert "tick 'resume'" in w.status.value
    else:
        assert "tick 'resume'" not in w.status.value and "Train again" in w.status.value


def test_features_table_takes_the_ood_verdict_fields():
    """The frame rows of the OOD-verdict core (estimated defocus, reasons, components) become
    plain feature columns; rows without them still work."""
    from types import SimpleNamespace

    from napari_hrtem_transfer._napari._widgets import features_table

    rows = [{"frame": 0, "ood_score": 0.2, "caution": False, "estimated_defocus_nm": -4.0,
             "reasons": [], "components": {"boundary": 0.1, "feature": 0.0}},
            {"frame": 1, "ood_score": 3.0, "caution": True, "estimated_defocus_nm": None,
             "reasons": ["pixel size 0.5 Å differs", "blurred boundary"],
             "components": {"boundary": 2.0, "feature": 1.0}}]
    t = features_table(SimpleNamespace(frame_table=lambda: rows))
    assert list(t["index"]) == [1, 2]
    np.testing.assert_allclose(t["estimated_defocus_nm"], [-4.0, np.nan])
    assert list(t["reasons"]) == ["", "pixel size 0.5 Å differs; blurred boundary"]
    np.testing.assert_allclose(t["components_boundary"], [0.1, 2.0])
    old = features_table(SimpleNamespace(frame_table=lambda: [{"frame": 0, "ood_score": 1.0,
                                                               "caution": False}]))
    assert "reasons" not in old and list(old["ood_score"]) == [1.0]


def test_model_picker_takes_a_bioimageio_package(qtbot, tmp_path, monkeypatch):
    """A .zip picked with 'or a package' is imported by the core importer (no code run) and
    becomes the choice; its card is the shipped model's; a refused package says why."""
    from napari_hrtem_transfer._napari._widgets._models import (
        ModelPicker,
        model_card,
        resolve_model,
    )
    from napari_hrtem_transfer.bioimageio import CACHE_ENV, export_bioimageio
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    pkg = export_bioimageio("pretrained", tmp_path / "shipped.zip", test=False).path
    picker = ModelPicker()
    picker.browse_package.value = str(pkg)
    assert picker.value == str(pkg.resolve())
    folder = resolve_model(picker.value)
    assert (folder / "best.json").is_file() and (folder / "ood_reference.json").is_file()
    assert folder.is_relative_to(tmp_path / "cache")
    card = model_card(picker.value)
    assert card.startswith("bioimage.io package shipped.zip: compact U-Net")
    shipped = model_card(str(pretrained_model_dir()))
    assert card.split("\n")[1:] == shipped.split("\n")[1:]  # same training facts

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    assert model_card(str(bad)).startswith("not a usable model:")


def test_verdict_fields_are_not_mistaken_for_coordinates():
    """'defocus_sign_determined' starts like a defocus coordinate but is a verdict field: the
    OOD dock must plot against the real defocus axis (or, without one, the estimated defocus)
    and never name a frame by it."""
    import pandas as pd

    from napari_hrtem_transfer._napari._widgets._ood import coordinate_columns, x_column
    from napari_hrtem_transfer.segmentation import SegmentationResult

    axes = [
        {"name": "defocus", "size": 2, "axis": [-5.0, 5.0], "units": "nm", "navigate": True},
        {"name": "image", "size": 1, "scale": 1.0, "offset": 0.0, "navigate": True},
        {"name": "y", "size": 4, "scale": 0.02, "units": "nm"},
        {"name": "x", "size": 4, "scale": 0.02, "units": "nm"},
    ]
    res = SegmentationResult(
        labels=np.zeros((2, 1, 4, 4), np.uint8), proba=None,
        ood_score=np.array([[1.0], [2.0]]), ood_caution=3.0, axes=axes,
        sampling_A=0.2, model_sampling_A=0.2,
        ood_reasons=[[], []], estimated_defocus_nm=np.array([[4.0], [6.0]]),
        defocus_sign_determined=np.array([[False], [False]]),
        ood_components=[{"network": 1.0}, {"network": 2.0}],
    )
    rows = res.frame_table()
    assert "defocus_sign_determined" in rows[0]
    feats = pd.DataFrame(rows)
    assert coordinate_columns(feats.columns) == ["defocus_nm", "image"]
    assert x_column(feats, ["defocus", "image"])[0] == "defocus_nm"
    # an experimental stack: one 'frame' axis, no defocus axis -> the estimated defocus
    stack = feats.drop(columns=["defocus_index", "defocus_nm"])
    assert x_column(stack, ["image"])[0] == "estimated_defocus_nm"
