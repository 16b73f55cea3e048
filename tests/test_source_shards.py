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


def test_mapping_conflict_names_supervoxel(tmp_path):
    (tmp_path / "s0").mkdir()
    _write_shard(
        tmp_path / "s0" / "0_0_0.arrow",
        [
            (0, 0, 0, [5, 6], [7, 6], b"a"),
            (1, 0, 0, [5], [8], b"b"),
        ],
    )
    s = ShardsSource(tmp_path)
    with pytest.raises(UserError, match="supervoxel 5 is mapped to two bodies"):
        s.map_supervoxels(np.array([5], np.uint64))


def test_bad_inputs(tmp_path, shared_data, spec):
    with pytest.raises(UserError, match="does not exist"):
        open_source(f"shards://{tmp_path}/nope")
    with pytest.raises(UserError, match="unknown parameter"):
        open_source(f"shards://{tmp_path}?bogus=1")
    with pytest.raises(UserError, match="no s<scale>"):
        open_source(f"shards://{tmp_path}")
    # a sidecar range past the end of the file
    d = tmp_path / "bad"
    (d / "s1").mkdir(parents=True)
    os.symlink(shared_data / "mcns-shard" / f"{NAME}.arrow", d / "s1" / f"{NAME}.arrow")
    (d / "s1" / f"{NAME}.csv").write_text(
        "# schema_size=688\nx,y,z,offset,size,batch_idx\n509,413,469,688,99999999,0\n"
    )
    s = ShardsSource(d, spec=str(spec))  # a row without its record: reported, not exported
    assert s.anomaly_counts() == {"dangling_row": 1}
    assert s.anomalies[0]["block"] == (509, 413, 469) and _all(s, 1, 0, 1 << 64).num_rows == 0
    # a sidecar pointing at the wrong record
    (d / "s1" / f"{NAME}.csv").write_text(
        "# schema_size=688\nx,y,z,offset,size,batch_idx\n508,413,469,688,792,0\n"
    )
    s = ShardsSource(d, spec=str(spec))
    with pytest.raises(UserError, match=r"record there is block \(509, 413, 469\)"):
        _all(s, 1, 0, 1 << 64)
    # a spec whose grid does not contain the blocks
    small = tmp_path / "small.json"
    small.write_text(
        '{"scales": [{"size": [64, 64, 64]}, {"size": [64, 64, 64], "chunk_sizes": [[64,64,64]]}]}'
    )
    s = ShardsSource(_arrange(tmp_path / "g", shared_data), spec=str(small))
    assert s.anomaly_counts()["outside_grid"] == 258  # exported on a grown grid, each reported
    assert _all(s, 1, 0, 1 << 64).num_rows == 258
    # a scale directory that resolves outside the root
    out = tmp_path / "escape"
    out.mkdir()
    os.symlink(_arrange(tmp_path / "elsewhere", shared_data) / "s1", out / "s1")
    with pytest.raises(UserError, match="outside"):
        ShardsSource(out)
    # a non-stream file
    junk = tmp_path / "junk"
    (junk / "s0").mkdir(parents=True)
    (junk / "s0" / "0_0_0.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(UserError, match="not an Arrow IPC stream or file"):
        ShardsSource(junk)
    shutil.rmtree(junk)


def test_sidecar_with_rec_offset_size(tmp_path, shared_data, spec, src):
    """The intermediate sidecar header x,y,z,rec,offset,size (no batch_idx) is accepted."""
    new = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()[2:]
    lines = ["x,y,z,rec,offset,size"]
    for i, line in enumerate(new):
        x, y, z, off, size, _b = line.split(",")
        lines.append(f"{x},{y},{z},{i},{off},{size}")
    d = _arrange(tmp_path, shared_data, with_csv=False)
    (d / "s1" / f"{NAME}.csv").write_text("\n".join(lines) + "\n")
    s = ShardsSource(d, spec=str(spec))
    assert _all(s, 1, 0, 1 << 64).equals(_all(src, 1, 0, 1 << 64))
    (d / "s1" / f"{NAME}.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(UserError, match="sidecar header must start with x,y,z"):
        ShardsSource(d, spec=str(spec))


def test_partial_sidecar_reads_per_message(tmp_path, shared_data, spec, src):
    """A sidecar listing only some blocks (spans then hold unlisted messages): the per-message
    path serves exactly the listed blocks, byte for byte."""
    lines = (shared_data / "mcns-shard" / f"{NAME}-newformat.csv").read_text().splitlines()
    keep = lines[:2] + lines[2::3]
    d = _arrange(tmp_path, shared_data, with_csv=False)
    (d / "s1" / f"{NAME}.csv").write_text("\n".join(keep) + "\n")
    s = ShardsSource(d, spec=str(spec))
    got = _all(s, 1, 0, 1 << 64)
    assert got.num_rows == len(keep) - 2 == 86
    full = _all(src, 1, 0, 1 << 64)
    m = got["morton"].to_numpy()
    assert got.equals(full.filter(pa.array(np.isin(full["morton"].to_numpy(), m))))


def test_real_export_quirks_are_exported_and_reported(tmp_path, caplog):
    """What DVID's exporter leaves on real runs — a sidecar row whose record was never
    written, a rerun appended to the same files, all-zero blocks with label list [0] — is
    exported where it can be and reported with coordinates; nothing else of the shard is lost."""
    (tmp_path / "s0").mkdir()
    rows = [(x, y, 0, [x + 10], [x + 10], bytes([x, y]) * 7) for x in range(3) for y in range(2)]
    rows.append((3, 0, 0, [0], [0], b"zero-block"))
    f = tmp_path / "s0" / "0_0_0.arrow"
    _write_shard(f, rows)
    csv = f.with_suffix(".csv")
    text = csv.read_text()
    # a rerun into the same directory: the stream and its sidecar appended once more
    first = f.read_bytes()
    _write_shard(tmp_path / "again.arrow", rows[:2])
    again = (tmp_path / "again.arrow").read_bytes()
    shift = len(first)
    lines = (tmp_path / "again.csv").read_text().splitlines()
    moved = [ln if not ln[0].isdigit() else ",".join(
        [*ln.split(",")[:3], str(int(ln.split(",")[3]) + shift), *ln.split(",")[4:]]) for ln in lines]
    f.write_bytes(first + again)
    # ... and a row DVID wrote before the record that never came
    csv.write_text(text + "\n".join(moved) + "\n" + f"9,9,0,{shift + len(again)},500,0\n")
    with caplog.at_level("WARNING", logger="dvidetl.sources.shards"):
        s = ShardsSource(tmp_path)
        t = _all(s, 0, 0, 1 << 64)
        s.map_supervoxels(np.array([1], np.uint64))
    c = s.anomaly_counts()
    assert c == {"sidecar_rerun": 1, "duplicate": 2, "dangling_row": 1, "background_block": 1}, s.anomalies
    assert {a["block"] for a in s.anomalies if a["kind"] == "duplicate"} == {(0, 0, 0), (0, 1, 0)}
    assert [a["block"] for a in s.anomalies if a["kind"] == "dangling_row"] == [(9, 9, 0)]
    assert [a["block"] for a in s.anomalies if a["kind"] == "background_block"] == [(3, 0, 0)]
    got = dict(zip(zip(t["x"].to_pylist(), t["y"].to_pylist(), t["z"].to_pylist(), strict=True),
                   t["data"].to_pylist(), strict=True))
    assert got == {(r[0], r[1], r[2]): r[5] for r in rows}  # each block once, the zero block too
    assert "dangling_row" in caplog.text and "(9, 9, 0)" in caplog.text


def test_arrow_ipc_file_format(tmp_path, shared_data, file_table):
    """Shards written as Arrow IPC files (other tools) read like DVID's streams, with or
    without a sidecar."""
    for with_csv in (False, True):
        d = tmp_path / f"f{with_csv}"
        (d / "s1").mkdir(parents=True)
        out = d / "s1" / f"{NAME}.arrow"
        with ipc.new_file(str(out), file_table.schema) as w:
            for b in file_table.to_batches(max_chunksize=1):
                w.write_batch(b)
        if with_csv:  # offsets of each record batch message, found by walking the file
            from dvidetl.sources.shards import _scan_messages

            off, size, _ = _scan_messages(out, file_table.schema)
            out.with_suffix(".csv").write_text("x,y,z,offset,size,batch_idx\n" + "".join(
                f"{x},{y},{z},{o},{n},0\n" for x, y, z, o, n in zip(
                    file_table["chunk_x"].to_pylist(), file_table["chunk_y"].to_pylist(),
                    file_table["chunk_z"].to_pylist(), off.tolist(), size.tolist(), strict=True)))
        s = ShardsSource(d)
        t = _all(s, 1, 0, 1 << 64)
        assert t.num_rows == file_table.num_rows and not s.anomalies
        assert sorted(t["data"].to_pylist()) == sorted(file_table["dvid_compressed_block"].to_pylist())
        assert s.map_supervoxels(np.array([0], np.uint64)).tolist() == [0]
