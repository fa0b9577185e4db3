"""Peak memory and duration of the OOD-reference fit at the end of ``pretrain`` (issue 12).

Runs the command line as a user would, under ``/usr/bin/time -v``, and reports the training
time, the fit time (both printed by the command) and the peak resident set size of the
whole run::

    nice -n 10 python benchmarks/bench_ood_fit.py --data study32.hspy --epochs 8 \
        --out /tmp/ood_bench/pretrain_all

(``study32.hspy``: ``hrtem-transfer simulate --preset study --phonons 2 --n-structures 32``.)
Goals: exit 0, peak RSS <= 4 GB on the 2-core, 23 GB machine, fit <= 20 % of the training.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--defocus", nargs="+", default=["all"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    exe = Path(sys.executable).with_name("hrtem-transfer")
    cmd = [
        "/usr/bin/time",
        "-v",
        str(exe),
        "pretrain",
        "--data",
        str(args.data),
        "--defocus",
        *args.defocus,
        "--epochs",
        str(args.epochs),
        "--out",
        str(args.out),
        *args.extra,
    ]
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    text = r.stdout + r.stderr
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    train = re.search(r"done: .* in (\d+) s", text)
    fit = re.search(r"OOD reference fitted on (\d+) .* in (\d+) s", text)
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", text)
    for line in text.splitlines():
        if "OOD" in line or line.startswith("done:"):
            print(line)
    print(f"exit status: {r.returncode}")
    if rss:
        print(f"peak RSS: {int(rss.group(1)) / 2**20:.2f} GB")
    if wall:
        print(f"wall time: {wall.group(1)}")
    if train and fit:
        t_train, t_fit = float(train.group(1)), float(fit.group(2))
        print(
            f"training {t_train:.0f} s, OOD fit {t_fit:.0f} s on {fit.group(1)} samples "
            f"= {100 * t_fit / max(t_train, 1):.0f} % of the training"
        )
    if r.returncode:
        print(text[-3000:])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
