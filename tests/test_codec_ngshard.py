"""neuroglancer precomputed sharded output (``dvidetl.codec.ngshard``) read back by independent
readers: precomputed volumes are built in tmp_path from the pure functions (the tests do the
file I/O) — DVID blocks → ``cseg.encode_chunks`` → ``ShardWriter`` → ``complete_info`` /
``derive_info`` — and read voxel for voxel with tensorstore (neuroglancer_precomputed driver)
and cloud-volume (``file://``): identity and murmurhash3_x86_128 sharding, raw and gzip
encodings, partial edge chunks on every axis, all-background chunks not written (read as 0),
and the real mCNS shard with the real male CNS spec. tensorstore is also the oracle for the
hash (it writes a murmur-sharded volume; our functions must find every chunk where it put
it). ``read_shard`` — the verifier's view — is checked against tampered shards."""

from __future__ import annotations

import io
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pytest
import tensorstore as ts

from dvidetl.codec import decode_block, encode_block, join_block, split_block
from dvidetl.codec.cseg import encode_chunks
from dvidetl.codec.ngshard import (
    ShardFormatError,
    Sharding,
    ShardWriter,
    chunk_filename,
    chunk_ids,
    chunk_shapes,
    complete_info,
    derive_info,
    murmurhash3_x86_128,
    read_shard,
    scale_grid,
    shard_bytes,
    sharding_for_grid,
)
from dvidetl.geometry import ScaleInfo, morton_decode, morton_encode

# ------------------------------------------------------------------- helpers (the I/O) ---


def body_of(sv: np.ndarray) -> np.ndarray:
    """The synthetic supervoxel → body mapping: merges (sv // 3) and retired ids (→ 0)."""
    sv = np.asarray(sv, np.uint64)
    return np.where((sv % np.uint64(7)) == 0, np.uint64(0), sv // np.uint64(3) + np.uint64(1000))


def synthetic_scale(rng, size):
    """(blocks, coords, expected body volume z, y, x) of a volume of ``size`` (x, y, z)
    voxels in 64³ DVID blocks: label boxes, some chunks empty inside the volume, and labels
    *outside* the volume in partial blocks (an encoder that ignored the clipped shape, or
    background detection that looked past it, would show them)."""
    grid = [-(-s // 64) for s in size]
    full = np.zeros((64 * grid[2], 64 * grid[1], 64 * grid[0]), np.uint64)
    for _ in range(40):
        lo = [int(rng.integers(0, f)) for f in full.shape]
        ext = [int(rng.integers(3, 40)) for _ in range(3)]
        full[lo[0] : lo[0] + ext[0], lo[1] : lo[1] + ext[1], lo[2] : lo[2] + ext[2]] = rng.integers(1, 400)
    noise = rng.random(full.shape) < 0.02
    full[noise] = rng.integers(1, 400, int(noise.sum()))
    sx, sy, sz = size
    inside = np.zeros(full.shape, bool)
    inside[:sz, :sy, :sx] = True
    blocks, coords = [], []
    n = grid[0] * grid[1] * grid[2]
    empty = set(rng.choice(n, max(1, n // 3), replace=False).tolist())  # at least one
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                sl = np.s_[64 * z : 64 * z + 64, 64 * y : 64 * y + 64, 64 * x : 64 * x + 64]
                if len(blocks) in empty:  # empty inside the volume, maybe labelled outside
                    full[sl][inside[sl]] = 0
                    full[sl][~inside[sl]] = 5
                blocks.append(encode_block(full[sl]))
                coords.append((x, y, z))
    return blocks, np.array(coords), body_of(full[:sz, :sy, :sx])


def block_labels_mapped(block: bytes) -> np.ndarray:
    n = int(np.frombuffer(block, "<u4", 1, 12)[0])
    return body_of(np.frombuffer(block, "<u8", n, 16))


def write_scale(root, scale: dict, blocks, coords, labels, *, any_order=False) -> dict:
    """Transcode and write one scale's shards; returns {shard file: chunk count}."""
    sh = Sharding.from_json(scale["sharding"])
    x, y, z = coords.T
    ids = chunk_ids(x, y, z, scale)
    out = encode_chunks(pa.array(blocks, pa.binary()), labels, chunk_shapes(x, y, z, scale))
    assert out.n_errors == 0, out.errors
    keep = np.flatnonzero(~out.background)
    shards = sh.shard_of(ids)
    os.makedirs(root / scale["key"], exist_ok=True)
    written = {}
    for s in np.unique(shards[keep]).tolist():
        rows = keep[shards[keep] == s]
        rows = rows[np.argsort(ids[rows])]
        if any_order:
            rows = rows[::-1]
        name = sh.shard_filename(s)
        with open(root / scale["key"] / name, "wb") as f:
            w = ShardWriter(f, sh, shard=s, any_order=any_order)
            half = len(rows) // 2  # one batch call and single adds
            w.add_many(ids[rows[:half]], [out[r] for r in rows[:half]])
            for r in rows[half:].tolist():
                w.add(int(ids[r]), out[r])
            w.finish()
        written[name] = len(rows)
    return written


def read_ts(root, scale_index: int) -> np.ndarray:
    st = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": f"file://{root}/", "scale_index": scale_index}
    ).result()
    return np.asarray(st[..., 0].read().result()).T  # x, y, z → z, y, x


def read_cv(root, mip: int) -> np.ndarray:
    from cloudvolume import CloudVolume

    cv = CloudVolume(f"file://{root}", mip=mip, fill_missing=True, progress=False, cache=False)
    return np.asarray(cv[:, :, :])[..., 0].T


# ------------------------------------------------------------- synthetic volumes, readers ---

SIZES = [(150, 100, 70), (64, 129, 9)]  # partial chunks on every axis; a 9-voxel-deep volume


@pytest.mark.parametrize(
    "hash_, data_enc, index_enc, any_order",
    [
        ("identity", "raw", "raw", False),
        ("identity", "gzip", "gzip", True),
        ("murmurhash3_x86_128", "gzip", "raw", False),
        ("murmurhash3_x86_128", "raw", "gzip", True),
    ],
)
def test_synthetic_volume_reads_back_in_tensorstore_and_cloudvolume(
    tmp_path, hash_, data_enc, index_enc, any_order
):
    rng = np.random.default_rng(zlib.crc32(repr((hash_, data_enc, index_enc, any_order)).encode()))
    data = [synthetic_scale(rng, s) for s in SIZES]
    vinfo = [
        ScaleInfo(scale=i, block_size=(64, 64, 64), grid=tuple(-(-v // 64) for v in s), voxel_max=s)
        for i, s in enumerate(SIZES)
    ]
    # small shards so a volume has several shards and minishards
    info = derive_info(
        vinfo, (8, 8, 8), preshift_bits=1, minishard_bits=1, hash=hash_,
        data_encoding=data_enc, minishard_index_encoding=index_enc,
    )
    (tmp_path / "info").write_text(json.dumps(info))
    n_files = 0
    for sc, (blocks, coords, _want) in zip(info["scales"], data, strict=True):
        labels = pa.array([block_labels_mapped(b) for b in blocks], pa.list_(pa.uint64()))
        written = write_scale(tmp_path, sc, blocks, coords, labels, any_order=any_order)
        n_files += len(written)
        # background chunks were not written: fewer chunks than blocks, and they read as 0
        assert sum(written.values()) < len(blocks)
    assert n_files > 2
    for i, (_b, _c, want) in enumerate(data):
        got = read_ts(tmp_path, i)
        assert got.shape == want.shape and np.array_equal(got, want), f"tensorstore scale {i}"
        got = read_cv(tmp_path, i)
        assert got.shape == want.shape and np.array_equal(got, want), f"cloud-volume scale {i}"


def test_unwritten_background_and_padding_read_as_zero(tmp_path):
    """A chunk whose in-volume voxels are 0 is not written although its block holds labels
    past the volume bound; readers return 0 there, and the labelled chunk beside it exact."""
    size = (70, 64, 64)
    full = np.zeros((64, 64, 128), np.uint64)
    full[:, :, :64] = 9
    full[:, :, 64:70] = 0
    full[:, :, 70:] = 77  # outside the volume
    blocks = [encode_block(full[:, :, :64]), encode_block(full[:, :, 64:])]
    info = derive_info([ScaleInfo(0, (64, 64, 64), (2, 1, 1), voxel_max=size)], (4, 4, 40))
    (tmp_path / "info").write_text(json.dumps(info))
    written = write_scale(tmp_path, info["scales"][0], blocks, np.array([(0, 0, 0), (1, 0, 0)]), None)
    assert sum(written.values()) == 1
    want = full[:, :, :70]
    assert np.array_equal(read_ts(tmp_path, 0), want)
    assert np.array_equal(read_cv(tmp_path, 0), want)


# ------------------------------------------------------------------ the real male CNS data ---


@pytest.fixture(scope="module")
def mcns(shared_data, mcns_shard):
    t = mcns_shard
    blocks = t.column("block").combine_chunks()
    coords = np.stack([t.column(c).to_numpy() for c in ("chunk_x", "chunk_y", "chunk_z")], axis=1)
    spec = json.loads((shared_data / "dvid" / "mcns-ng-specs.json").read_text())
    return blocks, t.column("labels").combine_chunks(), coords, spec


def test_mcns_spec_as_tensorstore_expects_it(tmp_path, mcns):
    """The spec as DVID's exporter takes it is refused by tensorstore (no cseg block size);
    completed, it opens with every scale and the spec's own sharding, and our chunk → shard
    assignment of the real shard is the one DVID's exporter used (file 0fe9.shard of scale 1
    holds the DVID shard at voxel origin 30720, 24576, 28672)."""
    _b, _l, coords, spec = mcns
    (tmp_path / "info").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="compressed_segmentation_block_size"):
        ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/"}).result()
    info = complete_info(spec)
    (tmp_path / "info").write_text(json.dumps(info))
    for i, sc in enumerate(info["scales"]):
        st = ts.open(
            {"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/", "scale_index": i}
        ).result()
        assert list(st.shape) == sc["size"] + [1]
        assert sc["sharding"]["data_encoding"] == "gzip" == sc["sharding"]["minishard_index_encoding"]
        assert sc["compressed_segmentation_block_size"] == [8, 8, 8]
        ts_shard = st.spec().to_json()["scale_metadata"]["sharding"]
        assert Sharding.from_json(ts_shard) == Sharding.from_json(sc["sharding"])
        # the spec's sharding covers exactly the scale's Morton bits (what derive_info does)
        assert Sharding.from_json(sc["sharding"]) == sharding_for_grid(scale_grid(sc))
    s1 = info["scales"][1]
    sh = Sharding.from_json(s1["sharding"])
    ids = chunk_ids(*coords.T, s1)
    assert set(sh.shard_of(ids).tolist()) == {4073} and sh.shard_filename(4073) == "0fe9.shard"
    (lo, hi), = sh.shard_ranges(4073, scale_grid(s1))
    assert ((ids >= lo) & (ids < hi)).all() and hi - lo == 2**15
    x, y, z = morton_decode(np.array([lo, hi - 1], np.uint64), scale_grid(s1))
    assert (64 * x[0], 64 * y[0], 64 * z[0]) == (30720, 24576, 28672)  # DVID's file name
    assert (x[1] - x[0], y[1] - y[0], z[1] - z[0]) == (31, 31, 31)  # a 32³-chunk box


def test_mcns_real_shard_voxel_exact_in_both_readers(tmp_path, mcns):
    """The 258 real blocks as bodies, in the real spec's shard 0fe9 of scale 1, read chunk by
    chunk with tensorstore and cloud-volume against decode_block + the labels."""
    from cloudvolume import CloudVolume

    blocks, labels, coords, spec = mcns
    info = complete_info(spec)
    (tmp_path / "info").write_text(json.dumps(info))
    written = write_scale(tmp_path, info["scales"][1], blocks, coords, labels)
    assert written == {"0fe9.shard": 258}
    st = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/", "scale_index": 1}
    ).result()
    cv = CloudVolume(f"file://{tmp_path}", mip=1, fill_missing=False, progress=False, cache=False)
    shapes = chunk_shapes(*coords.T, info["scales"][1])
    reads = []
    for r in range(len(blocks)):
        o = 64 * coords[r]
        e = o + shapes[r]
        reads.append(st[o[0] : e[0], o[1] : e[1], o[2] : e[2], 0].read())
    for r, fut in enumerate(reads):
        _sv, body = split_block(blocks[r].as_py())
        want = decode_block(join_block(labels[r].values.to_numpy(), body))
        assert np.array_equal(np.asarray(fut.result()).T, want), f"tensorstore chunk {coords[r]}"
    for r in range(0, len(blocks), 5):  # cloud-volume is slow per cutout: every 5th chunk
        o = 64 * coords[r]
        _sv, body = split_block(blocks[r].as_py())
        want = decode_block(join_block(labels[r].values.to_numpy(), body))
        got = np.asarray(cv[o[0] : o[0] + 64, o[1] : o[1] + 64, o[2] : o[2] + 64])[..., 0].T
        assert np.array_equal(got, want), f"cloud-volume chunk {coords[r]}"


# ------------------------------------------------------------------------------- hashing ---


def test_murmurhash_placement_matches_tensorstore(tmp_path):
    """tensorstore writes a murmurhash3_x86_128-sharded volume; every chunk it wrote is in
    the shard file our shard_of names and in the minishard our minishard_of names
    (read_shard checks the latter), and no chunk is missing."""
    sh = Sharding(2, 2, 3, "murmurhash3_x86_128", "gzip", "gzip")
    info = {
        "@type": "neuroglancer_multiscale_volume", "type": "segmentation", "data_type": "uint64",
        "num_channels": 1,
        "scales": [{
            "key": "s0", "size": [300, 200, 70], "resolution": [8, 8, 8], "voxel_offset": [0, 0, 0],
            "chunk_sizes": [[32, 32, 32]], "encoding": "compressed_segmentation",
            "compressed_segmentation_block_size": [8, 8, 8], "sharding": sh.to_json(),
        }],
    }
    (tmp_path / "info").write_text(json.dumps(info))
    st = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/"}).result()
    st[..., 0].write(np.random.default_rng(0).integers(1, 4, (300, 200, 70)).astype(np.uint64)).result()
    found = {}
    for name in os.listdir(tmp_path / "s0"):
        chunks = read_shard((tmp_path / "s0" / name).read_bytes(), sh)
        shard = int(name.split(".")[0], 16)
        assert name == sh.shard_filename(shard)
        ids = np.array(sorted(chunks), np.uint64)
        assert (sh.shard_of(ids) == shard).all()
        found.update(dict.fromkeys(ids.tolist(), shard))
    g = scale_grid(info["scales"][0])
    xs, ys, zs = np.meshgrid(*(np.arange(n) for n in g), indexing="ij")
    assert sorted(found) == sorted(chunk_ids(xs.ravel(), ys.ravel(), zs.ravel(), info["scales"][0]).tolist())
    assert len(set(found.values())) > 4  # the hash spreads chunks over the shards


def test_murmurhash_properties():
    keys = np.array([0, 1, 2, 2**32, 2**64 - 1], np.uint64)
    h = murmurhash3_x86_128(keys)
    assert h.dtype == np.uint64 and h.shape == (5,) and len(set(h.tolist())) == 5
    assert int(murmurhash3_x86_128(7)) == int(murmurhash3_x86_128(np.array([7], np.uint64))[0])
    # a different key in the high word changes the hash (both halves are mixed in)
    assert murmurhash3_x86_128(2**40) != murmurhash3_x86_128(0)


# ------------------------------------------------------------------------ sharding rules ---


def test_sharding_spec_validation():
    good = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": 9,
            "minishard_bits": 6, "shard_bits": 19}
    s = Sharding.from_json(good)
    assert (s.data_encoding, s.minishard_index_encoding) == ("raw", "raw")  # the format's default
    assert s.index_size == 1024 and Sharding.from_json(s.to_json()) == s
    for bad, msg in [
        ({**good, "@type": "x"}, "'@type' must be"),
        ({k: v for k, v in good.items() if k != "hash"}, "'hash' is required"),
        ({**good, "hash": "md5"}, "hash 'md5' is not supported"),
        ({**good, "data_encoding": "zstd"}, "data_encoding 'zstd' is not supported"),
        ({**good, "minishard_bits": -1}, "'minishard_bits' must be an integer in 0..32"),
        ({**good, "shard_bits": 1.5}, "'shard_bits' must be an integer"),
        ({**good, "shard_bits": 60}, "minishard_bits \\+ shard_bits = 66 > 64"),
    ]:
        with pytest.raises(ShardFormatError, match=msg):
            Sharding.from_json(bad)


def test_shard_numbers_ranges_and_names():
    grid = (5, 3, 9)
    sh = sharding_for_grid(grid, preshift_bits=2, minishard_bits=1)
    assert (sh.preshift_bits, sh.minishard_bits, sh.shard_bits) == (2, 1, 6)  # 3+2+4 = 9 bits
    xs, ys, zs = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    ids = morton_encode(xs.ravel(), ys.ravel(), zs.ravel(), grid)
    for s in np.unique(sh.shard_of(ids)).tolist():
        (lo, hi), = sh.shard_ranges(s, grid)
        mine = ids[sh.shard_of(ids) == s]
        assert ((mine >= lo) & (mine < hi)).all()
        assert not ((ids[sh.shard_of(ids) != s] >= lo) & (ids[sh.shard_of(ids) != s] < hi)).any()
    few = Sharding(2, 1, 2)  # too few shard bits: chunks 2^5 apart alias onto one shard
    ranges = few.shard_ranges(1, grid)
    assert ranges == [(8, 16), (40, 48), (72, 80), (104, 112), (136, 144), (168, 176), (200, 208), (232, 240), (264, 272), (296, 304), (328, 336), (360, 368), (392, 400), (424, 432), (456, 464), (488, 496)]
    assert all(int(few.shard_of(lo)) == 1 for lo, _ in ranges)
    assert Sharding(0, 0, 19).shard_filename(4073) == "00fe9.shard"
    assert Sharding(0, 0, 0).shard_filename(0) == "0.shard"  # no padding, one digit
    with pytest.raises(ShardFormatError, match="scattered"):
        Sharding(0, 0, 3, "murmurhash3_x86_128").shard_ranges(0, grid)


def test_chunk_ids_and_shapes():
    scale = {"size": [150, 100, 70], "chunk_sizes": [[64, 64, 64]]}
    assert scale_grid(scale) == (3, 2, 2)
    x, y, z = np.array([0, 2, 2, 1]), np.array([0, 1, 0, 1]), np.array([0, 1, 1, 3])
    assert chunk_ids(x, y, z, scale).tolist() == morton_encode(x, y, z, (3, 2, 2)).tolist()
    assert chunk_shapes(x, y, z, scale).tolist() == [[64, 64, 64], [22, 36, 6], [22, 64, 6], [64, 36, -122]]
    assert chunk_filename(2, 1, 1, {**scale, "voxel_offset": [0, 0, 0]}) == "128-150_64-100_64-70"


# ------------------------------------------------------------------------- writer contract ---


def test_writer_streams_into_a_file_object_at_its_position():
    """The shard starts where the file object stands (reserved index, data, minishard
    indices, index filled by seeking back); bytes equal shard_bytes'; read_shard recovers
    every payload."""
    sh = Sharding(1, 2, 0, "identity", "gzip", "gzip")
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(200, 40, replace=False)).astype(np.uint64)
    payloads = [rng.bytes(int(rng.integers(0, 300))) for _ in ids]
    bio = io.BytesIO()
    bio.write(b"prefix")
    w = ShardWriter(bio, sh)
    w.add_many(ids[:10], payloads[:10])
    data = b"".join(payloads[10:])
    offs = np.concatenate(([0], np.cumsum([len(p) for p in payloads[10:]])))
    w.add_many(ids[10:], data, offs)  # the contiguous-buffer form
    size = w.finish()
    got = bio.getvalue()
    assert got[:6] == b"prefix" and len(got) == 6 + size and bio.tell() == len(got)
    assert got[6:] == shard_bytes(ids[::-1], payloads[::-1], sh)  # sorted either way
    assert read_shard(got[6:], sh) == dict(zip(ids.tolist(), payloads, strict=True))


def test_writer_memory_is_bounded_by_the_index_not_the_data(tmp_path):
    """Streaming 16 MB of chunks into a real file allocates about the index (24 bytes a
    chunk) plus one chunk at a time, never the data."""
    import tracemalloc

    sh = Sharding(0, 3, 0, "identity", minishard_index_encoding="gzip", data_encoding="raw")
    n, size = 4000, 4096
    tracemalloc.start()
    with open(tmp_path / "0.shard", "wb") as f:
        w = ShardWriter(f, sh)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(n):
            w.add(i, i.to_bytes(4, "little") * (size // 4))
        w.finish()
        peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert (tmp_path / "0.shard").stat().st_size > n * size
    assert peak < 24 * 2 * n + 64 * size  # index arrays (grown by doubling) + a few chunks
    got = read_shard((tmp_path / "0.shard").read_bytes(), sh)
    assert len(got) == n and got[1234] == (1234).to_bytes(4, "little") * (size // 4)


def test_writer_refuses_what_readers_would_not_read():
    sh = Sharding(0, 1, 2)
    bio = io.BytesIO()
    w = ShardWriter(bio, sh)
    w.add(5, b"a")
    with pytest.raises(ValueError, match="chunk 3 after chunk 5: chunks must arrive in increasing"):
        w.add(3, b"b")
    with pytest.raises(ValueError, match="chunk 5 after chunk 5"):
        w.add(5, b"b")
    w2 = ShardWriter(io.BytesIO(), sh, any_order=True)
    w2.add(5, b"a")
    w2.add(3, b"b")
    w2.add(5, b"c")
    with pytest.raises(ValueError, match="chunk 5 was written twice"):
        w2.finish()
    w3 = ShardWriter(io.BytesIO(), sh, shard=1)
    with pytest.raises(ValueError, match="chunk 1 belongs to shard 0, not 1"):
        w3.add(1, b"x")

    class Pipe(io.RawIOBase):
        def writable(self):
            return True

    with pytest.raises(ValueError, match="needs a seekable file"):
        ShardWriter(Pipe(), sh)
    w.finish()
    with pytest.raises(ValueError, match="finish\\(\\) was already called"):
        w.add(9, b"z")


def test_out_of_order_shard_has_wrapped_deltas_and_reads(tmp_path):
    """any_order=True: data in arrival order, index sorted by id, a negative offset delta
    stored as two's complement — read_shard (and tensorstore/cloud-volume in the volume
    test) decode it."""
    sh = Sharding(0, 0, 0)
    bio = io.BytesIO()
    w = ShardWriter(bio, sh, any_order=True)
    w.add(9, b"nine")
    w.add(2, b"two")
    w.finish()
    data = bio.getvalue()
    table = np.frombuffer(data[16 + 7 :], "<u8").reshape(3, 2)
    assert table[0].tolist() == [2, 7] and table[2].tolist() == [3, 4]
    assert table[1].tolist() == [4, 2**64 - 7]  # chunk 9 starts 7 bytes before chunk 2 ends
    assert read_shard(data, sh) == {2: b"two", 9: b"nine"}


# --------------------------------------------------------------- read_shard finds tampering ---


def _good_shard():
    sh = Sharding(0, 2, 0, "identity", "raw", "raw")
    ids = np.arange(0, 12, dtype=np.uint64)
    return sh, shard_bytes(ids, [bytes([i]) * (i + 1) for i in range(12)], sh)


def test_read_shard_reports_exactly_what_was_tampered():
    sh, data = _good_shard()
    assert len(read_shard(data, sh)) == 12
    cases = []
    cases.append((data[:40], "shard: 40 bytes, shorter than its 64-byte shard index"))
    t = bytearray(data)
    t[16:24] = (10**6).to_bytes(8, "little")  # minishard 1's index start
    cases.append((bytes(t), "minishard 1 index byte range [1000064, "))
    t = bytearray(data)
    end = int.from_bytes(data[8:16], "little")
    t[8:16] = (end - 1).to_bytes(8, "little")  # minishard 0's index one byte short
    cases.append((bytes(t), "minishard 0 index is 71 bytes, not a multiple of 24"))
    t = bytearray(data)
    start0 = 64 + int.from_bytes(data[0:8], "little")
    t[start0 : start0 + 8] = (1).to_bytes(8, "little")  # first id of minishard 0 → chunk 1
    cases.append((bytes(t), "chunk 1 is listed in minishard 0, but hashes to minishard 1"))
    t = bytearray(data)
    n0 = (int.from_bytes(data[8:16], "little") - int.from_bytes(data[0:8], "little")) // 24
    size_at = start0 + 16 * n0
    t[size_at : size_at + 8] = (10**9).to_bytes(8, "little")  # chunk 0's size
    cases.append((bytes(t), "chunk 0 byte range [64, 1000000064) outside the file"))
    for bad, msg in cases:
        with pytest.raises(ShardFormatError) as exc:
            read_shard(bad, sh)
        assert msg in str(exc.value)
    gz = Sharding(0, 0, 0, "identity", "gzip", "gzip")
    good = shard_bytes([1], [b"abc"], gz)
    bad = bytearray(good)
    bad[16 + 1] ^= 0xFF  # inside the gzip'ed chunk
    with pytest.raises(ShardFormatError, match="shard: chunk 1: gzip"):
        read_shard(bytes(bad), gz)


# ---------------------------------------------------------------------------------- info ---


def test_complete_info_defaults_and_refusals(mcns):
    _b, _l, _c, spec = mcns
    info = complete_info(spec)
    assert "batch_size" not in info and info["@type"] == "neuroglancer_multiscale_volume"
    assert [s["key"] for s in info["scales"]] == [s["key"] for s in spec["scales"]]
    assert all(s["voxel_offset"] == [0, 0, 0] for s in info["scales"])
    # given encodings are kept
    raw = json.loads(json.dumps(spec))
    raw["scales"][0]["sharding"]["minishard_index_encoding"] = "raw"
    raw["scales"][0]["sharding"]["data_encoding"] = "raw"
    assert complete_info(raw)["scales"][0]["sharding"]["data_encoding"] == "raw"
    # an unsharded scale stays unsharded (chunk files), everything else completed
    bare = complete_info({"scales": [{"size": [10, 20, 30], "resolution": [4, 4, 40]}]})
    assert bare["scales"][0] == {
        "key": "4x4x40", "size": [10, 20, 30], "resolution": [4, 4, 40], "voxel_offset": [0, 0, 0],
        "chunk_sizes": [[64, 64, 64]], "encoding": "compressed_segmentation",
        "compressed_segmentation_block_size": [8, 8, 8],
    }
    s0 = dict(spec["scales"][0])
    for change, msg in [
        ({"data_type": "uint32"}, "data_type must be 'uint64'"),
        ({"type": "image"}, "type must be 'segmentation'"),
        ({"scales": []}, "'scales' must be a non-empty list"),
        ({"scales": [{**s0, "encoding": "raw"}]}, "scales\\[0\\].encoding must be 'compressed_segmentation'"),
        ({"scales": [{**s0, "compressed_segmentation_block_size": [16, 16, 16]}]}, "must be \\[8, 8, 8\\]"),
        ({"scales": [{**s0, "chunk_sizes": [[64, 64, 64], [32, 32, 32]]}]}, "exactly one chunk size"),
        ({"scales": [{**s0, "voxel_offset": [1, 0, 0]}]}, "multiple of the chunk size"),
        ({"scales": [{**s0, "size": [1, 2]}]}, "scales\\[0\\].size must be 3 positive integers"),
        ({"scales": [s0, s0]}, "scales\\[1\\].key must be a unique"),
        ({"scales": [{**s0, "sharding": {**s0["sharding"], "hash": "md5"}}]}, "scales\\[0\\].sharding: hash 'md5'"),
    ]:
        with pytest.raises(ShardFormatError, match=msg):
            complete_info({**spec, **change})


def test_derive_info_reproduces_the_mcns_sharding(mcns):
    _b, _l, _c, spec = mcns
    scales = [
        ScaleInfo(scale=i, block_size=(64, 64, 64), grid=scale_grid(s), voxel_max=tuple(s["size"]))
        for i, s in enumerate(complete_info(spec)["scales"])
    ]
    info = derive_info(scales, (8, 8, 8))
    assert [s["key"] for s in info["scales"]] == [s["key"] for s in spec["scales"]]
    for got, want in zip(info["scales"], spec["scales"], strict=True):
        assert got["size"] == want["size"]
        w = {**want["sharding"], "data_encoding": "gzip"}
        assert Sharding.from_json(got["sharding"]) == Sharding.from_json(w)


def test_unsharded_scale_chunk_files_read_in_tensorstore(tmp_path):
    """complete_info keeps an unsharded scale; chunk_filename names its chunk files."""
    rng = np.random.default_rng(8)
    blocks, coords, want = synthetic_scale(rng, (100, 64, 65))
    info = complete_info({"scales": [{"size": [100, 64, 65], "resolution": [8, 8, 8]}]})
    (tmp_path / "info").write_text(json.dumps(info))
    sc = info["scales"][0]
    out = encode_chunks(blocks, [block_labels_mapped(b) for b in blocks], chunk_shapes(*coords.T, sc))
    (tmp_path / sc["key"]).mkdir()
    for r, (x, y, z) in enumerate(coords.tolist()):
        if not out.background[r]:
            (tmp_path / sc["key"] / chunk_filename(x, y, z, sc)).write_bytes(out[r])
    assert np.array_equal(read_ts(tmp_path, 0), want)
