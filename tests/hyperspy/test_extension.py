"""Registration with HyperSpy through the ``hyperspy.extensions`` entry point.

HyperSpy finds extensions by entry point: it imports nothing of the package, it reads
``<package>/hyperspy_extension.yaml`` (the entry point's *name* is the package it looks in).
``test_entry_point_registration`` builds a throw-away distribution that declares exactly the
entry point pyproject.toml needs, so it checks the yaml for real whether or not the project
is installed with it; ``test_installed_entry_point`` checks the installed package itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

ENTRY_POINT = ("napari_hrtem_transfer", "napari_hrtem_transfer")  # name, value


def _run(code: str, extra_path: str | None = None) -> str:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture
def fake_distribution(tmp_path):
    """A dist-info folder declaring only the entry point (what pyproject.toml will declare)."""
    info = tmp_path / "hrtem_transfer_extension_probe-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hrtem-transfer-extension-probe\nVersion: 0\n"
    )
    name, value = ENTRY_POINT
    (info / "entry_points.txt").write_text(f"[hyperspy.extensions]\n{name} = {value}\n")
    return str(tmp_path)


PROBE = """
    import sys, io, contextlib
    import hyperspy.api as hs
    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'abtem')
                   or m.startswith('napari_hrtem_transfer.'))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        hs.print_known_signal_types()
    table = buf.getvalue()
    print('HEAVY', heavy)
    print('TABLE', 'HRTEM ' in table, 'HRTEM_defocus_series' in table,
          'napari_hrtem_transf' in table)
    import numpy as np
    s = hs.signals.Signal2D(np.ones((2, 4, 4)))
    s.set_signal_type('HRTEM')
    print('CLASS', type(s).__name__, type(s.as_lazy()).__name__)
    print('TORCH', 'torch' in sys.modules)
"""


def _check(stdout: str) -> None:
    lines = dict(line.split(" ", 1) for line in stdout.strip().splitlines())
    assert lines["HEAVY"] == "[]", f"hyperspy.api imported {lines['HEAVY']}"
    assert lines["TABLE"] == "True True True", stdout
    assert lines["CLASS"] == "HRTEM LazyHRTEM"
    # setting the type imports the classes, still without torch
    assert lines["TORCH"] == "False"


def test_entry_point_registration(fake_distribution):
    _check(_run(PROBE, extra_path=fake_distribution))


def test_installed_entry_point():
    names = {ep.name for ep in importlib.metadata.entry_points(group="hyperspy.extensions")}
    assert ENTRY_POINT[0] in names, (
        "the hyperspy.extensions entry point is not installed (reinstall the package)"
    )
    _check(_run(PROBE))
