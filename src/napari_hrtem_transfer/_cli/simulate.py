"""``hrtem-transfer simulate``: write a simulated HRTEM defocus series with masks."""

from __future__ import annotations

import argparse

from .flags import Flag, add_config_flags, overrides_from_args

HELP = (
    "Simulate an HRTEM defocus series of nanoparticles on amorphous carbon with abTEM "
    "(multislice with frozen phonons, then a CTF per defocus, Poisson noise) and exact "
    "ground-truth masks; write one HyperSpy .hspy file."
)


#: SimulationConfig field -> its command-line option.  Types, nargs and the help text's
#: defaults (per preset) come from the config (the one source of every default); help is
#: written here only where the flag's unit or words differ from the field's description.
#: Fields without a flag are set with --config FILE.
FLAGS: dict[str, Flag] = {
    "material": Flag("--material"),
    "n_structures": Flag("--n-structures"),
    "image_size_px": Flag("--size"),
    "sampling_A": Flag("--sampling"),
    "sim_sampling_A": Flag("--sim-sampling", help="Multislice sampling [Å] (at most --sampling)"),
    "n_phonons": Flag("--phonons"),
    "defocus_nm": Flag("--defocus", metavar="NM", nargs="*"),
    "defocus_jitter_nm": Flag("--defocus-jitter"),
    "dose_e_per_A2": Flag(
        "--dose",
        help="Electron dose [e/Å²] (Poisson noise); stored images are counts per pixel; "
        "--no-noise for noise-free intensity",
    ),
    "energy_eV": Flag("--voltage", scale=1e3, help="Acceleration voltage [kV]"),  # kV -> eV
    "Cs_A": Flag("--cs", scale=1e7, help="Spherical aberration Cs [mm]"),  # mm -> Å
    "focal_spread_A": Flag("--focal-spread"),
    "semiangle_cutoff_mrad": Flag(
        "--aperture", help="Objective aperture semi-angle [mrad]; none = no aperture"
    ),
    "radius_nm": Flag(
        "--radius", metavar="NM", help="Particle radius range [nm]: MIN MAX (or one value)"
    ),
    "particles_per_image": Flag(
        "--particles",
        metavar="N",
        help="Particles per image: MIN MAX (or one value; 0 0 = carbon film only)",
    ),
    "substrate_thickness_nm": Flag(
        "--substrate-thickness",
        metavar="NM",
        help="Amorphous-carbon thickness range [nm]: MIN MAX (or one value; 0 = none)",
    ),
    "stacking_faults": Flag(
        "--stacking-faults",
        metavar="N",
        help="Stacking faults per particle: MIN MAX (or one value); wurtzite and fcc only",
    ),
    "substrate_material": Flag("--substrate"),
    "min_separation_nm": Flag(
        "--min-separation",
        metavar="NM",
        help="Minimum surface-to-surface gap of particles [nm]; 0 = may touch, negative = may "
        "overlap by up to that much (mask = union)",
    ),
    "dose_range_e_per_A2": Flag(
        "--dose-range",
        metavar="E_PER_A2",
        help="Per-image dose range [e/Å²]: MIN MAX, log-uniform per image (replaces --dose "
        "where set; one value = that dose for every image)",
    ),
    "Cs_range_A": Flag(
        "--cs-range",
        scale=1e7,
        metavar="MM",
        help="Per-image Cs range [mm]: MIN MAX, uniform per image (replaces --cs)",
    ),
    "focal_spread_range_A": Flag(
        "--focal-spread-range",
        metavar="A",
        help="Per-image focal spread range [Å]: MIN MAX, uniform (replaces --focal-spread)",
    ),
    "drift_length_A": Flag("--drift", metavar="A"),
    "illumination_amplitude": Flag("--illumination", metavar="A"),
    "illumination_cutoff_cycles": Flag("--illumination-cutoff"),
    "illumination_period_nm": Flag("--illumination-period", metavar="NM"),
    "detector": Flag("--detector"),
    "detector_mtf_width_nyquist": Flag("--mtf-width", metavar="NU0"),
    "detector_mtf_floor": Flag("--mtf-floor"),
    "detector_dqe0": Flag("--dqe0"),
    "seed": Flag("--seed"),
}

#: The preset used when neither --preset nor --config is given.
DEFAULT_PRESET = "laptop"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..simulate.config import PRESETS, SimulationConfig

    p.add_argument("--out", required=True, help="Output file, ending in .hspy.")
    p.add_argument(
        "--preset",
        default=argparse.SUPPRESS,
        choices=sorted(PRESETS),
        help=f"Starting values (default: {DEFAULT_PRESET}): 'laptop' (256 px, 2 phonons, "
        "seconds per structure), 'study' (the published settings: 512 px, 8 phonons, "
        "11 defoci -25..25 nm) or 'real_sessions' (the conditions of real sessions: 0.3 Å/px, "
        "512 px, particles up to 12 nm, carbon 2-15 nm, dose 50-1000 e/Å², Cs and focal "
        "spread ranges, drift, uneven illumination, scintillator detector).",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="TOML",
        help="Starting values from a simulation config file (napari_hrtem_transfer.config."
        "save_config, or --save-config); the options below override it.",
    )
    presets = {name: SimulationConfig.from_preset(name) for name in PRESETS}
    defaults = {f: {n: getattr(c, f) for n, c in presets.items()} for f in FLAGS}
    add_config_flags(p, SimulationConfig, FLAGS, defaults)
    p.add_argument(
        "--no-noise", action="store_true", help="Store noise-free intensity instead of counts."
    )
    p.add_argument(
        "--save-config",
        default=None,
        metavar="TOML",
        help="Also write the resolved settings to this config file (for --config).",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Parallel worker processes (a local dask cluster); results do not depend on it.",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="Address of an existing dask.distributed scheduler to run on instead.",
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "gpu"], help="abTEM device (gpu needs CuPy)."
    )
    p.add_argument(
        "--figure",
        default=None,
        metavar="PNG",
        help="Also write a PNG of the first structure across the defocus series with its mask.",
    )
    p.add_argument("--quiet", action="store_true", help="No progress bar.")


#: arguments of the core functions that are not config fields -> their command-line flags
ARGUMENT_FLAGS: dict[str, str] = {"path": "--out", "device": "--device", "workers": "--workers"}


def flag_names() -> dict[str, str]:
    """Config fields and core arguments -> command-line flags (for rewording core errors)."""
    return {**{field: spec.flag for field, spec in FLAGS.items()}, **ARGUMENT_FLAGS}


def _start(args: argparse.Namespace):
    """The starting config: --config FILE, or a preset (validated, before any override)."""
    from ..errors import ConfigError

    preset = getattr(args, "preset", None)
    if args.config is None:
        return None, preset or DEFAULT_PRESET
    if preset is not None:
        raise ConfigError(
            "give either --config or --preset, not both (the file holds every starting value)",
            "--preset",
            fields=("--preset", "--config"),
        )
    from ..config import load_config

    try:
        return load_config(args.config, "simulation"), None
    except ConfigError as exc:
        # the file names config fields, not flags: keep its words (reword nothing)
        raise ConfigError(f"--config: {exc}", "--config") from None


def config_from_args(args: argparse.Namespace):
    """Turn parsed options into a validated :class:`SimulationConfig` (flags -> fields).

    Starting values come from ``--config FILE`` or ``--preset`` (default laptop); every
    option given overrides them.
    """
    from ..errors import ConfigError, config_error_from_validation
    from ..simulate.config import SimulationConfig

    defocus = getattr(args, "defocus", None)
    if defocus is not None and len(defocus) == 0:
        raise ConfigError(
            "--defocus was given without values; give at least one defocus in nm, "
            "e.g. --defocus -5 0 5",
            "--defocus",
        )
    dose = getattr(args, "dose", None)
    if dose is not None and dose <= 0:
        raise ConfigError(
            f"--dose must be a positive number of electrons per Å² (got {dose:g}); "
            "the study used 400 e/Å², or use --no-noise for noise-free images",
            "--dose",
        )
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {args.workers})", "--workers")
    base, preset = _start(args)
    overrides = overrides_from_args(args, FLAGS)
    from pydantic import ValidationError

    try:
        if base is None:
            cfg = SimulationConfig.from_preset(preset, **overrides)
        else:
            cfg = SimulationConfig.model_validate({**base.model_dump(), **overrides})
        if args.no_noise:
            cfg.dose_e_per_A2 = None
    except ValidationError as exc:
        raise config_error_from_validation(exc, flag_names()) from None
    return cfg


def run(args: argparse.Namespace) -> int:
    """Simulate, write the file (and figure); core errors are reworded with the flags."""
    from ..errors import ConfigError, SimulationError, reword

    flags = flag_names()
    try:
        return _run(args)
    except ConfigError as exc:
        raise exc.reworded(flags) from None
    except SimulationError as exc:
        raise SimulationError(reword(str(exc), flags, [f for f in flags if "_" in f])) from None


def _run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_writable
    from ..simulate import simulate_to_file

    cfg = config_from_args(args)
    from pathlib import Path

    from ..errors import ConfigError

    if Path(args.out).suffix != ".hspy":
        raise ConfigError(f"--out {args.out}: use a file name ending in .hspy", "--out")
    check_writable(args.out)
    if args.figure:
        check_writable(args.figure, "--figure")
    if args.save_config:
        from ..config import save_config

        check_writable(args.save_config, "--save-config")
        print(f"wrote {save_config(cfg, args.save_config)}")
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    path = simulate_to_file(
        cfg,
        args.out,
        workers=args.workers,
        client=client,
        progress=not args.quiet,
        device=args.device,
    )
    print(
        f"wrote {path}: {cfg.n_structures} structures x {len(cfg.defocus_nm)} defoci "
        f"({', '.join(f'{d:g}' for d in cfg.defocus_nm)} nm; positive = underfocus), "
        f"{cfg.image_size_px}x{cfg.image_size_px} px at {cfg.sampling_A:g} Å/px"
    )
    if args.figure:
        from ..io import load_dataset
        from ..simulate.figures import plot_defocus_series

        fig = plot_defocus_series(load_dataset(path), args.figure)
        print(f"wrote {fig}")
    return 0


COMMANDS = [("simulate", HELP, add_arguments, run)]
