"""The training loop: learning, freezing, stop/resume, callbacks and reporting."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_hrtem_transfer.errors import CheckpointError, ConfigError  # noqa: E402
from napari_hrtem_transfer.training import (  # noqa: E402
    Callback,
    TrainConfig,
    load_checkpoint,
    read_sidecar,
    train,
)
from napari_hrtem_transfer.training.checkpoint import load_model_weights  # noqa: E402


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None, event: threading.Event | None = None):
        self.steps, self.epochs, self.start, self.end = [], [], None, None
        self.stop_after, self.event = stop_after, event

    def on_train_start(self, start):
        self.start = start

    def on_step(self, u):
        self.steps.append(u)
        if (
            self.event is not None
            and self.stop_after is not None
            and len(self.steps) >= self.stop_after
        ):
            self.event.set()

    def on_epoch(self, u):
        self.epochs.append(u)

    def on_train_end(self, r):
        self.end = r


def _weights(model_dir, which):
    model, _ = load_model_weights(model_dir, which)
    return model.state_dict()


@pytest.mark.slow
def test_overfits_one_small_batch(dataset_path, small_config, tmp_path):
    cfg = small_config.model_copy(
        update=dict(
            n_train=2,
            batch_size=2,
            epochs=1,
            samples_per_epoch=2 * 80,
            augment=False,
            patch_size=None,
            lr=3e-3,
        )
    )
    rec = Recorder()
    res = train(cfg, dataset_path, tmp_path / "m", callbacks=[rec])
    losses = [u.loss for u in rec.steps]
    assert len(losses) == 80
    assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:3]), (losses[:3], losses[-5:])
    assert np.mean(losses[-5:]) < 0.05
    assert res.device == "cpu" and res.precision == "fp32"


def test_history_callbacks_and_best_checkpoint(dataset_path, small_config, tmp_path):
    rec = Recorder()
    cfg = small_config.model_copy(update=dict(epochs=3, eval_defocus_nm=[0.0]))
    res = train(cfg, dataset_path, tmp_path / "m", callbacks=[rec])
    assert rec.start.n_train_images == 10 and rec.start.n_val_structures == 2
    assert rec.start.device == "cpu" and rec.start.precision == "fp32"
    assert len(rec.steps) == 3 * 3 and [u.step for u in rec.steps[:3]] == [0, 1, 2]
    assert [u.epoch for u in rec.epochs] == [0, 1, 2]
    assert rec.end is res and not res.stopped and res.epochs_completed == 3
    for h in res.history:
        assert set(h["val_loss"]) == {"-5", "0"}  # training domain always evaluated
        assert h["val_loss_own"] == h["val_loss"]["-5"]
    own = [h["val_loss_own"] for h in res.history]
    assert res.best_epoch == int(np.argmin(own)) and res.best_val_loss == min(own)
    assert [h["lr"] for h in res.history] == pytest.approx([3e-3, 3e-3 * 0.99, 3e-3 * 0.99**2])
    best = read_sidecar(tmp_path / "m", "best")
    last = read_sidecar(tmp_path / "m", "last")
    assert best["best_epoch"] == res.best_epoch and len(last["history"]) == 3
    assert best["data"]["train_defocus_nm"] == [-5.0]
    assert set(best["data"]["train_structures"]).isdisjoint(best["data"]["val_structures"])
    assert best["normalization"]["method"] == "per_image_standardize"
    assert best["sampling_A"] == 0.2 and "torch" in best["versions"]
    assert best["extra"] == {}
    # the best checkpoint reproduces the best epoch's validation loss of its own domain
    lm = load_checkpoint(tmp_path / "m", "best", device="cpu")
    assert lm.info["epochs_completed"] == res.best_epoch + 1


def test_existing_output_is_not_overwritten(dataset_path, small_config, tmp_path):
    train(small_config.model_copy(update=dict(epochs=1)), dataset_path, tmp_path / "m")
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(small_config, dataset_path, tmp_path / "m")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(small_config, dataset_path, tmp_path / "other", resume=True)


def test_bad_input_writes_nothing(dataset_path, small_config, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(ConfigError, match="n_train"):
        train(small_config.model_copy(update=dict(n_train=999)), dataset_path, out)
    assert not out.exists()


@pytest.mark.parametrize("freeze", ["encoder", "decoder"])
def test_frozen_parameters_and_bn_statistics_are_bitwise_unchanged(
    dataset_path, small_config, tmp_path, freeze
):
    pre = tmp_path / "pre"
    train(small_config.model_copy(update=dict(epochs=1)), dataset_path, pre)
    cfg = TrainConfig.finetune(
        pre,
        train_defocus_nm=[5.0],
        freeze=freeze,
        n_train=4,
        epochs=2,
        batch_size=2,
        patch_size=32,
        lr=1e-3,
        precision="fp32",
        device="cpu",
        num_threads=1,
    )
    train(cfg, dataset_path, tmp_path / "ft")
    before, after = _weights(pre, "best"), _weights(tmp_path / "ft", "best")
    frozen_prefix = "encoder." if freeze == "encoder" else "decoder."
    frozen = [k for k in before if k.startswith(frozen_prefix)]
    trained = [
        k for k in before if not k.startswith(frozen_prefix) and before[k].is_floating_point()
    ]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    side = read_sidecar(tmp_path / "ft", "best")
    assert side["stage"] == "finetune" and side["parent"]["train_defocus_nm"] == [-5.0]
    assert side["parent"]["val_loss_at_best"] is not None
    assert all(p.startswith(frozen_prefix) for p in side["history"][0]["frozen_parts"])


def test_stop_then_resume_equals_uninterrupted_run(dataset_path, small_config, tmp_path):
    cfg = small_config.model_copy(update=dict(epochs=3))
    full = train(cfg, dataset_path, tmp_path / "full")

    ev = threading.Event()
    rec = Recorder(stop_after=4, event=ev)  # 3 steps/epoch: stops in the middle of epoch 2
    part = train(cfg, dataset_path, tmp_path / "part", callbacks=[rec], stop=ev)
    assert part.stopped and part.epochs_completed == 1 and len(rec.steps) == 4
    side = read_sidecar(tmp_path / "part", "last")
    assert side["resume"]["epoch"] == 1 and side["resume"]["step"] == 1
    load_checkpoint(tmp_path / "part", "last", device="cpu")  # a valid checkpoint

    rec2 = Recorder()
    resumed = train(cfg, dataset_path, tmp_path / "part", callbacks=[rec2], resume=True)
    assert rec2.start.start_epoch == 1 and rec2.start.start_step == 1
    assert not resumed.stopped and resumed.best_epoch == full.best_epoch
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    for which in ("best", "last"):
        wa, wb = _weights(tmp_path / "full", which), _weights(tmp_path / "part", which)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (which, k)


def test_stop_before_first_epoch_and_resume_with_changed_config(
    dataset_path, small_config, tmp_path
):
    out = tmp_path / "m"
    res = train(small_config, dataset_path, out, stop=lambda: True)
    assert res.stopped and res.epochs_completed == 0 and res.best_epoch is None
    with pytest.raises(CheckpointError, match="which='last'"):
        load_checkpoint(out, "best")
    with pytest.raises(ConfigError, match="lr"):
        train(small_config.model_copy(update=dict(lr=1e-2)), dataset_path, out, resume=True)


def test_resuming_from_a_damaged_sidecar_names_the_field(dataset_path, small_config, tmp_path):
    out = tmp_path / "m"
    train(small_config, dataset_path, out, stop=lambda: True)
    path = out / "last.json"
    side = json.loads(path.read_text())
    side["training"]["config"]["lr"] = "fast"
    path.write_text(json.dumps(side))
    with pytest.raises(
        CheckpointError, match=r"last\.json is invalid: field\(s\) training\.config\.lr"
    ):
        train(small_config, dataset_path, out, resume=True)
    del side["resume"]
    path.write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="no training config or resume state"):
        train(small_config, dataset_path, out, resume=True)


def test_bf16_autocast_runs_where_supported(dataset_path, small_config, tmp_path):
    from napari_hrtem_transfer.training.device import cpu_has_native_bf16

    cfg = small_config.model_copy(update=dict(precision="auto", epochs=1, deterministic=False))
    res = train(cfg, dataset_path, tmp_path / "m")
    assert res.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert np.isfinite(res.history[0]["train_loss"])
    assert (
        json.loads((tmp_path / "m" / "best.json").read_text())["training"]["precision"]
        == res.precision
    )


def test_resnet18_trains_and_config_round_trips(dataset_path, small_config, tmp_path):
    cfg = TrainConfig.model_validate(
        {**small_config.model_dump(), "epochs": 1, "model": {"architecture": "resnet18"}}
    )
    again = TrainConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    res = train(cfg.model_dump(mode="json"), dataset_path, tmp_path / "m")
    lm = load_checkpoint(tmp_path / "m", device="cpu")
    assert lm.info["model"]["architecture"] == "resnet18" and res.epochs_completed == 1
    assert lm.predict_proba(np.zeros((40, 40)) + 5.0).shape == (1, 40, 40)


def test_finetune_gradual_stop_resume_equals_uninterrupted(dataset_path, small_config, tmp_path):
    pre = tmp_path / "pre"
    train(small_config.model_copy(update=dict(epochs=1)), dataset_path, pre)
    cfg = TrainConfig.finetune(
        pre,
        train_defocus_nm=[0.0],
        freeze="gradual",
        n_train=4,
        epochs=3,
        batch_size=2,
        patch_size=32,
        lr=1e-3,
        precision="fp32",
        device="cpu",
        deterministic=True,
        num_threads=1,
    )
    full = train(cfg, dataset_path, tmp_path / "full")
    frozen = [h["frozen_parts"] for h in full.history]
    assert len(frozen[0]) > len(frozen[1]) > len(frozen[2]) == 0
    ev = threading.Event()
    train(
        cfg, dataset_path, tmp_path / "part", callbacks=[Recorder(stop_after=3, event=ev)], stop=ev
    )
    resumed = train(cfg, dataset_path, tmp_path / "part", resume=True)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    wa, wb = _weights(tmp_path / "full", "last"), _weights(tmp_path / "part", "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_deterministic_runs_are_bitwise_identical(dataset_path, small_config, tmp_path):
    """Same config, data and machine: identical histories, weights and optimizer states
    (pretraining and fine-tuning on 2 threads with precision "auto", i.e. bf16 autocast on CPUs
    with native bf16, as the demo and the sweeps run; one thread is covered by the
    stop/resume tests)."""
    threads = 2
    pre = small_config.model_copy(
        update=dict(num_threads=threads, precision="auto", train_defocus_nm=[-5.0, 5.0])
    )
    ft = TrainConfig.finetune(
        tmp_path / "a",
        train_defocus_nm=[0.0],
        freeze="encoder",
        epochs=1,
        batch_size=4,
        patch_size=32,
        samples_per_epoch=12,
        precision="auto",
        device="cpu",
        deterministic=True,
        num_threads=threads,
    )
    runs = {}
    for name in ("a", "b"):
        runs[name] = train(pre, dataset_path, tmp_path / name)
        runs["ft" + name] = train(ft, dataset_path, tmp_path / f"ft{name}")
    for x, y in (("a", "b"), ("fta", "ftb")):
        for ha, hb in zip(runs[x].history, runs[y].history, strict=True):
            ha, hb = dict(ha), dict(hb)
            assert ha.pop("time_s") >= 0 and hb.pop("time_s") >= 0
            assert ha == hb
        for which in ("best", "last"):
            sa, sb = read_sidecar(tmp_path / x, which), read_sidecar(tmp_path / y, which)
            assert sa["weights_sha256"] == sb["weights_sha256"], (x, which)
        assert sa["optimizer_sha256"] == sb["optimizer_sha256"]
    assert runs["a"].history[-1]["train_loss"] != runs["fta"].history[-1]["train_loss"]


def test_stop_at_the_end_of_an_epoch_skips_validation_and_resumes_exactly(
    dataset_path, small_config, tmp_path
):
    """A Stop after an epoch's last step returns before the validation pass (no waiting)."""
    cfg = small_config.model_copy(update=dict(epochs=2))
    full = train(cfg, dataset_path, tmp_path / "full")
    ev = threading.Event()
    rec = Recorder(stop_after=3, event=ev)  # 3 steps/epoch: the stop comes after the last one
    part = train(cfg, dataset_path, tmp_path / "part", callbacks=[rec], stop=ev)
    assert part.stopped and part.epochs_completed == 0 and not rec.epochs
    side = read_sidecar(tmp_path / "part", "last")
    assert side["resume"]["epoch"] == 0 and side["resume"]["step"] == 3
    resumed = train(cfg, dataset_path, tmp_path / "part", resume=True)
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    wa, wb = _weights(tmp_path / "full", "last"), _weights(tmp_path / "part", "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
