"""Score models on the independent check (another simulator, another mask definition).

The frames come from :mod:`napari_hrtem_transfer.evaluation.independent` (phase object of a
Kirkland projected potential, own CTF, detector-pixel binning, Poisson dose; masks = union
of atom disks): CdSe, Au, Ag, Pt particles of 2-10 nm on 2-8 nm amorphous carbon, the
study's 11 defoci (-25..+25 nm, abTEM sign), at several doses (the same structures; a noise
draw per dose).  Prints Dice per defocus at the first dose and at every dose, then the
model-card breakdown (material, dose, size) with bootstrap 95 % intervals over frames.

Goal for a shipped model: Dice >= 0.92 at every training defocus, >= 0.85 at 80 e/Å².

    .venv/bin/python benchmarks/bench_independent_check.py                 # shipped model
    .venv/bin/python benchmarks/bench_independent_check.py --model runs/new --model pretrained
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from napari_hrtem_transfer.evaluation.breakdown import breakdown, breakdown_markdown
from napari_hrtem_transfer.evaluation.independent import (
    IndependentConfig,
    independent_dataset,
    score_frames,
    with_dose,
)


def per_defocus_table(
    rows: list[dict], models: list[str], doses: list[float], key: str = "dice"
) -> str:
    """Markdown: mean ``key`` per defocus (rows) for each model x dose (columns)."""
    defoci = sorted({r["defocus_nm"] for r in rows})
    head = ["defocus [nm]"] + [f"{m} @ {d:g} e/Å²" for m in models for d in doses]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for df in defoci + ["all"]:
        cells = [f"{df:g}" if df != "all" else "all"]
        for m in models:
            for d in doses:
                v = [
                    r[key]
                    for r in rows
                    if r["model_id"] == m
                    and r["dose_e_per_A2"] == d
                    and (df == "all" or r["defocus_nm"] == df)
                ]
                cells.append(f"{np.mean(v):.3f}" if v else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="'pretrained' or a model folder")
    ap.add_argument("--n-per-material", type=int, default=8)
    ap.add_argument("--materials", nargs="+", default=["CdSe", "Au", "Ag", "Pt"])
    ap.add_argument("--doses", type=float, nargs="+", default=[400.0, 80.0])
    ap.add_argument("--sampling", type=float, default=0.2, help="pixel size [Å/px]")
    ap.add_argument("--size", type=int, default=640, help="frame side [px]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for rows.json, tables.md")
    ap.add_argument("--save-hspy", action="store_true", help="also write the .hspy sets")
    ap.add_argument(
        "--mask-margins-A",
        type=float,
        nargs="*",
        default=[],
        help="also score against masks grown by these margins [Å] (mask-definition sensitivity)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch/BLAS threads (1 is fastest on a busy box)"
    )
    args = ap.parse_args(argv)
    models = args.model or ["pretrained"]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    from napari_hrtem_transfer.segmentation import resolve_model

    cfg = IndependentConfig(
        materials=tuple(args.materials),
        n_per_material=args.n_per_material,
        sampling_A=args.sampling,
        image_size_px=args.size,
        dose_e_per_A2=None,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    clean = independent_dataset(cfg)
    t_sim = time.perf_counter() - t0
    print(
        f"simulated {clean.n_images} structures x {clean.n_defocus} defoci in {t_sim:.0f} s",
        flush=True,
    )
    rows: list[dict] = []
    t_score = 0.0
    for dose in args.doses:
        ds = with_dose(clean, dose, seed=args.seed)
        if args.save_hspy and args.out:
            from napari_hrtem_transfer.io.dataset import save_dataset

            args.out.mkdir(parents=True, exist_ok=True)
            save_dataset(ds, args.out / f"independent_{dose:g}e.hspy")
        for m in models:
            lm = resolve_model(m, device="cpu")
            t1 = time.perf_counter()
            for r in score_frames(lm, ds, mask_margins_A=tuple(args.mask_margins_A)):
                rows.append({**r, "model_id": m})
            t_score += time.perf_counter() - t1
            print(f"scored {m} at {dose:g} e/Å² ({time.perf_counter() - t1:.0f} s)", flush=True)
    print(f"scored in {t_score:.0f} s\n")
    table = per_defocus_table(rows, models, args.doses)
    card = breakdown_markdown(breakdown(rows))
    print(table, "\n")
    for mm in args.mask_margins_A:
        key = f"dice_mask+{mm:g}A"
        print(f"Dice against the masks grown by {mm:g} Å:")
        print(per_defocus_table(rows, models, args.doses, key), "\n")
    print(card)
    area = {
        (m, d): float(
            np.median(
                [r["area_ratio"] for r in rows if r["model_id"] == m and r["dose_e_per_A2"] == d]
            )
        )
        for m in models
        for d in args.doses
    }
    for (m, d), a in area.items():
        print(f"median predicted/true area {m} @ {d:g} e/Å²: {a:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows))
        (args.out / "tables.md").write_text(table + "\n\n" + card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
