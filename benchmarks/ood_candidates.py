"""Candidate label-free OOD scores, measured over a grid (issue 13).  Not library code.

Two steps, so that the costly part (training, forward passes) runs once:

``prepare``  pretrains a U-Net on one defocus (or a mixture) of an 11-defocus series, and
             stores per held-out frame of every domain: the loss and Dice (the truth), the
             pooled encoder features, statistics of the predictive-entropy map, test-time
             augmentation (D4) disagreement, and the time each took; and the same features
             for every (training image x D4 transform) of the training domain(s)::

                 python benchmarks/ood_candidates.py prepare --data series.hspy \
                     --train-defocus 10 --epochs 8 --out /tmp/ood_bench/laptop

``table``    scores every candidate on every prepared run (Spearman rank correlation with
             the loss: per domain = median score of a domain's held-out frames vs. its mean
             loss; per frame = over all held-out frames), the cost per frame, the fit-sample
             cap study (issue 12), and combinations chosen on one half of the grid and
             checked on the other::

                 python benchmarks/ood_candidates.py table /tmp/ood_bench/*/pre_* \
                     --out /tmp/ood_bench/table.md

``extras``   (second round) re-runs the held-out frames and training images of prepared
             runs and stores more statistics of the probability maps (entropy on the predicted
             boundary, width of the uncertain band, foreground fraction, ...) and the
             predicted masks (for the defocus-series consistency candidates)::

                 python benchmarks/ood_candidates.py extras /tmp/ood_bench/study/pre_* \
                     --data /tmp/ood_bench/study32.hspy

``external`` prepares a run for a model trained elsewhere (the shipped model): every image
             of ``--data`` is held out, the training images come from ``--train-data``::

                 python benchmarks/ood_candidates.py external --model pretrained \
                     --data study32.hspy --train-data mixture.hspy --max-images 16 \
                     --out /tmp/ood_bench/study

The table also gives the noise ceiling of the per-domain column (how well the domains' mean
losses on half of the images rank those on the other half) and the mean loss per domain.
``benchmarks/bench_ood_evaluate.py`` measures the chosen score through
``hrtem-transfer evaluate``.  MC dropout is not a candidate: the U-Nets of this project have
no dropout layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_hrtem_transfer.evaluation._model import _entropy_map, boundary_mask

# ----------------------------------------------------------------------------- prepare


def entropy_statistics(proba: np.ndarray) -> dict[str, float]:
    """Spatial statistics of one frame's predictive entropy map [nats]."""
    h = _entropy_map(proba)
    pred = proba > 0.5
    edge = boundary_mask(pred)
    return {
        "ent_mean": float(h.mean()),
        "ent_q90": float(np.quantile(h, 0.90)),
        "ent_q99": float(np.quantile(h, 0.99)),
        "ent_boundary": float(h[edge].mean()) if edge.any() else 0.0,
        "ent_uncertain_frac": float((h > 0.5).mean()),
        "fg_frac": float(pred.mean()),
    }


def _inverse_d4(y: np.ndarray, code: int) -> np.ndarray:
    if code >= 4:
        y = y[..., ::-1]
    return np.rot90(y, -(code % 4), axes=(-2, -1))


def prepare(args) -> int:
    from napari_hrtem_transfer.io import load_dataset

    ds = load_dataset(args.data, lazy=False)
    for d_train in args.train_defocus:
        name = "all" if d_train == "all" else f"{float(d_train):g}nm"
        mdir = args.out / f"pre_{name}"
        domains = "all" if d_train == "all" else [float(d_train)]
        lock = args.out / f".preparing_{name}"
        if lock.exists():  # another process is preparing this model
            continue
        lock.touch()
        try:
            _prepare_one(args, ds, d_train, name, mdir, domains)
        finally:
            lock.unlink()
    return 0


def _prepare_one(args, ds, d_train, name, mdir, domains) -> None:
    from napari_hrtem_transfer.evaluation._model import ScoringModel
    from napari_hrtem_transfer.evaluation.metrics import binary_cross_entropy, dice
    from napari_hrtem_transfer.training import TrainConfig, load_checkpoint, train
    from napari_hrtem_transfer.training.data import d4

    if not (mdir / "best.json").is_file():
        tc = TrainConfig(
            train_defocus_nm=domains,
            eval_defocus_nm=domains,
            epochs=args.epochs,
            batch_size=8,
            lr=2e-3,
            patch_size=args.patch_size,
            samples_per_epoch=args.samples_per_epoch,
            seed=args.seed,
            num_threads=args.threads,
        )
        t = time.time()
        res = train(tc, ds, mdir)
        (mdir / "train_time.json").write_text(json.dumps({"seconds": time.time() - t}))
        print(f"pretrained {name} in {time.time() - t:.0f} s (val {res.best_val_loss:.4f})")
    if (mdir / "frames.npz").is_file() and not args.force:
        return
    lm = load_checkpoint(mdir, device="cpu")
    sm = ScoringModel(lm)
    info = lm.info["data"]
    sids = np.asarray(ds.structure_ids).astype(str)
    va = np.flatnonzero(np.isin(sids, info["val_structures"]))
    items = np.asarray(info["train_items"], int).reshape(-1, 2)
    # training image-transforms (all of them; caps are emulated by sub-sampling)
    t0 = time.perf_counter()
    tf, te, tcode, titem = [], [], [], []
    for code in range(8):
        for k in range(0, len(items), 16):
            it = items[k : k + 16]
            x = np.stack([d4(np.asarray(ds.images[d, i]), code) for d, i in it])
            st = sm.frame_stats(x, batch_size=8)
            tf.append(st.features)
            te.append(st.entropy)
            tcode += [code] * len(it)
            titem += list(range(k, k + len(it)))
    t_train = time.perf_counter() - t0
    # held-out frames of every domain
    rows = {
        k: []
        for k in (
            "domain",
            "image",
            "loss",
            "dice",
            "t_forward",
            "t_entropy_stats",
            "t_tta",
            "tta_std",
            "tta_mi",
            "ent_mean",
            "ent_q90",
            "ent_q99",
            "ent_boundary",
            "ent_uncertain_frac",
            "fg_frac",
        )
    }
    feats = []
    masks = np.asarray(ds.masks)
    for di in range(ds.n_defocus):
        for n_done, i in enumerate(va):
            x = np.asarray(ds.images[di, i])
            t = time.perf_counter()
            st = sm.frame_stats(x, want_logits=True)
            t_fwd = time.perf_counter() - t
            z = st.logits[0]
            p = 1 / (1 + np.exp(-z.astype(np.float64)))
            t = time.perf_counter()
            es = entropy_statistics(p)
            t_es = time.perf_counter() - t
            tta_std = tta_mi = t_tta = float("nan")
            if args.tta_per_domain is None or n_done < args.tta_per_domain:
                t = time.perf_counter()
                xs = np.stack([d4(x, c) for c in range(1, 8)])
                zz = lm.predict_logits(xs, precision="fp32")
                ps = [p] + [
                    _inverse_d4(1 / (1 + np.exp(-zz[c - 1].astype(np.float64))), c)
                    for c in range(1, 8)
                ]
                ps = np.stack(ps)
                pm = ps.mean(0)
                tta_std = float(ps.std(0).mean())
                tta_mi = float(_entropy_map(pm).mean() - _entropy_map(ps).mean())
                t_tta = time.perf_counter() - t + t_fwd
            feats.append(st.features[0])
            for k, v in (
                ("domain", di),
                ("image", int(i)),
                ("loss", float(binary_cross_entropy(z, masks[i]))),
                ("dice", float(dice(z > 0, masks[i]))),
                ("t_forward", t_fwd),
                ("t_entropy_stats", t_es),
                ("t_tta", t_tta),
                ("tta_std", tta_std),
                ("tta_mi", tta_mi),
                *es.items(),
            ):
                rows[k].append(v)
        print(f"{name}: domain {ds.defocus_nm[di]:g} nm done", flush=True)
    np.savez(
        mdir / "frames.npz",
        features=np.stack(feats),
        train_features=np.concatenate(tf),
        train_entropy=np.concatenate(te),
        train_code=np.asarray(tcode),
        train_item=np.asarray(titem),
        train_domain=items[np.asarray(titem), 0],
        stage_sizes=np.asarray(sm.stage_sizes),
        defocus_nm=np.asarray(ds.defocus_nm, float),
        train_domains=np.asarray([ds.defocus_index(v) for v in info["train_defocus_nm"]], int),
        t_train_fit=t_train,
        image_px=np.asarray(ds.image_shape),
        **{k: np.asarray(v) for k, v in rows.items()},
    )
    print(f"wrote {mdir / 'frames.npz'}")


# ------------------------------------------------------------------------------ extras
def map_statistics(proba: np.ndarray) -> dict[str, float]:
    """More spatial statistics of one probability map (issue 13, second round)."""
    from scipy import ndimage

    h = _entropy_map(proba)
    pred = proba > 0.5
    edge = boundary_mask(pred)
    n_edge = int(edge.sum())
    band = ndimage.binary_dilation(edge, iterations=3) if n_edge else edge
    _, n_comp = ndimage.label(pred)
    return {
        "x_ent_boundary": float(h[edge].mean()) if n_edge else float("nan"),
        "x_ent_band_px": float(h.sum() / n_edge) if n_edge else float("nan"),
        "x_ent_boundary_d3": float(h[band].mean()) if n_edge else 0.0,
        "x_ent_interior": float(h[~band].mean()) if (~band).any() else 0.0,
        "x_boundary_frac": n_edge / pred.size,
        "x_fg_frac": float(pred.mean()),
        "x_n_comp": float(n_comp),
        "x_ent_mean": float(h.mean()),
    }


def _stats_of(lm, frames: np.ndarray):
    """Probability maps of frames (N, H, W) and their statistics."""
    z = lm.predict_logits(frames, precision="fp32")
    rows, masks = [], []
    for k in range(len(frames)):
        p = 1 / (1 + np.exp(-z[k].astype(np.float64)))
        rows.append(map_statistics(p))
        masks.append(p > 0.5)
    return z, rows, masks


def extras(args) -> int:
    """Second round of candidates: re-run the held-out frames and the training images of
    each prepared run, store more map statistics and the predicted masks (for the
    defocus-series consistency scores) in ``extras.npz``."""
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.training import load_checkpoint

    ds = load_dataset(args.data, lazy=False)
    for mdir in args.runs:
        out = mdir / "extras.npz"
        if out.is_file() and not args.force:
            continue
        z = dict(np.load(mdir / "frames.npz"))
        lm = load_checkpoint(mdir, device="cpu")
        t0 = time.perf_counter()
        rows, masks = [], []
        for d, i in zip(z["domain"], z["image"], strict=True):
            _, r, m = _stats_of(lm, np.asarray(ds.images[int(d), int(i)])[None])
            rows += r
            masks += m
        t_frames = (time.perf_counter() - t0) / len(rows)
        items = np.asarray(lm.info["data"]["train_items"], int).reshape(-1, 2)
        rng = np.random.default_rng(0)
        if len(items) > args.max_train:
            items = items[np.sort(rng.choice(len(items), args.max_train, replace=False))]
        trows = []
        for k in range(0, len(items), 8):
            x = np.stack([np.asarray(ds.images[d, i]) for d, i in items[k : k + 8]])
            trows += _stats_of(lm, x)[1]
        keys = list(rows[0])
        np.savez_compressed(
            out,
            masks=np.packbits(np.stack(masks), axis=-1),
            mask_shape=np.asarray(masks[0].shape),
            t_frame=t_frames,
            **{k: np.array([r[k] for r in rows]) for k in keys},
            **{"train_" + k: np.array([r[k] for r in trows]) for k in keys},
        )
        print(f"wrote {out} ({len(rows)} frames, {len(trows)} training images)", flush=True)
    return 0


def external(args) -> int:
    """Prepare a run for a model trained elsewhere (the shipped model): every image of
    ``--data`` is held out; the training images come from ``--train-data``."""
    from napari_hrtem_transfer.evaluation._model import ScoringModel
    from napari_hrtem_transfer.evaluation.metrics import binary_cross_entropy, dice
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    mdir = pretrained_model_dir() if args.model == "pretrained" else Path(args.model)
    lm = __import__("napari_hrtem_transfer.training", fromlist=["x"]).load_checkpoint(
        mdir, device="cpu"
    )
    sm = ScoringModel(lm)
    ds = load_dataset(args.data, lazy=False)
    tr = load_dataset(args.train_data, lazy=False)
    items = np.asarray(lm.info["data"]["train_items"], int).reshape(-1, 2)
    rng = np.random.default_rng(0)
    items = items[np.sort(rng.choice(len(items), min(args.max_train, len(items)), replace=False))]
    tf, te, trows = [], [], []
    for k in range(0, len(items), 8):
        x = np.stack([np.asarray(tr.images[d, i]) for d, i in items[k : k + 8]])
        st = sm.frame_stats(x, batch_size=8)
        tf.append(st.features)
        te.append(st.entropy)
        trows += _stats_of(lm, x)[1]
    n_img = min(args.max_images, ds.n_images)
    masks = np.asarray(ds.masks)
    rows = {k: [] for k in ("domain", "image", "loss", "dice", "t_forward")}
    feats, xrows, xmasks = [], [], []
    for di in range(ds.n_defocus):
        for i in range(n_img):
            x = np.asarray(ds.images[di, i])
            t = time.perf_counter()
            st = sm.frame_stats(x, want_logits=True)
            rows["t_forward"].append(time.perf_counter() - t)
            zz = st.logits[0]
            p = 1 / (1 + np.exp(-zz.astype(np.float64)))
            xrows.append(map_statistics(p))
            xmasks.append(p > 0.5)
            feats.append(st.features[0])
            rows["domain"].append(di)
            rows["image"].append(i)
            rows["loss"].append(float(binary_cross_entropy(zz, masks[i])))
            rows["dice"].append(float(dice(zz > 0, masks[i])))
        print(f"{args.name}: domain {ds.defocus_nm[di]:g} nm done", flush=True)
    out = args.out / f"pre_{args.name}"
    out.mkdir(parents=True, exist_ok=True)
    n = len(feats)
    nan = np.full(n, np.nan)
    legacy = {k.removeprefix("x_"): np.array([r[k] for r in xrows]) for k in xrows[0]}
    np.savez(
        out / "frames.npz",
        features=np.stack(feats),
        train_features=np.concatenate(tf),
        train_entropy=np.concatenate(te),
        train_code=np.zeros(len(items), int),
        train_item=np.arange(len(items)),
        train_domain=items[:, 0],
        stage_sizes=np.asarray(sm.stage_sizes),
        defocus_nm=np.asarray(ds.defocus_nm, float),
        train_domains=np.arange(ds.n_defocus),
        t_train_fit=0.0,
        image_px=np.asarray(ds.image_shape),
        t_entropy_stats=np.zeros(n),
        t_tta=nan,
        tta_std=nan,
        tta_mi=nan,
        ent_q90=nan,
        ent_q99=nan,
        ent_uncertain_frac=nan,
        **{k: legacy[k] for k in ("ent_mean", "ent_boundary", "fg_frac")},
        **{k: np.asarray(v) for k, v in rows.items()},
    )
    keys = list(xrows[0])
    np.savez_compressed(
        out / "extras.npz",
        masks=np.packbits(np.stack(xmasks), axis=-1),
        mask_shape=np.asarray(xmasks[0].shape),
        t_frame=float(np.median(rows["t_forward"])),
        train_n_px=float(np.prod(tr.image_shape)),
        **{k: np.array([r[k] for r in xrows]) for k in keys},
        **{"train_" + k: np.array([r[k] for r in trows]) for k in keys},
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------- table
def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok])[0])


class Run:
    """One prepared setting (dataset x pretraining domain)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.z = dict(np.load(path / "frames.npz"))
        self.name = f"{path.parent.name}:{path.name.removeprefix('pre_')}"
        sizes = self.z["stage_sizes"]
        self.cuts = np.cumsum([0, *sizes])
        self.n_domains = len(self.z["defocus_nm"])
        ex = path / "extras.npz"
        self.x = dict(np.load(ex)) if ex.is_file() else None

    def cols(self, which: str) -> np.ndarray:
        c = self.cuts
        if which == "all":
            return np.arange(c[-1])
        if which == "shallow3":  # the current default: all stages but the deepest
            return np.arange(c[-2])
        if which == "deepest":
            return np.arange(c[-2], c[-1])
        if which == "means":  # channel means only
            return np.concatenate(
                [np.arange(a, a + (b - a) // 2) for a, b in zip(c[:-1], c[1:], strict=True)]
            )
        if which == "stds":
            return np.concatenate(
                [np.arange(a + (b - a) // 2, b) for a, b in zip(c[:-1], c[1:], strict=True)]
            )
        raise ValueError(which)

    def train_sample(self, cap: int | None, seed: int = 0) -> np.ndarray:
        """Row indices of the training sample a capped streaming fit would use."""
        from napari_hrtem_transfer.evaluation.ood import sample_transforms

        n_items = int(self.z["train_item"].max()) + 1
        if (self.z["train_code"] == 0).all():  # an external run: untransformed images only
            return np.arange(min(len(self.z["train_code"]), cap or 10**9))
        if cap is None:
            return np.arange(len(self.z["train_item"]))
        groups = np.zeros(n_items, int)
        dom = self.z["train_domain"]
        for k, it in enumerate(self.z["train_item"]):
            groups[it] = dom[k]
        pairs = sample_transforms(groups, 8, cap, seed)
        lookup = {
            (int(i), int(c)): k
            for k, (i, c) in enumerate(zip(self.z["train_item"], self.z["train_code"], strict=True))
        }
        return np.array([lookup[p] for p in pairs])

    def evaluate(self, score: np.ndarray) -> tuple[float, float]:
        dom, loss = self.z["domain"], self.z["loss"]
        md = [np.nanmedian(score[dom == k]) for k in range(self.n_domains)]
        ml = [np.mean(loss[dom == k]) for k in range(self.n_domains)]
        return spearman(md, ml), spearman(score, loss)


def feature_score(run: Run, rows: np.ndarray, which: str, per_domain: bool = False):
    """distance / median training distance - 1 (diag standardisation)."""
    from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features

    cols = run.cols(which)
    ftr = run.z["train_features"][rows][:, cols]
    f = run.z["features"][:, cols]
    if not per_domain:
        ref = fit_reference_from_features(ftr, None, "diag", 0.0)
        return ref.score(f)
    # a reference per training domain; the frame's score is its distance to the nearest
    dtr = run.z["train_domain"][rows]
    scores = []
    for d in np.unique(dtr):
        ref = fit_reference_from_features(ftr[dtr == d], None, "diag", 0.0)
        scores.append(ref.score(f))
    return np.min(scores, axis=0)


def mahalanobis_score(run: Run, rows: np.ndarray, which: str, shrinkage: float = 0.2):
    """Shrunk-correlation Mahalanobis distance / median training distance - 1 (moved here
    from the library: it never beat the diagonal distance)."""
    cols = run.cols(which)
    ftr = run.z["train_features"][rows][:, cols]
    mean, sd = ftr.mean(0), ftr.std(0)
    sd = np.maximum(sd, max(1e-3 * float(np.median(sd[sd > 0])), 1e-8))
    z = (ftr - mean) / sd
    prec = np.linalg.inv((1 - shrinkage) * (z.T @ z) / len(z) + shrinkage * np.eye(z.shape[1]))

    def dist(f):
        zz = (f[:, cols] - mean) / sd
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", zz, prec, zz) / zz.shape[1], 0))

    return dist(run.z["features"]) / np.median(dist(run.z["train_features"][rows])) - 1


def entropy_ref(run: Run, rows: np.ndarray) -> float:
    return float(np.median(run.z["train_entropy"][rows]))


def candidates(run: Run, cap: int | None = 192) -> dict[str, tuple[np.ndarray, str]]:
    """Every candidate score of a run's held-out frames: name -> (score, cost key)."""
    rows = run.train_sample(cap)
    z = run.z
    e_ref = entropy_ref(run, rows)
    e = z["ent_mean"] / e_ref - 1
    out: dict[str, tuple[np.ndarray, str]] = {}
    f3 = feature_score(run, rows, "shallow3")
    out["previous default: features[shallow3] + 1*max(entropy,0)"] = (
        f3 + np.maximum(e, 0),
        "forward",
    )
    for which in ("all", "shallow3", "deepest", "means", "stds"):
        out[f"features[{which}] diag"] = (feature_score(run, rows, which), "forward")
    if len(np.unique(z["train_domain"])) > 1:
        out["features[all] nearest training domain"] = (
            feature_score(run, rows, "all", per_domain=True),
            "forward",
        )
    out["features[all] shrunk Mahalanobis"] = (mahalanobis_score(run, rows, "all"), "forward")
    out["entropy mean"] = (e, "forward")
    for k in ("ent_q90", "ent_q99", "ent_boundary", "ent_uncertain_frac"):
        out[f"entropy {k[4:]}"] = (z[k], "forward+entropy_stats")
    out["TTA D4 std"] = (z["tta_std"], "tta")
    out["TTA D4 mutual information"] = (z["tta_mi"], "tta")
    fa = feature_score(run, rows, "all")
    for w in (0.5, 1.0, 2.0, 4.0, 8.0):
        out[f"features[all] + {w:g}*entropy"] = (fa + w * e, "forward")
        out[f"features[shallow3] + {w:g}*entropy"] = (f3 + w * e, "forward")
    for w in (2.0, 4.0, 8.0):
        out[f"features[shallow3] + {w:g}*max(entropy,0)"] = (f3 + w * np.maximum(e, 0), "forward")
    # the entropy standardised by the training images' robust spread (MAD)
    etr = z["train_entropy"][rows]
    mad = 1.4826 * np.median(np.abs(etr - np.median(etr)))
    ez = (z["ent_mean"] - np.median(etr)) / max(mad, 1e-12)
    for w in (0.1, 0.25, 0.5):
        out[f"features[shallow3] + {w:g}*max(entropy z,0)"] = (
            f3 + w * np.maximum(ez, 0),
            "forward",
        )
    # rank-free combination: the entropy's and the distance's log ratios to training
    d_all = fa + 1
    out["log(dist ratio) + log(entropy ratio)"] = (np.log(d_all) + np.log(e + 1), "forward")
    if run.x is not None:
        from napari_hrtem_transfer.evaluation.ood import fit_reference_from_features

        cols = run.cols("shallow3")
        ref = fit_reference_from_features(z["train_features"][rows][:, cols], None, "diag", 0.0)
        f3_train = ref.score(z["train_features"][rows][:, cols])
        out.update(extra_candidates(run, f3, f3_train))
    return out


def _robust_z(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(v - median(ref)) / (1.4826 MAD(ref)), as the library scores (finite values of
    ``ref`` only; NaN in ``v``, no predicted boundary, gives 0)."""
    from napari_hrtem_transfer.evaluation.ood.reference import _median_spread
    from napari_hrtem_transfer.evaluation.ood.reference import _robust_z as library_z

    return library_z(v, *_median_spread(ref))


def series_scores(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: 1 - Dice with the leave-one-out majority mask of the same image's other
    defoci, and |log(foreground fraction / median over the series)|."""
    x, z = run.x, run.z
    shape = tuple(int(v) for v in x["mask_shape"])
    masks = np.unpackbits(x["masks"], axis=-1, count=shape[-1]).astype(bool)
    dis = np.full(len(masks), np.nan)
    fgd = np.full(len(masks), np.nan)
    fg = x["x_fg_frac"]
    for i in np.unique(z["image"]):
        idx = np.flatnonzero(z["image"] == i)
        stack = masks[idx].astype(np.float32)
        total = stack.sum(0)
        for j, k in enumerate(idx):
            others = (total - stack[j]) / (len(idx) - 1)
            cons = others > 0.5
            inter = np.logical_and(masks[k], cons).sum()
            denom = masks[k].sum() + cons.sum()
            dis[k] = 1 - 2 * inter / denom if denom else 0.0
            med = np.median(np.delete(fg[idx], j))
            fgd[k] = abs(np.log((fg[k] + 1e-3) / (med + 1e-3)))
    return dis, fgd


def extra_candidates(
    run: Run, f3: np.ndarray, f3_train: np.ndarray
) -> dict[str, tuple[np.ndarray, str]]:
    x = run.x
    out: dict[str, tuple[np.ndarray, str]] = {}
    names = {
        "x_ent_boundary": "boundary entropy (recomputed)",
        "x_ent_band_px": "entropy band width [px] (sum H / boundary px)",
        "x_ent_boundary_d3": "entropy on the boundary band (3 px)",
        "x_ent_interior": "entropy away from the boundary",
        "x_boundary_frac": "boundary pixel fraction",
    }
    for k, label in names.items():
        out[label] = (x[k], "forward")
    fg_shift = np.abs(np.log((x["x_fg_frac"] + 1e-3) / (np.median(x["train_x_fg_frac"]) + 1e-3)))
    out["|log(fg fraction / training median)|"] = (fg_shift, "forward")
    bz = _robust_z(x["x_ent_boundary"], x["train_x_ent_boundary"])
    # the library's band width: summed entropy / (boundary pixels + 1), so that a frame
    # without a predicted boundary (a model that finds nothing) gets all its entropy
    n_px = float(np.prod(run.z["image_px"]))
    n_px_train = float(x["train_n_px"]) if "train_n_px" in x else n_px

    def band(pre):
        n = n_px if pre == "x_" else n_px_train
        return x[pre + "ent_mean"] * n / (x[pre + "boundary_frac"] * n + 1)

    wz = _robust_z(band("x_"), band("train_x_"))
    for w in (0.1, 0.25, 0.5, 1.0):
        out[f"boundary entropy z + {w:g}*features[shallow3]"] = (bz + w * f3, "forward")
        out[f"boundary entropy z + {w:g}*max(features[shallow3],0)"] = (
            bz + w * np.maximum(f3, 0),
            "forward",
        )
    out["boundary entropy z + band width z"] = (bz + wz, "forward")
    out["band width z"] = (wz, "forward")
    for w in (0.25, 0.5, 1.0, 2.0, 3.0):
        out[f"band width z + {w:g}*max(features[shallow3],0)"] = (
            wz + w * np.maximum(f3, 0),
            "forward",
        )
        out[f"boundary entropy z + band width z + {w:g}*max(features[shallow3],0)"] = (
            bz + wz + w * np.maximum(f3, 0),
            "forward",
        )
    out["mean(boundary entropy z, band width z)"] = (0.5 * (bz + wz), "forward")
    fz = np.maximum(_robust_z(f3, f3_train), 0)
    lwz = _robust_z(np.log(band("x_")), np.log(band("train_x_")))
    out["max(boundary entropy z,0) + max(log band width z,0) + 0.5*max(features z,0)"] = (
        np.maximum(bz, 0) + np.maximum(lwz, 0) + 0.5 * fz,
        "forward",
    )
    for w in (1.0, 2.0, 3.0):
        out[
            f"max(boundary entropy z,-3) + max(log band width z,-3) + "
            f"{w:g}*max(features[shallow3],0)"
        ] = (np.maximum(bz, -3) + np.maximum(lwz, -3) + w * np.maximum(f3, 0), "forward")
    for c in (2.0, 3.0, 5.0):
        out[
            f"max(boundary entropy z,-{c:g}) + max(log band width z,-{c:g}) + 0.5*max(features z,0)"
        ] = (np.maximum(bz, -c) + np.maximum(lwz, -c) + 0.5 * fz, "forward")
    out["max(boundary entropy z + log band width z, 0) + 0.5*max(features z,0)"] = (
        np.maximum(bz + lwz, 0) + 0.5 * fz,
        "forward",
    )
    for w in (0.5, 1.0):
        out[f"boundary entropy z + log band width z + {w:g}*max(features z,0)"] = (
            bz + lwz + w * fz,
            "forward",
        )
    for w in (0.25, 0.5, 1.0):
        out[f"boundary entropy z + band width z + {w:g}*max(features z,0)"] = (
            bz + wz + w * fz,
            "forward",
        )
    dis, fgd = series_scores(run)
    out["series: 1 - Dice with the other defoci's majority"] = (dis, "forward")
    out["series: |log(fg / series median)|"] = (fgd, "forward")
    for w in (0.25, 0.5, 1.0, 2.0):
        out[f"boundary entropy z + {w:g}*series disagreement z"] = (
            bz + w * _robust_z(dis, dis),
            "forward",
        )
    return out


def isotonic_level(score: np.ndarray, bad: np.ndarray) -> float:
    """The score at which P(bad | score), fitted non-decreasing, first reaches 1/2."""
    from scipy.optimize import isotonic_regression

    order = np.argsort(score, kind="stable")
    fitted = isotonic_regression(bad[order].astype(float), increasing=True).x
    hit = np.flatnonzero(fitted >= 0.5)
    if not hit.size:
        return float("inf")
    k = int(hit[0])
    s = score[order]
    return float(s[k] if k == 0 else 0.5 * (s[k] + s[k - 1]))


def table(args) -> int:
    runs = [Run(p) for p in args.runs if (p / "frames.npz").is_file()]
    if not runs:
        print("no prepared runs", file=sys.stderr)
        return 2
    lines = []
    results: dict[str, dict[str, tuple[float, float]]] = {}
    names: list[str] = []
    costs: dict[str, dict[str, float]] = {}
    for r in runs:
        c = candidates(r)
        results[r.name] = {k: r.evaluate(v) for k, (v, _) in c.items()}
        for k in c:
            if k not in names:
                names.append(k)
        z = r.z
        fwd = float(np.median(z["t_forward"]))
        costs[r.name] = {
            "forward": fwd,
            "forward+entropy_stats": fwd + float(np.median(z["t_entropy_stats"])),
            "tta": float(np.nanmedian(z["t_tta"])),
        }
    cost_key = {k: v for k, (_, v) in candidates(runs[0]).items()}
    head = "| score | " + " | ".join(r.name for r in runs) + " | mean d / f | worst d / f |"
    lines += [
        "Spearman rank correlation with the loss: per domain / per frame",
        "",
        head,
        "|" + "---|" * (len(runs) + 3),
    ]
    for k in names:
        vals = [results[r.name].get(k, (np.nan, np.nan)) for r in runs]
        d = np.array([v[0] for v in vals])
        f = np.array([v[1] for v in vals])
        cells = [f"{a:.2f} / {b:.2f}" for a, b in vals]
        lines.append(
            f"| {k} | "
            + " | ".join(cells)
            + f" | {np.nanmean(d):.2f} / {np.nanmean(f):.2f}"
            + f" | {np.nanmin(d):.2f} / {np.nanmin(f):.2f} |"
        )
    # how reproducible is the truth itself?  Domain mean losses of half of the images vs
    # the other half: no label-free score can rank domains better than the loss of other
    # frames of the same domains does (the noise ceiling of the per-domain column)
    cells = []
    for r in runs:
        im, dom, loss = r.z["image"], r.z["domain"], r.z["loss"]
        ims = np.unique(im)
        rng = np.random.default_rng(0)
        vals = []
        for _ in range(200):
            a = np.isin(im, rng.permutation(ims)[: len(ims) // 2])
            la = [loss[(dom == k) & a].mean() for k in range(r.n_domains)]
            lb = [loss[(dom == k) & ~a].mean() for k in range(r.n_domains)]
            vals.append(spearman(la, lb))
        cells.append(
            f"{np.median(vals):.2f} [{np.quantile(vals, 0.1):.2f}, {np.quantile(vals, 0.9):.2f}]"
        )
    lines += [
        "",
        "Noise ceiling of the per-domain column: Spearman of the domains' mean loss on half "
        "of the images vs the other half (median [10 %, 90 %] over 200 random halvings)",
        "",
        "| | " + " | ".join(r.name for r in runs) + " |",
        "|" + "---|" * (len(runs) + 1),
        "| truth split-half | " + " | ".join(cells) + " |",
        "",
        "Mean loss per domain (" + ", ".join(f"{v:g}" for v in runs[0].z["defocus_nm"]) + " nm):",
        "",
    ]
    for r in runs:
        ml = [r.z["loss"][r.z["domain"] == k].mean() for k in range(r.n_domains)]
        lines.append(f"- {r.name}: " + " ".join(f"{v:.3f}" for v in ml))
    lines += ["", "Cost per frame [ms] (median; forward = one pass with features and logits)", ""]
    lines.append("| cost | " + " | ".join(r.name for r in runs) + " |")
    lines.append("|" + "---|" * (len(runs) + 1))
    for key in ("forward", "forward+entropy_stats", "tta"):
        lines.append(
            f"| {key} | " + " | ".join(f"{1e3 * costs[r.name][key]:.0f}" for r in runs) + " |"
        )
    lines.append("")
    lines.append(
        "image px per run: "
        + ", ".join(f"{r.name}={int(r.z['image_px'][0])}" for r in runs)
        + "; candidates' cost keys: "
        + ", ".join(sorted(set(cost_key.values())))
    )
    # training seeds: runs whose folder is "<preset>_s<seed>" repeat "<preset>" with another
    # training seed; mean +- sd over the seeds of each setting, for the main candidates
    groups: dict[str, list] = {}
    for r in runs:
        preset, _, rest = r.path.parent.name.partition("_s")
        groups.setdefault(f"{preset}:{r.path.name.removeprefix('pre_')}", []).append(r)
    if any(len(v) > 1 for v in groups.values()):
        keys = [
            "previous default: features[shallow3] + 1*max(entropy,0)",
            "features[shallow3] + 2*max(entropy,0)",
            "entropy mean",
            "entropy boundary",
            "TTA D4 std",
            args.chosen,
        ]
        multi = [g for g, v in groups.items() if len(v) > 1]
        lines += [
            "",
            "Across training seeds (mean ± sd over the seeds of each setting; n = seeds), "
            "per domain / per frame:",
            "",
            "| score | " + " | ".join(f"{g} (n={len(groups[g])})" for g in multi) + " |",
            "|" + "---|" * (len(multi) + 1),
        ]
        for k in keys:
            cells = []
            for g in multi:
                v = np.array([results[r.name].get(k, (np.nan, np.nan)) for r in groups[g]])
                if np.isnan(v).all():
                    cells.append("–")
                    continue
                m, sd = np.nanmean(v, axis=0), np.nanstd(v, axis=0, ddof=1)
                cells.append(f"{m[0]:.2f} ± {sd[0]:.2f} / {m[1]:.2f} ± {sd[1]:.2f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    # combinations chosen on one half of the grid, checked on the other
    combos = [
        k
        for k in names
        if ("entropy" in k or k.startswith("features[")) and all(k in results[r.name] for r in runs)
    ]
    half_a = [r for r in runs if "laptop" in r.name] or runs[::2]
    half_b = [r for r in runs if r not in half_a] or runs[1::2]

    def mean_d(rs, k):
        return float(np.nanmean([results[r.name][k][0] + results[r.name][k][1] for r in rs]))

    lines += ["", "Combinations chosen on one half (max mean of domain + frame Spearman):", ""]
    for tr, te, label in ((half_a, half_b, "A->B"), (half_b, half_a, "B->A")):
        if not tr or not te:
            continue
        best = max(combos, key=lambda k: mean_d(tr, k))
        lines.append(
            f"- {label}: chose '{best}' on {[r.name for r in tr]} "
            f"(mean d+f {mean_d(tr, best):.2f});"
            f" on {[r.name for r in te]}: "
            + ", ".join(
                f"{r.name} {results[r.name][best][0]:.2f}/{results[r.name][best][1]:.2f}"
                for r in te
            )
        )
    # the fit-sample cap (issue 12): does a capped fit rank as well as the full one?
    lines += ["", "Fit-sample cap (default score) — per domain / per frame Spearman:", ""]
    caps = [32, 64, 128, 192, 256, None]
    lines.append("| cap | " + " | ".join(r.name for r in runs) + " |")
    lines.append("|" + "---|" * (len(runs) + 1))
    for cap in caps:
        cells = []
        for r in runs:
            rows = r.train_sample(cap)
            e = r.z["ent_mean"] / entropy_ref(r, rows) - 1
            s = feature_score(r, rows, args.cap_features) + args.cap_weight * (
                np.maximum(e, 0) if args.cap_excess else e
            )
            d, f = r.evaluate(s)
            cells.append(f"{d:.2f} / {f:.2f} (n={len(rows)})")
        lines.append(f"| {cap or 'full'} | " + " | ".join(cells) + " |")
    # the caution level of the chosen score: calibrated on half of the held-out structures
    # (even image index), checked on the other half
    from napari_hrtem_transfer.evaluation.ood import calibrate_caution_level

    lines += ["", f"Caution level of '{args.chosen}' (calibrated on even, checked on odd images):"]
    lines += ["", "| run | level | bad frames flagged (recall) | flagged frames bad (precision) |"]
    lines.append("|---|---|---|---|")
    for r in runs:
        c = candidates(r)
        if args.chosen not in c:
            continue
        sc, z = c[args.chosen][0], r.z
        ind = np.isin(z["domain"], z["train_domains"])
        even = z["image"] % 2 == 0
        q95, rec = calibrate_caution_level(sc[even], z["loss"][even], ind[even])
        level = isotonic_level(sc[even], z["loss"][even] > rec["loss_threshold"])
        odd = ~even
        bad = z["loss"][odd] > rec["loss_threshold"]
        for lv, how in ((level, "isotonic"), (q95, "q95 in-domain")):
            flag = sc[odd] > lv
            recall = np.mean(flag[bad]) if bad.any() else float("nan")
            prec = np.mean(bad[flag]) if flag.any() else float("nan")
            lines.append(
                f"| {r.name} {how} | {lv:.2f} | {recall:.2f} ({bad.sum()} bad) | {prec:.2f} "
                f"({flag.sum()} flagged) |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        (args.out.with_suffix(".json")).write_text(
            json.dumps(
                {k: {n: list(v) for n, v in d.items()} for k, d in results.items()}, indent=1
            )
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--train-defocus", nargs="+", default=["10"], help="[nm] or 'all'")
    a.add_argument("--epochs", type=int, default=8)
    a.add_argument("--samples-per-epoch", type=int, default=256)
    a.add_argument("--patch-size", type=int, default=None)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--force", action="store_true")
    a.add_argument(
        "--tta-per-domain", type=int, default=None, help="D4 TTA on this many frames per domain"
    )
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("table")
    b.add_argument("runs", type=Path, nargs="+")
    b.add_argument("--out", type=Path)
    b.add_argument("--cap-features", default="shallow3")
    b.add_argument("--cap-weight", type=float, default=2.0)
    b.add_argument("--cap-excess", action="store_true", default=True)
    b.add_argument(
        "--chosen",
        default=(
            "max(boundary entropy z,-3) + max(log band width z,-3) + 2*max(features[shallow3],0)"
        ),
    )
    c = sub.add_parser("extras")
    c.add_argument("runs", type=Path, nargs="+")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--max-train", type=int, default=64)
    c.add_argument("--force", action="store_true")
    e = sub.add_parser("external")
    e.add_argument("--model", default="pretrained")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--train-data", type=Path, required=True)
    e.add_argument("--name", default="shipped")
    e.add_argument("--max-train", type=int, default=192)
    e.add_argument("--max-images", type=int, default=10**6)
    e.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "extras":
        return extras(args)
    if args.cmd == "external":
        return external(args)
    if args.cmd == "prepare":
        args.train_defocus = [v if v == "all" else float(v) for v in args.train_defocus]
        args.out.mkdir(parents=True, exist_ok=True)
        return prepare(args)
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
