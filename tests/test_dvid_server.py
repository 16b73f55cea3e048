"""The real DVID server fixture: it starts, takes data the way DVID users load it, and answers
as DVID does (what the ``dvid+http`` and ``shards`` tests compare the export with)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from dvidetl.codec import decode_block
from dvidetl.testing.dvid_server import DvidRequestError, DvidServer, hs256_jwt, shard_spec


def test_blocks_come_back_as_posted(dvid_mcns):
    d, u, n = dvid_mcns.server, dvid_mcns.uuid, dvid_mcns.name
    got = d.blocks(u, n, 0, (0, 0, 0), (32, 32, 32))
    want = {tuple(c): b for c, b in zip(dvid_mcns.coords.tolist(), dvid_mcns.blocks, strict=True)}
    assert set(got) == set(want)
    for k, raw in got.items():
        assert np.array_equal(decode_block(raw), decode_block(want[k])), k


def test_dvid_computed_the_coarser_scales(dvid_mcns):
    d, u, n = dvid_mcns.server, dvid_mcns.uuid, dvid_mcns.name
    s0 = np.array(list(d.blocks(u, n, 0, (0, 0, 0), (32, 32, 32))))
    s1 = d.blocks(u, n, 1, (0, 0, 0), (16, 16, 16))
    s2 = d.blocks(u, n, 2, (0, 0, 0), (8, 8, 8))
    assert set(s1) == {tuple(c) for c in (s0 // 2).tolist()}
    assert set(s2) == {tuple(c) for c in (s0 // 4).tolist()}
    assert all(decode_block(b).any() for b in s1.values())


def test_label_indices_add_up_to_the_voxels(dvid_mcns):
    d = dvid_mcns.server
    sizes = d.label_sizes(dvid_mcns.uuid, dvid_mcns.name)
    assert int(sizes[:, 1].sum()) == dvid_mcns.voxels
    labels = set()
    for b in dvid_mcns.blocks:
        labels |= set(np.unique(decode_block(b)).tolist())
    assert set(sizes[:, 0].tolist()) == labels - {0}


@pytest.fixture()
def small_repo(dvid_server):
    """A repo of its own: a 128 x 64 x 64 raw volume of four supervoxels posted with
    ``POST /raw`` (two blocks along x)."""
    v = np.zeros((64, 64, 128), np.uint64)
    v[:, :32, :64] = 11
    v[:, 32:, :64] = 12
    v[:, :, 64:96] = 13
    v[:, :, 96:] = 14
    u = dvid_server.new_repo("small")
    dvid_server.new_labelmap(u, "seg", max_downres=1)
    dvid_server.post_raw(u, "seg", v)
    dvid_server.wait_indexed(u, "seg", int(np.count_nonzero(v)))
    return u, v


def test_edits_are_dvids(dvid_server, small_repo):
    d, (u, _) = dvid_server, small_repo
    d.merge(u, "seg", 11, [12, 13])
    assert dict(map(tuple, d.mappings(u, "seg").tolist())) == {12: 11, 13: 11}
    new = d.cleave(u, "seg", 11, [13])
    assert dict(map(tuple, d.mappings(u, "seg").tolist()))[13] == new
    split, remain = d.split_supervoxel(u, "seg", 14, np.array([[96, y, z, 8] for z in range(4)
                                                                for y in range(4)]))
    sizes = dict(map(tuple, d.label_sizes(u, "seg").tolist()))
    assert sizes[14] == 32 * 64 * 64  # the body keeps its voxels
    m = dict(map(tuple, d.mappings(u, "seg").tolist()))
    assert m[split] == 14 and m[remain] == 14
    blk = decode_block(d.blocks(u, "seg", 0, (1, 0, 0), (2, 1, 1))[(1, 0, 0)])
    assert np.count_nonzero(blk == split) == 8 * 4 * 4
    d.renumber(u, "seg", {11: 111})
    assert 111 in dict(map(tuple, d.label_sizes(u, "seg").tolist()))


def test_versions_lock_and_branch(dvid_server, small_repo):
    d, (u, _) = dvid_server, small_repo
    d.commit(u)
    child = d.branch(u, "dev")
    assert d.locked(u) and not d.locked(child)
    with pytest.raises(DvidRequestError) as e:  # a locked node refuses writes
        d.merge(u, "seg", 11, [12])
    assert e.value.status == 400
    # DVID resolves PREFIX:BRANCH to the branch's leaf, the unlocked child
    info = d.get_json(f"/api/node/{u[:6]}:dev/seg/info")
    assert info["Base"]["Name"] == "seg"


def test_admin_settings_need_the_admin_token(dvid_server):
    with pytest.raises(DvidRequestError) as e:
        dvid_server.post("/api/server/settings", {"throttle": "3"})
    assert e.value.status == 400 and "admin" in e.value.text
    dvid_server.set_throttle(16)


def test_auth_answers(tmp_path):
    with DvidServer(tmp_path / "auth", auth=True) as d:
        u = d.new_repo()
        d.new_labelmap(u, "seg")
        path = f"/api/node/{u}/seg/info"
        assert json.loads(d.request("GET", path))["Base"]["Name"] == "seg"  # good token
        with pytest.raises(urllib.error.HTTPError) as e:  # no token at all
            urllib.request.urlopen(d.url + path)
        assert e.value.code == 400 and "JWT required" in e.value.read().decode()
        with pytest.raises(DvidRequestError) as e:  # signed with another secret
            d.request("GET", path, token=hs256_jwt({"user": "x"}, "not-the-secret"))
        assert e.value.status == 400 and "signature is invalid" in e.value.text


def test_export_shards_writes_dvids_files(dvid_mcns, tmp_path):
    d = dvid_mcns.server
    spec = shard_spec([(2048, 2048, 2048)])
    out = d.export_shards(dvid_mcns.uuid, dvid_mcns.name, spec, tmp_path / "shards", 1)
    files = sorted((out / "s0").glob("*.arrow"))
    assert files and all(f.with_suffix(".csv").exists() for f in files)
    n = 0
    for f in files:
        with pa.memory_map(str(f)) as mm:
            n += ipc.open_stream(mm).read_all().num_rows
    assert n == len(dvid_mcns.blocks)
