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
    argv += ["--resolution-augment", "3"]
    args = script.parser().parse_args(argv)
    back = script.parser().parse_args(shlex.split(script.command(args))[2:])
    for key in ("recipe", "n_structures", "epochs", "samples_per_epoch", "seed"):
        assert getattr(back, key) == getattr(args, key), key
    assert back.mask_binarize_level == 0.1 and back.resolution_augment == 3.0
