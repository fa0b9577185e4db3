"""The sweep config: TOML loading, the grid, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.sweep import SweepConfig, load_sweep_config
from napari_hrtem_transfer.sweep.config import validate_sweep_config

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]

TOML = """
version = "1"
name = "t"
[data]
pretrain = "series.hspy"
[grid]
pretrain_defocus_nm = [-10, 0, 10]
transfer_defocus_nm = [-10, 10]
freeze = ["none", "encoder", "decoder"]
n_transfer = [8, 16]
seeds = [0, 1]
[model]
architecture = "compact"
channels = [8, 16, 16, 16]
[pretrain]
epochs = 2
[run]
resources = {GPU = 1}
"""


def test_toml_grid_and_relative_paths(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text(TOML)
    cfg = load_sweep_config(p)
    # paths relative to the file's folder
    assert cfg.data.pretrain == tmp_path / "series.hspy"
    assert cfg.data.transfer_path == cfg.data.pretrain
    # 3 pretraining x 2 targets minus the 2 equal pairs = 4 pairs; x 3 freeze x 2 N x 2 seeds
    pts = cfg.points()
    assert len(pts) == 4 * 3 * 2 * 2
    assert all(pt.pretrain_defocus_nm != pt.transfer_defocus_nm for pt in pts)
    assert len(set(pts)) == len(pts)
    assert cfg.run.resources == {"GPU": 1.0}
    # study defaults where the file is silent; the model's own options are kept
    assert cfg.transfer.epochs == 10 and cfg.transfer.batch_size == 16
    assert cfg.model.channels == (8, 16, 16, 16)
    # the stage configs a run trains with
    pt = pts[0]
    pre = cfg.pretrain_config(pt)
    assert pre.train_defocus_nm == [pt.pretrain_defocus_nm] and pre.epochs == 2
    assert pre.deterministic and pre.num_threads == 1 and pre.init_from is None
    ft = cfg.transfer_config(pt, init_from=tmp_path)
    assert ft.freeze == pt.freeze and ft.n_train == pt.n_transfer and ft.seed == pt.seed
    assert ft.train_defocus_nm == [pt.transfer_defocus_nm]


def test_include_same_domain_adds_the_diagonal(tmp_path):
    cfg = SweepConfig.model_validate(
        tiny_config(tmp_path / "d.hspy", grid={"transfer_defocus_nm": [-5.0, 5.0]})
    )
    assert len(cfg.points()) == 1 * 2  # only +5 (x 2 freezing options)
    cfg2 = SweepConfig.model_validate(
        tiny_config(
            tmp_path / "d.hspy",
            grid={"transfer_defocus_nm": [-5.0, 5.0], "include_same_domain": True},
        )
    )
    assert len(cfg2.points()) == 2 * 2


@pytest.mark.parametrize(
    ("section", "values", "words"),
    [
        ({"grid"}, {"freeze": ["none", "encodr"]}, ["grid.freeze[1]", "'encoder'", "encodr"]),
        ({"grid"}, {"n_transfer": [0]}, ["grid.n_transfer", "at least 1"]),
        ({"grid"}, {"seeds": []}, ["grid.seeds", "empty"]),
        ({"grid"}, {"transfer_defocus_nm": [-5.0]}, ["no run", "include_same_domain"]),
        ({"run"}, {"device": "tpu"}, ["run.device", "cuda"]),
        ({"pretrain"}, {"patch_size": 50}, ["multiple of 32"]),
        ({"run"}, {"reuse": True}, ["run.reuse", "Extra inputs"]),
    ],
)
def test_invalid_values_name_key_and_choices(tmp_path, section, values, words):
    (name,) = section
    raw = tiny_config(tmp_path / "d.hspy", **{name: values})
    with pytest.raises(ConfigError) as info:
        validate_sweep_config(raw, "sweep.toml")
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_bad_toml_is_a_config_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[grid\nfreeze = none")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_config(tmp_path / "missing.toml")


def test_study_small_config_in_the_repository():
    cfg = load_sweep_config(REPO / "configs" / "study_small.toml")
    assert cfg.grid.pretrain_defocus_nm == [-10, -5, 0, 5, 10]
    assert set(cfg.grid.freeze) == {"none", "encoder"}
    # 5 pretraining x 5 targets, 3 shared defoci skipped on the diagonal -> 22 pairs
    assert len(cfg.points()) == 22 * 2 * len(cfg.grid.seeds)
    assert cfg.run.reuse_pretrained and cfg.run.deterministic
    assert cfg.data.pretrain == REPO / "data" / "study_small.hspy"
