"""A dask worker that cannot import the package: a clear error before anything is submitted
(issue 18: `sweep --scheduler ...` hung forever, the scheduler logging "Lost all workers")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_hrtem_transfer.errors import ConfigError
from napari_hrtem_transfer.sweep.runner import check_workers, run_sweep

from .conftest import tiny_config

pytestmark = pytest.mark.slow


def _worker(address: str, env: dict[str, str]) -> subprocess.Popen:
    dask = Path(sys.executable).with_name("dask")
    return subprocess.Popen(
        [str(dask), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def scheduler():
    """A scheduler without workers (workers are started by the tests)."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=0,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.CRITICAL,
    )
    yield cluster.scheduler_address
    cluster.close()


def test_worker_without_the_package_is_refused_before_submitting(scheduler, data_path, tmp_path):
    # a worker whose napari_hrtem_transfer cannot be imported (a broken install shadows it)
    shadow = tmp_path / "shadow" / "napari_hrtem_transfer"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed on this worker')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "OMP_NUM_THREADS": "1"}
    proc = _worker(scheduler, env)
    db = tmp_path / "sweep.sqlite"
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="cannot import napari-hrtem-transfer") as info:
            run_sweep(tiny_config(data_path), db, scheduler=scheduler)
        assert time.monotonic() - t0 < 60
        assert "not installed on this worker" in str(info.value)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # nothing was submitted, nothing recorded
    assert not db.exists() or "runs" not in db.read_bytes().decode("latin-1")


def test_good_workers_pass_and_report_their_version(scheduler):
    from distributed import Client

    from napari_hrtem_transfer import __version__

    proc = _worker(scheduler, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        with Client(scheduler, set_as_default=False) as client:
            versions = check_workers(client, wait_s=60)
        assert list(versions.values()) == [__version__]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_scheduler_without_workers_is_a_clear_error(scheduler):
    from distributed import Client

    with Client(scheduler, set_as_default=False) as client:
        with pytest.raises(ConfigError, match="no worker"):
            check_workers(client, wait_s=1)
