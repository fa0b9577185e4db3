"""Sub-commands of ``hrtem-transfer`` (see :mod:`napari_hrtem_transfer.cli`).

One module per group of commands (``simulate``, ``train``, ``evaluate``, ``demo``, ``sweep``,
``export``), each a thin caller of the core; :mod:`.flags` derives options from the pydantic
configs (types, nargs, choices, help and defaults written once, in the config).
"""
