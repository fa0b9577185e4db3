"""The one provenance home (io.provenance): versions, the stamp, UTC time, file hashes."""

from datetime import UTC, datetime, timedelta
from importlib.metadata import version

import numpy as np

from napari_hrtem_transfer import __version__
from napari_hrtem_transfer.io import provenance


def test_versions_are_the_installed_distributions_and_missing_ones_are_left_out():
    got = provenance.package_versions(["numpy", "no-such-distribution-hrtem", "pydantic"])
    assert got == {"numpy": version("numpy"), "pydantic": version("pydantic")}
    assert got["numpy"] == np.__version__


def test_each_record_lists_its_packages():
    assert provenance.package_versions().keys() <= set(provenance.TRAINING_PACKAGES)
    assert set(provenance.TRAINING_PACKAGES) < set(provenance.SWEEP_PACKAGES)
    sim = provenance.package_versions(provenance.SIMULATION_PACKAGES)
    assert sim["numpy"] == np.__version__ and "torch" not in sim


def test_stamp_names_this_package_and_the_time_now():
    before = datetime.now(UTC).replace(microsecond=0)
    s = provenance.stamp()
    assert s["package"] == provenance.DISTRIBUTION == "napari-hrtem-transfer"
    assert s["version"] == provenance.package_version() == __version__
    when = datetime.fromisoformat(s["date"])
    assert when.utcoffset() == timedelta(0)
    assert before <= when <= datetime.now(UTC)


def test_sha256_file_matches_the_standard_vector(tmp_path):
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    assert provenance.sha256_file(p) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    big = tmp_path / "big.bin"  # more than one 1 MiB chunk
    big.write_bytes(b"a" * 1_000_000 + b"b" * 1_500_000)
    import hashlib

    assert provenance.sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()


def test_datasets_record_the_simulation_packages(tmp_path):
    from napari_hrtem_transfer.io import HRTEMDataset, load_dataset, save_dataset

    ds = HRTEMDataset(
        images=np.ones((1, 1, 8, 8), np.float32),
        defocus_nm=np.array([0.0]),
        sampling_A=0.5,
    )
    back = load_dataset(save_dataset(ds, tmp_path / "d.hspy"), lazy=False)
    assert back.info["versions"] == provenance.package_versions(provenance.SIMULATION_PACKAGES)
