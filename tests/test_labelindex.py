"""LabelIndex protobuf and block keys (dvid-formats §5.5)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvidetl.codec.labelindex import (
    LabelIndex,
    decode_block_key,
    decode_label_index,
    encode_block_key,
    encode_label_index,
    label_index_rows,
    label_index_table,
)


def test_block_key_examples():
    assert encode_block_key(1, 2, 3) == 0xC0000400001
    assert encode_block_key(-1, 0, 0) == 0x100001
    x, y, z = decode_block_key(np.array([0xC0000400001, 0x100001], dtype=np.uint64))
    assert x.tolist() == [1, -1] and y.tolist() == [2, 0] and z.tolist() == [3, 0]
    keys = encode_block_key(np.array([1, -1, 0]), np.array([2, 0, -7]), np.array([3, 0, 1048575]))
    assert keys.dtype == np.uint64
    assert keys[2] == (1048575 << 42) | ((0x100000 | 7) << 21)


def test_block_key_out_of_range():
    with pytest.raises(ValueError, match="z coordinate"):
        encode_block_key(0, 0, 1 << 20)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(*(st.integers(-(2**20) + 1, 2**20 - 1) for _ in range(3))),
        min_size=1,
        max_size=50,
    )
)
def test_block_key_roundtrip_property(coords):
    c = np.array(coords, dtype=np.int64)
    keys = encode_block_key(c[:, 0], c[:, 1], c[:, 2])
    assert (keys >> np.uint64(63)).max() == 0  # bit 63 always clear
    x, y, z = decode_block_key(keys)
    assert np.array_equal(np.stack([x, y, z], 1), c)
    # scalar path agrees with the vector path
    assert encode_block_key(*coords[0]) == int(keys[0])


def test_roundtrip_and_map_compatibility():
    bc = np.array([[0, 0, 0], [5, -2, 3], [0, 0, 0], [5, -2, 3], [5, -2, 3]])
    svs = np.array([2**63 + 5, 7, 9, 7, 11], dtype=np.uint64)
    counts = np.array([10, 20, 30, 5, 1])
    data = encode_label_index(
        42, bc, svs, counts, last_mutid=9, last_mod_time="2026-01-01T00:00:00Z", last_mod_user="u"
    )
    # DVID's own (map-based) message class parses it identically
    msg = decode_label_index(data)
    assert msg.label == 42 and msg.last_mutid == 9 and msg.last_mod_user == "u"
    assert dict(msg.blocks[0].counts) == {2**63 + 5: 10, 9: 30}
    assert dict(msg.blocks[encode_block_key(5, -2, 3)].counts) == {7: 25, 11: 1}
    # the map serialization of the same content parses back to the same rows
    rows = label_index_rows(data)
    rows2 = label_index_rows(msg.SerializeToString(deterministic=True))
    for k in rows:
        assert np.array_equal(rows[k], rows2[k]), k
    assert rows["label"].tolist() == [42] * 4
    got = set(
        zip(
            rows["x"].tolist(),
            rows["y"].tolist(),
            rows["z"].tolist(),
            rows["supervoxel"].tolist(),
            rows["voxels"].tolist(),
            strict=True,
        )
    )
    assert got == {(0, 0, 0, 9, 30), (0, 0, 0, 2**63 + 5, 10), (5, -2, 3, 7, 25), (5, -2, 3, 11, 1)}
    assert rows["x"].dtype == np.int32 and rows["voxels"].dtype == np.uint32
    # equal input -> equal bytes (regardless of row order)
    perm = np.array([4, 2, 0, 3, 1])
    again = encode_label_index(
        42,
        bc[perm],
        svs[perm],
        counts[perm],
        last_mutid=9,
        last_mod_time="2026-01-01T00:00:00Z",
        last_mod_user="u",
    )
    assert again == data


def test_zero_key_and_empty():
    data = encode_label_index(3, np.zeros((0, 3)), [], [])
    assert label_index_rows(data)["label"].size == 0
    m = LabelIndex(label=3)
    m.blocks[0].counts[5] = 1  # key 0 = block (0,0,0) must survive
    m.blocks[7].counts[6] = 0
    ours = encode_label_index(3, [[7, 0, 0], [0, 0, 0]], [6, 5], [0, 1])
    # same entries, same bytes (map entries always carry key and value, even when 0)
    assert sorted(ours) == sorted(m.SerializeToString())
    assert len(ours) == len(m.SerializeToString())
    r = label_index_rows(ours)
    assert r["x"].tolist() == [0, 7] and r["voxels"].tolist() == [1, 0]


def test_errors():
    with pytest.raises(ValueError, match="same length"):
        encode_label_index(1, [[0, 0, 0]], [1, 2], [1])
    with pytest.raises(ValueError, match="uint32"):
        encode_label_index(1, [[0, 0, 0]], [1], [2**32])
    with pytest.raises(ValueError, match="not a LabelIndex"):
        label_index_rows(b"\xff\xff\xff\xff")
    data = encode_label_index(5, [[0, 0, 0]], [1], [1])
    with pytest.raises(ValueError, match="carries label field 5"):
        label_index_rows(data, label=6)


def test_table_batch():
    d1 = encode_label_index(10, [[1, 2, 3], [1, 2, 4]], [100, 101], [5, 6])
    d2 = encode_label_index(2**63 + 1, [[-1, 0, 0]], [2**63 + 1], [7])
    labels = pa.array([10, 11, 2**63 + 1], pa.uint64())
    datas = pa.array([d1, b"", d2], pa.binary())
    t = label_index_table(labels, datas)
    assert t.schema.names == ["label", "supervoxel", "x", "y", "z", "voxels"]
    assert [f.type for f in t.schema] == [
        pa.uint64(),
        pa.uint64(),
        pa.int32(),
        pa.int32(),
        pa.int32(),
        pa.uint32(),
    ]
    assert t.column("label").to_pylist() == [10, 10, 2**63 + 1]
    assert t.column("z").to_pylist() == [3, 4, 0]
    assert t.column("x").to_pylist() == [1, 1, -1]
    assert t.column("voxels").to_pylist() == [5, 6, 7]
    empty = label_index_table(pa.array([], pa.uint64()), pa.array([], pa.binary()))
    assert empty.num_rows == 0 and empty.schema == t.schema
    with pytest.raises(ValueError, match="2 labels but 1"):
        label_index_table([1, 2], [d1])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2**64 - 1),
    st.lists(
        st.tuples(
            st.integers(-300, 300),
            st.integers(-300, 300),
            st.integers(-300, 300),
            st.integers(0, 2**64 - 1),
            st.integers(1, 2**20),
        ),
        max_size=40,
    ),
)
def test_rows_roundtrip_property(label, rows):
    # unique (block, sv) so the expected rows are just the input set
    uniq = {(r[0], r[1], r[2], r[3]): r[4] for r in rows}
    bc = np.array([k[:3] for k in uniq], dtype=np.int64).reshape(-1, 3)
    svs = np.array([k[3] for k in uniq], dtype=np.uint64)
    cnt = np.array(list(uniq.values()), dtype=np.int64)
    data = encode_label_index(label, bc, svs, cnt)
    out = label_index_rows(data)
    got = {
        (x, y, z, s): v
        for x, y, z, s, v in zip(
            out["x"].tolist(),
            out["y"].tolist(),
            out["z"].tolist(),
            out["supervoxel"].tolist(),
            out["voxels"].tolist(),
            strict=True,
        )
    }
    assert got == uniq
    assert set(out["label"].tolist()) <= {label}
    # and DVID's map class agrees on the total
    msg = decode_label_index(data)
    assert sum(sum(v.counts.values()) for v in msg.blocks.values()) == int(cnt.sum())


def test_bulk_encoder_matches_single():
    from dvidetl.codec.labelindex import encode_label_indices

    rng = np.random.default_rng(3)
    n = 500
    labels = rng.integers(1, 40, n).astype(np.uint64)
    labels[:5] = 2**64 - 1
    bc = rng.integers(-3, 4, (n, 3))
    svs = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    counts = rng.integers(0, 2**32 - 1, n)
    labs, datas = encode_label_indices(labels, bc, svs, counts)
    assert labs.tolist() == sorted(set(labels.tolist()))
    for lab, data in zip(labs.tolist(), datas, strict=True):
        sel = labels == np.uint64(lab)
        assert data == encode_label_index(lab, bc[sel], svs[sel], counts[sel])
    with pytest.raises(ValueError, match="listed twice"):
        encode_label_indices([1, 1], [[0, 0, 0], [0, 0, 0]], [5, 5], [1, 2])
    assert encode_label_indices([], np.zeros((0, 3)), [], [])[1] == []
