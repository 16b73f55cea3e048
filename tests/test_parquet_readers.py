"""A Parquet export reads with the defaults of the ecosystem's readers (issue 15 item 1).

One small synthetic volume is exported through the real pipeline; each table directory is
then read by pandas, pyarrow (``parquet.read_table`` and ``dataset(partitioning="hive")``),
DuckDB (``read_parquet(..., hive_partitioning=true)``) and polars (``scan_parquet``), and
each must give the documented column types and the rows our own reader returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from dvidetl import read as R
from dvidetl.cli import main as cli
from dvidetl.errors import UserError
from dvidetl.sinks.parquet import ParquetSink
from dvidetl.tables import schema as S
from dvidetl.testing.layouts import to_layout_1

SRC = "synthetic://pr?size=256,192,192&scales=3&seed=5&lattice=16&bigids=1"
UUID = "pr"
TABLES = ("blocks", "block_overflow", "label_index", "mapping", "export_ledger")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from distributed import LocalCluster

    base = tmp_path_factory.mktemp("readers") / "out"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                      dashboard_address=":0") as c:
        rc = cli(["run", "--uuid", UUID, "--source", SRC, "--sink", f"parquet://{base}",
                  "--cluster", c.scheduler_address, "--partition-blocks", "32",
                  "--cell-limit", "1024", "--quiet"])
    assert rc == 0
    return base


def _root(export: Path) -> Path:
    (inst,) = [p for p in export.iterdir() if p.is_dir()]
    return inst / UUID


def _expected(export: Path, table: str) -> pa.Table:
    ex = R.open_export(f"parquet://{export}")
    return ex.sink.read(table) if table != "export_ledger" else ex.sink.ledger()


def _sorted(t: pa.Table) -> pa.Table:
    keys = [n for n in ("scale", "morton", "label", "supervoxel", "x", "y", "z", "column",
                        "part", "lo") if n in t.schema.names]
    return t.sort_by([(k, "ascending") for k in keys])


def test_layout_has_no_hive_names_and_records_its_version(export):
    root = _root(export)
    assert json.loads((root / "layout.json").read_text()) == {"layout": 3, "format": S.FORMAT}
    names = [p.name for p in root.rglob("*") if p.is_dir()]
    assert not [n for n in names if "=" in n], names
    assert (root / "blocks" / "scale-0").is_dir()


@pytest.mark.parametrize("table", TABLES)
def test_plain_readers_agree_with_the_export(export, table):
    d = str(_root(export) / table)
    want = _expected(export, table)
    assert want.num_rows > 0, f"{table}: the test volume must give rows"
    sch = S.schema(table)

    t1 = pq.read_table(d)
    t2 = ds.dataset(d, format="parquet", partitioning="hive").to_table()
    for t in (t1, t2):
        assert t.schema.equals(sch, check_metadata=False), (table, t.schema)
        assert t.num_rows == want.num_rows

    if table != "export_ledger":  # the ledger's timestamps compare as written
        assert _sorted(t1.cast(sch)).equals(_sorted(want.cast(sch)))

    df = pd.read_parquet(d)
    assert len(df) == want.num_rows
    for f in sch:
        if pa.types.is_integer(f.type):
            assert str(df[f.name].dtype) == str(f.type.to_pandas_dtype().__name__), f.name

    con = duckdb.connect()
    n, = con.execute(f"SELECT count(*) FROM read_parquet('{d}/**/*.parquet', "
                     "hive_partitioning=true)").fetchone()
    assert n == want.num_rows
    cols = {r[0]: r[1] for r in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{d}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()}
    assert list(cols) == sch.names  # no extra hive column
    if "scale" in cols:
        assert cols["scale"] == "UTINYINT"

    lf = pl.scan_parquet(f"{d}/**/*.parquet")
    assert lf.select(pl.len()).collect().item() == want.num_rows
    assert lf.collect_schema().names() == sch.names


def test_pushdown_by_scale_and_morton_with_a_plain_reader(export):
    d = str(_root(export) / "blocks")
    want = _expected(export, "blocks")
    m1 = sorted(m for s, m in zip(want.column("scale").to_pylist(),
                                  want.column("morton").to_pylist(), strict=True) if s == 1)
    lo, hi = m1[len(m1) // 4], m1[3 * len(m1) // 4]
    sel = ds.dataset(d, format="parquet").to_table(
        filter=(ds.field("scale") == 1) & (ds.field("morton") >= lo) & (ds.field("morton") < hi))
    exp = [m for s, m in zip(want.column("scale").to_pylist(), want.column("morton").to_pylist(),
                             strict=True) if s == 1 and lo <= m < hi]
    assert sorted(sel.column("morton").to_pylist()) == sorted(exp)
    assert 0 < len(exp) < len(m1)


def test_layout_1_exports_still_read(export, tmp_path):
    """An export written before layout.json (``scale=<s>``, ``run=<id>`` directories) reads
    as before through the sink, the read API and verify's sink side."""
    old = tmp_path / "old"
    shutil.copytree(export, old)
    root = _root(old)
    to_layout_1(root)
    # and the table format of its time: the zstd payload was called "body"
    legacy = {"payload_size": "body_size", **{f"payload{i}": f"body{i}" for i in range(4)}}
    for f in sorted(root.glob("blocks/scale=*/*.parquet")):
        t = pq.ParquetFile(f).read()
        pq.write_table(t.rename_columns([legacy.get(n, n) for n in t.column_names]), f)
    for f in sorted(root.glob("block_overflow/scale=*/*.parquet")):
        t = pq.ParquetFile(f).read()
        col = pc.if_else(pc.equal(t["column"], "payload"), "body", t["column"])
        pq.write_table(t.set_column(t.schema.get_field_index("column"), "column", col), f)
    sink = ParquetSink(old, uuid=UUID, instance=root.parent.name)
    assert sink.layout == 1 and sink.format == 1
    for table in ("blocks", "label_index", "mapping"):
        assert sink.read(table).num_rows == _expected(export, table).num_rows
    assert sink.ledger().num_rows == _expected(export, "export_ledger").num_rows
    ex = R.open_export(f"parquet://{old}")
    assert ex.raw_block(*_first_block(export)) is not None


def _first_block(export: Path) -> tuple[int, int, int, int]:
    t = _expected(export, "blocks")
    return tuple(int(t.column(c)[0].as_py()) for c in ("scale", "x", "y", "z"))


def test_a_newer_layout_is_refused_clearly(export, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(export, new)
    (_root(new) / "layout.json").write_text('{"layout": 9}')
    with pytest.raises(UserError, match="layout 9.*upgrade dvidetl"):
        ParquetSink(new, uuid=UUID, instance=_root(new).parent.name)
