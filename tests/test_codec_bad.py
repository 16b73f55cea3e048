"""Malformed blocks: every truncation, wrong N, oversized palettes, indices past the table,
local values past the palette, trailing garbage, bad grids — always BlockFormatError (or a
per-row error in repack) naming what and where; never a crash, hang or wrong output.

The last test re-runs a corruption fuzz in a subprocess with NUMBA_BOUNDSCHECK=1, so any
out-of-bounds read in a numba kernel would surface as an IndexError instead of garbage."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.codec import (
    BlockFormatError,
    block_labels,
    decode_block,
    encode_block,
    label_voxel_counts,
    repack,
    split_block,
)


def _small_block() -> bytes:
    """16³, 2x2x2 sub-blocks, N=4, Ns = 2,3,1,5,1,1,1,1 (1, 2, 0, 3 bits)."""
    vol = np.zeros((16, 16, 16), np.uint64)
    vol[0:8, 0:8, 0:4] = 7
    vol[0:8, 0:8, 10:13] = 3
    vol[0:8, 0:8, 13:16] = 7
    vol[0:8, 8:16, 8:16] = np.arange(8 * 8 * 8).reshape(8, 8, 8) % 5 + 100
    return encode_block(vol)


SMALL = _small_block()


def _expect_error(blk: bytes, match: str | None = None) -> BlockFormatError:
    with pytest.raises(BlockFormatError, match=match) as ei:
        decode_block(blk)
    with pytest.raises(BlockFormatError, match=match):
        label_voxel_counts(blk)
    r = repack(pa.array([blk]), "none")
    assert r.errors[0].as_py() == str(ei.value)
    assert r.payload[0].as_py() is None
    return ei.value


def test_small_block_is_what_we_think():
    assert block_labels(SMALL).shape[0] > 4
    ns = np.frombuffer(SMALL, "<u2", 8, 16 + 8 * len(block_labels(SMALL)))
    assert ns.tolist() == [2, 3, 1, 5, 1, 1, 1, 1]
    assert decode_block(SMALL).shape == (16, 16, 16)


def test_truncated_at_every_offset():
    for blk in (SMALL, encode_block(np.full((16, 16, 16), 9, np.uint64))):
        prefixes = [blk[:k] for k in range(len(blk))]
        for k, p in enumerate(prefixes):
            err = _expect_error(p)
            assert err.offset is not None and err.offset <= k, (k, str(err))
        r = repack(pa.array(prefixes + [blk]), "none")
        assert r.n_errors == len(prefixes) and r.errors[len(prefixes)].as_py() is None
        assert r.supervoxels.null_count == len(prefixes)


def test_trailing_garbage():
    e = _expect_error(SMALL + b"\0", "1 trailing bytes")
    assert e.offset == len(SMALL)
    solid = encode_block(np.zeros((64, 64, 64), np.uint64))
    _expect_error(solid + b"junk", r"solid block \(N=1\) must be 24 bytes")


def _set_u32(blk: bytes, off: int, v: int) -> bytes:
    b = bytearray(blk)
    b[off : off + 4] = struct.pack("<I", v)
    return bytes(b)


def test_wrong_n():
    n = len(block_labels(SMALL))
    for bad_n in (n - 1, n + 1, 1, 2**32 - 1, 0):
        _expect_error(_set_u32(SMALL, 12, bad_n))
    _expect_error(_set_u32(SMALL, 12, 0), "N=0 at byte 12")
    _expect_error(_set_u32(SMALL, 12, 2**32 - 1), "truncated label table")


@pytest.mark.parametrize("field,value", [(0, 0), (4, 0), (8, 0), (0, 129), (8, 2**31)])
def test_bad_grid(field, value):
    _expect_error(_set_u32(SMALL, field, value), "bad sub-block grid")


def test_palette_size_too_big():
    n = len(block_labels(SMALL))
    p = 16 + 8 * n + 2 * 3
    b = bytearray(SMALL)
    b[p : p + 2] = struct.pack("<H", 513)
    e = _expect_error(bytes(b), f"palette size 513 > 512 in sub-block 3 at byte {p}")
    assert e.offset == p


def test_palette_index_past_table():
    n = len(block_labels(SMALL))
    pal0 = 16 + 8 * n + 16
    # the 6th palette entry belongs to sub-block 1 (sub-block 0 has 2 entries... 2+3=5 -> index 5 is sub-block 2)
    off = pal0 + 4 * 5
    e = _expect_error(_set_u32(SMALL, off, n), f"palette index {n} >= N={n} in sub-block 2 at byte {off}")
    assert e.offset == off


def test_local_value_past_palette():
    # sub-block 3 has Ns=5 (3 bits): a value of 7 is invalid
    n = len(block_labels(SMALL))
    ns = [2, 3, 1, 5, 1, 1, 1, 1]
    vstart = 16 + 8 * n + 16 + 4 * sum(ns) + 64 * (1 + 2)
    b = bytearray(SMALL)
    b[vstart + 30] = 0xFF
    e = _expect_error(bytes(b), "value 7 >= palette size 5 in sub-block 3")
    assert vstart + 30 <= e.offset <= vstart + 31


def test_wrong_types_are_clear():
    with pytest.raises(BlockFormatError, match="truncated header"):
        decode_block(b"")
    with pytest.raises(BlockFormatError, match="truncated header"):
        split_block(b"\1\2\3")
    with pytest.raises(BlockFormatError):
        block_labels(SMALL[:20])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(SMALL) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(SMALL) + 8)),
)
def test_corruption_never_crashes_or_lies(edits, cut):
    b = bytearray(SMALL)
    for off, v in edits:
        b[off] = v
    if cut is not None:
        b = b[:cut] if cut <= len(b) else b + bytes(cut - len(b))
    blk = bytes(b)
    try:
        vol = decode_block(blk)
    except BlockFormatError:
        with pytest.raises(BlockFormatError):
            label_voxel_counts(blk)
        assert repack(pa.array([blk]), "none").n_errors == 1
        return
    # accepted: it is a valid block, so everything agrees about it
    counts = label_voxel_counts(blk)
    labels = block_labels(blk)
    assert int(counts.sum()) <= vol.size
    got: dict[int, int] = {}
    for lab, c in zip(labels.tolist(), counts.tolist(), strict=True):
        got[lab] = got.get(lab, 0) + c
    u, c = np.unique(vol, return_counts=True)
    for lab, cnt in zip(u.tolist(), c.tolist(), strict=True):
        assert got.get(lab, 0) == cnt or (lab == 0 and got.get(0, 0) <= cnt)
    assert np.array_equal(decode_block(encode_block(vol)), vol)


FUZZ = textwrap.dedent(
    """
    import numpy as np, pyarrow as pa
    from dvidetl.codec import BlockFormatError, decode_block, label_voxel_counts, repack

    def pack(grid, table, subs):
        # a block from (palette, local values) per sub-block, by plain numpy (no encoder:
        # only the decoding kernels get compiled with bounds checks here)
        ns, pals, vals = [], [], []
        for pal, local in subs:
            ns.append(len(pal)); pals.extend(pal)
            if len(pal) >= 2:
                b = (len(pal) - 1).bit_length()
                bits = ((np.asarray(local)[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8)
                vals.append(np.packbits(bits.reshape(-1)).tobytes())
        return (np.array(list(grid) + [len(table)], "<u4").tobytes()
                + np.asarray(table, "<u8").tobytes() + np.array(ns, "<u2").tobytes()
                + np.array(pals, "<u4").tobytes() + b"".join(vals))

    rng = np.random.default_rng(11)
    subs = []
    for k in (0, 1, 2, 3, 5, 9, 17, 40, 200, 512):  # every width 0..9 once
        subs.append((list(rng.integers(0, 600, k)), rng.integers(0, max(k, 1), 512)))
    table = rng.integers(0, 2**63, 600, dtype=np.uint64)
    blocks = [pack((5, 2, 1), table, subs), pack((1, 1, 1), [7, 8], [([1, 0], rng.integers(0, 2, 512))]),
              pack((2, 1, 1), [4], [])[:24]]
    bad = []
    for base in blocks:
        decode_block(base); label_voxel_counts(base)
        for k in range(0, len(base), 5):
            bad.append(base[:k])
        for _ in range(300):
            b = bytearray(base)
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            bad.append(bytes(b))
    n_err = 0
    for b in bad:
        try:
            decode_block(b)
            label_voxel_counts(b)
        except BlockFormatError:
            n_err += 1
    r = repack(pa.array(bad), "none")
    assert r.n_errors == n_err, (r.n_errors, n_err)
    print("OK", len(bad), n_err)
    """
)


def test_kernels_never_read_out_of_bounds():
    """Numba compiled with bounds checking: an OOB index would raise IndexError here.
    The bounds-checked build has its own numba cache (in pytest's cache dir) so only the
    first run pays the compile."""
    # the same directory as tests/fuzz.py; works with pytest's cache plugin off (-p no:cacheprovider)
    cache = Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "numba-boundscheck"
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(cache))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-c", FUZZ], cwd=root, env=env, capture_output=True, text=True, timeout=540
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("OK")


def test_validate_blocks_matches_decode():
    from dvidetl.codec import validate_blocks

    rng = np.random.default_rng(5)
    blocks = [SMALL, SMALL[:-1], SMALL + b"x", b"", _set_u32(SMALL, 12, 0)]
    for _ in range(60):
        b = bytearray(SMALL)
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        blocks.append(bytes(b))
    expect = []
    for b in blocks:
        try:
            label_voxel_counts(b)
            expect.append(None)
        except BlockFormatError as exc:
            expect.append(str(exc))
    assert validate_blocks(blocks) == expect
    arr = pa.array(blocks + [None], pa.large_binary())
    assert validate_blocks(arr.slice(1)) == expect[1:] + ["null block"]
    assert expect[0] is None and expect[1] is not None


def test_huge_grid_is_refused_not_allocated():
    # a legal 24-byte solid block claiming a 128x128x128 sub-block grid (1024³ voxels)
    blk = struct.pack("<4IQ", 128, 128, 128, 1, 5)
    assert label_voxel_counts(blk).tolist() == [1024**3]
    with pytest.raises(BlockFormatError, match="too large to decode"):
        decode_block(blk)


def test_two_bit_value_three_with_three_entry_palette():
    # sub-block 1 of SMALL has Ns=3 (2 bits): the value 3 is invalid
    n = len(block_labels(SMALL))
    ns = [2, 3, 1, 5, 1, 1, 1, 1]
    vstart = 16 + 8 * n + 16 + 4 * sum(ns) + 64 * 1  # after sub-block 0's 1-bit values
    b = bytearray(SMALL)
    b[vstart + 10] = 0b00000011  # 4th value of that byte = 3
    e = _expect_error(bytes(b), "value 3 >= palette size 3 in sub-block 1")
    assert e.offset == vstart + 10
