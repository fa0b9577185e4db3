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

from ..errors import ConfigError


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


#: TrainConfig field -> command-line flag.  Types, choices, defaults and help come from the
#: config (the one source of every default); flags left out keep the config's default.
FLAGS: dict[str, str] = {
    "n_train": "--n-train",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "lr_decay": "--lr-decay",
    "samples_per_epoch": "--samples-per-epoch",
    "val_fraction": "--val-fraction",
    "split_seed": "--split-seed",
    "max_val_images": "--max-val-images",
    "loss": "--loss",
    "dice_weight": "--dice-weight",
    "seed": "--seed",
    "device": "--device",
    "precision": "--precision",
    "num_threads": "--threads",
}
#: Fields with a hand-written flag (lists, switches, files).
SPECIAL_FLAGS: dict[str, str] = {
    "train_defocus_nm": "--defocus",
    "eval_defocus_nm": "--eval-defocus",
    "patch_size": "--patch-size",
    "augment": "--no-augment",
    "deterministic": "--deterministic",
    "model": "--arch",
    "init_from": "--model",
    "init_which": "--which",
    "freeze": "--freeze",
}


def _describe(name: str) -> tuple[str, Any]:
    """(help text, default) of a TrainConfig field."""
    from ..training.config import TrainConfig

    f = TrainConfig.model_fields[name]
    text = " ".join((f.description or name).split()).replace("%", "%%")
    return text, f.default


def _flag_kwargs(name: str, finetune: bool = False) -> dict[str, Any]:
    """argparse keyword arguments derived from a TrainConfig field."""
    import types
    import typing

    from ..training.config import TrainConfig

    f = TrainConfig.model_fields[name]
    text, default = _describe(name)
    if name == "lr" and finetune:
        default = f"{default:g}; {TrainConfig.finetune(Path('.'), 'all').lr:g} when fine-tuning"
    # SUPPRESS: an option left out keeps the config's default (shown in the help text)
    kw: dict[str, Any] = {
        "default": argparse.SUPPRESS,
        "dest": name,
        "help": f"{text} (default: {default})",
    }
    ann = f.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        ann = args[0]
    if typing.get_origin(ann) is typing.Literal:
        kw["choices"] = typing.get_args(ann)
    elif ann in (int, float):
        kw["type"] = ann
    return kw


def _add_common(p: argparse.ArgumentParser, finetune: bool) -> None:
    p.add_argument(
        "--data",
        required=not finetune,
        metavar="D",
        help="simulated dataset (.hspy)"
        + ("; or give --images and --labels to fine-tune on annotated frames" if finetune else ""),
    )
    text, _ = _describe("train_defocus_nm")
    p.add_argument(
        "--defocus",
        nargs="+",
        metavar="NM",
        default=None,
        help=f"{text} Give defoci in nm ('-10 -5' or '--defocus=-10,-5') or 'all'"
        + ("" if finetune else " (default: all)"),
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="checkpoint folder to create")
    text, _ = _describe("eval_defocus_nm")
    p.add_argument("--eval-defocus", nargs="+", metavar="NM", default=None, help=text)
    for name, flag in FLAGS.items():
        p.add_argument(flag, **_flag_kwargs(name, finetune))
    text, default = _describe("patch_size")
    p.add_argument(
        "--patch-size", type=int, default=None, help=f"{text} 0 = whole images (default: {default})"
    )
    p.add_argument("--no-augment", action="store_true", help="disable the D4 augmentation")
    text, _ = _describe("deterministic")
    p.add_argument("--deterministic", action="store_true", help=text)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    p.add_argument(
        "--no-ood-fit",
        action="store_true",
        help="do not fit the label-free OOD reference after training (fit it later with "
        "'hrtem-transfer evaluate --model MODEL_DIR --data D --fit-ood')",
    )


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    import typing

    from ..models.config import CompactUNetConfig, ResNet18UNetConfig

    _add_common(p, finetune=False)
    archs = [
        typing.get_args(c.model_fields["architecture"].annotation)[0]
        for c in (CompactUNetConfig, ResNet18UNetConfig)
    ]
    p.add_argument(
        "--arch",
        choices=archs,
        default=archs[0],
        help="compact: CPU-sized U-Net (<2 M parameters); resnet18: the study's 14.3 M U-Net",
    )


def _add_finetune(p: argparse.ArgumentParser) -> None:
    import typing

    from ..training.config import FreezeMode, TrainConfig

    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="checkpoint folder to start from, or 'pretrained' (shipped with the package)",
    )
    p.add_argument(
        "--which",
        choices=typing.get_args(TrainConfig.model_fields["init_which"].annotation),
        default=TrainConfig.model_fields["init_which"].default,
        help="checkpoint to start from",
    )
    text, default = _describe("freeze")
    p.add_argument(
        "--freeze",
        choices=typing.get_args(FreezeMode),
        default=default,
        help=text,
    )
    _add_common(p, finetune=True)
    p.add_argument(
        "--images",
        metavar="FILE",
        default=None,
        help="your own frames (any image file the readers accept) to fine-tune on; with --labels",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        default=None,
        help="labels of --images, same shape: any non-zero pixel is particle; frames without a "
        "labelled pixel are not used (image file, .npy or .hspy)",
    )
    p.add_argument(
        "--sampling",
        type=float,
        default=None,
        metavar="A_PER_PX",
        help="pixel size of --images [Å/px], overriding the file's calibration",
    )


def _model_dir(model: str) -> Path:
    from ..segmentation import PRETRAINED, pretrained_model_dir

    return pretrained_model_dir() if model == PRETRAINED else Path(model)


def _config_from_args(args: argparse.Namespace, finetune: bool, **override: Any) -> Any:
    from pydantic import ValidationError

    from ..training.config import TrainConfig

    train_d = _defocus_list(args.defocus, "--defocus")
    if finetune and train_d == "all" and not args.defocus and "train_defocus_nm" not in override:
        raise ConfigError(
            "--defocus: give the target domain(s) of the fine-tuning (or 'all').", "--defocus"
        )
    kw: dict[str, Any] = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
    kw["train_defocus_nm"] = train_d
    kw["eval_defocus_nm"] = _defocus_list(args.eval_defocus, "--eval-defocus")
    if args.patch_size is not None:
        kw["patch_size"] = None if args.patch_size == 0 else args.patch_size
    if args.no_augment:
        kw["augment"] = False
    if args.deterministic:
        kw["deterministic"] = True
    kw.update(override)
    try:
        if finetune:
            init = _model_dir(args.model)
            train_domains = kw.pop("train_defocus_nm")
            return TrainConfig.finetune(
                init, train_domains, freeze=args.freeze, init_which=args.which, **kw
            )
        kw["model"] = {"architecture": args.arch}
        return TrainConfig(**kw)
    except ValidationError as exc:
        from ..errors import config_error_from_validation

        names = {**FLAGS, **SPECIAL_FLAGS}
        raise config_error_from_validation(exc, names, first_only=True) from None


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


def _ood_progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """(progress, close) of the OOD fit's progress bar (none with --no-progress)."""
    bar: Any = None

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="OOD reference", unit="img", leave=False)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close


def _no_ood_note(prog: str, out_dir: Path) -> None:
    print(
        f"{prog}: no OOD reference fitted (--no-ood-fit); fit it later with "
        f"'hrtem-transfer evaluate --model {out_dir} --data DATA --fit-ood'.",
        file=sys.stderr,
    )


@contextlib.contextmanager
def _session(args: argparse.Namespace, prog: str) -> Iterator[dict[str, Any]]:
    """The keyword arguments of a training stage run from the terminal: progress bars,
    Ctrl-C as a stop request, resume and the OOD fit as the flags say."""
    stop = threading.Event()
    progress = _Progress(show_bar=not args.no_progress)
    ood_progress, close_ood = _ood_progress(args)
    try:
        with _sigint_to_stop(stop, prog):
            yield dict(
                callbacks=[progress],
                stop=stop,
                resume=args.resume,
                fit_ood=not args.no_ood_fit,
                ood_progress=ood_progress,
            )
    finally:
        progress.close()
        close_ood()


def _print_ood(prog: str, out_dir: Path, ood: Any) -> None:
    """The end-of-training OOD fit's message (a failure keeps the model), or why none ran."""
    if ood is None:
        _no_ood_note(prog, out_dir)
    else:
        print(ood.message, file=sys.stdout if ood.ok else sys.stderr)


def _run_training(args: argparse.Namespace, finetune: bool) -> int:
    from ..evaluation.workflows import train_stage

    prog = f"hrtem-transfer {'finetune' if finetune else 'pretrain'}"
    images = getattr(args, "images", None)
    labels = getattr(args, "labels", None)
    if finetune and (images or labels):
        return _run_annotation_finetune(args, prog)
    if args.data is None:
        raise ConfigError(
            "--data: give the simulated dataset (.hspy), or --images and --labels to fine-tune "
            "on your own annotated frames.",
            "--data",
        )
    cfg = _config_from_args(args, finetune)
    with _session(args, prog) as kw:
        stage = train_stage(cfg, args.data, args.out, **kw)
    result = stage.train
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
    _print_ood(prog, result.out_dir, stage.ood)
    return 0


def _read_frames(path: str, what: str) -> Any:
    """One image signal of a file as ExperimentalImage (the first if there are several)."""

    from ..io.readers import read_images
    from .messages import captured_warnings, print_warnings

    with captured_warnings() as caught:
        images = read_images(Path(path).expanduser())
    print_warnings(caught, "hrtem-transfer finetune", what)
    if len(images) > 1:
        print(
            f"hrtem-transfer finetune: note: {path} holds {len(images)} image signals; using "
            f"the first ({images[0].name}).",
            file=sys.stderr,
        )
    return images[0]


def _run_annotation_finetune(args: argparse.Namespace, prog: str) -> int:
    """``finetune --images --labels``: calls ``annotations.finetune_on_annotations``."""
    from ..annotations import DEFAULT_SAMPLES_PER_EPOCH, finetune_on_annotations

    if not (args.images and args.labels):
        raise ConfigError("give both --images and --labels (same shape).", "--labels")
    if args.data is not None:
        raise ConfigError("give either --data or --images/--labels, not both.", "--data")
    images = _read_frames(args.images, "--images")
    labels = _read_frames(args.labels, "--labels")
    override: dict[str, Any] = {"train_defocus_nm": "all", "val_fraction": 0.25}
    if not hasattr(args, "samples_per_epoch"):
        override["samples_per_epoch"] = DEFAULT_SAMPLES_PER_EPOCH
    # the flags, validated (and worded) here; the patch size follows the frames unless given
    cfg = _config_from_args(args, True, **override)
    options = cfg.model_dump(exclude_unset=True, exclude={"init_from", "train_defocus_nm"})

    def on_dataset(ds: Any) -> None:
        for note in ds.info.get("notes", []):
            print(f"{prog}: note: {note}", file=sys.stderr)
        print(
            f"{prog}: fine-tuning on {len(ds.info['frames'])} annotated frame(s) "
            f"{ds.info['frames']}"
        )

    with _session(args, prog) as kw:
        result = finetune_on_annotations(
            images.frames(),
            labels.frames(),
            out_dir=args.out,
            model=args.model,
            sampling_A=args.sampling if args.sampling is not None else images.sampling_A,
            on_dataset=on_dataset,
            **kw,
            **options,
        )
    if result.train.stopped:
        print(f"{prog}: stopped; rerun with --resume to continue.", file=sys.stderr)
        return 130
    print(f"done: checkpoint {result.out_dir} (val loss {result.train.best_val_loss:.4f})")
    _print_ood(prog, result.out_dir, result.ood)
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    return _run_training(args, finetune=False)


def _run_finetune(args: argparse.Namespace) -> int:
    return _run_training(args, finetune=True)


# ---------------------------------------------------------------------- segment
def _add_segment(p: argparse.ArgumentParser) -> None:
    from .segment import add_arguments

    add_arguments(p)


def _run_segment(args: argparse.Namespace) -> int:
    from .segment import run

    return run(args)


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
