"""The widgets' jobs as plain functions (no viewer, no Qt)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_hrtem_transfer._napari._jobs import (
    build_simulation_config,
    build_train_config,
    layer_sampling_A,
    parse_defoci,
    parse_domains,
    segment_job,
    simulate_job,
    train_job,
)
from napari_hrtem_transfer._napari._workers import (
    JobDone,
    JobFailed,
    JobProgress,
    JobRunner,
    JobStage,
    JobStopped,
    run_with_updates,
)
from napari_hrtem_transfer.errors import ConfigError


def test_parse_defoci():
    assert parse_defoci("-10, -5 0,5  10") == [-10.0, -5.0, 0.0, 5.0, 10.0]
    assert parse_defoci([1, 2]) == [1.0, 2.0]
    assert parse_domains(" All ") == "all"
    assert parse_domains("-5; 5") == [-5.0, 5.0]
    with pytest.raises(ConfigError, match="numbers in nm"):
        parse_defoci("-10, five")
    with pytest.raises(ConfigError, match="at least one"):
        parse_defoci("  ")


def test_simulation_config_from_widget_values():
    cfg = build_simulation_config(preset="laptop", material="au", n_structures=3,
                                  defocus_nm="-5, 5", dose_e_per_A2=0, seed=7)
    assert cfg.material == "Au" and cfg.n_structures == 3 and cfg.seed == 7
    assert cfg.defocus_nm == [-5.0, 5.0]
    assert cfg.dose_e_per_A2 is None  # 0 = noise-free
    assert cfg.image_size_px == 256  # the preset's
    cfg = build_simulation_config(dose_e_per_A2=150.0, image_size_px=128)
    assert cfg.dose_e_per_A2 == 150.0 and cfg.image_size_px == 128
    with pytest.raises(ConfigError, match="material"):
        build_simulation_config(material="unobtainium")
    with pytest.raises(ConfigError, match="repeated"):
        build_simulation_config(defocus_nm="5, 5")
    with pytest.raises(ConfigError, match="preset"):
        build_simulation_config(preset="nope")


def test_train_config_from_widget_values(tmp_path):
    pre = build_train_config(train_defocus_nm="-10, 10", epochs=3, lr=None, n_train=0)
    assert pre.stage == "pretrain" and pre.train_defocus_nm == [-10.0, 10.0]
    assert pre.lr == pytest.approx(1e-3) and pre.n_train is None
    ft = build_train_config(init_from=tmp_path, train_defocus_nm="5", freeze="encoder",
                            n_train=64)
    assert ft.stage == "finetune" and ft.freeze == "encoder" and ft.n_train == 64
    assert ft.lr == pytest.approx(1e-4)  # the study's fine-tuning rate
    with pytest.raises(ConfigError, match="freeze"):
        build_train_config(freeze="encoder")  # freezing needs a checkpoint
    with pytest.raises(ConfigError, match="patch_size"):
        build_train_config(patch_size=33)


def test_run_with_updates_success_and_failure():
    def job(report, n):
        for i in range(n):
            report(JobProgress(i + 1, n))
        return "ok"

    updates = list(run_with_updates(job, 3))
    assert [u.done for u in updates[:-1]] == [1, 2, 3]
    assert updates[-1] == JobDone("ok")
    assert updates[1].fraction == pytest.approx(2 / 3)

    def bad(report):
        report(JobProgress(0, 1))
        raise ConfigError("broken input")

    updates = list(run_with_updates(bad))
    assert isinstance(updates[-1], JobFailed)
    assert updates[-1].message == "broken input"
    assert "ConfigError" in updates[-1].trace


def test_job_runner_polls_stops_and_joins():
    import time

    def job(report, stop):
        i = 0
        while not stop.is_set():
            i += 1
            report(JobProgress(i, 0))
            time.sleep(0.005)
        return i

    stop = threading.Event()
    runner = JobRunner(job, stop=stop)
    runner.stop_event = stop
    runner.start()
    deadline = time.monotonic() + 10
    items: list = []
    while not items and time.monotonic() < deadline:
        items, ended = runner.poll()
    assert items and not ended and runner.alive
    runner.request_stop()
    assert runner.join(10) and not runner.alive
    rest, ended = runner.poll()
    assert ended and isinstance(rest[-1], JobDone) and rest[-1].result == runner.result > 0

    def bad(report, stop):
        raise JobStopped("stopped after 2 of 8 structures")

    failing = JobRunner(bad, stop=threading.Event()).start()
    assert failing.join(10)
    out, ended = failing.poll()
    assert ended and isinstance(out[-1], JobFailed) and isinstance(out[-1].error, JobStopped)


def test_layer_sampling_from_metadata_scale_and_units():
    assert layer_sampling_A({"metadata": {"sampling_A": 0.3}}) == 0.3
    assert layer_sampling_A({"scale": (1, 0.05), "units": ("pixel", "nm")}) == pytest.approx(0.5)
    assert layer_sampling_A({"scale": (1, 50.0), "units": ("pixel", "pm")}) == pytest.approx(0.5)
    assert layer_sampling_A({"scale": (1, 1), "units": ("pixel", "pixel")}) is None
    assert layer_sampling_A({"scale": (1, 1)}) is None


def test_train_job_reports_typed_updates_and_stops(tmp_path, tiny_dataset_path, tiny_train_kwargs):
    from napari_hrtem_transfer.training import EpochUpdate, StepUpdate, TrainResult, TrainStart

    stop = threading.Event()
    seen = []

    def report(update):
        seen.append(update)
        if isinstance(update, StepUpdate):
            stop.set()  # stop after the first step

    config = build_train_config(**{**tiny_train_kwargs, "epochs": 3})
    result = train_job(report, config, tiny_dataset_path, tmp_path / "m", stop=stop)
    assert isinstance(seen[0], JobStage) and seen[0].name == "device"
    assert seen[0].message.startswith("cpu") and "torch" in seen[0].message
    assert isinstance(seen[1], TrainStart)
    assert sum(isinstance(u, StepUpdate) for u in seen) == 1
    assert not any(isinstance(u, EpochUpdate) for u in seen)
    assert isinstance(seen[-2], TrainResult)
    # the OOD fit is its own stage, and honestly skipped after a stop
    assert seen[-1] == JobStage("ood", "skipped", seen[-1].message)
    assert "stopped" in seen[-1].message
    assert result.stopped and result.epochs_completed == 0
    assert (tmp_path / "m" / "last.json").is_file()


def test_stop_during_the_ood_fit_skips_it_and_keeps_the_checkpoint(
    tmp_path, tiny_dataset_path, tiny_train_kwargs
):
    """Stop pressed once training has finished, while the OOD reference is being fitted:
    nothing of the reference is written, the stage says how to fit it later."""
    stop = threading.Event()
    seen = []

    def report(update):
        seen.append(update)
        if isinstance(update, JobStage) and update.name == "ood" and update.state == "running":
            stop.set()

    config = build_train_config(**{**tiny_train_kwargs, "epochs": 1})
    result = train_job(report, config, tiny_dataset_path, tmp_path / "m", stop=stop)
    assert not result.stopped  # training itself had finished
    assert seen[-1].name == "ood" and seen[-1].state == "skipped"
    assert "--fit-ood" in seen[-1].message and "usable" in seen[-1].message
    assert (tmp_path / "m" / "best.json").is_file()
    assert not (tmp_path / "m" / "ood_reference.json").exists()


def test_segment_job_is_a_thin_caller_of_the_core(monkeypatch):
    import napari_hrtem_transfer.segmentation as seg

    calls = []

    def fake_segment(data, model, **kwargs):
        calls.append((data, model, kwargs))
        kwargs["progress"](1, 2, "")
        return "result"

    monkeypatch.setattr(seg, "segment", fake_segment)
    seen = []
    axes = [{"name": "defocus", "units": "nm", "axis": [-5.0, 5.0]}]
    out = segment_job(seen.append, "DATA", "pretrained", sampling_A=0.3, axes=axes,
                      threshold=0.4, which="last", device="cpu")
    assert out == "result"
    (data, model, kw), = calls
    assert (data, model) == ("DATA", "pretrained")
    assert kw["sampling_A"] == 0.3 and kw["axes"] is axes and kw["threshold"] == 0.4
    assert kw["which"] == "last" and kw["device"] == "cpu" and kw["probabilities"]
    assert isinstance(seen[0], JobStage) and seen[0].name == "device"
    assert seen[1] == JobProgress(1, 2, "segmented 1/2")

    def stopped(data, model, **kwargs):
        raise seg.SegmentationStopped("after 1 of 2 frames")

    monkeypatch.setattr(seg, "segment", stopped)
    with pytest.raises(JobStopped, match="after 1 of 2 frames; no layer was added"):
        segment_job(None, "DATA", "pretrained")


def test_segment_job_keeps_a_defocus_stack_and_scores_frames(tiny_model_dir, tiny_dataset):
    from napari_hrtem_transfer._napari._jobs import axes_from_layer

    class Layer:  # what axes_from_layer reads from a napari image layer
        data = np.asarray(tiny_dataset.images[:, :2])
        scale = (10.0, 1.0, 0.02, 0.02)
        translate = (-5.0, 0.0, 0.0, 0.0)
        units = ("nanometer", "pixel", "nanometer", "nanometer")
        axis_labels = ("defocus", "image", "y", "x")
        metadata = {"defocus_nm": [-5.0, 5.0], "sampling_A": 0.2}

    axes = axes_from_layer(Layer)
    assert [a["name"] for a in axes] == ["defocus", "image", "y", "x"]
    assert axes[0]["axis"] == [-5.0, 5.0] and axes[1]["units"] is None
    res = segment_job(None, Layer.data, tiny_model_dir, sampling_A=0.2, axes=axes)
    assert res.labels.shape == Layer.data.shape and res.ood_score.shape == (2, 2)
    table = res.frame_table()
    assert [r["defocus_nm"] for r in table] == [-5.0, -5.0, 5.0, 5.0]
    assert [r["image_index"] for r in table] == [0, 1, 0, 1]
    assert all(np.isfinite(r["ood_score"]) for r in table)


@pytest.mark.slow
def test_simulate_job_end_to_end():
    """A real (tiny) abTEM simulation: images and masks as layers, calibrated in nm."""
    cfg = build_simulation_config(
        n_structures=1, defocus_nm="0, 5", image_size_px=64, sampling_A=0.5,
        sim_sampling_A=0.25, n_phonons=1, radius_nm=(0.5, 0.6),
        substrate_thickness_nm=(0.0, 0.0), dose_e_per_A2=400,
    )
    seen = []
    layers = simulate_job(seen.append, cfg)
    assert seen[-1] == JobProgress(1, 1, "simulated 1/1 structures")
    (images, ik, _), (masks, mk, kind) = layers
    assert kind == "labels"
    assert images.shape == (2, 1, 64, 64) == masks.shape
    assert ik["scale"] == pytest.approx((5.0, 1.0, 0.05, 0.05))
    assert ik["translate"][0] == 0.0 and ik["units"][0] == "nm"
    assert masks.any() and not masks.all()
    np.testing.assert_array_equal(masks[0], masks[1])
    assert float(np.asarray(images).mean()) > 0


def test_forward_warnings_reports_every_warning_every_time():
    """Python shows a warning once per code location; a job reports it at every run (and
    from its thread), leaving developer deprecations out."""
    import warnings

    from napari_hrtem_transfer._napari._jobs import WARNING_STAGE, forward_warnings
    from napari_hrtem_transfer._napari._workers import JobRunner, JobStage
    from napari_hrtem_transfer.segmentation import SegmentationWarning

    def job(report, stop=None):
        with forward_warnings(report):
            warnings.warn("the pixel size is unknown; assumed 0.2 Å/px", SegmentationWarning,
                          stacklevel=1)
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
            warnings.warn("the pixel size is unknown; assumed 0.2 Å/px", SegmentationWarning,
                          stacklevel=1)
        return 1

    for _ in range(2):
        runner = JobRunner(job).start()
        assert runner.join(10)
        items, _ = runner.poll()
        stages = [u for u in items if isinstance(u, JobStage) and u.name == WARNING_STAGE]
        assert [s.message for s in stages] == ["the pixel size is unknown; assumed 0.2 Å/px"]
    # two jobs ending out of order leave Python's warnings as they were, and a warning of
    # another thread while jobs run goes where it went before, not into a job
    import threading

    before = (warnings.showwarning, list(warnings.filters))
    elsewhere = []
    release = [threading.Event(), threading.Event()]

    def waiting(report, k, stop=None):
        with forward_warnings(report):
            warnings.warn(f"job {k}", UserWarning, stacklevel=1)
            release[k].wait(10)

    with warnings.catch_warnings():
        warnings.showwarning = lambda msg, *a, **k: elsewhere.append(str(msg))
        outer = warnings.showwarning
        runners = [JobRunner(waiting, k).start() for k in (0, 1)]
        import time

        time.sleep(0.2)
        warnings.warn("from the GUI thread", UserWarning, stacklevel=1)
        release[0].set()
        assert runners[0].join(10)
        release[1].set()
        assert runners[1].join(10)
        assert warnings.showwarning is outer
        for k, r in enumerate(runners):
            items, _ = r.poll()
            assert [u.message for u in items if isinstance(u, JobStage)] == [f"job {k}"]
    assert elsewhere == ["from the GUI thread"]
    assert (warnings.showwarning, list(warnings.filters)) == before
    # a failing block still reports what it warned
    reported = []
    try:
        with forward_warnings(reported.append):
            warnings.warn("STEM image", UserWarning, stacklevel=1)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [u.message for u in reported] == ["STEM image"]
