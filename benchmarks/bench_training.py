"""Training and inference throughput of the U-Nets, as achieved FLOP/s against matmul peak.

Run::

    python benchmarks/bench_training.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench_training.py --quick         # fewer steps
    python benchmarks/bench_training.py --json out.json

Reports, for each architecture (``compact``, ``resnet18``), patch size (256, 512) and
precision (fp32, bf16 autocast), the training throughput [images/s] (best of the timed steps;
the median is in the JSON) and the achieved
FLOP/s (forward + backward FLOPs counted by ``torch.utils.flop_counter``) as a fraction of
this machine's fp32 and bf16 matmul peak, measured in the same run.  Then the time to
segment one 2048x2048 frame with the default model.  On a CUDA GPU it also measures the
study's architecture at 512^2.  The load average is printed: other processes on the
machine lower every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from napari_hrtem_transfer.models import build_model
from napari_hrtem_transfer.training.device import autocast, cpu_has_native_bf16
from napari_hrtem_transfer.training.inference import LoadedModel


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096, reps: int = 6) -> float:
    """Best-of achieved FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_flops(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str
) -> float:
    """FLOPs of one forward + backward pass."""
    with FlopCounterMode(display=False) as fc:
        with autocast(x.device, precision):
            out = model(x)
        F.binary_cross_entropy_with_logits(out.float(), y).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bench_train(
    arch: str, size: int, batch: int, precision: str, steps: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    model = build_model(arch).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    flops = train_step_flops(model, x, y, precision)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = model(x)
        F.binary_cross_entropy_with_logits(out.float(), y).backward()
        opt.step()

    for _ in range(2):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    # best-of: other processes on a shared machine only ever make a step slower
    dt = float(np.min(times))
    return {
        "median_step_s": float(np.median(times)),
        "arch": arch,
        "size": size,
        "batch": batch,
        "precision": precision,
        "step_s": dt,
        "images_per_s": batch / dt,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_gflops": flops / dt / 1e9,
    }


def bench_inference(size: int, precision: str, device: torch.device, reps: int = 3) -> dict:
    torch.manual_seed(0)
    model = build_model("compact").to(device).to(memory_format=torch.channels_last).eval()
    lm = LoadedModel(
        model=model,
        info={"normalization": {"method": "per_image_standardize"}, "sampling_A": 0.2},
        path=None,
        which="best",
        device=device,
    )
    img = np.random.default_rng(0).poisson(100, size=(size, size)).astype(np.uint16)
    lm.predict_proba(img, precision=precision)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        lm.predict_proba(img, precision=precision)
        times.append(time.perf_counter() - t)
    return {
        "size": size,
        "precision": precision,
        "seconds": float(np.min(times)),
        "median_seconds": float(np.median(times)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--archs", nargs="+", default=["compact", "resnet18"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    steps = 3 if args.quick else 6
    res: dict = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_bf16": cpu_has_native_bf16(),
        "loadavg_start": os.getloadavg(),
    }
    res["peak_fp32_gflops"] = matmul_peak(torch.float32, cpu) / 1e9
    res["peak_bf16_gflops"] = matmul_peak(torch.bfloat16, cpu) / 1e9
    print(
        f"CPU, {res['threads']} threads, load average {res['loadavg_start'][0]:.1f}: matmul peak "
        f"fp32 {res['peak_fp32_gflops']:.0f} GFLOP/s, bf16 {res['peak_bf16_gflops']:.0f} GFLOP/s"
    )
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            batch = (
                max(1, 16 * 256**2 // size**2)
                if arch == "compact"
                else max(1, 8 * 256**2 // size**2)
            )
            for prec in args.precisions:
                r = bench_train(arch, size, batch, prec, steps, cpu)
                peak = res["peak_bf16_gflops"] if prec == "bf16" else res["peak_fp32_gflops"]
                r["frac_of_bf16_peak"] = r["achieved_gflops"] / res["peak_bf16_gflops"]
                r["frac_of_fp32_peak"] = r["achieved_gflops"] / res["peak_fp32_gflops"]
                r["frac_of_own_peak"] = r["achieved_gflops"] / peak
                rows.append(r)
                print(
                    f"train {arch:8s} {size:4d}^2 batch {batch:2d} {prec}: "
                    f"{r['images_per_s']:7.2f} img/s, "
                    f"{r['gflop_per_image']:.1f} GFLOP/img, {r['achieved_gflops']:.0f} GFLOP/s = "
                    f"{100 * r['frac_of_bf16_peak']:.0f}% of bf16 peak, "
                    f"{100 * r['frac_of_fp32_peak']:.0f}% of fp32 peak",
                    flush=True,
                )
    res["train"] = rows
    res["inference"] = []
    for prec in ("bf16", "fp32") if res["native_bf16"] else ("fp32",):
        r = bench_inference(2048, prec, cpu)
        res["inference"].append(r)
        print(f"inference compact 2048^2 frame ({prec}): {r['seconds']:.2f} s", flush=True)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        res["gpu"] = torch.cuda.get_device_name()
        res["gpu_peak_bf16_gflops"] = matmul_peak(torch.bfloat16, gpu, n=8192, reps=10) / 1e9
        res["gpu_train"] = []
        for batch in (32, 64):
            r = bench_train("resnet18", 512, batch, "bf16", 20, gpu)
            res["gpu_train"].append(r)
            print(
                f"GPU {res['gpu']}: resnet18 512^2 batch {batch} bf16: "
                f"{r['images_per_s']:.0f} img/s "
                f"({r['achieved_gflops'] / res['gpu_peak_bf16_gflops'] * 100:.0f}% "
                "of bf16 matmul peak)"
            )
    res["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
