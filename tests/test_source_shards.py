"""shards:// source against the real DVID export-shards file (read in place via symlinks)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvidetl.errors import UserError
from dvidetl.geometry import morton_encode
from dvidetl.sources import open_source
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA, MAPPING_SCHEMA, Source
from dvidetl.sources.shards import ShardsSource

NAME = "30720_24576_28672"


def _arrange(tmp: Path, shared: Path, csv: str = "-newformat", with_csv: bool = True) -> Path:
    (tmp / "s1").mkdir(parents=True)
    os.symlink(shared / "mcns-shard" / f"{NAME}.arrow", tmp / "s1" / f"{NAME}.arrow")
    if with_csv:
        os.symlink(shared / "mcns-shard" / f"{NAME}{csv}.csv", tmp / "s1" / f"{NAME}.csv")
    return tmp


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, shared_data) -> Path:
    return _arrange(tmp_path_factory.mktemp("shards"), shared_data)


@pytest.fixture(scope="module")
def spec(shared_data) -> Path:
    return shared_data / "dvid" / "mcns-ng-specs.json"


@pytest.fixture(scope="module")
def src(shard_dir, spec) -> ShardsSource:
    return open_source(f"shards://{shard_dir}?spec={spec}")


@pytest.fixture(scope="module")
def file_table(shared_data) -> pa.Table:
    with pa.memory_map(str(shared_data / "mcns-shard" / f"{NAME}.arrow")) as mm:
        return ipc.open_stream(mm).read_all()


def _all(src, scale, lo, hi) -> pa.Table:
    batches = list(src.read_blocks(scale, lo, hi))
    for b in batches:
        assert b.schema.equals(BLOCKS_WIRE_SCHEMA)
    return pa.Table.from_batches(batches, schema=BLOCKS_WIRE_SCHEMA)


def test_info_and_morton(src):
    assert isinstance(src, Source)
    info = src.info()
    assert info.uuid == "*" and info.instance == "segmentation" and info.codec == "zstd"
    assert [s.scale for s in info.scales] == [1]
    s1 = info.scale(1)
    assert s1.grid == (736, 612, 1052) and s1.block_size == (64, 64, 64)
    assert info.has_mapping and not info.has_indices
    t = _all(src, 1, 0, s1.morton_end)
    hit = (t["x"].to_numpy() == 509) & (t["y"].to_numpy() == 413) & (t["z"].to_numpy() == 469)
    assert hit.sum() == 1
    assert int(t["morton"].to_numpy()[hit][0]) == 0x7F4F7C7


def test_uuid_instance_params(shard_dir, spec):
    s = open_source(f"shards://{shard_dir}?spec={spec}&uuid=abc123&instance=seg2")
    assert s.info().uuid == "abc123" and s.info().instance == "seg2"


def test_blocks_equal_file_rows(src, file_table):
    t = _all(src, 1, 0, 1 << 64)
    assert t.num_rows == 258 == file_table.num_rows
    m = t["morton"].to_numpy()
    assert np.all(m[1:] > m[:-1])
    grid = src.info().scale(1).grid
    x, y, z = (t[c].to_numpy() for c in "xyz")
    assert np.array_equal(m, morton_encode(x, y, z, grid))
    ref = {
        (a, b, c): d
        for a, b, c, d in zip(
            file_table["chunk_x"].to_pylist(),
            file_table["chunk_y"].to_pylist(),
            file_table["chunk_z"].to_pylist(),
            file_table["dvid_compressed_block"].to_pylist(),
            strict=False,
        )
    }
    served = dict(
        zip(
            zip(x.tolist(), y.tolist(), z.tolist(), strict=False),
            t["data"].to_pylist(),
            strict=False,
        )
    )
    assert served == ref
    # stored as one zstd frame
    assert all(d[:4] == b"\x28\xb5\x2f\xfd" for d in served.values())


def test_ranges_empty_tiny_whole(src):
    t = _all(src, 1, 0, 1 << 64)
    m = t["morton"].to_numpy()
    assert _all(src, 1, 0, int(m[0])).num_rows == 0  # empty
    assert _all(src, 1, int(m[-1]) + 1, src.info().scale(1).morton_end).num_rows == 0
    tiny = _all(src, 1, 0x7F4F7C7, 0x7F4F7C8)  # exactly one block
    assert tiny.num_rows == 1 and (tiny["x"][0].as_py(), tiny["y"][0].as_py()) == (509, 413)
    whole = _all(src, 1, 0, src.info().scale(1).morton_end)
    assert whole.equals(t)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_ranges(src, data):
    t = _all(src, 1, 0, 1 << 64)
    m = t["morton"].to_numpy()
    lo_i = data.draw(st.integers(0, len(m)))
    lo = int(m[lo_i]) + data.draw(st.integers(-3, 3)) if lo_i < len(m) else int(m[-1]) + 1
    lo = max(lo, 0)
    hi = lo + data.draw(st.integers(1, 1 << 14))
    got = _all(src, 1, lo, hi)
    keep = (m >= lo) & (m < hi)
    assert got.equals(t.filter(pa.array(keep)))


def test_count_exact(src):
    t = _all(src, 1, 0, 1 << 64)
    m = t["morton"].to_numpy()
    for level in (0, 3, 9, 15, 20, 40):
        cells, counts, exact = src.count(1, level)
        assert exact is True
        assert int(counts.sum()) == 258
        assert np.all(cells[1:] > cells[:-1])
        u, c = np.unique(m >> np.uint64(level), return_counts=True)
        assert np.array_equal(cells, u) and np.array_equal(counts, c)
    # the whole shard is one aligned cell at level preshift+minishard = 15
    cells, counts, _ = src.count(1, 15)
    assert cells.tolist() == [0x7F4F7C7 >> 15] and counts.tolist() == [258]


def test_mapping(src, file_table):
    sv = np.concatenate(file_table["supervoxels"].to_numpy(zero_copy_only=False)).astype(np.uint64)
    body = np.concatenate(file_table["labels"].to_numpy(zero_copy_only=False)).astype(np.uint64)
    pairs = {}
    for a, b in zip(sv.tolist(), body.tolist(), strict=False):
        assert pairs.setdefault(a, b) == b
    assert len(pairs) == 2905
    nonid = {a: b for a, b in pairs.items() if a != b}
    assert len(nonid) == 890
    batches = list(src.read_mapping())
    assert all(b.schema.equals(MAPPING_SCHEMA) for b in batches)
    mt = pa.Table.from_batches(batches, schema=MAPPING_SCHEMA)
    assert mt.num_rows == 890
    assert dict(zip(mt["supervoxel"].to_pylist(), mt["body"].to_pylist(), strict=False)) == nonid
    assert np.all(np.diff(mt["supervoxel"].to_numpy().astype(np.float64)) > 0)
    keys = np.array(sorted(pairs), dtype=np.uint64)
    got = src.map_supervoxels(keys)
    assert got.dtype == np.uint64
    assert got.tolist() == [pairs[k] for k in keys.tolist()]
    unknown = np.array([1, 2, 2**64 - 1], dtype=np.uint64)
    assert src.map_supervoxels(unknown).tolist() == unknown.tolist()
    assert src.map_supervoxels(np.zeros(0, np.uint64)).size == 0


def test_no_indices(src):
    assert list(src.read_indices(0, 1 << 63)) == []


@pytest.mark.parametrize("csv", ["", None])  # older x,y,z,rec sidecar; no sidecar at all
def test_older_sidecars(tmp_path, shared_data, spec, src, csv):
    d = _arrange(tmp_path, shared_data, csv=csv or "", with_csv=csv is not None)
    old = ShardsSource(d, spec=str(spec))
    assert _all(old, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))


def test_without_spec_uses_bounding_box(shard_dir, file_table, src):
    s = open_source(f"shards://{shard_dir}")
    g = s.info().scale(1).grid
    assert g == (
        max(file_table["chunk_x"].to_pylist()) + 1,
        max(file_table["chunk_y"].to_pylist()) + 1,
        max(file_table["chunk_z"].to_pylist()) + 1,
    )
    t = _all(s, 1, 0, 1 << 64)
    assert t.num_rows == 258
    assert int(s.count(1, 0)[1].sum()) == 258
    ref = _all(src, 1, 0, 1 << 64)

    def key(tb):
        return sorted(
            zip(
                tb["x"].to_pylist(),
                tb["y"].to_pylist(),
                tb["z"].to_pylist(),
                tb["data"].to_pylist(),
                strict=False,
            )
        )

    assert key(t) == key(ref)


# --------------------------------------------------------------------- small written shards
def _write_shard(
    path: Path, rows: list[tuple[int, int, int, list[int], list[int], bytes]], per_batch=1
):
    """A DVID-like stream + newformat CSV (offsets tracked while writing)."""
    fields = [
        pa.field("chunk_x", pa.int32(), False),
        pa.field("chunk_y", pa.int32(), False),
        pa.field("chunk_z", pa.int32(), False),
        pa.field("labels", pa.list_(pa.uint64()), False),
        pa.field("supervoxels", pa.list_(pa.uint64()), False),
        pa.field("dvid_compressed_block", pa.binary(), False, metadata={"codec": "zstd"}),
        pa.field("uncompressed_size", pa.uint32(), False),
    ]
    schema = pa.schema(fields)
    sink = pa.BufferOutputStream()
    w = ipc.new_stream(sink, schema)
    schema_size = schema.serialize().size  # the writer emits the schema with the first batch
    lines = []
    for a in range(0, len(rows), per_batch):
        chunk = rows[a : a + per_batch]
        batch = pa.record_batch(
            [
                pa.array([r[0] for r in chunk], pa.int32()),
                pa.array([r[1] for r in chunk], pa.int32()),
                pa.array([r[2] for r in chunk], pa.int32()),
                pa.array([r[4] for r in chunk], pa.list_(pa.uint64())),
                pa.array([r[3] for r in chunk], pa.list_(pa.uint64())),
                pa.array([r[5] for r in chunk], pa.binary()),
                pa.array([len(r[5]) for r in chunk], pa.uint32()),
            ],
            schema=schema,
        )
        start = max(sink.tell(), schema_size)
        w.write_batch(batch)
        size = sink.tell() - start
        assert size == batch.serialize().size
        for i, r in enumerate(chunk):
            lines.append(f"{r[0]},{r[1]},{r[2]},{start},{size},{i}")
    w.close()
    path.write_bytes(sink.getvalue().to_pybytes())
    path.with_suffix(".csv").write_text(
        f"# schema_size={schema_size}\nx,y,z,offset,size,batch_idx\n" + "\n".join(lines) + "\n"
    )


def test_multirow_batches_and_two_files(tmp_path):
    (tmp_path / "s0").mkdir()
    rows_a = [
        (x, y, 0, [x + 1, 7], [x + 1, 7], bytes([x, y]) * 5) for x in range(4) for y in range(2)
    ]
    rows_b = [(x, 0, 1, [100 + x], [5], bytes([9, x])) for x in range(3)]
    _write_shard(tmp_path / "s0" / "0_0_0.arrow", rows_a, per_batch=3)
    _write_shard(tmp_path / "s0" / "0_0_64.arrow", rows_b, per_batch=2)
    s = ShardsSource(tmp_path)
    assert s.info().scale(0).grid == (4, 2, 2)
    t = _all(s, 0, 0, 1 << 64)
    assert t.num_rows == 11
    want = {(r[0], r[1], r[2]): r[5] for r in rows_a + rows_b}
    got = dict(
        zip(
            zip(t["x"].to_pylist(), t["y"].to_pylist(), t["z"].to_pylist(), strict=False),
            t["data"].to_pylist(),
            strict=False,
        )
    )
    assert got == want
    assert s.map_supervoxels(np.array([100, 101, 102, 1, 7], np.uint64)).tolist() == [5, 5, 5, 1, 7]


def test_mapping_conflict_is_reported_not_refused(tmp_path):
    """One supervoxel with two bodies (no DVID run writes that): the body of the record
    written last is exported and the disagreement is an anomaly naming the supervoxel."""
    (tmp_path / "s0").mkdir()
    _write_shard(
        tmp_path / "s0" / "0_0_0.arrow",
        [
            (0, 0, 0, [5, 6], [7, 6], b"a"),
            (1, 0, 0, [5], [8], b"b"),
        ],
    )
    s = ShardsSource(tmp_path)
    assert s.map_supervoxels(np.array([5, 6], np.uint64)).tolist() == [8, 6]
    (c,) = [a for a in s.anomalies if a["kind"] == "mapping_conflict"]
    assert "supervoxel 5 is mapped to body 8" in c["reason"] and "7" in c["reason"]
    assert _all(s, 0, 0, 1 << 64).num_rows == 2


def _kinds(s: ShardsSource) -> dict[str, int]:
    """Anomaly counts without the note every hand-made directory gets (it has no export.log)."""
    return {k: v for k, v in s.anomaly_counts().items() if k != "no_export_log"}


def _sidecar(d: Path, rows: str) -> None:
    (d / "s1" / f"{NAME}.csv").write_text("# schema_size=688\nx,y,z,offset,size,batch_idx\n" + rows)


def test_bad_inputs(tmp_path, shared_data, spec, src):
    with pytest.raises(UserError, match="does not exist"):
        open_source(f"shards://{tmp_path}/nope")
    with pytest.raises(UserError, match="unknown parameter"):
        open_source(f"shards://{tmp_path}?bogus=1")
    with pytest.raises(UserError, match="no s<scale>"):
        open_source(f"shards://{tmp_path}")
    # a spec whose grid does not contain the blocks
    small = tmp_path / "small.json"
    small.write_text(
        '{"scales": [{"size": [64, 64, 64]}, {"size": [64, 64, 64], "chunk_sizes": [[64,64,64]]}]}'
    )
    s = ShardsSource(_arrange(tmp_path / "g", shared_data), spec=str(small))
    assert _kinds(s) == {"outside_grid": 258}  # exported on a grown grid, each reported
    assert _all(s, 1, 0, 1 << 64).num_rows == 258
    # a scale directory that resolves outside the root
    out = tmp_path / "escape"
    out.mkdir()
    os.symlink(_arrange(tmp_path / "elsewhere", shared_data) / "s1", out / "s1")
    with pytest.raises(UserError, match="outside"):
        ShardsSource(out)
    # nothing but a file that is no Arrow stream: nothing to export, said in one line
    junk = tmp_path / "junk"
    (junk / "s0").mkdir(parents=True)
    (junk / "s0" / "0_0_0.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(UserError, match=r"no exportable block.*bytes 0\.\.16 are not Arrow IPC"):
        ShardsSource(junk)
    # ... beside a good shard it is reported and the good shard exported
    _arrange(junk, shared_data)
    s = ShardsSource(junk)
    assert _kinds(s) == {"unreadable": 1} and _all(s, 1, 0, 1 << 64).num_rows == 258
    shutil.rmtree(junk)


def test_dangling_sidecar_rows(tmp_path, shared_data, spec, src):
    """A sidecar row is dangling when it does not point at its block's record — past the end
    of the file, inside the file at no record, at another block's record, at a batch row
    that does not exist: each is reported with the row's block and why; the stream is the
    truth, so every record is still exported exactly once."""
    d = _arrange(tmp_path, shared_data, with_csv=False)
    good = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()[2:]
    bad = [
        "509,413,469,688,99999999,0",  # past the end of the file
        "509,413,469,700,792,0",  # inside the file, where no record starts
        "508,413,469,688,792,0",  # the record there is (509, 413, 469)
        "509,413,469,688,792,3",  # row 3 of a one-row batch
        "-1,413,469,688,792,0",  # a negative coordinate
    ]
    _sidecar(d, "\n".join(good + bad) + "\n")
    s = ShardsSource(d, spec=str(spec))
    assert _kinds(s) == {"dangling_row": 5}
    rows = [a for a in s.anomalies if a["kind"] == "dangling_row"]
    assert [a["block"] for a in rows] == [(509, 413, 469)] * 2 + [(508, 413, 469), (509, 413, 469), None]
    assert "past the end of the 1131168-byte file" in rows[0]["reason"]
    assert "no record starts there" in rows[1]["reason"]
    assert "hold the record of block (509, 413, 469)" in rows[2]["reason"]
    assert [a["lost"] for a in rows] == [False, False, True, False, True]  # 508 has no record
    assert _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))
    t = s.anomalies_table()
    t = t.filter(pa.compute.equal(t["kind"], "dangling_row"))
    assert t.num_rows == 5 and set(t["file"].to_pylist()) == {f"s1/{NAME}.csv"}
    assert t["scale"].to_pylist() == [1] * 5 and t["lost"].to_pylist() == [False, False, True, False, True]
    # the Morton code of a row's block is stored where the block is on the grid
    assert t["morton"].to_pylist()[0] == 0x7F4F7C7 and t["x"].to_pylist()[-1] is None


def test_sidecar_variants(tmp_path, shared_data, spec, src):
    """Older headers (x,y,z,rec,offset,size) check the same; a sidecar that cannot be read
    (unknown header, a line cut by a killed export, no rows at all) never costs a block: the
    stream is indexed without it and the sidecar's problem reported."""
    new = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()[2:]
    lines = ["x,y,z,rec,offset,size"]
    for i, line in enumerate(new):
        x, y, z, off, size, _b = line.split(",")
        lines.append(f"{x},{y},{z},{i},{off},{size}")
    d = _arrange(tmp_path, shared_data, with_csv=False)
    csv = d / "s1" / f"{NAME}.csv"
    csv.write_text("\n".join(lines) + "\n")
    s = ShardsSource(d, spec=str(spec))
    assert _kinds(s) == {} and _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))
    # an offset without a size: the rows are checked by their record numbers (this header
    # once took the offset branch and failed on the missing sizes with a TypeError)
    csv.write_text("\n".join(["x,y,z,offset,rec"] + [f"{ln.split(',')[0]},{ln.split(',')[1]},"
                                                      f"{ln.split(',')[2]},{ln.split(',')[3]},{i}"
                                                      for i, ln in enumerate(new)]) + "\n")
    s = ShardsSource(d, spec=str(spec))
    assert _kinds(s) == {} and _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))
    for text, kinds, words in [
        ("a,b,c\n1,2,3\n", {"bad_sidecar": 1, "unlisted": 1}, "unknown header"),
        ("# schema_size=0\nx,y,z,offset,size,batch_idx\n" + "\n".join(new[:10]) + "\n509,4",
         {"bad_sidecar": 1, "unlisted": 1}, "ends inside a line"),
        ("", {"empty_sidecar": 1}, "0-byte sidecar"),
        ("# schema_size=0\nx,y,z,offset,size,batch_idx\n", {"empty_sidecar": 1}, "header-only"),
    ]:
        csv.write_text(text)
        s = ShardsSource(d, spec=str(spec))
        assert _kinds(s) == kinds, (text[:40], s.anomalies)
        first = next(a for a in s.anomalies if a["kind"] in ("bad_sidecar", "empty_sidecar"))
        assert words in first["reason"] and first["lost"] is False
        assert _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))
    unlisted = next(a for a in s.anomalies if a["kind"] != "no_export_log")
    assert "258 records" in unlisted["reason"]


def test_partial_sidecar_lists_fewer_records(tmp_path, shared_data, spec, src):
    """A sidecar listing only some blocks: the others are indexed from the stream, exported
    byte for byte, and counted as unlisted."""
    lines = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()
    keep = lines[:2] + lines[2::3]
    d = _arrange(tmp_path, shared_data, with_csv=False)
    (d / "s1" / f"{NAME}.csv").write_text("\n".join(keep) + "\n")
    s = ShardsSource(d, spec=str(spec))
    assert _kinds(s) == {"unlisted": 1}
    (u,) = [a for a in s.anomalies if a["kind"] == "unlisted"]
    assert u["blocks"] == 258 - 86 and u["lost"] is False
    assert _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))


def _rows(n: int, z: int = 0, label: int = 10):
    return [(x, y, z, [x + label], [x + label], bytes([x, y, z]) * 7) for x in range(n) for y in range(2)]


def test_hand_made_quirks(tmp_path, caplog):
    """What no DVID run leaves but a damaged copy can: a record cut by the end of the file,
    all-zero blocks with label list [0], the same block twice in a stream, a block in two
    files, a sidecar without its shard, a 0-byte shard — each exported where it can be and
    reported with coordinates; nothing else of the directory is lost."""
    (tmp_path / "s0").mkdir()
    rows = _rows(3)
    rows.append((3, 0, 0, [0], [0], b"zero-block"))
    f = tmp_path / "s0" / "0_0_0.arrow"
    _write_shard(f, rows)
    # the file cut inside the last record, its end marker and the end of the sidecar gone
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 8 - 3])
    # a second file repeating block (0, 1, 0), written later
    g = tmp_path / "s0" / "0_0_64.arrow"
    _write_shard(g, [(0, 1, 0, [10], [99], b"newer copy"), (5, 5, 1, [50], [50], b"x" * 9)])
    t0 = f.stat().st_mtime
    os.utime(g, (t0 + 5, t0 + 5))
    os.utime(g.with_suffix(".csv"), (t0 + 5, t0 + 5))
    (tmp_path / "s0" / "64_0_0.csv").write_text("x,y,z,offset,size,batch_idx\n1,1,1,0,100,0\n")
    (tmp_path / "s0" / "0_64_0.arrow").write_bytes(b"")
    with caplog.at_level("WARNING", logger="dvidetl.sources.shards"):
        s = ShardsSource(tmp_path)
    k = _kinds(s)
    assert k == {"truncated": 1, "dangling_row": 1, "duplicate": 1, "missing_shard": 1,
                 "empty_file": 1}, s.anomalies
    (tr,) = [a for a in s.anomalies if a["kind"] == "truncated"]
    assert tr["block"] == (3, 0, 0) and tr["lost"] and tr["blocks"] == 1
    (dg,) = [a for a in s.anomalies if a["kind"] == "dangling_row"]
    assert dg["block"] == (3, 0, 0) and "ends inside that record" in dg["reason"]
    (dup,) = [a for a in s.anomalies if a["kind"] == "duplicate"]
    assert dup["block"] == (0, 1, 0) and "0_0_64.arrow, written later" in dup["reason"]
    t = _all(s, 0, 0, 1 << 64)
    got = dict(zip(zip(t["x"].to_pylist(), t["y"].to_pylist(), t["z"].to_pylist(), strict=True),
                   t["data"].to_pylist(), strict=True))
    want = {(r[0], r[1], r[2]): r[5] for r in rows[:-1]}
    want[(0, 1, 0)] = b"newer copy"
    want[(5, 5, 1)] = b"x" * 9
    assert got == want
    # the mapping of exactly the exported records: the newer file's body for supervoxel 10
    assert s.map_supervoxels(np.array([10, 11, 50], np.uint64)).tolist() == [99, 11, 50]
    assert "truncated" in caplog.text and "(3, 0, 0)" in caplog.text


def test_all_zero_blocks_are_noted(tmp_path):
    (tmp_path / "s0").mkdir()
    _write_shard(tmp_path / "s0" / "0_0_0.arrow", [*_rows(1), (3, 0, 0, [0], [0], b"zero-block")])
    s = ShardsSource(tmp_path)
    assert _kinds(s) == {"background_block": 1}
    assert [a["block"] for a in s.anomalies if a["kind"] == "background_block"] == [(3, 0, 0)]
    assert _all(s, 0, 0, 1 << 64).num_rows == 3


def test_every_cut_of_a_stream(tmp_path, shared_data):
    """A stream cut at any byte (a killed export, a partial copy) opens: the records wholly
    before the cut are served byte for byte, the cut record is reported (with its block when
    its coordinate buffers were written), never an OSError."""
    whole = (shared_data / "mcns-shard" / f"{NAME}.arrow").read_bytes()
    (tmp_path / "s1").mkdir()
    f = tmp_path / "s1" / f"{NAME}.arrow"
    ref = ShardsSource(_arrange(tmp_path / "ref", shared_data, with_csv=False))
    full = _all(ref, 1, 0, 1 << 64)
    from dvidetl.sources._shard_files import message_offsets

    off, size, _ = message_offsets(tmp_path / "ref" / "s1" / f"{NAME}.arrow")
    rng = np.random.default_rng(7)
    cuts = sorted({*rng.integers(700, len(whole) - 9, 40).tolist(), int(off[3]), int(off[3]) + 1,
                   int(off[3] + size[3]), int(off[3]) + 300, len(whole) - 8})
    for cut in cuts:
        f.write_bytes(whole[:cut])
        s = ShardsSource(tmp_path)
        whole_before = int(np.sum(off + size <= cut))
        t = _all(s, 1, 0, 1 << 64)
        assert t.num_rows == whole_before, cut
        assert full.filter(pa.compute.is_in(full["morton"], t["morton"])).equals(t)
        k = _kinds(s)
        inside = bool(np.any((off < cut) & (off + size > cut)))
        assert k == ({"truncated": 1} if inside else {"unterminated": 1}), (cut, s.anomalies)
        assert all(a["lost"] for a in s.anomalies if a["kind"] != "no_export_log")


def test_a_stream_cut_before_its_first_record_is_one_problem(tmp_path, shared_data):
    """A shard cut inside its schema message or inside its first record batch (an export
    killed just after it created the file) holds no block: one "truncated" problem for the
    file (not also "no stream in it"), a one-line error when no shard has a block — never a
    traceback (a cut first batch raised ValueError)."""
    from dvidetl.sources._shard_files import message_offsets

    src = shared_data / "mcns-shard" / f"{NAME}.arrow"
    whole = src.read_bytes()
    off, size, _ = message_offsets(src)
    (tmp_path / "s1").mkdir()
    f = tmp_path / "s1" / f"{NAME}.arrow"
    for cut in (1, 4, 8, 100, int(off[0]) - 1, int(off[0]), int(off[0]) + 8, int(off[0] + size[0]) - 1):
        f.write_bytes(whole[:cut])
        with pytest.raises(UserError) as e:
            ShardsSource(tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and "no exportable block in 1 shard file(s); 2 problem(s)" in msg, (cut, msg)
        if cut == off[0]:  # the schema whole, then nothing: a stream without its end marker
            assert f"the first: s1/{NAME}.arrow: the current stream has no end-of-stream marker" in msg, msg
        else:
            assert f"the first: s1/{NAME}.arrow: the file ends" in msg and "killed while writing it" in msg, (cut, msg)


def test_arrow_ipc_file_format(tmp_path, shared_data, file_table):
    """Shards written as Arrow IPC files (other tools) read like DVID's streams, with or
    without a sidecar."""
    from dvidetl.sources._shard_files import message_offsets

    for with_csv in (False, True):
        d = tmp_path / f"f{with_csv}"
        (d / "s1").mkdir(parents=True)
        out = d / "s1" / f"{NAME}.arrow"
        with ipc.new_file(str(out), file_table.schema) as w:
            for b in file_table.to_batches(max_chunksize=1):
                w.write_batch(b)
        if with_csv:  # offsets of each record batch message, found by walking the file
            off, size, _ = message_offsets(out)
            out.with_suffix(".csv").write_text("x,y,z,offset,size,batch_idx\n" + "".join(
                f"{x},{y},{z},{o},{n},0\n" for x, y, z, o, n in zip(
                    file_table["chunk_x"].to_pylist(), file_table["chunk_y"].to_pylist(),
                    file_table["chunk_z"].to_pylist(), off.tolist(), size.tolist(), strict=True)))
        s = ShardsSource(d)
        t = _all(s, 1, 0, 1 << 64)
        assert t.num_rows == file_table.num_rows and not _kinds(s)
        assert sorted(t["data"].to_pylist()) == sorted(file_table["dvid_compressed_block"].to_pylist())
        assert s.map_supervoxels(np.array([0], np.uint64)).tolist() == [0]


def test_walker_against_pyarrow(shared_data):
    """The numba header walk finds exactly the messages pyarrow's reader finds, and the
    coordinates it reads from the buffers equal the decoded columns."""
    from dvidetl.sources._shard_files import M_BLEN, M_BODY, M_OFF, M_TYPE, T_BATCH, scan_file

    path = shared_data / "mcns-shard" / f"{NAME}.arrow"
    with pa.memory_map(str(path)) as mm:
        scan = scan_file(path, mm.read_buffer())
        mm.seek(0)
        reader = ipc.MessageReader.open_stream(mm)
        offs, ends, types = [], [], []
        while True:
            start = mm.tell()
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            offs.append(start)
            ends.append(mm.tell())
            types.append(msg.type)
    m = scan.msgs[scan.msgs[:, M_TYPE] != -1]
    assert m[:, M_OFF].tolist() == offs and (m[:, M_BODY] + m[:, M_BLEN]).tolist() == ends
    assert [t == T_BATCH for t in m[:, M_TYPE]] == [t == "record batch" for t in types]
    t = ipc.open_stream(path.read_bytes()).read_all()
    assert scan.readable.all()
    assert scan.xyz.tolist() == np.stack([t[c].to_numpy() for c in ("chunk_x", "chunk_y", "chunk_z")], 1).tolist()


def test_anomalies_through_flight(tmp_path, shared_data):
    """The Flight server counts and serves a source's anomalies (``anomalies_table``) by
    number, and answers none for a source without them; the stored table is the wire table
    with the run's id."""
    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.sources.base import ANOMALIES_SCHEMA
    from dvidetl.tables import schema as S

    assert S.SOURCE_ANOMALIES.names == ["run_id", *ANOMALIES_SCHEMA.names]
    assert all(S.SOURCE_ANOMALIES.field(f.name).type == f.type for f in ANOMALIES_SCHEMA)
    lines = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()
    d = _arrange(tmp_path, shared_data, with_csv=False)
    _sidecar(d, "\n".join(lines[2:5] + ["509,413,469,700,792,0"] * 3) + "\n")
    src = ShardsSource(d)
    want = src.anomalies_table()
    assert want.num_rows == 5  # 3 dangling rows, the unlisted records, no export.log
    with start_server(src) as srv, FlightClient(srv.location, uuid="u1", instance="segmentation") as c:
        kc = c.count_keys("anomalies", 0)
        assert kc.cells.tolist() == list(range(5)) and kc.rows.tolist() == [1] * 5
        got = pa.Table.from_batches(list(c.read_anomalies())).replace_schema_metadata(None)
        assert got.equals(want)
        part = pa.Table.from_batches(list(c.read_anomalies(1, 3))).replace_schema_metadata(None)
        assert part.equals(want.slice(1, 2))
        assert list(c.read_anomalies(7, 9)) == []
    syn = open_source("synthetic://tiny?size=64,64,64")
    with start_server(syn) as srv, FlightClient(srv.location, uuid=syn.info().uuid, instance=syn.info().instance) as c:
        assert c.count_keys("anomalies", 0).cells.size == 0 and list(c.read_anomalies()) == []


def test_corrupt_zstd_frame_goes_to_export_errors(tmp_path, file_table, cluster, capsys):
    """A record whose zstd frame is damaged (no DVID run writes one; a bad disk does): the
    source serves it as stored, the export puts it in export_errors with its coordinates and
    the codec's reason, exports the others, and run and verify say so."""
    from dvidetl.cli import main as cli
    from dvidetl.sinks import open_sink

    t = file_table.slice(0, 6)
    data = t["dvid_compressed_block"].to_pylist()
    bad = bytearray(data[2])
    bad[len(bad) // 2: len(bad) // 2 + 16] = b"\xff" * 16  # inside the frame, header intact
    data[2] = bytes(bad)
    rows = [(x, y, z, sv, lab, d) for x, y, z, sv, lab, d in zip(
        t["chunk_x"].to_pylist(), t["chunk_y"].to_pylist(), t["chunk_z"].to_pylist(),
        t["supervoxels"].to_pylist(), t["labels"].to_pylist(), data, strict=True)]
    (tmp_path / "src" / "s1").mkdir(parents=True)
    _write_shard(tmp_path / "src" / "s1" / "0_0_0.arrow", rows)
    url = f"shards://{tmp_path / 'src'}"
    sink = f"parquet://{tmp_path}/out"
    common = ["--uuid", "zz", "--source", url, "--sink", sink]
    assert cli(["run", *common, "--cluster", cluster.scheduler_address, "--quiet"]) == 1
    assert "1 blocks could not be exported (see export_errors)" in capsys.readouterr().err
    s = open_sink(sink, uuid="zz", instance="segmentation")
    err = s.read("export_errors")
    assert set(zip(err["x"].to_pylist(), err["y"].to_pylist(), err["z"].to_pylist(), strict=True)) == {
        tuple(rows[2][:3])}
    assert err["stage"].to_pylist()[0] == "repack" and "zstd" in err["reason"].to_pylist()[0].lower()
    assert s.read("blocks").num_rows == 5
    assert cli(["verify", *common, "--in-process"]) == 1
    assert "in export_errors 1" in capsys.readouterr().out
