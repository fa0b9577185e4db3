"""CTF theory: the electron wavelength, the aberration phase, the transfer function, and the
information-transfer overlap of two imaging conditions.

Units: spatial frequency ``q`` [1/Å] (no 2π), defocus [nm] (abTEM sign, positive =
underfocus), Cs [mm], energy [eV], focal spread [Å].  numpy only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .estimate import CTFEstimate

#: Training values of the shipped model (``simulate.config`` laptop/study presets): 300 kV,
#: Cs 5 µm, focal spread 10 Å.  Used when a frame's metadata has no voltage or Cs.
DEFAULT_ENERGY_EV: float = 300e3
DEFAULT_CS_MM: float = 5e-3
DEFAULT_FOCAL_SPREAD_A: float = 10.0
#: Per-image defocus jitter of the training sets [nm] (``SimulationConfig.defocus_jitter_nm``).
DEFAULT_TRAINING_JITTER_NM: float = 1.5


@functools.lru_cache(maxsize=64)
def _wavelength_A(energy_eV: float) -> float:
    from ...simulate.config import wavelength_A as _wl

    return float(_wl(energy_eV))


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength [Å] at kinetic energy ``energy_eV`` [eV]."""
    return _wavelength_A(float(energy_eV))


def chi_rad(q_per_A, defocus_nm: float, *, energy_eV: float, Cs_mm: float) -> np.ndarray:
    """abTEM aberration phase ``chi(q)`` [rad] at spatial frequencies ``q_per_A`` [1/Å].

    ``chi = -π λ Δf q² + (π/2) Cs λ³ q⁴`` with ``Δf = defocus_nm`` (abTEM sign, positive =
    underfocus) in Å and ``Cs = Cs_mm`` in Å.
    """
    q = np.asarray(q_per_A, dtype=np.float64)
    lam = wavelength_A(energy_eV)
    df_A = float(defocus_nm) * 10.0
    cs_A = float(Cs_mm) * 1e7
    q2 = q * q
    return -math.pi * lam * df_A * q2 + 0.5 * math.pi * cs_A * lam**3 * q2 * q2


def ctf_curve(
    q_per_A,
    defocus_nm: float,
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    focal_spread_A: float = 0.0,
    amplitude_contrast: float = 0.0,
) -> np.ndarray:
    """Phase-contrast transfer function ``T(q)`` (dimensionless) of a weak object.

    ``T(q) = E_t(q) · [sqrt(1 - A²) sin chi(q) + A cos chi(q)]`` with the abTEM phase
    :func:`chi_rad`, amplitude contrast fraction ``A = amplitude_contrast`` (0..1) and the
    temporal-coherence envelope ``E_t(q) = exp(-(π λ Δ q²)² / 4)`` of the focal spread
    ``Δ = focal_spread_A`` [Å] (abTEM's definition).  ``q_per_A`` in [1/Å].  The power
    spectrum of an amorphous film is ∝ ``T(q)²`` times the specimen's (smooth) spectrum.
    """
    if not 0.0 <= amplitude_contrast <= 1.0:
        raise ValueError(
            f"amplitude_contrast must lie in [0, 1] (got {amplitude_contrast}); "
            "typical values are 0 (pure phase) to 0.1"
        )
    q = np.asarray(q_per_A, dtype=np.float64)
    chi = chi_rad(q, defocus_nm, energy_eV=energy_eV, Cs_mm=Cs_mm)
    a = float(amplitude_contrast)
    t = math.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)
    if focal_spread_A > 0:
        lam = wavelength_A(energy_eV)
        t = t * np.exp(-0.25 * (math.pi * lam * float(focal_spread_A) * q * q) ** 2)
    return t


def power_transfer(
    q_per_A,
    defocus_nm: float,
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    jitter_nm: float = 0.0,
) -> np.ndarray:
    """Power transfer ``⟨T(q)²⟩`` (dimensionless, 0..1) of a condition at ``q_per_A`` [1/Å].

    ``T`` is :func:`ctf_curve` with the focal-spread envelope; ``⟨·⟩`` averages over a
    Gaussian spread of defocus of standard deviation ``jitter_nm`` [nm] around
    ``defocus_nm`` (a training set's per-image defocus jitter; 0 = one defocus), by 25-point
    quadrature over ±3 standard deviations.
    """
    q = np.asarray(q_per_A, dtype=np.float64)
    kw = dict(energy_eV=energy_eV, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    if jitter_nm <= 0:
        return ctf_curve(q, float(defocus_nm), **kw) ** 2
    x = np.linspace(-3.0, 3.0, 25)
    g = np.exp(-0.5 * x * x)
    g /= g.sum()
    out = np.zeros_like(q)
    for xi, gi in zip(x, g, strict=True):
        out += gi * ctf_curve(q, float(defocus_nm) + float(jitter_nm) * xi, **kw) ** 2
    return out


def ctf_overlap(
    defocus_nm: float,
    training_defocus_nm: Sequence[float],
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    sampling_A: float,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    training_jitter_nm: float = DEFAULT_TRAINING_JITTER_NM,
    q_min_per_A: float = 0.02,
    q_max_per_A: float | None = None,
) -> float:
    """Information-transfer overlap [0..1] of a frame's CTF with the model's training CTFs.

    Which spatial frequencies a condition transfers, and how strongly, is its power transfer
    ``P(q) = ⟨T(q)²⟩`` (:func:`power_transfer`; for a training condition averaged over the
    training set's defocus jitter ``training_jitter_nm`` [nm]).  The overlap of the frame
    (defocus ``defocus_nm`` [nm]) with training condition k is the Pearson correlation of
    ``P_frame`` and ``P_k`` over ``q_min_per_A <= q <= q_max_per_A`` [1/Å] (uniform in q;
    default q_max = the Nyquist frequency ``1/(2 sampling_A)``):

        ρ_k = Σ_q p_f p_k / sqrt(Σ_q p_f² · Σ_q p_k²),   p = P - mean_q(P)

    and the result is ``max(0, max_k ρ_k)``: 1 = the frame passes the same bands of
    information as a training condition, 0 = no resemblance (or anti-correlated bands).
    Dimensionless.  ``P`` ignores the sign of T, so ``±defocus`` give nearly the same
    overlap when Cs is small (exactly the same for Cs = 0): the overlap is usable when the
    sign of an estimate is undetermined.  Units: defocus [nm] (abTEM sign), energy [eV],
    Cs [mm], sampling and focal spread [Å].  ``docs/ctf.md`` shows how it ranks the
    study's out-of-distribution losses.
    """
    train = np.atleast_1d(np.asarray(training_defocus_nm, dtype=np.float64))
    if train.size == 0:
        raise ValueError("training_defocus_nm is empty; give the model's training defoci in nm")
    if not np.all(np.isfinite(train)) or not math.isfinite(float(defocus_nm)):
        raise ValueError("defocus values must be finite numbers in nm")
    if not (math.isfinite(sampling_A) and sampling_A > 0):
        raise ValueError(f"sampling_A must be a positive pixel size in Å/px (got {sampling_A})")
    qmax = 0.5 / sampling_A if q_max_per_A is None else float(q_max_per_A)
    if not 0 <= q_min_per_A < qmax:
        raise ValueError(f"need 0 <= q_min_per_A < q_max_per_A [1/Å] (got {q_min_per_A}, {qmax})")
    q = np.linspace(q_min_per_A, qmax, 2048)
    kw = dict(energy_eV=energy_eV, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    pf = power_transfer(q, float(defocus_nm), **kw)
    pf = pf - pf.mean()
    nf = float(pf @ pf)
    best = 0.0
    for d in train:
        pk = power_transfer(q, float(d), jitter_nm=training_jitter_nm, **kw)
        pk = pk - pk.mean()
        nk = float(pk @ pk)
        if nf <= 0 or nk <= 0:
            continue
        best = max(best, float(pf @ pk) / math.sqrt(nf * nk))
    return float(min(max(best, 0.0), 1.0))


def ctf_overlap_for_estimate(
    estimate: CTFEstimate,
    training_defocus_nm: Sequence[float],
    *,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    training_jitter_nm: float = DEFAULT_TRAINING_JITTER_NM,
    q_min_per_A: float = 0.02,
    q_max_per_A: float | None = None,
) -> float | None:
    """:func:`ctf_overlap` [0..1] of an estimate, with its energy, Cs and pixel size.

    None when the frame has no Thon rings (``estimate.amorphous`` False).  When the sign is
    undetermined the lower of the overlaps of ``+|defocus|`` and ``-|defocus|`` is returned
    (the conservative choice for an out-of-distribution verdict).
    """
    if not estimate.amorphous or estimate.defocus_abs_nm is None:
        return None
    kw = dict(
        energy_eV=estimate.energy_eV,
        Cs_mm=estimate.Cs_mm,
        sampling_A=estimate.sampling_A,
        focal_spread_A=focal_spread_A,
        training_jitter_nm=training_jitter_nm,
        q_min_per_A=q_min_per_A,
        q_max_per_A=q_max_per_A,
    )
    if estimate.sign_determined and estimate.defocus_nm is not None:
        return ctf_overlap(estimate.defocus_nm, training_defocus_nm, **kw)
    a = estimate.defocus_abs_nm
    return min(
        ctf_overlap(a, training_defocus_nm, **kw), ctf_overlap(-a, training_defocus_nm, **kw)
    )
