"""Move between HyperSpy signals and this package's calibrated arrays.

Scripts that already work in HyperSpy can hand a signal to the models with
:func:`from_signal`, and put predictions back on calibrated axes with :func:`to_signal`::

    >>> import hyperspy.api as hs
    >>> from napari_hrtem_transfer.io.hyperspy_integration import from_signal, to_signal
    >>> image = from_signal(hs.load("frame.dm4"))  # ExperimentalImage, sampling_A [Å]
    >>> proba = model.predict_proba(image.data)  # (n, ny, nx)
    >>> s = to_signal(proba, sampling_A=image.sampling_A, title="particle probability")

HyperSpy is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ReaderError
from .readers import ExperimentalImage, images_from_signals

__all__ = ["from_signal", "to_signal"]


def from_signal(signal: Any, *, allow_reciprocal: bool = False) -> ExperimentalImage:
    """Convert a HyperSpy ``Signal2D`` (image or image stack) to an :class:`ExperimentalImage`.

    Parameters
    ----------
    signal
        A HyperSpy signal with two signal axes. Navigation axes become frames (flattened
        in array order). Lazy signals are computed.
    allow_reciprocal
        Accept axes in reciprocal units (diffraction patterns); ``sampling_A`` is then None.

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
    if getattr(signal, "_lazy", False):
        signal = signal.deepcopy()
        signal.compute()
    return images_from_signals(signal, path=None, allow_reciprocal=allow_reciprocal)[0]


def to_signal(
    image: ExperimentalImage | np.ndarray | Any,
    *,
    sampling_A: float | None = None,
    title: str | None = None,
    frame_axis: str = "frame",
) -> Any:
    """Build a HyperSpy ``Signal2D`` with calibrated axes [nm].

    Parameters
    ----------
    image
        An :class:`ExperimentalImage`, a 2-D array (ny, nx) or a stack (n, ny, nx).
        A :class:`~napari_hrtem_transfer.io.dataset.HRTEMDataset` is converted with
        :func:`napari_hrtem_transfer.io.dataset.to_signal` (images plus masks).
    sampling_A
        Pixel size [Å/px]; overrides the image's own. None keeps the image's (or leaves
        an array uncalibrated: scale 1, no units).
    title
        ``metadata.General.title``; defaults to the image's name.
    frame_axis
        Name of the navigation axis of a stack.

    Returns
    -------
    hyperspy.signals.Signal2D
        Signal axes ``y`` and ``x`` in nm (scale = ``sampling_A / 10``); a stack has one
        navigation axis. Metadata from an :class:`ExperimentalImage` (beam energy) is kept.
    """
    import hyperspy.api as hs

    from .dataset import HRTEMDataset
    from .dataset import to_signal as dataset_to_signal

    if isinstance(image, HRTEMDataset):
        return dataset_to_signal(image)
    metadata: dict[str, Any] = {}
    frame_def: dict[str, Any] | None = None
    if isinstance(image, ExperimentalImage):
        data = image.data[0] if image.n_frames == 1 else image.data
        sampling = image.sampling_A if sampling_A is None else sampling_A
        metadata = image.metadata
        title = image.name if title is None else title
        if image.n_frames > 1:
            frame_def = dict(image.axes[0])
    else:
        data = np.asarray(image)
        sampling = sampling_A
        if data.ndim not in (2, 3):
            raise ReaderError(
                f"to_signal needs an image (ny, nx) or a stack (n, ny, nx); got shape {data.shape}."
            )
    if sampling is not None and not (np.isfinite(sampling) and sampling > 0):
        raise ReaderError(f"sampling_A must be a positive pixel size [Å]; got {sampling!r}.")
    ny, nx = data.shape[-2:]
    if sampling is None:
        sig_axes = [
            {"name": "y", "size": ny, "scale": 1.0, "offset": 0.0},
            {"name": "x", "size": nx, "scale": 1.0, "offset": 0.0},
        ]
    else:
        s_nm = float(sampling) / 10.0
        sig_axes = [
            {"name": "y", "size": ny, "scale": s_nm, "offset": 0.0, "units": "nm"},
            {"name": "x", "size": nx, "scale": s_nm, "offset": 0.0, "units": "nm"},
        ]
    axes = sig_axes
    if data.ndim == 3:
        nav = {"name": frame_axis, "size": int(data.shape[0]), "scale": 1.0, "offset": 0.0}
        if frame_def is not None and "axis" not in frame_def:
            nav.update(
                name=frame_def.get("name") or frame_axis,
                scale=float(frame_def.get("scale", 1.0)),
                offset=float(frame_def.get("offset", 0.0)),
            )
            if frame_def.get("units"):
                nav["units"] = frame_def["units"]
        axes = [nav, *sig_axes]
    signal = hs.signals.Signal2D(np.asarray(data), axes=axes)
    if title:
        signal.metadata.General.title = title
    energy = metadata.get("energy_eV")
    if energy:
        signal.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(energy) / 1e3)
    return signal
