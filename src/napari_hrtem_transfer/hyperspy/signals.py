"""HyperSpy signal types for HRTEM images: ``HRTEM`` and ``HRTEM_defocus_series``.

Registered through ``hyperspy_extension.yaml`` (HyperSpy imports this module only when it
needs one of the classes), so any real-space image or image stack can become one::

    >>> s = hs.load("particles.dm4")
    >>> s.set_signal_type("HRTEM")
    >>> mask = s.segment()               # Signal2D, the input's axes and metadata
    >>> s.ood_score().plot()             # one score per frame, over the navigation axes

Importing this module imports HyperSpy's signal classes but no torch: the methods load the
segmentation core on first use.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from hyperspy._signals.lazy import LazySignal
from hyperspy._signals.signal2d import Signal2D

from . import _core

__all__ = ["HRTEM", "HRTEMDefocusSeries", "LazyHRTEM", "LazyHRTEMDefocusSeries"]


def _calls(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a method's body ``_core.<name>(self, **its arguments)``, defaults applied.

    The method's signature and docstring are the public ones (the one home of the defaults);
    the function of :mod:`._core` takes the same names, keyword-only, and is looked up at
    each call.
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments["self"]
            extra = arguments.pop("kwargs", {})
            return getattr(_core, name)(self, **arguments, **extra)

        return call

    return decorate


class HRTEM(Signal2D):
    """A real-space HRTEM image or image stack, with segmentation and OOD methods.

    Any navigation (time series, defocus series, defocus x image, ...) is kept: every
    method returns signals on exactly the input's axes. Pixel size is read from the signal
    axes (nm, Å, pm, µm ...); axes in reciprocal units are refused by the methods.
    """

    _signal_type = "HRTEM"
    _alias_signal_types = ["HRTEM image", "hrtem"]  # as in hyperspy_extension.yaml
    _signal_dimension = 2
    _lazy = False

    @property
    def sampling_A(self) -> float | None:
        """Pixel size [Å/px] from the signal axes (the x axis), None when uncalibrated."""
        return _core.sampling_A(self, warn=False)

    @_calls("segment")
    def segment(
        self,
        model: Any = "pretrained",
        threshold: float | None = None,
        probabilities: bool = False,
        *,
        sampling_A: float | None = None,
        which: str = "best",
        device: str = "auto",
        progress: Any = None,
    ):
        """Segment the particles in every frame.

        Calls :func:`napari_hrtem_transfer.segmentation.segment` (the one segmentation
        core; torch is loaded on first use). A lazy signal is processed chunk by chunk and
        the result stays lazy until computed.

        Parameters
        ----------
        model
            ``"pretrained"`` (the model shipped with the package), a checkpoint folder, or a
            loaded model.
        threshold
            Probability from which a pixel is a particle; None: ``SegmentConfig``'s default
            (0.5), the one default of the CLI, napari and here.
        probabilities
            Return the particle probability map (float32 in [0, 1]) instead of the mask.
        sampling_A
            Pixel size [Å/px] overriding the signal axes (e.g. for an uncalibrated image).
        which, device, progress
            Passed to the core (``"best"``/``"last"`` checkpoint, ``"auto"``/``"cpu"``/
            ``"cuda"``, ``callable(done, total, message)``).

        Returns
        -------
        hyperspy.signals.Signal2D
            uint8 mask (1 = particle) or float32 probability, with this signal's navigation
            and signal axes, ``metadata`` and ``original_metadata``;
            ``metadata.Signal.quantity`` says what it holds and
            ``metadata.HRTEM_transfer.segmentation`` records the model, its weights' sha256,
            the threshold and the package version.

        Raises
        ------
        ReaderError
            If the signal is in reciprocal units (a diffraction pattern) or not an image.
        """

    @_calls("ood_score")
    def ood_score(
        self,
        model: Any = "pretrained",
        *,
        sampling_A: float | None = None,
        which: str = "best",
        device: str = "auto",
        progress: Any = None,
        components: bool = False,
    ):
        """Label-free out-of-distribution score of every frame.

        Parameters
        ----------
        components
            Also return the verdict's parts (see ``docs/ood_score.md``): a dict of signals
            over the navigation axes, ``"score"``, ``"caution"`` (1 = flagged),
            ``"estimated_defocus_nm"`` (from the Thon rings [nm], abTEM sign) and every
            numeric component (``network``, ``power_spectrum_distance``, ``ctf_overlap``,
            ``blank``, ``periodic``, ...); each one's ``metadata.HRTEM_transfer.ood`` holds
            the caution level, the per-frame ``reasons`` and the model's ``imaging_domain``.

        Returns
        -------
        hyperspy signal
            One value per frame over this signal's navigation axes: a ``Signal1D`` for one
            navigation axis (plot against defocus or time), a ``Signal2D`` map for two
            (defocus x image), a one-value ``BaseSignal`` for a single image. About 0 means
            training-like, above ``metadata.HRTEM_transfer.ood.caution_level`` treat the
            segmentation with caution. With ``components=True`` a dict of such signals.

        Raises
        ------
        ConfigError
            If the model has no OOD reference (fit one when fine-tuning).
        """

    @_calls("evaluate")
    def evaluate(
        self,
        masks: Any,
        model: Any = "pretrained",
        threshold: float | None = None,
        *,
        sampling_A: float | None = None,
        which: str = "best",
        device: str = "auto",
    ) -> dict[str, Any]:
        """Per-frame loss, Dice and IoU against ground-truth ``masks``.

        Parameters
        ----------
        masks
            Signal or array of this signal's data shape; non-zero = particle.

        Returns
        -------
        dict
            ``{"loss": ..., "dice": ..., "iou": ...}``, each a signal over the navigation
            axes (see :meth:`ood_score`): the binary cross-entropy of the probability map
            [nats/pixel], and Dice and IoU of the thresholded mask
            (:mod:`napari_hrtem_transfer.evaluation.metrics`). For a lazy signal the three
            share one dask graph: compute them together,
            ``dask.compute(*(r.data for r in res.values()))``, to segment once (each
            ``.compute()`` on its own segments again).

        Raises
        ------
        ConfigError
            If ``masks`` has another shape (the message names both signals).
        """

    @_calls("finetune")
    def finetune(
        self,
        labels: Any,
        model: Any = "pretrained",
        freeze: str | None = None,
        epochs: int | None = None,
        out: Any = None,
        *,
        sampling_A: float | None = None,
        **kwargs: Any,
    ):
        """Fine-tune a model on the annotated frames of this signal.

        Calls :func:`napari_hrtem_transfer.annotations.finetune_on_annotations`.

        Parameters
        ----------
        labels
            Signal or array of this signal's data shape (non-zero = particle); frames
            without any labelled pixel are ignored.
        model, freeze, epochs
            Starting model, which part stays frozen (``"none"``, ``"encoder"``,
            ``"decoder"``, ``"gradual"``), number of epochs; None: the defaults of
            :func:`~napari_hrtem_transfer.annotations.finetune_on_annotations`.
        out
            Folder for the new checkpoint.
        **kwargs
            Passed on (``lr``, ``progress``, ``stop``, ...).

        Returns
        -------
        pathlib.Path
            The checkpoint folder (usable as ``model=`` in :meth:`segment`).
        """


class LazyHRTEM(LazySignal, HRTEM):
    """Lazy twin of :class:`HRTEM`: the methods build dask graphs, one task per chunk."""

    _lazy = True


class HRTEMDefocusSeries(HRTEM):
    """A simulated defocus series (``hrtem-transfer simulate``), ground-truth masks included.

    Navigation axes ``image`` x ``defocus`` [nm]; :attr:`masks` is the ground truth as a
    signal on the same axes, so ``s.evaluate(s.masks)`` scores every frame.
    """

    _signal_type = "HRTEM_defocus_series"
    _alias_signal_types = ["HRTEM defocus series"]

    @property
    def defocus_nm(self) -> np.ndarray | None:
        """Nominal defocus of each plane [nm] (abTEM sign: positive = underfocus)."""
        for ax in self.axes_manager.navigation_axes:
            if ax.name == "defocus":
                return np.asarray(ax.axis, dtype=float)
        return None

    @property
    def masks(self):
        """Ground-truth masks (uint8, 1 = particle) with exactly this signal's axes.

        The file stores one mask per structure, shared by every defocus; here it is
        repeated along the defocus axis (a broadcast view, no copy for lazy signals).

        Raises
        ------
        AttributeError
            If the series has no ground truth (an unlabelled file).
        """
        if not self.metadata.has_item(f"{_core.NODE}.masks"):
            raise AttributeError(
                f"signal '{_core.signal_name(self)}' has no ground-truth masks "
                f"(metadata.{_core.NODE}.masks is missing)."
            )
        m = self.metadata.get_item(f"{_core.NODE}.masks")
        mdata = m.data
        shape = self.data.shape
        if tuple(mdata.shape) != tuple(shape[-mdata.ndim :]):
            raise AttributeError(
                f"signal '{_core.signal_name(self)}': masks of shape {tuple(mdata.shape)} do "
                f"not fit images of shape {tuple(shape)}."
            )
        if self._lazy:
            import dask.array as da

            data = da.broadcast_to(da.asarray(mdata).astype(np.uint8), shape)
        else:
            data = np.asarray(mdata.compute() if hasattr(mdata, "compute") else mdata)
            data = np.ascontiguousarray(np.broadcast_to(data.astype(np.uint8), shape))
        out = self._deepcopy_with_new_data(data)
        _core._strip_for_result(out)
        out.metadata.General.title = f"{_core.signal_name(self)} – ground-truth masks"
        out.metadata.Signal.quantity = _core.MASK_QUANTITY
        return out

    def evaluate(self, masks: Any = None, model: Any = "pretrained", **kwargs: Any):
        """:meth:`HRTEM.evaluate`, against the series' own ground truth by default."""
        return super().evaluate(self.masks if masks is None else masks, model=model, **kwargs)


class LazyHRTEMDefocusSeries(LazySignal, HRTEMDefocusSeries):
    """Lazy twin of :class:`HRTEMDefocusSeries`."""

    _lazy = True
