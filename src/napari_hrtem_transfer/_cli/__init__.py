"""Sub-commands of ``hrtem-transfer`` (see :mod:`napari_hrtem_transfer.cli`)."""
