"""Benchmark the whole segmentation job against the machine's matmul peak (run by hand).

    python benchmarks/bench_inference.py [--model pretrained] [--model OTHER ...]
                                         [--sizes 2048 4096 8192] [--sampling 0.33]

For each model and frame size (a Poisson frame with dark discs, at ``--sampling`` Å/px) and
with and without the label-free OOD pass, one child process per case runs
``segment(frame, model, sampling_A=...)`` and reports its wall time and peak resident memory
(``ru_maxrss``: numpy, torch and the allocator, not only Python objects).  In the same run it
measures the fp32 and the bf16 peak of a 2048 x 2048 torch matmul [GFLOP/s], and counts the
model's convolution FLOPs per input pixel, so that it can print

* time x fp32 peak [TFLOP]: what the job costs in units of this machine's speed;
* the fraction of the peak the whole job reaches: FLOPs of the network on the pixels it saw
  (the frame at the model's pixel size) / (wall time x peak of the precision used).

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, numpy as np
from napari_hrtem_transfer.inference import load_model
from napari_hrtem_transfer.segmentation import segment
model, size, samp, ood = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
lm = load_model(model)
rng = np.random.default_rng(0)
frame = np.empty((size, size), np.float32)
yy, xx = np.mgrid[:256, :size]
for r in range(0, size, 256):  # no full-size temporaries: the baseline is the frame's
    disc = (((yy + r) % 211 - 105) ** 2 + (xx % 199 - 99) ** 2) < 40 ** 2
    frame[r : r + 256] = rng.poisson(200.0 * (1.0 - 0.3 * disc))[: size - r]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
res = segment(frame, lm, sampling_A=samp, ood=ood, probabilities=True)
wall = time.perf_counter() - t0
print(json.dumps({"s": wall, "peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_MiB": base, "zoom": res.resampled or 1.0,
                  "ood": res.ood_score is not None, "model_sampling_A": lm.sampling_A}))
"""


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n`` x ``n`` torch matmul."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def flops_per_px(model: str) -> tuple[float, str]:
    """Convolution FLOPs per input pixel of ``model`` (multiply-add = 2), and its precision."""
    import torch

    from napari_hrtem_transfer.inference import load_model
    from napari_hrtem_transfer.training.device import resolve_precision

    lm = load_model(model, device="cpu")
    total = [0]

    def hook(m, _inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total[0] += 2 * k * m.out_channels * out.shape[0] * out.shape[-2] * out.shape[-1]

    hooks = [
        m.register_forward_hook(hook) for m in lm.model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    side = 32 * int(lm.output_stride)
    with torch.inference_mode():
        lm.model.eval()(torch.zeros(1, 1, side, side))
    for h in hooks:
        h.remove()
    return total[0] / side**2, resolve_precision("auto", lm.device)


def run_case(model: str, size: int, sampling: float, ood: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(size), str(sampling), "1" if ood else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model spec (repeatable)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--sampling", type=float, default=0.33, help="frame pixel size [Å/px]")
    p.add_argument("--no-ood-only", action="store_true", help="skip the runs with OOD")
    args = p.parse_args()
    models = args.model or ["pretrained"]
    peaks = {k: matmul_peak(k) for k in ("fp32", "bf16")}
    print(
        f"matmul 2048^2 peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
        "GFLOP/s (measured in this run)\n"
    )
    print(
        "| model | frame | OOD | px seen | wall [s] | peak RSS [MiB] | time x fp32 peak "
        "[TFLOP] | network GFLOP | fraction of peak | time x peak [s GiB] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        fpp, prec = flops_per_px(model)
        for size in args.sizes:
            for ood in [False] if args.no_ood_only else [False, True]:
                r = run_case(model, size, args.sampling, ood)
                seen = (size * r["zoom"]) ** 2
                flop = fpp * seen
                frac = flop / (r["s"] * peaks[prec] * 1e9)
                print(
                    f"| {model} ({fpp / 1e3:.1f} kFLOP/px, {prec}) | {size}² | "
                    f"{'yes' if ood else 'no'} | {seen / 1e6:.1f} Mpx | {r['s']:.1f} | "
                    f"{r['peak_MiB']:.0f} | {r['s'] * peaks['fp32'] / 1e3:.2f} | "
                    f"{flop / 1e9:.0f} | {frac:.0%} | "
                    f"{r['s'] * r['peak_MiB'] / 1024:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
