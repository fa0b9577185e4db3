"""Where the package's mask rule puts a particle's edge, against the atoms' projected footprint.

    .venv/bin/python benchmarks/bench_mask_edge.py [--n 12] [--levels 0.02 0.1 0.2 0.3 0.5]

For structures of the shipped model's recipe (``scripts/train_pretrained_model.py``, legacy:
CdSe and Au, radius 0.8-1.8 nm, 256 px at 0.2 Å/px), the ground-truth mask of
:func:`napari_hrtem_transfer.simulate.physics.particle_reference` at several binarisation
levels (``SimulationConfig.mask_binarize_level``) beside the footprint of the same atoms
(:func:`napari_hrtem_transfer.evaluation.independent.footprint_mask`: each atom a disk of its
metallic or covalent radius, the independent check's definition).  Printed per level and
material: median area ratio (mask / footprint), median Dice, and the mean edge offset
[Å] = (mask area - footprint area) / footprint perimeter (positive = the mask is looser).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _perimeter_A(mask: np.ndarray, sampling_A: float) -> float:
    edges = np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    return float(edges) * sampling_A * (np.pi / 4)  # a staircase overcounts a curve by 4/π


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="structures per material")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.02, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)

    from napari_hrtem_transfer.evaluation.independent import footprint_mask
    from napari_hrtem_transfer.evaluation.metrics import dice
    from napari_hrtem_transfer.simulate import SimulationConfig
    from napari_hrtem_transfer.simulate.physics import particle_reference
    from napari_hrtem_transfer.simulate.structures import build_specimen

    rows = []
    for material in ("CdSe", "Au"):
        base = SimulationConfig.from_preset(
            "laptop",
            material=material,
            radius_nm=(0.8, 1.8),
            particles_per_image=(1, 3),
            n_phonons=1,
            calibrate_zero_defocus=False,
            seed=a.seed,
        )
        for i in range(a.n):
            spec = build_specimen(base, np.random.default_rng([a.seed, i]))
            pa = spec.particle_atoms
            n = base.image_size_px
            foot = footprint_mask(
                pa.positions[:, :2], np.array(pa.get_chemical_symbols()), base.sampling_A, (n, n)
            )
            per = _perimeter_A(foot, base.sampling_A)
            for level in a.levels:
                cfg = base.model_copy(update={"mask_binarize_level": level})
                mask, _ = particle_reference(pa, cfg)
                area = (mask.sum() - foot.sum()) * base.sampling_A**2
                rows.append(
                    {
                        "material": material,
                        "structure": i,
                        "level": level,
                        "area_ratio": float(mask.sum() / max(foot.sum(), 1)),
                        "dice": float(dice(mask, foot)),
                        "edge_offset_A": float(area / per) if per else float("nan"),
                    }
                )
    print("| level | material | area ratio (median) | Dice (median) | edge offset [Å] mean ± sd |")
    print("|---|---|---|---|---|")
    for level in a.levels:
        for material in ("CdSe", "Au", "both"):
            r = [
                x
                for x in rows
                if x["level"] == level and (material == "both" or x["material"] == material)
            ]
            off = np.array([x["edge_offset_A"] for x in r])
            print(
                f"| {level:g} | {material} | {np.median([x['area_ratio'] for x in r]):.3f} | "
                f"{np.median([x['dice'] for x in r]):.3f} | {off.mean():+.2f} ± {off.std():.2f} |"
            )
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
