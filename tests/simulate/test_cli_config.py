"""``hrtem-transfer simulate``: options derived from SimulationConfig; --config, --save-config."""

from __future__ import annotations

import argparse
import re

import pytest

from napari_hrtem_transfer._cli import simulate as sim_cli
from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.config import load_config, save_config
from napari_hrtem_transfer.simulate import PRESETS, SimulationConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sim_cli.add_arguments(p)
    return p


def _config(*argv: str) -> SimulationConfig:
    return sim_cli.config_from_args(_parser().parse_args(["--out", "x.hspy", *argv]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_options_give_the_preset(preset):
    expected = SimulationConfig.from_preset(preset)
    assert _config() == SimulationConfig.from_preset("laptop")
    assert _config("--preset", preset) == expected


def test_every_flag_sets_its_field_in_the_fields_unit():
    cfg = _config(
        "--material", "au", "--n-structures", "3", "--size", "128", "--sampling", "0.25",
        "--sim-sampling", "0.125", "--phonons", "3", "--defocus", "-7", "4",
        "--defocus-jitter", "0", "--dose", "50", "--voltage", "200", "--cs", "1.2",
        "--focal-spread", "20", "--aperture", "15", "--radius", "1", "2", "--particles", "2",
        "--substrate-thickness", "0", "--stacking-faults", "1", "2", "--seed", "9",
    )
    assert cfg.material == "Au" and cfg.n_structures == 3 and cfg.image_size_px == 128
    assert cfg.sampling_A == 0.25 and cfg.sim_sampling_A == 0.125 and cfg.n_phonons == 3
    assert cfg.defocus_nm == [-7.0, 4.0] and cfg.defocus_jitter_nm == 0
    assert cfg.dose_e_per_A2 == 50 and cfg.energy_eV == pytest.approx(200e3)
    assert cfg.Cs_A == pytest.approx(1.2e7)  # mm -> Å
    assert cfg.focal_spread_A == 20 and cfg.semiangle_cutoff_mrad == 15
    assert cfg.radius_nm == (1.0, 2.0) and cfg.particles_per_image == (2, 2)
    assert cfg.substrate_thickness_nm == (0.0, 0.0) and cfg.stacking_faults == (1, 2)
    assert cfg.seed == 9
    assert set(sim_cli.FLAGS) <= set(SimulationConfig.model_fields)


def test_help_shows_the_configs_defaults_in_the_flags_units():
    """The help text is derived from the config: each option shows the presets' values."""
    helps = {a.dest: a.help for a in _parser()._actions}
    presets = {n: SimulationConfig.from_preset(n) for n in PRESETS}
    for field, spec in sim_cli.FLAGS.items():
        text = helps[spec.dest]
        values = [getattr(c, field) for c in presets.values()]
        a = values[0]
        if any(v != a for v in values):
            assert all(f"{n}: " in text for n in presets), (spec.flag, text)
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            assert re.search(rf"\(default: {a / spec.scale:g}\)$", text), (spec.flag, text)
    assert "(default: 300)" in helps["voltage"] and "[kV]" in helps["voltage"]
    assert "(default: 0.005)" in helps["cs"] and "[mm]" in helps["cs"]
    # descriptions come from the config's fields where the flag's words are the field's
    assert SimulationConfig.model_fields["n_phonons"].description.rstrip(".") in helps["phonons"]


def test_config_file_gives_the_start_and_options_override_it(tmp_path):
    start = SimulationConfig.from_preset(
        "study", material="Au", n_structures=2, slice_thickness_A=1.5, defocus_nm=[-3, 3]
    )
    start.dose_e_per_A2 = None
    path = save_config(start, tmp_path / "sim.toml")
    assert _config("--config", str(path)) == start  # fields without a flag come through too
    cfg = _config("--config", str(path), "--seed", "4", "--voltage", "200", "--dose", "90")
    assert cfg.seed == 4 and cfg.energy_eV == pytest.approx(200e3) and cfg.dose_e_per_A2 == 90
    assert cfg.slice_thickness_A == 1.5 and cfg.material == "Au" and cfg.preset == "study"


@pytest.mark.parametrize(
    ("make", "argv", "words"),
    [
        (None, ["--preset", "study"], ["either --config or --preset"]),
        ('kind = "train"\nversion = "1"\n[fields]\n', [], ["--config", "'simulation'"]),
        ('kind = "simulation"\nversion = "9"\n[fields]\n', [], ["--config", "version '9'"]),
        # the file's problems keep the file's (config) names
        ('kind = "simulation"\nversion = "1"\n[fields]\nimage_size_px = 8\n', [],
         ["--config", "image_size_px", "greater than or equal to 32"]),
        # an override that breaks the file's config is named by its flag
        ('kind = "simulation"\nversion = "1"\n[fields]\nsampling_A = 0.2\n',
         ["--sim-sampling", "0.5"], ["--sim-sampling=0.5", "coarser"]),
    ],
)
def test_cli_config_errors_exit_2_without_traceback(tmp_path, capsys, make, argv, words):
    cfg = tmp_path / "c.toml"
    if make is None:
        save_config(SimulationConfig(), cfg)
    else:
        cfg.write_text(make)
    out = tmp_path / "x.hspy"
    rc = main(["simulate", "--out", str(out), "--quiet", "--config", str(cfg), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_cli_runs_from_a_config_file_and_saves_the_resolved_one(tmp_path, capsys):
    from napari_hrtem_transfer.io import load_dataset

    start = SimulationConfig.from_preset(
        "laptop", n_structures=1, image_size_px=128, radius_nm=(0.5, 0.6),
        particles_per_image=(1, 1), defocus_nm=[0.0], substrate_thickness_nm=(1.0, 1.0),
        n_phonons=1,
    )
    src = save_config(start, tmp_path / "start.toml")
    out, saved, png = tmp_path / "cli.hspy", tmp_path / "resolved.toml", tmp_path / "f.png"
    rc = main(["simulate", "--out", str(out), "--quiet", "--config", str(src),
               "--seed", "5", "--save-config", str(saved), "--figure", str(png)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"wrote {saved}" in printed.out and f"wrote {png}" in printed.out
    # the figure: one panel per defocus plus the mask, in a row (wider than tall)
    from matplotlib.image import imread

    img = imread(png)
    assert img.ndim == 3 and img.shape[1] > 1.5 * img.shape[0]
    assert img[..., :3].std() > 0.05  # not a blank canvas
    resolved = load_config(saved, "simulation")
    assert resolved == start.model_copy(update={"seed": 5})
    ds = load_dataset(out, lazy=False)
    assert ds.images.shape == (1, 1, 128, 128)
    assert SimulationConfig.model_validate(ds.info["config"]) == resolved


def test_flag_helper_derives_types_choices_and_defaults_from_any_config():
    """The shared helper (_cli/flags.py) is not simulate-specific: TrainConfig's fields too."""
    from napari_hrtem_transfer._cli.flags import Flag, add_config_flags, overrides_from_args
    from napari_hrtem_transfer.training.config import TrainConfig

    flags = {
        "loss": Flag("--loss", dest_name="loss"),
        "num_threads": Flag("--threads", dest_name="num_threads"),
        "train_defocus_nm": Flag("--defocus", dest_name="train_defocus_nm"),
    }
    p = argparse.ArgumentParser()
    add_config_flags(p, TrainConfig, flags, {"loss": {"pretrain": "bce", "finetune": "bce_dice"}})
    actions = {a.dest: a for a in p._actions}
    assert actions["loss"].choices == ("bce", "bce_dice")
    assert actions["loss"].help.endswith("(pretrain: bce; finetune: bce_dice)")
    assert actions["num_threads"].type is int and actions["num_threads"].help.endswith(
        "(default: none)"
    )
    assert actions["train_defocus_nm"].nargs == "+"
    with pytest.raises(SystemExit):
        p.parse_args(["--loss", "dice"])
    args = p.parse_args(["--threads", "3"])
    assert overrides_from_args(args, flags) == {"num_threads": 3}
