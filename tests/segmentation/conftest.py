"""A tiny trained model (with its OOD reference) and disc images for the segmentation tests."""

from __future__ import annotations

import numpy as np
import pytest


def disc_frames(n: int = 12, size: int = 64, seed: int = 0, contrast: float = -0.4):
    """Frames of dark discs (the particles) in Poisson noise, and their masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(4, 9)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    frames = rng.poisson(200.0 * (1.0 + contrast * masks)).astype(np.float32)
    return frames, masks


def session_folder(tmp_path, n: int = 3, seed: int = 21):
    """A session folder of ``n`` disc frames, one HyperSpy file each (0.2 Å/px)."""
    import hyperspy.api as hs

    frames, _ = disc_frames(n, seed=seed)
    folder = tmp_path / "session"
    folder.mkdir()
    for i, f in enumerate(frames):
        s = hs.signals.Signal2D(f)
        for ax in s.axes_manager.signal_axes:
            ax.scale, ax.units = 0.02, "nm"
        s.save(folder / f"frame_{i:02d}.hspy")
    return folder


@pytest.fixture(scope="session")
def disc_dataset():
    from napari_hrtem_transfer.io import HRTEMDataset

    a, masks = disc_frames(12, seed=1, contrast=-0.4)
    rng = np.random.default_rng(2)
    b = rng.poisson(200.0 * (1.0 + 0.4 * masks)).astype(np.float32)
    return HRTEMDataset(
        images=np.stack([b, a]),
        defocus_nm=[-5.0, 5.0],
        sampling_A=0.2,
        masks=masks,
        dose_e_per_A2=5000.0,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, disc_dataset):
    """A compact U-Net trained for a few epochs on the discs, with its OOD reference."""
    from napari_hrtem_transfer.evaluation.ood import fit_ood_reference_for_checkpoint
    from napari_hrtem_transfer.models import CompactUNetConfig
    from napari_hrtem_transfer.training import TrainConfig, train

    out = tmp_path_factory.mktemp("seg") / "model"
    cfg = TrainConfig.pretrain(
        "all",
        model=CompactUNetConfig(channels=(8, 16, 16, 16)),
        epochs=6,
        samples_per_epoch=64,
        batch_size=4,
        patch_size=64,
        lr=3e-3,
        device="cpu",
        precision="fp32",
        num_threads=1,
        deterministic=True,
    )
    train(cfg, disc_dataset, out)
    fit_ood_reference_for_checkpoint(out, disc_dataset)
    return out
