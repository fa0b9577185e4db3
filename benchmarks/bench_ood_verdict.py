"""The OOD verdict of the shipped model, measured (issue 17); optionally refits its reference.

    .venv/bin/hrtem-transfer simulate --out T1.hspy --material CdSe --n-structures 10 \\
        --defocus -25 -20 -15 -10 -5 0 5 10 15 20 25 --defocus-jitter 1 --radius 0.8 1.8 \\
        --particles 1 3 --dose 400 --seed 901          (and Au, seed 902: T2.hspy)
    .venv/bin/hrtem-transfer simulate --out WIDE.hspy --material ZnS --n-structures 8 \\
        --defocus -60 -50 -40 -30 -20 -10 0 10 20 30 40 50 60 --defocus-jitter 1 \\
        --radius 0.8 1.8 --particles 1 3 --dose 400 --cs 0.02 --substrate-thickness 4 6 \\
        --seed 903
    more wide series (docs/ood_score.md, "The shipped verdict with entropy weight 3"): the
    WIDE command with --material Pt --dose 250 --cs 0.01 --substrate-thickness 3 5 --seed 907
    (WIDE2); Cu 150 0.03 5 8 908 (WIDE3); Ag 600 0.015 2 4 909 (WIDE4); CdSe 80 0.04 4 7 910
    (WIDE5)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_ood_verdict.py \\
        --train T1.hspy T2.hspy --wide WIDE.hspy [--refit-shipped] [--timing] [--model DIR]

``--refit-shipped``: the shipped model's reference (format 4) is refitted on structures 0-5
of the training-like series (the training settings of ``scripts/train_pretrained_model.py``,
new seeds, so none of these frames was trained on) and calibrated on structures 6-9 (88
frames, all in the training domain) plus every frame of the ``--calib`` series (same
settings, seeds 904/905); the weights are untouched.

Then, with the shipped model through :func:`napari_hrtem_transfer.segmentation.segment`
(the path users take): the sample series (in range), the wide series (another material,
Cs = 20 µm instead of 5 µm, 4-6 nm of carbon instead of 2-3 nm, -60..+60 nm): Spearman of
the score with the true loss per domain (median score vs mean loss) and per frame, the
fraction flagged in range (|defocus| <= 25 nm) and beyond +-50 nm; special frames (a
particle-free lattice, a blank detector frame, pure noise, a frame at 3x its true pixel
size) against the 95th percentile of in-domain scores; ``--timing``: the OOD pass's cost on a
4096 px frame (segment with and without it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _bce(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    m = m.astype(np.float64)
    return -(m * np.log(p) + (1 - m) * np.log1p(-p)).mean(axis=(-2, -1))


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def refit_shipped(
    train_paths: list[str],
    calib_paths: list[str] | None = None,
    n_fit: int = 6,
    model_dir: str | Path | None = None,
) -> dict:
    """Refit the reference of ``model_dir`` (default: the shipped model) on held-out series."""
    from napari_hrtem_transfer.evaluation.ood import fit_ood_on_held_out, load_ood_reference
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    model_dir = Path(model_dir) if model_dir is not None else pretrained_model_dir()
    res = fit_ood_on_held_out(
        model_dir,
        train_paths,
        calib_paths or [],
        n_fit_images=n_fit,
        description="training-like series (scripts/train_pretrained_model.py settings, "
        f"new seeds: {', '.join(map(str, train_paths))}), structures 0-{n_fit - 1} of each; "
        "calibration: the rest and the --calib series; refit by "
        "benchmarks/bench_ood_verdict.py --refit-shipped",
    )
    ref = load_ood_reference(model_dir)
    return {
        "caution_level": res.caution_level,
        "calibration": ref.calibration,
        "fit_s": res.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--wide", required=True)
    ap.add_argument("--refit-shipped", action="store_true")
    ap.add_argument("--calib", nargs="*", default=[], help="more held-out training-like series")
    ap.add_argument("--fit-structures", type=int, default=6, help="structures per material fitted")
    ap.add_argument(
        "--model",
        default="pretrained",
        help="model folder to measure (default: the shipped model); --refit-shipped "
        "rewrites its OOD reference",
    )
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = ap.parse_args()
    import warnings

    from napari_hrtem_transfer.io.dataset import load_dataset
    from napari_hrtem_transfer.io.readers import read_images
    from napari_hrtem_transfer.segmentation import segment

    warnings.simplefilter("ignore")
    out: dict = {}
    if a.refit_shipped:
        out["refit"] = refit_shipped(
            a.train, a.calib, a.fit_structures, None if a.model == "pretrained" else a.model
        )
        print("refit:", json.dumps(out["refit"], indent=1, default=str))

    # in-domain frames never used by the fit or the calibration: the sample series
    repo = Path(__file__).resolve().parents[1]
    # through the reader, as `hrtem-transfer segment FILE` does: the recorded energy and Cs
    (sample_frames,) = read_images(repo / "sample_data" / "defocus_series_small.hspy")
    rs = segment(sample_frames, a.model)
    in_scores = np.asarray(rs.ood_score)
    p95 = float(np.quantile(in_scores, 0.95))
    out["sample_series"] = {
        "n": int(in_scores.size),
        "flagged": int(np.sum(rs.ood_flag)),
        "p95_score": p95,
        "caution_level": rs.ood_caution,
        "reasons": [r for r in rs.ood_reasons if r],
    }
    print("sample series (in range):", json.dumps(out["sample_series"], indent=1))

    # the wide series
    w = load_dataset(a.wide, lazy=False)
    nd, ni = w.n_defocus, w.n_images
    xw = np.asarray(w.images).reshape(-1, *w.images.shape[-2:])
    t0 = time.perf_counter()
    (wide_frames,) = read_images(a.wide)  # the user path: the file's Cs (20 µm) is recorded
    res = segment(wide_frames, a.model)
    t_wide = time.perf_counter() - t0
    loss = _bce(
        np.asarray(res.proba).reshape(xw.shape),
        np.broadcast_to(np.asarray(w.masks)[None], (nd, ni, *xw.shape[-2:])).reshape(xw.shape),
    ).reshape(nd, ni)
    score = np.asarray(res.ood_score).reshape(nd, ni)
    flag = np.asarray(res.ood_flag).reshape(nd, ni)
    net = np.array([c.get("network", np.nan) for c in res.ood_components]).reshape(nd, ni)
    est = np.asarray(res.estimated_defocus_nm).reshape(nd, ni)
    d = np.asarray(w.defocus_nm)
    rows = []
    for k in range(nd):
        rows.append(
            {
                "defocus_nm": float(d[k]),
                "mean_loss": float(loss[k].mean()),
                "median_score": float(np.median(score[k])),
                "median_network_term": float(np.median(net[k])),
                "flagged": float(flag[k].mean()),
                "median_estimated_defocus_nm": float(np.nanmedian(est[k]))
                if np.isfinite(est[k]).any()
                else None,
            }
        )
    inr = np.abs(d) <= 25
    far = np.abs(d) > 50
    out["wide"] = {
        "domains": rows,
        "spearman_domain": _spearman(
            [r["median_score"] for r in rows], [r["mean_loss"] for r in rows]
        ),
        "spearman_frame": _spearman(score.ravel(), loss.ravel()),
        "spearman_domain_network_term_only": _spearman(
            [r["median_network_term"] for r in rows], [r["mean_loss"] for r in rows]
        ),
        "spearman_frame_network_term_only": _spearman(net.ravel(), loss.ravel()),
        "flagged_in_range": float(flag[inr].mean()),
        "flagged_beyond_50nm": float(flag[far].mean()),
        "segment_s": t_wide,
        "n_frames": int(xw.shape[0]),
        "frames": [
            {
                "defocus_nm": float(d[k]),
                "loss": float(loss[k, i]),
                "score": float(score[k, i]),
                "caution": bool(flag[k, i]),
                "reasons": res.ood_reasons[k * ni + i],
                "components": res.ood_components[k * ni + i],
            }
            for k in range(nd)
            for i in range(ni)
        ],
    }
    print("wide:", json.dumps({k: v for k, v in out["wide"].items() if k != "frames"}, indent=1))

    # special frames
    rng = np.random.default_rng(0)
    special = {}
    sto = read_images("/work/shared/data/dm3/scifi_DMReader_Image_SI-Survey.dm3")[0]
    sto_px = np.asarray(sto.data, np.float32).reshape(-1, *np.shape(sto.data)[-2:])[0]
    special["lattice (SrTiO3, no calibration)"] = (sto_px, 0.2)
    haadf = read_images(
        "/work/shared/data/emd_velox/ncem_STEM_HAADF-DF4-DF2-BF_Diffraction_Micro.emd"
    )[0]
    special["blank HAADF detector frame"] = (
        np.asarray(haadf.data, np.float32).reshape(-1, *np.shape(haadf.data)[-2:])[0],
        0.2,
    )
    special["pure noise (Poisson, 16 counts/px)"] = (
        rng.poisson(16.0, (256, 256)).astype(np.float32),
        0.2,
    )
    cdse = load_dataset(a.train[0], lazy=False)
    special["frame at 3x its true pixel size"] = (
        np.asarray(cdse.images[8, 9], np.float32),
        3 * cdse.sampling_A,
    )
    out["special"] = {}
    for name, (fr, s_A) in special.items():
        r = segment(fr, a.model, sampling_A=s_A)
        sc = float(np.asarray(r.ood_score).reshape(-1)[0])
        out["special"][name] = {
            "score": sc,
            "above_in_domain_p95": bool(sc > p95),
            "caution": bool(np.asarray(r.ood_flag).reshape(-1)[0]),
            "reasons": r.ood_reasons[0],
            "particle_fraction": r.ood_components[0].get("particle_fraction"),
            "components": r.ood_components[0],
        }
    print("special:", json.dumps(out["special"], indent=1))

    if a.timing:  # warm (a 1024 px call first), best of 2 each
        big = np.tile(np.asarray(cdse.images[3, 9], np.float32), (16, 16))
        segment(big[:1024, :1024], a.model, sampling_A=0.2)
        segment(big[:1024, :1024], a.model, sampling_A=0.2, ood=False)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):
            for ood in (False, True):
                t0 = time.perf_counter()
                segment(big, a.model, sampling_A=0.2, ood=ood)
                runs[ood].append(time.perf_counter() - t0)
        t_seg, t_all = min(runs[False]), min(runs[True])
        out["timing_4096"] = {
            "segment_s": t_seg,
            "segment_with_ood_s": t_all,
            "ood_fraction": (t_all - t_seg) / t_seg,
            "runs": runs,
        }
        print("timing:", out["timing_4096"])
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
