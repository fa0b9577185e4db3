"""Which native pixel size should the shipped model have?  Accuracy and cost per candidate.

Run (nice; the default run is sized for ~15 min on 2 cores)::

    nice -n 10 python benchmarks/bench_native_pixel_size.py
    nice -n 10 python benchmarks/bench_native_pixel_size.py --quick      # smoke test, ~3 min
    nice -n 10 python benchmarks/bench_native_pixel_size.py --seeds 0 1 --json out.json

One noise-free set is simulated at a fine pixel size (0.1 Å/px, abTEM through
``simulate_dataset``).  For each candidate native pixel size (default 0.2, 0.27, 0.33,
0.4 Å/px) the frames are resampled to it (``io.frames.zoom``, the resampling of inference),
Poisson noise at ``--dose`` is applied at that pixel size, and a compact U-Net is trained for
``--epochs``.  Held-out structures are then imaged at test pixel sizes 0.2-0.6 Å/px
(resampled from the fine frames, noise at the test pixel size), resampled to the candidate's
native size as ``segment`` does, segmented, resampled back and scored (Dice against the mask
at the test pixel size).  Cost: the forward time of one 1024^2 tile, scaled by the pixel
count a 4096^2 frame at 0.33 Å/px has once resampled to the native size (an estimate: the
2-core machine cannot afford the full frame per candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def simulate_fine(n_structures: int, size_px: int, seed: int):
    """Noise-free frames (n_def, n, size, size) at 0.1 Å/px and their masks."""
    from napari_hrtem_transfer.simulate.config import SimulationConfig
    from napari_hrtem_transfer.simulate.series import simulate_dataset

    cfg = SimulationConfig(
        n_structures=n_structures,
        image_size_px=size_px,
        sampling_A=0.1,
        sim_sampling_A=0.05,
        dose_e_per_A2=None,
        defocus_nm=[-10.0, 0.0, 10.0],
        seed=seed,
    )
    return simulate_dataset(cfg)


def at_pixel_size(intensity, masks, fine_A, target_A, dose, rng):
    """Resample noise-free frames and masks from ``fine_A`` to ``target_A`` [Å/px]; add noise."""
    from napari_hrtem_transfer.io.frames import zoom
    from napari_hrtem_transfer.training.data import renoise

    f = fine_A / target_A
    imgs = np.stack([[zoom(im, f) for im in dom] for dom in intensity])
    msk = np.stack([zoom(m.astype(np.float32), f) >= 0.5 for m in masks])
    noisy = renoise(imgs, None, dose, target_A, rng)
    return noisy, msk


def train_candidate(native_A, ds_fine, train_idx, args, seed, out):
    from napari_hrtem_transfer.io.dataset import HRTEMDataset
    from napari_hrtem_transfer.training import TrainConfig, load_checkpoint, train

    rng = np.random.default_rng([seed, 1])
    imgs, msk = at_pixel_size(
        np.asarray(ds_fine.images)[:, train_idx],
        np.asarray(ds_fine.masks)[train_idx],
        ds_fine.sampling_A,
        native_A,
        args.dose,
        rng,
    )
    ds = HRTEMDataset(
        images=imgs,
        defocus_nm=list(ds_fine.defocus_nm),
        sampling_A=native_A,
        masks=msk,
        structure_ids=[str(ds_fine.structure_ids[i]) for i in train_idx],
        dose_e_per_A2=args.dose,
    )
    side = min(imgs.shape[-2:]) // 32 * 32
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=8,
        patch_size=min(side, 256),
        samples_per_epoch=args.samples,
        seed=seed,
        val_fraction=0.2,
        num_threads=os.cpu_count(),
        device="cpu",
    )
    t = time.perf_counter()
    train(cfg, ds, out)
    return load_checkpoint(out, device="cpu"), time.perf_counter() - t


def score(lm, native_A, ds_fine, test_idx, test_A, dose, seed):
    """Mean Dice over held-out frames imaged at ``test_A``, segmented at ``native_A``."""
    from napari_hrtem_transfer.evaluation.metrics import dice
    from napari_hrtem_transfer.io.frames import zoom

    rng = np.random.default_rng([seed, 2, round(test_A * 1000)])
    imgs, msk = at_pixel_size(
        np.asarray(ds_fine.images)[:, test_idx],
        np.asarray(ds_fine.masks)[test_idx],
        ds_fine.sampling_A,
        test_A,
        dose,
        rng,
    )
    out = []
    for dom in imgs:
        for im, m in zip(dom, msk, strict=True):
            x = zoom(im, test_A / native_A)
            p = lm.predict_proba(x[None])[0]
            back = zoom(p, 1.0, m.shape)
            out.append(float(dice(back >= 0.5, m)))
    return float(np.mean(out))


def cost_4096(lm, native_A, reps=2):
    """Estimated seconds of a 4096^2 frame at 0.33 Å/px at this native size."""
    x = np.random.default_rng(0).poisson(50, (1, 1024, 1024)).astype(np.float32)
    lm.predict_proba(x)
    best = min(_timed(lambda: lm.predict_proba(x)) for _ in range(reps))
    side = 4096 * 0.33 / native_A
    return best * side**2 / 1024**2, side


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", type=float, nargs="+", default=[0.2, 0.27, 0.33, 0.4])
    ap.add_argument("--test", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--structures", type=int, default=16)
    ap.add_argument("--size", type=int, default=768, help="fine frame side [px] at 0.1 Å/px")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--dose", type=float, default=400.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default="/tmp/bench_native_px")
    args = ap.parse_args()
    if args.quick:
        args.structures, args.size, args.epochs, args.samples = 6, 512, 1, 16
        args.native, args.test = [0.2, 0.4], [0.2, 0.6]
    t0 = time.perf_counter()
    ds = simulate_fine(args.structures, args.size, seed=0)
    print(f"simulated {args.structures} structures in {time.perf_counter() - t0:.0f} s")
    n_test = max(2, args.structures // 4)
    test_idx = np.arange(args.structures - n_test, args.structures)
    train_idx = np.arange(args.structures - n_test)
    rows = []
    for native in args.native:
        for seed in args.seeds:
            out = os.path.join(args.work, f"n{native:g}_s{seed}")
            lm, t_train = train_candidate(native, ds, train_idx, args, seed, out)
            d = {t: score(lm, native, ds, test_idx, t, args.dose, seed) for t in args.test}
            sec, side = cost_4096(lm, native)
            rows.append(
                {
                    "native_A": native,
                    "seed": seed,
                    "train_s": t_train,
                    "dice": d,
                    "est_4096_at_0.33_s": sec,
                    "resampled_side_px": side,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\nnative [Å/px] | seed | "
        + " | ".join(f"Dice@{t:g}" for t in args.test)
        + " | est. 4096² @0.33 s | side px"
    )
    for r in rows:
        print(
            f"{r['native_A']:g} | {r['seed']} | "
            + " | ".join(f"{r['dice'][t]:.3f}" for t in args.test)
            + f" | {r['est_4096_at_0.33_s']:.1f} | {r['resampled_side_px']:.0f}"
        )
    print(f"total {time.perf_counter() - t0:.0f} s; load {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
