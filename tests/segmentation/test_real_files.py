"""Every real microscope file in ../shared/data segments from the CLI, axes kept.

A file either segments (exit 0), or gets a clear exit-2 message when it cannot be segmented
(not an image: spectra, diffraction patterns) or its pixel size is far beyond what the model
can be resampled to; those then segment with ``--no-resample``.  The mask written as ``.hspy``
keeps the input's shape, navigation and signal axes (names, units, scales, offsets).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.io.readers import SUPPORTED_EXTENSIONS

pytestmark = pytest.mark.slow

CLEAR_REFUSALS = re.compile(r"no real-space image|resampling by more than")


def _files(shared: Path) -> list[Path]:
    files = sorted(
        p for p in (shared / "data").rglob("*") if p.suffix.lower() in SUPPORTED_EXTENSIONS
    )
    assert len(files) >= 20, f"expected the shared real files, found {len(files)}"
    return files


def _expected_axes(path: Path):
    """The axes of every image signal HyperSpy reads from the file (units as strings)."""
    import hyperspy.api as hs

    from napari_hrtem_transfer.io.readers import normalise_units

    sigs = hs.load(path)
    sigs = sigs if isinstance(sigs, list) else [sigs]
    out = []
    for s in sigs:
        if s.axes_manager.signal_dimension != 2:
            continue
        axes = [
            (a.size, a.scale, a.offset, normalise_units(a.units))
            for a in s.axes_manager._axes  # array order: navigation (outer first), y, x
        ]
        out.append((tuple(s.data.shape), axes))
    return out


def test_every_shared_file_segments_with_its_axes(shared_data_dir, tiny_model, tmp_path, capsys):
    import hyperspy.api as hs

    from napari_hrtem_transfer.io.readers import normalise_units

    done, refused = [], []
    for k, path in enumerate(_files(shared_data_dir)):
        out = tmp_path / f"m{k}.hspy"
        argv = ["segment", str(path), "--model", str(tiny_model), "--out", str(out)]
        rc = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (path, err)
        if rc == 2:
            assert CLEAR_REFUSALS.search(err), (path, err)
            refused.append(path.name)
            if "no real-space image" in err:
                continue
            rc = main([*argv, "--no-resample"])
            err = capsys.readouterr().err
        assert rc == 0, (path, err)
        expected = _expected_axes(path)
        masks = sorted(tmp_path.glob(f"m{k}*.hspy"))
        masks = [m for m in masks if "_proba" not in m.name]
        assert len(masks) == len(expected), (path, masks)
        for mask_path, (shape, axes) in zip(masks, expected, strict=True):
            m = hs.load(mask_path)
            assert m.data.shape == shape, (path, m.data.shape, shape)
            got = [
                (a.size, a.scale, a.offset, normalise_units(a.units)) for a in m.axes_manager._axes
            ]
            for g, e in zip(got, axes, strict=True):
                assert g[0] == e[0] and g[3] == e[3], (path, got, axes)
                np.testing.assert_allclose(g[1:3], e[1:3], rtol=1e-6, err_msg=str(path))
            assert m.data.dtype == np.uint8
            assert m.metadata.get_item("HRTEM_transfer.provenance_json")
        done.append(path.name)
    assert len(done) >= 18
    # diffraction patterns and spectra are refused, not segmented
    assert any("diffraction" in n for n in refused)
