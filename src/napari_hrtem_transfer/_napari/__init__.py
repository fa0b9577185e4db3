"""The napari plugin: reader, sample data and dock widgets.

This sub-package is the only place that imports napari, magicgui, qtpy or superqt. The
manifest (``napari.yaml``) points into its modules by ``python_name``, so nothing here is
imported until napari needs it; keep this file free of imports.
"""
