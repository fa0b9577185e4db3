"""Choose the label-free OOD score by measurement (issue 4).

Simulates (or reads) an 11-defocus series (-25 ... +25 nm), pretrains a U-Net on one defocus,
fits the OOD reference on that domain's training images, and reports the Spearman rank
correlation between each candidate label-free score and the true loss, per domain (the
median score of a domain's held-out frames vs. its mean loss) and per frame.

Usage::

    python benchmarks/bench_ood.py --data series.hspy --train-defocus 10 --epochs 8 \
        --out bench_ood_out
    python benchmarks/bench_ood.py --n-structures 64   # simulate a series first (minutes)

Prints a table and writes ``<out>/bench_ood.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFOCI = [-25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get average ranks)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok])[0])


def radial_spectrum(images: np.ndarray, n_bins: int = 24) -> np.ndarray:
    """Log radial power spectrum of standardised images (N, H, W) -> (N, n_bins)."""
    from napari_hrtem_transfer.models import standardize

    x = standardize(images)
    f = np.abs(np.fft.fft2(x)) ** 2
    ky = np.fft.fftfreq(x.shape[-2])[:, None]
    kx = np.fft.fftfreq(x.shape[-1])[None, :]
    b = np.minimum((np.sqrt(ky**2 + kx**2) / 0.5 * n_bins).astype(int), n_bins).ravel()
    cnt = np.bincount(b, minlength=n_bins + 1)[:n_bins]
    return np.stack(
        [
            np.log(np.bincount(b, weights=fi.ravel(), minlength=n_bins + 1)[:n_bins] / cnt + 1e-12)
            for fi in f
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, help="an 11-defocus .hspy series (default: simulate one)")
    p.add_argument("--n-structures", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="image size when simulating [px]")
    p.add_argument("--train-defocus", type=float, nargs="+", default=[10.0], help="[nm]")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=256)
    p.add_argument("--channels", type=int, nargs=4, default=[16, 32, 64, 96])
    p.add_argument("--out", type=Path, default=Path("bench_ood_out"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from napari_hrtem_transfer.evaluation import evaluate_model
    from napari_hrtem_transfer.evaluation._model import ScoringModel
    from napari_hrtem_transfer.evaluation.metrics import predictive_entropy
    from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features
    from napari_hrtem_transfer.io import load_dataset, save_dataset
    from napari_hrtem_transfer.training import TrainConfig, load_checkpoint, train
    from napari_hrtem_transfer.training.data import d4 as _d4

    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
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
    ds = load_dataset(args.data, lazy=False)
    results = {}
    for d_train in args.train_defocus:
        mdir = args.out / f"pre_{d_train:g}nm"
        if not (mdir / "best.json").is_file():
            tc = TrainConfig(
                train_defocus_nm=[d_train],
                eval_defocus_nm=[d_train],
                epochs=args.epochs,
                batch_size=8,
                lr=2e-3,
                patch_size=None,
                samples_per_epoch=args.samples_per_epoch,
                model={"architecture": "compact", "channels": tuple(args.channels)},
                seed=args.seed,
                num_threads=2,
            )
            t = time.time()
            train(tc, ds, mdir)
            print(f"pretrained at {d_train:g} nm in {time.time() - t:.0f} s")
        lm = load_checkpoint(mdir, device="cpu")
        sm = ScoringModel(lm)
        sids = np.asarray(ds.structure_ids).astype(str)
        tr = np.flatnonzero(np.isin(sids, lm.info["data"]["train_structures"]))
        va = np.flatnonzero(np.isin(sids, lm.info["data"]["val_structures"]))
        di = ds.defocus_index(d_train)
        xtr = np.concatenate([_d4(np.asarray(ds.images[di][tr]), k) for k in range(8)])
        z, ftr = sm.run(xtr)
        etr = predictive_entropy(1 / (1 + np.exp(-z.astype(float))))
        ptr = radial_spectrum(xtr)
        # the per-domain, per-frame loss of held-out frames (the labelled truth)
        res = evaluate_model(lm, ds, ood_reference=None, n_boot=200)
        fr = res.frames
        sizes = (
            [2 * c for c in lm.model.encoder.out_channels]
            if hasattr(lm.model.encoder, "out_channels")
            else None
        )
        per_domain = []
        feats, ents, specs = [], [], []
        for k in range(ds.n_defocus):
            x = np.asarray(ds.images[k][va])
            zz, ff = sm.run(x)
            feats.append(ff)
            ents.append(predictive_entropy(1 / (1 + np.exp(-zz.astype(float)))))
            specs.append(radial_spectrum(x))
        loss = np.stack([fr.where(domain_defocus_nm=d)["loss"] for d in ds.defocus_nm])
        cuts = np.cumsum([0, *sizes]) if sizes else None

        def stage_cols(f, which, cuts=cuts):
            if which == "all" or cuts is None:
                return f
            if which == "deepest":
                return f[:, cuts[-2] : cuts[-1]]
            if which == "shallow":
                return f[:, : cuts[2]]
            if which.startswith("stage"):
                k = int(which[5:])
                return f[:, cuts[k] : cuts[k + 1]]
            if which == "first3":
                return f[:, : cuts[3]]
            raise ValueError(which)

        variants = {}
        for stages in ("all", "deepest", "shallow", "stage0", "stage1", "first3"):
            for method in ("diag", "mahalanobis"):
                for w in (0.0, 0.5):
                    ref = fit_reference_from_features(stage_cols(ftr, stages), etr, method, w)
                    s = np.stack(
                        [
                            ref.score(stage_cols(feats[k], stages), ents[k])
                            for k in range(ds.n_defocus)
                        ]
                    )
                    variants[f"features[{stages}] {method} entropy_w={w}"] = s
        e_all = np.stack(ents) / np.median(etr) - 1
        for stages in ("all", "first3"):
            ref = fit_reference_from_features(stage_cols(ftr, stages), None, "diag", 0.0)
            fs = np.stack([ref.score(stage_cols(feats[k], stages)) for k in range(ds.n_defocus)])
            for w in (0.5, 1.0):
                variants[f"features[{stages}] diag + {w}*max(entropy,0)"] = fs + w * np.maximum(
                    e_all, 0
                )
        ref = fit_reference_from_features(ptr, None, "diag", 0.0)
        variants["spectrum diag"] = np.stack([ref.score(specs[k]) for k in range(ds.n_defocus)])
        ref = fit_reference_from_features(np.concatenate([ptr, ftr], 1), None, "diag", 0.0)
        variants["spectrum+features[all] diag"] = np.stack(
            [ref.score(np.concatenate([specs[k], feats[k]], 1)) for k in range(ds.n_defocus)]
        )
        e = np.stack(ents)
        variants["entropy only"] = e / np.median(etr) - 1
        # the shipped default, through the public API
        from napari_hrtem_transfer.evaluation import fit_ood_reference

        api_ref = fit_ood_reference(lm, np.asarray(ds.images[di][tr]), save=False)
        api = evaluate_model(lm, ds, ood_reference=api_ref, n_boot=200).frames
        variants["DEFAULT (fit_ood_reference + evaluate_model)"] = np.stack(
            [api.where(domain_defocus_nm=d)["ood_score"] for d in ds.defocus_nm]
        )
        print(
            f"\npretrained at {d_train:g} nm; loss per domain:",
            dict(zip(ds.defocus_nm.tolist(), loss.mean(1).round(4).tolist(), strict=True)),
        )
        print(f"{'score':45s} {'rho domain':>10s} {'rho frame':>10s}  median score per domain")
        for name, s in variants.items():
            rd = spearman(np.median(s, 1), loss.mean(1))
            rf = spearman(s.ravel(), loss.ravel())
            per_domain.append(
                {
                    "score": name,
                    "spearman_domain": rd,
                    "spearman_frame": rf,
                    "median_score": np.median(s, 1).round(3).tolist(),
                }
            )
            print(f"{name:45s} {rd:10.2f} {rf:10.2f}  {np.median(s, 1).round(2).tolist()}")
        results[f"{d_train:g}"] = {
            "loss_per_domain": loss.mean(1).tolist(),
            "variants": per_domain,
            "defocus_nm": ds.defocus_nm.tolist(),
            "n_val": int(va.size),
        }
    (args.out / "bench_ood.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out / 'bench_ood.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
