"""Train the pretrained model shipped in the wheel (``--model pretrained``).

Reproduces ``src/napari_hrtem_transfer/models/pretrained/`` and ``docs/pretrained_model.md``
from scratch on 2 CPU cores (about an hour on a quiet machine)::

    .venv/bin/python scripts/train_pretrained_model.py --work /tmp/pretrained_work

Stages (each is skipped when its output already exists in ``--work``, so an interrupted run
resumes):

1. simulate CdSe and Au defocus series (abTEM, the study's 11 defoci -25 ... +25 nm, 0.2 Å/px,
   256 px, 400 e/Å², Cs 5 µm), one file per material, and merge them into one dataset;
2. pretrain the compact U-Net on the mixture of all defoci (the study's "mixture" baseline);
3. fit the label-free OOD reference on the training images;
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
MATERIALS = ("CdSe", "Au")


def simulation_config(material: str, n_structures: int, seed: int):
    from napari_hrtem_transfer.simulate import SimulationConfig

    return SimulationConfig.from_preset(
        "laptop",
        material=material,
        n_structures=n_structures,
        defocus_nm=DEFOCI_NM,
        defocus_jitter_nm=1.0,
        radius_nm=(0.8, 1.8),
        particles_per_image=(1, 3),
        dose_e_per_A2=400.0,
        seed=seed,
    )


def merge(datasets):
    """Concatenate datasets of identical defoci, size and sampling along the image axis."""
    from napari_hrtem_transfer.io.dataset import HRTEMDataset

    first = datasets[0]
    for ds in datasets[1:]:
        if not np.allclose(ds.defocus_nm, first.defocus_nm) or ds.sampling_A != first.sampling_A:
            raise SystemExit("datasets to merge differ in defoci or sampling")
    images = np.concatenate([np.asarray(ds.images) for ds in datasets], axis=1)
    masks = np.concatenate([np.asarray(ds.masks) for ds in datasets], axis=0)
    ids = np.concatenate(
        [[f"{m}-{s}" for s in ds.structure_ids] for ds, m in zip(datasets, MATERIALS, strict=True)]
    )
    materials = np.concatenate([ds.materials for ds in datasets])
    actual = np.concatenate([ds.actual_defocus_nm for ds in datasets], axis=1)
    info = {"merged_from": [ds.info for ds in datasets]}
    return HRTEMDataset(
        images=images,
        defocus_nm=first.defocus_nm,
        sampling_A=first.sampling_A,
        masks=masks,
        structure_ids=ids,
        materials=materials,
        actual_defocus_nm=actual,
        dose_e_per_A2=first.dose_e_per_A2,
        energy_eV=first.energy_eV,
        info=info,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("pretrained_work"))
    p.add_argument("--n-structures", type=int, default=40, help="per material")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples-per-epoch", type=int, default=384)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stage", choices=("simulate", "train", "all"), default="all")
    p.add_argument("--no-install", action="store_true", help="do not copy into the package")
    args = p.parse_args(argv)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    from napari_hrtem_transfer.io import load_dataset, save_dataset
    from napari_hrtem_transfer.simulate import simulate_to_file

    merged = work / "mixture.hspy"
    if not merged.exists():
        parts = []
        for i, material in enumerate(MATERIALS):
            path = work / f"{material}.hspy"
            if not path.exists():
                log(f"simulating {args.n_structures} {material} structures x 11 defoci")
                cfg = simulation_config(material, args.n_structures, args.seed + i)
                simulate_to_file(cfg, path, workers=args.workers, progress=True)
            parts.append(load_dataset(path, lazy=False))
        save_dataset(merge(parts), merged)
        log(f"merged dataset: {merged}")
    if args.stage == "simulate":
        return 0

    from napari_hrtem_transfer.evaluation import evaluate_model
    from napari_hrtem_transfer.training import TrainConfig, train

    model_dir = work / "model"
    config = TrainConfig.pretrain(
        "all",
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        split_seed=0,
        patch_size=256,
        lr=1e-3,
    )
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
    fit_ood(model_dir, merged, log)
    log("evaluating on held-out structures")
    evaluation = evaluate_model(model_dir, load_dataset(merged, lazy=True))
    records = evaluation.domains.records()
    (work / "evaluation.json").write_text(json.dumps(_jsonable(records), indent=1))
    if not args.no_install:
        install(model_dir)
    write_card(config, merged, model_dir, records, args, time.perf_counter() - t0)
    log(f"model card: {CARD}")
    return 0


def fit_ood(model_dir: Path, data: Path, log) -> None:
    from napari_hrtem_transfer.evaluation import ood

    log("fitting the OOD reference")
    fit = getattr(ood, "fit_ood_after_training", None)
    if fit is not None:
        res = fit(model_dir, data)
        if not res.ok:
            raise SystemExit(f"OOD fit failed: {res.error}")
    else:
        ood.fit_ood_reference_for_checkpoint(model_dir, data)


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


def write_card(config, data: Path, model_dir: Path, records, args, seconds: float) -> None:
    """Write the measured per-defocus table into the model card (between the markers)."""
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
    text = CARD.read_text() if CARD.exists() else ""
    marker = "<!-- measured -->"
    table = "\n".join(
        [
            marker,
            f"Measured by `python scripts/train_pretrained_model.py --n-structures "
            f"{args.n_structures} --epochs {args.epochs} --samples-per-epoch "
            f"{args.samples_per_epoch} --seed {args.seed}` (training {train_min:.0f} min on a "
            f"shared, heavily loaded 2-core CPU machine; this call {seconds / 60:.0f} min). "
            f"Best epoch {int(sidecar.get('best_epoch', 0)) + 1} of {len(hist)}, validation "
            f"loss (BCE, all defoci) {float(sidecar.get('best_val_loss', float('nan'))):.4f}. "
            f"OOD reference: {ood.get('n_images') or ood.get('info', {}).get('n_samples')} "
            f"image-transforms, caution level {ood.get('caution_level')}.",
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
    CARD.parent.mkdir(parents=True, exist_ok=True)
    CARD.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
