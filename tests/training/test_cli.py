"""The pretrain / finetune / segment commands, end to end, and their errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main

SMALL = [
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--patch-size",
    "32",
    "--precision",
    "fp32",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def models(dataset_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pre, ft = root / "pre", root / "ft"
    assert (
        main(
            ["pretrain", "--data", str(dataset_path), "--defocus", "-5", "--out", str(pre), *SMALL]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "--model",
                str(pre),
                "--data",
                str(dataset_path),
                "--defocus",
                "5",
                "--freeze",
                "encoder",
                "--n-train",
                "4",
                "--out",
                str(ft),
                *SMALL,
            ]
        )
        == 0
    )
    return pre, ft


@pytest.mark.slow
def test_pretrain_and_finetune_write_checkpoints(models, capsys):
    from napari_hrtem_transfer.training import read_sidecar

    pre, ft = models
    s_pre, s_ft = read_sidecar(pre), read_sidecar(ft)
    assert s_pre["data"]["train_defocus_nm"] == [-5.0] and s_pre["stage"] == "pretrain"
    assert s_ft["stage"] == "finetune" and s_ft["data"]["n_train_images"] == 4
    assert s_ft["training"]["config"]["freeze"] == "encoder"
    assert s_ft["training"]["config"]["lr"] == 1e-4  # fine-tuning default


@pytest.mark.slow
def test_epoch_summary_lines(dataset_path, tmp_path, capsys):
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(dataset_path),
                "--defocus=-5,0",
                "--out",
                str(tmp_path / "m"),
                *SMALL,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "epoch 1/1  train" in out
        and "val by defocus [nm] -5:" in out
        and "done: best epoch 1" in out
    )


@pytest.mark.slow
def test_segment_npy_hspy_and_tif(models, dataset_path, tmp_path):
    import hyperspy.api as hs
    import tifffile

    from napari_hrtem_transfer.io.dataset import load_dataset
    from napari_hrtem_transfer.training import load_checkpoint

    _, ft = models
    ds = load_dataset(dataset_path, lazy=False)
    stack = ds.images[2, :3].astype(np.float32)
    np.save(tmp_path / "in.npy", stack)
    assert (
        main(
            [
                "segment",
                "--model",
                str(ft),
                str(tmp_path / "in.npy"),
                "--out",
                str(tmp_path / "mask.npy"),
                "--proba",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    proba = np.load(tmp_path / "mask_proba.npy")
    mask = np.load(tmp_path / "mask.npy")
    ref = load_checkpoint(ft, device="cpu").predict_proba(stack, precision="fp32")
    np.testing.assert_allclose(proba, ref, atol=1e-5)
    np.testing.assert_array_equal(mask, (proba >= 0.5).astype(np.uint8))
    # finetune fitted the OOD reference, so segment scores every frame
    import json

    from napari_hrtem_transfer.evaluation import ood_scores

    ood = json.loads((tmp_path / "mask.ood.json").read_text())
    assert ood["input"] == str(tmp_path / "in.npy") and ood["model"] == str(ft)
    assert [r["frame"] for r in ood["frames"]] == [0, 1, 2]
    scores = [r["ood_score"] for r in ood["frames"]]
    np.testing.assert_allclose(scores, ood_scores(ft, stack).score, rtol=1e-3, atol=1e-3)
    # the OOD file is an output like the others: not replaced without --overwrite
    (tmp_path / "mask.npy").unlink()
    (tmp_path / "mask_proba.npy").unlink()
    argv = [
        "segment",
        "--model",
        str(ft),
        str(tmp_path / "in.npy"),
        "--out",
        str(tmp_path / "mask.npy"),
    ]
    assert main(argv) == 2
    assert not (tmp_path / "mask.npy").exists()
    assert main([*argv, "--overwrite"]) == 0

    # a calibrated HyperSpy stack: the mask keeps axes and calibration
    s = hs.signals.Signal2D(stack)
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = 0.02, "nm"
    s.axes_manager.navigation_axes[0].name = "frame"
    s.save(tmp_path / "in.hspy")
    assert (
        main(
            [
                "segment",
                "--model",
                str(ft),
                str(tmp_path / "in.hspy"),
                "--out",
                str(tmp_path / "mask2.hspy"),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    m = hs.load(tmp_path / "mask2.hspy")
    assert m.data.shape == (3, 64, 64) and m.data.dtype == np.uint8
    np.testing.assert_array_equal(m.data, mask)
    assert m.axes_manager.signal_axes[0].scale == pytest.approx(0.02)
    assert m.axes_manager.signal_axes[0].units == "nm"
    assert m.axes_manager.navigation_axes[0].name == "frame"

    np.save(tmp_path / "one.npy", stack[0])
    assert (
        main(
            [
                "segment",
                "--model",
                str(ft),
                str(tmp_path / "one.npy"),
                "--out",
                str(tmp_path / "one.tif"),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "one.tif"), mask[0])


def test_segment_sampling_warning_and_resample(models, tmp_path, capsys):
    import hyperspy.api as hs

    _, ft = models
    rng = np.random.default_rng(0)
    s = hs.signals.Signal2D(rng.poisson(200, size=(64, 64)).astype(np.float32))
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = 0.04, "nm"  # 0.4 Å/px, the model was trained at 0.2
    s.save(tmp_path / "coarse.hspy")
    assert (
        main(
            [
                "segment",
                "--model",
                str(ft),
                str(tmp_path / "coarse.hspy"),
                "--out",
                str(tmp_path / "a.npy"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "resampled frames from 0.4 to the model's 0.2" in err
    assert (
        main(
            [
                "segment",
                "--model",
                str(ft),
                str(tmp_path / "coarse.hspy"),
                "--out",
                str(tmp_path / "b.npy"),
                "--no-resample",
            ]
        )
        == 0
    )
    assert "resampling is off" in capsys.readouterr().err
    assert np.load(tmp_path / "a.npy").shape == (64, 64)
    assert np.load(tmp_path / "b.npy").shape == (64, 64)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(100), "1-D"),
        (np.full((32, 32), np.nan), "NaN"),
    ],
)
def test_segment_bad_input_exits_2_and_writes_nothing(models, tmp_path, capsys, array, message):
    _, ft = models
    np.save(tmp_path / "bad.npy", array)
    rc = main(
        [
            "segment",
            "--model",
            str(ft),
            str(tmp_path / "bad.npy"),
            "--out",
            str(tmp_path / "o.hspy"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.hspy").exists()


def test_training_errors_exit_2_and_write_nothing(models, dataset_path, tmp_path, capsys):
    from napari_hrtem_transfer.io.dataset import save_dataset

    from .conftest import make_dataset

    pre, _ = models
    out = tmp_path / "x"
    cases = [
        [
            "finetune",
            "--model",
            str(pre),
            "--data",
            str(dataset_path),
            "--defocus",
            "5",
            "--n-train",
            "1000",
            "--out",
            str(out),
        ],
        ["pretrain", "--data", str(dataset_path), "--defocus", "12", "--out", str(out)],
        ["pretrain", "--data", str(dataset_path), "--defocus", ",", "--out", str(out)],
        [
            "finetune",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(dataset_path),
            "--defocus",
            "5",
            "--out",
            str(out),
        ],
    ]
    nomask = tmp_path / "nomask.hspy"
    save_dataset(make_dataset(n_images=4, size=32, with_masks=False), nomask)
    cases.append(["pretrain", "--data", str(nomask), "--out", str(out)])
    cases.append(["pretrain", "--data", str(dataset_path), "--batch-size", "0", "--out", str(out)])
    for argv in cases:
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, err
        assert not out.exists()


def test_help_does_not_import_torch():
    code = (
        "import sys; from napari_hrtem_transfer.cli import build_parser; build_parser(); "
        "import napari_hrtem_transfer.training, napari_hrtem_transfer.models; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_segment_converts_rgb_with_a_warning_and_refuses_1d(models, tmp_path, capsys):
    """RGB is handled the same way everywhere: converted to grey by the reader, said aloud."""
    import hyperspy.api as hs
    import tifffile

    _, ft = models
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.save(tmp_path / "rgb.npy", rgb)
    for name in ("rgb.tif", "rgb.npy"):
        out = tmp_path / f"{name}.mask.npy"
        assert main(["segment", "--model", str(ft), str(tmp_path / name), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "RGB" in err and "grey" in err, err
        assert np.load(out).shape == (64, 64)
    hs.signals.Signal1D(np.arange(100.0)).save(tmp_path / "line.hspy")
    for name in ("line.hspy",):
        rc = main(
            ["segment", "--model", str(ft), str(tmp_path / name), "--out", str(tmp_path / "o.tif")]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "error:" in err and "Traceback" not in err, err
        assert not (tmp_path / "o.tif").exists()


@pytest.mark.slow
def test_finetune_on_annotated_frames_from_files(models, tmp_path, capsys):
    """`finetune --images --labels`: a stack and its label file; only painted frames train."""
    import tifffile

    from napari_hrtem_transfer.training import read_sidecar

    pre, _ = models
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :96]
    masks = np.zeros((4, 96, 96), bool)
    for i in range(4):
        cy, cx = rng.uniform(25, 70, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
    frames = rng.poisson(200.0 * (1 - 0.3 * masks)).astype(np.float32)
    labels = np.zeros((4, 96, 96), np.uint8)
    labels[[1, 3]] = 255 * masks[[1, 3]]  # two frames annotated, exported as 0/255
    np.save(tmp_path / "frames.npy", frames)
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    argv = [
        "finetune",
        "--model",
        str(pre),
        "--images",
        str(tmp_path / "frames.npy"),
        "--labels",
        str(tmp_path / "labels.tif"),
        "--sampling",
        "0.2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--samples-per-epoch",
        "8",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "ft"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 annotated frame(s) [1, 3]" in out
    side = read_sidecar(tmp_path / "ft")
    assert side["sampling_A"] == pytest.approx(0.2)
    assert (tmp_path / "ft" / "ood_reference.json").exists()
    # labels of another shape: exit 2, nothing written
    tifffile.imwrite(tmp_path / "bad.tif", labels[:, :50], photometric="minisblack")
    bad = [*argv[:-1], str(tmp_path / "ft2")]
    bad[bad.index(str(tmp_path / "labels.tif"))] = str(tmp_path / "bad.tif")
    assert main(bad) == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "ft2").exists()
