"""Fine-tuning on a few annotated frames held in memory, of any size (not multiples of 32)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_hrtem_transfer.io.dataset import HRTEMDataset
from napari_hrtem_transfer.models import NORMALIZATION, build_model
from napari_hrtem_transfer.training import TrainConfig, load_checkpoint, read_sidecar, train
from napari_hrtem_transfer.training.checkpoint import save_checkpoint

TINY = {"architecture": "compact", "channels": [4, 8, 8, 8], "bottleneck_dilations": []}


def annotated_frames(n: int, ny: int, nx: int, seed: int = 0) -> HRTEMDataset:
    """``n`` frames of dark discs in Poisson noise, as a user's annotated frames: one domain,
    structure ids = frame ids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    masks = np.zeros((n, ny, nx), bool)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(8, ny - 8), rng.uniform(8, nx - 8)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4, 10) ** 2
    images = rng.poisson(300.0 * (1.0 - 0.3 * masks))[None].astype(np.float32)
    return HRTEMDataset(
        images=images,
        defocus_nm=[0.0],
        sampling_A=0.2,
        masks=masks,
        structure_ids=[f"frame{i}" for i in range(n)],
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pre") / "model"
    save_checkpoint(
        folder,
        "best",
        build_model(TINY),
        {"model": TINY, "normalization": dict(NORMALIZATION), "sampling_A": 0.2},
    )
    return folder


class _Start:
    def on_train_start(self, start):
        self.start = start


def _finetune(pretrained, ds, out, patch_size):
    cfg = TrainConfig.finetune(
        init_from=pretrained,
        train_defocus_nm="all",
        patch_size=patch_size,
        epochs=2,
        lr=1e-3,
        precision="fp32",
        device="cpu",
        deterministic=True,
        num_threads=1,
    )
    cb = _Start()
    result = train(cfg, data=ds, out_dir=out, callbacks=[cb])
    return result, cb.start


@pytest.mark.slow
def test_two_frames_of_100x90_px_finetune_with_the_default_patch(pretrained, tmp_path):
    ds = annotated_frames(2, 100, 90)
    with pytest.warns(UserWarning, match=r"patch_size 256 px .*training on 80x80 px crops"):
        result, start = _finetune(pretrained, ds, tmp_path / "ft", 256)
    assert start.crop_px == (80, 80) and start.n_train_images == 1  # compact: stride 16
    assert start.n_val_structures == 1
    assert result.epochs_completed == 2 and not result.stopped
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    side = read_sidecar(tmp_path / "ft")
    assert side["data"]["crop_px"] == [80, 80] and side["data"]["image_shape"] == [100, 90]
    assert side["data"]["path"] is None and side["stage"] == "finetune"
    # the fine-tuned weights differ from the pretrained ones and segment a whole frame
    lm, pre = load_checkpoint(tmp_path / "ft", device="cpu"), load_checkpoint(pretrained)
    assert side["weights_sha256"] != read_sidecar(pretrained)["weights_sha256"]
    proba = lm.predict_proba(ds.images[0, 0])
    assert proba.shape == (1, 100, 90) and np.isfinite(proba).all()
    assert not np.array_equal(proba, pre.predict_proba(ds.images[0, 0]))


def test_three_frames_of_525x525_px_train_on_the_requested_patch(pretrained, tmp_path):
    ds = annotated_frames(3, 525, 525)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the patch fits: no adjustment, no warning
        result, start = _finetune(pretrained, ds, tmp_path / "ft", 256)
    assert start.crop_px == (256, 256) and start.n_train_images == 2
    assert result.epochs_completed == 2
    side = read_sidecar(tmp_path / "ft")
    assert side["data"]["crop_px"] == [256, 256]
    # whole-frame training uses the largest multiple of the stride (16): 512 x 512
    _, start = _finetune(pretrained, ds, tmp_path / "whole", None)
    assert start.crop_px == (512, 512)
