"""The one frames model (io/frames.py) and the all-or-nothing writes (io/atomic.py)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.io.frames import (
    RESAMPLING,
    Frames,
    as_frames,
    axis_from_values,
    check_zoom,
    input_warnings,
    label_image_warning,
)


def test_one_resampling_limit_for_segmentation_and_sessions():
    """Segmentation and sessions share one maximum zoom and one resampled size limit."""
    from napari_hrtem_transfer.io import sessions
    from napari_hrtem_transfer.segmentation import SegmentConfig

    assert sessions.MAX_RESAMPLE_ZOOM == RESAMPLING.max_zoom
    assert SegmentConfig().max_zoom == RESAMPLING.max_zoom
    assert SegmentConfig().max_resampled_px == RESAMPLING.max_resampled_px
    assert SegmentConfig().resample_tolerance == RESAMPLING.tolerance


def test_check_zoom_accepts_the_limit_and_refuses_beyond_naming_the_input():
    z = RESAMPLING.max_zoom
    assert check_zoom(0.2 * z, 0.2, (64, 64), "x") == pytest.approx(z)
    assert check_zoom(0.2 / z, 0.2, (64, 64), "x") == pytest.approx(1 / z)
    with pytest.raises(ConfigError, match="signal 'far'.*resampling by more than"):
        check_zoom(0.2 * z * 1.01, 0.2, (64, 64), "signal 'far'")
    with pytest.raises(ConfigError, match="frames over 100 px"):
        check_zoom(0.4, 0.2, (64, 64), "x", max_resampled_px=100)


def test_axis_from_values_uniform_and_not():
    u = axis_from_values("defocus", [-5.0, 0.0, 5.0], "nm")
    assert "axis" not in u and (u["offset"], u["scale"], u["size"]) == (-5.0, 5.0, 3)
    n = axis_from_values("defocus", [-12.0, 0.0, 7.5], "nm")
    np.testing.assert_array_equal(n["axis"], [-12.0, 0.0, 7.5])
    assert n["size"] == 3 and n["units"] == "nm" and n["navigate"]


def test_frames_keep_a_lazy_stack_lazy_and_every_axis():
    import dask.array as da

    data = da.from_array(np.arange(3 * 2 * 8 * 8, dtype=np.uint16).reshape(3, 2, 8, 8), chunks=1)
    axes = [
        axis_from_values("defocus", [-12.0, 0.0, 7.5], "nm"),
        {"name": "image", "size": 2, "scale": 1.0, "offset": 0.0, "units": None},
        {"name": "y", "size": 8, "scale": 0.02, "offset": 1.0, "units": "nm"},
        {"name": "x", "size": 8, "scale": 0.02, "offset": -2.0, "units": "nm"},
    ]
    f = as_frames(data, axes=axes)
    assert f.is_lazy and f.data.dtype == np.float32
    assert f.nav_shape == (3, 2) and f.n_frames == 6
    assert f.sampling_A == pytest.approx(0.2) and f.sampling_source == "axes"
    np.testing.assert_array_equal(f.full_axes[0]["axis"], [-12.0, 0.0, 7.5])
    assert f.full_axes[-1]["offset"] == -2.0
    np.testing.assert_array_equal(np.asarray(f.frames()), np.asarray(data, dtype=np.float32))


def test_lazy_hyperspy_signal_stays_lazy_through_as_frames():
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.ones((4, 16, 16), np.float32)).as_lazy()
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = 0.05, "nm"
    f = as_frames(s)
    assert f.is_lazy and f.nav_shape == (4,)
    assert f.sampling_A == pytest.approx(0.5)


def test_label_image_warning_only_for_two_grey_levels():
    rng = np.random.default_rng(0)
    assert label_image_warning(rng.integers(0, 2, (64, 64)) * 255, "m") is not None
    assert label_image_warning(np.zeros((64, 64)), "m") is not None
    assert label_image_warning(rng.poisson(50, (64, 64)), "img") is None
    f = Frames(data=(rng.random((2, 32, 32)) > 0.5).astype(np.uint8), sampling_A=0.2, axes=[])
    f.name = "labels.png"
    (w,) = input_warnings(f)
    assert "labels.png" in w and "label mask" in w


def test_stem_mode_and_detector_names_warn():
    f = Frames(data=np.random.default_rng(1).poisson(9, (16, 16)), sampling_A=0.2, axes=[])
    f.metadata["acquisition_mode"] = "STEM"
    assert any("STEM" in w for w in input_warnings(f))
    g = Frames(data=np.random.default_rng(1).poisson(9, (16, 16)), sampling_A=0.2, axes=[])
    g.metadata["title"] = "HAADF"
    assert any("HAADF" in w for w in input_warnings(g))
    h = Frames(data=np.random.default_rng(1).poisson(9, (16, 16)), sampling_A=0.2, axes=[])
    assert input_warnings(h) == []


def test_atomic_group_renames_all_or_none(tmp_path):
    from napari_hrtem_transfer.io.atomic import AtomicGroup

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(KeyboardInterrupt), AtomicGroup() as group:
        group.path(a).write_text("complete")
        group.path(b).write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with AtomicGroup() as group:
        group.path(a).write_text("A")
        group.path(b).write_text("B")
        assert not a.exists()  # nothing under the final names until the end
    assert (a.read_text(), b.read_text()) == ("A", "B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_deferred_interrupt_holds_a_real_sigint_until_check():
    from napari_hrtem_transfer.io.atomic import deferred_interrupt

    reached = []
    # the handler in place before (Python's default; SIG_IGN in a job started with '&')
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), deferred_interrupt() as check:
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")  # the write in progress goes on
        check()
        reached.append("after check")  # not reached
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before
    # a signal not acted on inside the block is raised at its end
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
