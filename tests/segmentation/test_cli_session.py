"""`segment` on a session: a folder of frames becomes one defocus series, axes kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main

from .conftest import session_folder


@pytest.mark.slow
def test_segment_a_folder_as_a_defocus_series(tiny_model, tmp_path, capsys):
    import hyperspy.api as hs

    folder = session_folder(tmp_path)
    out = tmp_path / "mask.hspy"
    argv = ["segment", str(folder), "--model", str(tiny_model), "--out", str(out)]
    assert main([*argv, "--defocus", "-5", "0", "5"]) == 0, capsys.readouterr().err
    m = hs.load(out)
    assert m.data.shape == (3, 64, 64)
    nav = m.axes_manager.navigation_axes[0]
    assert nav.name == "defocus" and nav.units == "nm"
    np.testing.assert_allclose(nav.axis, [-5.0, 0.0, 5.0])
    doc = json.loads((tmp_path / "mask.ood.json").read_text())
    assert [r["defocus_nm"] for r in doc["frames"]] == [-5.0, 0.0, 5.0]
    assert doc["input"] == str(folder)
    # --defocus of the wrong length is a clear error, nothing written
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "m2.hspy"), "--defocus", "1", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "m2.hspy").exists()
