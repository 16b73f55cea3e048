"""The block codec against real DVID bytes (Go's MakeBlock output, a /blocks stream, and the
libdvid-cpp-encoded male-CNS shard), read in place from ../shared/data."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dvidetl.codec import (
    BlockFormatError,
    block_labels,
    decode_block,
    encode_block,
    join_block,
    label_voxel_counts,
    split_block,
)

RAW_VOLUMES = [
    "fib19-64x64x64-sample1.dat.gz",
    "fib19-64x64x64-sample2.dat.gz",
    "cx-64x64x64-sample1.dat.gz",
    "cx-64x64x64-sample2.dat.gz",
]


def _raw(shared_data, name):
    data = gzip.decompress((shared_data / "dvid" / name).read_bytes())
    return np.frombuffer(data, "<u8").reshape(64, 64, 64)


@pytest.fixture(scope="module")
def mcns(mcns_shard):
    assert mcns_shard.num_rows == 258
    return mcns_shard, mcns_shard.column("block").to_pylist()


def _bincount_by_label(labels: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for lab, c in zip(labels.tolist(), counts.tolist(), strict=True):
        out[lab] = out.get(lab, 0) + c
    return out


def test_fib19_decode_equals_raw(shared_data, fib19_block):
    vol = _raw(shared_data, "fib19-64x64x64-sample1.dat.gz")
    dec = decode_block(fib19_block)
    assert dec.dtype == np.uint64 and dec.shape == (64, 64, 64)
    assert np.array_equal(dec, vol)


def test_fib19_encode_is_go_bytes(shared_data, fib19_block):
    vol = _raw(shared_data, "fib19-64x64x64-sample1.dat.gz")
    assert len(fib19_block) == 22512
    assert encode_block(vol) == fib19_block
    assert block_labels(fib19_block).shape == (18,)


def test_stream_block_reproduced_with_label_order(stream_block):
    assert len(stream_block) == 152672
    labels = block_labels(stream_block)
    assert labels.tolist() == [6, 5, 8, 9, 1, 7, 4, 3, 0, 2]
    vol = decode_block(stream_block)
    assert encode_block(vol, label_order=labels) == stream_block
    # without the order: first-occurrence table, different bytes, same voxels
    mine = encode_block(vol)
    assert block_labels(mine).tolist() == [5, 8, 9, 0, 1, 7, 4, 3, 6, 2]
    assert mine != stream_block and np.array_equal(decode_block(mine), vol)


@pytest.mark.parametrize("name", RAW_VOLUMES)
def test_raw_volumes_roundtrip(shared_data, name):
    vol = _raw(shared_data, name)
    blk = encode_block(vol)
    assert np.array_equal(decode_block(blk), vol)
    counts = label_voxel_counts(blk)
    u, c = np.unique(vol, return_counts=True)
    assert _bincount_by_label(block_labels(blk), counts) == dict(zip(u.tolist(), c.tolist(), strict=True))
    assert join_block(*split_block(blk)) == blk


def test_mcns_all_blocks(mcns):
    t, blocks = mcns
    svs = t.column("supervoxels").to_pylist()
    sizes = t.column("uncompressed_size").to_pylist()
    for i, b in enumerate(blocks):
        assert len(b) == sizes[i]
        labels = block_labels(b)
        assert labels.tolist() == svs[i]
        vol = decode_block(b)
        assert vol.shape == (64, 64, 64)
        counts = label_voxel_counts(b)
        assert counts.shape == labels.shape and int(counts.sum()) == 64**3
        u, c = np.unique(vol, return_counts=True)
        assert _bincount_by_label(labels, counts) == dict(zip(u.tolist(), c.tolist(), strict=True)), i
        # libdvid-cpp wrote these (sorted palettes); our encoder with its table must give
        # a block that decodes to the same voxels, with the same table
        e = encode_block(vol, label_order=labels)
        assert np.array_equal(block_labels(e), labels)
        assert np.array_equal(decode_block(e), vol)
        lab, body = split_block(b)
        assert body == b[:16] + b[16 + 8 * len(lab) :]
        assert join_block(lab, body) == b


def test_block_labels_is_a_view(fib19_block):
    labels = block_labels(fib19_block)
    assert not labels.flags.owndata and labels.base is not None
    assert labels.tolist() == list(struct.unpack_from("<18Q", fib19_block, 16))


def test_worked_example_16cube():
    """docs/dvid-formats.md §1.8: a 16³ block with a 2x2x2 sub-block grid, 292 bytes."""
    vol = np.zeros((16, 16, 16), np.uint64)
    vol[0:8, 0:8, 0:4] = 7
    vol[0:8, 0:8, 10:13] = 3
    vol[0:8, 0:8, 13:16] = 7
    blk = encode_block(vol)
    assert len(blk) == 292
    assert blk[:16] == struct.pack("<4I", 2, 2, 2, 3)
    assert block_labels(blk).tolist() == [7, 0, 3]
    assert blk[0x64:0xA4] == b"\x0f" * 64
    assert blk[0xA4:0x124] == b"\x05\x6a" * 64
    assert np.array_equal(decode_block(blk), vol)
    assert label_voxel_counts(blk).tolist() == [256 + 192, 4096 - 448 - 192, 192]


def test_solid_and_empty_subblocks():
    vol = np.full((64, 64, 64), 2**64 - 1, np.uint64)
    blk = encode_block(vol)
    assert len(blk) == 24 and struct.unpack_from("<4IQ", blk) == (8, 8, 8, 1, 2**64 - 1)
    assert np.array_equal(decode_block(blk), vol)
    assert label_voxel_counts(blk).tolist() == [64**3]
    # Ns == 0 sub-blocks decode to 0; handmade: 16³, N=2, sub-block 0 has Ns=2, rest 0
    hdr = struct.pack("<4I", 2, 2, 2, 2) + struct.pack("<2Q", 5, 9)
    ns = struct.pack("<8H", 2, 0, 0, 0, 0, 0, 0, 0)
    pal = struct.pack("<2I", 1, 0)
    vals = b"\xaa" * 64  # local 1,0,1,0,... -> L[0], L[1] = 5, 9, 5, 9
    blk = hdr + ns + pal + vals
    dec = decode_block(blk)
    exp = np.zeros((16, 16, 16), np.uint64)
    exp[0:8, 0:8, 0:8] = np.where(np.arange(8) % 2 == 0, 5, 9)
    assert np.array_equal(dec, exp)
    assert label_voxel_counts(blk).tolist() == [256, 256]


def test_duplicates_and_unused_entries():
    vol = np.zeros((16, 16, 16), np.uint64)
    vol[:, :, 8:] = 42
    blk = encode_block(vol, label_order=[0, 42, 42, 0, 77])
    assert block_labels(blk).tolist() == [0, 42, 42, 0, 77]
    assert np.array_equal(decode_block(blk), vol)
    assert label_voxel_counts(blk).tolist() == [2048, 2048, 0, 0, 0]
    with pytest.raises(ValueError, match="label 42"):
        encode_block(vol, label_order=[0])


def test_encode_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_block(np.zeros((12, 16, 16), np.uint64))
    with pytest.raises(ValueError, match="3-d"):
        encode_block(np.zeros((16, 16), np.uint64))
    with pytest.raises(ValueError, match="negative"):
        encode_block(np.full((8, 8, 8), -1, np.int64))
    # other integer dtypes are accepted
    assert decode_block(encode_block(np.ones((8, 8, 8), np.uint8))).sum() == 512


def test_join_block_checks_n(fib19_block):
    labels, body = split_block(fib19_block)
    with pytest.raises(BlockFormatError, match="N=18"):
        join_block(labels[:-1], body)
