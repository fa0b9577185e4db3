"""napari-hrtem-transfer: HRTEM nanoparticle segmentation with transfer learning.

Importing this package is cheap: it imports no torch, abTEM, HyperSpy or Qt.
Sign convention used everywhere: defocus follows abTEM, ``defocus = -C10``;
positive defocus is underfocus.  Defocus is given in nm at user-facing
interfaces and in Å inside the physics code.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-hrtem-transfer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
