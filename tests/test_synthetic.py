"""synthetic:// source: determinism, ground truth, counts, ranges, indices, mapping, hard cases."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.codec import decode_block, split_block, unwrap
from dvidetl.codec.labelindex import label_index_rows, label_index_table
from dvidetl.errors import UserError
from dvidetl.geometry import morton_decode, morton_encode
from dvidetl.sources import open_source, synthetic
from dvidetl.sources._synthetic_downres import downres_dvid
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA, INDICES_SCHEMA, MAPPING_SCHEMA, Source
from dvidetl.sources.synthetic import SyntheticSource, open_url

HARD = "synthetic://hard?size=256,256,256&scales=2&dense=0.05&seed=3"
# 256 x 32 x 24 blocks: bricks of 4 blocks, so pattern (boundary) bricks are exercised
WIDE = "synthetic://wide?size=16384,2048,1536&scales=4&seed=5&empty=0.1"
SMALL = "synthetic://small?size=320,256,192&scales=3&seed=1&solid=0.1"
CNS = "synthetic://cns?size=94088,78317,134576&scales=8&mask=sparse"


@pytest.fixture(scope="module")
def hard() -> SyntheticSource:
    return open_url(HARD)


@pytest.fixture(scope="module")
def small() -> SyntheticSource:
    return open_url(SMALL)


@pytest.fixture(scope="module")
def wide() -> SyntheticSource:
    return open_url(WIDE)


def _stored_to_voxels(data: bytes) -> np.ndarray:
    return decode_block(unwrap(data, "gzip"))


def test_open_source_and_info(small):
    src = open_source(SMALL)
    assert isinstance(src, Source)
    info = src.info()
    assert info.uuid == "small" and info.instance == "segmentation" and info.codec == "gzip"
    assert [s.scale for s in info.scales] == [0, 1, 2]
    assert [s.grid for s in info.scales] == [(5, 4, 3), (3, 2, 2), (2, 1, 1)]
    assert info.scales[0].voxel_max == (320, 256, 192)
    assert all(s.block_size == (64, 64, 64) for s in info.scales)
    assert open_url("synthetic://x?instance=seg2&size=128,128,128").info().instance == "seg2"


def test_url_errors():
    with pytest.raises(UserError, match="unknown parameter"):
        open_url("synthetic://a?sizes=1,2,3")
    with pytest.raises(UserError, match="size"):
        open_url("synthetic://a?size=10,10")
    with pytest.raises(UserError, match="size"):
        open_url("synthetic://a?size=32,64,64")
    with pytest.raises(UserError, match="mask"):
        open_url("synthetic://a?mask=round")
    with pytest.raises(UserError, match="dense"):
        open_url("synthetic://a?dense=2")
    with pytest.raises(UserError, match="volume name"):
        open_url("synthetic://?size=64,64,64")
    with pytest.raises(UserError, match="scale 7"):
        open_url(SMALL).block_voxels(7, 0, 0, 0)


def test_determinism():
    a, b = open_url(SMALL), open_url(SMALL)
    c = open_url(SMALL.replace("seed=1", "seed=2"))
    xs, ys, zs, _ = a.present_blocks(0)
    assert len(xs) > 10
    same_as_c = 0
    for i in range(0, len(xs), 5):
        key = (0, int(xs[i]), int(ys[i]), int(zs[i]))
        assert a.block_stored(*key) == b.block_stored(*key)
        same_as_c += a.block_bytes(*key) == c.block_bytes(*key)
    assert same_as_c == 0
    assert [x.to_pydict() for x in a.read_blocks(1, 0, 64)] == [
        x.to_pydict() for x in b.read_blocks(1, 0, 64)
    ]


def test_blocks_decode_to_voxels_and_absent_are_zero(small):
    for scale in range(3):
        xs, ys, zs, codes = small.present_blocks(scale)
        assert len(xs)
        for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
            vox = small.block_voxels(scale, x, y, z)
            assert vox.dtype == np.uint64 and vox.shape == (64, 64, 64)
            assert vox.any(), "a present block must not be all zero"
            assert np.array_equal(_stored_to_voxels(small.block_stored(scale, x, y, z)), vox)
            assert np.array_equal(decode_block(small.block_bytes(scale, x, y, z)), vox)
        # every absent in-grid block is all zero and has no bytes
        g = small.info().scales[scale].grid
        present = set(zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True))
        for x in range(g[0]):
            for y in range(g[1]):
                for z in range(g[2]):
                    if (x, y, z) not in present:
                        assert small.block_bytes(scale, x, y, z) is None
                        assert not small.block_voxels(scale, x, y, z).any()


def test_looks_like_segmentation(small):
    xs, ys, zs, _ = small.present_blocks(0)
    kinds = small.block_kinds(xs, ys, zs)
    nlabels, zeros, solid = [], 0, 0
    for x, y, z, k in zip(xs.tolist(), ys.tolist(), zs.tolist(), kinds.tolist(), strict=True):
        v = small.block_voxels(0, x, y, z)
        u = np.unique(v)
        nlabels.append(len(u[u != 0]))
        zeros += int((v == 0).any())
        solid += int(len(u) == 1)
        assert (len(u) == 1) == (k == 1)
    assert solid >= 1, "some solid blocks"
    assert zeros >= 1, "tissue edges leave background"
    assert np.median(nlabels) >= 10, "Voronoi supervoxels: tens of labels per block"
    # supervoxels are regions, not noise: most voxels equal their x-neighbour
    v = small.block_voxels(
        0, int(xs[kinds == 0][0]), int(ys[kinds == 0][0]), int(zs[kinds == 0][0])
    )
    assert (v[:, :, 1:] == v[:, :, :-1]).mean() > 0.85


def test_downres_reference():
    v = np.zeros((2, 2, 4), np.uint64)
    v[:, :, 0:2] = [[[5, 0], [0, 0]], [[0, 0], [0, 0]]]  # one non-zero -> it wins over zeros
    v[:, :, 2:4] = [[[7, 3], [7, 3]], [[9, 9], [0, 0]]]  # 7,3,9 twice each -> smallest, 3
    assert downres_dvid(v).tolist() == [[[5, 3]]]
    assert downres_dvid(np.zeros((2, 2, 2), np.uint64)).tolist() == [[[0]]]
    w = np.array([2**64 - 1] * 5 + [4] * 3, np.uint64).reshape(2, 2, 2)
    assert downres_dvid(w).tolist() == [[[2**64 - 1]]]


def test_coarse_scale_is_dvid_downres_of_finer(small, hard):
    for src in (small, hard):
        for scale in (1, 2) if src is small else (1,):
            xs, ys, zs, _ = src.present_blocks(scale)
            for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
                fine = np.zeros((128, 128, 128), np.uint64)
                for c in range(8):
                    dx, dy, dz = c & 1, (c >> 1) & 1, c >> 2
                    fine[dz * 64 : dz * 64 + 64, dy * 64 : dy * 64 + 64, dx * 64 : dx * 64 + 64] = (
                        src.block_voxels(scale - 1, 2 * x + dx, 2 * y + dy, 2 * z + dz)
                    )
                assert np.array_equal(src.block_voxels(scale, x, y, z), downres_dvid(fine))


def _brute_counts(src, scale, level):
    _, _, _, codes = src.present_blocks(scale)
    cells, counts = np.unique(codes >> np.uint64(level), return_counts=True)
    return cells, counts


@pytest.mark.parametrize("url", [SMALL, WIDE, WIDE.replace("seed=5", "seed=6&mask=sparse")])
def test_count_matches_enumeration(url):
    src = open_url(url)
    for scale in range(len(src.info().scales)):
        for level in (0, 1, 3, 5, 8, 64):
            cells, counts, exact = src.count(scale, level)
            assert exact is True
            assert cells.dtype == np.uint64 and counts.dtype == np.uint64
            assert np.all(np.diff(cells.astype(np.float64)) > 0) or len(cells) <= 1
            bc, bn = _brute_counts(src, scale, level)
            assert np.array_equal(cells, bc), (scale, level)
            assert np.array_equal(counts, bn), (scale, level)


def test_wide_has_pattern_bricks_and_holes(wide):
    assert wide.brick_shift == 2
    xs, ys, zs, _ = wide.present_blocks(0)
    g = wide.info().scales[0].grid
    frac = len(xs) / (g[0] * g[1] * g[2])
    assert 0.2 < frac < 0.9
    # some brick (4x4x4 blocks) is partly present: the tissue boundary is finer than bricks
    bricks = {}
    for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
        bricks[(x >> 2, y >> 2, z >> 2)] = bricks.get((x >> 2, y >> 2, z >> 2), 0) + 1
    assert any(0 < n < 64 for n in bricks.values())


def test_read_blocks_exact_ranges(small):
    info = small.info()
    for scale in range(3):
        xs, ys, zs, codes = small.present_blocks(scale)
        end = info.scales[scale].morton_end
        for lo, hi in [(0, end), (0, 1), (1, 5), (end // 3, end // 2), (end - 1, end + 100)]:
            batches = list(small.read_blocks(scale, lo, hi))
            want = (codes >= lo) & (codes < hi)
            if not want.any():
                assert sum(b.num_rows for b in batches) == 0
                continue
            t = pa.Table.from_batches(batches, schema=BLOCKS_WIRE_SCHEMA)
            assert t.column("morton").to_numpy().tolist() == codes[want].tolist()
            assert t.column("x").to_numpy().tolist() == xs[want].tolist()
            g = info.scales[scale].grid
            mx, my, mz = morton_decode(t.column("morton").to_numpy(), g)
            assert np.array_equal(mx, t.column("x").to_numpy())
            assert np.array_equal(mz, t.column("z").to_numpy())
            enc = morton_encode(t.column("x").to_numpy(), my, mz, g)
            assert np.array_equal(enc, t.column("morton").to_numpy())
            i = len(t) // 2
            row = t.slice(i, 1).to_pylist()[0]
            assert row["data"] == small.block_stored(scale, row["x"], row["y"], row["z"])
    with pytest.raises(UserError):
        next(iter(small.read_blocks(0, 5, 5)))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 2), st.integers(0, 2**10), st.integers(1, 2**10))
def test_read_blocks_random_ranges(small, scale, lo, n):
    _, _, _, codes = small.present_blocks(scale)
    hi = lo + n
    got = [c for b in small.read_blocks(scale, lo, hi) for c in b.column("morton").to_pylist()]
    assert got == [c for c in codes.tolist() if lo <= c < hi]


def test_batches_are_bounded(hard, monkeypatch):
    whole = list(hard.read_blocks(0, 0, hard.info().scales[0].morton_end))
    assert all(b.column("data").nbytes <= (8 << 20) + 64 * b.num_rows for b in whole)
    monkeypatch.setattr(synthetic, "BATCH_BYTES", 1 << 20)
    batches = list(hard.read_blocks(0, 0, hard.info().scales[0].morton_end))
    assert len(batches) > 3  # dense blocks are ~0.8 MB gzipped each
    for b in batches:
        assert b.schema == BLOCKS_WIRE_SCHEMA
        assert b.num_rows == 1 or b.column("data").nbytes <= (1 << 20) + 64 * b.num_rows
    assert pa.Table.from_batches(batches).equals(pa.Table.from_batches(whole))


def test_dense_blocks_are_big(hard):
    xs, ys, zs, _ = hard.present_blocks(0)
    kinds = hard.block_kinds(xs, ys, zs)
    big = 0
    cz = zstandard.ZstdCompressor(level=3)
    for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
        raw = hard.block_bytes(0, x, y, z)
        labels, body = split_block(raw)
        if len(labels) > 16128:
            assert kinds[(xs == x) & (ys == y) & (zs == z)][0] == 2
            assert len(labels) <= 131_072
            assert len(raw) > 1_500_000
            if len(cz.compress(body)) > 504 * 1024:
                big += 1
    assert big >= 2
    # fragments belong to bodies (the mapping lists them)
    frag = np.unique(
        hard.block_voxels(0, *map(int, (xs[kinds == 2][0], ys[kinds == 2][0], zs[kinds == 2][0])))
    )
    bodies = hard.map_supervoxels(frag)
    assert (bodies != frag).mean() > 0.9
    mapping = hard.mapping_dict()
    assert all(
        mapping[s] == b
        for s, b in zip(frag[:2000].tolist(), bodies[:2000].tolist(), strict=True)
        if s != b
    )


def test_cns_size_count_is_exact_and_bounded():
    src = open_url(CNS)
    info = src.info()
    assert info.scales[0].grid == (1471, 1224, 2103)
    assert info.scales[0].block_slots > 3.7e9
    cells, counts, exact = src.count(0, 15)
    assert exact
    total = int(counts.sum())
    assert 0.02 * info.scales[0].block_slots < total <= 0.11 * info.scales[0].block_slots
    # a level-15 cell of scale 0 is one block of scale 5 (32^3 blocks): present iff any child
    c5, n5, _ = src.count(5, 0)
    assert np.array_equal(c5, cells) and set(n5.tolist()) == {1}
    # brute force over a few cells (each 2^15 codes) agrees exactly
    rng = np.random.default_rng(0)
    pick = rng.choice(len(cells), 6, replace=False)
    for ci in pick.tolist() + [int(np.argmax(counts)), int(np.argmin(counts))]:
        c = int(cells[ci])
        n = sum(len(p[3]) for p in src._enumerate(0, c << 15, (c + 1) << 15))
        assert n == int(counts[ci])
    # and an empty cell enumerates to nothing
    empty = sorted(set(range(int(cells[-1]))) - set(cells.tolist()))
    assert empty
    e = empty[len(empty) // 2]
    assert sum(len(p[3]) for p in src._enumerate(0, e << 15, (e + 1) << 15)) == 0
    # reading a block of it is lazy and works
    c = int(cells[int(np.argmax(counts))])
    batch = next(iter(src.read_blocks(0, c << 15, (c << 15) + 4096)))
    assert batch.num_rows >= 1
    assert _stored_to_voxels(batch.column("data")[0].as_py()).any()
    with pytest.raises(UserError, match="too many"):
        src.present_blocks(0)


def test_mapping_consistent(small):
    mapping = small.mapping_dict()
    batches = list(small.read_mapping())
    assert all(b.schema == MAPPING_SCHEMA for b in batches)
    assert len(mapping) == sum(b.num_rows for b in batches) > 0
    assert all(k != v for k, v in mapping.items())
    svs = set()
    blocks_of_body: dict[int, set] = {}
    xs, ys, zs, _ = small.present_blocks(0)
    for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
        u = np.unique(small.block_voxels(0, x, y, z))
        u = u[u != 0]
        svs.update(u.tolist())
        for body in np.unique(small.map_supervoxels(u)).tolist():
            blocks_of_body.setdefault(body, set()).add((x, y, z))
    sv_arr = np.array(sorted(svs), np.uint64)
    mapped = small.map_supervoxels(sv_arr)
    assert mapped.tolist() == [mapping.get(s, s) for s in sv_arr.tolist()]
    assert (mapped != sv_arr).mean() > 0.5, "most supervoxels belong to a bigger body"
    assert (mapped == sv_arr).any(), "some supervoxels are their own body"
    assert len(np.unique(mapped)) < len(sv_arr) / 4, "many supervoxels per body"
    assert max(len(b) for b in blocks_of_body.values()) >= 4, "bodies span many blocks"
    # unknown ids map to themselves
    other = np.array([0, 1, 12345, 2**63 + 7, 2**64 - 1], np.uint64)
    assert small.map_supervoxels(other).tolist() == other.tolist()
    # all supervoxel ids are large-ish
    assert sv_arr.min() > 2**40


def test_bigids():
    src = open_url("synthetic://big?size=256,192,128&scales=1&bigids=1&solid=0")
    xs, ys, zs, _ = src.present_blocks(0)
    u = np.unique(
        np.concatenate(
            [
                src.block_voxels(0, x, y, z).ravel()
                for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True)
            ]
        )
    )
    u = u[u != 0]
    assert (u >= np.uint64(2**63)).any() and (u < np.uint64(2**63)).any()
    mapping = src.mapping_dict()
    assert src.map_supervoxels(u).tolist() == [mapping.get(s, s) for s in u.tolist()]
    assert any(b >= 2**63 for b in mapping.values())


def _voxel_index_rows(src):
    """Ground truth from voxels: sorted (body, x, y, z, sv, count) arrays."""
    cols = [[] for _ in range(6)]
    xs, ys, zs, _ = src.present_blocks(0)
    for x, y, z in zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True):
        u, c = np.unique(src.block_voxels(0, x, y, z), return_counts=True)
        u, c = u[u != 0], c[u != 0]
        for col, v in zip(
            cols,
            (
                src.map_supervoxels(u),
                np.full(len(u), x),
                np.full(len(u), y),
                np.full(len(u), z),
                u,
                c,
            ),
            strict=True,
        ):
            col.append(np.asarray(v))
    arrs = [np.concatenate(c) for c in cols]
    order = np.lexsort((arrs[4], arrs[3], arrs[2], arrs[1], arrs[0]))
    return [
        a[order].astype(np.int64 if i in (1, 2, 3, 5) else np.uint64) for i, a in enumerate(arrs)
    ]


def _table_rows(batches):
    t = pa.concat_tables([label_index_table(b.column("label"), b.column("data")) for b in batches])
    arrs = [t.column(n).to_numpy() for n in ("label", "x", "y", "z", "supervoxel", "voxels")]
    order = np.lexsort((arrs[4], arrs[3], arrs[2], arrs[1], arrs[0]))
    return [
        a[order].astype(np.int64 if i in (1, 2, 3, 5) else np.uint64) for i, a in enumerate(arrs)
    ]


def test_indices_agree_with_voxels(small):
    batches = list(small.read_indices(0, 2**64))
    assert all(b.schema == INDICES_SCHEMA for b in batches)
    labels = [lab for b in batches for lab in b.column("label").to_pylist()]
    assert labels == sorted(labels) and len(set(labels)) == len(labels)
    got, want = _table_rows(batches), _voxel_index_rows(small)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    assert set(labels) == set(want[0].tolist())
    # each index carries its own label; a sub-range gives exactly the bodies in it
    r = label_index_rows(batches[0].column("data")[0].as_py())
    assert set(r["label"].tolist()) == {labels[0]}
    lo, hi = labels[len(labels) // 3], labels[len(labels) // 2]
    sub = [lab for b in small.read_indices(lo, hi) for lab in b.column("label").to_pylist()]
    assert sub == [lab for lab in labels if lo <= lab < hi]
    assert list(small.read_indices(5, 6)) == []


def test_indices_of_dense_volume(hard):
    want = _voxel_index_rows(hard)
    bodies = np.unique(want[0])
    assert len(want[0]) > 400_000  # dense fragments: ~125k supervoxels per dense block
    # a slice of the body range agrees exactly
    lo, hi = int(bodies[len(bodies) // 4]), int(bodies[len(bodies) // 2])
    got = _table_rows(list(hard.read_indices(lo, hi)))
    sel = (want[0] >= np.uint64(lo)) & (want[0] < np.uint64(hi))
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w[sel])
    # the biggest bodies (Voronoi groups) too
    big = bodies[np.argsort(np.bincount(np.searchsorted(bodies, want[0])))[-3:]]
    for b in big.tolist():
        got = _table_rows(list(hard.read_indices(b, b + 1)))
        sel = want[0] == np.uint64(b)
        assert sel.sum() > 10
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w[sel])


def test_index_limit():
    src = open_url("synthetic://lim?size=512,512,512&maxindex=10")
    with pytest.raises(UserError, match="maxindex"):
        next(iter(src.read_indices(0, 2**64)))


def test_demo_volume_shape():
    demo = open_url("synthetic://demo")
    other = open_url("synthetic://anything")
    info = demo.info()
    assert info.uuid == "demo" and other.info().uuid == "anything"
    assert len(info.scales) == 4
    n0 = int(demo.count(0, 64)[1].sum())
    assert 1800 <= n0 <= 4000
    total = sum(int(demo.count(s, 64)[1].sum()) for s in range(4))
    assert total < 5000
    xs, ys, zs, _ = demo.present_blocks(0)
    kinds = demo.block_kinds(xs, ys, zs)
    assert 1 <= int((kinds == 2).sum()) <= 20, "a few dense blocks"
    assert int((kinds == 1).sum()) >= 10, "some solid blocks"


@settings(max_examples=12, deadline=None)
@given(
    st.integers(1, 12_000),
    st.integers(64, 700),
    st.integers(64, 900),
    st.integers(0, 50),
    st.sampled_from(["ellipsoid", "sparse", "full"]),
    st.floats(0, 0.5),
    st.integers(0, 20),
)
def test_count_property_odd_grids(sx, sy, sz, seed, mask, empty, level):
    """Exact counts for odd grid shapes (partial bricks at the edges, axes running out of
    Morton bits at different levels), every scale."""
    sx = max(64, sx)
    src = open_url(
        f"synthetic://p?size={sx},{sy},{sz}&scales=4&seed={seed}&mask={mask}&empty={empty:.3f}"
    )
    for scale in range(4):
        cells, counts, exact = src.count(scale, level)
        bc, bn = _brute_counts(src, scale, level)
        assert exact and np.array_equal(cells, bc) and np.array_equal(counts, bn)
    if mask == "full" and empty == 0:
        g = src.info().scales[0].grid
        assert int(src.count(0, 64)[1].sum()) == g[0] * g[1] * g[2]


def test_indices_same_with_or_without_served_blocks():
    """Counts gathered while serving blocks give the same indices as a cold index pass."""
    cold = open_url(SMALL)
    warm = open_url(SMALL)
    for b in warm.read_blocks(0, 0, 10):  # serve some blocks first (fills the stash)
        assert b.num_rows
    a = pa.Table.from_batches(list(cold.read_indices(0, 2**64)))
    b = pa.Table.from_batches(list(warm.read_indices(0, 2**64)))
    assert a.num_rows > 10 and a.equals(b)
    warm.close()
    assert pa.Table.from_batches(list(warm.read_indices(0, 2**64))).equals(a)


def test_pickles_as_url(small):
    import pickle

    other = pickle.loads(pickle.dumps(small))
    assert other.url == small.url and other.info() == small.info()
    xs, ys, zs, _ = small.present_blocks(0)
    assert other.block_stored(0, int(xs[0]), int(ys[0]), int(zs[0])) == small.block_stored(
        0, int(xs[0]), int(ys[0]), int(zs[0])
    )
