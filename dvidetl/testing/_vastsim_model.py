"""vastsim's data model: limits, errors, catalog objects and the Arrow helpers the state
and the query evaluator share (see `dvidetl.testing.vastsim`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_ID = "$row_id"
INVALID_ROW_ID = (1 << 48) - 1  # sub-split finished marker (TABULAR_INVALID_ROW_ID)
MAX_REQUEST_BODY = 5 * 1024 * 1024  # the SDK's MAX_REQUEST_BODY_SIZE
MAX_CELL_BYTES = 126 * 1024  # "Max cell size 126KB" (VAST limits page) = 129,024 bytes
ROWS_PER_ROW_GROUP = 1 << 16
ESTIMATION_SPLIT_ID = 4294967292
DEFAULT_VERSION = "5.5.0.0"
DEFAULT_BUCKETS = ("vastdb", "bucket")
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
SORT_TYPE = "VAST:sort_type"
SORT_INDEX = "VAST:sort_index"
_CID = b"vastsim:cid"


class SimError(Exception):
    """An error answered as an S3-style XML body with an HTTP status the SDK maps."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _bad(msg: str, code: str = "InvalidArgument") -> SimError:
    return SimError(400, code, msg)


# --------------------------------------------------------------------------------------------
# catalog objects (immutable; a change makes a new object, so snapshots are cheap)


@dataclass(frozen=True)
class SchemaMeta:
    bucket: str
    path: str
    properties: str = ""


@dataclass(frozen=True)
class TableMeta:
    handle: int
    bucket: str
    schema: str
    name: str
    fields: tuple  # ((col_id, pa.Field), ...) - data is stored by col_id, so renames are free
    sort_key: tuple = ()  # col_ids in key order
    next_col_id: int = 0
    schema_metadata: tuple = ()  # ((key bytes, value bytes), ...)

    @property
    def sorted(self) -> bool:
        return bool(self.sort_key)

    def field_by_name(self, name: str) -> tuple[int, pa.Field] | None:
        for cid, f in self.fields:
            if f.name == name:
                return cid, f
        return None

    def rowid_type(self) -> pa.DataType:
        return pa.decimal128(38, 0) if self.sorted else pa.uint64()


def _cname(cid: int) -> str:
    return f"c{cid}"


class TableData:
    """Committed rows of one table: immutable pa.Tables (columns c<cid> + $row_id uint64)."""

    def __init__(self, handle: int):
        self.handle = handle
        self.chunks: list[pa.Table] = []
        self.files: list[str | None] = []
        self.next_row_id = 0
        self.external_rowid = False
        self._cache: tuple[Any, pa.Table] | None = None
        self.version = 0

    def invalidate(self) -> None:
        self._cache = None
        self.version += 1


@dataclass
class Tx:
    txid: int
    begin_seq: int
    schemas: dict = field(default_factory=dict)  # overlay key -> SchemaMeta | None (dropped)
    tables: dict = field(default_factory=dict)  # overlay key -> TableMeta | None
    touched: dict = field(default_factory=dict)  # key -> commit seq when first touched
    new_data: dict = field(default_factory=dict)  # handle -> TableData (tables created here)
    inserts: dict = field(default_factory=dict)  # handle -> [pa.Table]
    ops: dict = field(default_factory=dict)  # handle -> [("update", ids, tbl) | ("delete", ids)]
    external: set = field(default_factory=set)  # handles that got external row ids here
    doomed: str = ""  # set after a conflict: the commit must fail
    last_used: float = field(default_factory=time.monotonic)
    version: int = 0  # bumped on every insert/update/delete (view cache key)
    view_cache: dict = field(default_factory=dict)  # handle -> (key, table)
    client: tuple = ()  # (host, port) of the connection that began it (tests find its process)


# --------------------------------------------------------------------------------------------
# Arrow helpers


_UNSUPPORTED_IDS = {pa.types.is_dictionary, pa.types.is_null, pa.types.is_union}


def _check_type(t: pa.DataType, where: str) -> None:
    """Reject what VAST rejects (dictionary, null, unions), anywhere in a nested type."""
    for pred in _UNSUPPORTED_IDS:
        if pred(t):
            raise SimError(400, "TabularUnsupportedColumnType",
                           f"column {where!r}: Arrow type {t} is not supported")
    for attr in ("is_string_view", "is_binary_view", "is_list_view", "is_large_list_view",
                 "is_run_end_encoded"):
        pred = getattr(pa.types, attr, None)
        if pred is not None and pred(t):
            raise SimError(400, "TabularUnsupportedColumnType",
                           f"column {where!r}: Arrow type {t} is not supported")
    if pa.types.is_fixed_size_list(t):
        vf = t.value_field
        if t.list_size <= 0:
            raise SimError(400, "TabularInvalidColumnTypeParam",
                           f"column {where!r}: fixed-size list size must be positive")
        if vf.nullable or not _fsl_element_ok(vf.type):
            raise SimError(400, "TabularUnsupportedColumnType",
                           f"column {where!r}: fixed-size lists need non-nullable numeric, "
                           f"decimal, date, time or timestamp elements (got {vf})")
        width = getattr(vf.type, "byte_width", 8) or 8
        if t.list_size * width > MAX_CELL_BYTES:
            raise SimError(400, "TabularUnsupportedColumnType",
                           f"column {where!r}: fixed-size list of {t.list_size} elements "
                           f"exceeds the cell size limit")
        return
    for i in range(t.num_fields):
        _check_type(t.field(i).type, f"{where}.{t.field(i).name}")


def _fsl_element_ok(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_date32(t) or pa.types.is_timestamp(t) or pa.types.is_time(t))


def _cell_sizes(arr: pa.Array) -> np.ndarray:
    """Bytes per row of `arr` (values only), recursively for nested types; nulls count 0."""
    t = arr.type
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64)
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) \
            or pa.types.is_large_string(t):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offs = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        child = arr.values
        cs = np.concatenate([[0], np.cumsum(_cell_sizes(child))])
        sizes = cs[offs[1:]] - cs[offs[:-1]]
        if arr.null_count:
            sizes[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
        return sizes
    if pa.types.is_fixed_size_list(t):
        child = arr.values  # unsliced; rows start at arr.offset * list_size
        sz = t.list_size
        cs = _cell_sizes(child)[arr.offset * sz:(arr.offset + n) * sz]
        return cs.reshape(n, sz).sum(axis=1) if sz else np.zeros(n, np.int64)
    if pa.types.is_struct(t):
        total = np.zeros(n, np.int64)
        for child in arr.flatten():
            total += _cell_sizes(child)
        return total
    if pa.types.is_boolean(t) or pa.types.is_null(t):
        return np.ones(n, np.int64)
    try:
        width = getattr(t, "byte_width", None) or max(1, t.bit_width // 8)
    except ValueError:  # not fixed-width and not handled above: count nothing
        return np.zeros(n, np.int64)
    return np.full(n, width, np.int64)


def _aligned(chunk: pa.Table, meta: TableMeta) -> pa.Table:
    """Chunk with exactly the table's current columns (missing ones null) + $row_id."""
    cols, names = [], []
    have = set(chunk.column_names)
    for cid, f in meta.fields:
        name = _cname(cid)
        if name in have:
            col = chunk[name]
            if col.type != f.type:
                col = col.cast(f.type)
        else:
            col = pa.chunked_array([pa.nulls(chunk.num_rows, f.type)])
        cols.append(col)
        names.append(name)
    cols.append(chunk[ROW_ID])
    names.append(ROW_ID)
    return pa.table(cols, names=names)


def _sort_by_rowid(tbl: pa.Table) -> pa.Table:
    ids = tbl[ROW_ID].to_numpy()
    if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
        tbl = tbl.take(np.argsort(ids, kind="stable"))
    return tbl


def _combine(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _apply_op(tbl: pa.Table, op: tuple) -> pa.Table:
    """Apply one update/delete op (by $row_id) to a table sorted by $row_id."""
    if tbl.num_rows == 0:
        return tbl
    ids = tbl[ROW_ID].to_numpy()
    if op[0] == "delete":
        keep = ~np.isin(ids, op[1])
        return tbl if keep.all() else tbl.filter(pa.array(keep))
    _, rids, upd = op
    pos = np.searchsorted(ids, rids)
    posc = np.minimum(pos, len(ids) - 1)
    found = ids[posc] == rids
    if not found.any():
        return tbl
    pos = posc[found]
    n = tbl.num_rows
    idx = np.arange(n, dtype=np.int64)
    idx[pos] = n + np.arange(len(pos))
    sel = None if found.all() else pa.array(found)
    for name in upd.column_names:
        if name not in tbl.column_names:
            continue
        newvals = _combine(upd[name])
        if sel is not None:
            newvals = newvals.filter(sel)
        base = _combine(tbl[name])
        merged = pa.concat_arrays([base, newvals.cast(base.type)]).take(pa.array(idx))
        tbl = tbl.set_column(tbl.column_names.index(name), name, merged)
    return tbl


def _rowids_to_u64(col: pa.Array) -> np.ndarray:
    if pa.types.is_decimal(col.type):
        col = pc.cast(col, pa.uint64())
    return col.cast(pa.uint64()).to_numpy(zero_copy_only=False).astype(np.uint64)


def _ipc_stream(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _read_stream_batch(body: bytes, what: str) -> pa.Table:
    try:
        return pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise _bad(f"{what}: body is not an Arrow IPC stream ({e})") from e
