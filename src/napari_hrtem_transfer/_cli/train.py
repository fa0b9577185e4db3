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
