"""A malformed checkpoint sidecar reaches the command line as one clear message and exit 2."""

from __future__ import annotations

import json

from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.models import NORMALIZATION, build_model
from napari_hrtem_transfer.training.checkpoint import save_checkpoint

TINY = {"architecture": "compact", "channels": [4, 4, 4, 4], "bottleneck_dilations": []}


def test_finetune_from_a_sidecar_with_a_bad_field_exits_2_naming_file_and_field(
    dataset_path, tmp_path, capsys
):
    pre = tmp_path / "pre"
    save_checkpoint(
        pre,
        "best",
        build_model(TINY),
        {"model": TINY, "normalization": dict(NORMALIZATION), "sampling_A": 0.2},
    )
    side_path = pre / "best.json"
    side = json.loads(side_path.read_text())
    side["sampling_A"] = "0.2 A"
    side_path.write_text(json.dumps(side))
    argv = [
        "finetune",
        "--model",
        str(pre),
        "--data",
        str(dataset_path),
        "--defocus",
        "5",
        "--out",
        str(tmp_path / "ft"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(side_path) in err and "field 'sampling_A'" in err and "'0.2 A'" in err
    assert not (tmp_path / "ft").exists()  # nothing written
