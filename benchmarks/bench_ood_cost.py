"""Cost of the verdict's network-free parts on large frames: the CTF estimate and each component.

Times (best of ``--reps``, warm) and peak traced memory (``tracemalloc``: numpy's allocations)
of ``estimate_ctf`` / ``estimate_ctf_with_metadata`` on the whole frame, and of each
component of the verdict's pass (:func:`napari_hrtem_transfer.evaluation.ood.verdict.
frame_components`: input checks, CTF physics, power-spectrum profile), on an analytic
amorphous frame (a weak phase object through a known CTF, Poisson noise; float32) and, with
``--lattice``, on a particle-free lattice (the case that runs the quarter checks)::

    nice -n 10 python benchmarks/bench_ood_cost.py --size 4096 8192 --reps 2

The network's part (encoder pass) is measured with ``benchmarks/bench_ood_verdict.py
--timing`` and the segmentation profile; this benchmark covers what ``evaluation.ctf`` and
``evaluation.ood.components`` add.  Prints one JSON line per (size, frame, part).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import tracemalloc

import numpy as np


def amorphous_frame(n: int, defocus_nm: float = 20.0, seed: int = 0) -> np.ndarray:
    """(n, n) float32 counts of a weak phase object at ``defocus_nm`` (Cs 5 µm, 0.2 Å/px)."""
    from napari_hrtem_transfer.evaluation.ctf import ctf_curve

    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n, d=0.2).astype(np.float32)
    fx = np.fft.rfftfreq(n, d=0.2).astype(np.float32)
    out = np.empty((n, n), np.float32)
    phi = np.fft.rfft2(rng.standard_normal((n, n), dtype=np.float32) * 0.5)
    for r0 in range(0, n, 512):  # the transfer row block by row block (bounded temporaries)
        q = np.hypot(f[r0 : r0 + 512, None], fx[None, :])
        t = ctf_curve(q, defocus_nm, focal_spread_A=10.0) * np.exp(-((q / 1.5) ** 2))
        phi[r0 : r0 + 512] *= t.astype(np.float32)
    out[:] = 1.0 + 2.0 * np.fft.irfft2(phi, s=(n, n)).astype(np.float32)
    np.clip(out, 0, None, out=out)
    return rng.poisson(out * 16.0).astype(np.float32)


def lattice(n: int, seed: int = 0) -> np.ndarray:
    """(n, n) float32 counts of a hexagonal fringe set, axis-aligned (a particle-free crystal)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n, dtype=np.float32) * 0.2)[:, None]
    x = (np.arange(n, dtype=np.float32) * 0.2)[None, :]
    img = np.ones((n, n), np.float32)
    for k in range(3):
        a = np.pi * k / 3
        img += 0.3 * np.cos(2 * np.pi / 2.1 * (np.cos(a) * x + np.sin(a) * y))
    return rng.poisson(img * 100.0).astype(np.float32)


def timed(fn, reps: int) -> tuple[float, float]:
    """(best wall time [s], peak traced memory [MiB]) of ``fn()`` over ``reps`` calls."""
    fn()  # warm
    best = float("inf")
    tracemalloc.start()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak


def parts(frame: np.ndarray) -> dict:
    from napari_hrtem_transfer.evaluation import ctf
    from napari_hrtem_transfer.evaluation.ood import components as comp

    vd = importlib.import_module("napari_hrtem_transfer.evaluation.ood.verdict")

    cfg = vd.VerdictConfig()
    dom = {"defocus_nm_range": [-25.0, 25.0], "defocus_nm": [0.0], "sampling_A": 0.2}
    return {
        "estimate_ctf (whole frame)": lambda: ctf.estimate_ctf(frame, 0.2),
        "estimate_ctf_with_metadata (whole frame)": lambda: ctf.estimate_ctf_with_metadata(
            frame, 0.2, {"energy_eV": 300e3, "Cs_A": 5e4}
        ),
        "input checks": lambda: vd._input_checks(frame, cfg),
        "physics (CTF on the crop, overlap)": lambda: comp.physics_components(
            frame, 0.2, dom, crop_px=cfg.ctf_crop_px
        ),
        "power-spectrum profile": lambda: comp.power_spectrum_profiles(frame[None]),
        "frame_components (all)": lambda: vd.frame_components(frame[None], domain=dom),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--lattice", action="store_true", help="also time a particle-free lattice")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the parts to time")
    a = ap.parse_args(argv)
    for n in a.size:
        frames = {"amorphous": amorphous_frame(n)}
        if a.lattice:
            frames["lattice"] = lattice(n)
        for kind, fr in frames.items():
            for name, fn in parts(fr).items():
                if a.only and not any(s in name for s in a.only):
                    continue
                dt, peak = timed(fn, a.reps)
                row = {"size": n, "frame": kind, "part": name, "seconds": round(dt, 3)}
                row["peak_MiB"] = round(peak, 1)
                row["frame_MiB"] = round(fr.nbytes / 2**20, 1)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
