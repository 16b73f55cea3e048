"""DVID block → neuroglancer compressed_segmentation (``dvidetl.codec.cseg``), checked against
the ``compressed-segmentation`` package (PyPI, the C++ encoder neuroglancer's tools use) as an
independent oracle: our chunk decodes with it to ``decode_block``'s voxels mapped through the
labels and clipped to the chunk shape, voxel for voxel, and is byte-identical to what its
encoder writes for those voxels. On the real DVID blocks in ../shared/data (Go's encoder, a
/blocks stream, the 258 libdvid-cpp blocks of the mCNS export-shards file with their
supervoxel → body labels), on blocks from an independent packer (hypothesis), on clipped edge
shapes, palettes with duplicates and unused entries, and every bit width."""

from __future__ import annotations

import gzip
import itertools

import compressed_segmentation as cs
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.codec import (
    BlockFormatError,
    decode_block,
    encode_block,
    join_block,
    split_block,
)
from dvidetl.codec import _cseg_kernels as CK
from dvidetl.codec.cseg import CsegChunks, decode_chunk, encode_chunk, encode_chunks, is_background
from dvidetl.testing.blocks import pack_block

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- the oracle ---


def mapped_voxels(block: bytes, labels=None) -> np.ndarray:
    """decode_block's voxels with every table entry replaced by its label (z, y, x)."""
    if labels is None:
        return decode_block(block)
    _sv, body = split_block(block)
    return decode_block(join_block(np.asarray(labels, np.uint64), body))


def oracle_encode(vol: np.ndarray, shape=None) -> bytes:
    """compressed-segmentation's encoding of vol[:z, :y, :x] (shape = x, y, z)."""
    if shape is not None:
        vol = vol[: shape[2], : shape[1], : shape[0]]
    return cs.compress(np.asfortranarray(np.ascontiguousarray(vol).T), order="F")


def oracle_decode(data: bytes, shape) -> np.ndarray:
    """compressed-segmentation's decoding of a chunk of shape (x, y, z), as (z, y, x)."""
    return cs.decompress(data, tuple(int(s) for s in shape), np.uint64, order="F").T


def assert_chunk(data: bytes, block: bytes, labels=None, shape=None) -> None:
    vol = mapped_voxels(block, labels)
    if shape is None:
        shape = vol.shape[::-1]
    want = vol[: shape[2], : shape[1], : shape[0]]
    got = oracle_decode(data, shape)
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{int((got != want).sum())} voxels differ"
    assert data == oracle_encode(vol, shape)


def headers(data: bytes, shape) -> np.ndarray:
    """(n_blocks, 2) header words of a single-channel chunk: [table offset | bits << 24, values]."""
    w = np.frombuffer(data, "<u4")
    assert w[0] == 1  # the channel offset table: one channel, starting at word 1
    nb = int(np.prod([-(-s // 8) for s in shape]))
    return w[1 : 1 + 2 * nb].reshape(nb, 2)


def bits_of(data: bytes, shape) -> np.ndarray:
    return headers(data, shape)[:, 0] >> 24


# ---------------------------------------------------------------------------- real blocks ---


@pytest.fixture(scope="module")
def mcns(mcns_shard) -> pa.Table:
    return mcns_shard


def test_go_blocks_and_raw_samples(shared_data, fib19_block, stream_block):
    """Go's MakeBlock bytes, the /blocks stream block (non-first-occurrence table) and our
    encoder's blocks of the raw fib19/cx volumes."""
    blocks = [fib19_block, stream_block]
    for name in ("fib19-64x64x64-sample2.dat.gz", "cx-64x64x64-sample1.dat.gz", "cx-64x64x64-sample2.dat.gz"):
        raw = gzip.decompress((shared_data / "dvid" / name).read_bytes())
        blocks.append(encode_block(np.frombuffer(raw, "<u8").reshape(64, 64, 64)))
    out = encode_chunks(blocks)
    assert out.n_errors == 0
    for r, b in enumerate(blocks):
        assert_chunk(out[r], b)
        assert encode_chunk(b) == out[r]


def test_mcns_shard_all_blocks_mapped_and_unmapped(mcns):
    """All 258 real blocks, as supervoxels and as bodies through their aligned labels lists
    (70 rows hold duplicate bodies: the deduplicated palettes must still decode exactly)."""
    blocks = mcns.column("block").combine_chunks()
    labels = mcns.column("labels").combine_chunks()
    sv = encode_chunks(blocks)
    body = encode_chunks(blocks, labels)
    assert sv.n_errors == 0 and body.n_errors == 0
    n_smaller = 0
    for r in range(len(blocks)):
        b = blocks[r].as_py()
        lab = labels[r].values.to_numpy()
        assert_chunk(sv[r], b)
        assert_chunk(body[r], b, lab)
        n_smaller += len(body[r]) < len(sv[r])
    # mapping merges supervoxels: some chunks must shrink (dedup), none may grow
    assert n_smaller > 0
    assert int(np.diff(body.offsets).sum()) < int(np.diff(sv.offsets).sum())
    assert not sv.background.any() and not body.background.any()


def test_mcns_real_edge_shapes(mcns):
    """Real blocks clipped on every axis at once (sizes 1, 7, 9, 63 and mixed), in one batch."""
    blocks = mcns.column("block").combine_chunks()
    labels = mcns.column("labels").combine_chunks()
    sizes = [1, 7, 9, 63]
    shapes = [(sizes[r % 4], sizes[(r // 4) % 4], sizes[(r // 16) % 4]) for r in range(len(blocks))]
    out = encode_chunks(blocks, labels, shapes)
    assert out.n_errors == 0
    for r in range(len(blocks)):
        assert_chunk(out[r], blocks[r].as_py(), labels[r].values.to_numpy(), shapes[r])


def test_every_edge_shape_of_a_real_block(fib19_block):
    """Every combination of 1, 7, 8, 9, 63, 64 per axis: the cseg grid is ceil(size / 8) per
    axis and the last blocks hold only the in-volume voxels."""
    sizes = [1, 7, 8, 9, 63, 64]
    shapes = list(itertools.product(sizes, repeat=3))
    out = encode_chunks([fib19_block] * len(shapes), shapes=shapes)
    assert out.n_errors == 0
    for r, shp in enumerate(shapes):
        assert_chunk(out[r], fib19_block, shape=shp)
        assert len(headers(out[r], shp)) == np.prod([-(-s // 8) for s in shp])


def test_full_chunk_in_a_partial_slot_decodes_wrong(fib19_block):
    """Why shapes matter: the whole 64³ chunk read as a 9x64x64 edge chunk does not decode to
    the block's voxels (the oracle sees a different block grid) — our clipped chunk does."""
    vol = decode_block(fib19_block)
    whole = encode_chunk(fib19_block)
    wrong = oracle_decode(whole, (9, 64, 64))
    assert not np.array_equal(wrong, vol[:, :, :9])
    assert np.array_equal(oracle_decode(encode_chunk(fib19_block, shape=(9, 64, 64)), (9, 64, 64)), vol[:, :, :9])


# ---------------------------------------------------------------- palettes and bit widths ---


def test_dedup_of_mapped_palette_narrows_bits():
    """A sub-block with 3 supervoxels (DVID 2 bits) whose labels merge two of them into one
    body is a 2-value table: 1 bit. Duplicate table entries and unused ones (a dead 0) too."""
    table = [10, 11, 12, 11, 0, 99]  # 11 twice; 0 and 99 referenced by no palette
    rng = np.random.default_rng(1)
    local = rng.integers(0, 3, 512)
    subs = [([0, 1, 3], local), ([2], np.zeros(512, int))]  # palette uses both 11 entries
    blk = pack_block((2, 1, 1), table, subs)
    plain = encode_chunk(blk)
    assert bits_of(plain, (16, 8, 8)).tolist() == [1, 0]  # 10, 11, 11 → 2 distinct: 1 bit
    assert_chunk(plain, blk)
    merged = [7, 5, 7, 5, 0, 0]  # 10 and 12 → body 7, 11 → body 5
    out = encode_chunk(blk, merged)
    assert bits_of(out, (16, 8, 8)).tolist() == [1, 0]
    assert_chunk(out, blk, merged)
    one = [7, 7, 3, 7, 0, 0]  # the whole first sub-block → 7: 0 bits
    out = encode_chunk(blk, one)
    assert bits_of(out, (16, 8, 8)).tolist() == [0, 0]
    assert_chunk(out, blk, one)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 100, 256, 257, 400, 512])
def test_every_dvid_width_to_cseg_width(k):
    """Palette sizes over every DVID width 0..9 land on cseg widths 0/1/2/4/8/16 (32 needs
    > 65,536 values and cannot come from a 512-voxel sub-block)."""
    rng = np.random.default_rng(k)
    n_table = max(k, 1) + 2
    table = rng.permutation(np.arange(1, n_table + 1, dtype=np.uint64)) * np.uint64(2**40 + 3)
    pal = list(rng.permutation(n_table)[: k])
    local = np.arange(512) % max(k, 1)  # every palette entry used
    blk = pack_block((1, 1, 1), table, [(pal, rng.permutation(local))])
    out = encode_chunk(blk)
    want = {0: 0, 1: 0, 2: 1}.get(k) if k <= 2 else int(CK.cseg_bits(k))
    assert bits_of(out, (8, 8, 8)).tolist() == [want]
    assert_chunk(out, blk)
    if k >= 2:  # a mapping that merges everything into two bodies: 1 bit
        lab = np.where(np.arange(n_table) % 2 == 0, 5, 6).astype(np.uint64)
        if len({int(lab[p]) for p in pal}) == 2:
            out = encode_chunk(blk, lab)
            assert bits_of(out, (8, 8, 8)).tolist() == [1]
            assert_chunk(out, blk, lab)


def test_cseg_width_boundaries():
    got = [int(CK.cseg_bits(u)) for u in (1, 2, 3, 4, 5, 16, 17, 256, 257, 65536, 65537)]
    assert got == [0, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32]


def test_one_bit_fast_path_both_orders():
    """Two-value sub-blocks re-pack by bit reversal; the sorted table may swap the two values
    (the larger label first in the palette), which inverts the bits."""
    rng = np.random.default_rng(4)
    local = rng.integers(0, 2, 512)
    for table in ([3, 9], [9, 3], [2**64 - 1, 0]):
        blk = pack_block((1, 1, 1), table, [([0, 1], local)])
        out = encode_chunk(blk)
        assert bits_of(out, (8, 8, 8)).tolist() == [1]
        assert_chunk(out, blk)
        for shp in ((8, 8, 7), (1, 8, 8), (5, 3, 2)):  # partial: the general path
            assert_chunk(encode_chunk(blk, shape=shp), blk, shape=shp)


def test_two_bit_word_path_every_used_subset_and_mapping():
    """Full sub-blocks of 2-4 palette entries are transcoded word by word (``_used_words``,
    ``_pack2_words``: no voxel unpacking). Every subset of the local values in use, and
    mappings that keep, permute and merge the labels (cseg 2, 1 and 0 bits), equal the
    reference encoder byte for byte; a 2-bit value past a 3-entry palette is the same error
    as on the per-voxel path (a clipped chunk of the same block)."""
    rng = np.random.default_rng(11)
    table = np.array([40, 10, 30, 20, 10], np.uint64)  # 10 twice: a palette may repeat a label
    n = 0
    for c in (2, 3, 4):
        for used in itertools.chain.from_iterable(itertools.combinations(range(c), k) for k in range(1, c + 1)):
            local = rng.choice(np.array(used), 512)
            local[: len(used)] = used  # each value in the subset occurs
            pal = list(rng.permutation(5)[:c])
            blk = pack_block((2, 1, 1), table, [(pal, local), (pal, rng.permutation(local))])
            for labels in (None, [1, 2, 3, 4, 2], [9, 9, 5, 5, 9], [4, 3, 2, 1, 3], [0, 0, 0, 0, 0], [2**64 - 1, 0, 7, 0, 0]):
                out = encode_chunk(blk, labels)
                assert_chunk(out, blk, labels)
                n += 1
    assert n == 6 * (3 + 7 + 15)
    bad = np.zeros(512, int)
    bad[77] = 3  # value 3 of a 3-entry palette
    blk = pack_block((1, 1, 1), [1, 2, 3], [([0, 1, 2], bad)])
    full = encode_chunks([blk], None, [(8, 8, 8)])
    clipped = encode_chunks([blk], None, [(8, 8, 7)])
    assert full.n_errors == clipped.n_errors == 1 and full.errors == clipped.errors
    assert "3" in full.errors[0]


def test_tables_shared_within_a_chunk():
    """Equal tables are written once per chunk (as the reference encoder does): a chunk of
    identical two-label sub-blocks holds one table."""
    rng = np.random.default_rng(5)
    subs = [([0, 1], rng.integers(0, 2, 512)) for _ in range(8)]
    blk = pack_block((2, 2, 2), [4, 8], subs)
    out = encode_chunk(blk)
    h = headers(out, (16, 16, 16))
    assert len(set((h[:, 0] & 0xFFFFFF).tolist())) == 1
    assert len(out) == 4 * (1 + 2 * 8 + 8 * 16 + 2 * 2)
    assert_chunk(out, blk)


def test_ns0_and_solid_blocks():
    rng = np.random.default_rng(6)
    subs = [([], None), ([1], None), ([0, 2], rng.integers(0, 2, 512)), ([], None)]
    blk = pack_block((2, 2, 1), [5, 6, 7], subs)
    assert_chunk(encode_chunk(blk), blk)
    assert_chunk(encode_chunk(blk, [0, 1, 1], shape=(9, 16, 3)), blk, [0, 1, 1], (9, 16, 3))
    solid = encode_block(np.full((64, 64, 64), 12345, np.uint64))
    assert len(solid) == 24
    for shp in (None, (64, 64, 64), (1, 2, 3), (63, 9, 17)):
        assert_chunk(encode_chunk(solid, shape=shp), solid, shape=shp)
    assert_chunk(encode_chunk(solid, [77]), solid, [77])


# ------------------------------------------------------------------------------ background ---


def test_background_detection():
    zero = encode_block(np.zeros((64, 64, 64), np.uint64))
    assert is_background(zero)
    vol = np.zeros((64, 64, 64), np.uint64)
    vol[60, 3, 62] = 9
    blk = encode_block(vol)
    assert not is_background(blk)
    assert is_background(blk, shape=(62, 64, 64))  # the label lies outside the chunk
    assert is_background(blk, shape=(64, 64, 60))
    assert not is_background(blk, shape=(63, 4, 61))
    labels = np.zeros(len(np.frombuffer(blk, "<u8", count=int(np.frombuffer(blk, "<u4", 1, 12)[0]), offset=16)), np.uint64)
    assert is_background(blk, labels)  # everything maps to body 0
    out = encode_chunks([zero, blk, blk], [[0], labels, labels + np.uint64(1)])
    assert out.background.tolist() == [True, True, False]
    # a background chunk still encodes correctly (a sink may choose to write it)
    assert_chunk(out[0], zero, [0])


# ------------------------------------------------------------------------------ hypothesis ---


def _random_block(rng, grid):
    """A valid block from the independent packer: any palette order, repeats, Ns == 0,
    duplicate and unused table entries, every width."""
    gx, gy, gz = grid
    n_table = int(rng.integers(1, 700))
    table = rng.integers(0, 2**64, n_table, dtype=np.uint64, endpoint=False)
    if n_table > 2:
        table[rng.integers(0, n_table)] = table[0]
    if rng.random() < 0.4:
        table[-1] = 0
    subs = []
    for _ in range(gx * gy * gz):
        k = int(rng.choice([0, 1, 1, 2, 2, 3, 4, 5, 9, 17, 60, 200, 512])) if n_table > 1 else 1
        pal = list(rng.integers(0, n_table, k))
        mode = rng.integers(0, 3)
        if k < 2:
            local = None
        elif mode == 0:
            local = rng.integers(0, k, 512)
        elif mode == 1:
            local = np.repeat(rng.integers(0, k, 512), rng.integers(1, 60, 512))[:512]
        else:
            local = np.sort(rng.integers(0, k, 512))
        subs.append((pal, local))
    if n_table == 1:  # a one-label table is the 24-byte solid form (DVID writes no other)
        return np.array([gx, gy, gz, 1], "<u4").tobytes() + table.astype("<u8").tobytes(), n_table
    return pack_block(grid, table, subs), n_table


@settings(max_examples=80, **SETTINGS)
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**32 - 1),
    mapping=st.sampled_from(["none", "pool", "zero-heavy", "distinct"]),
    clip=st.booleans(),
)
def test_any_valid_block_any_mapping_any_shape(grid, seed, mapping, clip):
    rng = np.random.default_rng(seed)
    blocks, labels, shapes = [], [], []
    for _ in range(3):
        blk, n = _random_block(rng, grid)
        blocks.append(blk)
        if mapping == "pool":  # many supervoxels → few bodies: dedup
            labels.append(rng.integers(1, 6, n).astype(np.uint64))
        elif mapping == "zero-heavy":
            labels.append(np.where(rng.random(n) < 0.7, 0, rng.integers(1, 2**63, n)).astype(np.uint64))
        else:
            labels.append(rng.permutation(2**40 + np.arange(n, dtype=np.uint64)))
        full = [8 * g for g in grid]
        shapes.append([int(rng.integers(1, f + 1)) for f in full] if clip else full)
    lab = None if mapping == "none" else pa.array(labels, pa.list_(pa.uint64()))
    out = encode_chunks(pa.array(blocks, pa.binary()), lab, shapes)
    assert out.n_errors == 0, out.errors
    for r, blk in enumerate(blocks):
        lr = None if lab is None else labels[r]
        assert_chunk(out[r], blk, lr, shapes[r])
        vol = mapped_voxels(blk, lr)
        sh = shapes[r]
        assert out.background[r] == (not vol[: sh[2], : sh[1], : sh[0]].any())


# ---------------------------------------------------------------------- the checker itself ---


def test_oracle_comparison_finds_a_tampered_voxel(fib19_block):
    """The comparison the tests rely on does detect damage: flipping one bit of one encoded
    value changes exactly the voxels that use it, and assert_chunk fails."""
    data = bytearray(encode_chunk(fib19_block))
    h = headers(bytes(data), (64, 64, 64))
    k = int(np.flatnonzero((h[:, 0] >> 24) == 1)[0])  # a 1-bit block
    vword = 1 + int(h[k, 1])
    data[4 * vword] ^= 1  # voxel 0 of that block takes the other value
    got = oracle_decode(bytes(data), (64, 64, 64))
    vol = decode_block(fib19_block)
    assert int((got != vol).sum()) == 1
    with pytest.raises(AssertionError):
        assert_chunk(bytes(data), fib19_block)


# ------------------------------------------------------------------- batches and bad input ---


def test_bad_rows_are_reported_and_neighbours_encode(fib19_block, stream_block):
    n = int(np.frombuffer(fib19_block, "<u4", 1, 12)[0])
    bad_local = bytearray(pack_block((1, 1, 1), [1, 2, 3], [([0, 1, 2], np.zeros(512, int))]))
    bad_local[-1] |= 3  # the last 2-bit value becomes 3 >= Ns = 3
    rows = [fib19_block, fib19_block[:-5], bytes(bad_local), stream_block, fib19_block, None]
    labels = [np.arange(n, dtype=np.uint64), None, [1, 2, 3], None, np.arange(n - 1, dtype=np.uint64), None]
    m = int(np.frombuffer(stream_block, "<u4", 1, 12)[0])
    labels[1] = np.zeros(n, np.uint64)
    labels[3] = np.ones(m, np.uint64)
    labels[5] = [0]
    out = encode_chunks(
        pa.array(rows, pa.binary()),
        pa.array(labels, pa.list_(pa.uint64())),
        [(64, 64, 64), (64, 64, 64), (8, 8, 8), (64, 64, 65), (64, 64, 64), (64, 64, 64)],
    )
    e = out.errors
    assert e[0] is None and e[1].startswith("block: truncated values")
    with pytest.raises(BlockFormatError) as dec_err:  # the block codec's own words
        decode_block(bytes(bad_local))
    assert e[2] == str(dec_err.value) == "block: value 3 >= palette size 3 in sub-block 0 at byte 181"
    assert e[3] == "chunk shape 64x64x65 is larger than the block (each axis must be 1..64x64x64)"
    assert e[4] == f"labels: {n - 1} labels given for a block table of N={n} entries (they must be aligned one to one)"
    assert e[5] == "null block or labels"
    assert out.n_errors == 5 and out.ok.tolist() == [True, False, False, False, False, False]
    assert np.diff(out.offsets).tolist()[1:] == [0] * 5
    assert_chunk(out[0], fib19_block, np.arange(n, dtype=np.uint64))
    arr = out.to_arrow()
    assert arr.null_count == 5 and arr[0].as_py() == out[0] and arr[1].as_py() is None
    with pytest.raises(BlockFormatError, match="truncated values"):
        encode_chunk(fib19_block[:-5])
    with pytest.raises(ValueError, match="outside the volume"):
        encode_chunk(fib19_block, shape=(0, 64, 64))
    with pytest.raises(ValueError, match="labels given"):
        encode_chunk(fib19_block, [1, 2])
    with pytest.raises(TypeError, match="list<uint64>"):
        encode_chunks([fib19_block], pa.array([[1]], pa.list_(pa.int64())))


def test_clipped_chunk_still_validates_the_whole_block():
    """A corrupt value in a sub-block outside the chunk shape is still a corrupt block (the
    export's other sinks refuse it): same reason as label_voxel_counts, not a silent edge
    chunk (found by the fuzzer)."""
    from dvidetl.codec import label_voxel_counts

    rng = np.random.default_rng(9)
    subs = [([0, 1, 2], rng.integers(0, 3, 512)) for _ in range(4)]
    blk = bytearray(pack_block((2, 2, 1), [1, 2, 3], subs))
    blk[-1] |= 3  # the last value of sub-block 3 (x 8..15, y 8..15) becomes 3 >= Ns
    blk = bytes(blk)
    with pytest.raises(BlockFormatError) as want:
        label_voxel_counts(blk)
    for shape in [(8, 16, 8), (16, 8, 8), (3, 3, 3), (16, 16, 8)]:
        out = encode_chunks([blk], shapes=[shape])
        assert out.errors == [str(want.value)], shape


def test_arrow_inputs_sliced_large_chunked(mcns):
    """Sliced arrays (non-zero offsets), large_binary / large_list and chunked arrays give
    the same chunks as the plain batch."""
    blocks = mcns.column("block").combine_chunks()
    labels = mcns.column("labels").combine_chunks()
    ref = encode_chunks(blocks, labels)
    sl = encode_chunks(blocks.slice(17, 40), labels.slice(17, 40))
    assert [sl[r] for r in range(40)] == [ref[17 + r] for r in range(40)]
    large = encode_chunks(blocks.cast(pa.large_binary()), labels.cast(pa.large_list(pa.uint64())))
    assert large.data.tobytes() == ref.data.tobytes()
    chunked = encode_chunks(pa.chunked_array([blocks.slice(0, 100), blocks.slice(100)]),
                            pa.chunked_array([labels.slice(0, 100), labels.slice(100)]))
    assert chunked.data.tobytes() == ref.data.tobytes()
    assert isinstance(ref, CsegChunks) and len(ref) == len(blocks)
    empty = encode_chunks(pa.array([], pa.binary()))
    assert len(empty) == 0 and empty.offsets.tolist() == [0]


# ------------------------------------------------------------------- decode_chunk (verify) ---


@pytest.mark.parametrize("shape", [(64, 64, 64), (9, 64, 64), (1, 1, 1), (63, 7, 17), (8, 16, 33)])
@pytest.mark.parametrize("labels", [1, 2, 3, 17, 300, 70_000])
def test_decode_chunk_reads_what_the_reference_encoder_wrote(shape, labels):
    """``decode_chunk`` (verify's reader) against chunks written by compressed-segmentation
    (not by our encoder), every bit width 0..32 and clipped shapes; ids >= 2**63 too."""
    rng = np.random.default_rng(labels * 1000 + sum(shape))
    table = rng.integers(0, 2**64 - 1, labels, dtype=np.uint64, endpoint=True)
    x, y, z = shape
    vol = table[rng.integers(0, labels, (z, y, x))]
    assert np.array_equal(decode_chunk(oracle_encode(vol), shape), vol)


def test_decode_chunk_of_our_encoder_on_real_blocks(fib19_block, mcns_shard):
    for block, labels in [(fib19_block, None), *[(mcns_shard.column("block")[i].as_py(),
                                                  mcns_shard.column("labels")[i].as_py()) for i in (0, 57, 200)]]:
        for shape in [(64, 64, 64), (5, 64, 30)]:
            want = mapped_voxels(block, labels)[: shape[2], : shape[1], : shape[0]]
            assert np.array_equal(decode_chunk(encode_chunk(block, labels, shape), shape), want)


@pytest.mark.parametrize("damage, why", [
    (lambda w: w[:1], "ends before its channel offset or block headers"),
    (lambda w: np.concatenate([[0], w[1:]]), "ends before its channel offset"),
    (lambda w: _set(w, 2, 0xFFFFFF), "header points outside the chunk"),  # values offset
    (lambda w: _set(w, 1, (w[1] & 0xFFFFFF) | (3 << 24)), "bit width 3"),  # table offset | bits
    (lambda w: w[:-2], "past its lookup table"),
])
def test_decode_chunk_says_what_is_wrong(fib19_block, damage, why):
    from dvidetl.codec import BlockFormatError

    words = np.frombuffer(encode_chunk(fib19_block), "<u4").copy()
    with pytest.raises(BlockFormatError, match=why):
        decode_chunk(damage(words).astype("<u4").tobytes(), (64, 64, 64))
    with pytest.raises(BlockFormatError, match="not whole 32-bit words"):
        decode_chunk(encode_chunk(fib19_block)[:-1], (64, 64, 64))


def _set(w: np.ndarray, i: int, v: int) -> np.ndarray:
    w = w.copy()
    w[i] = v
    return w
