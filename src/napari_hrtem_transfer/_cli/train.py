"""``hrtem-transfer pretrain | finetune | segment``.

Nothing heavy is imported at module level (torch, HyperSpy and tqdm are imported inside
``run``), so ``hrtem-transfer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ReaderError


# ---------------------------------------------------------------------- shared options
def _defocus_list(values: list[str] | None, flag: str) -> list[float] | str:
    if not values:
        return "all"
    if len(values) == 1 and values[0].lower() in ("all", "mixture"):
        return "all"
    out: list[float] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(
                    f"{flag}: {part!r} is not a defocus in nm (or 'all').", flag
                ) from None
    if not out:
        raise ConfigError(
            f"{flag}: the domain selection is empty; give defoci in nm or 'all'.", flag
        )
    return out


def _add_common(p: argparse.ArgumentParser, finetune: bool) -> None:
    p.add_argument("--data", required=True, metavar="D", help="simulated dataset (.hspy)")
    p.add_argument(
        "--defocus",
        nargs="+",
        metavar="NM",
        default=None,
        help="training domain(s): defocus values in nm (e.g. '-10 -5' or '--defocus=-10,-5') "
        "or 'all' "
        "(the mixture baseline)" + ("" if finetune else "; default: all"),
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="checkpoint folder to create")
    p.add_argument(
        "--eval-defocus",
        nargs="+",
        metavar="NM",
        default=None,
        help="domains whose validation loss is recorded every epoch (default: all)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        metavar="N",
        help="number of training images drawn from the training structures (default: all)",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lr", type=float, default=1e-4 if finetune else 1e-3, help="initial learning rate"
    )
    p.add_argument("--lr-decay", type=float, default=0.99, help="learning-rate factor per epoch")
    p.add_argument(
        "--patch-size",
        type=int,
        default=256,
        help="random crop side in px (multiple of 32); 0 = whole images",
    )
    p.add_argument(
        "--samples-per-epoch",
        type=int,
        default=None,
        help="augmented samples per epoch (default: each training image once)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction of structures held out"
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the structure split (keep it equal for pretraining and fine-tuning)",
    )
    p.add_argument(
        "--max-val-images",
        type=int,
        default=None,
        help="at most this many validation structures per domain",
    )
    p.add_argument("--loss", choices=("bce", "bce_dice"), default="bce")
    p.add_argument("--no-augment", action="store_true", help="disable D4 augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    _add_common(p, finetune=False)
    p.add_argument(
        "--arch",
        choices=("compact", "resnet18"),
        default="compact",
        help="compact: CPU-sized U-Net (<2 M parameters); resnet18: the study's 14.3 M U-Net",
    )


def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, metavar="MODEL_DIR", help="pretrained checkpoint folder"
    )
    p.add_argument(
        "--which", choices=("best", "last"), default="best", help="checkpoint to start from"
    )
    p.add_argument(
        "--freeze",
        choices=("none", "encoder", "decoder", "gradual"),
        default="none",
        help="freezing protocol during fine-tuning",
    )
    _add_common(p, finetune=True)


def _config_from_args(args: argparse.Namespace, finetune: bool) -> Any:
    from ..training.config import TrainConfig

    train_d = _defocus_list(args.defocus, "--defocus")
    if finetune and train_d == "all" and not args.defocus:
        raise ConfigError(
            "--defocus: give the target domain(s) of the fine-tuning (or 'all').", "--defocus"
        )
    kw: dict[str, Any] = dict(
        train_defocus_nm=train_d,
        eval_defocus_nm=_defocus_list(args.eval_defocus, "--eval-defocus"),
        n_train=args.n_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        patch_size=None if args.patch_size == 0 else args.patch_size,
        samples_per_epoch=args.samples_per_epoch,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        max_val_images=args.max_val_images,
        loss=args.loss,
        augment=not args.no_augment,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        num_threads=args.threads,
        deterministic=args.deterministic,
    )
    if finetune:
        kw.update(init_from=Path(args.model), init_which=args.which, freeze=args.freeze)
    else:
        kw["model"] = {"architecture": args.arch}
    return TrainConfig(**kw)


@contextlib.contextmanager
def _sigint_to_stop(stop: threading.Event, prog: str) -> Iterator[None]:
    """First Ctrl-C requests a clean stop (checkpoint written); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            f"\n{prog}: stopping after the current step (Ctrl-C again to abort)...", file=sys.stderr
        )

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _Progress:
    """Terminal progress: a tqdm bar per epoch and one summary line per epoch."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.bar: Any = None

    def on_train_start(self, s: Any) -> None:
        print(
            f"{s.stage}: {s.n_train_images} training images, {s.n_val_structures} validation "
            f"structures, {s.steps_per_epoch} steps/epoch, {s.n_trainable:,}/{s.n_parameters:,} "
            f"trainable parameters, device {s.device}, precision {s.precision}"
            + (
                f", resuming at epoch {s.start_epoch + 1} step {s.start_step}"
                if s.start_epoch or s.start_step
                else ""
            ),
            flush=True,
        )

    def on_step(self, u: Any) -> None:
        if not self.show_bar:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=u.n_steps,
                initial=u.step,
                desc=f"epoch {u.epoch + 1}/{u.n_epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{u.loss:.4f}", img_s=f"{u.images_per_s:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch(self, u: Any) -> None:
        self.close()
        vals = "  ".join(f"{k}:{v:.4f}" for k, v in u.val_loss.items())
        print(
            f"epoch {u.epoch + 1}/{u.n_epochs}  train {u.train_loss:.4f}  "
            f"val(own) {u.val_loss_own:.4f}"
            f"{'  *best*' if u.is_best else ''}  lr {u.lr:.3g}  {u.time_s:.1f} s  "
            f"| val by defocus [nm] {vals}",
            flush=True,
        )

    def on_train_end(self, r: Any) -> None:
        self.close()


def _run_training(args: argparse.Namespace, finetune: bool) -> int:
    from ..training.loop import train

    prog = f"hrtem-transfer {'finetune' if finetune else 'pretrain'}"
    cfg = _config_from_args(args, finetune)
    stop = threading.Event()
    progress = _Progress(show_bar=not args.no_progress)
    try:
        with _sigint_to_stop(stop, prog):
            result = train(
                cfg, args.data, args.out, callbacks=[progress], stop=stop, resume=args.resume
            )
    finally:
        progress.close()
    if result.stopped:
        print(
            f"{prog}: stopped after {result.epochs_completed} complete epoch(s); the checkpoint in "
            f"{result.out_dir} is resumable: rerun the same command with --resume.",
            file=sys.stderr,
        )
        return 130
    print(
        f"done: best epoch {result.best_epoch + 1 if result.best_epoch is not None else '-'} "
        f"(val loss {result.best_val_loss:.4f}) in {result.time_s:.0f} s; "
        f"checkpoint {result.out_dir}"
    )
    # the label-free OOD score needs the training-domain feature distribution of the best model
    from ..evaluation.ood import fit_ood_reference_for_checkpoint
    from ..io import load_dataset

    print(
        fit_ood_reference_for_checkpoint(
            result.out_dir, load_dataset(args.data), device=args.device
        )
    )
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    return _run_training(args, finetune=False)


def _run_finetune(args: argparse.Namespace) -> int:
    return _run_training(args, finetune=True)


# ---------------------------------------------------------------------- segment
def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input", metavar="INPUT", help="image file (anything HyperSpy reads, .npy, .tif)"
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="checkpoint folder")
    p.add_argument(
        "--out", required=True, metavar="OUTPUT", help="mask file: .hspy, .tif/.tiff or .npy"
    )
    p.add_argument("--which", choices=("best", "last"), default="best")
    p.add_argument(
        "--proba", action="store_true", help="also write the probability map as OUTPUT_proba.<ext>"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the mask")
    p.add_argument("--tile-size", type=int, default=2048, help="largest tile side [px]")
    p.add_argument("--overlap", type=int, default=128, help="tile overlap [px]")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per forward pass")
    p.add_argument(
        "--sampling",
        type=float,
        default=None,
        help="pixel size of the input [Å/px], overriding the file's calibration",
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="resample the input to the model's training pixel size (and the result back)",
    )
    p.add_argument(
        "--sampling-tolerance",
        type=float,
        default=0.1,
        help="relative pixel-size mismatch above which a warning is printed",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


class _Input:
    """One image or stack read from INPUT: data (n, H, W), pixel size, axes for the output."""

    def __init__(
        self, data: Any, sampling_A: float | None, axes: list[dict] | None, name: str, squeeze: bool
    ) -> None:
        self.data = data
        self.sampling_A = sampling_A
        self.axes = axes
        self.name = name
        self.squeeze = squeeze


def _check_array(arr: Any, path: Path) -> tuple[Any, bool]:
    import numpy as np

    arr = np.asarray(arr)
    if arr.dtype.names is not None:
        raise ConfigError(
            f"{path}: RGB/colour images cannot be segmented; convert to grey first.", "INPUT"
        )
    if arr.dtype.kind not in "uif":
        raise ConfigError(f"{path}: image dtype {arr.dtype} is not a real number type.", "INPUT")
    if arr.ndim < 2:
        raise ConfigError(
            f"{path}: a {arr.ndim}-D signal is not an image; segment needs 2-D images.", "INPUT"
        )
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        raise ConfigError(
            f"{path}: shape {arr.shape} looks like an RGB(A) image; convert to grey first.", "INPUT"
        )
    squeeze = arr.ndim == 2
    arr = arr.reshape(-1, *arr.shape[-2:])
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ConfigError(
            f"{path}: the image contains NaN or infinite values; fill or crop them first.", "INPUT"
        )
    if min(arr.shape[-2:]) < 8:
        raise ConfigError(
            f"{path}: image of {arr.shape[-2]}x{arr.shape[-1]} px is too small.", "INPUT"
        )
    return arr, squeeze


def _clean_axes(axes: list[dict] | None) -> list[dict] | None:
    if not axes:
        return None
    keep = ("name", "size", "scale", "offset", "units", "navigate", "axis")
    return [
        {k: v for k, v in a.items() if k in keep and v is not None and v != "<undefined>"}
        for a in axes
    ]


def _read_input(path: Path) -> list[_Input]:
    import numpy as np

    if not path.exists():
        raise ReaderError(f"input file {path} does not exist.")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ReaderError(f"cannot read {path}: {exc}") from exc
        data, squeeze = _check_array(arr, path)
        return [_Input(data, None, None, path.stem, squeeze)]
    import warnings

    from ..io.readers import read_images

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = read_images(path)
    for w in caught:  # colour conversion is refused below with its own message
        if "RGB" not in str(w.message):
            print(f"hrtem-transfer segment: warning: {w.message}", file=sys.stderr)
    out = []
    for im in images:
        notes = " ".join(str(n) for n in (im.metadata or {}).get("reader_notes", []))
        if "RGB" in notes:
            raise ConfigError(
                f"{path}: {im.name} is an RGB colour image; segment needs the grey-level "
                "detector image (a colour file is usually a rendered screenshot, not counts).",
                "INPUT",
            )
        data, _ = _check_array(im.data, path)
        axes = _clean_axes(list(im.axes) if im.axes else None)
        squeeze = data.shape[0] == 1
        if squeeze and axes is not None:
            axes = axes[-2:]
        out.append(_Input(data, im.sampling_A, axes, im.name or path.stem, squeeze))
    return out


def _write_output(path: Path, data: Any, item: _Input, title: str, overwrite: bool) -> None:
    import numpy as np

    from ..io._atomic import atomic_path

    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; use --overwrite to replace it.", "--out")
    arr = data[0] if item.squeeze else data
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, arr)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            kw: dict[str, Any] = {}
            if item.sampling_A:
                nm = item.sampling_A / 10.0
                kw = {
                    "resolution": (1.0 / nm, 1.0 / nm),
                    "imagej": True,
                    "metadata": {"unit": "nm"},
                }
            tifffile.imwrite(tmp, arr, **kw)
        else:
            import hyperspy.api as hs

            axes = item.axes
            if axes is not None and len(axes) != arr.ndim:
                axes = axes[-2:] if len(axes) >= 2 else None
                if axes is not None and arr.ndim == 3:
                    axes = [{"name": "image", "size": arr.shape[0]}, *axes]
            if axes is None and item.sampling_A:
                axes = [
                    {"size": n, "scale": item.sampling_A / 10.0, "units": "nm", "name": nm_}
                    for n, nm_ in zip(arr.shape[-2:], ("y", "x"), strict=True)
                ]
                if arr.ndim == 3:
                    axes = [{"size": arr.shape[0], "name": "image"}, *axes]
            if axes is not None:
                axes = [{**a, "size": int(n)} for a, n in zip(axes, arr.shape, strict=True)]
            s = hs.signals.Signal2D(arr, axes=axes) if axes else hs.signals.Signal2D(arr)
            s.metadata.General.title = title
            s.save(tmp, overwrite=True)


def _output_paths(out: Path, n: int, proba: bool) -> list[tuple[Path, Path | None]]:
    res = []
    for k in range(n):
        base = out if n == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
        res.append((base, base.with_name(f"{base.stem}_proba{base.suffix}") if proba else None))
    return res


def _report_ood(args: argparse.Namespace, lm, ref, frames, mask_path: Path) -> None:
    """Print each frame's label-free OOD score and write them to ``<mask>.ood.json``."""
    import json

    from ..evaluation.ood import ood_scores
    from ..io._atomic import atomic_path

    scores = ood_scores(lm, frames, reference=ref)
    values = [float(v) for v in scores.score]
    for i, v in enumerate(values[:20]):
        flag = "  <- far from the training data" if v > 1.0 else ""
        print(f"  frame {i}: OOD score {v:.2f}{flag}")
    if len(values) > 20:
        print(f"  ... {len(values) - 20} more frames; max OOD score {max(values):.2f}")
    out = mask_path.with_name(mask_path.stem + ".ood.json")
    with atomic_path(out) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "meaning": "label-free OOD score per frame: about 0 for training-like frames, "
                    "growing with distance from the training data (> 1: treat with caution)",
                    "ood_score": values,
                    "feature_distance": [float(v) for v in scores.distance],
                },
                indent=2,
            )
        )
    print(f"wrote {out}")


def _run_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io._atomic import check_writable

    prog = "hrtem-transfer segment"
    out = Path(args.out)
    if out.suffix.lower() not in (".hspy", ".tif", ".tiff", ".npy"):
        raise ConfigError(f"--out {out}: choose a name ending in .hspy, .tif or .npy.", "--out")
    check_writable(out)
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(
            f"--threshold must be between 0 and 1 (got {args.threshold}).", "--threshold"
        )
    from ..training.checkpoint import load_checkpoint

    lm = load_checkpoint(args.model, args.which, device=args.device)
    items = _read_input(Path(args.input))
    paths = _output_paths(out, len(items), args.proba)
    for mask_path, proba_path in paths:
        for p in (mask_path, proba_path):
            if p is not None and p.exists() and not args.overwrite:
                raise ConfigError(f"{p} exists; use --overwrite to replace it.", "--out")
    model_s = lm.sampling_A
    from ..evaluation.ood import load_ood_reference

    ood_ref = load_ood_reference(args.model, lm.info.get("weights_sha256"))
    if ood_ref is None:
        print(
            f"{prog}: note: {args.model} has no OOD reference, so frames get no label-free OOD "
            "score (fit one with 'hrtem-transfer evaluate --fit-ood').",
            file=sys.stderr,
        )
    for item, (mask_path, proba_path) in zip(items, paths, strict=True):
        s_in = args.sampling if args.sampling is not None else item.sampling_A
        data = item.data
        zoom = None
        if s_in is None and model_s is not None:
            print(
                f"{prog}: note: the pixel size of {item.name} is unknown; assuming the model's "
                f"{model_s:g} Å/px (give --sampling to check).",
                file=sys.stderr,
            )
        elif s_in is not None and model_s and abs(s_in / model_s - 1.0) > args.sampling_tolerance:
            if args.resample:
                zoom = s_in / model_s
                print(
                    f"{prog}: resampling {item.name} from {s_in:g} to {model_s:g} Å/px.",
                    file=sys.stderr,
                )
            else:
                print(
                    f"{prog}: warning: {item.name} has {s_in:g} Å/px but the model was trained at "
                    f"{model_s:g} Å/px; results may be poor. Use --resample.",
                    file=sys.stderr,
                )
        if zoom is not None:
            from scipy import ndimage

            data = np.stack([ndimage.zoom(im.astype(np.float32), zoom, order=1) for im in data])
        proba = lm.predict_proba(
            data,
            tile_size=args.tile_size,
            overlap=args.overlap,
            batch_size=args.batch_size,
            precision=args.precision,
        )
        if zoom is not None:
            from scipy import ndimage

            h, w = item.data.shape[-2:]
            proba = np.stack(
                [
                    ndimage.zoom(pm, (h / pm.shape[0], w / pm.shape[1]), order=1)[:h, :w]
                    for pm in proba
                ]
            ).astype(np.float32)
        mask = (proba >= args.threshold).astype(np.uint8)
        _write_output(mask_path, mask, item, f"Particle mask of {item.name}", args.overwrite)
        print(f"wrote {mask_path} ({mask.shape[0]} image(s), {100 * mask.mean():.1f}% particle)")
        if ood_ref is not None:
            _report_ood(args, lm, ood_ref, data, mask_path)
        if proba_path is not None:
            _write_output(
                proba_path, proba, item, f"Particle probability of {item.name}", args.overwrite
            )
            print(f"wrote {proba_path}")
    return 0


COMMANDS = [
    (
        "pretrain",
        "Pretrain a U-Net on simulated domains of a dataset.",
        _add_pretrain,
        _run_pretrain,
    ),
    (
        "finetune",
        "Fine-tune a pretrained U-Net on a (small) target-domain training set.",
        _add_finetune,
        _run_finetune,
    ),
    (
        "segment",
        "Segment nanoparticles in images with a trained U-Net.",
        _add_segment,
        _run_segment,
    ),
]

__all__ = ["COMMANDS"]
