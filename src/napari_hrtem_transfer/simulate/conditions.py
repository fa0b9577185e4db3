"""Imaging conditions drawn per image, and the images they give from one stored exit wave.

Each image (one defocus of one structure) draws its own dose, Cs, focal spread, drift,
illumination and detector MTF width from the config's ranges, from the structure's own
random stream (seeded, so a run repeats exactly); the draws are returned and recorded in the
dataset (``info["per_image"]``, arrays (n_defocus, n_images) like ``actual_defocus_nm``).

Order of the image formation per image: CTF of the image's Cs and focal spread (frozen phonons
averaged incoherently), drift blur of the intensity, the illumination field (multiplicative),
then the detector (:func:`.detector.detect`).
"""

from __future__ import annotations

import numpy as np

#: Per-image quantities and their units, as recorded in ``info["per_image"]``.
PER_IMAGE_FIELDS: dict[str, str] = {
    "dose_e_per_A2": "e/Å²",
    "Cs_A": "Å",
    "focal_spread_A": "Å",
    "drift_length_A": "Å",
    "drift_angle_deg": "degrees from +x towards +y",
    "illumination_amplitude": "fraction of the mean",
    "detector_mtf_width_nyquist": "Nyquist frequency",
}


def imaging_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The streams of structure ``index``'s per-image draws: (scalars, illumination fields).

    The fourth child of ``SeedSequence(seed, spawn_key=(index,))`` (the first three drive the
    structure, the noise and the phonons, unchanged by these draws).
    """
    s_imaging = np.random.SeedSequence(seed, spawn_key=(index,)).spawn(4)[3]
    a, b = s_imaging.spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def _uniform(u: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


def draw_conditions(config, n_images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each image's imaging conditions (arrays of ``n_images``), see :data:`PER_IMAGE_FIELDS`.

    Seven uniforms are drawn per image in a fixed order whether or not a range is set, so
    switching one range on does not change the others' draws.  Dose is log-uniform in
    ``dose_range_e_per_A2`` (None: ``dose_e_per_A2``, which may be None = noise-free).
    """
    u = rng.random((n_images, 7))
    out: dict[str, np.ndarray] = {}
    if config.dose_range_e_per_A2 is not None and config.dose_e_per_A2 is not None:
        lo, hi = np.log(config.dose_range_e_per_A2)
        out["dose_e_per_A2"] = np.exp(lo + u[:, 0] * (hi - lo))
    else:
        dose = np.nan if config.dose_e_per_A2 is None else config.dose_e_per_A2
        out["dose_e_per_A2"] = np.full(n_images, dose)
    cs = config.Cs_range_A or (config.Cs_A, config.Cs_A)
    fs = config.focal_spread_range_A or (config.focal_spread_A, config.focal_spread_A)
    out["Cs_A"] = _uniform(u[:, 1], cs)
    out["focal_spread_A"] = _uniform(u[:, 2], fs)
    out["drift_length_A"] = _uniform(u[:, 3], config.drift_length_A)
    out["drift_angle_deg"] = u[:, 4] * 180.0
    out["illumination_amplitude"] = _uniform(u[:, 5], config.illumination_amplitude)
    out["detector_mtf_width_nyquist"] = _uniform(u[:, 6], config.detector_mtf_width_nyquist)
    return out


def form_images(
    waves,
    config,
    defocus_A: np.ndarray,
    conditions: dict[str, np.ndarray],
    rng_noise: np.random.Generator,
    rng_field: np.random.Generator,
) -> np.ndarray:
    """Recorded images (n_defocus, ny, nx) of one exit wave under per-image ``conditions``.

    ``defocus_A`` [Å] relative to the exit plane (abTEM sign).  With neither Cs nor focal
    spread varying, one CTF call serves every defocus (as without per-image conditions).
    """
    from .detector import detect, drift_transfer, illumination_field
    from .physics import defocus_series

    defocus_A = np.atleast_1d(np.asarray(defocus_A, dtype=float))
    if config.Cs_range_A is None and config.focal_spread_range_A is None:
        intensity = defocus_series(waves, config, defocus_A)
    else:
        intensity = np.concatenate(
            [
                defocus_series(
                    waves, config, defocus_A[j : j + 1],
                    Cs_A=conditions["Cs_A"][j],
                    focal_spread_A=conditions["focal_spread_A"][j],
                )
                for j in range(defocus_A.size)
            ]
        )
    n, s = config.image_size_px, config.sampling_A
    images = []
    for j, im in enumerate(intensity):
        im = im.astype(np.float64)
        length = conditions["drift_length_A"][j]
        if length > 0:
            angle = np.deg2rad(conditions["drift_angle_deg"][j])
            im = np.fft.ifft2(np.fft.fft2(im) * drift_transfer(n, s, length, angle)).real
        amp = conditions["illumination_amplitude"][j]
        if config.illumination_amplitude[1] > 0:
            # drawn for every image (even at amplitude 0) so the stream stays aligned
            period = config.illumination_period_nm
            im = im * illumination_field(
                n,
                amp,
                config.illumination_cutoff_cycles,
                rng_field,
                None if period is None else 10.0 * period / s,
            )
        dose = conditions["dose_e_per_A2"][j]
        images.append(
            detect(
                im,
                None if np.isnan(dose) else float(dose),
                s,
                rng_noise,
                kind=config.detector,
                mtf_nu0=conditions["detector_mtf_width_nyquist"][j],
                mtf_floor=config.detector_mtf_floor,
                dqe0=config.detector_dqe0,
            )
        )
    dtype = np.result_type(*[im.dtype for im in images])
    return np.stack(images).astype(dtype)
