"""Simulation of HRTEM defocus series of nanoparticles on amorphous carbon (abTEM).

Importing this package is cheap; abTEM and ase are imported when a simulation runs.

Defocus sign convention (abTEM): ``defocus = -C10`` [nm at interfaces, Å inside];
positive defocus is underfocus.
"""

from .config import MATERIALS, PRESETS, SimulationConfig, wavelength_A
from .series import simulate_dataset, simulate_structure, simulate_to_file

__all__ = [
    "MATERIALS",
    "PRESETS",
    "SimulationConfig",
    "simulate_dataset",
    "simulate_structure",
    "simulate_to_file",
    "wavelength_A",
]
