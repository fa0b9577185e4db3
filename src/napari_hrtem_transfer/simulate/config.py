"""The one validated configuration object of the simulator.

Units: lengths in Å unless the field name says otherwise (``*_nm``), energy in eV, dose in
e/Å², angles in mrad.  Defocus follows abTEM: ``defocus = -C10``; positive is underfocus.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Lattices available for particles (the study's structure series, plus Au).
MATERIALS: tuple[str, ...] = (
    "CdSe", "ZnS", "Au", "Cu", "Ag", "Pt", "Pd", "C", "Si", "Fe3O4", "Co3O4", "Fe"
)

#: Relativistic electron wavelength [Å] for an energy [eV].
def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength [Å] at kinetic energy ``energy_eV`` [eV]."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    E = energy_eV * e
    return h / math.sqrt(2 * m0 * E * (1 + E / (2 * m0 * c**2))) * 1e10


class SimulationConfig(BaseModel):
    """Everything that defines a simulated HRTEM defocus series.

    One multislice per structure (with frozen phonons) gives an exit wave; it is Fourier-cropped
    to ``sampling_A`` and every defocus of the series is applied to that stored wave as a CTF,
    so a whole series costs little more than one image.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    version: Literal["1"] = "1"
    preset: str = Field("laptop", description="Name of the preset these values started from.")
    material: str = Field("CdSe", description=f"Particle lattice, one of {', '.join(MATERIALS)}.")
    n_structures: int = Field(
        8, ge=1, le=1_000_000, description="Number of structures (images per defocus)."
    )
    image_size_px: int = Field(256, ge=32, le=4096, description="Image width and height [px].")
    sampling_A: float = Field(0.2, gt=0, le=5.0, description="Output pixel size [Å/px].")
    sim_sampling_A: float = Field(
        0.1, gt=0, le=5.0, description="Multislice sampling [Å] (finer than sampling_A)."
    )
    slice_thickness_A: float = Field(
        2.0, gt=0, le=20, description="Multislice slice thickness [Å]."
    )
    n_phonons: int = Field(
        2, ge=1, le=64, description="Frozen-phonon configurations averaged per image."
    )
    phonon_sigma_A: float = Field(0.08, ge=0, le=0.5, description="RMS thermal displacement [Å].")
    energy_eV: float = Field(300e3, ge=20e3, le=1.5e6, description="Acceleration voltage [eV].")
    Cs_A: float = Field(
        5e4, ge=-1e8, le=1e8, description="Spherical aberration C30 [Å] (5 µm = 5e4 Å)."
    )
    focal_spread_A: float = Field(
        10.0, ge=0, le=500, description="Focal spread (partial temporal coherence) [Å]."
    )
    defocus_nm: list[float] = Field(
        default_factory=lambda: [-10.0, -5.0, 0.0, 5.0, 10.0],
        description="Nominal defoci [nm]; abTEM sign, positive = underfocus.",
    )
    calibrate_zero_defocus: bool = Field(
        True,
        description=(
            "Measure zero defocus per structure as the minimum-contrast focus of the particles "
            "alone under the defocus propagator alone (no Cs, focal spread or aperture: the "
            "same zero for every microscope; the study's calibration); False = zero at the "
            "exit plane of the cell."
        ),
    )
    reference_cell: Literal["full", "particles"] = Field(
        "full",
        description=(
            "Cell of the particles-alone reference (mask and zero defocus): full (the "
            "specimen's cell, every slice) or particles (cut above the particles, the empty "
            "rest as one free-space propagation: the same result to rounding, much cheaper "
            "under a thick film)."
        ),
    )
    defocus_jitter_nm: float = Field(
        1.5, ge=0, le=50, description="Std of each image's defocus around nominal [nm]."
    )
    semiangle_cutoff_mrad: float | None = Field(
        None, gt=0, description="Objective aperture semi-angle [mrad]; None = no aperture."
    )
    dose_e_per_A2: float | None = Field(
        400.0, gt=0, description="Electron dose [e/Å²]; None = noise-free intensity."
    )
    particles_per_image: tuple[int, int] = Field(
        (1, 3), description="Min and max particles per image (0 0 = carbon film only)."
    )
    radius_nm: tuple[float, float] = Field(
        (0.8, 1.4), description="Min and max particle radius [nm]."
    )
    stacking_faults: tuple[int, int] = Field(
        (0, 0),
        description="Min and max stacking faults per particle (wurtzite and fcc lattices only).",
    )
    min_separation_nm: float = Field(
        1.0,
        ge=-100,
        le=100,
        description=(
            "Minimum surface-to-surface gap [nm]; 0 lets particles touch, a negative value "
            "lets them overlap by up to that much (the overlapping atoms of the later particle "
            "are removed; the mask is the union)."
        ),
    )
    substrate_thickness_nm: tuple[float, float] = Field(
        (2.0, 3.0), description="Min and max amorphous-carbon thickness [nm] (0 = no substrate)."
    )
    substrate_material: Literal["C", "Si3N4"] = Field(
        "C",
        description=(
            "Amorphous support film: C (density substrate_density_g_cm3, minimum distance "
            "substrate_min_distance_A) or Si3N4 (amorphous silicon nitride, 3.1 g/cm³, "
            "minimum distance 1.6 Å, Si:N = 3:4)."
        ),
    )
    substrate_density_g_cm3: float = Field(2.0, gt=0, le=4.0, description="Carbon density [g/cm³].")
    substrate_min_distance_A: float = Field(
        1.4, gt=0, le=3.0, description="Minimum C–C distance [Å]."
    )
    mask_phase_threshold_rad: float = Field(
        math.pi / 16, gt=0, description="Exit-wave phase threshold of masks [rad]."
    )
    mask_smoothing_A: float = Field(
        1.3, ge=0, le=10, description="Gaussian sigma smoothing the mask [Å]."
    )
    #: 0.1 puts the edge at the atoms' projected metallic/covalent radii (+0.08 ± 0.28 Å,
    #: benchmarks/bench_mask_edge.py; 0.02, the level before, put it 1.2 Å outside).
    mask_binarize_level: float = Field(
        0.1, gt=0, lt=1, description="Level at which the smoothed thresholded phase is binarised."
    )
    dose_range_e_per_A2: tuple[float, float] | None = Field(
        None,
        description=(
            "Per-image dose range [e/Å²]: MIN MAX, drawn log-uniformly for every image; "
            "None = every image at dose_e_per_A2."
        ),
    )
    Cs_range_A: tuple[float, float] | None = Field(
        None,
        description="Per-image spherical aberration range [Å]: MIN MAX, uniform; None = Cs_A.",
    )
    focal_spread_range_A: tuple[float, float] | None = Field(
        None,
        description="Per-image focal spread range [Å]: MIN MAX, uniform; None = focal_spread_A.",
    )
    drift_length_A: tuple[float, float] = Field(
        (0.0, 0.0),
        description=(
            "Per-image linear drift during the exposure [Å]: MIN MAX, uniform, in a uniformly "
            "random direction (0 0 = no drift blur)."
        ),
    )
    illumination_amplitude: tuple[float, float] = Field(
        (0.0, 0.0),
        description=(
            "Per-image uneven-illumination amplitude (fraction of the mean, below 1): MIN MAX; "
            "the field 1 + a g(r) is smooth, mean 1, within 1 ± a (0 0 = even illumination)."
        ),
    )
    illumination_cutoff_cycles: float = Field(
        2.0,
        gt=0,
        le=16,
        description=(
            "Highest spatial frequency of the illumination field [cycles per field of view] "
            "(used when illumination_period_nm is not set)."
        ),
    )
    illumination_period_nm: float | None = Field(
        None,
        gt=0,
        description=(
            "Shortest period of the illumination field [nm], whatever the frame's size: the "
            "frame is a window of a field that varies on this scale, so a frame smaller than "
            "it sees a gentle gradient (a beam's brightness varies over ~100 nm); None: "
            "illumination_cutoff_cycles per field of view."
        ),
    )
    detector: Literal["none", "counting", "scintillator"] = Field(
        "none",
        description=(
            "Detector model: none (ideal Poisson counts), counting (direct electron counting: "
            "pixel MTF sinc, white Poisson noise) or scintillator (Poisson at dose x "
            "detector_dqe0, then the parametric MTF on signal and noise)."
        ),
    )
    detector_mtf_width_nyquist: tuple[float, float] = Field(
        (0.3, 0.3),
        description=(
            "Scintillator MTF Lorentzian half width nu0 [units of the Nyquist frequency]: "
            "MIN MAX, uniform per image."
        ),
    )
    detector_mtf_floor: float = Field(
        0.1, ge=0, lt=1, description="Scintillator MTF constant c the Lorentzian decays to."
    )
    detector_dqe0: float = Field(
        0.6,
        gt=0,
        le=1,
        description=(
            "Scintillator DQE at zero frequency: pixel variance = dose x sampling_A² / "
            "detector_dqe0 [e²/px²]."
        ),
    )
    seed: int = Field(0, ge=0, description="Master seed; the same seed gives identical files.")

    @field_validator("material")
    @classmethod
    def _known_material(cls, v: str) -> str:
        for m in MATERIALS:
            if v.lower() == m.lower():
                return m
        raise ValueError(f"unknown material {v!r}; choose one of {', '.join(MATERIALS)}")

    @field_validator("defocus_nm")
    @classmethod
    def _nonempty(cls, v: list[float]) -> list[float]:
        if len(v) == 0:
            raise ValueError(
                "the defocus list is empty; give at least one defocus in nm in defocus_nm, "
                "e.g. -5 0 5"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"the defocus list {v} has repeated values")
        return [float(x) for x in v]

    @field_validator(
        "particles_per_image",
        "radius_nm",
        "substrate_thickness_nm",
        "stacking_faults",
        "drift_length_A",
        "illumination_amplitude",
        "detector_mtf_width_nyquist",
        mode="before",
    )
    @classmethod
    def _range(cls, v):
        if isinstance(v, (int, float)):
            v = (v, v)
        v = tuple(v)
        if len(v) == 1:
            v = (v[0], v[0])
        if len(v) != 2 or v[0] > v[1] or v[0] < 0:
            raise ValueError(f"give a range as 'min max' with 0 <= min <= max (got {v})")
        return v

    @field_validator("dose_range_e_per_A2", "Cs_range_A", "focal_spread_range_A", mode="before")
    @classmethod
    def _optional_range(cls, v):
        if v is None:
            return None
        if isinstance(v, (int, float)):
            v = (v, v)
        v = tuple(v)
        if len(v) == 1:
            v = (v[0], v[0])
        if len(v) != 2 or v[0] > v[1]:
            raise ValueError(f"give a range as 'min max' with min <= max (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SimulationConfig:
        self._check_imaging_ranges()
        if self.sim_sampling_A > self.sampling_A:
            raise ValueError(
                f"sim_sampling_A={self.sim_sampling_A} Å is coarser than the output sampling "
                f"sampling_A={self.sampling_A} Å; the multislice must be at least as fine"
            )
        if self.semiangle_cutoff_mrad is not None:
            nyquist_mrad = wavelength_A(self.energy_eV) / (2 * self.sampling_A) * 1e3
            if self.semiangle_cutoff_mrad > nyquist_mrad:
                finest_A = wavelength_A(self.energy_eV) / (2e-3 * self.semiangle_cutoff_mrad)
                raise ValueError(
                    f"the objective aperture semiangle_cutoff_mrad {self.semiangle_cutoff_mrad:g} "
                    f"mrad reaches beyond what the output sampling_A {self.sampling_A:g} Å/px can "
                    f"represent ({nyquist_mrad:.1f} mrad): use a finer sampling_A "
                    f"(<= {finest_A:.3f} Å) or a smaller semiangle_cutoff_mrad"
                )
        return self

    def _check_imaging_ranges(self) -> None:
        if self.dose_range_e_per_A2 is not None and self.dose_range_e_per_A2[0] <= 0:
            raise ValueError(
                f"dose_range_e_per_A2 must be positive (got {self.dose_range_e_per_A2})"
            )
        if self.focal_spread_range_A is not None and self.focal_spread_range_A[0] < 0:
            raise ValueError(
                f"focal_spread_range_A must be >= 0 (got {self.focal_spread_range_A})"
            )
        if self.illumination_amplitude[1] >= 1:
            raise ValueError(
                f"illumination_amplitude must stay below 1 (got {self.illumination_amplitude}): "
                "the field 1 ± a must stay positive"
            )
        if self.detector_mtf_width_nyquist[0] <= 0:
            raise ValueError(
                f"detector_mtf_width_nyquist must be positive (got "
                f"{self.detector_mtf_width_nyquist})"
            )

    @property
    def varies_per_image(self) -> bool:
        """Whether any imaging condition is drawn per image (not one value for all)."""
        return (
            self.dose_range_e_per_A2 is not None
            or self.Cs_range_A is not None
            or self.focal_spread_range_A is not None
            or self.drift_length_A[1] > 0
            or self.illumination_amplitude[1] > 0
            or self.detector != "none"
        )

    @property
    def extent_A(self) -> float:
        """Field of view [Å]."""
        return self.image_size_px * self.sampling_A

    @property
    def sim_gpts(self) -> int:
        """Multislice grid points per side (rounded up to an even number)."""
        n = math.ceil(self.extent_A / self.sim_sampling_A - 1e-9)
        return n + (n % 2)

    def memory_estimate_bytes(self) -> int:
        """Rough peak memory of one structure's multislice [bytes]."""
        # complex64 waves per phonon + potential slices (float32) + FFT work space
        g2 = self.sim_gpts**2
        return int(g2 * 8 * (self.n_phonons + 6))

    @classmethod
    def from_preset(cls, name: str = "laptop", **overrides) -> SimulationConfig:
        """Build a config from a preset, overriding any field.

        Parameters
        ----------
        name
            ``"laptop"`` (seconds per structure on 2 cores) or ``"study"`` (the published
            study's settings: 300 kV, 0.1 Å multislice, 0.2 Å/px, 8 phonons, 512², 11 defoci
            -25..+25 nm, 400 e/Å², focal spread 10 Å, jitter 1.5 nm) or ``"real_sessions"``
            (the imaging and structure distribution of real microscope sessions: 0.3 Å/px,
            512² (a 15.4 nm field, kept at any other ``sampling_A`` unless ``image_size_px``
            is given: 768 px at 0.2 Å/px, 384 at 0.4; particles up to 12 nm across), 1-6
            particles that may touch or overlap, carbon 2-15 nm, per-image dose 50-1000
            e/Å² (log-uniform), Cs ±20 µm, focal spread 5-40 Å, drift 0-3 Å, uneven
            illumination up to ±30 %, a scintillator detector; the material is set per
            config).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        fov_A = values.pop("field_of_view_A", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if fov_A is not None and overrides.get("image_size_px") is None:
            # a preset with a field of view keeps it at any pixel size (multiples of 32 px)
            values["image_size_px"] = 32 * math.ceil(fov_A / values["sampling_A"] / 32 - 1e-9)
        values["preset"] = name
        return cls(**values)


#: The study's 11 defocus domains [nm], abTEM sign (positive = underfocus).
STUDY_DEFOCI_NM: tuple[float, ...] = tuple(float(d) for d in range(-25, 26, 5))

PRESETS: dict[str, dict] = {
    # the field defaults: 256² at 0.2 Å/px, 5 defoci -10…+10 nm, 8 structures, 2 phonons
    "laptop": dict(),
    "study": dict(
        image_size_px=512,
        sampling_A=0.2,
        sim_sampling_A=0.1,
        n_phonons=8,
        defocus_nm=list(STUDY_DEFOCI_NM),
        defocus_jitter_nm=1.5,
        focal_spread_A=10.0,
        dose_e_per_A2=400.0,
        particles_per_image=(1, 5),
        radius_nm=(1.5, 2.5),
        stacking_faults=(0, 2),
        substrate_thickness_nm=(2.0, 8.0),
        n_structures=16,
    ),
    "real_sessions": dict(
        image_size_px=512,
        field_of_view_A=153.6,
        sampling_A=0.3,
        sim_sampling_A=0.15,
        reference_cell="particles",
        n_phonons=2,
        defocus_nm=list(STUDY_DEFOCI_NM),
        defocus_jitter_nm=1.5,
        particles_per_image=(1, 6),
        radius_nm=(1.0, 6.0),
        stacking_faults=(0, 2),
        min_separation_nm=-1.0,
        substrate_thickness_nm=(2.0, 15.0),
        dose_e_per_A2=224.0,
        dose_range_e_per_A2=(50.0, 1000.0),
        Cs_A=5e4,
        Cs_range_A=(-2e5, 2e5),
        focal_spread_A=20.0,
        focal_spread_range_A=(5.0, 40.0),
        drift_length_A=(0.0, 3.0),
        illumination_amplitude=(0.0, 0.3),
        illumination_cutoff_cycles=2.0,
        illumination_period_nm=100.0,
        detector="scintillator",
        detector_mtf_width_nyquist=(0.2, 0.5),
        detector_mtf_floor=0.1,
        detector_dqe0=0.6,
        n_structures=16,
    ),
}
