"""Hypothesis properties of the block codec: random volumes round-trip, explicit table orders
are honoured, counts match voxels, split/join is the identity, and arbitrary *valid* blocks
built by an independent reference packer (any table/palette order, duplicates, unused
entries, Ns == 0 sub-blocks, odd grids) decode to what they say."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.codec import (
    block_labels,
    decode_block,
    encode_block,
    join_block,
    label_voxel_counts,
    repack,
    restore_block,
    split_block,
)
from dvidetl.testing.blocks import pack_block

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = ["solid", "two", "few", "sub512", "mixed", "100k", "huge", "zero-heavy"]
SHAPES = [(16, 16, 16), (32, 32, 32), (64, 64, 64), (8, 16, 24), (16, 8, 32)]


def _volume(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    n = nz * ny * nx
    if kind == "solid":
        lab = rng.choice(np.array([0, 1, 2**64 - 1, int(rng.integers(0, 2**63))], np.uint64))
        return np.full(shape, lab, np.uint64)
    if kind == "two":
        a, b = rng.integers(0, 2**64, 2, dtype=np.uint64, endpoint=False)
        return np.where(rng.random(shape) < rng.random(), a, b).astype(np.uint64)
    if kind == "few":
        pool = rng.integers(0, 1000, int(rng.integers(2, 20)), dtype=np.uint64)
        return pool[rng.integers(0, len(pool), shape)]
    if kind == "sub512":
        # every 8x8x8 sub-block holds 512 distinct labels (9 bits everywhere)
        return rng.permutation(np.arange(n, dtype=np.uint64) + np.uint64(rng.integers(0, 2**40))).reshape(shape)
    if kind == "mixed":
        vol = np.empty(shape, np.uint64)
        for z in range(0, nz, 8):
            for y in range(0, ny, 8):
                for x in range(0, nx, 8):
                    k = int(rng.choice([1, 2, 3, 5, 17, 100, 257, 512]))
                    pool = rng.integers(0, 5000, k, dtype=np.uint64)
                    vol[z : z + 8, y : y + 8, x : x + 8] = pool[rng.integers(0, k, (8, 8, 8))]
        return vol
    if kind == "100k":
        return rng.integers(0, 2**62, n, dtype=np.uint64).reshape(shape)
    if kind == "huge":
        pool = np.uint64(2**64 - 1) - rng.integers(0, 300, 300, dtype=np.uint64)
        return pool[rng.integers(0, 300, shape)]
    # zero-heavy: mostly 0 with sparse labels
    vol = np.zeros(shape, np.uint64)
    m = rng.random(shape) < 0.05
    vol[m] = rng.integers(1, 50, int(m.sum()), dtype=np.uint64)
    return vol


def _by_label(labels: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for lab, c in zip(labels.tolist(), counts.tolist(), strict=True):
        out[lab] = out.get(lab, 0) + c
    return {k: v for k, v in out.items() if v}


@settings(max_examples=60, **SETTINGS)
@given(kind=st.sampled_from(KINDS), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_random_volumes(kind, shape, seed):
    vol = _volume(kind, shape, seed)
    blk = encode_block(vol)
    dec = decode_block(blk)
    assert dec.shape == vol.shape and np.array_equal(dec, vol)
    labels = block_labels(blk)
    u, c = np.unique(vol, return_counts=True)
    assert sorted(labels.tolist()) == u.tolist()  # default table: each label once
    assert _by_label(labels, label_voxel_counts(blk)) == dict(zip(u.tolist(), c.tolist(), strict=True))
    lab, body = split_block(blk)
    assert join_block(lab, body) == blk
    if len(u) == 1:
        assert len(blk) == 24


@settings(max_examples=40, **SETTINGS)
@given(kind=st.sampled_from(KINDS), shape=st.sampled_from(SHAPES[:2] + SHAPES[3:]), seed=st.integers(0, 2**32 - 1))
def test_label_order_is_the_table(kind, shape, seed):
    vol = _volume(kind, shape, seed)
    rng = np.random.default_rng(seed + 1)
    u = np.unique(vol)
    extra = rng.integers(0, 2**64, 3, dtype=np.uint64, endpoint=False)
    order = np.concatenate([rng.permutation(u), extra, u[: rng.integers(0, len(u) + 1)]])
    order = rng.permutation(order) if rng.random() < 0.5 else order
    blk = encode_block(vol, label_order=order)
    assert np.array_equal(block_labels(blk), order)
    assert np.array_equal(decode_block(blk), vol)
    counts = label_voxel_counts(blk)
    assert int(counts.sum()) == vol.size
    # duplicates: only the first occurrence of a label is referenced
    first = {}
    for i, v in enumerate(order.tolist()):
        first.setdefault(v, i)
    assert all(c == 0 for i, c in enumerate(counts.tolist()) if first[int(order[i])] != i)


def _ref_block(rng, grid, n_table):
    """An arbitrary valid block from an independent Python packer, and its voxels."""
    gx, gy, gz = grid
    table = rng.integers(0, 2**64, n_table, dtype=np.uint64, endpoint=False)
    if n_table > 2 and rng.random() < 0.5:
        table[rng.integers(0, n_table)] = table[0]  # a duplicate
    if rng.random() < 0.3:
        table[-1] = 0  # a dead 0 entry (maybe unreferenced)
    nsb = gx * gy * gz
    ns, pals, vals = [], [], []
    out = np.zeros((gz, gy, gx, 8, 8, 8), np.uint64)
    i = 0
    for sz in range(gz):
        for sy in range(gy):
            for sx in range(gx):
                k = int(rng.choice([0, 1, 1, 2, 3, 4, 7, 9, 33, 200, 512]))
                pal = rng.integers(0, n_table, k)  # any order, repeats allowed
                ns.append(k)
                pals.append(pal)
                if k >= 2:
                    b = (k - 1).bit_length()
                    local = rng.integers(0, k, 512)
                    bits = ((local[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8)
                    vals.append(np.packbits(bits.reshape(-1)).tobytes())
                    out[sz, sy, sx] = table[pal[local]].reshape(8, 8, 8)
                elif k == 1:
                    out[sz, sy, sx] = table[pal[0]]
                i += 1
    assert i == nsb
    blk = (
        np.array([gx, gy, gz, n_table], "<u4").tobytes()
        + table.astype("<u8").tobytes()
        + np.array(ns, "<u2").tobytes()
        + np.concatenate(pals).astype("<u4").tobytes()
        + b"".join(vals)
    )
    vol = out.transpose(0, 3, 1, 4, 2, 5).reshape(8 * gz, 8 * gy, 8 * gx)
    return blk, vol, table


@settings(max_examples=50, **SETTINGS)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    n_table=st.integers(2, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_any_valid_block(grid, n_table, seed):
    rng = np.random.default_rng(seed)
    blk, vol, table = _ref_block(rng, grid, n_table)
    assert np.array_equal(decode_block(blk), vol)
    counts = label_voxel_counts(blk)
    assert counts.shape == (n_table,)
    nz_counts = _by_label(table, counts)
    u, c = np.unique(vol, return_counts=True)
    expect = dict(zip(u.tolist(), c.tolist(), strict=True))
    # voxels of Ns == 0 sub-blocks are label 0 without a table entry: not counted
    for lab, cnt in nz_counts.items():
        assert expect[lab] >= cnt
    assert sum(nz_counts.values()) + int(expect.get(0, 0) - nz_counts.get(0, 0)) == vol.size
    assert join_block(*split_block(blk)) == blk
    # our encoder with the same table reproduces the voxels
    assert np.array_equal(decode_block(encode_block(vol, label_order=np.append(table, np.uint64(0)))), vol)
    r = repack(pa.array([blk]), "none")
    assert r.n_errors == 0 and restore_block(r.supervoxels[0].values.to_numpy(), r.payload[0].as_py()) == blk
    assert r.sv_voxels[0].values.to_numpy().tolist() == counts.tolist()


def test_128_cube_roundtrip():
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 3000, (128, 128, 128)).astype(np.uint64)
    vol[:64] = 5
    blk = encode_block(vol)
    assert blk[:12] == np.array([16, 16, 16], "<u4").tobytes()
    assert np.array_equal(decode_block(blk), vol)
    assert int(label_voxel_counts(blk).sum()) == 128**3


def _local_values(rng, k: int, mode: int) -> np.ndarray:
    if mode == 0:  # uniform
        return rng.integers(0, k, 512)
    if mode == 1:  # a single value (the largest valid one, or 0)
        return np.full(512, int(rng.choice([0, k - 1])), np.int64)
    if mode == 2:  # runs of random length
        return np.repeat(rng.integers(0, k, 512), rng.integers(1, 40, 512))[:512]
    return np.where(rng.random(512) < 0.9, k - 1, rng.integers(0, k, 512))  # skewed


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), mode=st.integers(0, 3))
def test_counts_every_width_exact(seed, mode):
    """label_voxel_counts per table entry equals the counts of the packed local values, and
    matches np.unique over decode_block, for sub-blocks of every width 1..9 (several palette
    sizes per width, uniform / constant / run / skewed values)."""
    rng = np.random.default_rng(seed)
    ks = [2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 31, 32, 33, 64, 65, 100, 128, 129, 255, 256, 257, 400, 512]
    n_table = 700
    table = rng.permutation(np.arange(1, n_table + 1, dtype=np.uint64) * np.uint64(7919))
    subs, expect = [], np.zeros(n_table, np.int64)
    for k in ks:
        pal = rng.integers(0, n_table, k)
        local = _local_values(rng, k, mode)
        subs.append((pal.tolist(), local))
        np.add.at(expect, pal[local], 1)
    blk = pack_block((len(ks), 1, 1), table, subs)
    counts = label_voxel_counts(blk)
    assert counts.tolist() == expect.tolist()
    u, c = np.unique(decode_block(blk), return_counts=True)
    assert _by_label(table, counts) == dict(zip(u.tolist(), c.tolist(), strict=True))


@settings(max_examples=40, **SETTINGS)
@given(k=st.sampled_from([3, 5, 6, 7, 9, 13, 17, 40, 65, 100, 129, 200, 257, 511]), seed=st.integers(0, 2**32 - 1))
def test_counts_reject_local_value_past_palette_every_width(k, seed):
    """A local value >= Ns is reported with the same message and offset as the decoder's
    row-by-row check, whatever the width (the 3-bit path tallies values it does not check)."""
    from dvidetl.codec import BlockFormatError

    rng = np.random.default_rng(seed)
    b = (k - 1).bit_length()
    local = rng.integers(0, k, 512)
    pos = int(rng.integers(0, 512))
    bad = int(rng.integers(k, 1 << b))
    local[pos] = bad
    if rng.random() < 0.5:
        local[pos + 1 :] = np.minimum(local[pos + 1 :], k - 1)  # first bad value is at pos
    else:
        local[pos + 1 :] = rng.integers(0, 1 << b, 511 - pos)  # later bad values too
    subs = [([0], None), (list(rng.integers(0, 4, 2)), rng.integers(0, 2, 512)), (list(rng.integers(0, 4, k)), local)]
    blk = pack_block((3, 1, 1), [10, 20, 30, 40], subs)
    with pytest.raises(BlockFormatError, match=f"value {bad} >= palette size {k} in sub-block 2") as ei:
        label_voxel_counts(blk)
    with pytest.raises(BlockFormatError) as ed:
        decode_block(blk)
    assert str(ei.value) == str(ed.value)
    vstart = 16 + 8 * 4 + 2 * 3 + 4 * (1 + 2 + k) + 64
    assert ei.value.offset == vstart + (pos * b) // 8
