"""What happens after the objective lens: drift blur, uneven illumination and the detector.

Everything here works on the noise-free image intensity (vacuum = 1) at the output pixel
size, so it is cheap per image (a few FFTs of one image).  Lengths [Å], spatial frequencies
in cycles/Å, dose [e/Å²].  Filters are applied in Fourier space on the periodic image (the
exit wave is periodic too).

Formulas
--------
Drift (linear motion during the exposure, length ``L`` [Å] along the unit vector ``u``):
the image is convolved with a uniform line kernel, whose transfer function is
``D(q) = sinc(L q·u)`` (``sinc(x) = sin(pi x) / (pi x)``): zeros at ``q·u = m / L``, no effect
across the drift (``q·u = 0``).

Uneven illumination: a multiplicative field ``F(r) = 1 + a g(r) / max|g|`` where ``g`` is a
random sum of the Fourier modes of the field of view with ``0 < |k| <= K`` cycles per field of
view (no DC term), so that the field is smooth (no power above ``K`` cycles per field), has
mean exactly 1 and lies within ``[1 - a, 1 + a]``.

Scintillator detector (CCD/CMOS behind a scintillator and fibre optics): the parametric MTF
(a Lorentzian plus a constant, times the pixel aperture)::

    MTF(nu) = [(1 - c) / (1 + (nu / nu0)**2) + c] * sinc(nu / 2),    nu = q / q_Nyquist

in the spirit of the fits of A. Thust, "High-resolution transmission electron microscopy on an
absolute contrast scale", Ultramicroscopy 109 (2009) 1125, and W. Van den Broek et al.,
"Fully automated measurement of the modulation transfer function of charge-coupled devices
above the Nyquist frequency", Microsc. Microanal. 18 (2012) 336, whose form is
``(a - b) / (1 + (q / 2c)**2) + b`` (here normalised to MTF(0) = 1).  Electrons are counted
with a zero-frequency DQE ``DQE0``: the number of detected quanta is Poisson with mean
``N DQE0`` (``N = I dose sampling_A²``), rescaled by ``1 / DQE0`` (mean ``N``, variance
``N / DQE0``); each detected electron is then spread by the point-spread function, so signal
and noise are both filtered by the MTF and the noise power spectrum is
``NPS(q) = N / DQE0 MTF(q)²`` (DQE(q) = DQE0 at every q for this model).

Direct-electron counting detector: each electron is counted once, in the pixel it lands in.
The signal is integrated over the square pixel (MTF = ``sinc(qx a) sinc(qy a)``, ``a`` the pixel
size: 2/pi at Nyquist, G. McMullan et al., "Detective quantum efficiency of electron area
detectors in electron microscopy", Ultramicroscopy 109 (2009) 1126), then counted with
Poisson statistics, so the noise is white: ``NPS = N``, ``DQE(q) = MTF(q)²``.
"""

from __future__ import annotations

import numpy as np


def frequencies(n: int, sampling_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies ``(qy, qx)`` [cycles/Å] of an ``n`` x ``n`` image, broadcastable."""
    q = np.fft.fftfreq(n, sampling_A)
    return q[:, None], q[None, :]


def _filter(image: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    """``image`` (ny, nx) filtered by the real, even transfer function ``transfer``."""
    out = np.fft.ifft2(np.fft.fft2(image.astype(np.float64)) * transfer).real
    return out


def drift_transfer(n: int, sampling_A: float, length_A: float, angle_rad: float) -> np.ndarray:
    """Transfer function of a linear drift of ``length_A`` [Å] at ``angle_rad`` from +x.

    ``sinc(length_A q·u)`` with ``u = (cos angle, sin angle)`` in (x, y); 1 for no drift.
    """
    qy, qx = frequencies(n, sampling_A)
    return np.sinc(length_A * (qx * np.cos(angle_rad) + qy * np.sin(angle_rad)))


def illumination_field(
    n: int,
    amplitude: float,
    cutoff_cycles: float,
    rng: np.random.Generator,
    period_px: float | None = None,
) -> np.ndarray:
    """A smooth multiplicative illumination field (n, n) within ``1 ± amplitude``.

    ``period_px`` None: random complex Gaussian coefficients on the Fourier modes with
    ``0 < |k| <= cutoff_cycles`` cycles per field of view (Hermitian, so the field is real),
    none above the cutoff; mean 1 over the frame.

    ``period_px`` [px]: the field's shortest period in pixels, whatever the frame's size.
    The frame is a window, at a random place, of a periodic field of side
    ``max(n, 2 * period_px)`` whose modes reach that period; the field is scaled to
    ``1 ± amplitude`` over its whole side.  So a frame much smaller than the period (a
    simulated 5-10 nm frame under a beam whose brightness varies over ~100 nm, like a tile
    of a large real frame) sees an offset and a gentle gradient, not a variation on the
    particles' scale.  The window's own mean is then near 1, not exactly 1.
    """
    if period_px is None:
        k = np.fft.fftfreq(n, 1.0 / n)  # cycles per field of view
        kr = np.hypot(k[:, None], k[None, :])
        keep = (kr > 0) & (kr <= cutoff_cycles)
        coeffs = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) * keep
        g = np.fft.ifft2(coeffs).real  # the real part is the Hermitian-symmetric half
        peak = np.abs(g).max()
        if amplitude <= 0 or peak == 0:
            return np.ones((n, n))
        g -= g.mean()  # exactly zero mean (rounding)
        return 1.0 + amplitude * g / np.abs(g).max()
    side = max(float(n), 2.0 * float(period_px))
    c = int(np.floor(side / float(period_px) + 1e-9))
    ky, kx = np.mgrid[-c : c + 1, -c : c + 1]
    keep = (np.hypot(ky, kx) > 0) & (np.hypot(ky, kx) <= side / float(period_px) + 1e-9)
    ky, kx = ky[keep], kx[keep]
    coeffs = rng.standard_normal(ky.size) + 1j * rng.standard_normal(ky.size)
    origin = rng.uniform(0.0, side, size=2)

    def evaluate(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        ey = np.exp(2j * np.pi * np.outer(y, ky) / side)  # (ny, modes)
        ex = np.exp(2j * np.pi * np.outer(x, kx) / side)  # (nx, modes)
        return ((ey * coeffs) @ ex.T).real

    if amplitude <= 0 or ky.size == 0:
        return np.ones((n, n))
    grid = np.arange(0.0, side, side / max(64, 16 * c))
    peak = np.abs(evaluate(grid, grid)).max()  # the whole periodic field (zero mean)
    px = np.arange(n, dtype=np.float64)
    g = evaluate(origin[0] + px, origin[1] + px) / peak
    return 1.0 + amplitude * np.clip(g, -1.0, 1.0)


def mtf_scintillator(n: int, sampling_A: float, nu0: float, floor: float) -> np.ndarray:
    """The scintillator MTF on an ``n`` x ``n`` grid (see the module docstring).

    ``nu0``: Lorentzian half width in units of the Nyquist frequency; ``floor``: the constant
    ``c`` the Lorentzian decays to.  ``nu`` is the radial frequency in Nyquist units.
    """
    qy, qx = frequencies(n, sampling_A)
    nu = np.hypot(qx, qy) * 2 * sampling_A
    return ((1 - floor) / (1 + (nu / nu0) ** 2) + floor) * np.sinc(nu / 2)


def mtf_counting(n: int, sampling_A: float) -> np.ndarray:
    """Pixel-aperture MTF of a counting detector: ``sinc(qx a) sinc(qy a)``, ``a = sampling_A``."""
    qy, qx = frequencies(n, sampling_A)
    return np.sinc(qx * sampling_A) * np.sinc(qy * sampling_A)


def detect(
    intensity: np.ndarray,
    dose_e_per_A2: float | None,
    sampling_A: float,
    rng: np.random.Generator,
    kind: str = "none",
    mtf_nu0: float = 0.3,
    mtf_floor: float = 0.1,
    dqe0: float = 1.0,
) -> np.ndarray:
    """Recorded image of one noise-free ``intensity`` (ny, nx), vacuum = 1.

    ``kind``: ``"none"`` (ideal Poisson counts, integer), ``"counting"`` (pixel-aperture MTF
    on the signal, then Poisson counts, integer), ``"scintillator"`` (Poisson counts at
    ``dose x dqe0`` rescaled by ``1/dqe0``, then the MTF; float32 electrons per pixel).
    With ``dose_e_per_A2`` None the MTF alone is applied to the intensity (float32).
    """
    n = intensity.shape[-1]
    if kind == "counting":
        intensity = np.clip(_filter(intensity, mtf_counting(n, sampling_A)), 0, None)
    if dose_e_per_A2 is None:
        if kind == "scintillator":
            intensity = _filter(intensity, mtf_scintillator(n, sampling_A, mtf_nu0, mtf_floor))
        return np.asarray(intensity, dtype=np.float32)
    lam = np.clip(intensity, 0, None).astype(np.float64) * (dose_e_per_A2 * sampling_A**2)
    if kind != "scintillator":
        counts = rng.poisson(lam)
        dtype = np.uint16 if counts.max(initial=0) < 2**16 else np.uint32
        return counts.astype(dtype)
    quanta = rng.poisson(lam * dqe0) / dqe0
    mtf = mtf_scintillator(n, sampling_A, mtf_nu0, mtf_floor)
    return _filter(quanta, mtf).astype(np.float32)
