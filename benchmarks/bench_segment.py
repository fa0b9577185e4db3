"""Benchmark the segmentation core and fine-tuning on annotated frames (run by hand).

    python benchmarks/bench_segment.py [--model pretrained] [--peak-sizes 8192 16384]
                                       [--skip-8192] [--skip-finetune]

Reports, on this machine, in one run (so the numbers compare with each other):

1. a 2048 x 2048 frame: ``segment`` with the label-free OOD score vs. without it, and the bare
   ``predict_proba`` of the loaded model as the baseline (min of ``--repeats``);
2. the peak resident memory of segmenting one frame of each ``--peak-sizes`` (default 8192 x
   8192; target: at most 2 GiB there) with OOD scores, measured in a child process
   (``ru_maxrss``), next to the peak of the same child after loading the model and allocating
   the frame only (the part that is not the segmentation's), and the wall time;
3. fine-tuning on five annotated 512 x 512 frames for 20 epochs (wall time, and the Dice on
   those frames before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def frames(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark discs in Poisson noise (a stand-in for particles; only the cost matters here)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(max(1, size // 64)):
            cy, cx = rng.uniform(20, size - 20, 2)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(8, 20) ** 2
    return rng.poisson(200.0 * (1 - 0.3 * masks)).astype(np.float32), masks


CHILD = r"""
import json, resource, sys, time, numpy as np
from napari_hrtem_transfer.segmentation import resolve_model, segment
model, size, run = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
lm = resolve_model(model)
rng = np.random.default_rng(0)
frame = np.empty((size, size), np.float32)
for r in range(0, size, 256):  # no full-size int64 temporary: the baseline is the frame's
    frame[r : r + 256] = rng.poisson(200.0, (min(256, size - r), size))
t0 = time.perf_counter()
if run:
    res = segment(frame, lm, sampling_A=lm.sampling_A, probabilities=False)
    ok = res.ood_score is not None
else:
    ok = True
print(json.dumps({"peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ood": ok, "s": time.perf_counter() - t0}))
"""

#: Peak-memory target of one 8192 x 8192 frame with OOD scores [MiB] (issue 18).
TARGET_8192_MIB = 2048


def peak(model: str, size: int, run: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(size), "1" if run else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pretrained")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-8192", action="store_true", help="skip the peak-memory section")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[8192], metavar="PX")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()

    import torch

    from napari_hrtem_transfer.segmentation import resolve_model, segment

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    lm = resolve_model(args.model)
    s = lm.sampling_A
    img, _ = frames(1, 2048)
    t = {"predict_proba": [], "segment, no OOD": [], "segment + OOD": []}
    for _ in range(args.repeats):  # interleaved, min of repeats: the machine is shared
        t0 = time.perf_counter()
        lm.predict_proba(img[0][None], tile_size=1024)
        t["predict_proba"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        segment(img[0], lm, sampling_A=s, ood=False)
        t["segment, no OOD"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = segment(img[0], lm, sampling_A=s)
        t["segment + OOD"].append(time.perf_counter() - t0)
    base = min(t["predict_proba"])
    print("\n2048 x 2048 frame (min of repeats):")
    for k, v in t.items():
        print(f"  {k:18s} {min(v):6.2f} s  ({min(v) / base:4.2f} x predict_proba)")
    print(f"  OOD score of the frame: {r.ood_score}")

    if not args.skip_8192:
        for size in args.peak_sizes:
            a = peak(args.model, size, run=False)
            b = peak(args.model, size, run=True)
            print(f"\n{size} x {size} frame, peak resident memory of a child process:")
            print(f"  model loaded + frame allocated: {a['peak_MiB']:7.0f} MiB")
            print(
                f"  segment with OOD score:         {b['peak_MiB']:7.0f} MiB "
                f"(OOD computed: {b['ood']}; {b['s']:.0f} s)"
            )
            if size == 8192:
                verdict = "met" if b["peak_MiB"] <= TARGET_8192_MIB else "NOT met"
                print(f"  target <= {TARGET_8192_MIB} MiB: {verdict}")

    if not args.skip_finetune:
        import tempfile

        from napari_hrtem_transfer.annotations import finetune_on_annotations

        imgs, masks = frames(5, 512, seed=3)

        def dice(pred):
            inter = (pred.astype(bool) & masks).sum()
            return 2 * inter / max(1, pred.sum() + masks.sum())

        before = dice(segment(imgs, lm, sampling_A=s, ood=False).labels)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = finetune_on_annotations(
                imgs,
                masks,
                out_dir=f"{tmp}/ft",
                model=args.model,
                sampling_A=s,
                epochs=args.epochs,
                device="cpu",
            )
            dt = time.perf_counter() - t0
            after = dice(segment(imgs, res.out_dir, sampling_A=s, ood=False).labels)
        print(
            f"\nfine-tuning on 5 annotated 512 x 512 frames, {args.epochs} epochs "
            f"(64 samples/epoch, {res.train.precision} on {res.train.device}):"
        )
        print(f"  training {res.train.time_s:.0f} s, with the OOD fit {dt:.0f} s in all")
        print(f"  Dice on the annotated frames: {before:.3f} before -> {after:.3f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
