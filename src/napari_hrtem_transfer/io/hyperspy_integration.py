"""Move between HyperSpy signals and this package's calibrated arrays.

Scripts that already work in HyperSpy can hand a signal to the models with
:func:`from_signal`, and put results back on the input's axes with :func:`to_signal`::

    >>> import hyperspy.api as hs
    >>> from napari_hrtem_transfer.io.hyperspy_integration import from_signal, to_signal
    >>> image = from_signal(hs.load("frame.dm4"))  # ExperimentalImage, sampling_A [Å]
    >>> s = to_signal(image)                        # the same axes and metadata again

For segmentation inside HyperSpy, prefer the ``HRTEM`` signal type
(``s.set_signal_type("HRTEM"); s.segment()``, see :mod:`napari_hrtem_transfer.hyperspy`).

HyperSpy is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ReaderError
from .readers import ExperimentalImage, images_from_signals, length_unit_to_A

__all__ = ["from_signal", "to_signal"]


def from_signal(
    signal: Any, *, allow_reciprocal: bool = False, compute: bool = True
) -> ExperimentalImage:
    """Convert a HyperSpy ``Signal2D`` (image or image stack) to an :class:`ExperimentalImage`.

    Parameters
    ----------
    signal
        A HyperSpy signal with two signal axes. Navigation axes become frames (flattened
        in array order; the axes are kept in ``axes[0]["navigation_axes"]`` so that
        :func:`to_signal` restores them). Lazy signals are computed, unless
        ``compute=False``: the frames then stay a dask array, read frame by frame.
    allow_reciprocal
        Accept axes in reciprocal units (diffraction patterns); ``sampling_A`` is then None.
    compute
        Compute a lazy signal (the default); False keeps it lazy.

    Returns
    -------
    ExperimentalImage
        ``data`` (n_frames, ny, nx) float32 and ``sampling_A`` [Å] from the signal axes
        (None when uncalibrated); the same rules as
        :func:`napari_hrtem_transfer.io.readers.read_images`.

    Raises
    ------
    ReaderError
        If ``signal`` is not a 2-D signal in real space (e.g. a spectrum).
    """
    if isinstance(signal, list | tuple):
        raise ReaderError(
            f"from_signal takes one signal; got a list of {len(signal)}. Convert them one "
            "by one, or use napari_hrtem_transfer.io.readers.images_from_signals."
        )
    lazy = bool(getattr(signal, "_lazy", False))
    if lazy and compute:
        signal = signal.deepcopy()
        signal.compute()
        lazy = False
    (image, *_) = images_from_signals(
        signal, path=None, allow_reciprocal=allow_reciprocal, lazy=lazy
    )
    session = ((image.metadata.get("hyperspy") or {}).get("HRTEM_transfer") or {}).get("session")
    files = (session or {}).get("files")
    if files is not None and len(files) == image.n_frames:
        image.sources = [str(f) for f in files]  # a session: the file of each frame
    return image


# ----------------------------------------------------------------------------- to_signal


def _hs_axis(d: dict[str, Any], *, navigate: bool) -> dict[str, Any]:
    """A rosettasciio-style axis dict as HyperSpy's constructor wants it."""
    out: dict[str, Any] = {"navigate": navigate}
    if d.get("name") is not None:
        out["name"] = str(d["name"])
    if d.get("units") is not None:
        out["units"] = str(d["units"])
    if d.get("axis") is not None:
        out["axis"] = np.asarray(d["axis"], dtype=float)
    else:
        out["size"] = int(d["size"])
        out["scale"] = float(d.get("scale", 1.0))
        out["offset"] = float(d.get("offset", 0.0))
    return out


def _recalibrated(ax: dict[str, Any], sampling_A: float) -> dict[str, Any]:
    """A signal axis set to ``sampling_A`` [Å/px], in nm, its offset converted to nm."""
    factor = length_unit_to_A(ax.get("units"))
    offset = float(ax.get("offset", 0.0)) * factor / 10.0 if factor else 0.0
    return {
        "name": ax.get("name"),
        "size": int(ax["size"]),
        "scale": float(sampling_A) / 10.0,
        "offset": offset,
        "units": "nm",
    }


def _default_signal_axes(ny: int, nx: int, sampling_A: float | None) -> list[dict[str, Any]]:
    scale, units = (1.0, None) if sampling_A is None else (float(sampling_A) / 10.0, "nm")
    return [
        {"name": "y", "size": ny, "scale": scale, "offset": 0.0, "units": units},
        {"name": "x", "size": nx, "scale": scale, "offset": 0.0, "units": units},
    ]


def _image_axes(
    image: ExperimentalImage, sampling_A: float | None
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """The image's data in its navigation shape, its navigation and signal axes."""
    ny, nx = image.image_shape
    _, y_ax, x_ax = image.axes
    nav = [dict(a) for a in image.nav_axes or []]
    data = image.data.reshape(*image.nav_shape, ny, nx)
    sig = [dict(y_ax), dict(x_ax)]
    if sampling_A is not None:
        sig = [_recalibrated(a, sampling_A) for a in sig]
    return data, nav, sig


def _array_axes(
    data: np.ndarray,
    axes: list[dict[str, Any]] | None,
    sampling_A: float | None,
    frame_axis: str,
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """An array's navigation and signal axes: the given ``axes``, else uncalibrated ones."""
    if data.ndim < 2:
        raise ReaderError(
            f"to_signal needs an image (ny, nx) or a stack (..., ny, nx); got shape {data.shape}."
        )
    ny, nx = data.shape[-2:]
    if axes is not None:
        sizes = [len(a["axis"]) if a.get("axis") is not None else int(a["size"]) for a in axes]
        if tuple(sizes) != tuple(data.shape):
            raise ReaderError(
                f"to_signal: {len(axes)} axes of sizes {sizes} do not fit an array of "
                f"shape {data.shape}."
            )
        nav = [dict(a) for a in axes[:-2]]
        sig = [dict(a) for a in axes[-2:]]
        if sampling_A is not None:
            sig = [_recalibrated(a, sampling_A) for a in sig]
    else:
        sig = _default_signal_axes(ny, nx, sampling_A)
        if data.ndim == 3:
            nav = [{"name": frame_axis, "size": int(data.shape[0])}]
        else:
            nav = [{"size": int(n)} for n in data.shape[:-2]]
    return data, nav, sig


def to_signal(
    image: ExperimentalImage | np.ndarray | Any,
    *,
    sampling_A: float | None = None,
    axes: list[dict[str, Any]] | None = None,
    title: str | None = None,
    frame_axis: str = "frame",
) -> Any:
    """Build a HyperSpy ``Signal2D`` that keeps the input's axes and metadata exactly.

    Parameters
    ----------
    image
        An :class:`ExperimentalImage` (e.g. from :func:`from_signal` or
        :func:`~napari_hrtem_transfer.io.readers.read_images`), or an array
        ``(..., ny, nx)`` (a 2-D array is one image). A
        :class:`~napari_hrtem_transfer.io.dataset.HRTEMDataset` gives the signal its
        ``.hspy`` file holds (images and masks).
    sampling_A
        Pixel size [Å/px]; overrides the image's own (the signal axes are then in nm,
        their offsets converted to nm). None keeps the image's calibration, or leaves an
        array uncalibrated (scale 1, no units).
    axes
        Rosettasciio-style axis dicts of an array, in array order (navigation..., y, x),
        e.g. ``SegmentationResult.axes``; ``name``, ``units``, ``scale``, ``offset`` and
        non-uniform ``axis`` values are kept.
    title
        ``metadata.General.title``; defaults to the image's own title, else its name.
    frame_axis
        Name of the navigation axis of an uncalibrated (n, ny, nx) array.

    Returns
    -------
    hyperspy.signals.Signal2D
        An :class:`ExperimentalImage` gets back every axis of the signal it was read from:
        names, units, scales, offsets, non-uniform axes, the navigation shape (a 2 x 3
        navigation stays 2 x 3, a single image stays 2-D), its HyperSpy metadata and its
        ``original_metadata``.

    Raises
    ------
    ReaderError
        For arrays with fewer than two dimensions, ``axes`` that do not fit the array, or a
        non-positive ``sampling_A``.
    """
    import hyperspy.api as hs

    from .dataset import HRTEMDataset, _dataset_signal

    if isinstance(image, HRTEMDataset):
        return _dataset_signal(image)  # the .hspy file format's own layout
    if sampling_A is not None and not (np.isfinite(sampling_A) and sampling_A > 0):
        raise ReaderError(f"sampling_A must be a positive pixel size [Å]; got {sampling_A!r}.")
    metadata: dict[str, Any] = {}
    original: dict[str, Any] = {}
    energy_eV = None
    if isinstance(image, ExperimentalImage):
        data, nav, sig = _image_axes(image, sampling_A)
        metadata = dict(image.metadata.get("hyperspy") or {})
        original = image.original_metadata or {}
        energy_eV = image.metadata.get("energy_eV")
        if title is None and "title" not in (metadata.get("General") or {}):
            title = image.name  # no HyperSpy metadata (e.g. .npy): name it after the file
    else:
        data, nav, sig = _array_axes(np.asarray(image), axes, sampling_A, frame_axis)
    hs_axes = [_hs_axis(a, navigate=True) for a in nav]
    hs_axes += [_hs_axis(a, navigate=False) for a in sig]
    signal = hs.signals.Signal2D(data, axes=hs_axes)
    if metadata:
        md = {k: v for k, v in metadata.items() if k != "_HyperSpy"}
        signal.metadata.add_dictionary(md)
    if original:
        signal.original_metadata.add_dictionary(original)
    if title:
        signal.metadata.General.title = title
    if signal.metadata.get_item("Signal.signal_type", ""):
        signal._assign_subclass()  # e.g. an HRTEM signal comes back as HRTEM
    if energy_eV and not signal.metadata.has_item("Acquisition_instrument.TEM.beam_energy"):
        signal.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(energy_eV) / 1e3)
    return signal
