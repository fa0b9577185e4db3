"""`hrtem-transfer segment` end to end (issue 18): one output per input, every axis kept,
the session's files recorded, honest .ood.json, input warnings, and Ctrl-C while writing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main

from .conftest import disc_frames, session_folder

REPO = Path(__file__).parents[2]
SERIES = REPO / "sample_data" / "defocus_series_small.hspy"


def _nonuniform_series(path: Path, lazy: bool = False):
    """A plain HyperSpy defocus x image .hspy with a non-uniform defocus axis [nm]."""
    import hyperspy.api as hs
    from hyperspy.axes import DataAxis, UniformDataAxis

    frames, _ = disc_frames(6, seed=11)
    s = hs.signals.Signal2D(
        frames.reshape(3, 2, 64, 64),
        axes=[
            DataAxis(axis=[-12.0, 0.0, 7.5], name="defocus", units="nm", navigate=True),
            UniformDataAxis(size=2, name="image", navigate=True),
            UniformDataAxis(size=64, scale=0.02, offset=1.0, units="nm", name="y"),
            UniformDataAxis(size=64, scale=0.02, offset=-2.0, units="nm", name="x"),
        ],
    )
    s.metadata.General.title = "nonuniform"
    s.save(path)
    return s


def test_packaged_series_gives_one_file_with_defocus_by_image_navigation(
    tiny_model, tmp_path, capsys
):
    import hyperspy.api as hs

    out = tmp_path / "s.hspy"
    assert main(["segment", str(SERIES), "--model", str(tiny_model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.hspy", "s.ood.json"]
    m = hs.load(out)
    names = [a.name for a in m.axes_manager.navigation_axes]
    assert set(names) == {"image", "defocus"}
    assert m.data.shape == (5, 4, 256, 256)  # array order: defocus, image
    defocus = m.axes_manager["defocus"]
    assert defocus.units == "nm"
    np.testing.assert_allclose(defocus.axis, [-10.0, -5.0, 0.0, 5.0, 10.0])
    # frames are printed with their coordinates, the defocus included
    assert "frame 0 (defocus_nm -10, image 0)" in printed
    assert "frame 19 (defocus_nm 10, image 3)" in printed
    doc = json.loads((tmp_path / "s.ood.json").read_text())
    assert len(doc["frames"]) == 20
    assert [r["defocus_nm"] for r in doc["frames"][::4]] == [-10.0, -5.0, 0.0, 5.0, 10.0]
    assert doc["caution_level"] is not None
    assert doc["sampling_A"] == pytest.approx(0.2)
    assert "defocus_series_small.hspy" in doc["sampling_source"]


def test_nonuniform_defocus_axis_survives_the_cli(tiny_model, tmp_path):
    import hyperspy.api as hs

    src = tmp_path / "in.hspy"
    _nonuniform_series(src)
    out = tmp_path / "mask.hspy"
    argv = ["segment", str(src), "--model", str(tiny_model), "--out", str(out), "--proba"]
    assert main(argv) == 0
    for path in (out, tmp_path / "mask_proba.hspy"):
        m = hs.load(path)
        assert m.data.shape == (3, 2, 64, 64)
        ax = m.axes_manager["defocus"]
        assert not ax.is_uniform and ax.units == "nm" and ax.navigate
        np.testing.assert_array_equal(ax.axis, [-12.0, 0.0, 7.5])
        y, x = m.axes_manager.signal_axes[::-1]
        assert (y.offset, x.offset, x.scale, x.units) == (1.0, -2.0, 0.02, "nm")
    doc = json.loads((tmp_path / "mask.ood.json").read_text())
    assert [r["defocus_nm"] for r in doc["frames"]] == [-12.0, -12.0, 0.0, 0.0, 7.5, 7.5]


def test_session_provenance_is_in_the_cli_output(tiny_model, tmp_path, capsys):
    import hyperspy.api as hs

    folder = session_folder(tmp_path)
    out = tmp_path / "mask.hspy"
    argv = ["segment", str(folder), "--model", str(tiny_model), "--out", str(out)]
    assert main([*argv, "--defocus", "5", "-5", "0"]) == 0
    m = hs.load(out)
    session = m.metadata.HRTEM_transfer.session
    # sorted by defocus: the file of each frame is recorded
    names = [Path(f).name for f in session.files]
    assert names == ["frame_01.hspy", "frame_02.hspy", "frame_00.hspy"]
    np.testing.assert_allclose(m.axes_manager["defocus"].axis, [-5.0, 0.0, 5.0])
    assert list(session.defocus_source) == ["user (defocus_nm)"] * 3
    doc = json.loads((tmp_path / "mask.ood.json").read_text())
    assert [Path(f).name for f in doc["frame_files"]] == names
    # mixed pixel sizes: the refusal names the CLI flag, not the Python argument
    odd = hs.signals.Signal2D(disc_frames(1, seed=21)[0][0])
    for ax in odd.axes_manager.signal_axes:
        ax.scale, ax.units = 0.03, "nm"
    odd.save(folder / "frame_03.hspy")
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "m2.hspy")]) == 2
    err = capsys.readouterr().err
    assert "--session-resample" in err and "resample=True" not in err


def test_no_ood_writes_no_ood_json(tiny_model, tmp_path):
    frames, _ = disc_frames(2, seed=3)
    src = tmp_path / "x.npy"
    np.save(src, frames)
    out = tmp_path / "m.npy"
    argv = ["segment", str(src), "--model", str(tiny_model), "--out", str(out), "--sampling", "0.2"]
    assert main([*argv, "--no-ood"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy", "x.npy"]


def test_rgb_note_is_in_the_ood_json_and_label_images_warn(tiny_model, tmp_path, capsys):
    frames, masks = disc_frames(1, seed=4)
    rgb = np.repeat(frames[0][..., None], 3, axis=-1)  # (64, 64, 3): read as RGB
    np.save(tmp_path / "rgb.npy", rgb)
    base = ["segment", "--model", str(tiny_model), "--sampling", "0.2"]
    assert main([*base, str(tmp_path / "rgb.npy"), "--out", str(tmp_path / "a.npy")]) == 0
    doc = json.loads((tmp_path / "a.ood.json").read_text())
    assert any("RGB" in n for n in doc["notes"])
    assert doc["sampling_source"] == "user (--sampling)"
    capsys.readouterr()
    np.save(tmp_path / "label.npy", masks[0].astype(np.uint8))
    assert main([*base, str(tmp_path / "label.npy"), "--out", str(tmp_path / "b.npy")]) == 0
    err = capsys.readouterr().err
    assert "label mask" in err
    doc = json.loads((tmp_path / "b.ood.json").read_text())
    assert any("label mask" in n for n in doc["notes"])


def test_ctrl_c_while_writing_exits_130_and_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    from napari_hrtem_transfer.io import writers

    src = tmp_path / "in.hspy"
    _nonuniform_series(src)
    real = writers._write
    calls = []

    def interrupted(tmp, *args, **kwargs):
        calls.append(tmp)
        real(tmp, *args, **kwargs)  # the mask is complete (under its temporary name) ...
        if len(calls) == 2:
            raise KeyboardInterrupt  # ... and Ctrl-C comes while the probabilities are written

    monkeypatch.setattr(writers, "_write", interrupted)
    out = tmp_path / "mask.hspy"
    argv = ["segment", str(src), "--model", str(tiny_model), "--out", str(out), "--proba"]
    assert main(argv) == 130
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.hspy"]


def test_sigint_while_writing_is_held_until_the_file_is_complete(tiny_model, tmp_path, monkeypatch):
    """A real SIGINT in the middle of a write: the write completes (no "Exception ignored"),
    then the run stops with 130 and no output, the temporary files removed."""
    from napari_hrtem_transfer.io import writers

    src = tmp_path / "in.hspy"
    _nonuniform_series(src)
    real = writers._write
    completed = []

    def signalled(tmp, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of the write
        real(tmp, *args, **kwargs)
        completed.append(Path(tmp).stat().st_size)  # reached: the signal did not cut it

    monkeypatch.setattr(writers, "_write", signalled)
    out = tmp_path / "mask.hspy"
    assert main(["segment", str(src), "--model", str(tiny_model), "--out", str(out)]) == 130
    assert len(completed) == 1 and completed[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.hspy"]
