"""Figures of evaluations and of the published table (matplotlib, Agg backend, no GUI).

Heatmaps of pretrain x target matrices, per-domain bars before/after fine-tuning, the
generalization and its shift, per-domain loss/Dice/OOD with intervals, OOD score against the
true loss, and sample frames with their masks.  Every figure is written atomically; axes are
labelled in nm (defocus, abTEM sign: positive = underfocus).  :mod:`.report` assembles them
into pages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import savefig_atomic
from .aggregate import (
    Matrix,
)
from .table import ResultTable

__all__ = [
    "plot_domain_bars",
    "plot_domain_metrics",
    "plot_generalization",
    "plot_matrix",
    "plot_ood_vs_loss",
    "plot_samples",
]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # noqa: BLE001 - keep the current backend if it cannot switch
            pass
    import matplotlib.pyplot as plt

    return plt


def _fmt_nm(v: float) -> str:
    return f"{v:+g}" if v else "0"


# ----------------------------------------------------------------------------- figures
def plot_matrix(
    m: Matrix,
    path: str | os.PathLike,
    diverging: bool = False,
    annotate: bool = True,
    fmt: str = ".3f",
) -> Path:
    """Heatmap in the study's layout: pretraining defocus (rows) x target defocus (columns).

    Parameters
    ----------
    m
        The matrix (values, rows_nm, cols_nm, labels).
    path
        PNG to write.
    diverging
        Use a diverging colour map centred on 0 (for shifts: red = worse).
    annotate
        Write each cell's value into it.
    fmt
        Format of the annotations.
    """
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    v = np.asarray(m.values, float)
    fig, ax = plt.subplots(
        figsize=(1.0 + 0.62 * max(len(m.cols_nm), 3), 1.4 + 0.5 * max(len(m.rows_nm), 2))
    )
    masked = np.ma.masked_invalid(v)
    if diverging:
        lim = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
        lim = lim or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")  # missing cells: grey
        norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
        im = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto")
    else:
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
        im = ax.imshow(masked, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(m.cols_nm)), [_fmt_nm(c) for c in m.cols_nm])
    ax.set_yticks(range(len(m.rows_nm)), [_fmt_nm(r) for r in m.rows_nm])
    ax.set_xlabel(m.col_label)
    ax.set_ylabel(m.row_label)
    ax.set_title(m.title, fontsize=10)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(m.value_label, fontsize=8)
    if annotate and v.size <= 200:
        finite = v[np.isfinite(v)]
        mid = np.nanmedian(finite) if finite.size else 0
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if np.isfinite(v[i, j]):
                    light = (v[i, j] < mid) if not diverging else abs(v[i, j]) > 0.6 * abs(lim)
                    ax.text(
                        j,
                        i,
                        format(v[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if light else "black",
                    )
    return savefig_atomic(fig, path)


def _paired_bars(
    ax: Any,
    x: np.ndarray,
    before: Sequence[float],
    after: Sequence[float] | None,
    labels: tuple[str, str],
    errors: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> None:
    """Bars of ``before`` (blue) and, side by side, ``after`` (orange; None: before alone),
    each with optional (2, n) lower/upper confidence bounds."""

    def _err(e, v):
        if e is None:
            return None
        e = np.asarray(e, float)
        return np.abs(np.vstack([np.asarray(v) - e[0], e[1] - np.asarray(v)]))

    w = 0.4 if after is not None else 0.7
    pairs = [(before, labels[0], "tab:blue", errors[0], -w / 2 if after is not None else 0.0)]
    if after is not None:
        pairs.append((after, labels[1], "tab:orange", errors[1], w / 2))
    for values, label, color, err, dx in pairs:
        ax.bar(x + dx, values, w, label=label, color=color, yerr=_err(err, values), capsize=2)


def plot_domain_bars(
    domains_nm: Sequence[float],
    before: Sequence[float],
    after: Sequence[float] | None,
    path: str | os.PathLike,
    title: str = "",
    ylabel: str = "loss",
    labels: tuple[str, str] = ("before transfer", "after transfer"),
    marks: dict[str, float] | None = None,
    err_before: np.ndarray | None = None,
    err_after: np.ndarray | None = None,
) -> Path:
    """Per-domain bars, before (and after) fine-tuning.

    Parameters
    ----------
    domains_nm
        Defocus of each domain [nm].
    before, after
        Values per domain; ``after`` may be None.
    path
        PNG to write.
    marks
        Domains to mark with a vertical line, e.g. ``{"pretraining": -10, "target": 5}`` [nm].
    err_before, err_after
        Optional (2, n) arrays of lower/upper confidence bounds.
    """
    plt = _plt()
    d = np.asarray(domains_nm, float)
    x = np.arange(d.size)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * d.size + 2), 3.4))
    _paired_bars(ax, x, before, after, labels, (err_before, err_after))
    for (name, v), c in zip((marks or {}).items(), ("tab:blue", "tab:orange", "k"), strict=False):
        hit = np.flatnonzero(np.abs(d - v) < 1e-6)
        if hit.size:
            ax.axvline(hit[0], color=c, ls="--", lw=1, alpha=0.7)
            ax.text(hit[0], ax.get_ylim()[1] * 0.97, f" {name}", color=c, fontsize=7, va="top")
    ax.set_xticks(x, [_fmt_nm(v) for v in d])
    ax.set_xlabel("evaluated defocus [nm]")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return savefig_atomic(fig, path)


def plot_generalization(
    labels: Sequence[str],
    before: Sequence[float],
    after: Sequence[float] | None,
    path: str | os.PathLike,
    title: str = "Generalization (std of per-domain losses, non-zero defoci)",
    xlabel: str = "model",
) -> Path:
    """Generalization before/after fine-tuning with the shift annotated (> 0 = worse)."""
    plt = _plt()
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2))
    _paired_bars(ax, x, before, after, ("after pretraining", "after transfer"))
    if after is not None:
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            if np.isfinite(a) and np.isfinite(b):
                s = a - b
                ax.text(
                    i,
                    max(a, b),
                    f"shift {s:+.4f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="tab:red" if s > 0 else "tab:green",
                )
    ax.set_xticks(x, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("generalization (lower = better)")
    ax.set_title(title, fontsize=10)
    # the legend sits outside the axes: inside, it covered the shift labels above the bars
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.margins(y=0.15)
    return savefig_atomic(fig, path)


def plot_domain_metrics(results: dict[str, ResultTable], path: str | os.PathLike) -> Path:
    """Loss, Dice and median OOD score per domain (with bootstrap CIs) for one or two models."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    ood_values: list[np.ndarray] = []
    for (label, t), c in zip(
        results.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False
    ):
        t = t.where(material="all") if "material" in t else t
        d = t["domain_defocus_nm"]
        o = np.argsort(d)
        for ax, name in zip(axes[:2], ("loss", "dice"), strict=True):
            v = t[name][o]
            if np.isfinite(v).any():
                lo, hi = t[f"{name}_ci_low"][o], t[f"{name}_ci_high"][o]
                ax.errorbar(
                    d[o],
                    v,
                    yerr=np.abs(np.vstack([v - lo, hi - v])),
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=c,
                    label=label,
                )
        if "ood_score" in t and np.isfinite(t["ood_score"]).any():
            axes[2].plot(d[o], t["ood_score"][o], marker="o", ms=3, color=c, label=label)
            ood_values.append(np.asarray(t["ood_score"], dtype=float))
    for ax, yl in zip(
        axes, ("loss (BCE) ± 95% CI", "Dice ± 95% CI", "median OOD score"), strict=True
    ):
        ax.set_xlabel("defocus [nm]")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[2].axhline(0, color="k", lw=0.6)
    if ood_values:
        _symlog_if_wide(axes[2], np.concatenate(ood_values))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    fig.tight_layout()
    return savefig_atomic(fig, path)


def _symlog_if_wide(ax, values, axis: str = "y", linthresh: float = 1.0) -> None:
    """A symmetric log axis when some OOD scores are far above the rest (a frame in which
    the model finds no particle can score 100x a typical frame)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and np.max(np.abs(v)) > 20 * linthresh:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=linthresh)


def plot_ood_vs_loss(frames: ResultTable, path: str | os.PathLike, title: str = "") -> Path:
    """Per-frame OOD score against the true loss, coloured by defocus [nm]."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    sc = ax.scatter(
        frames["ood_score"],
        frames["loss"],
        c=frames["domain_defocus_nm"],
        cmap="coolwarm",
        s=10,
        alpha=0.8,
    )
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("defocus [nm]")
    _symlog_if_wide(ax, frames["ood_score"], axis="x")
    ax.set_xlabel("label-free OOD score (0 = training-like)")
    ax.set_ylabel("true loss (BCE)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return savefig_atomic(fig, path)


def plot_overlap_vs_loss(frames: ResultTable, path: str | os.PathLike, title: str = "") -> Path:
    """CTF information-transfer overlap of each frame with the model's training conditions
    (:func:`~.ctf.ctf_overlap`, 0..1) against the true loss: frames (dots, coloured by
    defocus [nm]) and the median per defocus domain (black); Spearman in the legend."""
    from scipy.stats import spearmanr

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ov, loss, dom = frames["ctf_overlap"], frames["loss"], frames["domain_defocus_nm"]
    sc = ax.scatter(ov, loss, c=dom, cmap="coolwarm", s=10, alpha=0.6)
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("defocus [nm]")
    doms = np.unique(dom)
    med = np.array([[np.median(ov[dom == d]), np.mean(loss[dom == d])] for d in doms])
    rho_d = spearmanr(med[:, 0], med[:, 1])[0] if len(doms) > 2 else np.nan
    rho_f = spearmanr(ov, loss)[0] if len(ov) > 2 else np.nan
    ax.plot(
        med[:, 0],
        med[:, 1],
        "ko",
        ms=4,
        label=f"domain median (Spearman {rho_d:+.2f}; frames {rho_f:+.2f})",
    )
    ax.set_xlabel("CTF overlap with the training conditions (1 = alike)")
    ax.set_ylabel("true loss (BCE)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return savefig_atomic(fig, path)


def _scale_bar(ax, shape: tuple[int, ...], sampling_A: float) -> float:
    """Draw a white scale bar (1-2-5 x 10^k nm, about a fifth of the width) at the bottom left.

    Returns its length [nm].
    """
    ny, nx = int(shape[0]), int(shape[1])
    width_nm = nx * sampling_A / 10.0
    target = width_nm / 5.0
    exp = np.floor(np.log10(target))
    length_nm = max(
        (m * 10.0**exp for m in (1.0, 2.0, 5.0) if m * 10.0**exp <= target), default=10.0**exp
    )
    px = length_nm * 10.0 / sampling_A
    x0, y0 = 0.05 * nx, 0.92 * ny
    ax.plot([x0, x0 + px], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt")
    ax.text(
        x0 + px / 2,
        y0 - 0.03 * ny,
        f"{length_nm:g} nm",
        color="white",
        ha="center",
        va="bottom",
        fontsize=7,
    )
    return float(length_nm)


def plot_samples(samples: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Sample frames with the predicted mask overlaid (and the ground truth outlined)."""
    plt = _plt()
    n = max(len(samples), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.3), squeeze=False)
    for ax, s in zip(axes[0], samples, strict=False):
        img = np.asarray(s["image"], float)
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        pred = np.asarray(s["proba"]) > 0.5
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
        if s.get("mask") is not None and np.any(s["mask"]):
            ax.contour(np.asarray(s["mask"], float), levels=[0.5], colors="cyan", linewidths=0.8)
        parts = [f"{s['defocus_nm']:+g} nm"]
        if np.isfinite(s.get("ood_score", np.nan)):
            parts.append(f"OOD {s['ood_score']:+.2f}")
        if np.isfinite(s.get("dice", np.nan)):
            parts.append(f"Dice {s['dice']:.2f}")
        ax.set_title(", ".join(parts), fontsize=8)
        ax.set_axis_off()
        if s.get("sampling_A"):
            _scale_bar(ax, img.shape, float(s["sampling_A"]))
    for ax in axes[0][len(samples) :]:
        ax.set_axis_off()
    fig.suptitle(title or "predicted mask (yellow), ground truth (cyan outline)", fontsize=9)
    fig.tight_layout()
    return savefig_atomic(fig, path)
