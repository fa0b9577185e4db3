"""``hrtem-transfer sweep``: a grid of transfer experiments on dask.distributed -> SQLite.

A thin caller of :func:`napari_hrtem_transfer.sweep.run_sweep`; nothing heavy is imported at
module level (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys

from .flags import add_required_path


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``sweep``."""
    add_required_path(
        p,
        "--config",
        "TOML",
        "sweep config (datasets, grid of pretraining/target defoci, freezing, N, learning "
        "rates, seeds, architecture, epochs, precision); see docs/sweeps.md and configs/",
    )
    add_required_path(
        p,
        "--db",
        "SQLITE",
        "results database (created if missing; runs already recorded as done are skipped, so "
        "rerunning the same command continues a sweep)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="address of an existing dask scheduler (tcp://host:8786); default: a local "
        "cluster of worker processes",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of the local cluster (default: one per CPU core / "
        "run.threads_per_worker)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        metavar="T",
        help="torch threads per worker (overrides run.threads_per_worker of the config; default 1)",
    )
    p.add_argument(
        "--skip-failed",
        action="store_true",
        help="do not retry runs recorded as failed by an earlier call",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config against the data and the database, list what would run, "
        "and stop (writes nothing)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_sweep_command(args: argparse.Namespace) -> int:
    """Validate, then run the sweep; print a summary."""
    from ..errors import ConfigError
    from ..sweep.config import load_sweep_config
    from ..sweep.runner import SweepInterrupted, plan_sweep, run_sweep
    from ..sweep.store import check_database, read_status

    cfg = load_sweep_config(args.config)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {args.workers}).", "--workers")
    if args.threads_per_worker is not None:
        if args.threads_per_worker < 1:
            raise ConfigError(
                f"--threads-per-worker must be at least 1 (got {args.threads_per_worker}).",
                "--threads-per-worker",
            )
        cfg.run.threads_per_worker = args.threads_per_worker
    if args.dry_run:
        db = check_database(args.db)
        plan = plan_sweep(cfg, db)
        status = read_status(db)
        done = sum(status.get(s["run_key"]) == "done" for s in plan.specs)
        failed = sum(status.get(s["run_key"]) == "failed" for s in plan.specs)
        print(
            f"{len(plan.specs)} runs ({len(plan.pretrain_keys)} distinct pretrained models, "
            f"reuse {'on' if cfg.run.reuse_pretrained else 'off'}); {done} done, {failed} "
            f"failed, {len(plan.specs) - done} to run. Models: {plan.model_dir}"
        )
        for s in plan.specs:
            print(f"  {s['run_key']}  {status.get(s['run_key'], 'todo'):6s}  {s['label']}")
        return 0
    try:
        res = run_sweep(
            cfg,
            args.db,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=not args.no_progress,
            retry_failed=not args.skip_failed,
        )
    except SweepInterrupted as exc:
        r = exc.result
        print(
            f"hrtem-transfer sweep: interrupted; {r.n_done} runs recorded in this call "
            f"({r.n_skipped} were already done). Rerun the same command to continue.",
            file=sys.stderr,
        )
        return 130
    print(
        f"{res.n_runs} runs: {res.n_skipped} already done, {res.n_done} done now, "
        f"{res.n_failed} failed ({res.wall_s:.1f} s on {res.n_workers} workers)."
    )
    for key, err in res.failed.items():
        print(f"  failed {key}: {err.splitlines()[0] if err else ''}", file=sys.stderr)
    print(f"results: {res.db}")
    print(f"read them with: hrtem-transfer compare-reference --db {res.db}")
    return 1 if res.n_failed else 0


COMMANDS = [
    (
        "sweep",
        "Run a grid of transfer experiments (pretraining defocus x target defocus x freezing "
        "x N x learning rates x seeds) on dask.distributed and record every run in a SQLite "
        "database; rerunning continues where it stopped.",
        add_sweep_arguments,
        run_sweep_command,
    ),
]
