"""Per-frame CTF (defocus) estimation from Thon rings, and a CTF information-transfer overlap.

Everything here is numpy/scipy; no torch, abTEM or hyperspy is imported.

Conventions and units
---------------------
* Defocus follows abTEM: ``defocus = -C10``; positive defocus is underfocus.  Public
  arguments are in [nm] (``*_nm``), internal lengths in [Å].
* Spatial frequency ``q`` in [1/Å] (no 2π): the Nyquist frequency of a pixel size
  ``sampling_A`` is ``1 / (2 sampling_A)``.
* Aberration phase (abTEM) ``chi(q) = 2π/λ (C10 λ² q²/2 + C30 λ⁴ q⁴/4)``
  ``= -π λ Δf q² + (π/2) Cs λ³ q⁴`` [rad] with ``Δf`` the defocus and ``Cs = C30``.
* Phase-contrast transfer ``T(q) = -E_t(q) [sin chi(q) + ... ]``; see :func:`ctf_curve`.

See ``docs/ctf.md`` for the method, the formulas and the measured accuracy.  The package has
one job per module: :mod:`.theory` (wavelength, phase, transfer, overlap), :mod:`.spectrum`
(periodogram, profiles, lattice peaks), :mod:`.estimate` (the defocus fit and its verdicts).
"""

from __future__ import annotations

from .estimate import (
    BLANK_F_THRESHOLD,
    DYNAMIC_RANGE,
    MAX_TILES,
    MIN_ZEROS,
    PERIODIC_F_FACTOR,
    PERIODIC_POWER_FRACTION,
    RING_F_THRESHOLD,
    SIGN_LR_THRESHOLD,
    SIGN_MIN_CS_PHASE_RAD,
    CTFEstimate,
    estimate_ctf,
    estimate_ctf_with_metadata,
)
from .spectrum import (
    PEAK_RATIO,
    PEAK_WING_RATIO,
    periodic_component,
    power_spectrum,
    radial_profile,
)
from .theory import (
    DEFAULT_CS_MM,
    DEFAULT_ENERGY_EV,
    DEFAULT_FOCAL_SPREAD_A,
    DEFAULT_TRAINING_JITTER_NM,
    chi_rad,
    ctf_curve,
    ctf_overlap,
    ctf_overlap_for_estimate,
    power_transfer,
    wavelength_A,
)

__all__ = [
    "BLANK_F_THRESHOLD",
    "DEFAULT_CS_MM",
    "DEFAULT_ENERGY_EV",
    "DEFAULT_FOCAL_SPREAD_A",
    "DEFAULT_TRAINING_JITTER_NM",
    "DYNAMIC_RANGE",
    "MAX_TILES",
    "MIN_ZEROS",
    "PEAK_RATIO",
    "PEAK_WING_RATIO",
    "PERIODIC_F_FACTOR",
    "PERIODIC_POWER_FRACTION",
    "RING_F_THRESHOLD",
    "SIGN_LR_THRESHOLD",
    "SIGN_MIN_CS_PHASE_RAD",
    "CTFEstimate",
    "chi_rad",
    "ctf_curve",
    "ctf_overlap",
    "ctf_overlap_for_estimate",
    "estimate_ctf",
    "estimate_ctf_with_metadata",
    "periodic_component",
    "power_spectrum",
    "power_transfer",
    "radial_profile",
    "wavelength_A",
]
