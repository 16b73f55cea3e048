"""Table schemas, cell cutting / reassembly, and the Parquet sink's commit rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvidetl.export.kinds import KINDS, Partition, RunInfo
from dvidetl.sinks import open_sink
from dvidetl.tables import schema as S
from dvidetl.tables.cells import blocks_tables, errors_table, join_payload_cells, reassemble


def _stats(part, figures):
    """A partition's stats with the given ledger figures (what a task hands the sink)."""
    from dvidetl.export.kinds import PartitionStats

    return figures if isinstance(figures, PartitionStats) else PartitionStats(part.key, part.kind, **figures)



def test_tables_exactly_as_specified():
    assert S.DEFAULT_CELL_LIMIT == 129_024
    assert S.BLOCKS.names == [
        "scale", "x", "y", "z", "morton", "supervoxels", "labels", "sv_voxels", "raw_size",
        "crc32", "payload_size", "nparts", "payload0", "payload1", "payload2", "payload3", "overflow",
    ]
    assert S.BLOCKS.field("supervoxels").type == pa.list_(pa.uint64())
    assert S.BLOCKS.field("sv_voxels").type == pa.list_(pa.uint32())
    assert S.BLOCKS.field("scale").type == pa.uint8()
    assert S.BLOCKS.field("nparts").type == pa.uint8()
    assert S.BLOCK_OVERFLOW.names == ["scale", "morton", "column", "part", "data"]
    assert S.LABEL_INDEX.names == ["label", "supervoxel", "x", "y", "z", "morton", "voxels"]
    assert S.MAPPING.names == ["supervoxel", "body"]
    assert {"run_id", "scale", "x", "y", "z", "stage", "reason", "data"} <= set(S.EXPORT_ERRORS.names)
    assert set(S.TABLES) == {"blocks", "block_overflow", "label_index", "mapping", "export_ledger", "export_errors",
                             "source_anomalies"}
    assert S.SOURCE_ANOMALIES.names == ["run_id", "seq", "kind", "scale", "file", "x", "y", "z", "morton",
                                        "blocks", "lost", "detail"]
    assert KINDS["anomalies"].tables == ("source_anomalies",) and S.KEY_COLUMN["source_anomalies"] == "seq"
    with pytest.raises(KeyError, match="unknown table"):
        S.schema("nope")
    with pytest.raises(ValueError, match="missing columns"):
        S.conform("mapping", pa.table({"supervoxel": [1]}))


def _random_blocks(rng, n, limit, big=False):
    lens = rng.integers(0, 6 * limit if big else 2 * limit, n)
    lens[0] = 0 if n > 1 else lens[0]
    bodies = [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes() for k in lens]
    nl = rng.integers(1, (limit // 8) * (3 if big else 1) + 2, n)
    svs = [rng.integers(0, 2**64 - 1, int(k), dtype=np.uint64).tolist() for k in nl]
    labs = [rng.integers(0, 2**64 - 1, int(k), dtype=np.uint64).tolist() for k in nl]
    vox = [rng.integers(0, 2**32 - 1, int(k), dtype=np.uint32).tolist() for k in nl]
    return bodies, svs, labs, vox


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(64, 400), st.booleans(), st.integers(0, 2**32 - 1))
def test_cut_and_reassemble_roundtrip(n, limit, big, seed):
    rng = np.random.default_rng(seed)
    bodies, svs, labs, vox = _random_blocks(rng, n, limit, big)
    m = np.sort(rng.choice(1 << 30, n, replace=False)).astype(np.uint64)
    b, o = blocks_tables(
        1, np.arange(n), np.arange(n), np.arange(n), m,
        pa.array(svs, pa.list_(pa.uint64())), pa.array(labs, pa.list_(pa.uint64())),
        pa.array(vox, pa.list_(pa.uint32())), np.arange(n), np.arange(n),
        pa.array(bodies, pa.binary()), cell_limit=limit,
    )
    # every cell within the limit
    for c in S.PAYLOAD_COLUMNS:
        assert (pc.max(pc.binary_length(b.column(c))).as_py() or 0) <= limit
    for c in S.LIST_COLUMNS:
        w = S.LIST_COLUMNS[c].byte_width
        assert (pc.max(pc.list_value_length(b.column(c))).as_py() or 0) * w <= limit
    assert (pc.max(pc.binary_length(o.column("data"))).as_py() or 0) <= limit
    # any row order, overflow table of a superset
    perm = rng.permutation(n)
    r = reassemble(b.take(pa.array(perm)), o)
    assert r.column("payload").to_pylist() == [bodies[i] for i in perm]
    assert r.column("supervoxels").to_pylist() == [svs[i] for i in perm]
    assert r.column("labels").to_pylist() == [labs[i] for i in perm]
    assert r.column("sv_voxels").to_pylist() == [vox[i] for i in perm]
    flagged = np.asarray(b.column("overflow"))
    assert flagged.tolist() == [
        len(bodies[i]) > 4 * limit or len(svs[i]) * 8 > limit for i in range(n)
    ]
    if o.num_rows:
        with pytest.raises(ValueError, match="missing|null|differ"):
            reassemble(b, o.slice(1))


def test_join_payload_cells_keeps_rows_with_empty_payloads():
    t = pa.table({c: pa.array([None, b"a" if c == "payload0" else None, None], pa.binary()) for c in S.PAYLOAD_COLUMNS})
    assert join_payload_cells(t).to_pylist() == [b"", b"a", b""]


def test_errors_table_parts():
    data = pa.array([b"x" * 250, b"", None], pa.binary())
    t = errors_table("r1", 2, [1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 20, 30], "repack", ["bad a", "bad b", "bad c"], data, cell_limit=100)
    assert t.schema == S.EXPORT_ERRORS
    assert t.column("morton").to_pylist() == [10, 10, 10, 20, 30]
    assert t.column("part").to_pylist() == [0, 1, 2, 0, 0]
    assert b"".join(t.column("data").to_pylist()[:3]) == b"x" * 250


def _mapping(lo, n):
    return pa.table({"supervoxel": pa.array(np.arange(lo, lo + n), pa.uint64()), "body": pa.array(np.arange(n), pa.uint64())})


def test_parquet_sink_commit_rules(tmp_path):
    sink = open_sink(f"parquet://{tmp_path}", uuid="u1", instance="seg")
    parts = [Partition("mapping", 0, 0, 100), Partition("mapping", 0, 100, 200), Partition("mapping", 0, 200, 300)]
    run = RunInfo("20260101T000000Z-aaaaaa", "u1", "seg", parts, options={"x": 1})
    sink.prepare(run)
    assert sink.load_run(run.run_id).partitions == parts
    assert sink.runs() == [run.run_id] and sink.latest_run() == run.run_id
    assert not sink.is_done(run.run_id, parts[0])
    sink.write_partition(run.run_id, parts[0], {"mapping": _mapping(0, 10)}, _stats(parts[0], {"blocks": 10}))
    # streamed batches are committed the same way
    sink.write_partition(run.run_id, parts[1], {"mapping": iter(_mapping(100, 5).to_batches(2))}, _stats(parts[1], {}))
    # a partition written but not committed (crash before the ledger rename) stays invisible
    f = sink.file_of("mapping", parts[2])
    import pyarrow.parquet as pq

    pq.write_table(_mapping(200, 3), f)
    assert sink.done(run.run_id) == {parts[0].key, parts[1].key}
    t = sink.read("mapping")
    assert sorted(t.column("supervoxel").to_pylist()) == list(range(10)) + list(range(100, 105))
    led = sink.ledger(run.run_id)
    assert led.num_rows == 2 and sorted(led.column("rows").to_pylist()) == [5, 10]
    # rewriting a committed partition replaces, never duplicates
    sink.write_partition(run.run_id, parts[0], {"mapping": _mapping(0, 10)}, _stats(parts[0], {}))
    assert sink.read("mapping").num_rows == 15
    # an empty table removes a stale file of an earlier attempt
    sink.write_partition(run.run_id, parts[2], {"mapping": _mapping(0, 0)}, _stats(parts[2], {}))
    assert not f.exists()
    assert not [p for p in tmp_path.rglob(".*tmp*")], "temp files left behind"
    with pytest.raises(Exception, match="no run"):
        sink.load_run("nope")


def test_parquet_sink_blocks_layout(tmp_path):
    sink = open_sink(f"parquet://{tmp_path}/out", uuid="u", instance="seg")
    p = Partition("blocks", 2, 0x10, 0x20, 3)
    run = RunInfo("r1", "u", "seg", [p])
    sink.prepare(run)
    n = 3
    b, o = blocks_tables(
        2, [1, 2, 3], [0, 0, 0], [0, 0, 0], np.array([0x10, 0x11, 0x1F], np.uint64),
        pa.array([[1], [2, 3], list(range(40))], pa.list_(pa.uint64())),
        pa.array([[1], [2, 3], list(range(40))], pa.list_(pa.uint64())),
        pa.array([[5], [6, 7], [1] * 40], pa.list_(pa.uint32())), np.zeros(n), np.zeros(n),
        pa.array([b"a" * 10, b"b" * 300, b"c"], pa.binary()), cell_limit=64,
    )
    sink.write_partition("r1", p, {"blocks": b, "block_overflow": o}, _stats(p, {"blocks": 3}))
    assert (tmp_path / "out/seg/u/blocks/scale-2/part-0000000000000010-0000000000000020.parquet").exists()
    assert (tmp_path / "out/seg/u/block_overflow/scale-2").is_dir()
    assert list((tmp_path / "out/seg/u/export_ledger/r1").glob("*.parquet"))
    got = sink.read("blocks", scale=2, morton_range=(0x11, 0x20))
    assert got.column("morton").to_pylist() == [0x11, 0x1F]
    r = reassemble(sink.read("blocks"), sink.read("block_overflow"))
    assert r.column("payload").to_pylist() == [b"a" * 10, b"b" * 300, b"c"]
    assert sink.read("blocks", scale=1).num_rows == 0


def test_open_export_at_the_package_top_is_lazy():
    """`from dvidetl import open_export` is the documented entry point; `import dvidetl`
    alone must not pull in the read stack (the CLI and workers import it first)."""
    import subprocess
    import sys

    code = ("import sys, dvidetl; assert 'dvidetl.read' not in sys.modules; "
            "from dvidetl import open_export; import dvidetl.read as R; "
            "assert open_export is R.open_export; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("typ", [pa.binary(), pa.string(), pa.large_binary(), pa.large_string()])
def test_binary_buffers_every_binary_type_sliced_chunked_empty(typ):
    """(offsets, values) of any binary-like array: offsets index the values, whatever the
    offset width, a slice offset or chunking; an empty array has one offset."""
    from dvidetl.tables.cells import binary_buffers

    vals = ["ab", "", "cde", None, "f"]
    arr = pa.array([v if v is None or typ in (pa.string(), pa.large_string()) else v.encode() for v in vals], typ)
    for a in (arr, arr.slice(2), pa.chunked_array([arr.slice(0, 2), arr.slice(2)])):
        offs, raw = binary_buffers(a)
        assert offs.dtype == np.int64 and len(offs) == len(a) + 1
        got = [bytes(raw[offs[i]:offs[i + 1]]) for i in range(len(a))]
        want = [b"" if v is None else v.encode() for v in (vals[2:] if len(a) == 3 else vals)]
        assert got == want
    offs, raw = binary_buffers(pa.array([], typ))
    assert offs.tolist() == [0] and offs.dtype == np.int64 and len(raw) == 0 and raw.dtype == np.uint8
    offs, raw = binary_buffers(pa.array([None, None], typ))
    assert offs.tolist() == [0, 0, 0] and len(raw) == 0 and raw.dtype == np.uint8
    fixed = pa.array([b"xy", b"zw"], pa.binary(2))  # any other type is read as large_binary
    offs, raw = binary_buffers(fixed)
    assert offs.tolist() == [0, 2, 4] and bytes(raw) == b"xyzw"


@pytest.mark.parametrize("vt", [pa.uint64(), pa.uint32()])
def test_list_as_binary_and_back_exactly(vt):
    """Lists <-> their little-endian bytes: nulls stay null, empty lists stay empty, slices
    and chunks are respected, the types are exact; a binary value that is not whole items
    is refused with the item type named."""
    from dvidetl.tables.cells import binary_as_list, list_as_binary

    big = (1 << (8 * vt.byte_width)) - 1
    lists = pa.array([[1, 2], None, [], [big, 0, 7]], pa.list_(vt))
    for arr, want in ((lists, lists), (lists.slice(1), lists.slice(1)),
                      (pa.chunked_array([lists.slice(0, 1), lists.slice(1)]), lists),
                      (pa.array([[5], [6, 7]], pa.large_list(vt)), pa.array([[5], [6, 7]], pa.list_(vt)))):
        b = list_as_binary(arr)
        assert b.type == pa.binary() and b.null_count == want.null_count
        assert b.to_pylist() == [None if v is None else np.asarray(v, vt.to_pandas_dtype()).astype("<" + np.dtype(
            vt.to_pandas_dtype()).str[1:]).tobytes() for v in want.to_pylist()]
        back = binary_as_list(b, vt)
        assert back.type == pa.list_(vt) and back.equals(want)
        assert binary_as_list(b.slice(1), vt).equals(want.slice(1))
    # a slice whose first value starts off the item grid (its buffer begins with 1 byte)
    w = vt.byte_width
    off = pa.array([b"x", (3).to_bytes(w, "little"), (4).to_bytes(w, "little") * 2], pa.binary()).slice(1)
    assert binary_as_list(off, vt).to_pylist() == [[3], [4, 4]]
    empty = binary_as_list(pa.array([b"", None], pa.binary()), vt)
    assert empty.type == pa.list_(vt) and empty.to_pylist() == [[], None]
    assert binary_as_list(pa.array([], pa.binary()), vt).type == pa.list_(vt)
    with pytest.raises(ValueError, match=f"not whole {vt} arrays"):
        binary_as_list(pa.array([b"\x00" * vt.byte_width, b"\x01" * (vt.byte_width + 1)]), vt)
    with pytest.raises(ValueError, match="not whole"):
        binary_as_list(pa.array([b"\x00" * (vt.byte_width - 1), b"\x00"]), vt)


@pytest.mark.parametrize("typ", [pa.binary(), pa.large_binary()])
def test_binary_buffers_of_an_empty_array_without_offsets(typ):
    """Arrow lets an empty binary array carry a zero-length offsets buffer (other producers,
    IPC); its (offsets, values) are still one offset 0 and no bytes, and it reads back as an
    empty list array."""
    from dvidetl.tables.cells import binary_as_list, binary_buffers

    a = pa.Array.from_buffers(typ, 0, [None, pa.py_buffer(b""), pa.py_buffer(b"")])
    offs, raw = binary_buffers(a)
    assert offs.tolist() == [0] and offs.dtype == np.int64 and len(raw) == 0
    back = binary_as_list(a, pa.uint64())
    assert back.type == pa.list_(pa.uint64()) and len(back) == 0


def test_reassemble_overflow_of_several_scales_at_once():
    """A whole export read back (every scale in one table, ``sink.read("blocks")``): each
    block's overflow parts are looked up among its own scale's rows, even when another scale
    overflows too."""
    limit = 64
    tabs = []
    for scale, mortons in ((0, [3, 9]), (1, [4, 7])):
        bodies = [bytes([scale * 16 + i]) * (6 * limit + i) for i in range(2)]
        svs = [list(range(20 + scale)), [5]]  # the first list passes the limit (8-byte items)
        tabs.append(blocks_tables(
            scale, [0, 1], [0, 0], [0, 0], np.array(mortons, np.uint64),
            pa.array(svs, pa.list_(pa.uint64())), pa.array(svs, pa.list_(pa.uint64())),
            pa.array([[1] * len(s) for s in svs], pa.list_(pa.uint32())), np.zeros(2), np.zeros(2),
            pa.array(bodies, pa.binary()), cell_limit=limit) + (bodies, svs))
    blocks = pa.concat_tables([t[0] for t in tabs])
    overflow = pa.concat_tables([t[1] for t in tabs])
    assert blocks.column("overflow").to_pylist() == [True] * 4
    r = reassemble(blocks, overflow)
    assert r.column("payload").to_pylist() == tabs[0][2] + tabs[1][2]
    assert r.column("supervoxels").to_pylist() == tabs[0][3] + tabs[1][3]



def test_reassemble_names_the_block_whose_overflow_rows_are_gone():
    """Two blocks overflow; the overflow rows of one are gone: the error names that block's
    Morton code, not its neighbour's."""
    limit = 64
    bodies = [b"a" * (6 * limit), b"b" * (7 * limit)]
    b, o = blocks_tables(
        0, [0, 1], [0, 0], [0, 0], np.array([11, 12], np.uint64),
        pa.array([[1], [2]], pa.list_(pa.uint64())), pa.array([[1], [2]], pa.list_(pa.uint64())),
        pa.array([[1], [1]], pa.list_(pa.uint32())), np.zeros(2), np.zeros(2),
        pa.array(bodies, pa.binary()), cell_limit=limit)
    assert reassemble(b, o).column("payload").to_pylist() == bodies
    gone = o.filter(pc.not_equal(o.column("morton"), pa.scalar(12, pa.uint64())))
    with pytest.raises(ValueError, match=r"rows for column 'payload' missing \(morton \[12\]\)"):
        reassemble(b, gone)
    # no overflow table at all (a reader that did not read it): both named, not a crash
    with pytest.raises(ValueError, match=r"^scale 0: block_overflow rows for column 'payload' missing \(morton \[11, 12\]\)$"):
        reassemble(b, None)


def test_reassemble_checks_payload_size():
    """A row whose ``payload_size`` disagrees with its joined cells is named, not returned."""
    b, o = blocks_tables(
        0, [0, 1], [0, 0], [0, 0], np.array([21, 22], np.uint64),
        pa.array([[1], [2]], pa.list_(pa.uint64())), pa.array([[1], [2]], pa.list_(pa.uint64())),
        pa.array([[1], [1]], pa.list_(pa.uint32())), np.zeros(2), np.zeros(2),
        pa.array([b"abc", b"defg"], pa.binary()), cell_limit=64)
    i = b.schema.get_field_index("payload_size")
    bad = b.set_column(i, "payload_size", pa.array([3, 5], pa.uint32()))
    with pytest.raises(ValueError, match=r"payload sizes differ from payload_size \(morton \[22\]\)"):
        reassemble(bad, o)


def test_reassemble_no_rows():
    """An export's empty scale reads back as no rows, with the whole ``payload`` column."""
    r = reassemble(S.empty("blocks"), None)
    assert r.num_rows == 0 and r.schema.field("payload").type == pa.binary()
    assert "payload0" not in r.column_names and join_payload_cells(S.empty("blocks")).type == pa.binary()


def test_blocks_tables_refuses_a_bad_limit_and_a_payload_of_too_many_cells():
    def cut(payload: bytes, limit: int):
        return blocks_tables(0, [0], [0], [0], np.array([1], np.uint64),
                             pa.array([[1]], pa.list_(pa.uint64())), pa.array([[1]], pa.list_(pa.uint64())),
                             pa.array([[1]], pa.list_(pa.uint32())), np.zeros(1), np.zeros(1),
                             pa.array([payload], pa.binary()), cell_limit=limit)

    with pytest.raises(ValueError, match="cell limit 0 bytes: must be positive"):
        cut(b"x", 0)
    assert cut(b"x" * 255 * 4, 4)[0].column("nparts").to_pylist() == [255]
    with pytest.raises(ValueError, match="a block payload of 1021 bytes needs more than 255 cells"):
        cut(b"x" * 1021, 4)


def test_check_cell_limit_says_which_bound_and_names_the_option():
    from dvidetl.errors import UserError
    from dvidetl.tables.cells import MIN_CELL_LIMIT, check_cell_limit

    assert check_cell_limit(np.int64(4096), most=4096) == 4096 and type(check_cell_limit(np.int64(4096))) is int
    with pytest.raises(UserError, match=r"^--cell-limit must be a whole number of bytes \(got 1.5\)$"):
        check_cell_limit(1.5)
    with pytest.raises(UserError, match=rf"^--cell-limit must be at least {MIN_CELL_LIMIT} bytes \(got 1023\)$"):
        check_cell_limit(1023)
    with pytest.raises(UserError, match=r"^--cell-limit 5,000 is above the store's cell limit 4,096: use 4096 or less$"):
        check_cell_limit(5000, most=4096)
    with pytest.raises(UserError, match=r"^cell_limit must be at least"):
        check_cell_limit(0, what="cell_limit")
