"""Sample-data contributions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer._napari import _sample_data
from napari_hrtem_transfer.errors import DatasetError


def test_defocus_series_loader_on_a_dataset_file(tmp_path, tiny_dataset):
    from napari_hrtem_transfer.io import save_dataset

    path = save_dataset(tiny_dataset, tmp_path / "series.hspy")
    layers = _sample_data.defocus_series_small(path)
    assert [kind for *_, kind in layers] == ["image", "labels"]
    images, kwargs, _ = layers[0]
    assert isinstance(images, np.ndarray)  # loaded eagerly: the file may be closed later
    assert images.shape == (2, 8, 64, 64)
    assert kwargs["metadata"]["sampling_A"] == pytest.approx(0.2)
    assert kwargs["name"] == "sample defocus series"


def test_packaged_defocus_series_if_present():
    path = _sample_data.sample_path(_sample_data.DEFOCUS_SERIES_FILE)  # must be packaged
    layers = _sample_data.defocus_series_small()
    images, kwargs, _ = layers[0]
    assert images.ndim == 4 and images.shape[0] >= 2
    assert kwargs["units"][-2:] == ("nm", "nm")
    assert path.stat().st_size < 20 * 2**20, "keep the packaged sample small"
    assert len(layers) == 2, "the sample series should carry its masks"


def test_missing_sample_file_says_what_to_do():
    with pytest.raises(DatasetError, match="not installed.*Simulate"):
        _sample_data.sample_path("no_such_file.hspy")


def test_real_hrtem_sample_is_calibrated_grey():
    ((data, kwargs, kind),) = _sample_data.real_hrtem_soot()
    assert kind == "image" and data.shape == (512, 512) and data.dtype == np.float32
    # 18.0194 px/nm from the authors' ExampleImage_px-nm.mat
    assert kwargs["scale"] == pytest.approx((1 / 18.01941748, 1 / 18.01941748))
    assert kwargs["units"] == ("nm", "nm")
    assert kwargs["metadata"]["sampling_A"] == pytest.approx(0.554956, rel=1e-5)
    assert "MIT" in kwargs["metadata"]["licence"]
    assert data.std() > 1.0  # a real image with contrast, not a blank
