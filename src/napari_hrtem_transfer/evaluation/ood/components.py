"""The verdict's label-free components that do not need the network (numpy only).

* **Input statistics** (:func:`power_spectrum_profiles`): the radially averaged, normalised
  log power spectrum of a frame (Hann-windowed tiles of the training image size, mean power
  per ring, log, minus its mean over the rings: the *shape* of the spectrum, independent of
  the dose and the gain), compared with the training images' (:meth:`OODReference.
  ps_distance`).  It sees what a CTF, a camera, a pixel size or a material does to the
  input, whatever the network thinks of it.
* **Signal above shot noise** (:func:`spectral_contrast`): the mean log power at low
  frequencies minus that near Nyquist [nats].  Shot noise is white (0); a phase-contrast
  image has its CTF-modulated signal at low and mid frequencies (training images: > 1).
* **Physics** (:func:`physics_components`): the CTF estimate of
  :mod:`napari_hrtem_transfer.evaluation.ctf` (defocus from the Thon rings of the amorphous
  support, periodic lattice, blank frame) against the model's imaging domain, and the CTF
  information-transfer overlap with the training defoci.

Units: spatial frequency ``q`` [1/Å] (no 2π), defocus [nm] (abTEM sign, positive =
underfocus), pixel size [Å/px].
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Tile side of the power-spectrum profile [px] (the shipped model's training image size).
PS_TILE_PX = 256
#: Radial bins of the profile, linear in q from 2 / (tile sampling) to Nyquist.
PS_BINS = 32
#: Most tiles averaged per frame (a regular grid over the frame): bounds the cost.
PS_MAX_TILES = 16
#: Low band of the spectral contrast [fraction of Nyquist].
LOW_BAND = (0.04, 0.4)
#: High band of the spectral contrast [fraction of Nyquist].
HIGH_BAND = (0.8, 1.0)


def _tiles(frame: np.ndarray, t: int, max_tiles: int) -> np.ndarray:
    """Up to ``max_tiles`` tiles (k, t, t) on a regular grid over the frame."""
    h, w = frame.shape
    ny, nx = max(1, h // t), max(1, w // t)
    ys = np.linspace(0, h - t, ny).round().astype(int) if ny > 1 else [max(0, (h - t) // 2)]
    xs = np.linspace(0, w - t, nx).round().astype(int) if nx > 1 else [max(0, (w - t) // 2)]
    pos = [(y, x) for y in ys for x in xs]
    if len(pos) > max_tiles:
        pick = np.linspace(0, len(pos) - 1, max_tiles).round().astype(int)
        pos = [pos[k] for k in pick]
    return np.stack([frame[y : y + t, x : x + t] for y, x in pos])


#: Lowest frequency of the profile [fraction of Nyquist] (the bins do not depend on the tile).
PS_LOW_FRACTION = 0.03


def bin_centres(n_bins: int = PS_BINS) -> np.ndarray:
    """Centres of the profile's radial bins [fraction of Nyquist]."""
    edges = np.linspace(PS_LOW_FRACTION, 1.0, n_bins + 1)
    return 0.5 * (edges[:-1] + edges[1:])


def _ring_index(t: int, n_bins: int) -> np.ndarray:
    """Bin index per rfft2 pixel of a (t, t) tile (-1 = outside the profile's range)."""
    fy = np.fft.fftfreq(t)[:, None]
    fx = np.fft.rfftfreq(t)[None, :]
    r = np.sqrt(fy * fy + fx * fx) / 0.5  # fraction of Nyquist
    edges = np.linspace(PS_LOW_FRACTION, 1.0, n_bins + 1)
    idx = np.minimum(np.digitize(r, edges) - 1, n_bins - 1)
    idx[(r < PS_LOW_FRACTION) | (r > 1.0)] = -1
    return idx


def power_spectra(
    frames, tile_px: int = PS_TILE_PX, n_bins: int = PS_BINS, max_tiles: int = PS_MAX_TILES
) -> np.ndarray:
    """Mean power per ring (N, n_bins) of frames (N, H, W) or (H, W) (bins:
    :func:`bin_centres`, fractions of Nyquist).

    Each tile (side ``min(tile_px, H, W)``, even) is standardised (mean 0, std 1), Hann
    windowed and Fourier transformed; the power is averaged over the ring and the tiles.  A
    constant tile has zero power; rings without a pixel (small tiles) are interpolated.
    """
    x = np.asarray(frames.compute() if hasattr(frames, "compute") else frames)
    x = x[None] if x.ndim == 2 else x
    t = int(min(tile_px, x.shape[1], x.shape[2])) // 2 * 2
    if t < 16:
        raise ValueError(f"frames of {x.shape[1]}x{x.shape[2]} px are too small for a spectrum")
    flat = _ring_index(t, n_bins).ravel()
    ok = flat >= 0
    counts = np.bincount(flat[ok], minlength=n_bins).astype(np.float64)
    has = counts > 0
    c = bin_centres(n_bins)
    win = np.outer(np.hanning(t), np.hanning(t)).astype(np.float32)
    out = np.zeros((x.shape[0], n_bins))
    for i in range(x.shape[0]):
        tl = _tiles(x[i], t, max_tiles).astype(np.float32)  # only the tiles are copied
        tl = tl - tl.mean(axis=(1, 2), keepdims=True)
        sd = tl.std(axis=(1, 2), keepdims=True)
        tl = np.where(sd > 0, tl / np.maximum(sd, 1e-30), 0.0) * win
        p = (np.abs(np.fft.rfft2(tl)) ** 2).mean(axis=0).ravel()
        row = np.bincount(flat[ok], weights=p[ok], minlength=n_bins) / np.maximum(counts, 1)
        if not has.all():
            row = np.interp(c, c[has], row[has])
        out[i] = row
    return out


def power_spectrum_profiles(
    frames, tile_px: int = PS_TILE_PX, n_bins: int = PS_BINS, max_tiles: int = PS_MAX_TILES
) -> np.ndarray:
    """The radially averaged, normalised log power spectrum (N, n_bins) of frames.

    ``log`` of :func:`power_spectra` minus its mean over the bins: the spectrum's shape
    (a blank or constant frame: a flat profile of zeros).
    """
    ps = power_spectra(frames, tile_px, n_bins, max_tiles)
    lp = np.log(np.maximum(ps, 1e-12))
    return lp - lp.mean(axis=1, keepdims=True)


def spectral_contrast(profiles: np.ndarray) -> np.ndarray:
    """Mean log power in :data:`LOW_BAND` minus that in :data:`HIGH_BAND` [nats] (N,).

    About 0 for shot noise alone (a white spectrum); a frame with signal above the noise
    has more power at low frequencies.
    """
    p = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
    c = bin_centres(p.shape[1])
    low = (c >= LOW_BAND[0]) & (c <= LOW_BAND[1])
    high = (c >= HIGH_BAND[0]) & (c <= HIGH_BAND[1])
    return p[:, low].mean(axis=1) - p[:, high].mean(axis=1)


def high_frequency_deficit(
    profiles: np.ndarray, ref_mean: np.ndarray, ref_scale: np.ndarray
) -> np.ndarray:
    """How far below the training images the power above 0.6 Nyquist lies, in units of
    their spread (N,) (positive = less high-frequency power: a frame resampled up from a
    coarser true pixel size, or blurred)."""
    p = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
    c = bin_centres(p.shape[1])
    hi = c >= 0.6
    mid = (c >= 0.1) & (c < 0.6)
    # relative to the mid band, so that the profile's normalisation does not enter
    rel = p[:, hi].mean(axis=1) - p[:, mid].mean(axis=1)
    ref = float(ref_mean[hi].mean() - ref_mean[mid].mean())
    spread = float(np.sqrt(np.mean(ref_scale[hi] ** 2) + np.mean(ref_scale[mid] ** 2)))
    return (ref - rel) / max(spread, 1e-6)


def physics_components(
    frame: np.ndarray,
    sampling_A: float,
    domain: dict | None,
    *,
    crop_px: int = 1024,
    defocus_margin_nm: float = 10.0,
    min_overlap: float = 0.0,
    lattice_peak_fraction: float = 0.92,
    conditions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The CTF estimate of one frame (at the model's pixel size) against the imaging domain.

    The rings are fitted with the beam energy [eV] and Cs recorded with the frame
    (``conditions``: the reader's metadata keys ``energy_eV`` and ``Cs_A`` [Å]) where known,
    else with the model's training values; ``ctf_conditions`` says which.

    Returns a dict with ``estimated_defocus_nm`` (signed when the sign is determined, else the
    magnitude; None without Thon rings), ``defocus_sign_determined``, ``ctf_fit_quality``,
    ``ctf_overlap`` (None without an estimate), ``amorphous``, ``periodic``, ``blank``,
    ``defocus_excess_nm`` (how far the estimate lies outside the training range plus
    ``defocus_margin_nm``; 0 inside), ``peak_power_fraction`` (the estimator's fraction of the
    spectrum's excess power in sharp peaks) and ``physics_reasons`` (short strings).
    """
    from ..ctf import estimate_ctf

    dom = domain or {}
    energy, cs, source = frame_conditions(dom, conditions)
    h, w = np.shape(frame)
    c = min(crop_px, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    x = np.asarray(frame[y0 : y0 + c, x0 : x0 + c], dtype=np.float32)  # the crop only
    tile = max(32, min(512, c) // 2 * 2)
    out: dict[str, Any] = {
        "estimated_defocus_nm": None,
        "defocus_sign_determined": False,
        "ctf_fit_quality": None,
        "ctf_overlap": None,
        "amorphous": None,
        "periodic": None,
        "blank": None,
        "defocus_excess_nm": 0.0,
        "ctf_conditions": source,
        "physics_reasons": [],
    }
    if c < 64:
        out["physics_note"] = f"no CTF estimate: a {h}x{w} px frame is too small for rings"
        return out
    try:
        est = estimate_ctf(x, float(sampling_A), energy_eV=energy, Cs_mm=cs, tile_px=tile)
    except ValueError as exc:  # too small a frame for rings: no physics, said so
        out["physics_note"] = f"no CTF estimate: {exc}"
        return out
    peak = float(getattr(est, "peak_power_fraction", 1.0 if est.periodic else 0.0))
    # "lattice everywhere": the estimator's periodic flag on the whole crop is common near
    # focus on Au particles (their fringes dominate a weak carbon signal), so it must hold in
    # every quarter of the crop too (a particle fills one; a crystal all)
    # a flat spectrum with sharp peaks is a crystal without support, not a blank frame
    blank = bool(est.blank) and not bool(est.periodic)
    everywhere = bool(est.periodic) and not bool(est.amorphous)
    if everywhere and c >= 128:
        everywhere = _periodic_in_every_quarter(x, float(sampling_A), energy_eV=energy, Cs_mm=cs)
    out.update(
        defocus_sign_determined=bool(est.sign_determined),
        ctf_fit_quality=float(est.fit_quality),
        amorphous=bool(est.amorphous),
        periodic=everywhere or (bool(est.periodic) and peak >= lattice_peak_fraction),
        peak_power_fraction=peak,
        blank=blank,
    )
    _against_domain(out, est, dom, float(sampling_A), defocus_margin_nm, min_overlap)
    reasons: list[str] = out["physics_reasons"]
    if blank:
        reasons.append("blank frame: no signal above shot noise")
    elif out["periodic"] and not est.amorphous:
        reasons.append(
            f"no amorphous support: lattice fringes everywhere ({100 * peak:.0f} % of the "
            "spectrum's excess power in sharp peaks)"
        )
    return out


def _real(v: Any) -> bool:
    """A finite real number (numpy scalars too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def frame_conditions(
    domain: Mapping[str, Any], recorded: Mapping[str, Any] | None
) -> tuple[float, float, str]:
    """Beam energy [eV] and Cs [mm] to fit a frame's Thon rings with, and where they came from.

    A value recorded with the frame (``energy_eV`` [eV] > 0; ``Cs_A`` [Å] of either sign,
    0 for a corrected microscope; finite real numbers, numpy scalars included) wins over the
    model's training value (``domain``'s ``energy_eV``, ``Cs_mm``; else 300 kV and 5 µm).
    """
    energy = float(domain.get("energy_eV") or 300e3)
    cs = float(domain.get("Cs_mm") if domain.get("Cs_mm") is not None else 0.005)
    md = recorded or {}
    parts = []
    e, c = md.get("energy_eV"), md.get("Cs_A")
    if _real(e) and e > 0:
        energy = float(e)
        parts.append("energy recorded with the frame")
    else:
        parts.append("energy: the model's training value")
    if _real(c):
        cs = float(c) / 1e7
        parts.append("Cs recorded with the frame")
    else:
        parts.append("Cs: the model's training value")
    return energy, cs, "; ".join(parts)


def _periodic_in_every_quarter(x: np.ndarray, sampling_A: float, **kw) -> bool:
    """The CTF estimator finds each quarter of the crop periodic (a crystal fills them all;
    a particle only one)."""
    from ..ctf import estimate_ctf

    hq = x.shape[0] // 2
    for y in (0, hq):
        for xq in (0, hq):
            try:
                sub = estimate_ctf(
                    x[y : y + hq, xq : xq + hq], sampling_A, tile_px=max(32, hq // 2 * 2), **kw
                )
            except ValueError:
                return False
            if not sub.periodic:
                return False
    return True


def _against_domain(out: dict, est, dom: dict, sampling_A: float, margin_nm, min_overlap):
    """The estimate against the training defoci: overlap, defocus excess [nm], reasons."""
    from ..ctf import ctf_overlap

    energy = float(dom.get("energy_eV") or 300e3)
    cs = float(dom.get("Cs_mm") if dom.get("Cs_mm") is not None else 0.005)
    fs = float(dom.get("focal_spread_A") if dom.get("focal_spread_A") is not None else 10.0)
    defocus_margin_nm = margin_nm
    reasons: list[str] = out["physics_reasons"]
    rng = dom.get("defocus_nm_range")
    train = [float(v) for v in dom.get("defocus_nm") or []] or (list(rng) if rng else [])
    if est.defocus_nm is not None:
        d = float(est.defocus_nm) if est.sign_determined else float(est.defocus_abs_nm)
        out["estimated_defocus_nm"] = d
        if train:
            cands = [d] if est.sign_determined else [d, -d]
            out["ctf_overlap"] = max(
                ctf_overlap(
                    v,
                    train,
                    energy_eV=energy,
                    Cs_mm=cs,
                    sampling_A=sampling_A,
                    focal_spread_A=fs,
                )
                for v in cands
            )
        if rng:
            lo, hi = float(rng[0]), float(rng[1])
            if est.sign_determined:
                excess = max(lo - defocus_margin_nm - d, d - hi - defocus_margin_nm, 0.0)
                txt = f"estimated defocus {d:+.0f} nm"
            else:
                excess = max(abs(d) - max(abs(lo), abs(hi)) - defocus_margin_nm, 0.0)
                txt = f"estimated defocus ±{abs(d):.0f} nm (sign not determined)"
            out["defocus_excess_nm"] = float(excess)
            if excess > 0:
                reasons.append(f"{txt}, trained on {lo:+.0f}…{hi:+.0f} nm")
        ov = out["ctf_overlap"]
        if ov is not None and ov < min_overlap:
            reasons.append(f"CTF overlap with the training defoci {ov:.2f}")


def mean_std(frame: np.ndarray, rows: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of a frame, accumulated in float64 a block of rows at a
    time (no full-size float64 temporary)."""
    x = np.asarray(frame)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    total = sum(float(x[r : r + rows].sum(dtype=np.float64)) for r in range(0, x.shape[0], rows))
    mean = total / n
    ss = 0.0
    for r in range(0, x.shape[0], rows):
        d = x[r : r + rows].astype(np.float64) - mean
        ss += float(np.einsum("ij,ij->", d, d))
    return mean, math.sqrt(ss / n)


def finite_or_none(v: Any) -> float | None:
    """A float for JSON rows: None for None/NaN/inf (and anything ``float`` refuses)."""
    try:
        f = float(v)
    except (TypeError, ValueError):  # None raises TypeError
        return None
    return f if math.isfinite(f) else None
