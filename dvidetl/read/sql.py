"""SQL over a Parquet export: ``connect(DIR)`` gives a DuckDB connection with one view per
table over the committed files only (a half-written run never shows partial or duplicate
rows), and ``block_rows`` / ``reassemble_block`` get one block back from it. (For the same
reads on every sink, ``dvidetl.read.open_export``.)"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from dvidetl.tables import schema as S
from dvidetl.tables.cells import reassemble

# Imports inside functions load numba (dvidetl.codec), DuckDB, Parquet, ssl, the plugin registry's
# entry points, the compression libraries only where used: importing this module must not (CLI
# start-up, processes that never call them).


def _find_volume(base: Path, uuid: str | None, instance: str | None) -> tuple[str, str]:
    """(instance, uuid) under a Parquet export directory: given, or the only one there."""
    from dvidetl.sinks import find_export

    return find_export(f"parquet://{base}", uuid, instance)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _current_names(table: str, fmt: int) -> str:
    """The select list that shows a format-``fmt`` table under this format's names (``*`` for
    this format): SQL sees one format, as ``ParquetSink.read`` does."""
    if fmt == S.FORMAT:
        return "*"
    out = "*"
    if table == "block_overflow":
        old, new = _sql_str(S.OVERFLOW_PAYLOAD[fmt]), _sql_str(S.OVERFLOW_PAYLOAD[S.FORMAT])
        out += f' REPLACE (CASE WHEN "column" = {old} THEN {new} ELSE "column" END AS "column")'
    renames = [(S.stored_name(table, c, fmt), c) for c in S.schema(table).names
               if S.stored_name(table, c, fmt) != c]
    if renames:
        out += " RENAME (" + ", ".join(f'"{o}" AS "{n}"' for o, n in renames) + ")"
    return out


def connect(
    path: str | os.PathLike,
    *,
    uuid: str | None = None,
    instance: str | None = None,
    run_id: str | None = None,
    database: str = ":memory:",
):
    """A DuckDB connection with views ``blocks``, ``block_overflow``, ``label_index``,
    ``mapping``, ``export_errors`` (committed files of the run, default the latest) and
    ``export_ledger`` (every run). ``path`` is the Parquet sink directory (``parquet://``
    prefix accepted). Empty tables are empty views with the right columns."""
    import duckdb

    from dvidetl.sinks.parquet import ParquetSink

    p = str(path)
    if p.startswith("parquet://"):
        p = p[len("parquet://"):]
    base = Path(p)
    instance, uuid = _find_volume(base, uuid, instance)
    sink = ParquetSink(base, uuid=uuid, instance=instance)
    run_id = run_id or sink.latest_run()
    con = duckdb.connect(database)
    for table in S.TABLES:
        if table == "export_ledger":
            files = [str(f) for f in sink.ledger_files()]
        else:
            files = [str(f) for f in sink.committed_files(table, run_id=run_id)] if run_id else []
        if files:
            lst = "[" + ", ".join(_sql_str(f) for f in files) + "]"
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT {_current_names(table, sink.format)} "
                        f"FROM read_parquet({lst})")
        else:
            # a real (empty) table, not a view of a registered Arrow object: registrations
            # are per cursor, and block_rows queries on a cursor of its own
            con.register(f"_empty_{table}", S.empty(table))
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _empty_{table}")
            con.unregister(f"_empty_{table}")
    con.execute(f"CREATE OR REPLACE MACRO dvidetl_run_id() AS {_sql_str(run_id or '')}")
    return con


def block_rows(con, scale: int, x: int, y: int, z: int) -> tuple[pa.Table, pa.Table]:
    """The ``blocks`` row(s) of one block and its ``block_overflow`` rows, as Arrow.
    Runs on its own cursor, so a caller's unfinished result on ``con`` does not matter."""
    con = con.cursor()
    b = con.sql(
        "SELECT * FROM blocks WHERE scale = ? AND x = ? AND y = ? AND z = ?",
        params=[int(scale), int(x), int(y), int(z)],
    ).to_arrow_table()
    b = S.conform("blocks", b)
    if b.num_rows == 0:
        return b, S.empty("block_overflow")
    mortons = [int(m) for m in b.column("morton").to_pylist()]
    o = con.sql(
        "SELECT * FROM block_overflow WHERE scale = ? AND list_contains(?, morton)",
        params=[int(scale), mortons],
    ).to_arrow_table()
    return b, S.conform("block_overflow", o)


def reassemble_block(con, scale: int, x: int, y: int, z: int, *, raw: bool = True) -> bytes | None:
    """One exported block put back together: with ``raw=True`` (default) the exact DVID
    block bytes (label table joined back into the unzstd'ed payload), else the zstd payload as
    stored (cells ``payload0..3`` joined with ``binary_join_element_wise``, plus overflow parts).
    None if the block is not in the export (absent or all-background)."""
    b, o = block_rows(con, scale, x, y, z)
    if b.num_rows == 0:
        return None
    if b.num_rows > 1:
        raise ValueError(f"block ({x}, {y}, {z}) of scale {scale} is exported {b.num_rows} times")
    r = reassemble(b, o)
    payload = r.column("payload")[0].as_py()
    if not raw:
        return payload
    from dvidetl.codec import restore_block

    return restore_block(r.column("supervoxels")[0].values.to_numpy(), payload)

