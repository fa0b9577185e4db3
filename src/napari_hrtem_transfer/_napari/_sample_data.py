"""napari sample data: a small simulated defocus series and one real HRTEM image.

The files ship in the package's ``sample_data`` folder (``sample_data/`` at the repository
root; the wheel build puts it inside the package, an editable install reaches it through a
symlink), found with :mod:`importlib.resources`.
"""

from __future__ import annotations

import warnings
from importlib.resources import as_file, files
from pathlib import Path

from ..errors import DatasetError
from ._reader import LayerData, dataset_to_layer_data, image_to_layer_data

#: The simulated defocus series (written by ``napari_hrtem_transfer.simulate``).
DEFOCUS_SERIES_FILE = "defocus_series_small.hspy"
#: Real phase-contrast HRTEM image (MIT licence, see LICENSE_hrtem_soot_ucam_como.txt).
REAL_HRTEM_FILE = "hrtem_soot_ucam_como.tif"
#: Calibration of REAL_HRTEM_FILE from the source repository's ExampleImage_px-nm.mat:
#: 18.01941748 px/nm.
REAL_HRTEM_SAMPLING_A = 10.0 / 18.01941748


def sample_path(name: str) -> Path:
    """Path of a packaged sample file.

    Raises
    ------
    DatasetError
        If the file is not installed (a broken install or a development checkout without
        the file); the message says how to create or obtain it.
    """
    resource = files("napari_hrtem_transfer") / "sample_data" / name
    with as_file(resource) as p:
        path = Path(p)
    if not path.is_file():
        raise DatasetError(
            f"sample file {name} is not installed (looked in {path.parent}). Reinstall "
            "napari-hrtem-transfer, or simulate a series with the 'Simulate defocus series' "
            "widget or 'hrtem-transfer simulate'."
        )
    return path


def defocus_series_small(path: str | Path | None = None) -> list[LayerData]:
    """Sample: a small simulated defocus series with its ground-truth masks.

    Parameters
    ----------
    path
        Dataset file to open instead of the packaged one (for tests and scripts).

    Returns
    -------
    list of LayerData
        The images (defocus, image, y, x) with defocus [nm] (abTEM sign, positive =
        underfocus) and pixel size [nm] as layer scale, plus a Labels layer of the masks.
    """
    from ..io.dataset import load_dataset

    p = Path(path) if path is not None else sample_path(DEFOCUS_SERIES_FILE)
    ds = load_dataset(p, lazy=False)
    return dataset_to_layer_data(ds, name="sample defocus series")


def real_hrtem_soot() -> list[LayerData]:
    """Sample: a real phase-contrast HRTEM image of a soot nanoparticle (lattice fringes).

    The packaged TIFF is RGB without calibration tags; it is converted to grey and given
    the pixel size recorded by its authors (0.0555 nm/px). Source and licence:
    ``sample_data/LICENSE_hrtem_soot_ucam_como.txt`` (M. Kraft / CoMo group, Cambridge, MIT).
    """
    from ..io.readers import ReaderWarning, read_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReaderWarning)  # RGB -> grey is expected here
        (image,) = read_images(sample_path(REAL_HRTEM_FILE))
    image.sampling_A = REAL_HRTEM_SAMPLING_A
    image.metadata["sampling_A_y"] = image.metadata["sampling_A_x"] = REAL_HRTEM_SAMPLING_A
    image.metadata["calibration_source"] = (
        "ExampleImage_px-nm.mat of ucam-ceb-como/HRTEMFringeMapping: 18.0194 px/nm"
    )
    image.metadata["licence"] = "MIT, (C) 2020 M. Kraft and the CoMo group, Cambridge"
    image.name = "real HRTEM: soot nanoparticle (CoMo Cambridge)"
    data, kwargs, layer_type = image_to_layer_data(image)
    return [(data, kwargs, layer_type)]

