"""The Simulate dock: a labelled HRTEM defocus series with abTEM, added as layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, FileEdit, LineEdit

from ...errors import ConfigError
from .._jobs import build_simulation_config, simulate_job
from ._base import DEFOCUS_TIP, JobDock
from ._fields import field_info, float_widget, int_widget, widget_message

if TYPE_CHECKING:
    import napari

#: config field -> the label of its widget (validation messages name the widget)
SIMULATE_LABELS = {
    "preset": "preset",
    "material": "material",
    "n_structures": "structures",
    "defocus_nm": "defoci [nm]",
    "dose_e_per_A2": "dose [e/Å²]",
    "image_size_px": "image size [px]",
    "seed": "seed",
}


def _add_layer_data(viewer: napari.Viewer, layers: list[tuple]) -> list[Any]:
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layers]


class SimulateWidget(JobDock):
    """Simulate a labelled HRTEM defocus series with abTEM and add it as layers.

    Adds the images (defocus, image, y, x) and the ground-truth masks (Labels), with the
    defocus axis in nm (abTEM sign: positive = underfocus) and the pixel size in nm.
    Stop ends the simulation after the current structure (nothing partial is kept).
    """

    job_title = "Simulation"

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        from ...simulate import MATERIALS, PRESETS, SimulationConfig

        super().__init__(napari_viewer, "Simulate")
        C = SimulationConfig
        self.preset = ComboBox(
            label="preset", choices=list(PRESETS), value="laptop",
            tooltip="laptop: 256 px, 2 phonons (seconds per structure); "
            "study: the published settings (512 px, 8 phonons; slow on a CPU).",
        )
        self.material = ComboBox(label="material", choices=list(MATERIALS),
                                 value=field_info(C, "material")["default"],
                                 tooltip=field_info(C, "material")["description"])
        self.n_structures = int_widget(C, "n_structures", SIMULATE_LABELS["n_structures"],
                                       value=4, max=100_000)
        defoci = field_info(C, "defocus_nm")["default"]
        self.defocus_nm = LineEdit(
            label=SIMULATE_LABELS["defocus_nm"], value=", ".join(f"{d:g}" for d in defoci),
            tooltip="Nominal defoci [nm], separated by commas. " + DEFOCUS_TIP,
        )
        self.dose = float_widget(C, "dose_e_per_A2", SIMULATE_LABELS["dose_e_per_A2"],
                                 decimals=1, min=0.0, max=1e7, step=10.0,
                                 tooltip="Electron dose [e/Å²] for Poisson noise; "
                                 "0 = noise-free intensities.")
        self.image_size = int_widget(C, "image_size_px", SIMULATE_LABELS["image_size_px"],
                                     value=0, min=0,
                                     tooltip="Image side [px]; 0 keeps the preset's.")
        self.seed = int_widget(C, "seed", SIMULATE_LABELS["seed"])
        self.save_path = FileEdit(
            label="save as", mode="w", filter="*.hspy", value="",
            tooltip="Optional: also write the dataset to this .hspy file (needed to train on it).",
        )
        self.form.extend([self.preset, self.material, self.n_structures, self.defocus_nm,
                          self.dose, self.image_size, self.seed, self.save_path])
        self.add_job_rows()
        self.added_layers: list[Any] = []
        self._presets = PRESETS
        self.preset.changed.connect(self._apply_preset)

    def _apply_preset(self, name: str) -> None:
        """Show the preset's defoci in the form (the user may edit them afterwards)."""
        if name not in self._presets:
            return
        from ...simulate import SimulationConfig

        defoci = SimulationConfig.from_preset(name).defocus_nm  # the preset's, else the default
        self.defocus_nm.value = ", ".join(f"{d:g}" for d in defoci)

    def config(self) -> Any:
        """The :class:`~napari_hrtem_transfer.simulate.SimulationConfig` of the form.

        Raises
        ------
        ConfigError
            Naming the form's field (not a command-line flag).
        """
        try:
            return build_simulation_config(
                preset=self.preset.value,
                material=self.material.value,
                n_structures=self.n_structures.value,
                defocus_nm=self.defocus_nm.value,
                dose_e_per_A2=self.dose.value or None,
                seed=self.seed.value,
                image_size_px=self.image_size.value or None,
            )
        except ConfigError as exc:
            raise ConfigError(widget_message(str(exc), SIMULATE_LABELS, exc.field),
                              exc.field) from exc

    def _prepare(self) -> tuple[Any, tuple, dict]:
        config = self.config()
        save = str(self.save_path.value) if str(self.save_path.value) not in ("", ".") else None
        return simulate_job, (config,), {"save_path": save}

    def on_done(self, layers: list[tuple]) -> None:
        """Add the simulated images and masks."""
        self.added_layers = _add_layer_data(self._viewer, layers)
        self.set_status(f"done: added {len(self.added_layers)} layer(s)")
