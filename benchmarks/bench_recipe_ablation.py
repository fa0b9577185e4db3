"""Ablation of the data recipe: which piece of the simulation/training recipe moves the
independent-check Dice.

A tiny compact U-Net is trained per recipe variant on data from the package's abTEM
simulator and scored on the independent check (:mod:`napari_hrtem_transfer.evaluation.
independent`: another simulator, atom-footprint masks; CdSe, Au, Ag, Pt, 2-6 nm, the study's
11 defoci, at 400 and 80 e/Å²).  Variants are cumulative: ``baseline`` (the shipped model's
recipe: CdSe + Au, radius 0.8-1.8 nm, 1-3 particles, carbon 2-3 nm, 400 e/Å², Cs 5 µm, focal
spread 10 Å, ideal detector), then each row adds one piece to the row above:

    sizes+materials  CdSe, Au, Ag, Pt; radius 0.8-2.6 nm; 1-4 particles, touching; carbon 2-8 nm
    dose             per-image dose, log-uniform (real_sessions preset's range)
    Cs+focal spread  per-image Cs and focal-spread ranges (real_sessions preset)
    detector         the preset's scintillator detector (MTF, DQE)
    drift            the preset's drift-blur range
    illumination     the preset's uneven-illumination range
    flat-field       the model's flat-field preprocessing (TrainConfig.preprocessing,
                     sigma 40 Å: the frames here are only 64 Å wide), same data
    pixel-size aug   pixel-size augmentation in training (pixel_size_augment 1.25), same data
    dose aug         dose (noise) augmentation in training (50-1000 e/Å²), same data

A variant whose fields the package does not have (not landed) is left out and said so.
Every variant has the same number of training structures and the same training budget; the
data are small (160 px at 0.4 Å/px, n_phonons 1) so that the whole run fits ~20 min on 2
cores (one torch thread: faster than two on a loaded machine).  ``--seeds 0 1`` gives the
spread of the training seed (data seed fixed).

    nice -n 10 .venv/bin/python benchmarks/bench_recipe_ablation.py --out /tmp/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

DEFOCI_NM = [-25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0]

#: Simulation of the baseline recipe (the shipped model's, scripts/train_pretrained_model.py).
BASELINE_SIM = dict(
    materials=("CdSe", "Au"),
    radius_nm=(0.8, 1.8),
    particles_per_image=(1, 3),
    substrate_thickness_nm=(2.0, 3.0),
    dose_e_per_A2=400.0,
    defocus_jitter_nm=1.0,
)

#: Fields each piece takes from the real_sessions preset (when the package has them).
PRESET_FIELDS = {
    "dose": ("dose_range_e_per_A2",),
    "Cs+focal spread": ("Cs_range_A", "focal_spread_range_A"),
    "detector": ("detector", "detector_mtf_width_nyquist", "detector_mtf_floor", "detector_dqe0"),
    "drift": ("drift_length_A",),
    "illumination": (
        "illumination_amplitude",
        "illumination_cutoff_cycles",
        "illumination_period_nm",
    ),
}


def pieces(sim_fields: set[str], train_fields: set[str], preset: dict, fov_A: float) -> list:
    """The cumulative pieces: name, simulation and training overrides, or why it is missing.

    The illumination field's highest frequency is given per field of view; it is scaled so
    that its period in Å is the real_sessions preset's (not its count of cycles per frame).
    """
    out = [
        {
            "name": "sizes+materials",
            "sim": dict(
                materials=("CdSe", "Au", "Ag", "Pt"),
                radius_nm=(0.8, 2.6),
                particles_per_image=(1, 4),
                min_separation_nm=0.0,
                substrate_thickness_nm=(2.0, 8.0),
            ),
            "train": {},
        }
    ]
    for name, fields in PRESET_FIELDS.items():
        missing = [f for f in fields if f not in sim_fields or f not in preset]
        piece = {"name": name, "sim": {f: preset.get(f) for f in fields}, "train": {}}
        if name == "illumination" and not missing and preset.get("illumination_period_nm") is None:
            preset_fov = preset.get("field_of_view_A") or (
                preset["image_size_px"] * preset["sampling_A"]
            )
            # at least 1 cycle: the lowest non-zero frequency of a periodic field
            cycles = max(1.0, preset["illumination_cutoff_cycles"] * fov_A / preset_fov)
            piece["sim"]["illumination_cutoff_cycles"] = round(cycles, 3)
        if missing:
            piece["missing"] = f"SimulationConfig has no {', '.join(missing)}"
        out.append(piece)
    out.append(_train_piece("flat-field", _flat_field_overrides(train_fields, 40.0)))
    out.append(_train_piece("pixel-size aug", _pixel_aug_overrides(train_fields, 1.25)))
    out.append(_train_piece("dose aug", _dose_aug_overrides(train_fields, (50.0, 1000.0))))
    return out


def _train_piece(name: str, made) -> dict:
    over, why = made
    piece = {"name": name, "sim": {}, "train": over or {}}
    if why:
        piece["missing"] = why
    return piece


def _flat_field_overrides(fields: set[str], sigma_A: float):
    """TrainConfig overrides that switch on flat-field preprocessing, if the package has it."""
    if "preprocessing" not in fields:
        return None, "TrainConfig has no preprocessing field"
    from napari_hrtem_transfer.training import TrainConfig

    if "flat_field_sigma_A" not in type(TrainConfig().preprocessing).model_fields:
        return None, "the preprocessing record has no flat_field_sigma_A"
    return {"preprocessing": {"flat_field_sigma_A": sigma_A}}, None


def _pixel_aug_overrides(fields: set[str], factor: float):
    """TrainConfig overrides for pixel-size augmentation (factor r: rescale in [1/r, r])."""
    if "pixel_size_augment" not in fields:
        return None, "TrainConfig has no pixel_size_augment field"
    return {"pixel_size_augment": factor}, None


def _dose_aug_overrides(fields: set[str], dose_range: tuple[float, float]):
    """TrainConfig overrides for dose (noise) augmentation."""
    if "dose_augment_e_per_A2" not in fields:
        return None, "TrainConfig has no dose_augment_e_per_A2 field"
    return {"dose_augment_e_per_A2": dose_range}, None


def simulate(sim: dict, n_structures: int, seed: int, px: float, size: int, workers: int):
    """The package's abTEM data for a recipe: one config per material, merged."""
    from napari_hrtem_transfer.io.dataset import HRTEMDataset
    from napari_hrtem_transfer.simulate import SimulationConfig, simulate_dataset

    sim = dict(sim)
    mats = sim.pop("materials")
    per = max(1, n_structures // len(mats))
    parts = []
    for k, mat in enumerate(mats):
        cfg = SimulationConfig.from_preset(
            "laptop",
            material=mat,
            n_structures=per,
            image_size_px=size,
            sampling_A=px,
            sim_sampling_A=px,
            n_phonons=1,
            defocus_nm=DEFOCI_NM,
            seed=seed + 101 * k,
            **sim,
        )
        parts.append(simulate_dataset(cfg, workers=workers))
    dtype = np.result_type(*[p.images.dtype for p in parts])  # counts stay integer counts
    images = np.concatenate([np.asarray(p.images).astype(dtype) for p in parts], axis=1)
    return HRTEMDataset(
        images=images,
        defocus_nm=parts[0].defocus_nm,
        sampling_A=px,
        masks=np.concatenate([p.masks for p in parts]),
        structure_ids=np.concatenate([p.structure_ids for p in parts]),
        materials=np.concatenate([p.materials for p in parts]),
        actual_defocus_nm=np.concatenate([p.actual_defocus_nm for p in parts], axis=1),
        dose_e_per_A2=parts[0].dose_e_per_A2,
        info={"merged_from": [p.info for p in parts]},
    )


def check_sets(px: float, n_per_material: int, seed: int) -> dict:
    """The independent check at the model's pixel size: 400 and 80 e/Å²."""
    from napari_hrtem_transfer.evaluation.independent import (
        IndependentConfig,
        independent_dataset,
        with_dose,
    )

    cfg = IndependentConfig(
        n_per_material=n_per_material,
        diameter_nm=(2.0, 6.0),
        sampling_A=px,
        image_size_px=32 * round(100.0 / px / 32),
        dose_e_per_A2=None,
        seed=seed,
    )
    clean = independent_dataset(cfg)
    return {400.0: with_dose(clean, 400.0, seed), 80.0: with_dose(clean, 80.0, seed)}


def train_and_score(data, train_over: dict, seed: int, args, out: Path, checks: dict) -> dict:
    from napari_hrtem_transfer.evaluation.independent import score_frames
    from napari_hrtem_transfer.models.config import CompactUNetConfig
    from napari_hrtem_transfer.training import TrainConfig, load_checkpoint, train

    tc = TrainConfig(
        model=CompactUNetConfig(channels=(8, 16, 32, 48), bottleneck_dilations=(2,)),
        epochs=args.epochs,
        batch_size=8,
        patch_size=96,
        samples_per_epoch=args.samples_per_epoch,
        lr=3e-3,
        lr_decay=0.9,
        seed=seed,
        val_fraction=0.15,
        max_val_images=2,
        num_threads=1,
        **train_over,
    )
    t0 = time.perf_counter()
    train(tc, data, out)
    t_train = time.perf_counter() - t0
    lm = load_checkpoint(out, "best", device="cpu")
    res = {"train_s": t_train}
    for dose, ds in checks.items():
        rows = score_frames(lm, ds)
        by_df = {}
        for r in rows:
            by_df.setdefault(r["defocus_nm"], []).append(r["dice"])
        res[f"dice_{dose:g}"] = float(np.mean([r["dice"] for r in rows]))
        res[f"min_defocus_dice_{dose:g}"] = float(min(np.mean(v) for v in by_df.values()))
    return res


def _cell(row: dict, key: str) -> str:
    v = np.array([s[key] for s in row["seeds"]])
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} (n={len(v)})"


def _table(results: list[dict]) -> str:
    head = "| variant | piece added | Dice @400 (all defoci) | worst defocus @400 | Dice @80 |"
    lines = [head, "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['added']} | {_cell(r, 'dice_400')} | "
            f"{_cell(r, 'min_defocus_dice_400')} | {_cell(r, 'dice_80')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--px", type=float, default=0.4, help="pixel size of data and model [Å/px]")
    ap.add_argument("--size", type=int, default=160, help="training frame side [px]")
    ap.add_argument("--n-structures", type=int, default=16, help="training structures/variant")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples-per-epoch", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--check-per-material", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="simulation processes")
    ap.add_argument("--only", nargs="*", help="stop after these variants (names)")
    ap.add_argument(
        "--mode",
        choices=("cumulative", "single"),
        default="cumulative",
        help="cumulative: each row adds a piece to the row above; single: each piece alone "
        "on the baseline",
    )
    ap.add_argument("--pieces", nargs="*", help="only these pieces (names; single mode)")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    from napari_hrtem_transfer.simulate import SimulationConfig
    from napari_hrtem_transfer.simulate.config import PRESETS
    from napari_hrtem_transfer.training import TrainConfig

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    checks = check_sets(args.px, args.check_per_material, seed=1234)
    print(f"independent check: {checks[400.0].n_images} structures x 11 defoci", flush=True)
    preset = PRESETS.get("real_sessions", {})
    plan = pieces(
        set(SimulationConfig.model_fields),
        set(TrainConfig.model_fields),
        preset,
        args.size * args.px,
    )
    sim, train_over = dict(BASELINE_SIM), {}
    variants = [("baseline", "", dict(sim), {})]
    skipped = []
    for p in plan:
        if "missing" in p:
            skipped.append(f"{p['name']}: {p['missing']}")
            continue
        if args.pieces and p["name"] not in args.pieces:
            continue
        if args.mode == "single":
            variants.append((p["name"], p["name"], {**BASELINE_SIM, **p["sim"]}, dict(p["train"])))
            continue
        sim.update(p["sim"])
        train_over.update(p["train"])
        variants.append((p["name"], p["name"], dict(sim), dict(train_over)))
    results, data_cache = [], {}
    for name, added, vsim, vtrain in variants:
        key = json.dumps(vsim, sort_keys=True, default=str)
        t0 = time.perf_counter()
        if key not in data_cache:
            data_cache = {
                key: simulate(vsim, args.n_structures, 7, args.px, args.size, args.workers)
            }
        t_sim = time.perf_counter() - t0
        row = {"name": name, "added": added or "–", "sim": vsim, "train": vtrain, "seeds": []}
        for seed in args.seeds:
            folder = args.out / f"{name.replace(' ', '_').replace('+', '_')}_s{seed}"
            r = train_and_score(data_cache[key], vtrain, seed, args, folder, checks)
            row["seeds"].append({"seed": seed, **r})
        row["sim_s"] = t_sim
        results.append(row)
        print(
            f"{name}: sim {t_sim:.0f} s, "
            + ", ".join(
                f"seed {s['seed']} Dice@400 {s['dice_400']:.3f} @80 {s['dice_80']:.3f}"
                f" ({s['train_s']:.0f} s)"
                for s in row["seeds"]
            ),
            flush=True,
        )
        (args.out / "ablation.json").write_text(json.dumps(results, default=str, indent=1))
        if args.only and name in args.only:
            break
    table = _table(results)
    print("\n" + table)
    for s in skipped:
        print(f"left out (not landed): {s}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    (args.out / "ablation.md").write_text(
        table + "\n\n" + "\n".join(f"left out: {s}" for s in skipped) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
