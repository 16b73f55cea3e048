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


@pytest.fixture(scope="session")
def fib19_block(shared_data) -> bytes:
    """Go's MakeBlock + MarshalBinary output for fib19 sample 1 (the byte-exact reference)."""
    import gzip

    return gzip.decompress((shared_data / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes())


@pytest.fixture(scope="session")
def stream_block(shared_data) -> bytes:
    """The block of a real /blocks stream record (block 0,0,0; a non-first-occurrence table)."""
    import struct

    from dvidetl.codec import unwrap

    s = (shared_data / "dvid" / "stream_1block.dat").read_bytes()
    x, y, z, n = struct.unpack("<4i", s[:16])
    assert (x, y, z) == (0, 0, 0) and n == len(s) - 16
    return unwrap(s[16:], "gzip")


@pytest.fixture(scope="session")
def mcns_shard(shared_data):
    """The real export-shards file (male CNS, scale 1, 258 libdvid-cpp blocks) as an Arrow
    table, plus a ``block`` column: each unwrapped DVID block."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from dvidetl.codec import unwrap

    t = ipc.open_stream(str(shared_data / "mcns-shard" / "30720_24576_28672.arrow")).read_all()
    raw = [unwrap(b, "zstd") for b in t.column("dvid_compressed_block").to_pylist()]
    return t.append_column("block", pa.array(raw, pa.binary()))


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


@pytest.fixture(scope="session")
def dvid_server(tmp_path_factory):
    """The real DVID server (../shared/dvid/bin/dvid), started once per test run with its
    state under a temporary directory. Tests make their own repos on it (or branch), so they
    never see each other's edits."""
    from dvidetl.testing.dvid_server import DVID_BINARY, DvidServer

    if not DVID_BINARY.is_file():
        pytest.fail(f"the real DVID server is not at {DVID_BINARY} (../shared/dvid/bin/dvid)")
    with DvidServer(tmp_path_factory.mktemp("dvid")) as d:
        yield d


@pytest.fixture(scope="session")
def dvid_mcns(dvid_server, shared_data):
    """A repo on the real server holding the 258 real mCNS blocks, posted as DVID users do
    (``POST /blocks?downres=true``: DVID computed scales 1 and 2 and the label indices itself).
    Read-only for tests: edit a branch or a repo of your own, never this node."""
    from types import SimpleNamespace

    from dvidetl.testing.dvid_server import mcns_blocks, nonzero_voxels

    coords, blocks = mcns_blocks(shared_data)
    uuid = dvid_server.new_repo("mcns")
    dvid_server.new_labelmap(uuid, "segmentation", max_downres=2)
    dvid_server.post_blocks(uuid, "segmentation", coords, blocks)
    voxels = nonzero_voxels(blocks)
    dvid_server.wait_indexed(uuid, "segmentation", voxels)
    return SimpleNamespace(server=dvid_server, uuid=uuid, name="segmentation", coords=coords,
                           blocks=blocks, voxels=voxels)


@pytest.fixture(scope="session")
def dvid_versions(dvid_server):
    """A repo on the real server with a version history made by DVID's own edits
    (``dvid_server.load_versions``): a locked root, an unlocked master leaf, a locked ``dev``
    branch node with /cleave, /renumber and /split-supervoxel, and its unlocked leaf.
    Read-only for tests."""
    from dvidetl.testing.dvid_server import load_versions

    return load_versions(dvid_server)


@pytest.fixture(scope="session")
def dvid_auth(tmp_path_factory):
    """A second real DVID server with token auth enforced (``[auth] enforce = "token"``),
    holding a single repo (``load_versions``), so ``:master`` names a node on it; requests
    need ``server.token()``."""
    from dvidetl.testing.dvid_server import DVID_BINARY, DvidServer, load_versions

    if not DVID_BINARY.is_file():
        pytest.fail(f"the real DVID server is not at {DVID_BINARY} (../shared/dvid/bin/dvid)")
    with DvidServer(tmp_path_factory.mktemp("dvid-auth"), auth=True) as d:
        yield load_versions(d)
