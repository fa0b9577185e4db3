"""Calibration survives fine-tuning: `hrtem-transfer finetune --model pretrained --images F
--labels L` writes a finite, parent-derived caution level and an imaging domain."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main


@pytest.mark.slow
def test_cli_finetune_on_two_annotated_frames_has_a_finite_caution_level(tmp_path, capsys):
    from napari_hrtem_transfer.evaluation.ood import OODReference
    from napari_hrtem_transfer.io.dataset import load_dataset
    from napari_hrtem_transfer.segmentation import pretrained_model_dir, segment

    repo_sample = pretrained_model_dir().parents[3] / "sample_data" / "defocus_series_small.hspy"
    ds = load_dataset(repo_sample, lazy=False)
    frames = np.asarray(ds.images).reshape(-1, *ds.images.shape[-2:]).astype(np.float32)
    masks = np.asarray(ds.masks)
    masks = np.broadcast_to(masks[None], (ds.n_defocus, *masks.shape)).reshape(
        -1, *masks.shape[-2:]
    )
    labels = np.zeros(frames.shape, np.uint8)
    labels[[0, 2]] = masks[[0, 2]]  # two annotated frames
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "labels.npy", labels)
    argv = [
        "finetune", "--model", "pretrained",
        "--images", str(tmp_path / "frames.npy"), "--labels", str(tmp_path / "labels.npy"),
        "--sampling", str(ds.sampling_A), "--epochs", "1", "--batch-size", "2",
        "--samples-per-epoch", "4", "--device", "cpu", "--threads", "1", "--no-progress",
        "--out", str(tmp_path / "ft"),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "ft" / "ood_reference.json").read_text())
    assert meta["caution_level"] is not None and math.isfinite(meta["caution_level"])
    parent = OODReference.load(pretrained_model_dir())
    # few frames: the level is derived from the parent's calibration (at least its level)
    assert meta["calibration"]["parent_level"] == pytest.approx(parent.caution)
    assert meta["caution_level"] >= parent.caution - 1e-9
    dom = meta["imaging_domain"]
    lo, hi = dom["defocus_nm_range"]
    assert lo <= -25 and hi >= 25  # the parent's domain, widened by the frames' estimates
    # segment reads it: a finite level, not the legacy 1
    res = segment(frames, tmp_path / "ft", sampling_A=ds.sampling_A)
    assert math.isfinite(res.ood_caution) and res.ood_caution == pytest.approx(
        meta["caution_level"]
    )
    # the other 18 frames of the series (-10..+10 nm, in the training range) are in domain
    assert np.mean(res.ood_flag) <= 0.3, res.ood_reasons
