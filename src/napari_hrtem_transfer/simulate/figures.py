"""Figures of simulated datasets (matplotlib, no GUI backend needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def plot_defocus_series(ds, path: str | os.PathLike, image_index: int = 0, dpi: int = 110) -> Path:
    """Save a row of one structure's images across the defocus series plus its mask.

    Parameters
    ----------
    ds
        :class:`~napari_hrtem_transfer.io.HRTEMDataset`.
    path
        PNG file to write (atomically).
    image_index
        Which structure to show.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from ..io.atomic import atomic_path

    n_def = ds.n_defocus
    ny, nx = ds.image_shape
    extent_nm = [0, nx * ds.sampling_A / 10, ny * ds.sampling_A / 10, 0]
    fig = Figure(figsize=(max(2.3 * (n_def + 1), 5.5), 3.0), layout="constrained")
    axes = fig.subplots(1, n_def + 1)
    for j in range(n_def):
        img = np.asarray(ds.images[j, image_index], dtype=np.float32)
        lo, hi = np.percentile(img, [0.5, 99.5])
        axes[j].imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent_nm)
        axes[j].set_title(f"defocus {ds.defocus_nm[j]:+g} nm", fontsize=9)
        axes[j].set_xlabel("x [nm]", fontsize=8)
        axes[j].tick_params(labelsize=7)
    axes[0].set_ylabel("y [nm]", fontsize=8)
    if ds.masks is not None:
        axes[-1].imshow(
            ds.masks[image_index], cmap="magma", extent=extent_nm, interpolation="nearest"
        )
        axes[-1].set_title("ground-truth mask", fontsize=9)
        axes[-1].set_xlabel("x [nm]", fontsize=8)
        axes[-1].tick_params(labelsize=7)
    else:
        axes[-1].set_axis_off()
    dose = f", {ds.dose_e_per_A2:g} e/Å²" if ds.dose_e_per_A2 else ", noise-free"
    fig.suptitle(
        f"{ds.materials[image_index]} structure {ds.structure_ids[image_index]}:\n"
        f"{ds.energy_eV / 1e3:g} kV, {ds.sampling_A:g} Å/px{dose} (positive defocus = underfocus)",
        fontsize=9,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
