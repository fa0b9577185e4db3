"""The OOD verdict where the CLI user looks: printed reasons and the .ood.json rows."""

from __future__ import annotations

import json

import numpy as np

from napari_hrtem_transfer.cli import main


def test_blank_and_lattice_frames_are_flagged_with_reasons_in_print_and_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 256
    y, x = np.mgrid[0:n, 0:n] * 0.2  # [Å]
    # a particle-free crystal lattice (3.9 Å square lattice, SrTiO3-like, rotated by 17°)
    # with shot noise
    c, s = np.cos(np.radians(17.0)), np.sin(np.radians(17.0))
    u, v = c * x + s * y, -s * x + c * y
    lattice = 200 + 60 * (np.cos(2 * np.pi * u / 3.905) + np.cos(2 * np.pi * v / 3.905))
    frames = np.stack(
        [
            rng.poisson(20.0, (n, n)).astype(np.float32),  # blank detector: shot noise only
            rng.poisson(lattice).astype(np.float32),
        ]
    )
    src = tmp_path / "frames.npy"
    np.save(src, frames)
    out = tmp_path / "mask.hspy"
    assert main(["segment", str(src), "--out", str(out), "--sampling", "0.2"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.with_name("mask.ood.json").read_text())
    rows = doc["frames"]
    assert len(rows) == 2 and np.isfinite(doc["caution_level"])
    assert doc["imaging_domain"]["defocus_nm_range"] == [-25.0, 25.0]
    for row in rows:
        assert row["caution"] and row["ood_score"] > doc["caution_level"], row
        assert row["reasons"], row
        assert isinstance(row["ood_components"], dict) and "network" in row["ood_components"]
        assert "estimated_defocus_nm" in row and "defocus_sign_determined" in row
    assert any("blank" in r for r in rows[0]["reasons"])
    assert any("lattice" in r or "amorphous" in r for r in rows[1]["reasons"])
    # the reasons are printed beside the flag
    assert printed.count("treat with caution") == 2
    assert rows[0]["reasons"][0] in printed
