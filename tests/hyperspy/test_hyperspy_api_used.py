"""The HyperSpy internals the signal methods rely on, pinned: this test fails, naming the
attribute, when a HyperSpy release renames or removes one (HyperSpy's own extensions use
them; they have no public equivalent in HyperSpy 2)."""

from __future__ import annotations

import numpy as np


def test_the_hyperspy_internals_the_methods_use_exist_and_behave():
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.zeros((2, 3, 4, 5), np.float32))
    s.axes_manager.navigation_axes[0].name = "image"
    # a copy with every axis and the metadata, new data of the same shape
    out = s._deepcopy_with_new_data(np.ones(s.data.shape, np.uint8))
    assert out.data.dtype == np.uint8 and out.axes_manager[0].name == "image"
    assert out.metadata.General.title == s.metadata.General.title
    # a signal over the navigation axes (one value per frame), in array order
    nav = s._get_navigation_signal(data=np.zeros(s.axes_manager.navigation_shape[::-1]))
    assert nav.data.shape == (2, 3) and nav.axes_manager.signal_shape == (3, 2)
    # the lazy flag
    assert s._lazy is False and s.as_lazy()._lazy is True
