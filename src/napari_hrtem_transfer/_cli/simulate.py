"""``hrtem-transfer simulate``: write a simulated HRTEM defocus series with masks."""

from __future__ import annotations

import argparse

HELP = (
    "Simulate an HRTEM defocus series of nanoparticles on amorphous carbon with abTEM "
    "(multislice with frozen phonons, then a CTF per defocus, Poisson noise) and exact "
    "ground-truth masks; write one HyperSpy .hspy file."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..simulate.config import MATERIALS, PRESETS

    p.add_argument("--out", required=True, help="Output file, ending in .hspy.")
    p.add_argument(
        "--preset",
        default="laptop",
        choices=sorted(PRESETS),
        help="Starting values: 'laptop' (256 px, 2 phonons, seconds per structure) or "
        "'study' (the published settings: 512 px, 8 phonons, 11 defoci -25..25 nm).",
    )
    p.add_argument("--material", default=None, help=f"Particle lattice: {', '.join(MATERIALS)}.")
    p.add_argument(
        "--n-structures", type=int, default=None, help="Number of structures (images per defocus)."
    )
    p.add_argument("--size", type=int, default=None, help="Image width and height [px].")
    p.add_argument("--sampling", type=float, default=None, help="Output pixel size [Å/px].")
    p.add_argument("--sim-sampling", type=float, default=None, help="Multislice sampling [Å].")
    p.add_argument("--phonons", type=int, default=None, help="Frozen-phonon configurations.")
    p.add_argument(
        "--defocus",
        type=float,
        nargs="*",
        default=None,
        metavar="NM",
        help="Nominal defoci [nm]; positive = underfocus (abTEM: defocus = -C10).",
    )
    p.add_argument(
        "--defocus-jitter",
        type=float,
        default=None,
        help="Standard deviation of each image's defocus around the nominal value [nm].",
    )
    p.add_argument(
        "--dose",
        type=float,
        default=None,
        help="Electron dose [e/Å²] (Poisson noise); stored images are counts per pixel.",
    )
    p.add_argument(
        "--no-noise", action="store_true", help="Store noise-free intensity instead of counts."
    )
    p.add_argument("--voltage", type=float, default=None, help="Acceleration voltage [kV].")
    p.add_argument(
        "--cs",
        type=float,
        default=None,
        help="Spherical aberration Cs [mm] (default 0.005 mm = 5 µm).",
    )
    p.add_argument(
        "--focal-spread",
        type=float,
        default=None,
        help="Focal spread [Å] (partial temporal coherence).",
    )
    p.add_argument(
        "--aperture",
        type=float,
        default=None,
        help="Objective aperture semi-angle [mrad]; default none.",
    )
    p.add_argument(
        "--radius",
        type=float,
        nargs="+",
        default=None,
        metavar="NM",
        help="Particle radius range [nm]: MIN MAX (or one value).",
    )
    p.add_argument(
        "--particles",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="Particles per image: MIN MAX (or one value).",
    )
    p.add_argument(
        "--substrate-thickness",
        type=float,
        nargs="+",
        default=None,
        metavar="NM",
        help="Amorphous-carbon thickness range [nm]: MIN MAX (or one value; 0 = none).",
    )
    p.add_argument(
        "--stacking-faults",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="Stacking faults per particle: MIN MAX (or one value); wurtzite and fcc only.",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="Master seed; the same seed gives identical files."
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


#: config field -> (command-line flag, argparse dest, factor from the flag's unit to the field's)
FLAGS: dict[str, tuple[str, str, float]] = {
    "material": ("--material", "material", 1),
    "n_structures": ("--n-structures", "n_structures", 1),
    "image_size_px": ("--size", "size", 1),
    "sampling_A": ("--sampling", "sampling", 1),
    "sim_sampling_A": ("--sim-sampling", "sim_sampling", 1),
    "n_phonons": ("--phonons", "phonons", 1),
    "defocus_nm": ("--defocus", "defocus", 1),
    "defocus_jitter_nm": ("--defocus-jitter", "defocus_jitter", 1),
    "dose_e_per_A2": ("--dose", "dose", 1),
    "energy_eV": ("--voltage", "voltage", 1e3),  # kV -> eV
    "Cs_A": ("--cs", "cs", 1e7),  # mm -> Å
    "focal_spread_A": ("--focal-spread", "focal_spread", 1),
    "semiangle_cutoff_mrad": ("--aperture", "aperture", 1),
    "radius_nm": ("--radius", "radius", 1),
    "particles_per_image": ("--particles", "particles", 1),
    "substrate_thickness_nm": ("--substrate-thickness", "substrate_thickness", 1),
    "stacking_faults": ("--stacking-faults", "stacking_faults", 1),
    "seed": ("--seed", "seed", 1),
}


#: arguments of the core functions that are not config fields -> their command-line flags
ARGUMENT_FLAGS: dict[str, str] = {"path": "--out", "device": "--device", "workers": "--workers"}


def flag_names() -> dict[str, str]:
    """Config fields and core arguments -> command-line flags (for rewording core errors)."""
    return {**{field: flag for field, (flag, _, _) in FLAGS.items()}, **ARGUMENT_FLAGS}


def config_from_args(args: argparse.Namespace):
    """Turn parsed options into a validated :class:`SimulationConfig` (flags -> fields)."""
    from ..errors import ConfigError, reword
    from ..simulate.config import SimulationConfig

    overrides = {}
    for field, (_, dest, scale) in FLAGS.items():
        value = getattr(args, dest)
        overrides[field] = value * scale if value is not None and scale != 1 else value
    flags = flag_names()
    # free text names fields only by their identifiers (with an underscore): reword those
    identifiers = [f for f in flags if "_" in f]
    if args.defocus is not None and len(args.defocus) == 0:
        raise ConfigError(
            "--defocus was given without values; give at least one defocus in nm, "
            "e.g. --defocus -5 0 5",
            "--defocus",
        )
    if args.dose is not None and args.dose <= 0:
        raise ConfigError(
            f"--dose must be a positive number of electrons per Å² (got {args.dose:g}); "
            "the study used 400 e/Å², or use --no-noise for noise-free images",
            "--dose",
        )
    from pydantic import ValidationError

    try:
        cfg = SimulationConfig.from_preset(args.preset, **overrides)
        if args.no_noise:
            cfg.dose_e_per_A2 = None
    except ValidationError as exc:
        msgs, fields = [], []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            msg = reword(err["msg"].removeprefix("Value error, "), flags, identifiers)
            msgs.append(f"{flags.get(field, field)}: {msg}" if field else msg)
            fields.append(flags.get(field, field) if field else None)
        named = [f for f in fields if f]
        raise ConfigError("; ".join(msgs), named[0] if named else None, fields=named) from None
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {args.workers})", "--workers")
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
    from ..io._atomic import check_writable
    from ..simulate import simulate_to_file

    cfg = config_from_args(args)
    from pathlib import Path

    from ..errors import ConfigError

    if Path(args.out).suffix != ".hspy":
        raise ConfigError(f"--out {args.out}: use a file name ending in .hspy", "--out")
    check_writable(args.out)
    if args.figure:
        check_writable(args.figure, "--figure")
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
