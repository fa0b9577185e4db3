"""The OOD verdict's ranking of the true loss beside the truth's own reproducibility ceiling.

Issue 13's goal (Spearman of the OOD score with the true loss on study-preset data, models
pretrained at 0 and +10 nm: >= 0.8 per domain, >= 0.6 per frame), re-measured with the
verdict of issue 17 (``verdict_score``) and its network term (``ood_score``), through the
user path ``hrtem-transfer evaluate`` (``frames.csv``), beside two ceilings of the loss itself:

* **per domain, split-half**: the domains' mean loss on a random half of the held-out
  structures vs on the other half, Spearman over the 11 domains; median [10 %, 90 %] over
  200 halvings.  No label-free score computed on other frames can be expected to rank the
  domains much better than the loss of other frames of the same domains does.
* **per frame, across training seeds**: Spearman between the per-frame losses of two models
  trained alike but for the training seed (same data, same train/validation split, same
  held-out frames); and the same per domain (domain mean losses).  The part of a frame's loss
  that changes with the seed is not a property of the frame, and no score can predict it.

Commands (2-core CPU, ``nice -n 10``; data: the study preset at 2 phonons)::

    hrtem-transfer simulate --preset study --phonons 2 --n-structures 12 --seed 5 \\
        --out /tmp/G/study/study12.hspy
    nice -n 10 python benchmarks/bench_ood_ceiling.py --data /tmp/G/study/study12.hspy \\
        --out /tmp/G/study --train-defocus 0 10 --seeds 0 1

Models: compact U-Nets, 8 epochs of 256 samples (the issue-13 setting), half the structures
held out (``--val-fraction``, so that each domain has enough held-out frames).  Prints one
JSON line per model and the table; writes ``OUT/ceiling.md`` and ``OUT/ceiling.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def train_one(data: Path, mdir: Path, d: float, seed: int, a) -> None:
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.training import TrainConfig, train

    last = mdir / "last.json"
    done = json.loads(last.read_text()).get("epochs_completed", 0) if last.is_file() else 0
    if done >= a.epochs:
        return
    tc = TrainConfig(
        train_defocus_nm=[d],
        eval_defocus_nm=[d],
        epochs=a.epochs,
        batch_size=8,
        lr=2e-3,
        patch_size=a.patch_size,
        samples_per_epoch=a.samples_per_epoch,
        seed=seed,
        val_fraction=a.val_fraction,
        split_seed=0,
    )
    t = time.time()
    train(tc, load_dataset(data, lazy=False), mdir, resume=done > 0)  # an interrupted run goes on
    print(f"trained {mdir.name} in {time.time() - t:.0f} s", flush=True)


def evaluate(model: Path, data: Path, out: Path) -> list[dict]:
    """``hrtem-transfer evaluate`` on the model; its frame rows (material 'all')."""
    if not (out / "frames.csv").is_file():
        from napari_hrtem_transfer.evaluation.ood import fit_ood_reference_for_checkpoint

        fit_ood_reference_for_checkpoint(model, data)  # no-op when the training fitted one
        exe = Path(sys.executable).with_name("hrtem-transfer")
        cmd = [str(exe), "evaluate", "--model", str(model), "--data", str(data)]
        subprocess.run([*cmd, "--out", str(out), "--n-boot", "20"], check=True)
    with (out / "frames.csv").open() as f:
        return list(csv.DictReader(f))


def arrays(rows: list[dict]) -> dict[str, np.ndarray]:
    keys = ("domain_defocus_nm", "image_index", "loss", "ood_score", "verdict_score")
    out = {k: np.array([float(r[k]) for r in rows]) for k in keys}
    flag = [str(r["ood_caution"]).strip().lower() in ("true", "1", "1.0") for r in rows]
    out["caution"] = np.array(flag)  # frames.csv writes the flag as 1.0 / 0.0
    return out


def ranking(z: dict[str, np.ndarray], score: str) -> tuple[float, float]:
    doms = np.unique(z["domain_defocus_nm"])
    med = [np.median(z[score][z["domain_defocus_nm"] == d]) for d in doms]
    ml = [z["loss"][z["domain_defocus_nm"] == d].mean() for d in doms]
    return spearman(med, ml), spearman(z[score], z["loss"])


def in_domain(z: dict[str, np.ndarray], d: float) -> dict:
    """Inside the training domain: do the flagged frames hold the high losses?  Recall of
    the caution flag on the frames above the domain's 95th loss percentile, precision, and
    the per-frame Spearman of the verdict with the loss there."""
    sel = z["domain_defocus_nm"] == d
    loss, flag = z["loss"][sel], z["caution"][sel]
    bad = loss > np.quantile(loss, 0.95)
    return {
        "in_domain_n": int(sel.sum()),
        "in_domain_n_bad": int(bad.sum()),
        "in_domain_recall": float(flag[bad].mean()) if bad.any() else float("nan"),
        "in_domain_precision": float(bad[flag].mean()) if flag.any() else float("nan"),
        "in_domain_spearman_frame": spearman(z["verdict_score"][sel], loss),
    }


def split_half(z: dict[str, np.ndarray], n: int = 200) -> tuple[float, float, float]:
    """Median, 10 % and 90 % of the domain split-half Spearman over ``n`` halvings."""
    im, dom, loss = z["image_index"], z["domain_defocus_nm"], z["loss"]
    ims, doms = np.unique(im), np.unique(dom)
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(n):
        a = np.isin(im, rng.permutation(ims)[: len(ims) // 2])
        la = [loss[(dom == d) & a].mean() for d in doms]
        lb = [loss[(dom == d) & ~a].mean() for d in doms]
        vals.append(spearman(la, lb))
    v = np.asarray(vals)
    return float(np.median(v)), float(np.quantile(v, 0.1)), float(np.quantile(v, 0.9))


def across_seeds(za: dict, zb: dict) -> tuple[float, float]:
    """(per domain, per frame) Spearman of two seeds' losses on the same held-out frames."""
    keys_a = list(zip(za["domain_defocus_nm"], za["image_index"], strict=True))
    keys_b = list(zip(zb["domain_defocus_nm"], zb["image_index"], strict=True))
    ka = {key: k for k, key in enumerate(keys_a)}
    pairs = [(ka[key], k) for k, key in enumerate(keys_b) if key in ka]
    ia, ib = (np.array(p) for p in zip(*pairs, strict=True))
    doms = np.unique(za["domain_defocus_nm"])
    da = [za["loss"][za["domain_defocus_nm"] == d].mean() for d in doms]
    db = [zb["loss"][zb["domain_defocus_nm"] == d].mean() for d in doms]
    return spearman(da, db), spearman(za["loss"][ia], zb["loss"][ib])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-defocus", type=float, nargs="+", default=[0.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples-per-epoch", type=int, default=256)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.5)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, dict] = {}
    z_by: dict[tuple[float, int], dict] = {}
    for s in a.seeds:  # every pretraining of the first seed first, then the others
        for d in a.train_defocus:
            name = f"pre_{d:g}nm_s{s}"
            train_one(a.data, a.out / name, d, s, a)
            z = arrays(evaluate(a.out / name, a.data, a.out / f"eval_{name}"))
            z_by[(d, s)] = z
            r = {"model": name, "n_frames": int(z["loss"].size)}
            for sc in ("verdict_score", "ood_score"):
                r[f"{sc}_domain"], r[f"{sc}_frame"] = ranking(z, sc)
            r["split_half_domain"] = split_half(z)
            r.update(in_domain(z, d))
            r["flagged"] = float(z["caution"].mean())
            res[name] = r
            print(json.dumps(r), flush=True)
    lines = [
        f"Spearman with the true loss, per domain / per frame ({a.data.name}); ceilings of the "
        "loss itself",
        "",
        "| model | verdict_score | network term (ood_score) | truth split-half per domain "
        "(median [10 %, 90 %]) | frames flagged |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        m, lo, hi = r["split_half_domain"]
        lines.append(
            f"| {r['model']} | {r['verdict_score_domain']:.2f} / {r['verdict_score_frame']:.2f} "
            f"| {r['ood_score_domain']:.2f} / {r['ood_score_frame']:.2f} | {m:.2f} [{lo:.2f}, "
            f"{hi:.2f}] | {100 * r['flagged']:.0f} % |"
        )
    lines += [
        "",
        "Inside the training domain: caution recall on the frames above its 95th loss "
        "percentile, precision, and the verdict's per-frame Spearman there",
        "",
        "| model | frames (bad) | recall | precision | Spearman |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        lines.append(
            f"| {r['model']} | {r['in_domain_n']} ({r['in_domain_n_bad']}) | "
            f"{r['in_domain_recall']:.2f} | {r['in_domain_precision']:.2f} | "
            f"{r['in_domain_spearman_frame']:.2f} |"
        )
    lines += [
        "",
        "| pretraining | loss across training seeds, per domain / per frame |",
        "|---|---|",
    ]
    seeds = sorted(a.seeds)
    for d in a.train_defocus:
        for s in seeds[1:]:
            if (d, seeds[0]) not in z_by or (d, s) not in z_by:
                continue
            cd, cf = across_seeds(z_by[(d, seeds[0])], z_by[(d, s)])
            res[f"seeds_{d:g}nm_{seeds[0]}_{s}"] = {"domain": cd, "frame": cf}
            lines.append(f"| {d:+g} nm (seeds {seeds[0]} vs {s}) | {cd:.2f} / {cf:.2f} |")
    text = "\n".join(lines)
    print(text)
    (a.out / "ceiling.md").write_text(text + "\n")
    (a.out / "ceiling.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
