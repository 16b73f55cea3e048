"""The partition transform over real codec output: repack -> map -> cut -> tables."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pyarrow as pa
import pytest

from dvidetl.codec import encode_block, restore_block, wrap
from dvidetl.export.transform import transform_blocks
from dvidetl.geometry import morton_encode
from dvidetl.tables import schema as S
from dvidetl.tables.cells import cut_blocks, reassemble

GRID = (8, 8, 8)


def transform_tables(batches, codec, mapper, *, run_id="r", cell_limit=S.DEFAULT_CELL_LIMIT, **kw):
    """``transform_blocks`` and the cut a tabular sink makes of its output: the tables."""
    data, st = transform_blocks(batches, codec, mapper, **kw)
    return cut_blocks(data, run_id, cell_limit), st


def _volume(rng, nlabels, base=1000):
    labels = rng.integers(0, nlabels, size=(64, 64, 64)).astype(np.uint64) + np.uint64(base)
    return labels


def _batch(blocks, coords):
    x, y, z = (np.array(c, np.int32) for c in zip(*coords, strict=True))
    m = morton_encode(x, y, z, GRID)
    return pa.record_batch(
        [pa.array(x), pa.array(y), pa.array(z), pa.array(m), pa.array(blocks, pa.binary())],
        names=["x", "y", "z", "morton", "data"],
    )


def test_transform_exact_and_mapping_one_call(shared_data):
    rng = np.random.default_rng(0)
    raw_fib = gzip.decompress((shared_data / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes())
    raws = [raw_fib, encode_block(_volume(rng, 3)), encode_block(np.zeros((64, 64, 64), np.uint64) + np.uint64(7))]
    coords = [(1, 0, 0), (0, 1, 0), (3, 3, 3)]
    calls = []

    def mapper(svs):
        calls.append(np.asarray(svs).copy())
        return np.asarray(svs, np.uint64) // np.uint64(2)

    b1 = _batch([wrap(r, "gzip") for r in raws[:2]], coords[:2])
    b2 = _batch([wrap(raws[2], "gzip")], coords[2:])
    tables, st = transform_tables([b1, b2], "gzip", mapper, scale=0, grid=GRID, lo=0, hi=512, run_id="r")
    assert len(calls) == 1, "mapping must be one call per group (these blocks are one group)"
    assert np.all(np.diff(calls[0].astype(np.int64)) > 0), "unique sorted supervoxels"
    blocks = tables["blocks"]
    assert blocks.schema == S.BLOCKS and blocks.num_rows == 3
    assert st.blocks == 3 and st.errors == 0 and tables["export_errors"].num_rows == 0
    r = reassemble(blocks, tables["block_overflow"])
    for i, raw in enumerate(raws):
        svs = np.asarray(r.column("supervoxels")[i].as_py(), np.uint64)
        assert restore_block(svs, r.column("payload")[i].as_py()) == raw
        assert r.column("crc32")[i].as_py() == zlib.crc32(raw)
        assert r.column("raw_size")[i].as_py() == len(raw)
        assert r.column("labels")[i].as_py() == (svs // np.uint64(2)).tolist()
        assert sum(r.column("sv_voxels")[i].as_py()) == 64**3


def test_transform_overflow_and_errors():
    rng = np.random.default_rng(1)
    dense = encode_block(_volume(rng, 20000))  # ~20k labels: list and body cells overflow
    ok = encode_block(_volume(rng, 2))
    bad = bytearray(wrap(ok, "gzip"))
    bad[len(bad) // 2] ^= 0xFF
    coords = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (5, 5, 5)]
    blocks = [wrap(dense, "gzip"), wrap(ok, "gzip"), bytes(bad), wrap(ok, "gzip")]
    b = _batch(blocks, coords)
    # block 4 claims a wrong morton code
    m = b.column("morton").to_numpy().copy()
    m[3] = 9
    b = b.set_column(3, "morton", pa.array(m))
    tables, st = transform_tables([b], "gzip", lambda s: s, scale=2, grid=GRID, lo=0, hi=512,
                                  run_id="run-x", cell_limit=16 * 1024)
    assert st.blocks == 2 and st.errors == 2
    err = tables["export_errors"]
    assert sorted(set(err.column("stage").to_pylist())) == ["repack", "validate"]
    assert set(err.column("run_id").to_pylist()) == {"run-x"}
    # original bytes kept, in cells within the limit
    got = b"".join(err.filter(pa.compute.equal(err.column("stage"), "repack")).column("data").to_pylist())
    assert got == bytes(bad)
    ov = tables["block_overflow"]
    assert set(ov.column("column").to_pylist()) >= {"supervoxels", "labels", "sv_voxels"}
    r = reassemble(tables["blocks"], ov)
    i = r.column("morton").to_pylist().index(0)
    assert restore_block(np.asarray(r.column("supervoxels")[i].as_py(), np.uint64), r.column("payload")[i].as_py()) == dense
    assert tables["blocks"].column("overflow").to_pylist()[i] is True


def test_transform_rejects_duplicates_and_out_of_range():
    ok = wrap(encode_block(np.ones((64, 64, 64), np.uint64)), "gzip")
    b = _batch([ok, ok], [(1, 0, 0), (1, 0, 0)])
    tables, st = transform_tables([b], "gzip", lambda s: s, scale=0, grid=GRID, lo=0, hi=512, run_id="r")
    assert st.blocks == 1 and tables["export_errors"].column("stage").to_pylist() == ["duplicate"]
    assert tables["export_errors"].column("reason").to_pylist() == ["block served twice in one partition"]
    tables, st = transform_tables([b], "gzip", lambda s: s, scale=0, grid=GRID, lo=2, hi=512, run_id="r")
    assert st.blocks == 0 and st.errors == 2


def test_transform_mapper_wrong_size_is_an_error():
    ok = wrap(encode_block(np.ones((64, 64, 64), np.uint64)), "gzip")
    with pytest.raises(ValueError, match="mapping returned"):
        transform_blocks([_batch([ok], [(0, 0, 0)])], "gzip", lambda s: np.zeros(5, np.uint64),
                         scale=0, grid=GRID, lo=0, hi=512)


def test_transform_in_groups_is_identical_and_bounded():
    """Groups of ``group_bytes`` bound the working set: the tables are the same as one group's
    (order, overflow, errors), a block repeated in a later group is still a duplicate, and
    the mapper runs once per group."""
    rng = np.random.default_rng(2)
    vols = [encode_block(_volume(rng, k)) for k in (3, 20000, 1, 400, 20000)]
    coords = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]
    batches = [_batch([wrap(v, "gzip")], [c]) for v, c in zip(vols, coords, strict=True)]
    batches.append(_batch([wrap(vols[1], "gzip")], [coords[1]]))  # served again, later group
    kw = dict(scale=0, grid=GRID, lo=0, hi=512, run_id="r", cell_limit=16 * 1024)
    whole, st1 = transform_tables(batches, "gzip", lambda s: s + np.uint64(1), **kw)
    calls = []

    def mapper(s):
        calls.append(len(s))
        return s + np.uint64(1)

    grouped, st2 = transform_tables(batches, "gzip", mapper, group_bytes=1, **kw)
    assert len(calls) == 5  # one per group holding a new block; the repeat maps nothing
    assert grouped["blocks"].column("morton").num_chunks == 5
    for t in ("blocks", "block_overflow", "export_errors"):
        assert grouped[t].combine_chunks().equals(whole[t].combine_chunks()), t
    assert st1.blocks == st2.blocks == 5 and st1.errors == st2.errors == 1
    assert st1.bytes_out == st2.bytes_out and st1.raw_bytes == st2.raw_bytes
    err = grouped["export_errors"]
    assert set(err.column("stage").to_pylist()) == {"duplicate"} and set(err.column("x").to_pylist()) == {1}


def test_error_samples_name_each_corrupt_block_once():
    """The dashboard's samples list the first corrupt blocks of a partition once each (the
    failed blocks as the transform hands them: one row per block, however many cell-limit
    parts a tabular sink later cuts its bytes into)."""
    from dvidetl.export.tasks import _error_samples

    n = 7
    batch = _batch([bytes([i]) * 5000 for i in range(n)], [(i, 0, 0) for i in range(n)])
    data, st = transform_blocks([batch], "gzip", lambda s: s, scale=0, grid=GRID, lo=0, hi=512)
    t = data.failed
    assert st.errors == n and t.num_rows == n
    assert cut_blocks(data, "r", 1024)["export_errors"].num_rows == 5 * n  # five parts per block
    got = _error_samples(t)
    reasons = t.column("reason").to_pylist()
    assert [(r["x"], r["reason"]) for r in got] == [(i, reasons[i]) for i in range(5)]
    assert _error_samples(t, limit=9) == [{"scale": 0, "x": i, "y": 0, "z": 0, "reason": reasons[i]}
                                          for i in range(n)]


def test_errors_table_rows_exactly():
    """``errors_table``: one row per cell-limit part of each block's bytes (a block without
    bytes still gets one, with empty data), in the table's schema, sorted by (morton, part);
    no blocks: the empty table."""
    from dvidetl.tables.cells import errors_table

    def table(data, n=3):
        return errors_table("run-1", 2, np.arange(n) + 10, np.arange(n) + 20, np.arange(n) + 30,
                            np.asarray([7, 3, 5][:n], np.uint64), "repack", ["r7", "r3", "r5"][:n],
                            data, cell_limit=64)

    assert table(pa.array([], pa.binary()), n=0).equals(S.empty("export_errors"))
    data = pa.chunked_array([pa.array([b"a" * 130, None], pa.binary()), pa.array([b"b" * 64], pa.binary())])
    t = table(data)
    assert t.schema == S.EXPORT_ERRORS
    rows = [(r["morton"], r["part"], r["nparts"], r["data"], r["x"], r["reason"]) for r in t.to_pylist()]
    assert rows == [(3, 0, 1, b"", 11, "r3"), (5, 0, 1, b"b" * 64, 12, "r5"),
                    (7, 0, 3, b"a" * 64, 10, "r7"), (7, 1, 3, b"a" * 64, 10, "r7"), (7, 2, 3, b"aa", 10, "r7")]
    assert set(t.column("run_id").to_pylist()) == {"run-1"} and set(t.column("scale").to_pylist()) == {2}
    assert set(t.column("stage").to_pylist()) == {"repack"} and t.column("z").to_pylist()[0] == 31


def test_transform_makes_only_the_columns_its_sinks_need(monkeypatch):
    """``keep_payload`` / ``keep_raw`` (the union of the partition's ``Sink.needs``): a column
    nobody asked for is absent, not empty; every other column is the same whatever was asked;
    without payloads the zstd step never runs (the payload bytes leave ``bytes_out``), and a
    duplicate's bytes are the unwrapped block instead of its payload."""
    import importlib

    from dvidetl.export.batch import BASE_COLUMNS, block_schema

    rng = np.random.default_rng(5)
    raws = [encode_block(_volume(rng, k)) for k in (3, 400, 1)]
    coords = [(0, 0, 0), (1, 0, 0), (2, 1, 0)]
    b = _batch([wrap(r, "gzip") for r in raws] + [wrap(raws[1], "gzip")], coords + [coords[1]])  # 1 repeated
    kw = dict(scale=0, grid=GRID, lo=0, hi=512)

    def run(payload, raw):
        data, st = transform_blocks([b], "gzip", lambda s: s + np.uint64(9), keep_payload=payload, keep_raw=raw, **kw)
        t = pa.concat_tables(list(data.batches()))
        return t, data, st

    full, _, st_full = run(True, True)
    assert full.schema == block_schema({"payload", "raw"})

    def no_zstd(level):
        raise AssertionError("zstd ran for a partition whose sinks need no payload")

    # (the package's ``repack`` name is the function; the module holds the compressor cache)
    monkeypatch.setattr(importlib.import_module("dvidetl.codec.repack"), "_cctx", no_zstd)
    only_raw, data, st = run(False, True)
    assert only_raw.schema == block_schema({"raw"}) and "payload" not in only_raw.schema.names
    assert data.lacks({"payload"}) == ["payload"] and data.lacks({"raw"}) == []
    for c in BASE_COLUMNS.names + ["raw"]:
        assert only_raw.column(c).equals(full.column(c)), c
    assert [r for r in only_raw.column("raw").to_pylist()] == [raws[0], raws[1], raws[2]]
    payload_bytes = sum(len(p) for p in full.column("payload").to_pylist())
    assert st.blocks == st_full.blocks == 3 and st_full.bytes_out - st.bytes_out == payload_bytes > 0
    assert st.raw_bytes == st_full.raw_bytes
    assert data.failed.column("stage").to_pylist() == ["duplicate"]
    assert data.failed.column("data").to_pylist() == [raws[1]]  # the unwrapped block, no payload made

    neither, data0, _ = run(False, False)
    assert neither.schema == BASE_COLUMNS
    assert data0.failed.column("data").to_pylist() == [None]  # no bytes kept at all: null, said so
    monkeypatch.undo()
    only_payload, _, _ = run(True, False)
    assert only_payload.schema == block_schema({"payload"})
    assert only_payload.column("payload").equals(full.column("payload"))
    with pytest.raises(ValueError, match="unknown block data needs"):
        block_schema({"payload", "voxels"})


def test_a_sink_reading_a_column_it_did_not_ask_for_is_refused(tmp_path):
    """The contract's other half: the transform made no payload (no sink of the partition
    declared it), so a tabular sink handed that data refuses before it writes anything,
    naming what is missing — never a KeyError deep in the cell cutter, never a partial write."""
    from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
    from dvidetl.sinks import open_sink

    ok = wrap(encode_block(np.ones((64, 64, 64), np.uint64)), "gzip")
    data, st = transform_blocks([_batch([ok], [(1, 0, 0)])], "gzip", lambda s: s, scale=0, grid=GRID,
                                lo=0, hi=512, keep_payload=False, keep_raw=True)
    part = Partition("blocks", 0, 0, 512, blocks=1)
    sink = open_sink(f"parquet://{tmp_path}/pq", uuid="u1", instance="seg")
    assert sink.needs == {"payload"}
    sink.prepare(RunInfo("r1", "u1", "seg", [part]))
    with pytest.raises(ValueError, match=r"lacks \['payload'\].*declares \['payload'\]"):
        sink.write_partition("r1", part, data, PartitionStats(part.key, "blocks", blocks=1))
    assert not sink.is_done("r1", part)
    assert not list((tmp_path / "pq").rglob("*.parquet")) or sink.read("blocks", run_id="r1").num_rows == 0


@pytest.mark.parametrize("spill", [False, True])
def test_batches_out_of_morton_order_come_out_sorted(tmp_path, spill):
    """A direct caller may hand batches out of Morton order: the exported blocks still come
    out in Morton order (in memory, or spilled, read back, sorted and spilled again)."""
    from dvidetl.export.spill import SpilledTable, close_tables

    vols = [encode_block(np.full((64, 64, 64), k, np.uint64)) for k in (1, 2, 3)]
    coords = [(3, 0, 0), (1, 0, 0), (0, 1, 0)]  # Morton 9, 1, 2: out of order, the last pair in order
    batches = [_batch([wrap(v, "gzip")], [c]) for v, c in zip(vols, coords, strict=True)]
    kw = dict(spill_dir=str(tmp_path), spill_bytes=1) if spill else {}
    data, st = transform_blocks(batches, "gzip", lambda s: s, scale=0, grid=GRID, lo=0, hi=512,
                                group_bytes=1, **kw)
    try:
        assert isinstance(data.blocks, SpilledTable) is spill
        t = data.blocks.read_all() if spill else data.blocks
        m = t.column("morton").to_pylist()
        assert m == sorted(m) and len(m) == 3 and st.blocks == 3
        want = dict(zip(morton_encode(*(np.array(c) for c in zip(*coords, strict=True)), GRID).tolist(),
                        (1, 2, 3), strict=True))
        assert [r[0] for r in t.column("supervoxels").to_pylist()] == [want[k] for k in m]
    finally:
        close_tables(data)


def test_map_lists_asks_each_supervoxel_once():
    """``map_lists``: ONE mapper call with each used supervoxel once, sorted (lists share
    supervoxels; a slice's unused values are not asked), bodies aligned with the lists."""
    from dvidetl.export.transform import map_lists

    calls = []

    def mapper(s):
        calls.append(np.asarray(s).tolist())
        return np.asarray(s, np.uint64) * np.uint64(10)

    lists = pa.array([[99], [5, 3], [3, 7], None, [5], []], pa.list_(pa.uint64())).slice(1)
    got = map_lists(lists, mapper)
    assert calls == [[3, 5, 7]]
    assert got.to_pylist() == [[50, 30], [30, 70], None, [50], []]
    assert map_lists(pa.array([], pa.list_(pa.uint64())), mapper).to_pylist() == [] and len(calls) == 1


def test_zstd_level_reaches_the_payloads(shared_data):
    """``zstd_level`` is the level the payloads are compressed at (a higher level, a smaller
    payload of the real fib19 block), and every level restores the same bytes."""
    raw = gzip.decompress((shared_data / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes())
    b = _batch([wrap(raw, "gzip")], [(1, 0, 0)])
    sizes = {}
    for level in (1, 19):
        data, _ = transform_blocks([b], "gzip", lambda s: s, scale=0, grid=GRID, lo=0, hi=512, zstd_level=level)
        t = data.blocks
        payload = t.column("payload")[0].as_py()
        assert restore_block(np.asarray(t.column("supervoxels")[0].as_py(), np.uint64), payload) == raw
        sizes[level] = len(payload)
    assert sizes[19] < sizes[1]
