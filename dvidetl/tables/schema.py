"""The one definition of the exported tables (same names and columns in every sink).

Every sink (Parquet, VastDB) stores exactly these Arrow schemas, so a reader written against
one works against the other. The tables:

``blocks``          one row per stored block: its label table (``supervoxels``, stored order),
                    the body of each entry (``labels``), voxels per entry (``sv_voxels``), the
                    size and CRC32 of the original (unwrapped) DVID block, and the zstd ``payload``
                    (the block without its N x 8 label bytes, see ``dvidetl.codec.split_block``)
                    cut into cells ``payload0..payload3`` of at most ``cell_limit`` bytes each.
``block_overflow``  what does not fit in ``blocks`` cells: payload parts 4.. (``column="payload"``,
                    ``part`` = 4, 5, ...), and list columns whose cell would pass the limit
                    (``column`` = ``supervoxels`` / ``labels`` / ``sv_voxels``: the list's
                    little-endian values, cut into parts 0..k; the ``blocks`` cell is then null).
``label_index``     (label, supervoxel, block) rows of the scale-0 label indices.
``mapping``         non-identity supervoxel -> body pairs at the UUID.
``export_ledger``   one row per finished partition of a run (written with the partition).
``export_errors``   blocks that could not be exported: the reason and the original bytes as
                    served (still wrapped), cut into cell-limit parts, one row per part.
``source_anomalies`` what the source found in its input that is not as its writer should have
                    left it, and what it did about it (``sources.base.ANOMALIES_SCHEMA`` plus
                    the run): superseded copies, dangling index rows, blocks outside the
                    grid, cut records, unfinished or leftover files of DVID's export-shards,
                    ... One row per anomaly, numbered by ``seq``; ``lost`` says the export
                    lacks blocks because of it (the run then does not end OK).

Why cells: VastDB limits a cell to about 126 KiB; coarse scales reach 1.5 MB bodies and
119,000-entry label tables. Cutting is lossless and the reader reassembles (see
``dvidetl.tables.cells.reassemble``).

Format versions (``FORMAT``): the column names above are format 2. Format 1 (dvidetl before
December 2026) called the payload ``body`` (``body0..3``, ``body_size``, overflow
``column="body"``), the word that also means a neuron id (``mapping.body``). Sinks record the
format of each export, read older formats renamed to these names (``from_stored``), append to
them in their own format (``to_stored``), and refuse a newer format than ``FORMAT``.

Additions that need no format change, because no reader of an older export misreads them:
columns added to a table (``ADDED_COLUMNS``: read as null from older exports, added by the
sinks) and tables added to the set (``ADDED_TABLES``: an older export has none, readers see
them empty, a run creates them when it prepares). ``source_anomalies`` is such a table: a
run planned by a dvidetl without it has no ``anomalies`` partition, which is how ``verify``
tells "recorded none" from "did not record them".
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.errors import UserError

#: VastDB's cell limit, 126 KiB; every binary / list cell we write stays at or below it.
DEFAULT_CELL_LIMIT = 126 * 1024  # 129,024 bytes
#: payload cells kept in the ``blocks`` row; more parts go to ``block_overflow``.
PAYLOAD_CELLS = 4
PAYLOAD_COLUMNS = tuple(f"payload{i}" for i in range(PAYLOAD_CELLS))
#: list columns of ``blocks`` that may overflow, with their value type
LIST_COLUMNS = {"supervoxels": pa.uint64(), "labels": pa.uint64(), "sv_voxels": pa.uint32()}

BLOCKS = pa.schema(
    [
        ("scale", pa.uint8()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("supervoxels", pa.list_(pa.uint64())),
        ("labels", pa.list_(pa.uint64())),
        ("sv_voxels", pa.list_(pa.uint32())),
        ("raw_size", pa.uint32()),
        ("crc32", pa.uint32()),
        ("payload_size", pa.uint32()),
        ("nparts", pa.uint8()),
        *[(c, pa.binary()) for c in PAYLOAD_COLUMNS],
        ("overflow", pa.bool_()),
    ]
)

BLOCK_OVERFLOW = pa.schema(
    [
        ("scale", pa.uint8()),
        ("morton", pa.uint64()),
        ("column", pa.string()),
        ("part", pa.uint16()),
        ("data", pa.binary()),
    ]
)

LABEL_INDEX = pa.schema(
    [
        ("label", pa.uint64()),
        ("supervoxel", pa.uint64()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("voxels", pa.uint32()),
    ]
)

MAPPING = pa.schema([("supervoxel", pa.uint64()), ("body", pa.uint64())])

EXPORT_LEDGER = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),  # "blocks" (scale, Morton range) | "indices" (label range) | "mapping"
        ("scale", pa.uint8()),
        ("lo", pa.uint64()),
        ("hi", pa.uint64()),
        ("blocks", pa.uint64()),  # blocks exported (blocks rows) / rows for other kinds
        ("rows", pa.uint64()),  # rows written over all tables of the partition
        ("errors", pa.uint64()),  # blocks that went to export_errors
        ("bytes_in", pa.uint64()),  # bytes read from the Flight server
        ("bytes_out", pa.uint64()),  # payload bytes written (zstd payloads + lists)
        ("seconds", pa.float64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("raw_bytes", pa.uint64()),  # unwrapped DVID block bytes exported (blocks partitions)
    ]
)

EXPORT_ERRORS = pa.schema(
    [
        ("run_id", pa.string()),
        ("scale", pa.uint8()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("part", pa.uint16()),
        ("nparts", pa.uint16()),
        ("data", pa.binary()),
    ]
)

#: ``sources.base.ANOMALIES_SCHEMA`` with the run that stored it (schema may not import
#: sources: ``tests/test_source_shards`` checks the two agree)
SOURCE_ANOMALIES = pa.schema(
    [
        ("run_id", pa.string()),
        ("seq", pa.uint64()),
        ("kind", pa.string()),
        ("scale", pa.uint8()),
        ("file", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("blocks", pa.uint64()),
        ("lost", pa.bool_()),
        ("detail", pa.string()),
    ]
)

#: table name -> schema (names are stable API)
TABLES: dict[str, pa.Schema] = {
    "blocks": BLOCKS,
    "block_overflow": BLOCK_OVERFLOW,
    "label_index": LABEL_INDEX,
    "mapping": MAPPING,
    "export_ledger": EXPORT_LEDGER,
    "export_errors": EXPORT_ERRORS,
    "source_anomalies": SOURCE_ANOMALIES,
}

#: key columns per table (unique together within one export)
KEYS: dict[str, tuple[str, ...]] = {
    "blocks": ("scale", "morton"),
    "block_overflow": ("scale", "morton", "column", "part"),
    "label_index": ("label", "supervoxel", "x", "y", "z"),
    "mapping": ("supervoxel",),
    "export_ledger": ("run_id", "kind", "scale", "lo", "hi"),
    "export_errors": ("run_id", "scale", "morton", "part"),
    "source_anomalies": ("run_id", "seq"),
}

#: columns added to a table after exports were first written with it: an older export's
#: rows read them as null, and a sink adds them to its stored table (VastDB: ADD COLUMN)
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {"export_ledger": ("raw_bytes",)}
#: tables added after exports were first written: an older export has none (read empty)
ADDED_TABLES = frozenset({"source_anomalies"})

#: which tables a partition of each kind writes (and a sink commits together)
KIND_TABLES: dict[str, tuple[str, ...]] = {
    "blocks": ("blocks", "block_overflow", "export_errors"),
    "indices": ("label_index",),
    "mapping": ("mapping",),
    "anomalies": ("source_anomalies",),
}

#: the key a label-range (indices), supervoxel-range (mapping) or anomaly-number range
#: (anomalies) partition is cut along
KEY_COLUMN: dict[str, str] = {"label_index": "label", "mapping": "supervoxel",
                              "source_anomalies": "seq"}

#: tables partitioned by scale (laid out under ``scale-<s>/``)
SCALED_TABLES = frozenset({"blocks", "block_overflow", "export_errors"})


def schema(name: str) -> pa.Schema:
    """Schema of a table by name; an unknown name is a clear ``KeyError``."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}: tables are {sorted(TABLES)}") from None


def empty(name: str) -> pa.Table:
    """An empty table with the table's schema."""
    return schema(name).empty_table()


def conform(name: str, table: pa.Table) -> pa.Table:
    """Select and cast ``table`` to the table's schema (column order and types), or raise
    ``ValueError`` naming the missing column. Sinks call this so nothing else gets stored."""
    sch = schema(name)
    missing = [f.name for f in sch if f.name not in table.column_names]
    for c in [c for c in ADDED_COLUMNS.get(name, ()) if c in missing]:
        table = table.append_column(sch.field(c), pa.nulls(table.num_rows, sch.field(c).type))
        missing.remove(c)
    if missing:
        raise ValueError(f"table {name!r} is missing columns {missing}")
    t = table.select(sch.names)
    if t.schema != sch:
        t = t.cast(sch)
    return t


# ---------------------------------------------------------------------------------------------
# format versions
# ---------------------------------------------------------------------------------------------

#: the table format this code writes (see the module docstring)
FORMAT = 2
#: block_overflow ``column`` value of payload parts 4.., per format
OVERFLOW_PAYLOAD = {1: "body", 2: "payload"}
#: per older format: table -> {column name now: column name stored}
_STORED_NAMES: dict[int, dict[str, dict[str, str]]] = {
    1: {"blocks": {"payload_size": "body_size",
                   **{c: f"body{i}" for i, c in enumerate(PAYLOAD_COLUMNS)}}},
}


def check_format(fmt: int, where: str) -> int:
    """``fmt`` if this code reads it; a newer (or nonsense) format is a ``UserError`` rather
    than a misread export."""
    if type(fmt) is not int or fmt < 1:  # (a JSON true is no format)
        raise UserError(f"{where}: table format {fmt!r} is not a dvidetl table format")
    if fmt > FORMAT:
        raise UserError(f"{where}: written in table format {fmt}; this dvidetl reads formats "
                        f"1..{FORMAT} — upgrade dvidetl")
    return fmt


def format_of_columns(table: str, names: list[str] | tuple[str, ...]) -> int | None:
    """The format a stored table's columns are in (its column names tell the formats apart):
    how a sink without a place for a version marker (VastDB) checks what it reads. None when
    they match no format this code knows (a newer one)."""
    have = set(names)
    for fmt in (*sorted(_STORED_NAMES), FORMAT):
        if {stored_name(table, c, fmt) for c in schema(table).names} == have:
            return fmt
    return None


def stored_name(table: str, column: str, fmt: int) -> str:
    """The name ``column`` of ``table`` is stored under in format ``fmt``."""
    return _STORED_NAMES.get(fmt, {}).get(table, {}).get(column, column)


def stored_schema(table: str, fmt: int) -> pa.Schema:
    """``table``'s schema as stored in format ``fmt``."""
    sch = schema(table)
    return pa.schema([f.with_name(stored_name(table, f.name, fmt)) for f in sch])


def _rename_payload_parts(t: pa.Table, frm: str, to: str) -> pa.Table:
    col = t.column("column")
    return t.set_column(t.schema.get_field_index("column"), "column",
                        pc.if_else(pc.equal(col, frm), pa.scalar(to, col.type), col))


def _translate(table: str, t: pa.Table, fmt: int, *, to_stored: bool) -> pa.Table:
    """Column names and overflow ``column`` values between this format and format ``fmt``."""
    if fmt == FORMAT:
        return t
    names = _STORED_NAMES[fmt].get(table, {})
    if not to_stored:
        names = {v: k for k, v in names.items()}
    if names:
        t = t.rename_columns([names.get(n, n) for n in t.column_names])
    if table == "block_overflow" and "column" in t.column_names:
        frm, to = OVERFLOW_PAYLOAD[FORMAT], OVERFLOW_PAYLOAD[fmt]
        t = _rename_payload_parts(t, frm, to) if to_stored else _rename_payload_parts(t, to, frm)
    return t


def from_stored(table: str, t: pa.Table, fmt: int) -> pa.Table:
    """A table read from a format-``fmt`` export with this format's names (and overflow
    ``column`` values): readers see one format whatever wrote the export."""
    return _translate(table, t, fmt, to_stored=False)


def to_stored(table: str, t: pa.Table, fmt: int) -> pa.Table:
    """``from_stored`` backwards: rows of this format as a format-``fmt`` export stores them
    (a run resumed into an older export stays in that export's format)."""
    return _translate(table, t, fmt, to_stored=True)

