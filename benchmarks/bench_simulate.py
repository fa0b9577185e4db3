"""Benchmark the simulator (run by hand; figures go into the issue notes).

    python benchmarks/bench_simulate.py [--study] [--repeats 3] [--real-sessions]

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
4. with --real-sessions, the cost of the real_sessions preset at 0.2, 0.3 and 0.4 Å/px (its
   15.4 nm field: 768, 512, 384 px; multislice at 0.15 Å, 2 phonons, 11 defoci) split into
   the structure (particles and up to 15 nm of carbon), the mask and zero-defocus reference,
   the exit wave (multislice), and the images (per-image CTF, drift, illumination,
   scintillator detector); mean over --structures structures (sizes and thicknesses vary).
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


def real_sessions(n_structures, samplings=(0.2, 0.3, 0.4)):
    """Mean cost [s] per structure and per image of the real_sessions preset, by stage."""
    import os

    import numpy as np

    from napari_hrtem_transfer.simulate.conditions import (
        draw_conditions,
        form_images,
        imaging_rngs,
    )
    from napari_hrtem_transfer.simulate.physics import (
        abtem_settings,
        exit_waves,
        particle_reference,
    )
    from napari_hrtem_transfer.simulate.series import _rngs, _single_threaded_dask
    from napari_hrtem_transfer.simulate.structures import build_specimen

    print(f"[real_sessions] {os.cpu_count()} CPUs; mean over {n_structures} structures")
    for s in samplings:
        cfg = SimulationConfig.from_preset("real_sessions", sampling_A=s, n_structures=1)
        stages = {"structure": [], "reference": [], "exit wave": [], "images": []}
        atoms = []
        for i in range(n_structures):
            rng, rng_noise, phonon_seed = _rngs(cfg.seed, i)
            t0 = time.perf_counter()
            spec = build_specimen(cfg, rng)
            t1 = time.perf_counter()
            with _single_threaded_dask(), abtem_settings():
                _, zero_A = particle_reference(spec.particle_atoms, cfg)
                t2 = time.perf_counter()
                waves = exit_waves(spec.atoms, cfg, phonon_seed)
                t3 = time.perf_counter()
                rc, rf = imaging_rngs(cfg.seed, i)
                cond = draw_conditions(cfg, len(cfg.defocus_nm), rc)
                defocus_A = np.asarray(cfg.defocus_nm) * 10 + zero_A
                form_images(waves, cfg, defocus_A, cond, rng_noise, rf)
            t4 = time.perf_counter()
            for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[key].append(dt)
            atoms.append(len(spec.atoms))
        total = sum(np.mean(v) for v in stages.values())
        nd = len(cfg.defocus_nm)
        print(
            f"  {s:g} Å/px, {cfg.image_size_px}² px, {cfg.sim_gpts}² multislice grid, "
            f"{np.mean(atoms):.0f} atoms: {total:.1f} s per structure, "
            f"{total / nd:.2f} s per image ({nd} defoci)"
        )
        print("    " + ", ".join(f"{k} {np.mean(v):.2f} s" for k, v in stages.items()))
        print(f"    images alone: {np.mean(stages['images']) / nd:.3f} s per image")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--study", action="store_true", help="also time the study preset (minutes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fft-plans", action="store_true", help="time FFTW plans vs numpy's FFT")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--real-sessions", action="store_true",
        help="time the real_sessions preset at 0.2/0.3/0.4 Å/px (minutes)",
    )
    ap.add_argument("--structures", type=int, default=3, help="structures per pixel size")
    args = ap.parse_args()
    if args.real_sessions:
        return real_sessions(args.structures)
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
