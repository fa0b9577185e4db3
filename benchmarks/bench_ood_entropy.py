"""Would the frame's mean predictive entropy make the OOD verdict rank the loss better?

A calibrated classifier's mean predictive entropy H is its own estimate of its per-pixel
cross-entropy, so ``z(ln H)`` (in units of the training images' robust spread, clipped at -3
like the other terms) is a candidate for the verdict's score.  This benchmark adds
``alpha * max(z(ln H), -3)`` to the shipped verdict's terms and, for each ``alpha`` and
power-spectrum weight, recalibrates the caution level (95 % of held-out training-like frames,
physics flags included, as the shipped calibration does) and reports the flag rates and the
Spearman rank correlations with the true loss.  Nothing in the package changes.

Two bounds follow the table: the *oracle* (the true loss as the score, its level the 95th
percentile of the calibration frames' loss: the flag rates any loss-ranking score reaches)
and the best per-domain Spearman of a score that ranks the wide series' beyond-±50 nm
domains above all others (what flagging them with the score alone, no physics flags beside
it, would ask).

    .venv/bin/python benchmarks/bench_ood_entropy.py --train T1.hspy T2.hspy \\
        --calib CAL_CdSe.hspy CAL_Au.hspy --wide WIDE.hspy [--study DIR --study-data D.hspy]

The series are those of ``benchmarks/bench_ood_verdict.py`` (its docstring gives the
``simulate`` commands; the calibration series: the same settings as T1/T2, seeds 904/905).
``ln H``'s median and spread come from structures 0-5 of the training-like series (the frames
the shipped reference was fitted on); the level from structures 6-9 and the ``--calib``
series.  ``--study DIR``: the output folder of ``benchmarks/bench_ood_ceiling.py`` (models
``pre_*`` with their ``eval_*/frames.csv``), scored on its held-out frames with each model's
own reference; ``ln H`` statistics from the model's training frames at its training defocus.
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def frame_terms(model, frames, masks, sampling_A=None) -> dict[str, np.ndarray]:
    """Per-frame loss, mean entropy and verdict components of ``model`` on ``frames``."""
    from napari_hrtem_transfer.segmentation import segment

    res = segment(frames, model, sampling_A=sampling_A, ood=True, probabilities=True)
    p = np.asarray(res.proba, np.float64)
    p = np.clip(p.reshape(-1, *p.shape[-2:]), 1e-6, 1 - 1e-6)
    m = np.asarray(masks, bool).reshape(p.shape)
    rows = res.frame_table()

    def comp(k):
        return np.array(
            [
                np.nan if r["ood_components"].get(k) is None else float(r["ood_components"][k])
                for r in rows
            ]
        )

    return {
        "loss": -(m * np.log(p) + (~m) * np.log1p(-p)).mean(axis=(-2, -1)),
        "H": -(p * np.log(p) + (1 - p) * np.log1p(-p)).mean(axis=(-2, -1)),
        "network": comp("network"),
        "physics": comp("physics"),
        "ps": np.nan_to_num(np.maximum(comp("power_spectrum_distance") - 1, 0)),
        "flag_physics": (np.nan_to_num(comp("defocus_excess_nm")) > 0) | (comp("physics") > 0),
    }


def _series(path: str):
    """(frames through the reader, masks broadcast to every frame, defocus per frame, n_images)."""
    from napari_hrtem_transfer.io import load_dataset, read_images

    ds = load_dataset(path, lazy=False)
    nd, ni = ds.images.shape[:2]
    masks = np.broadcast_to(np.asarray(ds.masks)[None] > 0, (nd, ni, *ds.images.shape[-2:]))
    return read_images(path)[0], masks, np.repeat(np.asarray(ds.defocus_nm, float), ni), ni


def _take(t: dict, sel) -> dict:
    return {k: v[sel] for k, v in t.items()}


def _cat(ts: list[dict]) -> dict:
    return {k: np.concatenate([t[k] for t in ts]) for k in ts[0]}


def score(t: dict, lnh: tuple[float, float], alpha: float, ps_weight: float) -> np.ndarray:
    z = np.maximum((np.log(t["H"]) - lnh[0]) / lnh[1], -3.0)
    return t["network"] + alpha * z + t["physics"] + ps_weight * t["ps"]


def _ranks(t: dict, d: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    doms = np.unique(d)
    per_dom = _spearman(
        [np.median(s[d == x]) for x in doms], [t["loss"][d == x].mean() for x in doms]
    )
    return per_dom, _spearman(s, t["loss"])


def _median_spread(v: np.ndarray) -> tuple[float, float]:
    med = float(np.median(v))
    return med, max(1.4826 * float(np.median(np.abs(v - med))), 1e-4)


def study(folder: Path, data: Path, alphas) -> list[str]:
    """The ceiling benchmark's single-defocus models: Spearman per domain / per frame."""
    from napari_hrtem_transfer.io import load_dataset

    ds = load_dataset(data, lazy=False)
    doms = [float(x) for x in ds.defocus_nm]
    head = " | ".join(f"alpha {a:g}" for a in alphas)
    lines = [f"| model | {head} | H alone |", "|---" * (len(alphas) + 2) + "|"]
    for mdir in sorted(folder.glob("pre_*nm_s*")):
        rows = list(csv.DictReader((folder / f"eval_{mdir.name}" / "frames.csv").open()))
        keys = sorted({(float(r["domain_defocus_nm"]), int(float(r["image_index"]))) for r in rows})
        held = {i for _, i in keys}
        imgs = np.stack([np.asarray(ds.images[doms.index(d), i]) for d, i in keys])
        masks = np.stack([np.asarray(ds.masks[i]) > 0 for _, i in keys])
        t = frame_terms(mdir, imgs, masks, ds.sampling_A)
        d_train = float(json.loads((mdir / "best.json").read_text())["data"]["train_defocus_nm"][0])
        train = [i for i in range(ds.n_images) if i not in held]
        tt = frame_terms(
            mdir,
            np.asarray(ds.images[doms.index(d_train)])[train],
            np.asarray(ds.masks)[train] > 0,
            ds.sampling_A,
        )
        lnh = _median_spread(np.log(tt["H"]))
        d = np.array([k[0] for k in keys])
        cells = ["{:.2f} / {:.2f}".format(*_ranks(t, d, score(t, lnh, a, 1.0))) for a in alphas]
        cells.append("{:.2f} / {:.2f}".format(*_ranks(t, d, t["H"])))
        lines.append(f"| {mdir.name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--calib", nargs="*", default=[])
    ap.add_argument("--wide", required=True)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--ps-weights", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--study", type=Path, default=None)
    ap.add_argument("--study-data", type=Path, default=None)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from napari_hrtem_transfer.evaluation.ood import calibrate_caution_level

    fit, cal = [], []
    for path in a.train:
        frames, masks, d, ni = _series(path)
        t = frame_terms("pretrained", frames, masks)
        idx = np.arange(d.size) % ni
        fit.append(_take(t, idx < 6))
        cal.append(_take(t, idx >= 6))
    for path in a.calib:
        frames, masks, d, _ = _series(path)
        cal.append(frame_terms("pretrained", frames, masks))
    lnh = _median_spread(np.log(_cat(fit)["H"]))
    cal = _cat(cal)
    frames, masks, wd, _ = _series(a.wide)
    wide = frame_terms("pretrained", frames, masks)
    repo = Path(__file__).resolve().parents[1]
    frames, masks, _, _ = _series(str(repo / "sample_data" / "defocus_series_small.hspy"))
    sample = frame_terms("pretrained", frames, masks)
    print(f"ln H of the fitted training-like frames: median {lnh[0]:.3f}, spread {lnh[1]:.3f}")
    print()
    print(
        "| alpha | ps weight | caution level | sample flagged | wide in range flagged "
        "| wide beyond ±50 nm flagged | wide Spearman per domain / per frame |"
    )
    print("|---|---|---|---|---|---|---|")
    in_range, beyond = np.abs(wd) <= 25, np.abs(wd) >= 50
    for psw in a.ps_weights:
        for alpha in a.alphas:
            s_cal = score(cal, lnh, alpha, psw)
            level, _ = calibrate_caution_level(
                s_cal, None, np.ones(s_cal.size, bool), 0.95, physics_flag=cal["flag_physics"]
            )
            fw = (score(wide, lnh, alpha, psw) > level) | wide["flag_physics"]
            fs = (score(sample, lnh, alpha, psw) > level) | sample["flag_physics"]
            sd, sf = _ranks(wide, wd, score(wide, lnh, alpha, psw))
            print(
                f"| {alpha:g} | {psw:g} | {level:.2f} | {int(fs.sum())} of {fs.size} "
                f"| {100 * fw[in_range].mean():.0f} % | {100 * fw[beyond].mean():.0f} % "
                f"| {sd:.2f} / {sf:.2f} |"
            )
    print("wide series, H alone: {:.2f} / {:.2f}".format(*_ranks(wide, wd, wide["H"])))
    # the score without its physics term (the physics reasons still flag, beside the score)
    net = {k: t["network"] + t["ps"] for k, t in (("cal", cal), ("wide", wide))}
    level, _ = calibrate_caution_level(
        net["cal"], None, np.ones(net["cal"].size, bool), 0.95, physics_flag=cal["flag_physics"]
    )
    fw = (net["wide"] > level) | wide["flag_physics"]
    print(
        "score without the physics term (network + power spectrum; physics flags beside it): "
        f"level {level:.2f}, wide in range flagged {100 * fw[in_range].mean():.0f} %, beyond "
        "±50 nm {:.0f} %, Spearman {:.2f} / {:.2f}".format(
            100 * fw[beyond].mean(), *_ranks(wide, wd, net["wide"])
        )
    )
    # The oracle: the true loss itself as the score (Spearman 1 by construction), its level
    # the 95th percentile of the calibration frames' loss, physics flags included as above.
    # Its flag rates bound what any score that ranks frames by their loss can reach.
    level, _ = calibrate_caution_level(
        cal["loss"], None, np.ones(cal["loss"].size, bool), 0.95, physics_flag=cal["flag_physics"]
    )
    fw = (wide["loss"] > level) | wide["flag_physics"]
    fs = (sample["loss"] > level) | sample["flag_physics"]
    print(
        f"oracle (score = true loss): level {level:.3f}, sample flagged {int(fs.sum())} of "
        f"{fs.size}, wide in range flagged {100 * fw[in_range].mean():.0f} %, beyond ±50 nm "
        f"{100 * fw[beyond].mean():.0f} %; without the physics flags: in range "
        f"{100 * (wide['loss'] > level)[in_range].mean():.0f} %, beyond "
        f"{100 * (wide['loss'] > level)[beyond].mean():.0f} %"
    )
    # The best per-domain Spearman of any score whose beyond-±50 nm domains rank above every
    # other domain (what flagging them with few in-range flags would ask of a score that
    # carried the flag alone; the verdict's physics flags stand beside its score, so this
    # bounds the design without them): the domains' true losses, the beyond ones lifted to
    # the top in their own order.
    doms = np.unique(wd)
    dom_loss = np.array([wide["loss"][wd == x].mean() for x in doms])
    lifted = dom_loss + (np.abs(doms) >= 50) * (dom_loss.max() - dom_loss.min() + 1.0)
    print(
        "best per-domain Spearman of a score that alone flags the beyond-±50 nm domains "
        "(ranks them on top): "
        f"{_spearman(lifted, dom_loss):.2f}"
    )
    for x in doms:
        sel = wd == x
        print(
            f"  wide {x:+.0f} nm: mean loss {wide['loss'][sel].mean():.3f}, "
            f"loss above the oracle level {100 * (wide['loss'][sel] > level).mean():.0f} %"
        )
    print()
    for name, t in (
        ("calibration frames", cal),
        ("wide series in range", _take(wide, np.abs(wd) <= 25)),
    ):
        print(
            f"{name}: mean loss {t['loss'].mean():.3f}, median mean entropy {np.median(t['H']):.4f}"
        )
    if a.study is not None:
        print()
        print("Study-preset single-defocus models (ps weight 1), Spearman per domain / per frame:")
        print("\n".join(study(a.study, a.study_data, a.alphas)))


if __name__ == "__main__":
    main()
