"""repack over whole Arrow arrays: every real mCNS block in every storage form, exact inverse
via restore_block, per-row errors that do not spoil neighbours."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import zstandard

from dvidetl.codec import (
    Repacked,
    block_labels,
    encode_block,
    label_voxel_counts,
    repack,
    restore_block,
    split_block,
    unwrap,
    wrap,
)


@pytest.fixture(scope="module")
def raws(shared_data) -> list[bytes]:
    t = ipc.open_stream(str(shared_data / "mcns-shard" / "30720_24576_28672.arrow")).read_all()
    return [unwrap(b, "zstd") for b in t.column("dvid_compressed_block").to_pylist()]


def _check_rows(r: Repacked, raws: list[bytes], rows) -> None:
    for i, b in zip(rows, raws, strict=True):
        assert r.errors[i].as_py() is None
        assert r.raw_size[i].as_py() == len(b)
        assert r.crc32[i].as_py() == zlib.crc32(b)
        svs = r.supervoxels[i].values.to_numpy()
        assert np.array_equal(svs, block_labels(b))
        assert np.array_equal(r.sv_voxels[i].values.to_numpy(), label_voxel_counts(b))
        z = r.payload[i].as_py()
        assert zstandard.ZstdDecompressor().decompress(z) == split_block(b)[1]
        assert restore_block(svs, z) == b


@pytest.mark.parametrize("codec", ["gzip", "dvid", "lz4", "zstd", "none", "dvid-lz4"])
def test_repack_all_mcns_blocks(raws, codec):
    wrapped = pa.array([wrap(b, codec) for b in raws], pa.binary())
    r = repack(wrapped, "dvid" if codec.startswith("dvid") else codec)
    assert len(r) == len(raws) and r.n_errors == 0
    assert r.supervoxels.type == pa.list_(pa.uint64())
    assert r.sv_voxels.type == pa.list_(pa.uint32())
    assert r.payload.type == pa.binary() and r.raw_size.type == pa.uint32()
    assert r.crc32.type == pa.uint32() and r.errors.type == pa.string()
    _check_rows(r, raws, range(len(raws)))


def test_repack_without_payload_is_the_same_but_the_payload(raws):
    """``payload=False`` (no sink of the partition stores payloads): no zstd frames, every
    other array identical, corrupt rows still found with the same reasons."""
    blocks = [wrap(b, "gzip") for b in raws[:12]]
    bad = bytearray(blocks[3])
    bad[len(bad) // 2] ^= 0xFF
    blocks[3] = bytes(bad)
    wrapped = pa.array(blocks, pa.binary())
    full = repack(wrapped, "gzip", keep_raw=True)
    lean = repack(wrapped, "gzip", keep_raw=True, payload=False)
    assert lean.payload is None and full.payload is not None
    assert lean.n_errors == full.n_errors == 1 and lean.errors.equals(full.errors)
    for f in ("supervoxels", "sv_voxels", "raw_size", "crc32", "raw"):
        assert getattr(lean, f).equals(getattr(full, f)), f
    assert lean.raw is not None and lean.raw[0].as_py() == raws[0]


def test_repack_large_binary_sliced_chunked(raws):
    wrapped = pa.array([wrap(b, "gzip") for b in raws[:20]], pa.large_binary())
    r = repack(wrapped.slice(5, 10), "gzip")
    _check_rows(r, raws[5:15], range(10))
    ch = pa.chunked_array([wrapped.slice(0, 3), wrapped.slice(3, 4)])
    _check_rows(repack(ch, "gzip"), raws[:7], range(7))
    r0 = repack(pa.array([], pa.binary()), "gzip")
    assert len(r0) == 0 and len(r0.payload) == 0


def test_go_gzip_stream_block(shared_data):
    s = (shared_data / "dvid" / "stream_1block.dat").read_bytes()[16:]
    r = repack(pa.array([s, b"\x40" + s]), "gzip")
    assert r.errors.to_pylist() == [None, "gzip: bad magic 401f at byte 0"]
    raw = gzip.decompress(s)
    assert restore_block(r.supervoxels[0].values.to_numpy(), r.payload[0].as_py()) == raw
    assert r.crc32[0].as_py() == zlib.crc32(raw)
    r2 = repack(pa.array([b"\x40" + s]), "dvid")
    assert r2.n_errors == 0 and r2.crc32[0].as_py() == zlib.crc32(raw)


def test_bad_rows_do_not_spoil_neighbours(raws):
    good = raws[:4]
    trunc_gz = wrap(good[0], "gzip")[:-20]
    bad_idx = bytearray(good[1])
    # first palette entry -> index N (past the table)
    n = len(block_labels(good[1]))
    p = 16 + 8 * n + 2 * 512
    bad_idx[p : p + 4] = n.to_bytes(4, "little")
    rows = [
        wrap(good[0], "gzip"),
        trunc_gz,
        wrap(good[1], "gzip"),
        None,
        wrap(bytes(bad_idx), "gzip"),
        wrap(good[2] + b"xx", "gzip"),
        wrap(good[3], "gzip"),
        b"",
    ]
    r = repack(pa.array(rows, pa.binary()), "gzip")
    errs = r.errors.to_pylist()
    assert errs[0] is None and errs[2] is None and errs[6] is None
    assert errs[1].startswith("gzip: ")
    assert errs[3] == "null value"
    assert errs[4] == f"block: palette index {n} >= N={n} in sub-block 0 at byte {p}"
    assert errs[5].startswith("block: 2 trailing bytes")
    assert errs[7].startswith("gzip: truncated")
    for i in (1, 3, 4, 5, 7):
        for col in (r.supervoxels, r.sv_voxels, r.payload, r.raw_size, r.crc32):
            assert col[i].as_py() is None
    _check_rows(r, [good[0], good[1], good[3]], [0, 2, 6])


def test_repack_synthetic_dense_and_solid():
    rng = np.random.default_rng(7)
    dense = rng.integers(0, 2**63, size=3000, dtype=np.uint64)[rng.integers(0, 3000, (64, 64, 64))]
    blocks = [encode_block(dense), encode_block(np.zeros((64, 64, 64), np.uint64))]
    r = repack(pa.array(blocks), "none", zstd_level=1)
    assert r.n_errors == 0
    _check_rows(r, blocks, [0, 1])
    assert r.sv_voxels[1].as_py() == [64**3]


def test_repack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown codec"):
        repack(pa.array([b"x"]), "brotli")
    with pytest.raises(TypeError, match="binary"):
        repack(pa.array([1, 2]), "gzip")


def test_repack_and_restore_from_many_threads(raws):
    """Dask runs tasks in threads: repack / unwrap / restore_block from 4 threads at once give
    the serial bytes (zstandard contexts are not thread safe; a shared one corrupted frames)."""
    from concurrent.futures import ThreadPoolExecutor

    wrapped = {c: pa.array([wrap(b, c) for b in raws[:64]], pa.binary()) for c in ("gzip", "zstd")}
    serial = {c: repack(w, c).payload.to_pylist() for c, w in wrapped.items()}

    def work(i: int) -> bool:
        c = ("gzip", "zstd")[i % 2]
        r = repack(wrapped[c], c)
        if r.payload.to_pylist() != serial[c]:
            return False
        ok = all(unwrap(w, c) == b for w, b in zip(wrapped[c].to_pylist()[:16], raws, strict=False))
        svs = r.supervoxels.to_pylist()
        return ok and all(
            restore_block(np.asarray(svs[k], np.uint64), serial[c][k]) == raws[k] for k in range(len(svs))
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(24)))
