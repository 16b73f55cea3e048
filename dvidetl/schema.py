"""The one definition of the exported tables (same names and columns in every sink).

Every sink (Parquet, VastDB) stores exactly these Arrow schemas, so a reader written against
one works against the other. The tables:

``blocks``          one row per stored block: its label table (``supervoxels``, stored order),
                    the body of each entry (``labels``), voxels per entry (``sv_voxels``), the
                    size and CRC32 of the original (unwrapped) DVID block, and the zstd "body"
                    (the block without its N x 8 label bytes, see ``dvidetl.codec.split_block``)
                    cut into cells ``body0..body3`` of at most ``cell_limit`` bytes each.
``block_overflow``  what does not fit in ``blocks`` cells: body parts 4.. (``column="body"``,
                    ``part`` = 4, 5, ...), and list columns whose cell would pass the limit
                    (``column`` = ``supervoxels`` / ``labels`` / ``sv_voxels``: the list's
                    little-endian values, cut into parts 0..k; the ``blocks`` cell is then null).
``label_index``     (label, supervoxel, block) rows of the scale-0 label indices.
``mapping``         non-identity supervoxel -> body pairs at the UUID.
``export_ledger``   one row per finished partition of a run (written with the partition).
``export_errors``   blocks that could not be exported: the reason and the original bytes as
                    served (still wrapped), cut into cell-limit parts, one row per part.

Why cells: VastDB limits a cell to about 126 KiB; coarse scales reach 1.5 MB bodies and
119,000-entry label tables. Cutting is lossless and the reader reassembles (see
``dvidetl.cells.reassemble``).
"""

from __future__ import annotations

import pyarrow as pa

#: VastDB's cell limit, 126 KiB; every binary / list cell we write stays at or below it.
DEFAULT_CELL_LIMIT = 126 * 1024  # 129,024 bytes
#: body cells kept in the ``blocks`` row; more parts go to ``block_overflow``.
BODY_CELLS = 4
BODY_COLUMNS = tuple(f"body{i}" for i in range(BODY_CELLS))
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
        ("body_size", pa.uint32()),
        ("nparts", pa.uint8()),
        *[(c, pa.binary()) for c in BODY_COLUMNS],
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
        ("bytes_out", pa.uint64()),  # payload bytes written (bodies + lists)
        ("seconds", pa.float64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
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

#: table name -> schema (names are stable API)
TABLES: dict[str, pa.Schema] = {
    "blocks": BLOCKS,
    "block_overflow": BLOCK_OVERFLOW,
    "label_index": LABEL_INDEX,
    "mapping": MAPPING,
    "export_ledger": EXPORT_LEDGER,
    "export_errors": EXPORT_ERRORS,
}

#: key columns per table (unique together within one export)
KEYS: dict[str, tuple[str, ...]] = {
    "blocks": ("scale", "morton"),
    "block_overflow": ("scale", "morton", "column", "part"),
    "label_index": ("label", "supervoxel", "x", "y", "z"),
    "mapping": ("supervoxel",),
    "export_ledger": ("run_id", "kind", "scale", "lo", "hi"),
    "export_errors": ("run_id", "scale", "morton", "part"),
}

#: which tables a partition of each kind writes (and a sink commits together)
KIND_TABLES: dict[str, tuple[str, ...]] = {
    "blocks": ("blocks", "block_overflow", "export_errors"),
    "indices": ("label_index",),
    "mapping": ("mapping",),
}

#: the key a label-range (indices) or supervoxel-range (mapping) partition is cut along
KEY_COLUMN: dict[str, str] = {"label_index": "label", "mapping": "supervoxel"}

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
    if missing:
        raise ValueError(f"table {name!r} is missing columns {missing}")
    t = table.select(sch.names)
    if t.schema != sch:
        t = t.cast(sch)
    return t


#: the cell cutting and reassembly, in ``dvidetl.cells``, still reachable here
_CELLS = ("nparts_of", "cut_cells", "binary_buffers", "list_as_binary", "binary_as_list",
          "join_body_cells", "reassemble")


def __getattr__(name: str):
    if name in _CELLS:
        from dvidetl import cells

        return getattr(cells, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
