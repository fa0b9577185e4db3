"""The OOD score as a user gets it (issue 13): ``hrtem-transfer evaluate`` outputs.

For each model folder: refit its OOD reference with the library's default score
(:func:`napari_hrtem_transfer.evaluation.ood.fit_ood_reference_for_checkpoint`, ``refit``),
run ``hrtem-transfer evaluate --model M --data D --out OUT/<name>``, and compute from its
``domains.csv`` and ``frames.csv`` the Spearman rank correlation of the OOD score with the loss
per domain (median score of a domain's held-out frames vs its mean loss) and per frame, plus
the caution level's recall / precision on the frames whose loss exceeds the training domain's
95th percentile::

    python benchmarks/bench_ood_evaluate.py --data /tmp/ood_bench/study32.hspy \\
        /tmp/ood_bench/study/pre_-10nm /tmp/ood_bench/study/pre_0nm \\
        /tmp/ood_bench/study/pre_10nm --out /tmp/ood_eval/study

The models come from ``benchmarks/bench_ood.py`` (``pre_*`` folders).
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


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def one(model: Path, data: Path, out: Path, n_boot: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from ood_candidates import spearman

    from napari_hrtem_transfer.evaluation.ood import (
        fit_ood_reference_for_checkpoint,
        load_ood_reference,
    )

    t = time.perf_counter()
    msg = fit_ood_reference_for_checkpoint(model, data, refit=True)
    t_fit = time.perf_counter() - t
    ref = load_ood_reference(model)
    exe = Path(sys.executable).with_name("hrtem-transfer")
    t = time.perf_counter()
    cmd = [str(exe), "evaluate", "--model", str(model), "--data", str(data), "--out", str(out)]
    subprocess.run([*cmd, "--n-boot", str(n_boot)], check=True, capture_output=True)
    t_eval = time.perf_counter() - t
    frames = [r for r in read_csv(out / "frames.csv") if r.get("material", "all") in ("all", "")]
    frames = frames or read_csv(out / "frames.csv")
    dom = np.array([float(r["domain_defocus_nm"]) for r in frames])
    loss = np.array([float(r["loss"]) for r in frames])
    score = np.array([float(r["ood_score"]) for r in frames])
    doms = np.unique(dom)
    med = [np.median(score[dom == d]) for d in doms]
    ml = [loss[dom == d].mean() for d in doms]
    train = [float(v) for v in ref.info.get("train_defocus_nm", [])]
    ind = np.isin(dom, train)
    thr = np.quantile(loss[ind], 0.95) if ind.any() else np.nan
    bad, flag = loss > thr, score > ref.caution
    return {
        "model": model.name,
        "train_defocus_nm": train,
        "spearman_domain": spearman(med, ml),
        "spearman_frame": spearman(score, loss),
        "caution_level": ref.caution,
        "n_frames": int(loss.size),
        "n_bad": int(bad.sum()),
        "recall": float(flag[bad].mean()) if bad.any() else float("nan"),
        "precision": float(bad[flag].mean()) if flag.any() else float("nan"),
        "t_fit_s": t_fit,
        "t_evaluate_s": t_eval,
        "fit": msg,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-boot", type=int, default=50)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models:
        r = one(m, args.data, args.out / m.name, args.n_boot)
        rows.append(r)
        print(json.dumps(r), flush=True)
    lines = [
        f"OOD score from `hrtem-transfer evaluate` on {args.data.name}",
        "",
        "| model | Spearman per domain | per frame | caution level | bad frames flagged "
        "(recall) | flagged frames bad (precision) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['spearman_domain']:.2f} | {r['spearman_frame']:.2f} | "
            f"{r['caution_level']:.2f} | {r['recall']:.2f} ({r['n_bad']} bad) | "
            f"{r['precision']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
