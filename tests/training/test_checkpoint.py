"""Checkpoint format: round trip, atomic extra updates, and refusal of unsafe or broken files."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from napari_hrtem_transfer.errors import CheckpointError  # noqa: E402
from napari_hrtem_transfer.models import NORMALIZATION, build_model  # noqa: E402
from napari_hrtem_transfer.training import (  # noqa: E402
    load_checkpoint,
    read_sidecar,
    update_checkpoint_extra,
)
from napari_hrtem_transfer.training.checkpoint import (  # noqa: E402
    SIDECAR_SCHEMAS,
    _sha256,
    flatten_optimizer_state,
    load_optimizer_state,
    save_checkpoint,
    unflatten_optimizer_state,
)


class _Evil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned > /tmp/pwned')",))


def _save(model_dir, arch="compact", which="best"):
    torch.manual_seed(0)
    model = build_model(arch)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(2, 1, 64, 64))
    model.eval()
    save_checkpoint(
        model_dir,
        which,
        model,
        {
            "model": {"architecture": arch},
            "normalization": dict(NORMALIZATION),
            "sampling_A": 0.2,
        },
    )
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["compact", "resnet18"])
def test_round_trip_gives_identical_outputs(tmp_path, arch):
    model = _save(tmp_path / "m", arch)
    lm = load_checkpoint(tmp_path / "m", device="cpu")
    assert not lm.model.training and lm.sampling_A == 0.2
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), lm.model(x))
        assert torch.equal(model.encoder_features(x), lm.model.encoder_features(x))
    # also the sidecar json path is accepted
    lm2 = load_checkpoint(tmp_path / "m" / "best.json", device="cpu")
    with torch.no_grad():
        assert torch.equal(lm2.model(x), lm.model(x))


def test_optimizer_state_flattening_round_trips():
    model = build_model("compact")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 32, 32)).mean().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    meta = json.loads(json.dumps(meta))
    back = unflatten_optimizer_state(tensors, meta)
    opt2 = torch.optim.Adam(build_model("compact").parameters(), lr=1e-3)
    opt2.load_state_dict(back)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(v, s2["state"][k][key])


def test_extra_is_updated_atomically_and_kept(tmp_path):
    _save(tmp_path / "m")
    update_checkpoint_extra(tmp_path / "m", "ood", {"mean": np.float32(1.5), "cov": np.eye(2)})
    update_checkpoint_extra(tmp_path / "m", "note", "hello")
    side = read_sidecar(tmp_path / "m")
    assert side["extra"] == {"ood": {"mean": 1.5, "cov": [[1.0, 0.0], [0.0, 1.0]]}, "note": "hello"}
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")) == []
    assert "_path" not in json.loads((tmp_path / "m" / "best.json").read_text())
    load_checkpoint(tmp_path / "m", device="cpu")  # weights untouched, still valid


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt.*refusing"):
        load_checkpoint(path)
    folder = tmp_path / "only_pt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(
        CheckpointError, match=r"missing checkpoint sidecar .*best\.json.*never loaded"
    ):
        load_checkpoint(folder)


def test_pickle_payload_in_weights_file_is_refused(tmp_path):
    _save(tmp_path / "m")
    side_path = tmp_path / "m" / "best.json"
    side = json.loads(side_path.read_text())
    wfile = tmp_path / "m" / side["weights_file"]
    wfile.write_bytes(pickle.dumps(_Evil()))
    # first line of defence: the checksum
    with pytest.raises(CheckpointError, match=f"{wfile.name}.*corrupted or was modified"):
        load_checkpoint(tmp_path / "m")
    # even with a matching checksum the file is parsed as safetensors, never unpickled
    side["weights_sha256"] = _sha256(wfile)
    side_path.write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match=f"{wfile.name} is not a valid safetensors file"):
        load_checkpoint(tmp_path / "m")
    from pathlib import Path

    assert not Path("/tmp/pwned").exists()


def test_corrupted_and_mismatched_checkpoints_name_the_file(tmp_path):
    _save(tmp_path / "m")
    side_path = tmp_path / "m" / "best.json"
    side = json.loads(side_path.read_text())
    # weights that do not fit the architecture of the sidecar
    side["model"] = {"architecture": "compact", "channels": [16, 32, 64, 96]}
    side_path.write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match=f"weights in .*{side['weights_file']} do not match"):
        load_checkpoint(tmp_path / "m")
    # a truncated sidecar
    side_path.write_text(json.dumps(side)[:50])
    with pytest.raises(CheckpointError, match=r"best\.json is unreadable or corrupted"):
        load_checkpoint(tmp_path / "m")
    # a missing weights file
    _save(tmp_path / "n")
    side = json.loads((tmp_path / "n" / "best.json").read_text())
    (tmp_path / "n" / side["weights_file"]).unlink()
    with pytest.raises(CheckpointError, match=f"{side['weights_file']} is missing"):
        load_checkpoint(tmp_path / "n")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")


def test_rewriting_replaces_old_files(tmp_path):
    _save(tmp_path / "m")
    first = read_sidecar(tmp_path / "m")["weights_file"]
    model = build_model("compact")
    save_checkpoint(
        tmp_path / "m",
        "best",
        model,
        {
            "model": {"architecture": "compact"},
            "normalization": dict(NORMALIZATION),
            "sampling_A": 0.2,
        },
    )
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert first not in files and len(files) == 2


# ---------------------------------------------------------------------- strict, safe sidecars
TINY = {"architecture": "compact", "channels": [4, 4, 4, 4], "bottleneck_dilations": []}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A valid checkpoint of a very small model (copied by tests that damage it)."""
    folder = tmp_path_factory.mktemp("tiny") / "m"
    save_checkpoint(
        folder,
        "best",
        build_model(TINY),
        {"model": TINY, "normalization": dict(NORMALIZATION), "sampling_A": 0.2},
    )
    load_checkpoint(folder, device="cpu")  # valid as written
    return folder


def _edit_sidecar(model_dir, which_file="best", /, **changes):
    """Rewrite ``<which_file>.json`` with ``changes`` (a value of ``...`` deletes the key)."""
    path = model_dir / f"{which_file}.json"
    side = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            side.pop(k, None)
        else:
            side[k] = v
    path.write_text(json.dumps(side))
    return path


@pytest.mark.parametrize(
    "name",
    [
        "../../elsewhere/x.safetensors",
        "sub/x.safetensors",
        "..\\..\\elsewhere\\x.safetensors",
        "ABSOLUTE",
    ],
)
def test_weights_outside_the_folder_are_refused_even_with_matching_sha(
    tiny_checkpoint, tmp_path, name
):
    model_dir = tmp_path / "a" / "ckpt"
    shutil.copytree(tiny_checkpoint, model_dir)
    side = read_sidecar(model_dir)
    own = model_dir / side["weights_file"]
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(own.read_bytes())  # a valid file with the recorded sha256
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "x.safetensors").write_bytes(own.read_bytes())
    if name == "ABSOLUTE":
        name = str(outside)
    assert (model_dir / name.replace("\\", "/")).resolve().is_file()  # it would load
    path = _edit_sidecar(model_dir, weights_file=name, weights_sha256=_sha256(outside))
    with pytest.raises(
        CheckpointError, match=rf"{path.name} is invalid: field 'weights_file': must be a plain"
    ) as info:
        load_checkpoint(model_dir, device="cpu")
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="weights_file"):
        read_sidecar(model_dir)


def test_weights_link_leading_out_of_the_folder_is_refused(tiny_checkpoint, tmp_path):
    model_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, model_dir)
    side = read_sidecar(model_dir)
    own = model_dir / side["weights_file"]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(own.read_bytes())
    own.unlink()
    own.symlink_to(outside)  # same name, same sha256, but the bytes live elsewhere
    with pytest.raises(CheckpointError, match=r"'weights_file' names .*, which is a link; "):
        load_checkpoint(model_dir, device="cpu")


def test_optimizer_file_outside_the_folder_is_refused(tmp_path):
    model_dir = tmp_path / "ckpt"
    model = build_model(TINY)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 1, 32, 32)).mean().backward()
    opt.step()
    save_checkpoint(
        model_dir,
        "last",
        model,
        {"model": TINY, "normalization": dict(NORMALIZATION)},
        optimizer_state=opt.state_dict(),
    )
    assert load_optimizer_state(read_sidecar(model_dir, "last"))["state"]  # valid as written
    _edit_sidecar(model_dir, "last", optimizer_file="../x.optim.safetensors")
    with pytest.raises(CheckpointError, match=r"last\.json is invalid: field 'optimizer_file'"):
        read_sidecar(model_dir, "last")


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"which": ...}, "which", "is missing"),
        ({"sampling_A": "0.2 A"}, "sampling_A", "valid number"),
        ({"sampling_A": -0.2}, "sampling_A", "greater than 0"),
        ({"weights_sha256": "abc"}, "weights_sha256", "64 lower-case hex"),
        ({"weights_file": "best.pt"}, "weights_file", ".safetensors"),
        ({"model": {"architecture": "unet9000"}}, "model", "unknown architecture"),
        ({"model": {"architecture": "compact", "channels": [1]}}, "model", "channels"),
        ({"normalization": {"method": "zscore"}}, "normalization.method", "per_image"),
        ({"normalization": ...}, "normalization", "is missing"),
        ({"best_epoch": "3"}, "best_epoch", "valid integer"),
        ({"history": [1.0]}, "history[0]", "dictionary"),
        ({"which": "last"}, "which", "'best' sidecar"),
        ({"resume": {"epoch": 1}}, "resume.step", "is missing"),
    ],
)
def test_malformed_sidecar_fields_are_named(tiny_checkpoint, tmp_path, changes, field, message):
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    path = _edit_sidecar(tmp_path / "m", **changes)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "m", device="cpu")
    text = str(info.value)
    assert str(path) in text and f"field {field!r}" in text and message in text, text
    assert not isinstance(info.value, KeyError)
    # every reader goes through the same check
    with pytest.raises(CheckpointError, match=field.replace("[", r"\[").replace("]", r"\]")):
        update_checkpoint_extra(tmp_path / "m", "note", 1)


def test_sidecar_versions(tiny_checkpoint, tmp_path):
    assert "1" in SIDECAR_SCHEMAS
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    side = read_sidecar(tmp_path / "m")
    assert side["format_version"] == "1" and SIDECAR_SCHEMAS["1"].model_validate(
        {k: v for k, v in side.items() if k != "_path"}
    )
    _edit_sidecar(tmp_path / "m", format_version="2")
    with pytest.raises(CheckpointError, match="format version '2'.*Upgrade the package"):
        load_checkpoint(tmp_path / "m", device="cpu")
    _edit_sidecar(tmp_path / "m", format="something else")
    with pytest.raises(CheckpointError, match="not a napari-hrtem-transfer checkpoint sidecar"):
        load_checkpoint(tmp_path / "m", device="cpu")


def test_checkpoint_writes_leave_no_temporary_files(tmp_path):
    _save(tmp_path / "m")
    _save(tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert (
        len(names) == 2
        and names[0]
        == "best-" + read_sidecar(tmp_path / "m")["weights_sha256"][:12] + ".safetensors"
        and names[1] == "best.json"
    )
    side = read_sidecar(tmp_path / "m")
    assert _sha256(tmp_path / "m" / side["weights_file"]) == side["weights_sha256"]
