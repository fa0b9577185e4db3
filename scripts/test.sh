#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run the whole test suite, with
# line coverage of the package (a table at the end; pytest-cov).
# torch is installed first as the CPU build of 2.13.0; the project itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[testing]"
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && ! command -v Xvfb > /dev/null; then
    echo "note: no display and no Xvfb: the GUI tests will be skipped (install xvfb to run" \
         "them, see README.md; HRTEM_TRANSFER_STRICT=1 makes such skips fail)." >&2
fi
.venv/bin/python -m pytest --cov=napari_hrtem_transfer --cov-report=term "$@"
