"""Train the pretrained model shipped in the wheel (``--model pretrained``).

Reproduces ``src/napari_hrtem_transfer/models/pretrained/`` and ``docs/pretrained_model.md``
from scratch on 2 CPU cores::

    .venv/bin/python scripts/train_pretrained_model.py --work /tmp/pretrained_work [--recipe R]

Two recipes (:data:`RECIPES`): ``legacy`` is the shipped model's (CdSe and Au, 0.2 Å/px,
256 px, Cs 5 µm, 400 e/Å², no detector; about an hour); ``real_sessions`` is the candidate for
real microscopes (Au, Ag, Pt, Pd, CdSe, ZnS on 2-10 nm carbon, particles up to 8 nm, 1-3 per
frame, per-image dose 50-1000 e/Å², Cs ±20 µm, focal spread 5-40 Å, drift, uneven
illumination, a scintillator detector; native 0.3 Å/px, 384 px; flat-field preprocessing,
pixel-size augmentation, BCE + Dice loss).  ``--no-install`` keeps the package's model.

Stages (each is skipped when its output already exists in ``--work``, so an interrupted run
resumes; a larger ``--epochs`` resumes the training):

1. simulate each material's defocus series (abTEM, the study's 11 defoci -25 ... +25 nm) and
   merge them into one dataset (per-image imaging conditions kept);
2. pretrain the compact U-Net on the mixture of all defoci (the study's "mixture" baseline);
3. fit the label-free OOD reference and calibrate its caution level on held-out series
   (per material, a fit and a calibration series of ``--ood-structures`` structures with
   the recipe's settings, new seeds from ``--ood-seed``, each image at a dose drawn from the
   ``--dose-augment`` range when it is set: the inputs the model was trained on, never its
   own training frames; cached);
4. evaluate loss/Dice/IoU per defocus on the held-out structures (split by structure);
5. copy the best checkpoint + OOD reference into the package and write the model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE_MODEL = REPO / "src" / "napari_hrtem_transfer" / "models" / "pretrained"
CARD = REPO / "docs" / "pretrained_model.md"

DEFOCI_NM = [-25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0]

#: The recipes: ``real_sessions`` (the candidate for real microscopes: six materials, the
#: imaging and structure distribution of real sessions, native 0.3 Å/px) and ``legacy`` (the
#: shipped model: CdSe and Au at 0.2 Å/px, Cs 5 µm, 400 e/Å², no detector).
#: The recipe of the model installed in the package today.
SHIPPED_RECIPE = "legacy"

RECIPES: dict[str, dict] = {
    "real_sessions": dict(
        materials=("Au", "Ag", "Pt", "Pd", "CdSe", "ZnS"),
        preset="real_sessions",
        overrides=dict(
            # 384 px at 0.3 Å/px = an 11.5 nm field; particles up to 10 nm across
            image_size_px=384,
            sim_sampling_A=0.2,  # band limit 1/(3 x 0.2 Å) = the 0.3 Å/px Nyquist frequency
            n_phonons=1,
            substrate_thickness_nm=(2.0, 10.0),
            # sparse frames: with 1-6 particles of radius 1-5 nm the masks covered a median
            # 56 % of the 11.5 nm field (real 4096² sessions: a few per cent); 1-3 particles
            # of radius 0.8-4 nm leave carbon around most particles
            radius_nm=(0.8, 4.0),
            particles_per_image=(1, 3),
            # absolute abTEM defocus: the coordinate the Thon-ring estimate of a real frame
            # measures (no per-structure minimum-contrast shift)
            calibrate_zero_defocus=False,
        ),
        train=dict(
            # flat field over 20 nm: removes a session's slow illumination gradient on a
            # large real frame; on the 11.5 nm training frames it is close to a division
            # by the mean (their own illumination field is left for the network to learn)
            preprocessing=dict(flat_field_sigma_A=200.0),
            pixel_size_augment=1.25,
            loss="bce_dice",
        ),
    ),
    "legacy": dict(
        materials=("CdSe", "Au"),
        preset="laptop",
        overrides=dict(
            defocus_jitter_nm=1.0,
            radius_nm=(0.8, 1.8),
            particles_per_image=(1, 3),
            dose_e_per_A2=400.0,
            # the masks the shipped model was trained on (the package default is now 0.1,
            # the atoms' projected radii; --mask-binarize-level 0.1 trains on those)
            mask_binarize_level=0.02,
        ),
        train=dict(),
    ),
}


def simulation_config(recipe: str, material: str, n_structures: int, seed: int, **overrides):
    """The simulation config of one material of ``recipe`` (see :data:`RECIPES`);
    ``overrides`` replace the recipe's fields (e.g. ``mask_binarize_level``)."""
    from napari_hrtem_transfer.simulate import SimulationConfig

    r = RECIPES[recipe]
    return SimulationConfig.from_preset(
        r["preset"],
        material=material,
        n_structures=n_structures,
        defocus_nm=DEFOCI_NM,
        seed=seed,
        **{**r["overrides"], **overrides},
    )


def merge(datasets, materials):
    """Concatenate datasets of identical defoci, size and sampling along the image axis.

    Per-image imaging conditions (``info["per_image"]``, arrays (n_defocus, n_images)) are
    concatenated along the image axis too, so the model card can break Dice down by dose.
    """
    from napari_hrtem_transfer.io.dataset import HRTEMDataset

    first = datasets[0]
    for ds in datasets[1:]:
        if not np.allclose(ds.defocus_nm, first.defocus_nm) or ds.sampling_A != first.sampling_A:
            raise SystemExit("datasets to merge differ in defoci or sampling")
    images = np.concatenate([np.asarray(ds.images) for ds in datasets], axis=1)
    masks = np.concatenate([np.asarray(ds.masks) for ds in datasets], axis=0)
    ids = np.concatenate(
        [[f"{m}-{s}" for s in ds.structure_ids] for ds, m in zip(datasets, materials, strict=True)]
    )
    info: dict = {"merged_from": [ds.info for ds in datasets]}
    per_image = [ds.info.get("per_image") for ds in datasets]
    if all(per_image):
        keys = set.intersection(*(set(p) for p in per_image))
        info["per_image"] = {
            k: np.concatenate([np.asarray(p[k], dtype=float) for p in per_image], axis=1).tolist()
            for k in sorted(keys)
        }
        info["per_image_units"] = datasets[0].info.get("per_image_units", {})
    doses = {ds.dose_e_per_A2 for ds in datasets}
    return HRTEMDataset(
        images=images,
        defocus_nm=first.defocus_nm,
        sampling_A=first.sampling_A,
        masks=masks,
        structure_ids=ids,
        materials=np.concatenate([ds.materials for ds in datasets]),
        actual_defocus_nm=np.concatenate([ds.actual_defocus_nm for ds in datasets], axis=1),
        dose_e_per_A2=doses.pop() if len(doses) == 1 else None,
        energy_eV=first.energy_eV,
        info=info,
    )


def parser() -> argparse.ArgumentParser:
    """The script's command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("pretrained_work"))
    p.add_argument("--recipe", choices=tuple(RECIPES), default="real_sessions")
    p.add_argument("--n-structures", type=int, default=12, help="per material")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=320)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stage", choices=("simulate", "train", "all"), default="all")
    p.add_argument("--no-install", action="store_true", help="do not copy into the package")
    p.add_argument(
        "--mask-binarize-level",
        type=float,
        default=None,
        help="SimulationConfig.mask_binarize_level of the training masks (default: the recipe's)",
    )
    p.add_argument(
        "--resolution-augment",
        type=float,
        default=None,
        help="TrainConfig.resolution_augment (default: the recipe's)",
    )
    p.add_argument(
        "--pixel-size-augment",
        type=float,
        default=None,
        help="TrainConfig.pixel_size_augment (default: the recipe's)",
    )
    p.add_argument(
        "--dose-augment",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="TrainConfig.dose_augment_e_per_A2 [e/Å²] (default: the recipe's)",
    )
    p.add_argument(
        "--validation-dose",
        choices=("recorded", "augmented"),
        default="recorded",
        help="TrainConfig.validation_dose: the dose of the validation frames that select "
        "the best epoch (augmented: re-noised over the --dose-augment range)",
    )
    p.add_argument(
        "--ood-seed",
        type=int,
        default=911,
        help="first seed of the held-out series the OOD reference is fitted and calibrated on "
        "(fit series: OOD_SEED + i, calibration series: OOD_SEED + n_materials + i)",
    )
    p.add_argument(
        "--ood-structures",
        type=int,
        default=10,
        help="structures per held-out series (the first 6 of each fit series are fitted on, "
        "the rest and the calibration series calibrate the level)",
    )
    return p


#: The arguments that change what the stages compute (``--epochs`` may grow: that resumes).
RUN_KEYS = (
    "recipe",
    "n_structures",
    "seed",
    "samples_per_epoch",
    "mask_binarize_level",
    "resolution_augment",
    "pixel_size_augment",
    "dose_augment",
    "validation_dose",
)

#: The value of a key that records written before it existed imply.
RUN_KEY_DEFAULTS = {"validation_dose": "recorded"}


def run_settings(args) -> dict:
    """The result-affecting arguments of this call (:data:`RUN_KEYS`), JSON-able."""
    return {k: getattr(args, k) for k in RUN_KEYS}


def check_run_record(work: Path, args) -> str | None:
    """Why ``args`` cannot reuse the cached stages in ``work``, or None.

    ``work/run.json`` holds the settings of the call that wrote the cached stages; a call with
    other settings would mix its data or model with theirs (an old simulation trained with
    new flags), so it is refused with the flags that differ and the fix.
    """
    record = work / "run.json"
    if not record.exists():
        return None
    try:
        before = json.loads(record.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{record} is not a run record of this script; remove it or use a new --work"
    now = run_settings(args)
    differ = [k for k in RUN_KEYS if before.get(k, RUN_KEY_DEFAULTS.get(k)) != now[k]]
    if not differ:
        return None
    flags = ", ".join(
        f"--{k.replace('_', '-')} {before.get(k, RUN_KEY_DEFAULTS.get(k))!r} (now {now[k]!r})"
        for k in differ
    )
    return (
        f"{work} holds a run with other settings: {flags}. Rerun with those settings to "
        "resume it, or give a new --work for the new settings"
    )


def check_epochs(work: Path, args) -> str | None:
    """Why ``--epochs`` cannot continue the cached model (fewer than it was trained), or None."""
    last = work / "model" / "last.json"
    try:
        done = int(json.loads(last.read_text()).get("epochs_completed", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # no model yet (an unreadable one fails where it is loaded)
    if done <= args.epochs:
        return None
    return (
        f"the model in {work / 'model'} was trained for {done} epochs, more than --epochs "
        f"{args.epochs}: give --epochs {done} or more (more resumes the training), or a new "
        "--work"
    )


def write_run_record(work: Path, args, **extra) -> None:
    """Write (or update) ``work/run.json``: the settings, and ``extra`` (e.g. the machine)."""
    from napari_hrtem_transfer.io.atomic import write_text_atomic

    record = work / "run.json"
    data = json.loads(record.read_text()) if record.exists() else {}
    data["settings"] = run_settings(args)
    data.update(extra)
    write_text_atomic(record, json.dumps(data, indent=1))


def train_config(args):
    """The :class:`TrainConfig` of this call (the recipe's settings, then the flags)."""
    from napari_hrtem_transfer.training import TrainConfig

    extra = {}
    if args.resolution_augment is not None:
        extra["resolution_augment"] = args.resolution_augment
    if args.pixel_size_augment is not None:
        extra["pixel_size_augment"] = args.pixel_size_augment
    if args.dose_augment is not None:
        extra["dose_augment_e_per_A2"] = tuple(args.dose_augment)
    if getattr(args, "validation_dose", "recorded") != "recorded":
        extra["validation_dose"] = args.validation_dose
    return TrainConfig.pretrain(
        "all",
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        split_seed=0,
        patch_size=256,
        lr=1e-3,
        **{**RECIPES[args.recipe]["train"], **extra},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the stages; bad flags or a work folder of another run: a message and exit 2."""
    from pydantic import ValidationError

    from napari_hrtem_transfer.errors import HrtemTransferError, config_error_from_validation

    args = parser().parse_args(argv)
    work = args.work.expanduser().resolve()
    names = {k: f"--{k.replace('_', '-')}" for k in (*RUN_KEYS, "epochs")}
    names["dose_augment_e_per_A2"] = "--dose-augment"
    try:
        # every flag is checked before the first (long) stage starts
        config = train_config(args)
        for i, material in enumerate(RECIPES[args.recipe]["materials"]):
            simulation_config(
                args.recipe,
                material,
                args.n_structures,
                args.seed + i,
                **(
                    {}
                    if args.mask_binarize_level is None
                    else {"mask_binarize_level": args.mask_binarize_level}
                ),
            )
    except ValidationError as exc:
        print(f"error: {config_error_from_validation(exc, names)}", file=sys.stderr)
        return 2
    except HrtemTransferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.ood_structures < 1:
        print(
            f"error: --ood-structures must be at least 1 (got {args.ood_structures}): the "
            "held-out series the OOD reference is fitted on need structures",
            file=sys.stderr,
        )
        return 2
    problem = check_run_record(work, args) or check_epochs(work, args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    record = work / "run.json"
    unverified = (work / "mixture.hspy").exists() and (
        not record.exists() or json.loads(record.read_text()).get("settings_verified") is False
    )
    if unverified:
        print(
            f"warning: {work} has cached stages that no run record vouches for; they are reused "
            "as they are (their settings cannot be checked against these flags)",
            file=sys.stderr,
        )
    work.mkdir(parents=True, exist_ok=True)
    # the record of stages this script did not write says so: later calls warn again
    write_run_record(work, args, **({"settings_verified": False} if unverified else {}))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    merged = simulate_stage(work, args, log)
    if args.stage == "simulate":
        return 0

    from napari_hrtem_transfer.evaluation import evaluate_model
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.training import train

    model_dir = work / "model"
    if (
        not (model_dir / "best.json").exists()
        or (model_dir / "last.json").exists()
        and (
            json.loads((model_dir / "last.json").read_text()).get("epochs_completed", 0)
            < args.epochs
        )
    ):
        log(f"pretraining ({args.epochs} epochs, all 11 defoci)")
        t_train = time.perf_counter()
        result = train(config, merged, model_dir, resume=(model_dir / "last.json").exists())
        log(f"trained in {time.perf_counter() - t_train:.0f} s on {result.device}")
        # the card names the machine that trained the model, also when a later call
        # (on another machine) only re-evaluates it
        write_run_record(work, args, trained_on=machine())
    fit_ood(model_dir, ood_series(work, args, log), log)
    log("evaluating on held-out structures")
    evaluation = evaluate_model(model_dir, load_dataset(merged, lazy=True))
    records = evaluation.domains.records()
    from napari_hrtem_transfer.io.atomic import write_text_atomic

    write_text_atomic(work / "evaluation.json", json.dumps(_jsonable(records), indent=1))
    if not args.no_install:
        install(model_dir)
    # a candidate (--no-install) gets its card beside the model, the package's card stays
    card = work / "model_card.md" if args.no_install else CARD
    # a model trained before the record kept the machine: not this machine's name
    trained_on = json.loads((work / "run.json").read_text()).get("trained_on", "unknown")
    write_card(
        config,
        merged,
        model_dir,
        records,
        args,
        time.perf_counter() - t0,
        card,
        trained_on=trained_on,
    )
    log(f"model card: {card}")
    return 0


def simulate_stage(work: Path, args, log) -> Path:
    """Stage 1: each material's series (skipped when cached), merged into ``mixture.hspy``."""
    from napari_hrtem_transfer.io import load_dataset, save_dataset
    from napari_hrtem_transfer.simulate import simulate_to_file

    merged = work / "mixture.hspy"
    if merged.exists():
        return merged
    parts = []
    materials = RECIPES[args.recipe]["materials"]
    for i, material in enumerate(materials):
        path = work / f"{material}.hspy"
        if not path.exists():
            log(f"simulating {args.n_structures} {material} structures x 11 defoci")
            extra = {}
            if args.mask_binarize_level is not None:
                extra["mask_binarize_level"] = args.mask_binarize_level
            cfg = simulation_config(
                args.recipe, material, args.n_structures, args.seed + i, **extra
            )
            simulate_to_file(cfg, path, workers=args.workers, progress=True)
        parts.append(load_dataset(path, lazy=False))
    save_dataset(merge(parts, materials), merged)
    log(f"merged dataset: {merged}")
    return merged


def ood_series(work: Path, args, log) -> tuple[list[Path], list[Path]]:
    """The held-out fit and calibration series of stage 3 (simulated once, then cached).

    The recipe's settings with new seeds (``--ood-seed``); with ``--dose-augment`` every image
    at its own dose drawn log-uniformly from that range (what the augmented model was trained
    on: a level calibrated at the training set's one dose flags most in-range frames at other
    doses, docs/independent_check.md).
    """
    from napari_hrtem_transfer.simulate import simulate_to_file

    materials = RECIPES[args.recipe]["materials"]
    extra: dict = {}
    if args.mask_binarize_level is not None:
        extra["mask_binarize_level"] = args.mask_binarize_level
    if args.dose_augment is not None:
        extra["dose_range_e_per_A2"] = tuple(args.dose_augment)
    out: tuple[list[Path], list[Path]] = ([], [])
    for j, kind in enumerate(("fit", "calibration")):
        for i, material in enumerate(materials):
            seed = args.ood_seed + j * len(materials) + i
            path = work / f"ood_{kind}_{material}_seed{seed}_n{args.ood_structures}.hspy"
            if not path.exists():
                log(f"simulating the held-out OOD {kind} series: {material}, seed {seed}")
                cfg = simulation_config(
                    args.recipe, material, args.ood_structures, seed, **extra
                )
                simulate_to_file(cfg, path, workers=args.workers, progress=True)
            out[j].append(path)
    return out


#: Images of each held-out fit series fitted on (the rest calibrate the level).
OOD_FIT_IMAGES = 6


def fit_ood(model_dir: Path, series: tuple[list[Path], list[Path]], log) -> None:
    """Stage 3: the label-free OOD reference and its caution level, on held-out series."""
    from napari_hrtem_transfer.evaluation.ood import fit_ood_on_held_out

    log("fitting the OOD reference on the held-out series")
    fit, calibration = series
    res = fit_ood_on_held_out(
        model_dir,
        fit,
        calibration,
        n_fit_images=OOD_FIT_IMAGES,
        description="held-out series of the training settings (scripts/"
        f"train_pretrained_model.py stage 3): fit on images 0-{OOD_FIT_IMAGES - 1} of "
        + ", ".join(p.name for p in fit)
        + "; calibration: the rest and "
        + ", ".join(p.name for p in calibration),
    )
    log(res.message)


def install(model_dir: Path) -> None:
    """Copy the best checkpoint and its OOD reference into the package (atomic per file)."""
    sidecar = json.loads((model_dir / "best.json").read_text())
    files = [
        "best.json",
        sidecar["weights_file"],
        "ood_reference.json",
        "ood_reference.safetensors",
    ]
    tmp = PACKAGE_MODEL.with_name(PACKAGE_MODEL.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in files:
        shutil.copy2(model_dir / name, tmp / name)
    if PACKAGE_MODEL.exists():
        shutil.rmtree(PACKAGE_MODEL)
    tmp.rename(PACKAGE_MODEL)


def _level(value) -> str:
    """A caution level for the card: two decimals, or 'none' (no calibrated level)."""
    return "none" if value is None else f"{float(value):.2f}"


def _jsonable(obj):  # noqa: D103
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _jsonable(vars(obj))
    return obj


def machine() -> str:
    """The CPU the script ran on, in words (model name from /proc/cpuinfo, cores, load)."""
    import os

    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} cores of an {name}{load}"


def command(args) -> str:
    """The command line that reproduces this run."""
    mask = (
        f" --mask-binarize-level {args.mask_binarize_level!r}"
        if args.mask_binarize_level is not None
        else ""
    )
    res = getattr(args, "resolution_augment", None)
    res = f" --resolution-augment {res!r}" if res is not None else ""
    pix = getattr(args, "pixel_size_augment", None)
    res += f" --pixel-size-augment {pix!r}" if pix is not None else ""
    dose = getattr(args, "dose_augment", None)
    res += f" --dose-augment {dose[0]!r} {dose[1]!r}" if dose is not None else ""
    vdose = getattr(args, "validation_dose", "recorded")
    res += f" --validation-dose {vdose}" if vdose != "recorded" else ""
    ood_seed = getattr(args, "ood_seed", 911)
    res += f" --ood-seed {ood_seed}" if ood_seed != 911 else ""
    ood_n = getattr(args, "ood_structures", 10)
    res += f" --ood-structures {ood_n}" if ood_n != 10 else ""
    return (
        f"python scripts/train_pretrained_model.py --recipe {args.recipe} --n-structures "
        f"{args.n_structures} --epochs {args.epochs} --samples-per-epoch "
        f"{args.samples_per_epoch} --seed {args.seed}{mask}{res}"
    )


def write_card(
    config,
    data: Path,
    model_dir: Path,
    records,
    args,
    seconds: float,
    card: Path = CARD,
    *,
    trained_on: str | None = None,
) -> None:
    """Write the measured per-defocus table into the model card (between the markers).

    ``trained_on``: the machine that trained the model (default: this one).
    """
    sidecar = json.loads((model_dir / "best.json").read_text())
    ood = json.loads((model_dir / "ood_reference.json").read_text())
    by_domain: dict[float, dict[str, dict]] = {}
    for r in records:
        by_domain.setdefault(float(r["domain_defocus_nm"]), {})[str(r.get("material"))] = r

    def cell(r) -> str:
        return f"{r['dice']:.3f} [{r['dice_ci_low']:.2f}, {r['dice_ci_high']:.2f}]"

    mats = sorted({m for d in by_domain.values() for m in d})
    rows = []
    for d in sorted(by_domain):
        cells = [cell(by_domain[d][m]) if m in by_domain[d] else "-" for m in mats]
        losses = [by_domain[d][m]["loss"] for m in mats if m in by_domain[d]]
        per_material = [m for m in mats if m in by_domain[d] and m != "all"]
        n = sum(int(by_domain[d][m]["n_images"]) for m in per_material)
        rows.append(f"| {d:+g} | " + " | ".join(cells) + f" | {np.mean(losses):.4f} | {n} |")
    hist = json.loads((model_dir / "last.json").read_text()).get("history", [])
    train_min = sum(float(h.get("time_s", 0.0)) for h in hist) / 60
    text = card.read_text() if card.exists() else CARD.read_text()
    marker = "<!-- measured -->"
    table = "\n".join(
        [
            marker,
            f"Measured by `{command(args)}` (training {train_min:.0f} min on "
            f"{sidecar.get('training', {}).get('device', 'cpu')}, "
            f"{sidecar.get('training', {}).get('precision', '')}, {trained_on or machine()}; "
            "this call "
            f"{seconds / 60:.0f} min). "
            f"Best epoch {int(sidecar.get('best_epoch', 0)) + 1} of {len(hist)}, validation "
            f"loss (BCE, all defoci) {float(sidecar.get('best_val_loss', float('nan'))):.4f}. "
            f"OOD reference: {ood.get('n_images') or ood.get('info', {}).get('n_samples')} "
            f"image-transforms, caution level {_level(ood.get('caution_level'))}.",
            "",
            "| defocus [nm] | "
            + " | ".join(f"Dice {m} [95 % CI]" for m in mats)
            + " | loss (BCE) | held-out frames |",
            "|---|" + "---|" * len(mats) + "---|---|",
            *rows,
            marker,
        ]
    )
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + table + tail
    else:
        text = text + "\n" + table + "\n"
    from napari_hrtem_transfer.io.atomic import write_text_atomic

    card.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(card, text)


if __name__ == "__main__":
    sys.exit(main())
