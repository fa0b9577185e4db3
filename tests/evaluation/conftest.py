"""Fixtures of the evaluation tests: a cheap weak-phase defocus series and a tiny trained U-Net.

The synthetic series is a stand-in for the abTEM simulator (seconds instead of minutes): a
weak-phase object (crystalline disks with lattice fringes on amorphous carbon) imaged through
the phase-contrast transfer function ``sin(chi)`` with ``chi = pi*lambda*df*k^2 +
pi/2*Cs*lambda^3*k^4`` (abTEM sign: positive defocus = underfocus), Poisson noise at a dose.
In focus the particles have almost no contrast, as in the real series.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.io import HRTEMDataset

LAMBDA_A = 0.0197  # 300 kV


def weak_phase_series(
    n_images: int = 24,
    defocus_nm=(-20.0, -10.0, 0.0, 10.0, 20.0),
    size: int = 64,
    sampling_A: float = 0.5,
    dose: float = 400.0,
    seed: int = 0,
    amplitude_contrast: float = 0.0,
) -> HRTEMDataset:
    """A labelled synthetic defocus series (see module docstring).

    ``amplitude_contrast`` is the amplitude-contrast ratio A of the particles: the transfer
    function becomes ``sqrt(1 - A^2) sin(chi) + A cos(chi)`` (A ~ 0.1 for heavy atoms), so
    that they keep a little contrast in focus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    k = np.fft.fftfreq(size, d=sampling_A)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    phases, masks = [], []
    for _ in range(n_images):
        phase = 0.05 * _smooth(rng.normal(size=(size, size)), 1.5)
        mask = np.zeros((size, size), bool)
        for _p in range(rng.integers(1, 3)):
            r = rng.uniform(6, 11)
            cy, cx = rng.uniform(r, size - r, 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            g = rng.uniform(0.25, 0.35) / sampling_A * sampling_A  # fringes [1/px]
            th = rng.uniform(0, np.pi)
            fr = np.cos(2 * np.pi * g * (np.cos(th) * xx + np.sin(th) * yy))
            phase = phase + disk * (0.25 + 0.15 * fr)
            mask |= disk
        phases.append(phase)
        masks.append(mask)
    phases = np.asarray(phases)
    F = np.fft.fft2(phases)
    images = []
    actual = []
    for df_nm in defocus_nm:
        plane, act = [], []
        for i in range(n_images):
            df = (df_nm + rng.normal(0, 0.5)) * 10.0  # [Å]
            chi = np.pi * LAMBDA_A * df * k2 + 0.5 * np.pi * 5e4 * LAMBDA_A**3 * k2**2
            env = np.exp(-((np.pi * 10.0 * LAMBDA_A) ** 2) * k2**2 / 2)
            a = float(amplitude_contrast)
            ctf = np.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)
            img = 1.0 - 2.0 * np.real(np.fft.ifft2(F[i] * ctf * env))
            lam = np.clip(img, 0, None) * dose * sampling_A**2
            plane.append(rng.poisson(lam).astype(np.uint16))
            act.append(df / 10.0)
        images.append(plane)
        actual.append(act)
    return HRTEMDataset(
        images=np.asarray(images),
        defocus_nm=np.asarray(defocus_nm, float),
        sampling_A=sampling_A,
        masks=np.asarray(masks),
        structure_ids=np.array([f"s{i:03d}" for i in range(n_images)]),
        materials=np.array(["CdSe"] * n_images),
        actual_defocus_nm=np.asarray(actual),
        dose_e_per_A2=dose,
        info={"title": "synthetic weak-phase series (tests)"},
    )


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma)


def train_tiny(ds: HRTEMDataset, domain_index: int, train_ids, steps: int = 80, seed: int = 0):
    """Train a tiny compact U-Net on one domain (seconds on 2 cores); eval mode on return."""
    import torch

    from napari_hrtem_transfer.models import compact_unet, standardize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy CPU
    try:
        return _train(ds, domain_index, train_ids, steps, seed, compact_unet, standardize)
    finally:
        torch.set_num_threads(threads)


def _train(ds, domain_index, train_ids, steps, seed, compact_unet, standardize):
    import torch

    torch.manual_seed(seed)
    model = compact_unet(channels=(8, 16, 24, 32), bottleneck_dilations=(2,))
    x = torch.from_numpy(standardize(np.asarray(ds.images[domain_index][train_ids])))[:, None]
    y = torch.from_numpy(ds.masks[train_ids].astype(np.float32))[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        b = rng.choice(len(x), size=min(8, len(x)), replace=False)
        k = int(rng.integers(4))
        xb, yb = torch.rot90(x[b], k, (2, 3)), torch.rot90(y[b], k, (2, 3))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run several times faster on one thread when the CPU is shared."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def series() -> HRTEMDataset:
    return weak_phase_series()


@pytest.fixture(scope="session")
def trained(series):
    """A tiny model trained at -10 nm on structures 0..15 (16..23 held out)."""
    return train_tiny(series, 1, np.arange(16))
