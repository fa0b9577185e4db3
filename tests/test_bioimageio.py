"""bioimage.io model packages: export, ``bioimageio test``, lossless import, refusals.

``bioimageio.core`` is part of the ``testing`` extra: these tests never skip for its absence
(a missing package is a failure, so CI cannot pass without running them).
"""

from __future__ import annotations

import io
import json
import pathlib
import sys
import zipfile

import numpy as np
import pytest
import yaml

from napari_hrtem_transfer.bioimageio import (
    CACHE_ENV,
    CONFIG_KEY,
    export_bioimageio,
    import_bioimageio,
    is_bioimageio_package,
)
from napari_hrtem_transfer.bioimageio import test_package as run_bioimageio_test
from napari_hrtem_transfer.errors import CheckpointError, ConfigError
from napari_hrtem_transfer.segmentation import pretrained_model_dir, resolve_model, segment


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache_root(cache_env):
    """Where packages are unpacked in these tests ($HRTEM_TRANSFER_CACHE_DIR/bioimageio)."""
    return cache_env / "bioimageio"


@pytest.fixture(autouse=True)
def _cache(monkeypatch, cache_env):
    monkeypatch.setenv(CACHE_ENV, str(cache_env))


@pytest.fixture(scope="module")
def shipped_zip(tmp_path_factory):
    """The shipped model exported (~10 s; not tested at export: a test runs test_model)."""
    out = tmp_path_factory.mktemp("pkg") / "pretrained.zip"
    res = export_bioimageio("pretrained", out, test=False)
    assert res.path == out and res.ood_reference and res.test_passed is None
    return out


def _disc_data(n=8, size=64, seed=0):
    from napari_hrtem_transfer.io import HRTEMDataset

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        cy, cx = rng.uniform(12, size - 12, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(5, 9) ** 2
    a = rng.poisson(200.0 * (1.0 - 0.4 * masks)).astype(np.float32)
    b = rng.poisson(200.0 * (1.0 + 0.4 * masks)).astype(np.float32)
    return HRTEMDataset(
        images=np.stack([b, a]),
        defocus_nm=[-5.0, 5.0],
        sampling_A=0.2,
        masks=masks,
        dose_e_per_A2=5000.0,
    )


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny compact U-Net pretrained for 1 epoch on discs, then fine-tuned for 1 epoch at
    +5 nm with the encoder frozen, with its OOD reference."""
    from napari_hrtem_transfer.evaluation.ood import fit_ood_reference_for_checkpoint
    from napari_hrtem_transfer.models import CompactUNetConfig
    from napari_hrtem_transfer.training import TrainConfig, train

    ds = _disc_data()
    root = tmp_path_factory.mktemp("ft")
    common = dict(
        epochs=1,
        samples_per_epoch=16,
        batch_size=4,
        patch_size=64,
        device="cpu",
        precision="fp32",
        num_threads=1,
        deterministic=True,
    )
    pre = root / "pre"
    train(
        TrainConfig.pretrain("all", model=CompactUNetConfig(channels=(8, 8, 8, 8)), **common),
        ds,
        pre,
    )
    ft = root / "ft"
    train(TrainConfig.finetune(pre, [5.0], freeze="encoder", **common), ds, ft)
    fit_ood_reference_for_checkpoint(ft, ds, device="cpu", max_samples=16)
    return ft, ds


@pytest.fixture(scope="module")
def finetuned_zip(finetuned, tmp_path_factory):
    ft, ds = finetuned
    out = tmp_path_factory.mktemp("pkg_ft") / "ft.zip"
    res = export_bioimageio(
        ft, out, test=True, torchscript=True, test_image=ds.images[1, 0], test_mask=ds.masks[0]
    )
    # export ran bioimageio.core.test_model on the zip: both weight formats reproduce the output
    assert res.test_passed is True
    assert res.ood_reference and not res.notes
    return out


def _rdf(zpath):
    with zipfile.ZipFile(zpath) as z:
        return yaml.safe_load(z.read("rdf.yaml")), set(z.namelist())


def _rewrite(src, dst, rdf=None, drop=(), add=None):
    """Copy package ``src`` to ``dst`` with another rdf.yaml, members dropped or added."""
    add = dict(add or {})
    if "weights.pt" in add:  # a forger also updates the declared sha256
        import hashlib

        rdf = rdf if rdf is not None else _rdf(src)[0]
        entry = rdf["weights"].get("pytorch_state_dict")
        if entry is not None:
            entry["sha256"] = hashlib.sha256(add["weights.pt"]).hexdigest()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop or name in add or (name == "rdf.yaml" and rdf is not None):
                continue
            zout.writestr(name, zin.read(name))
        if rdf is not None:
            zout.writestr("rdf.yaml", yaml.safe_dump(rdf, sort_keys=False))
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


def _frames():
    from napari_hrtem_transfer.io import load_dataset

    ds = load_dataset(
        pretrained_model_dir().parents[1] / "sample_data" / "defocus_series_small.hspy"
    )
    return np.asarray(ds.images[3, 1:3], np.float32)


# ----------------------------------------------------------------------------- export


@pytest.mark.slow
def test_shipped_package_passes_bioimageio_test(shipped_zip):
    ok, detail = run_bioimageio_test(shipped_zip)
    assert ok, detail


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_finetuned_package_passes_bioimageio_test(finetuned_zip):
    # the export already required it; run it again independently of export's code path
    from bioimageio.core import test_model

    summary = test_model(str(finetuned_zip), devices=["cpu"])
    assert summary.status == "passed", summary.format()
    ran = {d.name for d in summary.details if d.status == "passed"}
    assert any("(torchscript)" in n for n in ran) and any("(pytorch_state_dict)" in n for n in ran)


def _steps(procs):
    """Processing steps without the ensure_dtype steps bioimageio.spec adds when packaging."""
    return [p for p in procs if p["id"] != "ensure_dtype"]


def _check_declarations(zpath, model_dir):
    """The package declares our pipeline, pixel size, domain, OOD reference; returns
    (rdf, README text, imaging domain)."""
    rdf, names = _rdf(zpath)
    side = json.loads((model_dir / "best.json").read_text())
    ood = json.loads((model_dir / "ood_reference.json").read_text())
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    y, x = inp["axes"][2:]
    assert (y["unit"], x["unit"]) == ("angstrom", "angstrom")
    assert y["scale"] == x["scale"] == side["sampling_A"] == 0.2
    (pre,) = _steps(inp["preprocessing"])
    assert pre["id"] == "zero_mean_unit_variance"
    assert pre["kwargs"]["axes"] == ["channel", "y", "x"]
    # PyYAML (YAML 1.1) reads 1e-06 as text
    assert float(pre["kwargs"]["eps"]) == side["normalization"]["eps"]
    assert [p["id"] for p in _steps(out["postprocessing"])] == ["sigmoid"]
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert arch["import_from"] == "napari_hrtem_transfer.models.factory"
    assert arch["kwargs"]["config"] == side["model"] and "source" not in arch
    ours = rdf["config"][CONFIG_KEY]
    assert ours["weights_sha256"] == side["weights_sha256"]
    assert ours["ood_reference"]["caution_level"] == ood["caution_level"]
    attached = {a["source"] for a in rdf["attachments"]}
    assert attached <= names
    assert attached == {"best.json", side["weights_file"], "ood_reference.json"} | {
        "ood_reference.safetensors"
    }
    assert "EM000010" in rdf["cite"][0]["text"] and rdf["license"] == "BSD-3-Clause"
    with zipfile.ZipFile(zpath) as z:
        readme = z.read("README.md").decode()
        from PIL import Image

        cover = Image.open(io.BytesIO(z.read("cover.png")))
        test_in = np.load(io.BytesIO(z.read("test_input.npy")))
    assert "## Validation" in readme and "## Imaging domain" in readme
    assert cover.size[0] == 2 * cover.size[1]
    assert test_in.ndim == 4 and test_in.shape[:2] == (1, 1) and test_in.dtype == np.float32
    assert test_in.min() >= 0 and test_in.std() > 1  # raw counts, not standardised
    return rdf, readme, ours["imaging_domain"]


def test_finetuned_package_declarations(finetuned, finetuned_zip):
    rdf, readme, dom = _check_declarations(finetuned_zip, finetuned[0])
    assert dom["train_defocus_nm"] == [5.0] and dom["stage"] == "finetune"
    assert rdf["weights"]["torchscript"]["parent"] == "pytorch_state_dict"
    assert dom["dose_e_per_A2"] == 5000.0 and dom["voltage_kV"] is None  # not recorded
    assert "generated from the checkpoint sidecar" in readme.lower()
    assert "fine-tuned from" in readme


@pytest.mark.slow
def test_shipped_package_declarations(shipped_zip):
    rdf, readme, dom = _check_declarations(shipped_zip, pretrained_model_dir())
    assert dom["defocus_range_nm"] == [-25.0, 25.0] and dom["dose_e_per_A2"] == 400.0
    assert "Model card: the shipped pretrained model" in readme  # docs/pretrained_model.md


def test_imaging_domain_from_the_training_dataset_file():
    """Voltage, Cs and focal spread come from the dataset's simulation config only when the
    file is the one the model was trained on (same fingerprint)."""
    from napari_hrtem_transfer.bioimageio._describe import imaging_domain
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.training.data import dataset_fingerprint

    path = pretrained_model_dir().parents[1] / "sample_data" / "defocus_series_small.hspy"
    ds = load_dataset(path)
    data = {"path": str(path), "fingerprint": dataset_fingerprint(ds), "train_defocus_nm": [0.0]}
    dom = imaging_domain({"sampling_A": 0.2, "data": data})
    cfg = ds.info["config"]
    assert dom["voltage_kV"] == cfg["energy_eV"] / 1e3 == 300.0
    assert dom["Cs_mm"] == pytest.approx(cfg["Cs_A"] * 1e-7)  # Å -> mm
    assert dom["focal_spread_nm"] == pytest.approx(cfg["focal_spread_A"] / 10)
    other = imaging_domain({"data": {**data, "fingerprint": "0" * 64}})
    assert other["voltage_kV"] is None and "not recorded" in other["source"]


def test_bioimageio_prediction_equals_ours_on_another_frame(finetuned, finetuned_zip):
    """bioimage.io's own pipeline (not just the stored test tensor) gives our probabilities."""
    from bioimageio.core import predict

    from napari_hrtem_transfer.training import load_checkpoint

    ft, ds = finetuned
    frame = np.asarray(ds.images[0, 3, :48, :], np.float32) * 3.0 + 17.0  # 48 x 64 px
    sample = predict(model=str(finetuned_zip), inputs={"raw": frame[None, None]})
    got = np.asarray(sample.members["probability"].data)
    ours = load_checkpoint(ft, device="cpu").predict_proba(frame, precision="fp32")
    assert got.shape == (1, 1, 48, 64)
    np.testing.assert_allclose(got[0, 0], ours[0], atol=2e-5)


@pytest.fixture(scope="module")
def flat_field_model(finetuned, tmp_path_factory):
    """The fine-tuned checkpoint with a flat-field record (sigma 4 Å = 20 px at its 0.2 Å/px,
    small enough to change a 64 px frame)."""
    import shutil

    ft, _ = finetuned
    folder = tmp_path_factory.mktemp("ff") / "ff"
    shutil.copytree(ft, folder)
    side_path = folder / "best.json"
    side = json.loads(side_path.read_text())
    side["normalization"] = {
        "method": "flat_field_standardize",
        "eps": 1e-6,
        "flat_field_sigma_A": 4.0,
        "sampling_A": 0.2,
    }
    side_path.write_text(json.dumps(side, indent=1))
    return folder


def test_flat_field_record_takes_effect(finetuned, flat_field_model):
    """The edited checkpoint really flat-field corrects (so the refusal below is about a
    pipeline that differs from the package's standardisation)."""
    from napari_hrtem_transfer.models.normalization import flat_field_standardize, standardize
    from napari_hrtem_transfer.training import load_checkpoint

    frame = np.asarray(finetuned[1].images[1, 0], np.float32)
    yy = np.mgrid[: frame.shape[0], : frame.shape[1]][1]
    frame = frame * (1.0 + 0.5 * yy / frame.shape[1])  # uneven illumination
    lm = load_checkpoint(flat_field_model, device="cpu")
    got = lm.standardize(frame[None])
    np.testing.assert_allclose(got, flat_field_standardize(frame[None], 4.0 / 0.2), atol=1e-6)
    assert np.abs(got - standardize(frame[None])).max() > 1e-2


@pytest.mark.parametrize("test", [False, True])
def test_flat_field_model_is_refused(flat_field_model, tmp_path, test):
    """bioimage.io preprocessing has no spatial filter: the export refuses, writes nothing
    (with or without the package test), and says what to export instead."""
    out = tmp_path / "ff.zip"
    with pytest.raises(ConfigError, match="flat-field corrects its input") as err:
        export_bioimageio(flat_field_model, out, test=test, torchscript=True)
    msg = str(err.value)
    assert "sigma 4 Å, 20 px at 0.2 Å/px" in msg
    assert "bioimage.io preprocessing cannot express" in msg
    assert "PreprocessConfig without flat_field_sigma_A" in msg
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_export_of_a_flat_field_model_exits_2(flat_field_model, tmp_path, capsys):
    from napari_hrtem_transfer.cli import main

    out = tmp_path / "ff.zip"
    assert main(["export", "--model", str(flat_field_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrtem-transfer export: error: the model ")
    assert "flat-field" in err and "standardisation only" in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------- import


def _same_segmentation(a, b):
    assert b.labels.dtype == np.uint8 and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.proba, b.proba)
    assert a.ood_score is not None and np.array_equal(a.ood_score, b.ood_score)
    assert a.ood_caution == b.ood_caution
    assert [r["caution"] for r in a.frame_table()] == [r["caution"] for r in b.frame_table()]


def test_roundtrip_is_lossless(finetuned, finetuned_zip, cache_root):
    ft, ds = finetuned
    frames = np.concatenate([ds.images[0, :2], ds.images[1, :2]])
    a = segment(frames, ft, sampling_A=0.2)
    b = segment(frames, finetuned_zip, sampling_A=0.2)
    _same_segmentation(a, b)
    assert b.labels.any() and not a.notes and not b.notes
    import hashlib

    sha = hashlib.sha256(finetuned_zip.read_bytes()).hexdigest()
    folder = import_bioimageio(finetuned_zip)
    assert folder == cache_root / sha  # unpacked once, under the zip's sha256
    for f in ft.iterdir():
        if f.name.startswith(("best", "ood_reference")):
            assert (folder / f.name).read_bytes() == f.read_bytes()  # byte for byte ours


@pytest.mark.slow
def test_roundtrip_of_the_shipped_model_is_lossless(shipped_zip, cache_root):
    frames = _frames()
    a = segment(frames, "pretrained", sampling_A=0.2)
    b = segment(frames, shipped_zip, sampling_A=0.2)
    _same_segmentation(a, b)
    import hashlib

    sha = hashlib.sha256(shipped_zip.read_bytes()).hexdigest()
    folder = import_bioimageio(shipped_zip)
    assert folder == cache_root / sha
    for name in ("best.json", "ood_reference.json", "ood_reference.safetensors"):
        assert (folder / name).read_bytes() == (pretrained_model_dir() / name).read_bytes()
    assert (
        resolve_model(shipped_zip, device="cpu").info["weights_sha256"]
        == json.loads((pretrained_model_dir() / "best.json").read_text())["weights_sha256"]
    )


def test_foreign_package_of_our_architecture_is_a_plain_segmenter(
    finetuned, finetuned_zip, tmp_path
):
    """A package without our config/attachments (e.g. re-packaged by bioimage.io tools)."""
    ft, ds = finetuned
    rdf, _ = _rdf(finetuned_zip)
    drop = {a["source"] for a in rdf.pop("attachments")}
    del rdf["config"][CONFIG_KEY]
    rdf["inputs"][0]["axes"][2]["unit"] = rdf["inputs"][0]["axes"][3]["unit"] = "nanometer"
    rdf["inputs"][0]["axes"][2]["scale"] = rdf["inputs"][0]["axes"][3]["scale"] = 0.02
    foreign = _rewrite(finetuned_zip, tmp_path / "foreign.zip", rdf, drop=drop)
    frames = ds.images[1, :3]
    a = segment(frames, ft, sampling_A=0.2, ood=False)
    b = segment(frames, foreign, sampling_A=0.2)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.proba, b.proba)
    assert b.ood_score is None
    (note,) = [n for n in b.notes if "no OOD reference" in n]
    # it names the package, not a cache folder to run 'evaluate --fit-ood' on
    assert "bioimage.io package" in note and "foreign.zip" in note and "--fit-ood" not in note
    assert b.model_sampling_A == pytest.approx(0.2)  # 0.02 nm
    info = resolve_model(foreign, device="cpu").info
    assert info["extra"]["bioimageio"]["foreign"] is True


def _crafted(finetuned_zip, tmp_path, name, *, arch=None, weights=None, rdf_edit=None):
    rdf, _ = _rdf(finetuned_zip)
    del rdf["config"][CONFIG_KEY]
    add = {}
    if arch is not None:
        rdf["weights"]["pytorch_state_dict"]["architecture"] = arch
    if weights is not None:
        add["weights.pt"] = weights
    if rdf_edit is not None:
        rdf_edit(rdf)
    return _rewrite(finetuned_zip, tmp_path / name, rdf, add=add)


def _assert_refused_by_cli(pkg, tmp_path, capsys, words):
    from napari_hrtem_transfer.cli import main

    img = tmp_path / "frame.npy"
    np.save(img, np.random.default_rng(0).poisson(200, (64, 64)).astype(np.float32))
    out = tmp_path / "mask.npy"
    code = main(["segment", str(img), "--model", str(pkg), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_unknown_architecture_is_refused_and_never_imported(
    finetuned_zip, tmp_path, capsys, cache_root
):
    pkg = _crafted(
        finetuned_zip,
        tmp_path,
        "unknown_arch.zip",
        arch={"callable": "Net", "import_from": "hrtem_evil_module", "kwargs": {}},
    )
    before = sorted(cache_root.iterdir()) if cache_root.exists() else []
    with pytest.raises(CheckpointError, match="not one of napari-hrtem-transfer's"):
        import_bioimageio(pkg)
    assert "hrtem_evil_module" not in sys.modules
    _assert_refused_by_cli(pkg, tmp_path, capsys, ["hrtem_evil_module.Net", "not one of"])
    after = sorted(cache_root.iterdir()) if cache_root.exists() else []
    assert after == before  # nothing unpacked, no temporary folder left behind


def test_architecture_source_file_is_never_imported(finetuned_zip, tmp_path, capsys):
    marker = tmp_path / "imported.txt"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nNet = object\n"
    rdf, _ = _rdf(finetuned_zip)
    del rdf["config"][CONFIG_KEY]
    rdf["weights"]["pytorch_state_dict"]["architecture"] = {
        "source": "arch.py",
        "callable": "Net",
        "kwargs": {},
    }
    pkg = _rewrite(finetuned_zip, tmp_path / "src.zip", rdf, add={"arch.py": code})
    with pytest.raises(CheckpointError, match="never imports a package's code"):
        import_bioimageio(pkg)
    _assert_refused_by_cli(pkg, tmp_path, capsys, ["source file"])
    assert not marker.exists()


class _Payload:
    """Pickles into a call of pathlib.Path.touch(marker): runs when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_not_run(finetuned_zip, tmp_path, capsys):
    import torch

    marker = tmp_path / "payload_ran.txt"
    buf = io.BytesIO()
    torch.save({"encoder.weight": _Payload(marker)}, buf)
    payload = buf.getvalue()
    # the payload is live: an unsafe load runs it
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()
    marker.unlink()

    pkg = _crafted(finetuned_zip, tmp_path, "pickle.zip", weights=payload)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) rejects it"):
        import_bioimageio(pkg)
    _assert_refused_by_cli(pkg, tmp_path, capsys, ["refusing the weights weights.pt", "pickle"])
    assert not marker.exists()
    # our own package whose state dict was swapped for the payload is refused as well
    ours = _rewrite(finetuned_zip, tmp_path / "ours_pickle.zip", add={"weights.pt": payload})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_bioimageio(ours)
    assert not marker.exists()


def test_modified_state_dict_in_our_package_is_refused(finetuned, finetuned_zip, tmp_path):
    import torch

    from napari_hrtem_transfer.training.checkpoint import load_model_weights, state_tensors

    model, _ = load_model_weights(finetuned[0])
    tensors = state_tensors(model)
    key = next(k for k, v in tensors.items() if v.dtype == torch.float32)
    tensors[key] = tensors[key] + 1e-3
    buf = io.BytesIO()
    torch.save(tensors, buf)
    pkg = _rewrite(finetuned_zip, tmp_path / "tampered.zip", add={"weights.pt": buf.getvalue()})
    with pytest.raises(CheckpointError, match="differ from its attached"):
        import_bioimageio(pkg)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda r: r["inputs"][0].__setitem__(
                "preprocessing", [{"id": "scale_range", "kwargs": {"axes": ["y", "x"]}}]
            ),
            "input preprocessing ['scale_range']",
        ),
        (lambda r: r["outputs"][0].__setitem__("postprocessing", []), "postprocessing []"),
        (lambda r: r["inputs"].append(dict(r["inputs"][0], id="raw2")), "2 input(s)"),
    ],
)
def test_other_pipelines_are_refused(finetuned_zip, tmp_path, edit, words):
    pkg = _crafted(finetuned_zip, tmp_path, "other.zip", rdf_edit=edit)
    with pytest.raises(ConfigError) as exc:
        import_bioimageio(pkg)
    assert words in str(exc.value)


def test_torchscript_only_newer_and_damaged_packages_are_refused(finetuned_zip, tmp_path):
    def torchscript_only(r):
        r["weights"] = {"torchscript": {"source": "weights.pt", "pytorch_version": "2.13"}}

    pkg = _crafted(finetuned_zip, tmp_path, "ts.zip", rdf_edit=torchscript_only)
    with pytest.raises(CheckpointError, match="no pytorch_state_dict weights.*torchscript"):
        import_bioimageio(pkg)

    def newer(r):
        r["config"][CONFIG_KEY]["format_version"] = "2"

    rdf, _ = _rdf(finetuned_zip)
    newer(rdf)
    with pytest.raises(CheckpointError, match="format version '2'.*Upgrade"):
        import_bioimageio(_rewrite(finetuned_zip, tmp_path / "newer.zip", rdf))

    def wrong_sha(r):
        r["weights"]["pytorch_state_dict"]["sha256"] = "0" * 64

    pkg = _crafted(finetuned_zip, tmp_path, "sha.zip", rdf_edit=wrong_sha)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        import_bioimageio(pkg)


def test_export_without_the_extra_or_of_a_package_says_what_to_do(
    monkeypatch, finetuned_zip, tmp_path
):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bioimageio.spec", None)  # as if not installed
        with pytest.raises(ConfigError, match=r"pip install 'napari-hrtem-transfer\[bioimageio\]'"):
            export_bioimageio("pretrained", tmp_path / "x.zip")
    with pytest.raises(ConfigError, match="already a bioimage.io package"):
        export_bioimageio(finetuned_zip, tmp_path / "y.zip")
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "y.zip").exists()


def test_package_detection(tmp_path, finetuned_zip):
    assert is_bioimageio_package(finetuned_zip) and is_bioimageio_package(tmp_path / "rdf.yaml")
    assert not is_bioimageio_package("pretrained") and not is_bioimageio_package(
        pretrained_model_dir()
    )
    with pytest.raises(CheckpointError, match="does not exist"):
        import_bioimageio(tmp_path / "missing.zip")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="no rdf.yaml"):
        resolve_model(bad)


# ----------------------------------------------------------------------------- CLI


def test_cli_export(finetuned, tmp_path, capsys):
    from napari_hrtem_transfer.cli import main

    out = tmp_path / "m.zip"
    args = ["export", "--model", str(finetuned[0]), "--out", str(out), "--no-test"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out and zipfile.is_zipfile(out)
    rdf, _ = _rdf(out)
    assert rdf["config"][CONFIG_KEY]["imaging_domain"]["stage"] == "finetune"
    assert main(args) == 2 and "exists; use --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--author", "A. Person"]) == 0
    assert _rdf(out)[0]["authors"] == [{"name": "A. Person"}]
    assert main(["export", "--model", str(finetuned[0]), "--out", str(tmp_path / "m.tar")]) == 2
    assert "is a .zip file" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--name", "commas, refused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrtem-transfer export: error: --name") and "Traceback" not in err
