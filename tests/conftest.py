"""Shared fixtures: where the real DVID data lives (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the fault-injecting test sink is registered for the tests only (inherited by Dask workers
# and CLI subprocesses), never in the production scheme table
os.environ.setdefault("DVIDETL_EXTRA_SINKS", "flaky+parquet=dvidetl.testing.faulty_sink:open_url")

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared").resolve()
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found beside the project (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="module")
def cluster():
    """An in-process dask cluster over TCP (one worker, two threads) for a module's exports
    and distributed reads; modules needing real worker processes define their own."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                      dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def src(request):
    """The module's ``SRC`` source URL, opened once per module."""
    from dvidetl.sources import open_source

    s = open_source(request.module.SRC)
    yield s
    s.close()
