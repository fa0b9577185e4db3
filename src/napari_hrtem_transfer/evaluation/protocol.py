"""The whole transfer-learning protocol on laptop-sized defaults (``hrtem-transfer demo``).

1. simulate a small defocus series (abTEM) with ground-truth masks;
2. pretrain a U-Net on one defocus;
3. fit the label-free OOD reference on the pretraining images;
4. fine-tune on a few images of another defocus with a frozen part;
5. fit the OOD reference of the fine-tuned model;
6. evaluate both models on every domain (held-out structures) and write the report.

:class:`DemoSettings` has two presets: ``"laptop"`` (<= 10 minutes on 2 CPU cores) and
``"tiny"`` (well under a minute or two; used by the test suite).

Same seed, same numbers: the simulation is bitwise reproducible run to run (see
:mod:`napari_hrtem_transfer.simulate.physics`) and both trainings run in deterministic mode
(``TrainConfig.deterministic``), so two runs with the same seed on one machine write the same
``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.atomic import write_text_atomic

__all__ = ["DEMO_PRESETS", "DemoResult", "DemoSettings", "run_protocol"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Settings of the demo protocol (defocus in [nm], abTEM sign; sizes in [px]).

    Attributes
    ----------
    defocus_nm
        Domains of the simulated series (at least 5, including 0 nm).
    n_structures
        Structures (images per defocus); 20% are held out for validation.
    image_size_px, sampling_A, sim_sampling_A
        Image size [px], pixel size and multislice sampling [Å].
    n_phonons
        Frozen-phonon configurations.
    radius_nm, particles_per_image, substrate_thickness_nm
        Specimen ranges.
    pretrain_defocus_nm, transfer_defocus_nm
        Pretraining and fine-tuning (target) domains.
    freeze
        Frozen part during fine-tuning (``"encoder"``, ``"decoder"``, ``"none"``, ``"gradual"``).
    channels
        Encoder channels of the compact U-Net.
    pretrain_epochs, pretrain_samples, transfer_epochs, transfer_samples
        Epochs and augmented samples per epoch of each stage.
    n_transfer
        Fine-tuning images of the target domain (None: all its training structures).
    pretrain_lr, transfer_lr, batch_size
        Optimiser settings.
    n_boot
        Bootstrap resamples of the confidence intervals.
    seed
        Seed of simulation and training.
    """

    defocus_nm: tuple[float, ...] = (
        -25.0,
        -20.0,
        -15.0,
        -10.0,
        -5.0,
        0.0,
        5.0,
        10.0,
        15.0,
        20.0,
        25.0,
    )
    n_structures: int = 40
    image_size_px: int = 128
    sampling_A: float = 0.2
    sim_sampling_A: float = 0.1
    n_phonons: int = 2
    radius_nm: tuple[float, float] = (0.4, 0.75)
    particles_per_image: tuple[int, int] = (1, 2)
    substrate_thickness_nm: tuple[float, float] = (2.0, 3.0)
    pretrain_defocus_nm: float = -10.0
    transfer_defocus_nm: float = 10.0
    freeze: str = "encoder"
    channels: tuple[int, int, int, int] = (16, 32, 64, 96)
    pretrain_epochs: int = 6
    pretrain_samples: int = 192
    transfer_epochs: int = 4
    transfer_samples: int = 96
    n_transfer: int | None = 16
    pretrain_lr: float = 2e-3
    transfer_lr: float = 5e-4
    batch_size: int = 8
    n_boot: int = 500
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`ConfigError` for settings the protocol cannot run."""
        d = [float(x) for x in self.defocus_nm]
        if len(d) < 5 or not any(abs(x) < 1e-9 for x in d):
            raise ConfigError(
                f"the demo needs at least 5 defoci including 0 nm in defocus_nm; got {d}.",
                "defocus_nm",
            )
        for name in ("pretrain_defocus_nm", "transfer_defocus_nm"):
            if not any(abs(getattr(self, name) - x) < 1e-9 for x in d):
                raise ConfigError(
                    f"{name} {getattr(self, name):g} nm is not one of the defoci {d}.", name
                )
        if self.pretrain_defocus_nm == self.transfer_defocus_nm:
            raise ConfigError(
                "pretraining and fine-tuning domains must differ (pretrain_defocus_nm, "
                "transfer_defocus_nm).",
                "transfer_defocus_nm",
                fields=("pretrain_defocus_nm",),
            )
        if self.n_structures < 3:
            raise ConfigError(
                "the demo needs at least 3 structures (training and held-out) in n_structures.",
                "n_structures",
            )


#: Presets: ``laptop`` (<= 10 min on 2 CPU cores) and ``tiny`` (the test suite).
DEMO_PRESETS: dict[str, DemoSettings] = {
    "laptop": DemoSettings(),
    "tiny": DemoSettings(
        defocus_nm=(-10.0, -5.0, 0.0, 5.0, 10.0),
        n_structures=4,
        image_size_px=64,
        sampling_A=0.4,
        sim_sampling_A=0.2,
        n_phonons=1,
        radius_nm=(0.4, 0.7),
        particles_per_image=(1, 1),
        substrate_thickness_nm=(1.0, 1.5),
        pretrain_defocus_nm=-10.0,
        transfer_defocus_nm=5.0,
        channels=(4, 8, 8, 8),
        pretrain_epochs=1,
        pretrain_samples=8,
        transfer_epochs=1,
        transfer_samples=4,
        n_transfer=2,
        batch_size=4,
        n_boot=50,
    ),
}


@dataclass
class DemoResult:
    """Where the demo wrote its results.

    Attributes
    ----------
    out_dir
        The demo folder.
    report
        ``report.html`` (``report.md`` beside it).
    dataset, pretrained, finetuned
        The simulated series and the two checkpoint folders.
    timings_s
        Wall time of each step [s].
    summary
        The report's ``summary.json`` content.
    """

    out_dir: Path
    report: Path
    dataset: Path
    pretrained: Path
    finetuned: Path
    timings_s: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class _TrainProgress:
    """Training callback printing one line per epoch, named after the stage it runs in."""

    _LABELS = {"pretrain": "pretrain", "finetune": "fine-tune"}

    def __init__(self, log: Log) -> None:
        self.log, self.label = log, ""

    def on_train_start(self, s) -> None:
        self.label = self._LABELS.get(s.stage, s.stage)

    def on_epoch(self, u) -> None:
        self.log(
            f"  {self.label} epoch {u.epoch + 1}/{u.n_epochs}: train loss {u.train_loss:.4f}, "
            f"validation loss {u.val_loss_own:.4f}{' (best)' if u.is_best else ''}"
        )


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _settings(settings: DemoSettings | str, overrides: dict[str, Any]) -> DemoSettings:
    if isinstance(settings, str):
        if settings not in DEMO_PRESETS:
            raise ConfigError(
                f"unknown demo preset {settings!r}; choose one of {', '.join(DEMO_PRESETS)}.",
                "settings",
            )
        settings = DEMO_PRESETS[settings]
    s = replace(settings, **overrides) if overrides else settings
    s.check()
    return s


def _out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; give a folder.", "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("pretrained", "finetuned"):
        if (out / sub / "best.json").exists():
            raise ConfigError(
                f"{out} already holds a demo run ({out / sub}); choose a new out_dir folder "
                "or delete it.",
                "out_dir",
            )
    return out


#: DemoSettings fields passed to the simulation as they are.
_SIM_FIELDS = (
    "n_structures",
    "image_size_px",
    "sampling_A",
    "sim_sampling_A",
    "n_phonons",
    "radius_nm",
    "particles_per_image",
    "substrate_thickness_nm",
    "seed",
)


def _simulate(s: DemoSettings, out: Path, log: Log) -> tuple[Any, Path]:
    """Simulate the series, save it and read it back (checkpoints record the file)."""
    from ..io import load_dataset, save_dataset
    from ..simulate import SimulationConfig, simulate_dataset

    t = time.perf_counter()
    sim = SimulationConfig.from_preset(
        "laptop", defocus_nm=list(s.defocus_nm), **{k: getattr(s, k) for k in _SIM_FIELDS}
    )
    log(
        f"[1/5] simulating {s.n_structures} structures x {len(s.defocus_nm)} defoci "
        f"({', '.join(f'{d:+g}' for d in s.defocus_nm)} nm), "
        f"{s.image_size_px}^2 px at {s.sampling_A:g} Å/px"
    )

    def sim_progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log(f"  simulated {done}/{total} structures ({time.perf_counter() - t:.0f} s)")

    ds = simulate_dataset(sim, workers=1, progress=sim_progress)
    data_path = save_dataset(ds, out / "series.hspy")
    return load_dataset(data_path, lazy=False), data_path


def _train_configs(s: DemoSettings, pre_dir: Path, device: str) -> tuple[Any, Any]:
    """The pretraining and fine-tuning configs (deterministic: same seed, same numbers)."""
    from ..training import TrainConfig

    common = dict(
        batch_size=s.batch_size, patch_size=None, seed=s.seed, device=device, deterministic=True
    )
    pre_cfg = TrainConfig(
        model={
            "architecture": "compact",
            "channels": list(s.channels),
            "bottleneck_dilations": [2, 4],
        },
        train_defocus_nm=[s.pretrain_defocus_nm],
        eval_defocus_nm=[s.pretrain_defocus_nm],
        epochs=s.pretrain_epochs,
        samples_per_epoch=s.pretrain_samples,
        lr=s.pretrain_lr,
        **common,
    )
    ft_cfg = TrainConfig.finetune(
        pre_dir,
        train_defocus_nm=[s.transfer_defocus_nm],
        freeze=s.freeze,
        n_train=s.n_transfer,
        eval_defocus_nm=[s.transfer_defocus_nm],
        epochs=s.transfer_epochs,
        samples_per_epoch=s.transfer_samples,
        lr=s.transfer_lr,
        **common,
    )
    return pre_cfg, ft_cfg


def _stage_logger(s: DemoSettings, log: Log) -> Callable[[str], None]:
    lines = {
        "pretrain": (
            f"[2/5] pretraining on {s.pretrain_defocus_nm:+g} nm ({s.pretrain_epochs} epochs)"
        ),
        "finetune": (
            f"[3/5] fine-tuning on {s.transfer_defocus_nm:+g} nm with the {s.freeze} frozen "
            f"({s.n_transfer or 'all'} images, {s.transfer_epochs} epochs)"
        ),
        "evaluate": (
            f"[4/5] evaluating both models on all {len(s.defocus_nm)} domains (held-out structures)"
        ),
    }
    return lambda stage: log(lines[stage])


def _report(s: DemoSettings, rep_dir: Path, after: Any, before: Any) -> Path:
    from .report import write_evaluation_report

    return write_evaluation_report(
        rep_dir,
        after,
        before,
        title=(
            f"Demo: pretrained at {s.pretrain_defocus_nm:+g} nm, fine-tuned at "
            f"{s.transfer_defocus_nm:+g} nm ({s.freeze} frozen)"
        ),
        notes=[
            (
                f"Demo settings: {s.n_structures} CdSe structures x {len(s.defocus_nm)} defoci "
                f"({min(s.defocus_nm):+g}...{max(s.defocus_nm):+g} nm), "
                f"{s.image_size_px} px at {s.sampling_A:g} A/px; pretraining "
                f"{s.pretrain_epochs} epochs at {s.pretrain_defocus_nm:+g} nm, fine-tuning "
                f"{s.transfer_epochs} epochs on {s.n_transfer or 'all'} images at "
                f"{s.transfer_defocus_nm:+g} nm ({s.freeze} frozen); seed {s.seed}. "
                "Every setting: summary.json ('demo_settings')."
            ),
            f"Torch CPU threads: {_torch_threads()} (a seeded run repeats exactly on the same "
            "machine with the same number of threads).",
        ],
    )


def run_protocol(
    out_dir: str | os.PathLike,
    settings: DemoSettings | str = "laptop",
    log: Log = print,
    device: str = "auto",
    **overrides: Any,
) -> DemoResult:
    """Run the whole protocol and write the report into ``out_dir``.

    Simulation, then :func:`~napari_hrtem_transfer.evaluation.workflows.run_transfer`
    (pretrain -> fine-tune -> evaluate, each model's OOD reference fitted after its
    training), then the report.

    Parameters
    ----------
    out_dir
        Demo folder (created): ``series.hspy``, ``pretrained/``, ``finetuned/``, ``report/``.
    settings
        A :class:`DemoSettings` or a preset name (``"laptop"``, ``"tiny"``).
    log
        Receives progress lines.
    device
        Torch device for training and evaluation (``"auto"``: the GPU when present).
    **overrides
        Fields of :class:`DemoSettings` to change.

    Returns
    -------
    DemoResult
    """
    from .workflows import TransferEvaluation, run_transfer

    s = _settings(settings, overrides)
    out = _out_dir(out_dir)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    t = time.perf_counter()
    ds, data_path = _simulate(s, out, log)
    timings["simulate"] = time.perf_counter() - t

    pre_dir, ft_dir = out / "pretrained", out / "finetuned"
    pre_cfg, ft_cfg = _train_configs(s, pre_dir, device)
    evaluation = TransferEvaluation(
        options=dict(n_boot=s.n_boot, device=None if device == "auto" else device)
    )
    tr = run_transfer(
        ft_cfg,
        ds,
        ft_dir,
        pretrain=pre_cfg,
        evaluation=evaluation,
        callbacks=[_TrainProgress(log)],
        on_stage=_stage_logger(s, log),
        log=log,
    )
    for name, stage in (("pretrain", tr.pretrain), ("finetune", tr.finetune)):
        timings[name] = stage.time_train_s + stage.time_ood_s
    timings["evaluate"] = tr.time_evaluate_s

    t = time.perf_counter()
    log("[5/5] writing the report")
    rep_dir = out / "report"
    page = _report(s, rep_dir, tr.after, tr.before)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    summary = json.loads((rep_dir / "summary.json").read_text())
    summary["demo_settings"] = asdict(s)
    write_text_atomic(rep_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    return DemoResult(out, page, data_path, pre_dir, ft_dir, timings, summary)
