#!/usr/bin/env bash
# Set up a virtual environment and run the main job on its built-in defaults:
# simulate a small defocus series, pretrain on one defocus, fine-tune on another with a frozen
# encoder, evaluate every defocus before and after, and write a report (demo_out/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
.venv/bin/hrtem-transfer demo --out demo_out "$@"
