"""Choose the label-free OOD score by measurement (issues 4, 12, 13): the whole run.

Simulates (unless ``--data`` is given) the laptop-preset 11-defocus series of the original
setting (-25 ... +25 nm, 128 px at 0.2 Å/px, radius 0.4-0.75 nm, 1-2 particles), then runs
``benchmarks/ood_candidates.py``: pretrains one U-Net per ``--train-defocus``, stores the
per-frame quantities, and prints the table of every candidate score (Spearman rank
correlation with the true loss per domain and per frame, cost per frame), the fit-sample cap
study and the half-grid combinations::

    python benchmarks/bench_ood.py --out /tmp/ood_bench/laptop --train-defocus -10 0 10
    python benchmarks/bench_ood.py --data study.hspy --out /tmp/ood_bench/study \
        --train-defocus -10 0 10 --patch-size 256 --tta-per-domain 3

Several ``--out`` folders can be tabulated together with
``python benchmarks/ood_candidates.py table DIR1/pre_* DIR2/pre_* --out table.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFOCI = [-25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, help="an 11-defocus .hspy series (default: simulate)")
    p.add_argument("--n-structures", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="image size when simulating [px]")
    p.add_argument("--train-defocus", nargs="+", default=["-10", "0", "10"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=256)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--tta-per-domain", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_ood_out"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    import ood_candidates

    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        from napari_hrtem_transfer.io import save_dataset
        from napari_hrtem_transfer.simulate import SimulationConfig, simulate_dataset

        cfg = SimulationConfig.from_preset(
            "laptop",
            n_structures=args.n_structures,
            defocus_nm=DEFOCI,
            seed=args.seed,
            image_size_px=args.size,
            radius_nm=(0.4, 0.75),
            particles_per_image=(1, 2),
        )
        t = time.time()
        ds = simulate_dataset(cfg, workers=1, progress=True)
        args.data = args.out / "series.hspy"
        save_dataset(ds, args.data)
        print(f"simulated {args.n_structures} structures in {time.time() - t:.0f} s")
    prep = [
        "prepare",
        "--data",
        str(args.data),
        "--train-defocus",
        *args.train_defocus,
        "--epochs",
        str(args.epochs),
        "--samples-per-epoch",
        str(args.samples_per_epoch),
        "--seed",
        str(args.seed),
        "--out",
        str(args.out),
    ]
    if args.patch_size:
        prep += ["--patch-size", str(args.patch_size)]
    if args.tta_per_domain is not None:
        prep += ["--tta-per-domain", str(args.tta_per_domain)]
    rc = ood_candidates.main(prep)
    if rc:
        return rc
    runs = sorted(str(d) for d in args.out.glob("pre_*") if (d / "frames.npz").is_file())
    return ood_candidates.main(["table", *runs, "--out", str(args.out / "table.md")])


if __name__ == "__main__":
    sys.exit(main())
