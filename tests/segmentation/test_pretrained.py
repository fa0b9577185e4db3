"""The model shipped in the wheel: it loads by name and segments held-out simulations.

Held-out here means structures the model never saw: simulated with the training script's own
settings (``scripts/train_pretrained_model.py``) but another seed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.segmentation import pretrained_model_dir, resolve_model, segment

REPO = Path(__file__).resolve().parents[2]


def test_pretrained_model_loads_by_name_with_its_ood_reference():
    path = pretrained_model_dir()
    lm = resolve_model("pretrained", device="cpu")
    assert lm.sampling_A == pytest.approx(0.2)
    side = json.loads((path / "best.json").read_text())
    ood = json.loads((path / "ood_reference.json").read_text())
    assert ood["weights_sha256"] == side["weights_sha256"]
    assert ood.get("caution_level") is not None
    # the weights file is small enough for a wheel (safetensors, no pickle)
    assert (path / side["weights_file"]).stat().st_size < 10 * 2**20
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))


def test_the_shipped_reference_is_fitted_with_the_package_defaults():
    """A default changed without refitting the shipped reference (stage 3 of the train script)
    would leave the wheel scoring with the old weights and a level calibrated for them."""
    from napari_hrtem_transfer.evaluation.ood.reference import HELD_OUT_LOG_ENTROPY_WEIGHT

    path = pretrained_model_dir()
    ood = json.loads((path / "ood_reference.json").read_text())
    side = json.loads((path / "best.json").read_text())
    assert ood["log_entropy_weight"] == HELD_OUT_LOG_ENTROPY_WEIGHT
    level = float(ood["caution_level"])
    assert np.isfinite(level) and level > 1.0
    # the checkpoint's sidecar carries the same level (segment reads either)
    found = [v for k, v in _walk(side) if k == "caution_level"]
    assert found and all(v == pytest.approx(level) for v in found), found
    cal = ood["calibration"]
    assert cal["source"] == "held-out series" and 0.0 < cal["false_alarm_rate"] <= 0.06


def _walk(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


@pytest.mark.slow
def test_pretrained_model_segments_held_out_structures():
    spec = importlib.util.spec_from_file_location(
        "train_pretrained_model", REPO / "scripts" / "train_pretrained_model.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from napari_hrtem_transfer.simulate import simulate_dataset

    dice = {}
    for k, material in enumerate(("CdSe", "Au")):
        cfg = script.simulation_config(
            script.SHIPPED_RECIPE, material, n_structures=2, seed=90_000 + k
        )
        cfg = cfg.model_copy(update={"defocus_nm": [-10.0, 10.0]})
        ds = simulate_dataset(cfg)
        res = segment(np.asarray(ds.images), "pretrained", sampling_A=ds.sampling_A, ood=False)
        for d, defocus in enumerate(ds.defocus_nm):
            pred = res.labels[d].astype(bool)
            inter = (pred & ds.masks).sum()
            dice[(material, defocus)] = 2 * inter / (pred.sum() + ds.masks.sum())
    print(dice)
    assert min(dice.values()) > 0.7, dice
    assert np.mean(list(dice.values())) > 0.8, dice


def test_the_model_card_names_the_command_that_reproduces_the_model():
    """The card's "Measured by" command parses back to the run's own settings (recipe and
    mask level included), so following it retrains the same model."""
    import shlex

    spec = importlib.util.spec_from_file_location(
        "train_pretrained_model", REPO / "scripts" / "train_pretrained_model.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--recipe", "legacy", "--n-structures", "40", "--epochs", "12"]
    argv += ["--samples-per-epoch", "384", "--seed", "2026", "--mask-binarize-level", "0.1"]
    argv += ["--resolution-augment", "3", "--pixel-size-augment", "1.25"]
    argv += ["--dose-augment", "50", "1000", "--ood-seed", "5", "--ood-structures", "12"]
    argv += ["--validation-dose", "augmented"]
    args = script.parser().parse_args(argv)
    back = script.parser().parse_args(shlex.split(script.command(args))[2:])
    for key in ("recipe", "n_structures", "epochs", "samples_per_epoch", "seed"):
        assert getattr(back, key) == getattr(args, key), key
    assert back.mask_binarize_level == 0.1 and back.resolution_augment == 3.0
    assert back.pixel_size_augment == 1.25 and back.dose_augment == [50.0, 1000.0]
    assert back.ood_seed == 5 and back.ood_structures == 12
    assert back.validation_dose == "augmented"
    assert script.train_config(back).validation_dose == "augmented"


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_pretrained_model", REPO / "scripts" / "train_pretrained_model.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture
def no_simulation(monkeypatch):
    """The training script's simulation stage must not start."""
    import napari_hrtem_transfer.simulate as simulate

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation stage started")

    monkeypatch.setattr(simulate, "simulate_to_file", refuse)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--resolution-augment", "0.5"], "--resolution-augment"),
        (["--recipe", "legacy", "--n-structures", "0"], "--n-structures"),
        (["--recipe", "legacy", "--mask-binarize-level", "-1"], "--mask-binarize-level"),
        (["--recipe", "legacy", "--pixel-size-augment", "0.8"], "--pixel-size-augment"),
        (["--recipe", "legacy", "--dose-augment", "1000", "50"], "--dose-augment"),
        (["--recipe", "legacy", "--ood-structures", "0"], "--ood-structures"),
    ],
)
def test_the_train_script_checks_every_flag_before_the_first_stage(
    tmp_path, capsys, no_simulation, flags, named
):
    script = _script()
    work = tmp_path / "work"
    assert script.main(["--work", str(work), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not work.exists()


def test_the_train_script_refuses_cached_stages_of_other_settings(tmp_path, capsys, no_simulation):
    """A second call with another seed would train the first call's simulation: refused, with
    the differing flag and the fix; more epochs with the same settings resume."""
    script = _script()
    work = tmp_path / "work"
    work.mkdir()
    first = script.parser().parse_args(["--work", str(work), "--recipe", "legacy"])
    script.write_run_record(work, first, trained_on="2 cores of a test CPU")
    (work / "mixture.hspy").write_bytes(b"cached")
    assert script.main(["--work", str(work), "--recipe", "legacy", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "--seed 2026 (now 7)" in err and "new --work" in err
    more = script.parser().parse_args(["--work", str(work), "--recipe", "legacy", "--epochs", "20"])
    assert script.check_run_record(work, more) is None
    # the record keeps the training machine when the settings are written again
    script.write_run_record(work, more)
    assert json.loads((work / "run.json").read_text())["trained_on"] == "2 cores of a test CPU"
    (work / "run.json").write_text("not json")
    assert "not a run record" in script.check_run_record(work, more)


def test_the_train_script_keeps_warning_about_stages_it_did_not_record(
    tmp_path, capsys, no_simulation
):
    """Cached stages without a run record are reused with a warning, and the record written
    then says they are unverified, so the next call warns again (it does not adopt them)."""
    script = _script()
    work = tmp_path / "work"
    work.mkdir()
    (work / "mixture.hspy").write_bytes(b"cached, origin unknown")
    flags = ["--work", str(work), "--recipe", "legacy", "--stage", "simulate"]
    for _ in range(2):
        assert script.main(flags) == 0
        assert "no run record vouches for" in capsys.readouterr().err
    assert json.loads((work / "run.json").read_text())["settings_verified"] is False
    # a record this script wrote for its own stages: no warning
    (work / "run.json").unlink()
    script.write_run_record(work, script.parser().parse_args(flags))
    assert script.main(flags) == 0
    assert "vouches" not in capsys.readouterr().err


def test_the_train_script_refuses_fewer_epochs_than_the_cached_model(tmp_path, capsys,
                                                                     no_simulation):
    """Fewer --epochs than the cached model has would skip training and put the smaller
    number into the card's reproduce command: refused, nothing changed."""
    script = _script()
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "last.json").write_text(json.dumps({"epochs_completed": 12}))
    assert script.main(["--work", str(work), "--recipe", "legacy", "--epochs", "8"]) == 2
    err = capsys.readouterr().err
    assert "trained for 12 epochs" in err and "--epochs 12 or more" in err
    assert not (work / "run.json").exists()
    more = script.parser().parse_args(["--work", str(work), "--epochs", "12"])
    assert script.check_epochs(work, more) is None


def test_the_model_card_names_the_machine_that_trained_the_model(tmp_path):
    script = _script()
    model = tmp_path / "model"
    model.mkdir()
    (model / "best.json").write_text(
        json.dumps({"training": {"device": "cpu", "precision": "fp32"}, "best_epoch": 2})
    )
    (model / "last.json").write_text(json.dumps({"history": [{"time_s": 60.0}] * 3}))
    (model / "ood_reference.json").write_text(json.dumps({"n_images": 10, "caution_level": 4.2}))
    records = [
        dict(
            domain_defocus_nm=d,
            material=m,
            dice=0.9,
            dice_ci_low=0.8,
            dice_ci_high=0.95,
            loss=0.1,
            n_images=2,
        )
        for d in (-5.0, 5.0)
        for m in ("Au", "all")
    ]
    args = script.parser().parse_args(["--recipe", "legacy"])
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    script.write_card(None, tmp_path, model, records, args, 120.0, card, trained_on="THE-CPU")
    text = card.read_text()
    assert "THE-CPU" in text and "caution level 4.2" in text
    assert "| -5 | 0.900 [0.80, 0.95] | 0.900 [0.80, 0.95] | 0.1000 | 2 |" in text


def test_a_run_record_written_before_validation_dose_means_recorded(tmp_path):
    script = _script()
    work = tmp_path / "work"
    work.mkdir()
    args = script.parser().parse_args(["--work", str(work), "--recipe", "legacy"])
    settings = script.run_settings(args)
    del settings["validation_dose"]
    (work / "run.json").write_text(json.dumps({"settings": settings}))
    assert script.check_run_record(work, args) is None
    other = script.parser().parse_args(
        ["--work", str(work), "--recipe", "legacy", "--validation-dose", "augmented"]
    )
    assert "--validation-dose 'recorded' (now 'augmented')" in script.check_run_record(work, other)
