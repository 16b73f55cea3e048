"""Table format versions (``dvidetl.tables.schema.FORMAT``): exports written before the payload
columns were renamed (format 1: ``body0..3``, ``body_size``, overflow ``column="body"``) are
read under today's names by every reader, a run resumed into one keeps its format, a new
export records format 2, and a format newer than this code is refused.

The format-1 export is a fixture written by the old code (``tests/data/format1-parquet``);
every block read back is compared with the synthetic source that made it. For VastDB the
fixture's tables are loaded as stored (their own schemas, no dvidetl code in between) into
the local VastDB server through the vastdb SDK.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dvidetl import read as R
from dvidetl.cli import main as cli
from dvidetl.errors import UserError
from dvidetl.tables import schema as S

SRC = "synthetic://f1?size=128,128,64&scales=2&seed=3&lattice=16&bigids=1"
UUID = "f1"
FIXTURE = Path(__file__).parent / "data" / "format1-parquet"
ROOT = Path("segmentation") / UUID
LEGACY = {"body_size", "body0", "body1", "body2", "body3"}
TODAY = {"payload_size", *S.PAYLOAD_COLUMNS}
ACCESS = "AKIDFORMATTEST"
SECRET = "format-test-secret-51a7"  # noqa: S105 — a test key for the local server only


@pytest.fixture
def old_export(tmp_path) -> Path:
    """A copy of the format-1 fixture (runs append to it)."""
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    return out


def _stored_blocks_columns(base: Path) -> set[str]:
    files = sorted((base / ROOT / "blocks").glob("scale-*/*.parquet"))
    assert files
    names = [set(pq.read_schema(f).names) for f in files]
    assert all(n == names[0] for n in names)
    return names[0]


def _run(url: str, cluster, *extra: str) -> None:
    assert cli(["run", "--uuid", UUID, "--source", SRC, "--sink", url, "--cluster",
                cluster.scheduler_address, "--partition-blocks", "16", "--cell-limit", "1024",
                "--quiet", *extra]) == 0


def _verify(url: str, cluster, capsys) -> str:
    capsys.readouterr()
    rc = cli(["verify", "--uuid", UUID, "--source", SRC, "--sink", url, "--cluster",
              cluster.scheduler_address])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def _assert_reads_like_source(ex: R.Export, src) -> None:
    """Every block of every scale equals the source, under today's column names."""
    names = set(ex.read("blocks").column_names)
    assert TODAY <= names and not (LEGACY & names)
    kinds = set(ex.read("block_overflow", columns=["column"]).column("column").to_pylist())
    assert "payload" in kinds and "body" not in kinds  # the fixture overflows payloads
    blocks = 0
    for s in ex.scales:
        gx, gy, gz = ex.grid(s)
        for z in range(gz):
            for y in range(gy):
                for x in range(gx):
                    want = src.block_bytes(s, x, y, z)
                    assert ex.raw_block(s, x, y, z) == want, (s, x, y, z)
                    blocks += want is not None
    assert blocks == ex.read("blocks").num_rows > 0
    st = ex.block_stats(0)  # a projection naming a renamed column
    assert int(np.sum(st.column("payload_size").to_numpy())) > 0
    np.testing.assert_array_equal(ex.block(0, 1, 1, 0, bodies=False), src.block_voxels(0, 1, 1, 0))


def test_format1_parquet_export_reads_under_todays_names(old_export, src):
    assert _stored_blocks_columns(old_export) >= LEGACY  # the fixture is format 1
    ex = R.open_export(f"parquet://{old_export}")
    assert ex.sink.format == 1
    _assert_reads_like_source(ex, src)
    # a table added since (schema.ADDED_TABLES): the old export has none, it reads empty
    assert not (old_export / ROOT / "source_anomalies").exists()
    assert ex.read("source_anomalies").schema == S.SOURCE_ANOMALIES and ex.read("source_anomalies").num_rows == 0


def test_format1_parquet_export_in_sql(old_export, src):
    con = R.connect(old_export)
    names = {r[0] for r in con.sql("DESCRIBE blocks").fetchall()}
    assert TODAY <= names and not (LEGACY & names)
    kinds = {r[0] for r in con.sql('SELECT DISTINCT "column" FROM block_overflow').fetchall()}
    assert "payload" in kinds and "body" not in kinds
    rows = con.sql("SELECT scale, x, y, z FROM blocks").fetchall()
    assert rows
    for s, x, y, z in rows:
        assert R.reassemble_block(con, s, x, y, z) == src.block_bytes(s, x, y, z)


def test_run_into_format1_export_keeps_format1_and_new_export_is_format2(
        old_export, tmp_path, src, cluster, capsys):
    url = f"parquet://{old_export}"
    layout = (old_export / ROOT / "layout.json").read_text()
    _run(url, cluster, "--overwrite")  # (a plain run refuses: the export holds a finished run)
    ex = R.open_export(url)
    assert len(ex.sink.runs()) == 2 and ex.sink.format == 1
    assert _stored_blocks_columns(old_export) >= LEGACY and not (TODAY & _stored_blocks_columns(old_export))
    ov = pq.read_table(sorted((old_export / ROOT / "block_overflow").glob("scale-*/*.parquet")))
    assert "body" in set(ov.column("column").to_pylist())  # stored as format 1 stores it
    assert (old_export / ROOT / "layout.json").read_text() == layout
    _assert_reads_like_source(ex, src)
    assert "0 differences" in _verify(url, cluster, capsys)

    new = tmp_path / "new"
    _run(f"parquet://{new}", cluster)
    assert json.loads((new / ROOT / "layout.json").read_text()) == {"layout": 3, "format": S.FORMAT}
    assert _stored_blocks_columns(new) >= TODAY and not (LEGACY & _stored_blocks_columns(new))
    _assert_reads_like_source(R.open_export(f"parquet://{new}"), src)


@pytest.mark.parametrize("layout, message", [
    ({"layout": 3, "format": 3}, "table format 3.*upgrade dvidetl"),
    ({"layout": 3, "format": "two"}, "table format 'two' is not"),
    ({"layout": 3, "format": 0}, "table format 0 is not"),
    ({"layout": 3, "format": True}, "table format True is not"),
    ({"layout": 3}, "layout 3 names no table format"),
    ({"layout": True, "format": 2}, "not a dvidetl layout file"),
    ({"layout": 9, "format": 2}, "Parquet layout 9.*upgrade dvidetl"),
])
def test_unknown_format_is_refused(old_export, layout, message):
    (old_export / ROOT / "layout.json").write_text(json.dumps(layout))
    with pytest.raises(UserError, match=message):
        R.open_export(f"parquet://{old_export}")


def test_format_names_round_trip():
    """to_stored and from_stored are inverse and touch only what format 1 named otherwise."""
    b = S.empty("blocks")
    old = S.to_stored("blocks", b, 1)
    assert set(old.column_names) - set(b.column_names) == LEGACY
    assert S.from_stored("blocks", old, 1).schema == b.schema
    assert S.format_of_columns("blocks", old.column_names) == 1
    assert S.format_of_columns("blocks", b.column_names) == S.FORMAT
    assert S.format_of_columns("blocks", [*b.column_names, "payload4"]) is None  # a newer one
    ov = pa.table({"scale": pa.array([0, 0, 1], pa.uint8()), "morton": pa.array([1, 1, 2], pa.uint64()),
                   "column": ["payload", "labels", "payload"], "part": pa.array([4, 0, 5], pa.uint16()),
                   "data": [b"a", b"b", b"c"]})
    stored = S.to_stored("block_overflow", ov, 1)
    assert stored.column("column").to_pylist() == ["body", "labels", "body"]
    assert S.from_stored("block_overflow", stored, 1).equals(ov)
    assert S.to_stored("mapping", S.empty("mapping"), 1).column_names == ["supervoxel", "body"]


# -- VastDB ------------------------------------------------------------------------------------


@pytest.fixture
def vast_old(old_export, monkeypatch):
    """The format-1 fixture's tables, as stored, in the local VastDB server."""
    import vastdb

    from dvidetl.sinks._vastdb_support import chunk_json
    from dvidetl.sinks.vastdb import EXPORT_RUNS, SORTING_KEYS
    from dvidetl.testing.vastsim import start_vastsim

    monkeypatch.setenv("VASTDB_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("VASTDB_SECRET_KEY", SECRET)
    root = old_export / ROOT
    with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as sim:
        session = vastdb.connect(endpoint=sim.endpoint, access=ACCESS, secret=SECRET)
        tables = {}
        for table in S.TABLES:
            if table in S.ADDED_TABLES:  # the old code made no such table
                continue
            files = sorted(root.glob(f"{table}/**/*.parquet"))
            tables[table] = (pq.read_table(files).replace_schema_metadata(None) if files
                             else S.empty(table))
        run_id = next((root / "runs").iterdir()).name
        plan = chunk_json((root / "runs" / run_id / "run.json").read_bytes(), S.DEFAULT_CELL_LIMIT)
        tables["export_runs"] = pa.table({
            "run_id": [run_id] * len(plan), "instance": ["segmentation"] * len(plan),
            "uuid": [UUID] * len(plan), "created": [0.0] * len(plan),
            "part": list(range(len(plan))), "nparts": [len(plan)] * len(plan), "plan": plan,
        }, schema=EXPORT_RUNS)
        with session.transaction() as tx:
            sch = tx.bucket("bucket").create_schema("old")
            for name, t in tables.items():
                vt = sch.create_table(name, t.schema, sorting_key=SORTING_KEYS.get(name, []))
                if t.num_rows:
                    vt.insert(t)
        yield f"vastdb://127.0.0.1:{sim.port}/bucket/old", session


def test_format1_vastdb_export_reads_and_resumes_in_its_format(vast_old, src, cluster, capsys):
    url, session = vast_old
    ex = R.open_export(url)
    assert ex.sink.format == 1
    _assert_reads_like_source(ex, src)
    assert ex.read("source_anomalies").num_rows == 0  # a table added since: none, read empty

    _run(url, cluster)  # a new run into the old export: written in format 1
    with session.transaction() as tx:
        assert tx.bucket("bucket").schema("old").table("source_anomalies") is not None  # made now
        t = tx.bucket("bucket").schema("old").table("blocks")
        assert LEGACY <= set(t.arrow_schema.names) and not (TODAY & set(t.arrow_schema.names))
        kinds = set(tx.bucket("bucket").schema("old").table("block_overflow")
                    .select(columns=["column"]).read_all().column("column").to_pylist())
        assert "body" in kinds and "payload" not in kinds
    ex = R.open_export(url)
    assert len(ex.sink.runs()) == 2
    _assert_reads_like_source(ex, src)
    assert "0 differences" in _verify(url, cluster, capsys)


def test_vastdb_blocks_of_an_unknown_format_are_refused(monkeypatch):
    """A blocks table whose columns match no known format (a newer dvidetl's) is refused with
    "upgrade dvidetl" on read and on prepare, not misread or "drop the table"."""
    import vastdb

    from dvidetl.sinks import open_sink
    from dvidetl.testing.vastsim import start_vastsim

    monkeypatch.setenv("VASTDB_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("VASTDB_SECRET_KEY", SECRET)
    with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as sim:
        session = vastdb.connect(endpoint=sim.endpoint, access=ACCESS, secret=SECRET)
        newer = S.BLOCKS.append(pa.field("payload4", pa.binary()))
        with session.transaction() as tx:
            tx.bucket("bucket").create_schema("new").create_table("blocks", newer)
        sink = open_sink(f"vastdb://127.0.0.1:{sim.port}/bucket/new", uuid=UUID, instance="segmentation")
        with pytest.raises(UserError, match="no table format this dvidetl knows.*upgrade dvidetl"):
            sink.read("blocks")
