"""The simulation config: presets, validation, and the CLI's handling of bad input."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.simulate import SimulationConfig, wavelength_A


def test_wavelength_300kV():
    # 300 kV electrons: 1.9687 pm (Kirkland, Advanced Computing in EM, table)
    assert wavelength_A(300e3) == pytest.approx(0.019687, rel=1e-4)


def test_study_preset_matches_the_paper():
    c = SimulationConfig.from_preset("study")
    assert c.energy_eV == 300e3
    assert c.sim_sampling_A == 0.1 and c.sampling_A == 0.2
    assert c.n_phonons == 8 and c.image_size_px == 512
    assert c.defocus_nm == [float(d) for d in range(-25, 26, 5)]
    assert c.dose_e_per_A2 == 400 and c.focal_spread_A == 10 and c.defocus_jitter_nm == 1.5
    assert c.particles_per_image == (1, 5) and c.radius_nm == (1.5, 2.5)
    assert c.substrate_thickness_nm == (2.0, 8.0)
    assert c.mask_phase_threshold_rad == pytest.approx(math.pi / 16)
    assert c.sim_gpts == 1024


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"material": "Unobtainium"}, "unknown material"),
        ({"defocus_nm": []}, "in defocus_nm"),
        ({"defocus_nm": []}, "empty"),
        ({"dose_e_per_A2": 0}, "greater than 0"),
        ({"sim_sampling_A": 0.3}, "coarser"),
        ({"semiangle_cutoff_mrad": 80}, "finer sampling_A"),
        ({"radius_nm": (2, 1)}, "min <= max"),
        ({"not_a_field": 1}, "Extra inputs"),
    ],
)
def test_bad_values_are_refused_with_a_reason(overrides, words):
    with pytest.raises(ValidationError, match=words):
        SimulationConfig(**overrides)


def test_material_names_are_case_insensitive():
    assert SimulationConfig(material="cdse").material == "CdSe"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--dose", "0"], "--dose"),
        (["--dose", "-5"], "--dose"),
        (["--material", "kryptonite"], "--material"),
        (["--defocus"], "--defocus"),
        (["--aperture", "80"], "aperture"),
        (["--sim-sampling", "0.0005", "--size", "4096"], "--sim-sampling"),
    ],
)
def test_cli_bad_input_exit_2_and_no_file(tmp_path, capsys, argv, flag):
    out = tmp_path / "x.hspy"
    rc = main(["simulate", "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert flag in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_unwritable_output(tmp_path, capsys):
    rc = main(["simulate", "--out", str(tmp_path / "missing" / "x.hspy"), "--quiet"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_help_states_the_defocus_convention(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "positive = underfocus" in out and "e/Å²" in out


def test_cli_words_core_errors_with_its_flags(tmp_path, capsys):
    """A core error naming image_size_px / radius_nm reaches CLI users as --size / --radius."""
    out = tmp_path / "x.hspy"
    rc = main(["simulate", "--out", str(out), "--quiet", "--n-structures", "1",
               "--size", "64", "--radius", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--size" in err and "--radius" in err
    assert "image_size_px" not in err and "radius_nm" not in err
    assert list(tmp_path.iterdir()) == []


def test_config_error_keeps_its_positional_field_and_rewords():
    from napari_hrtem_transfer.errors import ConfigError

    legacy = ConfigError("--out x: use a name ending in .hspy", "--out")
    assert legacy.field == "--out" and legacy.fields == ("--out",)
    err = ConfigError("use a larger image_size_px (path /d/image_size_px/f)", "image_size_px")
    cli = err.reworded({"image_size_px": "--size"})
    assert isinstance(cli, ConfigError) and cli.field == "--size"
    assert str(cli) == "use a larger --size (path /d/image_size_px/f)"
