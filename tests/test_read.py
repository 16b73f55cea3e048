"""The read API (``dvidetl.read.open_export``) against synthetic ground truth.

One small synthetic volume is exported once per module through the real pipeline (Flight on
loopback, a real dask cluster, the sink) with a 1 KiB cell limit, so block bodies and label
tables overflow into ``block_overflow`` and every read has to reassemble them. Every
answer is compared with what the synthetic source knows voxel by voxel.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dvidetl import read as R
from dvidetl.cli import main as cli
from dvidetl.errors import UserError

SRC = "synthetic://rd?size=320,256,192&scales=3&seed=7&lattice=16&bigids=1"
UUID = "rd"


ACCESS = "AKIDREADTEST"
SECRET = "read-test-secret-9c2e"  # noqa: S105 — a test key for the local server only


def _run(url: str, cluster) -> None:
    rc = cli(["run", "--uuid", UUID, "--source", SRC, "--sink", url, "--cluster",
              cluster.scheduler_address, "--partition-blocks", "16", "--cell-limit", "1024",
              "--quiet"])
    assert rc == 0


@pytest.fixture(scope="module")
def parquet_url(tmp_path_factory, cluster):
    url = f"parquet://{tmp_path_factory.mktemp('export')}/out"
    _run(url, cluster)
    return url


@pytest.fixture(scope="module")
def vastdb_url(cluster):
    """The same export into the local VastDB server, through the real vastdb SDK."""
    from dvidetl.testing.vastsim import start_vastsim

    mp = pytest.MonkeyPatch()  # credentials only through the environment
    mp.setenv("VASTDB_ACCESS_KEY", ACCESS)
    mp.setenv("VASTDB_SECRET_KEY", SECRET)
    try:
        with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as sim:
            url = f"vastdb://127.0.0.1:{sim.port}/bucket/read"
            _run(url, cluster)
            yield url
    finally:
        mp.undo()


@pytest.fixture(scope="module", params=["parquet", "vastdb"])
def export_url(request):
    """The volume exported to a sink of each kind (the same read calls must work on all)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="module")
def ex(export_url):
    return R.open_export(export_url)


def _bodies(src, vol: np.ndarray) -> np.ndarray:
    u, inv = np.unique(vol, return_inverse=True)
    return src.map_supervoxels(u)[inv].reshape(vol.shape)


def _truth(src, scale: int, box) -> np.ndarray:
    """Supervoxels [z, y, x] of a voxel box, assembled from the source's blocks."""
    (x0, y0, z0), (x1, y1, z1) = box
    out = np.zeros((z1 - z0, y1 - y0, x1 - x0), np.uint64)
    for bz in range(z0 // 64, -(-z1 // 64)):
        for by in range(y0 // 64, -(-y1 // 64)):
            for bx in range(x0 // 64, -(-x1 // 64)):
                v = src.block_voxels(scale, bx, by, bz)
                a = [max(lo, b * 64) for lo, b in zip((x0, y0, z0), (bx, by, bz), strict=True)]
                e = [min(hi, (b + 1) * 64) for hi, b in zip((x1, y1, z1), (bx, by, bz), strict=True)]
                out[a[2] - z0:e[2] - z0, a[1] - y0:e[1] - y0, a[0] - x0:e[0] - x0] = v[
                    a[2] - bz * 64:e[2] - bz * 64, a[1] - by * 64:e[1] - by * 64,
                    a[0] - bx * 64:e[0] - bx * 64]
    return out


def test_open_export_finds_the_only_export(ex, export_url):
    assert (ex.uuid, ex.instance) == (UUID, "segmentation")
    assert ex.scales == [0, 1, 2]
    assert ex.grid(0) == (5, 4, 3) and ex.grid(2) == (2, 1, 1)
    again = pickle.loads(pickle.dumps(ex))  # dask workers reopen it from its URL
    assert again.run_id == ex.run_id and again.sink.url == export_url


def test_every_block_at_every_scale(ex, src):
    """block (supervoxels and bodies) and raw_block of every present block equal the source;
    the export does overflow, so reassembly is exercised."""
    assert ex.read("block_overflow", columns=["column"]).num_rows > 0
    kinds = set(ex.read("block_overflow", columns=["column"]).column("column").to_pylist())
    assert {"payload", "supervoxels"} <= kinds
    for s in ex.scales:
        xs, ys, zs, _ = src.present_blocks(s)
        assert len(xs) == ex.read("blocks", scale=s, columns=["morton"]).num_rows
        for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
            sv = src.block_voxels(s, x, y, z)
            assert ex.raw_block(s, x, y, z) == src.block_bytes(s, x, y, z)
            got = ex.block(s, x, y, z, bodies=False)
            assert got.dtype == np.uint64 and np.array_equal(got, sv), (s, x, y, z)
            assert np.array_equal(ex.block(s, x, y, z), _bodies(src, sv)), (s, x, y, z)


def test_absent_and_bad_blocks(ex, src):
    g = ex.grid(0)
    absent = next((x, y, z) for z in range(g[2]) for y in range(g[1]) for x in range(g[0])
                  if not src.is_present(0, x, y, z))
    assert ex.raw_block(0, *absent) is None
    assert not ex.block(0, *absent).any() and ex.block(0, *absent).shape == (64, 64, 64)
    with pytest.raises(UserError, match="outside the scale-0 grid"):
        ex.block(0, g[0], 0, 0)
    with pytest.raises(UserError, match="scale 5 is not in this export"):
        ex.block(5, 0, 0, 0)


@pytest.mark.parametrize("scale, box", [
    (0, ((10, 3, 5), (300, 250, 190))),   # unaligned, corners absent (ellipsoid mask)
    (1, ((0, 0, 0), (160, 128, 96))),     # the whole scale-1 volume, partial edge blocks
    (0, ((70, 70, 70), (71, 200, 72))),   # thin, inside one block column
])
def test_subvolume_equals_truth(ex, src, scale, box):
    a = ex.subvolume(scale, box, bodies=False)
    (x0, y0, z0), (x1, y1, z1) = box
    assert a.shape == (z1 - z0, y1 - y0, x1 - x0) and a.dtype == np.uint64
    # one chunk per block: chunk edges on block boundaries
    for n0, n1, c in zip((z0, y0, x0), (z1, y1, x1), a.chunks, strict=True):
        edges = np.cumsum((n0, *c))
        assert all(e % 64 == 0 for e in edges[1:-1]) and edges[-1] == n1
    truth = _truth(src, scale, box)
    assert truth.any() and (truth == 0).any()
    got = a.compute()  # threaded scheduler: blocks decode concurrently
    assert np.array_equal(got, truth)
    assert np.array_equal(ex.subvolume(scale, box).compute(), _bodies(src, truth))


class _CountingSink:
    """The real sink, with a record of the ``blocks`` reads (rows returned) made through it."""

    def __init__(self, sink):
        self._sink, self.rows = sink, []

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def read(self, table, *args, **kw):
        t = self._sink.read(table, *args, **kw)
        if table == "blocks" and kw.get("columns") is None:
            self.rows.append(t.num_rows)
        return t


def test_subvolume_reads_only_needed_blocks(ex, src):
    counting = _CountingSink(ex.sink)
    ex2 = R.Export(counting, run_id=ex.run_id)
    box = ((0, 0, 0), (320, 256, 192))
    a = ex2.subvolume(0, box, bodies=False)
    assert counting.rows == []  # building the array reads no block bodies
    xs, ys, zs, _ = src.present_blocks(0)
    x, y, z = int(xs[7]), int(ys[7]), int(zs[7])
    piece = a[z * 64 + 5, y * 64:(y + 1) * 64, x * 64 + 1:x * 64 + 9].compute()
    assert np.array_equal(piece, src.block_voxels(0, x, y, z)[5, :, 1:9])
    assert len(counting.rows) == 1 and 1 <= counting.rows[0] <= R.GROUP_BLOCKS
    counting.rows.clear()
    a.compute()
    assert sum(counting.rows) == len(xs)  # every present block exactly once


def test_subvolume_on_distributed(ex, src, cluster):
    from distributed import Client

    box = ((100, 60, 20), (230, 190, 150))
    with Client(cluster) as client:
        got = client.compute(ex.subvolume(0, box)).result()
    assert np.array_equal(got, _bodies(src, _truth(src, 0, box)))


def test_bad_boxes(ex):
    for box in [((0, 0, 0), (0, 10, 10)), ((-1, 0, 0), (5, 5, 5)), (1, 2, 3), ((0, 0), (1, 1))]:
        with pytest.raises(UserError, match="box"):
            ex.subvolume(0, box)
    assert not ex.subvolume(0, ((5000, 0, 0), (5100, 10, 10))).compute().any()


def _index(src):
    rows = src.index_rows()
    return {k: np.asarray(v) for k, v in rows.items()}


def test_body_blocks_and_sizes(ex, src):
    ix = _index(src)
    bodies, counts = np.unique(ix["body"], return_counts=True)
    picks = {int(bodies[np.argmax(counts)]), int(bodies[np.argmin(counts)]),
             int(bodies[bodies >= 2**63][0]) if (bodies >= 2**63).any() else int(bodies[0])}
    for body in picks:
        sel = ix["body"] == body
        keys = {}
        for x, y, z, v in zip(ix["x"][sel], ix["y"][sel], ix["z"][sel], ix["voxels"][sel], strict=True):
            keys[(int(x), int(y), int(z))] = keys.get((int(x), int(y), int(z)), 0) + int(v)
        t = ex.body_blocks(body)
        got = dict(zip(zip(t.column("x").to_pylist(), t.column("y").to_pylist(),
                           t.column("z").to_pylist(), strict=True), t.column("voxels").to_pylist(), strict=True))
        assert got == keys
        assert ex.body_size(body) == sum(keys.values())
        for s in (1, 2):  # voxels of the body at coarse scales, counted in the source's voxels
            n = 0
            for x, y, z in zip(*(a.tolist() for a in src.present_blocks(s)[:3]), strict=True):
                n += int((_bodies(src, src.block_voxels(s, x, y, z)) == body).sum())
            assert ex.body_size(body, scale=s) == n
    assert ex.body_blocks(12345).num_rows == 0 and ex.body_size(12345) == 0


def test_supervoxel_blocks(ex, src):
    ix = _index(src)
    svs, counts = np.unique(ix["supervoxel"], return_counts=True)
    for sv in (int(svs[np.argmax(counts)]), int(svs[len(svs) // 2])):
        sel = ix["supervoxel"] == sv
        want = sorted(zip(ix["x"][sel].tolist(), ix["y"][sel].tolist(), ix["z"][sel].tolist(),
                          ix["voxels"][sel].tolist(), strict=True))
        t = ex.supervoxel_blocks(sv)
        got = sorted(zip(*(t.column(c).to_pylist() for c in ("x", "y", "z", "voxels")), strict=True))
        assert got == want


@pytest.mark.parametrize("scale, box", [
    (0, ((30, 40, 50), (250, 230, 170))),   # cut blocks and whole blocks
    (0, ((64, 64, 64), (192, 192, 128))),   # block-aligned: no decode needed
    (1, ((5, 0, 0), (150, 100, 90))),
])
def test_bodies_in(ex, src, scale, box):
    truth = _bodies(src, _truth(src, scale, box))
    u, c = np.unique(truth[truth != 0], return_counts=True)
    t = ex.bodies_in(box, scale=scale)
    assert dict(zip(t.column("body").to_pylist(), t.column("voxels").to_pylist(), strict=True)) == dict(
        zip(u.tolist(), c.tolist(), strict=True))
    v = t.column("voxels").to_numpy()
    assert (np.diff(v.astype(np.int64)) <= 0).all()


def test_bodies_of_uses_the_mapping(ex, src):
    m = src.mapping_dict()
    ex_map = ex.read("mapping")
    assert ex_map.num_rows == len(m)
    svs = np.array(list(m)[:5] + [123, 2**64 - 5], np.uint64)
    assert ex.bodies_of(svs).tolist() == [m.get(int(s), int(s)) for s in svs]
    many = np.array(list(m)[::7], np.uint64)
    assert ex.bodies_of(many).tolist() == [m[int(s)] for s in many]


def test_block_stats_and_largest_bodies(ex, src):
    from dvidetl.codec import block_labels

    for s in ex.scales:
        t = ex.block_stats(s)
        got = {(x, y, z): (r, n) for x, y, z, r, n in zip(
            *(t.column(c).to_pylist() for c in ("x", "y", "z", "raw_size", "labels")), strict=True)}
        xs, ys, zs, _ = src.present_blocks(s)
        want = {}
        for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
            raw = src.block_bytes(s, x, y, z)
            want[(x, y, z)] = (len(raw), len(block_labels(raw)))
        assert got == want
    assert max(n for _, n in got.values()) > 0
    ix = _index(src)
    b, inv = np.unique(ix["body"], return_inverse=True)
    vox = np.bincount(inv, weights=ix["voxels"].astype(np.float64)).astype(np.int64)
    top = ex.largest_bodies(5)
    order = np.lexsort((b, -vox))[:5]
    assert top.column("body").to_pylist() == b[order].tolist()
    assert top.column("voxels").to_pylist() == vox[order].tolist()
    nblk = [len({(x, y, z) for x, y, z, bb in zip(ix["x"], ix["y"], ix["z"], ix["body"], strict=True)
                 if bb == body}) for body in b[order]]
    assert top.column("blocks").to_pylist() == nblk


def test_open_export_errors(tmp_path, parquet_url):
    export_url = parquet_url
    with pytest.raises(UserError, match="unknown export URL scheme"):
        R.open_export("nosuch://x")
    with pytest.raises(UserError, match="no export found"):
        R.open_export(f"parquet://{tmp_path}/empty")
    with pytest.raises(UserError, match="no export found"):
        R.open_export(export_url, uuid="other")
    # two exports in one directory: the caller must say which
    base = export_url[len("parquet://"):]
    (tmp_path / "two").mkdir()
    import shutil

    shutil.copytree(f"{base}/segmentation", tmp_path / "two" / "segmentation")
    shutil.copytree(f"{base}/segmentation/{UUID}", tmp_path / "two" / "segmentation" / "other")
    with pytest.raises(UserError, match="pass uuid= and instance="):
        R.open_export(f"parquet://{tmp_path}/two")
    ex = R.open_export(str(tmp_path / "two"), uuid="other")  # a bare directory is Parquet
    assert ex.uuid == "other" and ex.block(0, 2, 2, 1).any()


# ---------------------------------------------------------------------------------------
# dask dataframes (Export.frame)
# ---------------------------------------------------------------------------------------


def test_frame_partitions_follow_the_export_plan(ex):
    for s in ex.scales:
        plan = [p for p in ex.run.partitions if p.kind == "blocks" and p.scale == s]
        f = ex.frame("blocks", scale=s, columns=["x", "y", "z", "morton"])
        assert f.npartitions == len(plan)
        got = f.compute()
        want = ex.read("blocks", scale=s, columns=["x", "y", "z", "morton"])
        assert sorted(got["morton"].tolist()) == sorted(want.column("morton").to_pylist())
        assert list(got.columns) == ["x", "y", "z", "morton"]
        assert str(got["morton"].dtype) == "uint64"


def test_frame_label_index_voxels_per_body_on_the_cluster(ex, cluster):
    """The notebook's use: voxels per body from label_index, computed by the cluster."""
    from distributed import Client

    want = ex.read("label_index", columns=["label", "voxels"])
    totals: dict[int, int] = {}
    for lab, v in zip(want.column("label").to_pylist(), want.column("voxels").to_pylist(),
                      strict=True):
        totals[lab] = totals.get(lab, 0) + v
    with Client(cluster) as c:
        f = ex.frame("label_index", columns=["label", "voxels"])
        f = f.assign(voxels=f.voxels.astype("uint64"))
        got = c.compute(f.groupby("label").voxels.sum()).result()
    assert {int(k): int(v) for k, v in got.items()} == totals
    top = max(totals, key=totals.get)
    assert ex.body_size(top) == totals[top]


def test_frame_pushes_filters_down_and_projects(ex):
    li = ex.read("label_index", columns=["label", "supervoxel"])
    lab = int(li.column("label")[li.num_rows // 2].as_py())
    f = ex.frame("label_index", where={"label": lab}, columns=["supervoxel", "voxels"])
    got = f.compute()
    want = ex.read("label_index", where={"label": lab}, columns=["supervoxel", "voxels"])
    assert len(got) == want.num_rows > 0
    assert list(got.columns) == ["supervoxel", "voxels"]
    m = ex.read("mapping")
    svs = sorted(m.column("supervoxel").to_pylist())
    lo, hi = svs[len(svs) // 4], svs[3 * len(svs) // 4]
    fm = ex.frame("mapping", where={"supervoxel": (lo, hi)}).compute()
    assert sorted(fm["supervoxel"].tolist()) == [s for s in svs if lo <= s < hi]
    with pytest.raises(UserError, match="no column"):
        ex.frame("mapping", columns=["nope"])
    with pytest.raises(UserError, match="tables with partitions"):
        ex.frame("export_ledger")


def test_inspect_works_on_every_sink(export_url, ex, src, capsys):
    """`dvidetl inspect` reads through the same API on Parquet and VastDB."""
    from dvidetl.cli import main as cli

    st = ex.block_stats(0).to_pylist()[0]
    x, y, z = st["x"], st["y"], st["z"]
    assert cli(["inspect", "--sink", export_url, "--block", f"{x},{y},{z}"]) == 0
    out = capsys.readouterr().out
    svs = np.unique(src.block_voxels(0, x, y, z))
    assert f"block ({x}, {y}, {z}) scale 0" in out and f" {len(svs)} supervoxels" in out
    idx = ex.read("label_index", columns=["label"])
    lab, n = np.unique(idx.column("label").to_numpy(), return_counts=True)
    big = int(lab[np.argmax(n)])
    assert cli(["inspect", "--sink", export_url, "--label", str(big)]) == 0
    assert f"{int(n.max()):,} block entries" in capsys.readouterr().out
    assert cli(["inspect", "--sink", export_url, "--label", "3"]) == 1
    assert "not in label_index" in capsys.readouterr().out
