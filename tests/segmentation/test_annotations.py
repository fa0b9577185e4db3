"""Fine-tuning on a few annotated frames (the core behind napari's Labels-layer training)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.annotations import (
    dataset_from_annotations,
    finetune_on_annotations,
)
from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.segmentation import segment


def _new_microscope(n: int = 5, size: int = 96, seed: int = 0):
    """Frames unlike the training discs: faint squares, low dose, a background ramp."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(2):
            y0, x0 = rng.integers(8, size - 30, 2)
            w = int(rng.integers(10, 20))
            masks[i, y0 : y0 + w, x0 : x0 + w] = True
    ramp = 1.0 + 0.5 * xx / size
    frames = rng.poisson(60.0 * ramp * (1.0 + 0.25 * masks)).astype(np.float32)
    return frames, masks


def _dice(pred, truth):
    pred, truth = pred.astype(bool), truth.astype(bool)
    return 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())


def test_dataset_keeps_only_painted_frames_split_by_frame():
    frames, masks = _new_microscope(5)
    labels = np.zeros(masks.shape, np.uint8)
    labels[1] = masks[1] * 3  # any non-zero label is particle
    labels[3] = masks[3]
    ds = dataset_from_annotations(frames, labels, sampling_A=0.2, model_sampling_A=0.2)
    assert ds.images.shape == (1, 2, 96, 96)
    assert list(ds.structure_ids) == ["frame1", "frame3"]
    np.testing.assert_array_equal(ds.masks[0], masks[1])
    # the frames marked as annotated are used even if empty (a frame without particles)
    ds2 = dataset_from_annotations(frames, labels, sampling_A=0.2, annotated=[0, 1])
    assert list(ds2.structure_ids) == ["frame0", "frame1"] and not ds2.masks[0].any()
    # one annotated frame is cut into quarters so that validation has its own region
    one = np.zeros_like(labels)
    one[2] = masks[2]
    ds3 = dataset_from_annotations(frames, one, sampling_A=0.2)
    assert ds3.images.shape == (1, 4, 48, 48)
    # resampled to the model's pixel size (labels nearest-neighbour)
    ds4 = dataset_from_annotations(frames, labels, sampling_A=0.4, model_sampling_A=0.2)
    assert ds4.images.shape[-2:] == (192, 192) and ds4.sampling_A == 0.2
    assert ds4.masks.dtype == bool


def test_bad_annotations_are_refused_with_the_fix():
    frames, masks = _new_microscope(3)
    with pytest.raises(ConfigError, match="shape"):
        dataset_from_annotations(frames, masks[:, :50], sampling_A=0.2)
    with pytest.raises(ConfigError, match="no frame has a painted pixel"):
        dataset_from_annotations(frames, np.zeros_like(masks), sampling_A=0.2)
    with pytest.raises(ConfigError, match="outside the stack"):
        dataset_from_annotations(frames, masks, sampling_A=0.2, annotated=[0, 7])
    with pytest.raises(ConfigError, match="refused"):
        dataset_from_annotations(frames, masks, sampling_A=20.0, model_sampling_A=0.2)


@pytest.mark.slow
def test_finetuning_on_two_annotated_frames_beats_the_start(tiny_model, tmp_path):
    frames, masks = _new_microscope(5, seed=4)
    labels = np.zeros(masks.shape, np.uint8)
    labels[[0, 2]] = masks[[0, 2]]
    before = segment(frames[[0, 2]], tiny_model, sampling_A=0.2, ood=False).labels
    res = finetune_on_annotations(
        frames,
        labels,
        model=tiny_model,
        out_dir=tmp_path / "ft",
        sampling_A=0.2,
        epochs=12,
        lr=3e-3,
        samples_per_epoch=32,
        device="cpu",
        precision="fp32",
        num_threads=1,
        batch_size=4,
        deterministic=True,
    )
    assert res.n_frames == 2 and not res.train.stopped
    assert res.ood is not None and res.ood.ok, res.ood
    # calibration survives fine-tuning: a finite level, at least the parent's (2 frames are
    # too few held-out frames), and the parent's imaging domain
    from napari_hrtem_transfer.evaluation.ood import OODReference

    ref, parent = OODReference.load(res.out_dir), OODReference.load(tiny_model)
    assert np.isfinite(ref.caution_level) and ref.caution_level >= parent.caution - 1e-9
    assert ref.calibration["parent_level"] == pytest.approx(parent.caution)
    assert ref.domain is not None
    after = segment(frames[[0, 2]], res.out_dir, sampling_A=0.2).labels
    d0 = np.mean([_dice(b, m) for b, m in zip(before, masks[[0, 2]], strict=True)])
    d1 = np.mean([_dice(a, m) for a, m in zip(after, masks[[0, 2]], strict=True)])
    assert d1 > d0 + 0.05, (d0, d1)


def test_stopped_annotation_finetuning_resumes_to_the_same_model(tiny_model, tmp_path):
    """Stop after the first epoch, resume: the same weights as one uninterrupted run."""
    import json

    from napari_hrtem_transfer.training import Callback

    frames, masks = _new_microscope(4, seed=1)
    labels = np.zeros(masks.shape, np.uint8)
    labels[[0, 1]] = masks[[0, 1]]
    opts = dict(
        model=tiny_model,
        sampling_A=0.2,
        epochs=2,
        lr=3e-3,
        samples_per_epoch=16,
        device="cpu",
        precision="fp32",
        num_threads=1,
        batch_size=4,
        deterministic=True,
    )

    class StopAfterFirstEpoch(Callback):
        def __init__(self):
            self.event = __import__("threading").Event()

        def on_epoch(self, update):
            self.event.set()

    cb = StopAfterFirstEpoch()
    part = finetune_on_annotations(
        frames, labels, out_dir=tmp_path / "a", callbacks=[cb], stop=cb.event, **opts
    )
    assert part.train.stopped and part.ood is None
    with pytest.raises(Exception, match="not empty|resume|exists"):
        finetune_on_annotations(frames, labels, out_dir=tmp_path / "a", **opts)
    done = finetune_on_annotations(frames, labels, out_dir=tmp_path / "a", resume=True, **opts)
    whole = finetune_on_annotations(frames, labels, out_dir=tmp_path / "b", **opts)
    assert not done.train.stopped and done.ood is not None and done.ood.ok
    sha = [
        json.loads((d / "last.json").read_text())["weights_sha256"]
        for d in (done.out_dir, whole.out_dir)
    ]
    assert sha[0] == sha[1]
