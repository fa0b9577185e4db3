"""Training data: domain selection, structure-wise split, subsets, crops and D4 augmentation.

Pure numpy (no torch).  The sampling of every epoch (order, crops, dihedral transforms) is a
function of ``(seed, epoch)`` only, so a run resumed at step ``k`` of an epoch draws exactly
the batches an uninterrupted run would have drawn.

Frames of any size train: the crop is ``patch_size`` if it fits, else the largest multiple of
the model's output stride (16 px for the compact U-Net, 32 px for ResNet-18) that fits both
sides (see :func:`training_crop`); a few annotated experimental frames of e.g. 300 x 200 px
therefore fine-tune without padding or resampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DatasetError
from ..io.dataset import HRTEMDataset, load_dataset
from ..models.normalization import apply_normalization
from .augment import (  # noqa: F401  (public names of the augmentations, kept here too)
    coarser_detail,
    d4,
    d4_transform,
    renoise,
    rescale_frame,
)
from .config import TrainConfig


def open_dataset(data: HRTEMDataset | str | os.PathLike) -> HRTEMDataset:
    """Return ``data`` if it is a dataset, else load it lazily from its ``.hspy`` path."""
    if isinstance(data, HRTEMDataset):
        return data
    return load_dataset(Path(data), lazy=True)


def _name(ds: HRTEMDataset) -> str:
    return str(ds.path) if ds.path is not None else "the dataset"


def select_domains(ds: HRTEMDataset, defocus_nm: list[float] | str) -> list[int]:
    """Indices of the domains ``defocus_nm`` [nm] (or ``"all"``) in ``ds``.

    Raises
    ------
    DatasetError
        If a defocus is not in the dataset (the message lists the available defoci).
    ConfigError
        If the selection is empty.
    """
    if isinstance(defocus_nm, str):
        if defocus_nm != "all":
            raise ConfigError(
                f"domain selection must be a list of defoci or 'all' (got {defocus_nm!r})"
            )
        return list(range(ds.n_defocus))
    if len(defocus_nm) == 0:
        raise ConfigError("the domain selection is empty; give defoci [nm] or 'all'", "defocus")
    idx = [ds.defocus_index(float(d)) for d in defocus_nm]
    return sorted(set(idx))


def domain_key(defocus_nm: float) -> str:
    """The string key of a domain in histories and sidecars: the defocus [nm] as ``%g``."""
    return f"{float(defocus_nm):g}"


def split_structures(
    structure_ids: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split the images by structure id into training and validation image indices.

    Every image of a structure goes to the same side, so no structure appears in both.

    Parameters
    ----------
    structure_ids
        Structure id of each image, shape (n_images,).
    val_fraction
        Fraction of the distinct structures held out (at least one on each side).
    seed
        Seed of the split.

    Returns
    -------
    train_idx, val_idx
        Sorted image indices.

    Raises
    ------
    DatasetError
        If there are fewer than two distinct structures.
    """
    ids = np.asarray(structure_ids).astype(str)
    uniq = np.unique(ids)
    if uniq.size < 2:
        raise DatasetError(
            f"the dataset has {uniq.size} distinct structure(s); a train/validation split by "
            "structure needs at least 2."
        )
    rng = np.random.default_rng([int(seed), 0x5EED])
    perm = rng.permutation(uniq.size)
    n_val = int(np.clip(round(val_fraction * uniq.size), 1, uniq.size - 1))
    val_ids = set(uniq[perm[:n_val]].tolist())
    is_val = np.array([s in val_ids for s in ids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def dataset_fingerprint(ds: HRTEMDataset) -> str:
    """A sha256 fingerprint of the dataset's identity (not of every pixel).

    Hashes the shape, dtype, defoci, sampling, structure ids, masks and the provenance record
    (simulation config and seeds); cheap even for large lazy files.
    """
    h = hashlib.sha256()
    meta = {
        "shape": list(ds.images.shape),
        "dtype": str(ds.images.dtype),
        "defocus_nm": [float(v) for v in ds.defocus_nm],
        "sampling_A": float(ds.sampling_A),
        "structure_ids": [str(s) for s in ds.structure_ids],
        "info": {k: v for k, v in ds.info.items() if k not in ("versions",)},
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    if ds.masks is not None:
        h.update(np.ascontiguousarray(ds.masks, dtype=np.uint8).tobytes())
    return h.hexdigest()


def training_crop(
    image_shape: tuple[int, int], patch_size: int | None, stride: int = 32
) -> tuple[int, int]:
    """The size (cy, cx) [px] of the training crops for images of ``image_shape``.

    The rule: ``patch_size`` (a multiple of ``stride``) if it fits in both sides; else the
    largest multiple of ``stride`` that fits both sides (square crops).  With
    ``patch_size=None`` (whole images) each side is cut down to its largest multiple of
    ``stride``.  Crops never extend beyond the image: no padding, no invented content.

    Parameters
    ----------
    image_shape
        (ny, nx) [px].
    patch_size
        Requested crop side [px], or None for whole images.
    stride
        The model's output stride; both crop sides are multiples of it.

    Returns
    -------
    (cy, cx)

    Raises
    ------
    DatasetError
        If a side of the images is smaller than ``stride``.
    """
    ny, nx = (int(v) for v in image_shape)
    if min(ny, nx) < stride:
        raise DatasetError(
            f"the images are {ny}x{nx} px; training needs at least {stride} px on each side."
        )
    if patch_size is None:
        return ny // stride * stride, nx // stride * stride
    side = min(int(patch_size), min(ny, nx) // stride * stride)
    return side, side


def _recorded(value: Any, default: float | None) -> float | None:
    """A recorded dose entry as a float; ``default`` where it is missing (None or NaN)."""
    if value is None:
        return default
    value = float(value)
    return default if np.isnan(value) else value


@dataclass
class TrainingData:
    """The arrays and the sampling plan of one training stage.

    Attributes
    ----------
    dataset
        The source dataset.
    train_domains, eval_domains
        Domain indices used for training and recorded in validation.
    train_items
        (n, 2) int array of (domain index, image index) training samples.
    val_images
        Validation image indices per evaluated domain (structures not used in training).
    train_structures, val_structures
        Distinct structure ids on each side of the split.
    stride
        The model's output stride [px]; crops and validation images are multiples of it.
    crop
        Size (cy, cx) [px] of the training crops (:func:`training_crop`).
    normalization
        The model's input preprocessing record (:func:`apply_normalization`), applied to
        every whole frame exactly as inference applies it.
    """

    dataset: HRTEMDataset
    config: TrainConfig
    train_domains: list[int]
    eval_domains: list[int]
    train_items: np.ndarray
    val_images: np.ndarray
    train_structures: list[str]
    val_structures: list[str]
    stride: int = 32
    crop: tuple[int, int] | None = None
    normalization: dict[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _cached: bool = False

    # -------------------------------------------------------------- construction
    @classmethod
    def prepare(
        cls,
        config: TrainConfig,
        ds: HRTEMDataset,
        stride: int = 32,
        normalization: dict[str, Any] | None = None,
    ) -> TrainingData:
        """Validate the selection against ``ds`` and draw the split and the subset.

        ``normalization`` is the model's preprocessing record; None: the record of
        ``config.preprocessing`` at the dataset's pixel size (what a new model stores).

        Raises
        ------
        DatasetError
            No masks, a defocus not in the file, too few structures, NaNs in the images.
        ConfigError
            Empty selection, ``n_train`` larger than available, a patch larger than the
            images.
        """
        if ds.masks is None:
            raise DatasetError(
                f"{_name(ds)} has no ground-truth masks; training needs a labelled dataset "
                "(simulate one with 'hrtem-transfer simulate')."
            )
        train_domains = select_domains(ds, config.train_defocus_nm)
        eval_domains = sorted(set(select_domains(ds, config.eval_defocus_nm)) | set(train_domains))
        train_idx, val_idx = split_structures(
            ds.structure_ids, config.val_fraction, config.split_seed
        )
        items = np.array([(d, i) for d in train_domains for i in train_idx], dtype=np.int64)
        if config.n_train is not None:
            if config.n_train > len(items):
                raise ConfigError(
                    f"n_train={config.n_train} is larger than the {len(items)} training images "
                    f"available in {_name(ds)} ({len(train_idx)} training structures x "
                    f"{len(train_domains)} domain(s); {len(val_idx)} structures are held out "
                    "for validation).",
                    "n_train",
                )
            seed = config.seed if config.subset_seed is None else config.subset_seed
            rng = np.random.default_rng([int(seed), 0x5B5E7])
            pick = np.sort(rng.choice(len(items), size=config.n_train, replace=False))
            items = items[pick]
        if config.max_val_images is not None:
            val_idx = val_idx[: config.max_val_images]
        ny, nx = ds.image_shape
        p = config.patch_size
        crop = training_crop((ny, nx), p, stride)
        if p is not None and crop[0] < p:
            warnings.warn(
                f"patch_size {p} px is larger than the images ({ny}x{nx} px); training on "
                f"{crop[0]}x{crop[1]} px crops, the largest multiple of {stride} px that fits.",
                UserWarning,
                stacklevel=3,
            )
        sids = np.asarray(ds.structure_ids).astype(str)
        out = cls(
            dataset=ds,
            config=config,
            train_domains=train_domains,
            eval_domains=eval_domains,
            train_items=items,
            val_images=val_idx,
            train_structures=sorted(set(sids[np.unique(items[:, 1])].tolist())),
            val_structures=sorted(set(sids[val_idx].tolist())),
            stride=stride,
            crop=crop,
            normalization=dict(normalization or config.preprocessing.record(ds.sampling_A)),
        )
        out._maybe_cache()
        return out

    def _needed(self) -> dict[int, np.ndarray]:
        need: dict[int, set[int]] = {}
        for d, i in self.train_items.tolist():
            need.setdefault(d, set()).add(i)
        for d in self.eval_domains:
            need.setdefault(d, set()).update(self.val_images.tolist())
        return {d: np.array(sorted(v), dtype=np.int64) for d, v in need.items()}

    def _maybe_cache(self) -> None:
        need = self._needed()
        ny, nx = self.dataset.image_shape
        nbytes = sum(len(v) for v in need.values()) * ny * nx * 4
        if nbytes > self.config.cache_bytes:
            return
        for d, idx in need.items():
            block = self.dataset.images[d][idx]
            block = np.asarray(block.compute() if hasattr(block, "compute") else block)
            self._check_finite(block, d, idx)
            # dose augmentation re-noises raw frames: keep those, normalise per sample
            std = block if self._renoise else self.normalize(block)
            for j, i in enumerate(idx.tolist()):
                self._cache[(d, i)] = std[j]
        self._cached = True

    @property
    def _renoise(self) -> bool:
        return self.config.dose_augment_e_per_A2 is not None

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """The model's input preprocessing of raw frames (..., H, W) of this dataset."""
        return apply_normalization(raw, self.normalization, sampling_A=self.dataset.sampling_A)

    def _check_finite(self, block: np.ndarray, d: int, idx: np.ndarray) -> None:
        if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
            bad = np.flatnonzero(~np.isfinite(block.reshape(len(idx), -1)).all(axis=1))
            raise DatasetError(
                f"{_name(self.dataset)}: image(s) {idx[bad][:10].tolist()} at defocus "
                f"{self.dataset.defocus_nm[d]:g} nm contain NaN or infinite values."
            )

    # -------------------------------------------------------------- access
    def raw_image(self, d: int, i: int) -> np.ndarray:
        """The dataset's raw frame (ny, nx) of domain ``d``, structure index ``i``."""
        key = (int(d), int(i))
        if self._renoise and key in self._cache:
            return self._cache[key]
        raw = self.dataset.images[key[0], key[1]]
        raw = np.asarray(raw.compute() if hasattr(raw, "compute") else raw)
        self._check_finite(raw[None], key[0], np.array([key[1]]))
        return raw

    def image(self, d: int, i: int) -> np.ndarray:
        """Preprocessed float32 image (ny, nx) of domain ``d``, structure index ``i``."""
        key = (int(d), int(i))
        if key in self._cache and not self._renoise:
            return self._cache[key]
        return self.normalize(self.raw_image(*key))

    def recorded_dose(self, d: int, i: int) -> float | None:
        """The dose [e/Å²] the frame of domain ``d``, structure index ``i`` was recorded at.

        The image's own dose where the dataset records one, as the simulator does for a
        per-image dose range (``info["per_image"]["dose_e_per_A2"][d][i]``, shape (n_defocus,
        n_images) like ``actual_defocus_nm``) or the independent test sets do per structure
        (``info["structures"][i]["dose_e_per_A2"]``); else the file's ``dose_e_per_A2``, which
        for a dose-range simulation is only the range's geometric mean.  None: noise-free
        (a None/NaN entry of the tables counts as not recorded; an infinite one as noise-free).

        Raises
        ------
        DatasetError
            If the recorded dose is not positive.
        """
        d, i = int(d), int(i)
        ds = self.dataset
        info = ds.info or {}
        dose = ds.dose_e_per_A2
        meta = info.get("structures")
        if isinstance(meta, (list, tuple)) and i < len(meta) and isinstance(meta[i], dict):
            dose = _recorded(meta[i].get("dose_e_per_A2"), dose)
        table = (info.get("per_image") or {}).get("dose_e_per_A2")
        if table is not None and d < len(table) and i < len(table[d]):
            dose = _recorded(table[d][i], dose)
        if dose is None or not np.isfinite(dose):
            return None
        if not dose > 0:
            raise DatasetError(
                f"{_name(ds)}: image {i} at defocus {ds.defocus_nm[d]:g} nm has a recorded dose "
                f"of {dose:g} e/Å²; a dose must be positive."
            )
        return float(dose)

    def renoised_image(
        self, d: int, i: int, target_e_per_A2: float, rng: np.random.Generator
    ) -> np.ndarray:
        """The raw frame ``(d, i)`` re-noised to ``target_e_per_A2`` [e/Å²] (:func:`renoise`)
        from the dose it was recorded at (:meth:`recorded_dose`), in counts per pixel."""
        return renoise(
            self.raw_image(d, i),
            self.recorded_dose(d, i),
            target_e_per_A2,
            self.dataset.sampling_A,
            rng,
        )

    def mask(self, i: int) -> np.ndarray:
        """Ground-truth mask (ny, nx) float32 of image ``i``."""
        return self.dataset.masks[int(i)].astype(np.float32)

    @property
    def crop_size(self) -> tuple[int, int]:
        """Size (cy, cx) [px] of the training crops."""
        if self.crop is None:
            self.crop = training_crop(self.dataset.image_shape, self.config.patch_size, self.stride)
        return self.crop

    @property
    def n_train(self) -> int:
        """Number of training samples (domain, structure pairs)."""
        return int(len(self.train_items))

    def steps_per_epoch(self) -> int:
        """Optimisation steps per epoch."""
        n = self.config.samples_per_epoch or self.n_train
        return -(-n // self.config.batch_size)

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The epoch's samples as an (n, 4) int array: item index, D4 code, crop y, crop x.

        With pixel-size or dose augmentation, (n, 7); with resolution augmentation, (n, 8):
        see :meth:`_extra_columns`.

        A function of ``(config.seed, epoch)`` only.
        """
        cfg = self.config
        rng = np.random.default_rng([int(cfg.seed), int(epoch), 0xE70C])
        n = cfg.samples_per_epoch or self.n_train
        reps = -(-n // self.n_train)
        order = np.concatenate([rng.permutation(self.n_train) for _ in range(reps)])[:n]
        ny, nx = self.dataset.image_shape
        cy, cx = self.crop_size
        if cfg.augment:
            codes = rng.integers(0, 8, size=n)
            if cy != cx:  # quarter turns would change the shape
                codes = codes - codes % 2
        else:
            codes = np.zeros(n, dtype=np.int64)
        if cfg.patch_size is None and (cy, cx) == (ny, nx):
            ys = np.zeros(n, dtype=np.int64)
            xs = np.zeros(n, dtype=np.int64)
        else:
            ys = rng.integers(0, ny - cy + 1, size=n)
            xs = rng.integers(0, nx - cx + 1, size=n)
        plan = np.stack([order, codes, ys, xs], axis=1).astype(np.int64)
        if (
            cfg.pixel_size_augment > 1.0
            or cfg.dose_augment_e_per_A2 is not None
            or cfg.resolution_augment > 1.0
        ):
            plan = self._extra_columns(plan, epoch)
        return plan

    def _extra_columns(self, plan: np.ndarray, epoch: int) -> np.ndarray:
        """Columns 4-6: magnification x 1e6, target dose [e/Å²] x 1e3 (0: none), noise seed.

        Drawn from their own stream, so columns 0-3 (order, D4 code) are those of a run
        without these augmentations; with pixel-size augmentation columns 2-3 are the origin
        of the source region (``crop / factor`` px; centred, and mirrored at the borders,
        where it is larger than the frame).
        """
        cfg = self.config
        rng = np.random.default_rng([int(cfg.seed), int(epoch), 0x5CA1E])
        n = len(plan)
        ny, nx = self.dataset.image_shape
        cy, cx = self.crop_size
        log_r = np.log(cfg.pixel_size_augment)
        factor = np.exp(rng.uniform(-log_r, log_r, size=n)) if log_r > 0 else np.ones(n)
        scale = np.round(factor * 1e6).astype(np.int64)
        if log_r > 0:
            f = scale / 1e6
            for col, size, c in ((2, ny, cy), (3, nx, cx)):
                h = np.ceil(c / f).astype(np.int64)
                u = rng.uniform(size=n)
                fits = h <= size
                plan[:, col] = np.where(
                    fits, np.floor(u * (size - h + 1)).astype(np.int64), (size - h) // 2
                )
        dose = np.zeros(n, dtype=np.int64)
        if cfg.dose_augment_e_per_A2 is not None:
            lo, hi = np.log(cfg.dose_augment_e_per_A2)
            target = np.exp(rng.uniform(lo, hi, size=n))
            on = rng.uniform(size=n) < cfg.dose_augment_probability
            dose = np.where(on, np.maximum(np.round(target * 1e3), 1), 0).astype(np.int64)
        seeds = rng.integers(0, 2**31 - 1, size=n)
        cols = [plan, scale, dose, seeds]
        if cfg.resolution_augment > 1.0:  # column 7: coarsening factor x 1e6, own stream
            r = np.random.default_rng([int(cfg.seed), int(epoch), 0x8E50])
            g = np.exp(r.uniform(0.0, np.log(cfg.resolution_augment), size=n))
            cols.append(np.round(np.where(r.uniform(size=n) < 0.5, g, 1.0) * 1e6))
        return np.column_stack(cols).astype(np.int64)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's plan cut into batches of ``config.batch_size``."""
        plan = self.epoch_plan(epoch)
        b = self.config.batch_size
        return [plan[k : k + b] for k in range(0, len(plan), b)]

    def load_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and masks of one batch, each float32 (B, 1, cy, cx) (see :attr:`crop_size`)."""
        xs, ys = [], []
        for row in rows.tolist():
            img, msk = self.sample(row)
            xs.append(img)
            ys.append(msk)
        return (
            np.ascontiguousarray(np.stack(xs)[:, None], dtype=np.float32),
            np.ascontiguousarray(np.stack(ys)[:, None], dtype=np.float32),
        )

    def sample(self, row: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image and mask (cy, cx) of one plan row (:meth:`epoch_plan`), augmented.

        As ``segment`` treats a frame: the raw frame (re-noised to the row's dose, rescaled
        to the row's pixel size with the noise of that pixel size, coarsened) is
        preprocessed whole, then cropped.
        """
        cy, cx = self.crop_size
        item, code, y0, x0 = row[:4]
        d, i = self.train_items[item]
        factor, dose, seed = (row[4] / 1e6, row[5] / 1e3, row[6]) if len(row) > 4 else (1, 0, 0)
        coarse = row[7] / 1e6 if len(row) > 7 else 1.0
        if dose == 0 and coarse == 1 and factor == 1:
            full, msk = self.image(d, i), self.mask(i)
        else:
            if dose > 0:
                raw = self.renoised_image(d, i, dose, np.random.default_rng([int(seed), 0xD05E]))
            else:
                raw = self.raw_image(d, i)
            msk = self.mask(i)
            if factor != 1:
                raw, msk, (y0, x0) = self._rescaled(raw, msk, d, i, factor, (y0, x0), seed, dose)
            full = self.normalize(coarser_detail(raw, coarse) if coarse > 1 else raw)
        img = full[y0 : y0 + cy, x0 : x0 + cx]
        msk = msk[y0 : y0 + cy, x0 : x0 + cx]
        return d4_transform(img, code), d4_transform(msk, code)

    def _rescaled(self, raw, mask, d, i, factor, origin, seed, dose):
        """The whole frame at ``factor`` times smaller pixels (:func:`rescale_frame`, with
        the noise of the new pixel size where the frame has counts), and the crop's origin
        in it: the plan's source origin ``origin`` [px] times ``factor``."""
        cy, cx = self.crop_size
        shape, start, crop_at = [], [], []
        for n, c, o in zip(raw.shape, (cy, cx), origin, strict=True):
            m = max(c, round(n * factor))
            s = 0.0 if round(n * factor) >= c else (n - m / factor) / 2  # centred, mirrored
            shape.append(m)
            start.append(s)
            crop_at.append(int(np.clip(round((o - s) * factor), 0, m - c)))
        noisy = dose > 0 or self.recorded_dose(d, i) is not None
        rng = np.random.default_rng([int(seed), 0x5CA1E]) if noisy else None
        img, msk = rescale_frame(raw, mask, factor, tuple(shape), tuple(start), rng)
        return img, msk, tuple(crop_at)

    def val_batches(self, d: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Validation images of domain ``d`` (whole, cropped to a multiple of the stride)."""
        ny, nx = self.dataset.image_shape
        cy, cx = ny // self.stride * self.stride, nx // self.stride * self.stride
        oy, ox = (ny - cy) // 2, (nx - cx) // 2
        out = []
        idx = self.val_images.tolist()
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            x = np.stack([self.val_image(d, i)[oy : oy + cy, ox : ox + cx] for i in chunk])
            y = np.stack([self.mask(i)[oy : oy + cy, ox : ox + cx] for i in chunk])
            out.append((x[:, None], y[:, None]))
        return out

    def val_image(self, d: int, i: int) -> np.ndarray:
        """A preprocessed validation image (ny, nx): at its recorded dose, or with
        ``validation_dose="augmented"`` re-noised to its own dose from the augmentation range
        (the same draw every epoch)."""
        cfg = self.config
        if cfg.validation_dose != "augmented" or cfg.dose_augment_e_per_A2 is None:
            return self.image(d, i)
        rng = np.random.default_rng([int(cfg.seed), int(d), int(i), 0x7A11D])
        lo, hi = np.log(cfg.dose_augment_e_per_A2)
        target = float(np.exp(rng.uniform(lo, hi)))
        if rng.uniform() >= cfg.dose_augment_probability:
            return self.image(d, i)
        return self.normalize(self.renoised_image(d, i, target, rng))

    def describe(self) -> dict[str, Any]:
        """JSON record of the data used (stored in the checkpoint sidecar)."""
        ds = self.dataset
        return {
            "path": str(ds.path) if ds.path is not None else None,
            "fingerprint": dataset_fingerprint(ds),
            "image_shape": list(ds.image_shape),
            "crop_px": list(self.crop_size),
            "sampling_A": float(ds.sampling_A),
            "dose_e_per_A2": ds.dose_e_per_A2,
            "train_defocus_nm": [float(ds.defocus_nm[d]) for d in self.train_domains],
            "eval_defocus_nm": [float(ds.defocus_nm[d]) for d in self.eval_domains],
            "n_train_images": self.n_train,
            "train_items": self.train_items.tolist(),
            "train_structures": self.train_structures,
            "val_structures": self.val_structures,
        }
