"""HyperSpy extension: ``HRTEM`` and ``HRTEM_defocus_series`` signal types.

With the package installed, HyperSpy knows the types (``hs.print_known_signal_types()``)::

    >>> import hyperspy.api as hs
    >>> s = hs.load("image.dm4")
    >>> s.set_signal_type("HRTEM")
    >>> mask = s.segment()              # the one segmentation core, on the signal's axes
    >>> s.ood_score().plot()

Files written by ``hrtem-transfer simulate`` load as ``HRTEMDefocusSeries`` (with
``.masks``). Experimental sessions (a folder or list of files) load as one ``HRTEM`` stack
with :func:`napari_hrtem_transfer.io.sessions.load_session`.

Importing this subpackage imports neither HyperSpy nor torch; the classes are imported on
first access (``napari_hrtem_transfer.hyperspy.HRTEM``).
"""

from __future__ import annotations

from ..lazy import lazy_exports

__all__ = ["HRTEM", "HRTEMDefocusSeries", "LazyHRTEM", "LazyHRTEMDefocusSeries"]

__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, ".signals"))
