"""``hrtem-transfer demo``: the whole protocol on laptop-sized defaults.

Nothing heavy is imported at module level (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``demo``."""
    p.add_argument(
        "--out",
        type=Path,
        default=Path("hrtem-demo"),
        metavar="DIR",
        help="folder for the series, both checkpoints and the report (must not hold a demo run)",
    )
    p.add_argument(
        "--preset",
        choices=("laptop", "tiny"),
        default="laptop",
        help="'laptop': <= 10 minutes on 2 CPU cores; 'tiny': a smoke test of the "
        "pipeline in well under 2 minutes (numbers are not meaningful)",
    )
    p.add_argument(
        "--tiny",
        action="store_const",
        const="tiny",
        dest="preset",
        help="shorthand for --preset tiny",
    )
    p.add_argument(
        "--pretrain-defocus",
        type=float,
        default=None,
        metavar="NM",
        help="pretraining domain [nm] (default of the preset: -10)",
    )
    p.add_argument(
        "--transfer-defocus",
        type=float,
        default=None,
        metavar="NM",
        help="fine-tuning (target) domain [nm]",
    )
    p.add_argument(
        "--freeze",
        choices=("none", "encoder", "decoder", "gradual"),
        default=None,
        help="frozen part during fine-tuning (default of the preset: encoder)",
    )
    p.add_argument("--n-structures", type=int, default=None, help="structures to simulate")
    p.add_argument("--seed", type=int, default=None, help="seed of simulation and training")
    p.add_argument(
        "--device", default="auto", help="torch device: auto (GPU when present), cpu, cuda"
    )


#: fields of :class:`~..evaluation.protocol.DemoSettings` and arguments of ``run_protocol``
#: -> the flags that set them (core errors name the fields; CLI users read the flags)
FLAGS: dict[str, str] = {
    "out_dir": "--out",
    "settings": "--preset",
    "pretrain_defocus_nm": "--pretrain-defocus",
    "transfer_defocus_nm": "--transfer-defocus",
    "freeze": "--freeze",
    "n_structures": "--n-structures",
    "seed": "--seed",
    "device": "--device",
}


def run(args: argparse.Namespace) -> int:
    """Run the protocol and print where the report is (core errors reworded with flags)."""
    from ..errors import ConfigError

    try:
        return _run(args)
    except ConfigError as exc:
        raise exc.reworded(FLAGS) from None


def _run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..evaluation.protocol import run_protocol

    out = args.out.expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.exists():
        raise ConfigError(f"--out {out}: the folder {parent} does not exist.", "--out")
    overrides = {
        k: v
        for k, v in {
            "pretrain_defocus_nm": args.pretrain_defocus,
            "transfer_defocus_nm": args.transfer_defocus,
            "freeze": args.freeze,
            "n_structures": args.n_structures,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    res = run_protocol(out, args.preset, log=log, device=args.device, **overrides)
    s = res.summary
    print()
    for label, m in s.get("models", {}).items():
        g = m.get("generalization")
        print(f"{label}: generalization {g:.4f}" if g is not None else f"{label}: generalization –")
    if s.get("shift") is not None:
        print(f"shift of generalization (after − before): {s['shift']:+.4f} (> 0 = worse)")
    for label, r in (s.get("ood_spearman") or {}).items():

        def f(v):
            return "–" if v is None else f"{v:.2f}"

        print(
            f"OOD score vs. true loss (Spearman), {label}: per domain {f(r['per_domain'])}, "
            f"per frame {f(r['per_frame'])}"
        )
    print(
        f"finished in {res.timings_s['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in res.timings_s.items() if k != 'total')})"
    )
    print(f"report: {res.report}")
    print(f"        {res.report.with_suffix('.md')}")
    print(f"models: {res.pretrained}, {res.finetuned}; data: {res.dataset}", file=sys.stderr)
    return 0


COMMANDS = [
    (
        "demo",
        "Run the whole protocol on laptop defaults: simulate a small defocus series, pretrain on "
        "one defocus, fine-tune on another with a frozen part, evaluate all domains before and "
        "after, and write the report.",
        add_arguments,
        run,
    )
]
