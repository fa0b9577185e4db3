"""Benchmark the simulator (run by hand; figures go into the issue notes).

    python benchmarks/bench_simulate.py [--study] [--repeats 3]

Measures, in one run on this machine:
1. the cost of an 11-defocus series relative to a single-defocus image at the same settings
   (the exit wave is computed once and the CTF applied per defocus; a naive loop would be 11x);
2. images per second (structures x defoci) for the laptop preset and, with --study, the study
   preset (512², 0.1 Å multislice, 8 phonons, 11 defoci);
3. with --fft-plans, the cost of reproducible FFTs: the laptop preset with abTEM's default
   FFTW with FFTW_MEASURE planning (timing-dependent plans: not reproducible run to run),
   FFTW_ESTIMATE, and numpy's FFT, which the simulator uses (bitwise reproducible run to run).
   Each runs in its own fresh process (FFTW wisdom is kept per process), alternating; the
   first structure includes any planning, the next are steady.
Each timing is the minimum of --repeats runs after one warm-up (numba compilation, FFT plans);
the single- and 11-defocus runs are interleaved so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from napari_hrtem_transfer.simulate import SimulationConfig, simulate_structure

ELEVEN = [float(d) for d in range(-25, 26, 5)]


def timed_pair(cfg_a, cfg_b, index, repeats):
    """Minimum wall time [s] of simulate_structure for two configs, interleaved."""
    simulate_structure(cfg_a, index)  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for cfg, out in ((cfg_a, ta), (cfg_b, tb)):
            t = time.perf_counter()
            simulate_structure(cfg, index)
            out.append(time.perf_counter() - t)
    return min(ta), min(tb)


FFT_SETTINGS = {
    "FFTW_MEASURE": {"fft": "fftw", "fftw.planning_effort": "FFTW_MEASURE"},
    "FFTW_ESTIMATE": {"fft": "fftw", "fftw.planning_effort": "FFTW_ESTIMATE"},
    "numpy": {"fft": "numpy"},
}


def one_planning(name, repeats):
    """In this (fresh) process: first-structure and steady time [s] with FFT setting ``name``."""
    from napari_hrtem_transfer.simulate import physics

    physics.ABTEM_SETTINGS.update(FFT_SETTINGS[name])
    cfg = SimulationConfig.from_preset("laptop", defocus_nm=ELEVEN, n_structures=1)
    t = time.perf_counter()
    simulate_structure(cfg, 0)
    first = time.perf_counter() - t
    steady = []
    for i in range(repeats):
        t = time.perf_counter()
        simulate_structure(cfg, 1 + i)
        steady.append(time.perf_counter() - t)
    print(f"{first:.3f} {min(steady):.3f}")


def fft_plans(repeats):
    times = {name: [] for name in FFT_SETTINGS}
    for _ in range(repeats):
        for effort, out in times.items():
            res = subprocess.run(
                [sys.executable, __file__, "--_one", effort],
                capture_output=True, text=True, check=True,
            )
            out.append([float(x) for x in res.stdout.split()[-2:]])
    print("[laptop] FFT setting, 11-defocus series per structure (min over processes):")
    for effort, out in times.items():
        first, steady = min(o[0] for o in out), min(o[1] for o in out)
        print(f"  {effort:13s}: first structure {first:6.2f} s, then {steady:6.2f} s")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--study", action="store_true", help="also time the study preset (minutes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fft-plans", action="store_true", help="time FFTW plans vs numpy's FFT")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        return one_planning(args._one, 2)
    if args.fft_plans:
        return fft_plans(args.repeats)
    presets = ["laptop"] + (["study"] if args.study else [])
    for name in presets:
        base = SimulationConfig.from_preset(name, defocus_nm=ELEVEN, n_structures=1)
        one = base.model_copy(update={"defocus_nm": [ELEVEN[5]]})
        reps = args.repeats if name == "laptop" else 1
        t11, t1 = timed_pair(base, one, 0, reps)
        print(
            f"[{name}] {base.image_size_px}² px, {base.sim_gpts}² multislice grid, "
            f"{base.n_phonons} phonons"
        )
        print(f"  one defocus:     {t1:7.2f} s per structure")
        print(
            f"  11-defocus series: {t11:7.2f} s per structure = {t11 / t1:.2f}x one defocus "
            f"(naive loop: 11x)"
        )
        print(
            f"  throughput: {11 / t11:.2f} images/s (11-defocus series), "
            f"{1 / t1:.2f} images/s (one defocus)"
        )


if __name__ == "__main__":
    main()
