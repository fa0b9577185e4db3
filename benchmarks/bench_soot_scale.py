"""The real soot frame segmented at its true pixel size and at wrong ones (label-free).

The packaged real HRTEM frame (``sample_data/hrtem_soot_ucam_como.tif``, 512² RGB, true
pixel size 0.555 Å/px from its authors' calibration) has no ground truth.  Each model
segments it as if its pixel size were each of ``--sampling`` [Å/px] (the frame is resampled
to the model's pixel size by the one segmentation path), and the result is described by
figures that do not need a label, all in the frame's *true* physical units:

- ``particle_%``: the masked fraction of the frame;
- ``blobs``: connected components of the mask; ``small_blobs``: those under 1 nm² (true
  area), the "small blobs in the carbon" a microscopist deletes by hand;
- ``ragged``: boundary pixels / sqrt(mask pixels) summed over blobs, divided by the same
  figure for discs of the blobs' areas (1 = smooth, round edges; larger = ragged);
- ``unsure``: mean of 4 p (1 - p) over the frame (0 = every pixel decided, 1 = all 0.5);
- ``ood``: the OOD score and its flag (the true pixel size should not add a reason).

Overlays (one PNG per model x pixel size, mask outline on the frame) go to ``--out``; the
table is printed and written as ``soot_scale.json``.  The issue's goal: the true pixel
size at least as good as any wrong one.

    .venv/bin/python benchmarks/bench_soot_scale.py --model pretrained --model /work/cand/model
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

TRUE_SAMPLING_A = 0.555
SOOT = Path(__file__).resolve().parents[1] / "src/napari_hrtem_transfer/sample_data"
SOOT_FILE = SOOT / "hrtem_soot_ucam_como.tif"


def soot_frame() -> np.ndarray:
    """The soot frame as float32 grey (BT.601 luma)."""
    from napari_hrtem_transfer.io.readers import ReaderWarning, read_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReaderWarning)
        (image,) = read_images(SOOT_FILE)
    return np.asarray(image.data, dtype=np.float32).reshape(image.data.shape[-2:])


def describe(mask: np.ndarray, proba: np.ndarray, true_sampling_A: float) -> dict:
    """Label-free figures of one mask (see the module docstring)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    px_nm2 = (true_sampling_A / 10.0) ** 2
    areas = np.bincount(lab.ravel())[1:] if n else np.zeros(0, int)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=1)
    perim = np.bincount(lab[edge].ravel(), minlength=n + 1)[1:] if n else np.zeros(0)
    disc = 2.0 * np.sqrt(np.pi * np.maximum(areas, 1))  # a disc's boundary px ~ 2 sqrt(pi A)
    ragged = float(perim.sum() / disc.sum()) if n else float("nan")
    return {
        "particle_%": round(100.0 * float(mask.mean()), 2),
        "blobs": int(n),
        "small_blobs": int(np.sum(areas * px_nm2 < 1.0)),
        "ragged": round(ragged, 3),
        "unsure": round(float(np.mean(4.0 * proba * (1.0 - proba))), 4),
    }


def overlay(frame: np.ndarray, mask: np.ndarray, title: str, path: Path) -> None:
    """The frame in grey with the mask outline in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(frame, cmap="gray")
    ax.contour(mask.astype(float), levels=[0.5], colors="orange", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="'pretrained' or a model folder")
    ap.add_argument(
        "--sampling",
        type=float,
        nargs="+",
        default=[0.2, 0.3, 0.4, TRUE_SAMPLING_A, 0.8],
        help="assumed pixel sizes [Å/px]",
    )
    ap.add_argument("--out", type=Path, default=Path("soot_scale"))
    args = ap.parse_args(argv)
    from napari_hrtem_transfer.segmentation import segment

    models = args.model or ["pretrained"]
    args.out.mkdir(parents=True, exist_ok=True)
    frame = soot_frame()
    rows = []
    for m in models:
        for s in args.sampling:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = segment(frame, m, sampling_A=s, max_zoom=8.0)
            row = {
                "model": str(m),
                "assumed_sampling_A": s,
                "true": abs(s - TRUE_SAMPLING_A) < 1e-6,
            }
            row.update(describe(r.labels.astype(bool), r.proba, TRUE_SAMPLING_A))
            score = None if r.ood_score is None else float(np.ravel(r.ood_score)[0])
            row["ood"] = None if score is None or not np.isfinite(score) else round(score, 2)
            flag = None if r.ood_flag is None else bool(np.ravel(r.ood_flag)[0])
            row["flag"] = flag
            reasons = (r.ood_reasons or [[]])[0] if r.ood_reasons else []
            row["reasons"] = list(reasons)
            tag = Path(str(m)).name or str(m)
            png = args.out / f"soot_{tag}_{s:.3f}A.png"
            overlay(frame, r.labels.astype(bool), f"{tag}: assumed {s:g} Å/px", png)
            row["overlay"] = str(png)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("reasons", "overlay")}))
    (args.out / "soot_scale.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    cols = ["particle_%", "blobs", "small_blobs", "ragged", "unsure", "ood", "flag"]
    print("\n| model | assumed Å/px | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        star = " (true)" if r["true"] else ""
        cells = [str(r[c]) for c in cols]
        print(
            f"| {Path(r['model']).name} | {r['assumed_sampling_A']:g}{star} | "
            + " | ".join(cells)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
