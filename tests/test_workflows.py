"""The transfer workflow (evaluation.workflows.run_transfer) and its three callers.

The sweep's run_task and annotation fine-tuning must train the same models (same weights,
same metrics) as run_transfer called directly with the same configs and seed, and behave the
same way when a stop is requested during fine-tuning or when the OOD fit fails. (The demo's
same-seed numbers are checked in tests/evaluation/test_demo.py.)
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.annotations import dataset_from_annotations, finetune_on_annotations
from napari_hrtem_transfer.evaluation.workflows import (
    OODFitFailed,
    TransferEvaluation,
    run_transfer,
    train_stage,
)
from napari_hrtem_transfer.io.dataset import HRTEMDataset, load_dataset, save_dataset
from napari_hrtem_transfer.training import TrainConfig, read_sidecar

TINY = dict(
    batch_size=4,
    samples_per_epoch=8,
    patch_size=None,
    device="cpu",
    precision="fp32",
    num_threads=1,
    deterministic=True,
    seed=0,
)


def _discs(n: int = 8, size: int = 64, defoci=(-5.0, 0.0, 5.0), seed: int = 0) -> HRTEMDataset:
    """Discs, bright below focus and dark above it, with Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        cy, cx = rng.uniform(12, size - 12, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(5, 9) ** 2
    imgs = np.stack([200.0 * (1.0 + np.sign(-d) * 0.4 * masks) for d in defoci])
    return HRTEMDataset(
        images=rng.poisson(imgs).astype(np.float32),
        defocus_nm=list(defoci),
        sampling_A=0.2,
        masks=masks,
        structure_ids=[f"st{i:03d}" for i in range(n)],
        dose_e_per_A2=5000.0,
    )


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workflow") / "discs.hspy"
    save_dataset(_discs(), path)
    return path


@pytest.fixture(scope="module")
def pretrained(data_path, tmp_path_factory) -> Path:
    """A pretrained tiny model (pretraining stage: training + OOD reference)."""
    cfg = TrainConfig(
        model={"architecture": "compact", "channels": [4, 8, 8, 8]},
        train_defocus_nm=[-5.0],
        epochs=1,
        **TINY,
    )
    out = tmp_path_factory.mktemp("pre") / "pretrained"
    stage = train_stage(cfg, load_dataset(data_path, lazy=False), out)
    assert stage.ood.ok, stage.ood.message
    return out


def _weights(model_dir: Path) -> str:
    return read_sidecar(model_dir)["weights_sha256"]


def _sweep_spec(data_path: Path, tmp_path: Path) -> dict:
    from napari_hrtem_transfer.sweep.plan import plan_sweep

    raw = {
        "name": "one",
        "data": {"pretrain": str(data_path)},
        "grid": {
            "pretrain_defocus_nm": [-5.0],
            "transfer_defocus_nm": [5.0],
            "freeze": ["encoder"],
            "n_transfer": [4],
            "seeds": [0],
        },
        "model": {"architecture": "compact", "channels": [4, 8, 8, 8]},
        "pretrain": {"epochs": 1, "batch_size": 4},
        "transfer": {"epochs": 1, "batch_size": 4},
        "run": {"device": "cpu", "precision": "fp32", "n_boot": 20, "reuse_pretrained": False},
    }
    return plan_sweep(raw, tmp_path / "db.sqlite").specs[0]


def test_sweep_run_is_run_transfer(data_path, tmp_path):
    """A sweep run (reuse off) = run_transfer with the run's configs: weights and metrics."""
    import torch

    from napari_hrtem_transfer.sweep.tasks import run_task

    spec = _sweep_spec(data_path, tmp_path)
    threads = torch.get_num_threads()
    try:
        out = run_task(spec)
    finally:
        torch.set_num_threads(threads)
    ds = load_dataset(data_path, lazy=False)
    pre_dir = tmp_path / "direct" / "pretrained"
    ft = TrainConfig.model_validate({**spec["transfer_config"], "init_from": str(pre_dir)})
    tr = run_transfer(
        ft,
        ds,
        tmp_path / "direct" / "finetuned",
        pretrain=TrainConfig.model_validate(spec["pretrain_config"]),
        evaluation=TransferEvaluation(
            same_structures=True, options=dict(n_boot=20, batch_size=8, n_samples=1)
        ),
    )
    run = out["run"]
    assert run["pretrain_weights_sha256"] == _weights(tr.pretrained_dir)
    assert run["transfer_weights_sha256"] == _weights(tr.finetuned_dir)
    for stage, ev in (("pretrain", tr.before), ("transfer", tr.after)):
        rows = [r for r in out["domains"] if r["stage"] == stage]
        np.testing.assert_allclose([r["dice"] for r in rows], ev.domains["dice"])
        np.testing.assert_allclose([r["loss"] for r in rows], ev.domains["loss"])
        # the run's provenance reaches the records
        assert {r["freeze"] for r in rows} == {"encoder"}
    assert run["shift"] == pytest.approx(run["generalization_after"] - run["generalization_before"])


def _annotated(n: int = 3, size: int = 64, seed: int = 1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        cy, cx = rng.uniform(15, size - 15, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 8**2
    frames = rng.poisson(80.0 * (1.0 + 0.3 * masks)).astype(np.float32)
    return frames, masks.astype(np.uint8)


ANNOTATION_OPTS = dict(
    sampling_A=0.2,
    epochs=2,
    lr=3e-3,
    samples_per_epoch=8,
    device="cpu",
    precision="fp32",
    num_threads=1,
    batch_size=4,
    deterministic=True,
)


def _annotation_config(pretrained: Path, ds: HRTEMDataset) -> TrainConfig:
    """The config finetune_on_annotations documents: all frames, 1/4 held out, patch <= 256."""
    opts = {k: v for k, v in ANNOTATION_OPTS.items() if k != "sampling_A"}
    return TrainConfig.finetune(
        pretrained,
        "all",
        val_fraction=0.25,
        patch_size=min(256, min(ds.images.shape[-2:]) // 32 * 32),
        seed=0,
        **opts,
    )


def test_annotation_finetuning_is_run_transfer(pretrained, tmp_path):
    frames, labels = _annotated()
    res = finetune_on_annotations(
        frames, labels, out_dir=tmp_path / "ann", model=pretrained, **ANNOTATION_OPTS
    )
    ds = dataset_from_annotations(frames, labels, sampling_A=0.2, model_sampling_A=0.2)
    tr = run_transfer(_annotation_config(pretrained, ds), ds, tmp_path / "direct")
    assert res.ood.ok and tr.finetune.ood.ok
    assert _weights(res.out_dir) == _weights(tr.finetuned_dir)
    assert res.ood.n_samples == tr.finetune.ood.n_samples > 0
    assert res.ood.caution_level == pytest.approx(tr.finetune.ood.caution_level)
    assert tr.before is None and tr.after is None  # no evaluation asked for


class _StopInFinetuning:
    """Requests a stop after the first fine-tuning epoch (pretraining runs to its end)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.stage = ""

    def on_train_start(self, s) -> None:
        self.stage = s.stage

    def on_epoch(self, u) -> None:
        if self.stage == "finetune":
            self.event.set()


def _assert_stopped_files(model_dir: Path) -> None:
    """A stopped fine-tuning: a resumable last checkpoint, no OOD reference of it."""
    last = json.loads((model_dir / "last.json").read_text())
    assert last["weights_sha256"]
    assert not (model_dir / "ood_reference.json").exists()


def test_stop_during_finetuning_same_behaviour_in_both_callers(data_path, pretrained, tmp_path):
    ds = load_dataset(data_path, lazy=False)
    pre_dir = tmp_path / "t" / "pretrained"
    pre = TrainConfig(
        model={"architecture": "compact", "channels": [4, 8, 8, 8]},
        train_defocus_nm=[-5.0],
        epochs=1,
        **TINY,
    )
    ft = TrainConfig.finetune(pre_dir, [5.0], freeze="encoder", n_train=4, epochs=2, **TINY)
    cb = _StopInFinetuning()
    tr = run_transfer(
        ft,
        ds,
        tmp_path / "t" / "finetuned",
        pretrain=pre,
        evaluation=TransferEvaluation(),
        callbacks=[cb],
        stop=cb.event,
    )
    assert tr.stopped and tr.finetune.train.stopped and tr.finetune.ood is None
    assert tr.pretrain.ood.ok and not tr.pretrain.stopped  # the finished stage is complete
    assert tr.before is None and tr.after is None  # nothing evaluated after a stop
    _assert_stopped_files(tr.finetuned_dir)
    again = run_transfer(ft, ds, tr.finetuned_dir, resume=True)
    assert not again.stopped and again.finetune.ood.ok

    frames, labels = _annotated()
    cb = _StopInFinetuning()
    res = finetune_on_annotations(
        frames,
        labels,
        out_dir=tmp_path / "ann",
        model=pretrained,
        callbacks=[cb],
        stop=cb.event,
        **ANNOTATION_OPTS,
    )
    assert res.train.stopped and res.ood is None
    _assert_stopped_files(res.out_dir)


def test_failed_ood_fit_keeps_the_model_in_every_caller(
    data_path, pretrained, tmp_path, monkeypatch
):
    """The fit's failure never raises in run_transfer/annotations; a sweep run raises it."""
    from napari_hrtem_transfer.evaluation.ood import fit as ood_fit
    from napari_hrtem_transfer.sweep.tasks import run_task

    real = ood_fit._fit_for_checkpoint

    def broken(model_dir, *args, **kwargs):
        if Path(model_dir).name != "pretrained":
            raise RuntimeError("disk on fire")
        return real(model_dir, *args, **kwargs)

    monkeypatch.setattr(ood_fit, "_fit_for_checkpoint", broken)
    frames, labels = _annotated()
    res = finetune_on_annotations(
        frames, labels, out_dir=tmp_path / "ann", model=pretrained, **ANNOTATION_OPTS
    )
    assert not res.ood.ok and "disk on fire" in res.ood.error
    assert (res.out_dir / "best.json").is_file()  # the trained model is kept
    assert "--fit-ood" in res.ood.message  # and the message says how to retry

    ds = dataset_from_annotations(frames, labels, sampling_A=0.2, model_sampling_A=0.2)
    tr = run_transfer(_annotation_config(pretrained, ds), ds, tmp_path / "direct")
    assert tr.finetune.ood.error == res.ood.error and not tr.stopped
    with pytest.raises(OODFitFailed, match="disk on fire"):
        tr.require_ood()

    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(OODFitFailed, match="disk on fire"):
            run_task(_sweep_spec(data_path, tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert not any((tmp_path / "db_models" / "tmp").glob("*"))  # nothing half-written kept
