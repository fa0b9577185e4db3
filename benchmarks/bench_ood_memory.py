"""Peak memory and time of the OOD pass on one large frame (issue 7), tiled.

Runs in a fresh process per case and reports the peak resident set size (``ru_maxrss``)::

    OMP_NUM_THREADS=2 python benchmarks/bench_ood_memory.py --size 8192 --with-proba
    python benchmarks/bench_ood_memory.py --size 2048            # prediction in the OOD pass

``--with-proba`` passes a probability map (as the segmentation core does), so only the
encoder runs; without it the OOD pass predicts too.  The model is an untrained default
compact U-Net (memory and time do not depend on the weights).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--with-proba", action="store_true")
    p.add_argument("--tile", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features, ood_scores
    from napari_hrtem_transfer.models import build_model

    torch.manual_seed(0)
    model = build_model("compact").eval()
    rng = np.random.default_rng(0)
    frame = rng.poisson(40.0, size=(args.size, args.size)).astype(np.float32)
    proba = None
    if args.with_proba:
        proba = np.full(frame.shape, 0.2, np.float32)
    d = 2 * sum(model.encoder.out_channels)
    ref = fit_reference_from_features(rng.normal(size=(16, d)), np.full(16, 0.1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    s = ood_scores(model, frame, ref, proba=proba, tile_px=args.tile)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    arrays = (frame.nbytes + (proba.nbytes if proba is not None else 0)) / 2**30
    print(
        f"{args.size}^2 frame, proba given: {args.with_proba}: score {s.score[0]:.3f}, "
        f"{dt:.1f} s, peak RSS {peak:.2f} GB (before the pass {base:.2f} GB, "
        f"frame+proba arrays {arrays:.2f} GB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
