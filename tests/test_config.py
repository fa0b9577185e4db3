"""The config home: every pydantic model reachable from one module, one versioned TOML format,
and the one pydantic -> ConfigError conversion (errors.config_error_from_validation)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from napari_hrtem_transfer import config
from napari_hrtem_transfer.config import (
    KINDS,
    load_config,
    save_config,
)
from napari_hrtem_transfer.errors import ConfigError, config_error_from_validation

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_hrtem_transfer"


def _pydantic_models_in_source() -> dict[str, str]:
    """Every class deriving from BaseModel in the package's source: name -> module."""
    found = {}
    for path in SRC.rglob("*.py"):
        if path.name.startswith("_legacy"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id == "BaseModel")
                or (isinstance(b, ast.Attribute) and b.attr == "BaseModel")
                for b in node.bases
            ):
                rel = path.relative_to(SRC.parent).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                found[node.name] = ".".join(parts)
    return found


def test_every_pydantic_model_is_reachable_from_the_config_home():
    models = _pydantic_models_in_source()
    assert {"SimulationConfig", "TrainConfig", "SegmentConfig", "SweepConfig"} <= set(models)
    missing = sorted(set(models) - set(config.__all__))
    assert not missing, f"add these models to napari_hrtem_transfer.config: {missing}"
    for name, module in models.items():
        cls = getattr(config, name)
        assert issubclass(cls, BaseModel) and cls.__name__ == name
        # the re-export is the class itself, from its home module (no copy)
        assert cls is getattr(sys.modules[cls.__module__], name)
        assert cls.__module__.startswith(module.rsplit(".", 1)[0]), (name, cls.__module__)


def test_importing_the_config_home_is_light():
    code = (
        "import sys, napari_hrtem_transfer.config as c;"
        "print(','.join(m for m in sys.modules if m.startswith('napari_hrtem_transfer.')"
        " or m in ('torch', 'abtem', 'hyperspy', 'dask', 'pydantic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(filter(None, out.stdout.strip().split(","))) <= {
        "napari_hrtem_transfer.config",
        "napari_hrtem_transfer.errors",
        "napari_hrtem_transfer.lazy",
    }
    code = (
        "import sys; from napari_hrtem_transfer.config import SimulationConfig;"
        "print('napari_hrtem_transfer.segmentation' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchConfig"):
        config.NoSuchConfig  # noqa: B018


def _examples():
    from napari_hrtem_transfer.config import (
        CompactUNetConfig,
        ResampleConfig,
        ResNet18UNetConfig,
        SegmentConfig,
        SimulationConfig,
        TrainConfig,
    )

    sim = SimulationConfig.from_preset("study", material="Au", defocus_nm=[-7.5, 0, 12.25])
    sim.dose_e_per_A2 = None  # None where the default is not: must survive the round trip
    sim.semiangle_cutoff_mrad = 20.0
    train = TrainConfig.finetune(Path("/models/pre"), [5.0], freeze="encoder", lr=3e-4)
    pretrain = TrainConfig(model=CompactUNetConfig(channels=(8, 16, 24, 32)), patch_size=None)
    return {
        "simulation": [sim, SimulationConfig()],
        "train": [train, pretrain],
        "segment": [SegmentConfig(threshold=0.3, ood=False)],
        "compact-unet": [CompactUNetConfig(bottleneck_dilations=(1, 2, 3))],
        "resnet18-unet": [ResNet18UNetConfig()],
        "resample": [ResampleConfig(max_zoom=4.0)],
    }


def _sweep_example(tmp_path):
    from napari_hrtem_transfer.config import DataSettings, GridSettings, SweepConfig

    return SweepConfig(
        name="round trip",
        data=DataSettings(pretrain=tmp_path / "series.hspy"),
        grid=GridSettings(
            pretrain_defocus_nm=[-10.0, 0.0], transfer_defocus_nm=[10.0], n_transfer=[4]
        ),
    )


def _other_examples(kind):
    from napari_hrtem_transfer import config as c

    return {
        "ood-fit": lambda: [c.OODFitConfig()],
        "ood-verdict": lambda: [c.VerdictConfig(ps_weight=1.5)],
        "bioimageio-export": lambda: [
            c.BioimageioExportConfig(),
            c.BioimageioExportConfig(name="my model (v2)", authors=["A", "B"], test=False),
        ],
        "independent-check": lambda: [
            c.IndependentConfig(),
            c.IndependentConfig(materials=("Au",), dose_e_per_A2=None, defocus_nm=[-5.0, 7.5]),
        ],
        "preprocess": lambda: [c.PreprocessConfig(), c.PreprocessConfig(flat_field_sigma_A=200.0)],
    }[kind]()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips_through_its_file(tmp_path, kind):
    if kind == "sweep":
        cfgs = [_sweep_example(tmp_path)]
    elif kind in ("ood-fit", "ood-verdict", "bioimageio-export", "independent-check", "preprocess"):
        cfgs = _other_examples(kind)
    else:
        cfgs = _examples()[kind]
    for i, cfg in enumerate(cfgs):
        path = save_config(cfg, tmp_path / f"{kind}-{i}.toml")
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        assert doc["kind"] == kind and doc["version"] == config.supported_versions(kind)[0]
        assert "version" not in doc["fields"]
        back = load_config(path)
        assert type(back) is type(cfg)
        assert back == cfg, kind
        assert load_config(path, kind=kind) == cfg


def test_file_layout_none_values_and_defaults(tmp_path):
    from napari_hrtem_transfer.config import SimulationConfig

    cfg = SimulationConfig.from_preset("laptop", n_structures=2)
    cfg.dose_e_per_A2 = None
    doc = tomllib.loads(save_config(cfg, tmp_path / "s.toml").read_text(encoding="utf-8"))
    assert sorted(doc) == ["fields", "kind", "null", "version"]
    nones = sorted(k for k, v in cfg.model_dump().items() if v is None)
    assert {"dose_e_per_A2", "semiangle_cutoff_mrad"} <= set(nones)
    assert sorted(doc["null"]) == nones
    assert not set(nones) & set(doc["fields"])
    assert doc["fields"]["n_structures"] == 2 and doc["fields"]["radius_nm"] == [0.8, 1.4]
    # a hand-written file gives only what differs from the defaults
    (tmp_path / "h.toml").write_text(
        'kind = "simulation"\nversion = "1"\n[fields]\nmaterial = "au"\nseed = 3\n'
    )
    got = load_config(tmp_path / "h.toml", "simulation")
    assert got == SimulationConfig(material="Au", seed=3)
    assert got.dose_e_per_A2 == 400.0  # the default, not None: only 'null' sets None


def test_toml_writer_round_trips_awkward_values(tmp_path):
    from napari_hrtem_transfer.config import SweepConfig

    cfg = _sweep_example(tmp_path)
    name = 'quote " backslash \\ tab \t newline \n Å µm ∞ #notacomment'
    cfg = SweepConfig.model_validate({**cfg.model_dump(), "name": name})
    back = load_config(save_config(cfg, tmp_path / "w.toml"))
    assert back.name == name
    from napari_hrtem_transfer.config import _toml_value

    for value in (math.inf, -math.inf, 1e-300, 0.1 + 0.2, -0.0, 2**62, [[1, 2], [3.5]], True):
        assert tomllib.loads(f"x = {_toml_value(value)}")["x"] == value
    assert math.isnan(tomllib.loads(f"x = {_toml_value(math.nan)}")["x"])


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        (
            'kind = "simulaton"\nversion = "1"\n[fields]\n',
            None,
            ["unknown config kind", "'simulation'"],
        ),
        ('kind = "simulation"\nversion = "2"\n[fields]\n', None, ["version '2'", "upgrade"]),
        ('kind = "simulation"\n[fields]\n', None, ["version", "reads version(s) 1"]),
        (
            'kind = "train"\nversion = "1"\n[fields]\n',
            "simulation",
            ["'train' config", "'simulation'"],
        ),
        ('material = "Au"\n', None, ["not a napari-hrtem-transfer config", "[fields]"]),
        (
            'kind = "simulation"\nversion = "1"\nseed = 1\n[fields]\n',
            None,
            ["seed", "under [fields]"],
        ),
        (
            'kind = "simulation"\nversion = "1"\n[fields]\nmateral = "Au"\n',
            None,
            ["[fields]", "unknown field(s) materal", "material"],
        ),
        # also for a model that ignores extra keys itself
        (
            'kind = "ood-verdict"\nversion = "1"\n[fields]\nps_wieght = 1.0\n',
            None,
            ["unknown field(s) ps_wieght", "ps_weight"],
        ),
        (
            'kind = "simulation"\nversion = "1"\n[fields]\nsampling_A = -1\n',
            None,
            ["sampling_A", "greater than 0", "got -1"],
        ),
        (
            'kind = "simulation"\nversion = "1"\nnull = ["seed"]\n[fields]\nseed = 2\n',
            None,
            ["seed", "both"],
        ),
        (
            'kind = "simulation"\nversion = "1"\nnull = ["seed"]\n[fields]\n',
            None,
            ["seed", "valid integer"],
        ),
        ("kind = = 1", None, ["not valid TOML"]),
    ],
)
def test_bad_files_are_config_errors_naming_file_and_problem(tmp_path, text, kind, words):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, kind)
    msg = str(info.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_file_and_unsupported_objects(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot be saved"):
        save_config(object(), tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()


# ---------------------------------------------------------------- errors.config_error_from_...
def _validation_error(**values) -> ValidationError:
    from napari_hrtem_transfer.config import SimulationConfig

    with pytest.raises(ValidationError) as info:
        SimulationConfig(**values)
    return info.value


def test_validation_error_becomes_one_config_error_with_every_problem():
    exc = _validation_error(image_size_px=8, material="kryptonite", radius_nm=(2, 1))
    err = config_error_from_validation(exc)
    assert isinstance(err, ConfigError)
    assert err.fields == ("material", "image_size_px", "radius_nm")
    assert err.field == "material"
    text = str(err)
    assert text.startswith("material: unknown material 'kryptonite'; choose one of CdSe")
    assert "image_size_px: Input should be greater than or equal to 32 (got 8)" in text
    assert "unknown material 'kryptonite'" in text and "Value error" not in text
    # the message already says what was given: no second "(got ...)"
    assert text.count("got") == 3


def test_validation_error_in_a_front_ends_words():
    exc = _validation_error(sim_sampling_A=0.4, sampling_A=0.2)
    names = {"sim_sampling_A": "--sim-sampling", "sampling_A": "--sampling"}
    err = config_error_from_validation(exc, names, source="simulate")
    text = str(err)
    assert text.startswith("simulate: ")
    assert "--sim-sampling=0.4 Å is coarser" in text and "--sampling=0.2" in text
    assert "sim_sampling_A" not in text
    first = config_error_from_validation(
        _validation_error(image_size_px=8, seed=-1), {"image_size_px": "--size"}, first_only=True
    )
    assert str(first).startswith("--size: ") and "seed" not in str(first)
    assert first.fields == ("--size",)


def test_validation_error_nested_locations_and_missing_fields():
    from napari_hrtem_transfer.config import DataSettings, SweepConfig

    with pytest.raises(ValidationError) as info:
        SweepConfig.model_validate(
            {
                "data": {"pretrain": "x.hspy"},
                "grid": {
                    "pretrain_defocus_nm": [0],
                    "transfer_defocus_nm": [5],
                    "freeze": ["none", "elbow"],
                },
            }
        )
    text = str(config_error_from_validation(info.value))
    assert "grid.freeze[1]" in text and "'elbow'" in text
    with pytest.raises(ValidationError) as info:
        DataSettings.model_validate({})
    err = config_error_from_validation(info.value)
    assert str(err) == "pretrain: is missing; give a value" and err.field == "pretrain"
