"""vastsim: a local, wire-compatible subset of the VAST DataBase tabular HTTP API.

Why: there is no VAST cluster here, yet the VastDB sink must be tested with the *real*,
unmodified `vastdb` SDK. This server speaks the protocol described in
`shared/docs/vastdb-wire-subset.md` closely enough that the SDK runs against it unchanged:
version probe, transactions with isolation, bucket/schema/table DDL, columns, stats, sorting
keys, insert/update/delete by row id and `query_data` with server-side predicate evaluation,
multi-split/sub-split paging and the exact framed response. It enforces the real limits
(129,024-byte cells, 5 MiB request bodies, unsupported Arrow types), keeps committed state
in a directory (survives restarts) and has fault-injection knobs (503 SlowDown, dropped
connections, delays, 409 on commit) for reliability tests. See docs/vastsim.md.

Run it:  python -m dvidetl.testing.vastsim --port 9090 --data-dir /tmp/vastsim
Python:  with start_vastsim(tmp_path) as sim: vastdb.connect(endpoint=sim.endpoint, ...)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import flatbuffers
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf import LiteralImpl as _LI
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Call import Call as FbCall
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.ExpressionImpl import ExpressionImpl
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.FieldIndex import (
    FieldIndex as FbFieldIndex,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.FieldRef import FieldRef as FbFieldRef
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Literal import Literal as FbLiteral
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Relation import Relation as FbRelation
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.RelationImpl import RelationImpl
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Source import Source as FbSource
from vastdb.vast_flatbuf.tabular import GetTableStatsResponse as fb_stats
from vastdb.vast_flatbuf.tabular import ListSchemasResponse as fb_list_schemas
from vastdb.vast_flatbuf.tabular import ListTablesResponse as fb_list_tables
from vastdb.vast_flatbuf.tabular import ObjectDetails as fb_obj

log = logging.getLogger("dvidetl.vastsim")

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
        child = arr.values if not pa.types.is_map(t) else arr.values
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


# --------------------------------------------------------------------------------------------
# the state: catalog + data + transactions + persistence


class SimState:
    """All server state, guarded by one lock (a thread per connection shares it)."""

    def __init__(self, data_dir: str | os.PathLike | None, buckets=DEFAULT_BUCKETS,
                 max_cell_bytes: int = MAX_CELL_BYTES,
                 cell_error: tuple[int, str] = (400, "TabularCellTooLarge"),
                 tx_timeout_s: float = 900.0):
        self.lock = threading.RLock()
        self.tx_timeout_s = tx_timeout_s
        self.dir = Path(data_dir) if data_dir is not None else None
        self.buckets = set(buckets)
        self.max_cell_bytes = max_cell_bytes
        self.cell_error = cell_error
        self.schemas: dict[tuple[str, str], SchemaMeta] = {}
        self.tables: dict[tuple[str, str, str], TableMeta] = {}
        self.data: dict[int, TableData] = {}
        self.txs: dict[int, Tx] = {}
        self.changed_at: dict[Any, int] = {}
        self.ddl_owner: dict[Any, int] = {}  # catalog key -> txid with an uncommitted change
        self.seq = 0
        self.next_handle = 1
        self.next_txid = 1
        self.file_seq = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._load()

    # ---- transactions
    def begin(self) -> int:
        with self.lock:
            now = time.monotonic()  # abandoned transactions (a killed client) expire
            for old in [t for t in self.txs.values() if now - t.last_used > self.tx_timeout_s]:
                log.info("vastsim: transaction %d idle for %.0f s: rolled back", old.txid,
                         now - old.last_used)
                del self.txs[old.txid]
                self._release(old.txid)
            txid = self.next_txid
            self.next_txid += 1
            self.txs[txid] = Tx(txid=txid, begin_seq=self.seq)
            return txid

    def tx(self, txid: int) -> Tx:
        t = self.txs.get(txid)
        if t is None:
            raise SimError(404, "TabularTransactionNotFound", f"transaction {txid} is not open")
        t.last_used = time.monotonic()
        return t

    def _release(self, txid: int) -> None:
        for key in [k for k, v in self.ddl_owner.items() if v == txid]:
            del self.ddl_owner[key]

    def rollback(self, txid: int) -> None:
        with self.lock:
            self.tx(txid)
            del self.txs[txid]
            self._release(txid)

    def commit(self, txid: int) -> None:
        with self.lock:
            tx = self.tx(txid)
            try:
                if tx.doomed:
                    raise SimError(409, "Conflict", f"transaction aborted: {tx.doomed}")
                self._commit_locked(tx)
            finally:
                self.txs.pop(txid, None)
                self._release(txid)

    def _commit_locked(self, tx: Tx) -> None:
        for key, seq in tx.touched.items():
            if self.changed_at.get(key, 0) > seq:
                raise SimError(409, "Conflict",
                               f"{'/'.join(key[1:])} was changed by a concurrent transaction")
        live_handles = {m.handle for m in self.tables.values()}
        for handle in set(tx.inserts) | set(tx.ops):
            if handle not in tx.new_data and handle not in self.data:
                raise SimError(409, "Conflict", "table was dropped by a concurrent transaction")
        self.seq += 1
        for key, meta in tx.schemas.items():
            if meta is None:
                self.schemas.pop(key, None)
            else:
                self.schemas[key] = meta
            self.changed_at[key] = self.seq
        for key, meta in tx.tables.items():
            if meta is None:
                self.tables.pop(key, None)
            else:
                self.tables[key] = meta
            self.changed_at[key] = self.seq
        for handle, td in tx.new_data.items():
            self.data[handle] = td
        metas = {m.handle: m for m in self.tables.values()}
        dead = (live_handles | set(tx.new_data)) - set(metas)
        removed_files: list[str] = []
        for handle in dead:
            td = self.data.pop(handle, None)
            if td is not None:
                removed_files += [f for f in td.files if f]
        new_files: list[tuple[str, pa.Table]] = []
        for handle in set(tx.inserts) | set(tx.ops) | tx.external:
            td = self.data.get(handle)
            meta = metas.get(handle)
            if td is None or meta is None:
                continue
            if handle in tx.external:
                td.external_rowid = True
            parts = tx.inserts.get(handle, [])
            if parts:
                chunk = pa.concat_tables([_aligned(p, meta) for p in parts])
                chunk = _sort_by_rowid(chunk)
                td.chunks.append(chunk)
                td.files.append(None)
            for op in tx.ops.get(handle, []):
                ids_needed = op[1]
                for i, ch in enumerate(td.chunks):
                    cids = ch[ROW_ID].to_numpy()
                    if len(cids) and np.isin(ids_needed, cids).any():
                        td.chunks[i] = _apply_op(_aligned(ch, meta), op)
                        if td.files[i]:
                            removed_files.append(td.files[i])
                        td.files[i] = None
            keep = [i for i, ch in enumerate(td.chunks) if ch.num_rows > 0 or td.files[i] is None]
            td.chunks = [td.chunks[i] for i in keep]
            td.files = [td.files[i] for i in keep]
            td.invalidate()
            for i, ch in enumerate(td.chunks):
                if td.files[i] is None:
                    self.file_seq += 1
                    name = f"t{handle}/{self.file_seq}.arrow"
                    td.files[i] = name
                    new_files.append((name, ch))
        self._persist(new_files, removed_files)

    # ---- persistence
    def _persist(self, new_files, removed_files) -> None:
        if self.dir is None:
            return
        for name, tbl in new_files:
            p = self.dir / name
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, tbl.schema) as w:
                w.write_table(tbl)
            os.replace(tmp, p)
        self._write_catalog()
        for name in removed_files:
            try:
                (self.dir / name).unlink()
            except FileNotFoundError:
                pass

    def _write_catalog(self) -> None:
        assert self.dir is not None
        tables = []
        for (b, s, n), m in self.tables.items():
            td = self.data.get(m.handle)
            fields = [f.with_metadata({**(f.metadata or {}), _CID: str(cid).encode()})
                      for cid, f in m.fields]
            schema = pa.schema(fields, metadata=dict(m.schema_metadata) or None)
            tables.append({
                "bucket": b, "schema": s, "name": n, "handle": m.handle,
                "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
                "sort_key": list(m.sort_key), "next_col_id": m.next_col_id,
                "next_row_id": td.next_row_id if td else 0,
                "external_rowid": bool(td and td.external_rowid),
                "files": [f for f in (td.files if td else []) if f],
            })
        doc = {
            "format": "vastsim-1",
            "next_handle": self.next_handle, "next_txid": self.next_txid,
            "file_seq": self.file_seq, "buckets": sorted(self.buckets),
            "schemas": [{"bucket": m.bucket, "path": m.path, "properties": m.properties}
                        for m in self.schemas.values()],
            "tables": tables,
        }
        tmp = self.dir / "catalog.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.dir / "catalog.json")

    def _load(self) -> None:
        assert self.dir is not None
        p = self.dir / "catalog.json"
        if not p.exists():
            return
        try:
            doc = json.loads(p.read_text())
        except ValueError as e:
            raise RuntimeError(f"vastsim: corrupt catalog {p}: {e}") from e
        self.next_handle = doc["next_handle"]
        self.next_txid = doc["next_txid"]
        self.file_seq = doc.get("file_seq", 0)
        self.buckets |= set(doc.get("buckets", []))
        for s in doc["schemas"]:
            self.schemas[(s["bucket"], s["path"])] = SchemaMeta(s["bucket"], s["path"],
                                                                 s["properties"])
        for t in doc["tables"]:
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(t["arrow_schema"])))
            fields = []
            for f in schema:
                md = dict(f.metadata or {})
                cid = int(md.pop(_CID))
                fields.append((cid, f.with_metadata(md or None)))
            meta = TableMeta(handle=t["handle"], bucket=t["bucket"], schema=t["schema"],
                             name=t["name"], fields=tuple(fields), sort_key=tuple(t["sort_key"]),
                             next_col_id=t["next_col_id"],
                             schema_metadata=tuple((schema.metadata or {}).items()))
            self.tables[(t["bucket"], t["schema"], t["name"])] = meta
            td = TableData(meta.handle)
            td.next_row_id = t["next_row_id"]
            td.external_rowid = t["external_rowid"]
            for name in t["files"]:
                with pa.memory_map(str(self.dir / name)) as src:
                    td.chunks.append(pa.ipc.open_file(src).read_all())
                td.files.append(name)
            self.data[meta.handle] = td
        live = {f for td in self.data.values() for f in td.files if f}
        for p in self.dir.glob("t*/*"):  # files of a commit interrupted before its catalog
            if p.relative_to(self.dir).as_posix() not in live:
                p.unlink()

    # ---- catalog views for a transaction (read committed + the tx's own overlay)
    def _touch(self, tx: Tx, key) -> None:
        owner = self.ddl_owner.get(key)
        if owner is not None and owner != tx.txid and owner in self.txs:
            tx.doomed = f"{'/'.join(key[1:])} is being changed by transaction {owner}"
            raise SimError(409, "Conflict", tx.doomed)
        self.ddl_owner[key] = tx.txid
        tx.touched.setdefault(key, self.seq)

    def check_bucket(self, bucket: str) -> None:
        if bucket not in self.buckets:
            raise SimError(404, "NoSuchBucket", f"bucket {bucket!r} does not exist")

    def get_schema(self, tx: Tx, bucket: str, path: str) -> SchemaMeta | None:
        key = (bucket, path)
        if key in tx.schemas:
            return tx.schemas[key]
        return self.schemas.get(key)

    def need_schema(self, tx: Tx, bucket: str, path: str) -> SchemaMeta:
        self.check_bucket(bucket)
        m = self.get_schema(tx, bucket, path)
        if m is None:
            raise SimError(404, "TabularSchemaNotFound", f"schema {bucket}/{path} does not exist")
        return m

    def all_schemas(self, tx: Tx, bucket: str) -> list[str]:
        keys = {k for k in self.schemas if k[0] == bucket} | {k for k in tx.schemas
                                                              if k[0] == bucket}
        return sorted(k[1] for k in keys if self.get_schema(tx, *k) is not None)

    def child_schemas(self, tx: Tx, bucket: str, parent: str) -> list[str]:
        out = []
        for path in self.all_schemas(tx, bucket):
            head, _, leaf = path.rpartition("/")
            if head == parent:
                out.append(leaf)
        return sorted(out)

    def get_table(self, tx: Tx, bucket: str, schema: str, name: str) -> TableMeta | None:
        key = (bucket, schema, name)
        if key in tx.tables:
            return tx.tables[key]
        return self.tables.get(key)

    def need_table(self, tx: Tx, bucket: str, schema: str, name: str) -> TableMeta:
        self.need_schema(tx, bucket, schema)
        m = self.get_table(tx, bucket, schema, name)
        if m is None:
            raise SimError(404, "TabularTableNotFound",
                           f"table {bucket}/{schema}/{name} does not exist")
        return m

    def schema_tables(self, tx: Tx, bucket: str, schema: str) -> list[TableMeta]:
        keys = {k for k in self.tables if k[:2] == (bucket, schema)} | \
               {k for k in tx.tables if k[:2] == (bucket, schema)}
        out = [self.get_table(tx, *k) for k in sorted(keys)]
        return [m for m in out if m is not None]

    def _set_schema(self, tx: Tx, key, meta: SchemaMeta | None) -> None:
        self._touch(tx, key)
        tx.schemas[key] = meta

    def _set_table(self, tx: Tx, key, meta: TableMeta | None) -> None:
        self._touch(tx, key)
        tx.tables[key] = meta

    def _tdata(self, tx: Tx, handle: int) -> TableData:
        td = tx.new_data.get(handle) or self.data.get(handle)
        if td is None:
            raise SimError(409, "Conflict", "table was dropped by a concurrent transaction")
        return td

    # ---- DDL
    def create_schema(self, tx: Tx, bucket: str, path: str, properties: str) -> None:
        self.check_bucket(bucket)
        if not path or any(not p for p in path.split("/")):
            raise _bad(f"invalid schema name {path!r}")
        if self.get_schema(tx, bucket, path) is not None:
            raise SimError(409, "TabularSchemaAlreadyExists", f"schema {bucket}/{path} exists")
        parent = path.rpartition("/")[0]
        if parent:
            self.need_schema(tx, bucket, parent)
        self._set_schema(tx, (bucket, path), SchemaMeta(bucket, path, properties))

    def drop_schema(self, tx: Tx, bucket: str, path: str) -> None:
        self.need_schema(tx, bucket, path)
        if self.schema_tables(tx, bucket, path) or self.child_schemas(tx, bucket, path):
            raise SimError(409, "TabularSchemaNotEmpty", f"schema {bucket}/{path} is not empty")
        self._set_schema(tx, (bucket, path), None)

    def rename_schema(self, tx: Tx, bucket: str, path: str, new_path: str) -> None:
        old = self.need_schema(tx, bucket, path)
        if self.get_schema(tx, bucket, new_path) is not None:
            raise SimError(409, "TabularSchemaAlreadyExists", f"schema {new_path} exists")
        moves = [p for p in self.all_schemas(tx, bucket) if p == path or p.startswith(path + "/")]
        for p in moves:
            np_ = new_path + p[len(path):]
            m = self.get_schema(tx, bucket, p)
            for t in self.schema_tables(tx, bucket, p):
                self._set_table(tx, (bucket, p, t.name), None)
                self._set_table(tx, (bucket, np_, t.name), replace(t, schema=np_))
            self._set_schema(tx, (bucket, p), None)
            self._set_schema(tx, (bucket, np_), replace(m or old, path=np_))

    def create_table(self, tx: Tx, bucket: str, schema: str, name: str, arrow_schema: pa.Schema,
                     sort_idx: list[int]) -> None:
        self.need_schema(tx, bucket, schema)
        if not name:
            raise _bad("empty table name")
        if self.get_table(tx, bucket, schema, name) is not None:
            raise SimError(409, "TabularTableAlreadyExists", f"table {schema}/{name} exists")
        names = arrow_schema.names
        if len(set(names)) != len(names):
            raise _bad(f"duplicate column names in {names}")
        for f in arrow_schema:
            _check_type(f.type, f.name)
        for i in sort_idx:
            if not 0 <= i < len(names):
                raise _bad(f"sorting key column index {i} is out of range (0..{len(names) - 1})")
        fields = tuple((i, f.with_metadata(None) if not f.metadata else f)
                       for i, f in enumerate(arrow_schema))
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
        meta = TableMeta(handle=handle, bucket=bucket, schema=schema, name=name, fields=fields,
                         sort_key=tuple(sort_idx), next_col_id=len(fields),
                         schema_metadata=tuple((arrow_schema.metadata or {}).items()))
        tx.new_data[handle] = TableData(handle)
        self._set_table(tx, (bucket, schema, name), meta)

    def drop_table(self, tx: Tx, bucket: str, schema: str, name: str) -> None:
        self.need_table(tx, bucket, schema, name)
        self._set_table(tx, (bucket, schema, name), None)

    def alter_table(self, tx: Tx, bucket: str, schema: str, name: str, new_name: str | None,
                    sort_idx: list[int]) -> None:
        meta = self.need_table(tx, bucket, schema, name)
        if sort_idx:
            if meta.sort_key:
                raise _bad(f"table {name} already has a sorting key", "BadRequest")
            cids = [cid for cid, _ in meta.fields]
            for i in sort_idx:
                if not 0 <= i < len(cids):
                    raise _bad(f"sorting key column index {i} is out of range")
            meta = replace(meta, sort_key=tuple(cids[i] for i in sort_idx))
            self._set_table(tx, (bucket, schema, name), meta)
        if new_name and new_name != name:
            if self.get_table(tx, bucket, schema, new_name) is not None:
                raise SimError(409, "TabularTableAlreadyExists", f"table {new_name} exists")
            self._set_table(tx, (bucket, schema, name), None)
            self._set_table(tx, (bucket, schema, new_name), replace(meta, name=new_name))

    def add_columns(self, tx: Tx, bucket: str, schema: str, name: str, cols: pa.Schema) -> None:
        meta = self.need_table(tx, bucket, schema, name)
        fields = list(meta.fields)
        nxt = meta.next_col_id
        for f in cols:
            _check_type(f.type, f.name)
            if meta.field_by_name(f.name) is not None:
                raise SimError(409, "TabularColumnAlreadyExists", f"column {f.name} exists")
            fields.append((nxt, f))
            nxt += 1
        self._set_table(tx, (bucket, schema, name),
                        replace(meta, fields=tuple(fields), next_col_id=nxt))

    def drop_columns(self, tx: Tx, bucket: str, schema: str, name: str, cols: pa.Schema) -> None:
        meta = self.need_table(tx, bucket, schema, name)
        drop = set(cols.names)
        missing = drop - {f.name for _, f in meta.fields}
        if missing:
            raise SimError(404, "TabularColumnNotFound", f"columns {sorted(missing)} not found")
        fields = tuple((c, f) for c, f in meta.fields if f.name not in drop)
        dropped = {c for c, f in meta.fields if f.name in drop}
        sort_key = tuple(c for c in meta.sort_key if c not in dropped)
        self._set_table(tx, (bucket, schema, name),
                        replace(meta, fields=fields, sort_key=sort_key))

    def rename_column(self, tx: Tx, bucket: str, schema: str, name: str, old: str,
                      new: str) -> None:
        meta = self.need_table(tx, bucket, schema, name)
        if meta.field_by_name(old) is None:
            raise SimError(404, "TabularColumnNotFound", f"column {old} not found")
        if new and meta.field_by_name(new) is not None:
            raise SimError(409, "TabularColumnAlreadyExists", f"column {new} exists")
        fields = tuple((c, f.with_name(new) if f.name == old and new else f)
                       for c, f in meta.fields)
        self._set_table(tx, (bucket, schema, name), replace(meta, fields=fields))

    # ---- rows
    def _check_cells(self, tbl: pa.Table | pa.RecordBatch, meta: TableMeta) -> None:
        for name, col in zip(tbl.schema.names, tbl.columns, strict=True):
            if name == ROW_ID:
                continue
            arr = _combine(col)
            t = arr.type
            if pa.types.is_primitive(t) and not pa.types.is_fixed_size_binary(t):
                continue
            sizes = _cell_sizes(arr)
            if len(sizes) and sizes.max() > self.max_cell_bytes:
                row = int(np.argmax(sizes))
                status, code = self.cell_error
                raise SimError(status, code,
                               f"table {meta.name}: column {name!r} row {row}: cell of "
                               f"{int(sizes[row])} bytes exceeds the "
                               f"{self.max_cell_bytes}-byte cell limit")

    def _to_internal(self, tbl: pa.Table, meta: TableMeta, what: str) -> pa.Table:
        """Rename user columns to c<cid> and cast to the catalog types."""
        cols, names = [], []
        for name, col in zip(tbl.schema.names, tbl.columns, strict=True):
            found = meta.field_by_name(name)
            if found is None:
                raise SimError(404, "TabularColumnNotFound",
                               f"{what}: table {meta.name} has no column {name!r}")
            cid, f = found
            if pa.types.is_fixed_size_list(f.type):
                got = tbl.schema.field(name)
                if got.type != f.type or got.nullable != f.nullable or \
                        got.type.value_field.nullable != f.type.value_field.nullable:
                    raise SimError(400, "TabularMismatchColumnType",
                                   f"{what}: column {name!r} is {got}, table has {f}")
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise _bad(f"{what}: column {name!r} of type {col.type} does not match "
                               f"table type {f.type}: {e}") from e
            cols.append(col)
            names.append(_cname(cid))
        return pa.table(cols, names=names)

    def insert(self, txid: int, bucket: str, schema: str, name: str, body: bytes) -> bytes:
        tbl = _read_stream_batch(body, "insert")
        with self.lock:
            tx = self.tx(txid)
            meta = self.need_table(tx, bucket, schema, name)
        if ROW_ID in tbl.column_names:
            raise _bad("insert: $row_id cannot be supplied")
        self._check_cells(tbl, meta)
        internal = self._to_internal(tbl, meta, "insert")
        n = tbl.num_rows
        ext = "vastdb_rowid" in tbl.column_names
        with self.lock:
            tx = self.tx(txid)
            td = self._tdata(tx, meta.handle)
            if ext:
                ids = tbl["vastdb_rowid"].to_numpy().astype(np.uint64)
                tx.external.add(meta.handle)
                if len(ids):
                    td.next_row_id = max(td.next_row_id, int(ids.max()) + 1)
            else:
                start = td.next_row_id
                td.next_row_id += n
                ids = np.arange(start, start + n, dtype=np.uint64)
            internal = internal.append_column(ROW_ID, pa.array(ids, pa.uint64()))
            tx.inserts.setdefault(meta.handle, []).append(internal)
            tx.version += 1
        out = pa.array(ids, pa.uint64())
        if meta.sorted:
            out = out.cast(pa.decimal128(38, 0))
        return _ipc_stream(pa.record_batch([out], names=[ROW_ID]))

    def update(self, txid: int, bucket: str, schema: str, name: str, body: bytes,
               delete: bool) -> None:
        tbl = _read_stream_batch(body, "delete" if delete else "update")
        with self.lock:
            tx = self.tx(txid)
            meta = self.need_table(tx, bucket, schema, name)
        if not tbl.column_names or tbl.column_names[0] != ROW_ID:
            raise _bad("the first column must be $row_id")
        ids = _rowids_to_u64(_combine(tbl[ROW_ID]))
        if delete:
            op: tuple = ("delete", ids)
        else:
            rest = tbl.drop_columns([ROW_ID])
            self._check_cells(rest, meta)
            internal = self._to_internal(rest, meta, "update")
            order = np.argsort(ids, kind="stable")
            if len(ids) > 1 and not np.all(ids[1:] >= ids[:-1]):
                ids, internal = ids[order], internal.take(order)
            op = ("update", ids, internal)
        with self.lock:
            tx = self.tx(txid)
            self._tdata(tx, meta.handle)
            tx.ops.setdefault(meta.handle, []).append(op)
            tx.version += 1

    def counts(self, tx: Tx, meta: TableMeta) -> tuple[int, int]:
        """(rows, bytes) visible to `tx`, without materialising when nothing needs merging."""
        td = self._tdata(tx, meta.handle)
        if tx.ops.get(meta.handle):
            v = self.view(tx, meta)
            return v.num_rows, v.nbytes
        parts = td.chunks + tx.inserts.get(meta.handle, [])
        return sum(p.num_rows for p in parts), sum(p.nbytes for p in parts)

    def view(self, tx: Tx, meta: TableMeta) -> pa.Table:
        """Rows visible to `tx` (committed + own changes), sorted by $row_id, c<cid> names."""
        td = self._tdata(tx, meta.handle)
        key = tuple((c, str(f.type)) for c, f in meta.fields)
        if td._cache is not None and td._cache[0] == key:
            base = td._cache[1]
        else:
            parts = [_aligned(ch, meta) for ch in td.chunks]
            if parts:
                base = _sort_by_rowid(pa.concat_tables(parts)).combine_chunks()
            else:
                base = _aligned(pa.table({ROW_ID: pa.array([], pa.uint64())}), meta)
            if handle_is_committed(self, td):
                td._cache = (key, base)
        ins = tx.inserts.get(meta.handle)
        ops = tx.ops.get(meta.handle, [])
        if not ins and not ops:
            return base
        ckey = (key, tx.version, td.version)
        hit = tx.view_cache.get(meta.handle)
        if hit is not None and hit[0] == ckey:
            return hit[1]
        if ins:
            base = _sort_by_rowid(pa.concat_tables([base] + [_aligned(p, meta) for p in ins]))
            base = base.combine_chunks()
        for op in ops:
            base = _apply_op(base, op)
        tx.view_cache[meta.handle] = (ckey, base)
        return base


def handle_is_committed(state: SimState, td: TableData) -> bool:
    return state.data.get(td.handle) is td


# --------------------------------------------------------------------------------------------
# query_data: request decoding, predicate evaluation, response framing


@dataclass
class _Node:
    name: str
    index: int
    children: list
    parent: _Node | None = None


def _fb_str(b) -> str:
    return b.decode() if isinstance(b, bytes) else (b or "")


def _build_nodes(fb_field, counter, parent=None) -> _Node:
    node = _Node(_fb_str(fb_field.Name()), next(counter), [], parent)
    for j in range(fb_field.ChildrenLength()):
        node.children.append(_build_nodes(fb_field.Children(j), counter, node))
    return node


def _iter_nodes(node: _Node):
    yield node
    for c in node.children:
        yield from _iter_nodes(c)


_LIT_CLASSES: dict[int, type] = {}


def _literal_class(kind: int) -> type:
    cls = _LIT_CLASSES.get(kind)
    if cls is None:
        import importlib

        names = {v: k for k, v in vars(_LI.LiteralImpl).items() if not k.startswith("_")}
        if kind not in names or kind == 0:
            raise _bad(f"unsupported literal kind {kind}")
        mod = importlib.import_module(
            f"vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.{names[kind]}")
        cls = _LIT_CLASSES[kind] = getattr(mod, names[kind])
    return cls


def _literal_value(lit: FbLiteral) -> tuple[int, Any]:
    kind = lit.ImplType()
    tab = lit.Impl()
    LI = _LI.LiteralImpl
    obj = _literal_class(kind)()
    obj.Init(tab.Bytes, tab.Pos)
    if kind == LI.BinaryLiteral:
        return kind, obj.ValueAsNumpy().tobytes() if not obj.ValueIsNone() else b""
    if kind == LI.DecimalLiteral:
        raw = obj.ValueAsNumpy().tobytes() if not obj.ValueIsNone() else b"\0" * 16
        return kind, int.from_bytes(raw, "little", signed=True)
    if kind == LI.StringLiteral:
        v = obj.Value()
        return kind, v if isinstance(v, bytes) else (v or "").encode()
    if kind == LI.ListLiteral:
        return kind, [_literal_value(obj.Values(j))[1] for j in range(obj.ValuesLength())]
    return kind, obj.Value()


_CMP = {"equal": pc.equal, "not_equal": pc.not_equal, "greater": pc.greater,
        "greater_equal": pc.greater_equal, "less": pc.less, "less_equal": pc.less_equal}


class _QueryEval:
    """Evaluates the SDK's filter expression over a table with user column names."""

    def __init__(self, tbl: pa.Table, nodes_by_index: dict[int, _Node], types: dict[str, Any]):
        self.tbl = tbl
        self.nodes = nodes_by_index
        self.types = types
        self._cols: dict[int, pa.Array] = {}

    def column(self, position: int) -> pa.Array:
        if position in self._cols:
            return self._cols[position]
        node = self.nodes.get(position)
        if node is None:
            raise _bad(f"predicate references unknown column position {position}")
        path = []
        n = node
        while n.parent is not None:
            path.append(n)
            n = n.parent
        path.reverse()
        if n.name not in self.tbl.column_names:
            raise _bad(f"predicate references unknown column {n.name!r}")
        arr = _combine(self.tbl[n.name])
        parent = n
        for child in path:
            t = arr.type
            if pa.types.is_struct(t):
                idx = parent.children.index(child)
                arr = arr.flatten()[idx]
            elif pa.types.is_fixed_size_list(t):
                # a predicate on the single child of a fixed-size list compares whole vectors
                break
            else:
                raise _bad(f"predicates on nested column {n.name!r} are not supported")
            parent = child
        self._cols[position] = arr
        return arr

    def literal(self, expr_tab, col: pa.Array) -> pa.Scalar:
        lit = FbLiteral()
        lit.Init(expr_tab.Bytes, expr_tab.Pos)
        kind, v = _literal_value(lit)
        t = col.type
        LI = _LI.LiteralImpl
        try:
            if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
                    or pa.types.is_large_binary(t):
                return pa.scalar(v if isinstance(v, bytes) else str(v).encode(), pa.binary())
            if pa.types.is_decimal(t):
                return pa.scalar(Decimal(v).scaleb(-t.scale), t)
            if kind == LI.Float16Literal:
                return pa.scalar(float(np.uint16(v).view(np.float16)), pa.float32())
            if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
                base = pa.int32() if pa.types.is_date32(t) or pa.types.is_time32(t) \
                    else pa.int64()
                return pa.scalar(int(v), base).cast(t)
            if pa.types.is_fixed_size_list(t):
                return v  # raw element values (ints for dates/times, unscaled decimals)
            return pa.scalar(v, t)
        except (pa.ArrowInvalid, OverflowError, TypeError) as e:
            raise _bad(f"literal {v!r} does not fit column type {t}: {e}") from e

    def _call_parts(self, expr):
        """(name, column position, literal expr impl) of `call(ref, lit)`, else None."""
        if expr.ImplType() != ExpressionImpl.Call:
            return None
        call = FbCall()
        tab = expr.Impl()
        call.Init(tab.Bytes, tab.Pos)
        if call.ArgumentsLength() != 2:
            return None
        a0, a1 = call.Arguments(0), call.Arguments(1)
        if a0.ImplType() != ExpressionImpl.FieldRef or a1.ImplType() != ExpressionImpl.Literal:
            return None
        ref = FbFieldRef()
        rt = a0.Impl()
        ref.Init(rt.Bytes, rt.Pos)
        idx = FbFieldIndex()
        it = ref.Ref()
        idx.Init(it.Bytes, it.Pos)
        return _fb_str(call.Name()), idx.Position(), a1.Impl()

    def _isin(self, args) -> pa.Array | None:
        """`isin([...])` arrives as OR of n equals on one column: answer it with is_in."""
        parts = [self._call_parts(a) for a in args]
        if any(p is None or p[0] != "equal" for p in parts):
            return None
        if len({p[1] for p in parts}) != 1:
            return None
        col = self.column(parts[0][1])
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_float16(col.type):
            return None
        lits = [self.literal(p[2], col) for p in parts]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary())
        values = pa.array([x.as_py() for x in lits], lits[0].type)
        res = pc.is_in(col, value_set=values)
        return pa.array(res.to_numpy(zero_copy_only=False), pa.bool_(),
                        mask=pc.is_null(col).to_numpy(zero_copy_only=False)) \
            if col.null_count else res

    def eval(self, expr) -> pa.Array:
        kind = expr.ImplType()
        tab = expr.Impl()
        if kind != ExpressionImpl.Call:
            raise _bad(f"unsupported filter expression kind {kind}")
        call = FbCall()
        call.Init(tab.Bytes, tab.Pos)
        name = _fb_str(call.Name())
        args = [call.Arguments(j) for j in range(call.ArgumentsLength())]
        n = self.tbl.num_rows
        if name in ("and", "or"):
            if not args:
                return pa.array(np.full(n, name == "and"))
            if name == "or" and len(args) > 4:
                fast = self._isin(args)
                if fast is not None:
                    return fast
            res = self.eval(args[0])
            f = pc.and_kleene if name == "and" else pc.or_kleene
            for a in args[1:]:
                res = f(res, self.eval(a))
            return res
        if not args or args[0].ImplType() != ExpressionImpl.FieldRef:
            raise _bad(f"filter call {name!r}: first argument must be a column reference")
        ref = FbFieldRef()
        rt = args[0].Impl()
        ref.Init(rt.Bytes, rt.Pos)
        idx = FbFieldIndex()
        it = ref.Ref()
        idx.Init(it.Bytes, it.Pos)
        col = self.column(idx.Position())
        if name == "is_null":
            return pc.is_null(col)
        if name == "is_valid":
            return pc.is_valid(col)
        if len(args) != 2 or args[1].ImplType() != ExpressionImpl.Literal:
            raise _bad(f"filter call {name!r} needs a column and a literal")
        lit = self.literal(args[1].Impl(), col)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.cast(pa.binary())
        if name == "match_substring":
            return pc.match_substring(col, lit.as_py().decode("utf-8", "surrogateescape"))
        if pa.types.is_fixed_size_list(t):
            return _fsl_compare(name, col, lit)
        fn = _CMP.get(name)
        if fn is None:
            raise SimError(501, "NotImplemented", f"filter function {name!r} is not supported")
        if pa.types.is_float16(t):
            col = col.cast(pa.float32())
        if pa.types.is_fixed_size_list(t):
            return _fsl_compare(name, col, lit)
        return fn(col, lit)


def _fsl_raw(col: pa.FixedSizeListArray) -> np.ndarray:
    """(rows, list_size) matrix of element values in literal encoding."""
    t = col.type
    vals = col.values.slice(col.offset * t.list_size, len(col) * t.list_size)
    et = t.value_type
    if pa.types.is_decimal(et):
        scale = 10 ** et.scale
        raw = np.array([0 if v is None else int(v * scale) for v in vals.to_pylist()],
                       dtype=object)
    elif pa.types.is_date32(et) or pa.types.is_time32(et):
        raw = vals.cast(pa.int32()).to_numpy(zero_copy_only=False)
    elif pa.types.is_timestamp(et) or pa.types.is_time64(et) or pa.types.is_date64(et):
        raw = vals.cast(pa.int64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_float16(et):
        raw = vals.cast(pa.float32()).to_numpy(zero_copy_only=False)
    else:
        raw = vals.to_numpy(zero_copy_only=False)
    return raw.reshape(len(col), t.list_size)


def _fsl_compare(name: str, col: pa.Array, lit) -> pa.Array:
    """Lexicographic comparison of fixed-size-list rows with a list literal (nulls stay null)."""
    want = list(lit)
    if len(want) != col.type.list_size:
        raise _bad(f"list literal of {len(want)} values for a list of {col.type.list_size}")
    if pa.types.is_float16(col.type.value_type):
        want = [float(np.uint16(v).view(np.float16)) for v in want]
    m = _fsl_raw(col)
    w = np.array(want, dtype=m.dtype)
    n = len(col)
    if n == 0:
        return pa.array([], pa.bool_())
    diff = m != w
    anyd = diff.any(axis=1)
    first = np.argmax(diff, axis=1)
    rows = np.arange(n)
    a, b = m[rows, first], w[first]
    gt = anyd & (a > b).astype(bool)
    lt = anyd & (a < b).astype(bool)
    res = {"equal": ~anyd, "not_equal": anyd, "greater": gt, "less": lt,
           "greater_equal": gt | ~anyd, "less_equal": lt | ~anyd}.get(name)
    if res is None:
        raise SimError(501, "NotImplemented", f"{name} on a fixed-size list")
    mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
    return pa.array(res.astype(bool), pa.bool_(), mask=mask)


def _leaf_array(arr: pa.Array, node: _Node, leaf: _Node) -> pa.Array:
    """The root-to-leaf path array of `leaf` (struct levels with exactly one child)."""
    path = []
    n = leaf
    while n is not node:
        path.append(n)
        n = n.parent
    path.reverse()
    return _path_array(arr, node, path)


def _mask(arr: pa.Array):
    return pc.is_null(arr) if arr.null_count else None


def _path_array(arr: pa.Array, node: _Node, path: list) -> pa.Array:
    if not path:
        return arr
    t = arr.type
    child_node = path[0]
    if pa.types.is_struct(t):
        i = node.children.index(child_node)
        child = arr.field(i)
        if arr.offset or len(child) != len(arr):
            child = child.slice(arr.offset, len(arr))
        sub = _path_array(child, child_node, path[1:])
        return pa.StructArray.from_arrays([sub], fields=[t.field(i).with_type(sub.type)],
                                          mask=_mask(arr))
    if pa.types.is_map(t):
        entries = path[0]
        which = path[1]
        i = entries.children.index(which)
        values = arr.values  # struct<key, value>, unsliced
        child = values.field(i)
        sub = _path_array(child, which, path[2:])
        ent = pa.StructArray.from_arrays([sub], fields=[values.type.field(i).with_type(sub.type)])
        return pa.ListArray.from_arrays(arr.offsets, ent, mask=_mask(arr))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        sub = _path_array(arr.values, child_node, path[1:])
        cls = pa.ListArray if pa.types.is_list(t) else pa.LargeListArray
        return cls.from_arrays(arr.offsets, sub, mask=_mask(arr))
    if pa.types.is_fixed_size_list(t):
        vals = arr.values.slice(arr.offset * t.list_size, len(arr) * t.list_size)
        sub = _path_array(vals, child_node, path[1:])
        return pa.FixedSizeListArray.from_arrays(sub, t.list_size, mask=_mask(arr))
    raise _bad(f"cannot project nested path through type {t}")


def _record(stream_id: int, next_row_id: int, msg: bytes) -> bytes:
    return struct.pack("<LQ", stream_id, next_row_id) + msg


def _page(stream_id: int, next_row_id: int, arrays: list[pa.Array], nrows: int) -> list[bytes]:
    if arrays:
        batch = pa.record_batch(arrays, names=[f"l{i}" for i in range(len(arrays))])
    else:
        batch = pa.record_batch({"x": pa.nulls(nrows)}).select([])
    return [_record(stream_id, next_row_id, batch.schema.serialize().to_pybytes()),
            _record(stream_id, next_row_id, batch.serialize().to_pybytes()),
            _record(stream_id, next_row_id, EOS)]


_LAYOUTS: dict = {}  # tiny LRU: id(view) -> (view, ids, {(rg, splits, subs): layout})
_LAYOUT_LOCK = threading.Lock()


def _layout_entry(view: pa.Table) -> dict:
    with _LAYOUT_LOCK:
        ent = _LAYOUTS.get(id(view))
        if ent is None or ent[0] is not view:
            ent = (view, view[ROW_ID].to_numpy(), {})
            _LAYOUTS[id(view)] = ent
            while len(_LAYOUTS) > 4:
                del _LAYOUTS[next(iter(_LAYOUTS))]
        return ent


def _rowid_numpy(view: pa.Table) -> np.ndarray:
    return _layout_entry(view)[1]


def _split_layout(view: pa.Table, ids: np.ndarray, rg: int, num_splits: int, num_sub: int):
    """Row positions grouped by (split, sub-split), each group in row-id order (cached)."""
    ent = _layout_entry(view)
    key = (rg, num_splits, num_sub)
    got = ent[2].get(key)
    if got is None:
        block = ids // np.uint64(ROWS_PER_ROW_GROUP * rg)
        grp = (block % np.uint64(num_splits)) * np.uint64(num_sub) + \
            (block // np.uint64(num_splits)) % np.uint64(num_sub)
        order = np.argsort(grp, kind="stable")
        bounds = np.searchsorted(grp[order], np.arange(num_splits * num_sub + 1,
                                                       dtype=np.uint64))
        got = (order, bounds)
        ent[2][key] = got
    return got


def query_data(state: SimState, txid: int, bucket: str, schema: str, name: str, body: bytes,
               headers) -> list[bytes]:
    """Answer one GET ?data; returns the response body as a list of complete pages."""
    with state.lock:
        tx = state.tx(txid)
        meta = state.need_table(tx, bucket, schema, name)
        internal = state.view(tx, meta)
    try:
        rel = FbRelation.GetRootAs(body, 0)
        if rel.ImplType() != RelationImpl.Source:
            raise _bad("query_data: the relation must be a Source")
        src = FbSource()
        it = rel.Impl()
        src.Init(it.Bytes, it.Pos)
        fb_schema = src.Schema()
        counter = iter(range(1 << 30))
        roots = [_build_nodes(fb_schema.Fields(j), counter)
                 for j in range(fb_schema.FieldsLength())]
        projection = [src.Projection(j).Position() for j in range(src.ProjectionLength())]
        filt = src.Filter()
    except SimError:
        raise
    except Exception as e:  # a malformed flatbuffer must be a 400, not a dropped socket
        raise _bad(f"query_data: cannot decode the request flatbuffer: {e}") from e
    nodes = {n.index: n for r in roots for n in _iter_nodes(r)}
    # user-named view of the needed columns
    cols, names = [], []
    for r in roots:
        if r.name == ROW_ID:
            rid = _combine(internal[ROW_ID])
            cols.append(rid.cast(meta.rowid_type()) if meta.sorted else rid)
        else:
            found = meta.field_by_name(r.name)
            if found is None:
                raise SimError(404, "TabularColumnNotFound",
                               f"table {meta.name} has no column {r.name!r}")
            cols.append(internal[_cname(found[0])])
        names.append(r.name)
    ids = _rowid_numpy(internal)
    tbl = pa.table(cols + [internal[ROW_ID]], names=names + ["\0rid"]) if cols else \
        pa.table({"\0rid": internal[ROW_ID]})

    # split / sub-split / paging
    split_hdr = headers.get("tabular-split", "0,1,8")
    try:
        split_id, num_splits, rg = (int(x) for x in split_hdr.split(","))
        num_sub = int(headers.get("tabular-num-of-subsplits", "1"))
        limit = int(headers.get("tabular-limit-rows", "0")) or (1 << 62)
        prio = headers.get("tabular-schedule-id")
        if prio is not None and int(prio) < 0:
            raise _bad(f"invalid schedule id {prio}")
        starts = {}
        for i in range(num_sub):
            v = headers.get(f"tabular-start-row-id-{i}", f"{i},0")
            starts[i] = int(v.split(",")[1])
    except (ValueError, IndexError) as e:
        raise _bad(f"query_data: bad split headers: {e}") from e
    if num_splits < 1 or num_sub < 1 or rg < 1:
        raise _bad("query_data: split counts must be positive")

    def matches(positions: np.ndarray) -> np.ndarray:
        """Predicate over the rows at `positions` (bool per position)."""
        if len(positions) == 0:
            return np.zeros(0, bool)
        sub_tbl = tbl if len(positions) == tbl.num_rows else tbl.take(pa.array(positions))
        res = _QueryEval(sub_tbl, nodes, {}).eval(filt).fill_null(False)
        return res.to_numpy(zero_copy_only=False).astype(bool)

    if split_id == ESTIMATION_SPLIT_ID:  # sorted tables: row-group estimate
        count = int(matches(np.arange(tbl.num_rows)).sum())
        groups = (count + ROWS_PER_ROW_GROUP - 1) // ROWS_PER_ROW_GROUP
        return [b"".join(_page(0, INVALID_ROW_ID, [], groups))]

    order, bounds = _split_layout(internal, ids, rg, num_splits, num_sub)
    leaves = [nodes[p] for p in projection]
    out: list[bytes] = []
    for i in range(num_sub):
        start = starts[i]
        if start >= INVALID_ROW_ID:
            continue
        k = split_id * num_sub + i
        cand = order[bounds[k]:bounds[k + 1]] if split_id < num_splits else order[:0]
        if start:
            cand = cand[np.searchsorted(ids[cand], np.uint64(start)):]
        # evaluate the predicate window by window until limit+1 matches (paging stays cheap)
        found: list[np.ndarray] = []
        nfound, pos, window = 0, 0, max(4096, min(limit + 1, 1 << 20))
        while pos < len(cand) and nfound <= limit:
            w = cand[pos:pos + window]
            hit = w[matches(w)]
            found.append(hit)
            nfound += len(hit)
            pos += window
            window *= 2
        rows = np.concatenate(found) if found else np.zeros(0, np.int64)
        page = rows[:limit]
        nxt = int(ids[page[-1]]) + 1 if len(rows) > limit else INVALID_ROW_ID
        arrays = []
        if leaves:
            taken = tbl.take(pa.array(page, pa.int64()))
            for leaf in leaves:
                root = leaf
                while root.parent is not None:
                    root = root.parent
                arrays.append(_leaf_array(_combine(taken[root.name]), root, leaf))
        out.append(b"".join(_page(i, nxt, arrays, len(page))))
    return out


# --------------------------------------------------------------------------------------------
# flatbuffer responses


def _obj_details(b: flatbuffers.Builder, name: str, properties: str = "", handle: str | None = None,
                 num_rows: int = 0, size: int = 0, sorting: bool = False) -> int:
    n = b.CreateString(name)
    p = b.CreateString(properties)
    h = b.CreateString(handle) if handle is not None else None
    fb_obj.Start(b)
    fb_obj.AddName(b, n)
    fb_obj.AddProperties(b, p)
    if h is not None:
        fb_obj.AddHandle(b, h)
    fb_obj.AddNumRows(b, num_rows)
    fb_obj.AddSizeInBytes(b, size)
    fb_obj.AddSortingKeyEnabled(b, sorting)
    if sorting:
        fb_obj.AddSortingScore(b, -(1 << 63))  # bit 63 = sorting done
    return fb_obj.End(b)


def _vector(b: flatbuffers.Builder, start_fn, offsets: list[int]) -> int:
    start_fn(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _list_schemas_body(bucket: str, names: list[tuple[str, str]]) -> bytes:
    b = flatbuffers.Builder(1024)
    objs = [_obj_details(b, n, p) for n, p in names]
    vec = _vector(b, fb_list_schemas.StartSchemasVector, objs)
    bn = b.CreateString(bucket)
    fb_list_schemas.Start(b)
    fb_list_schemas.AddBucketName(b, bn)
    fb_list_schemas.AddSchemas(b, vec)
    b.Finish(fb_list_schemas.End(b))
    return bytes(b.Output())


def _list_tables_body(bucket: str, schema: str, rows: list[dict]) -> bytes:
    b = flatbuffers.Builder(1024)
    objs = [_obj_details(b, r["name"], "", str(r["handle"]), r["num_rows"], r["size"],
                         r["sorting"]) for r in rows]
    vec = _vector(b, fb_list_tables.StartTablesVector, objs)
    bn = b.CreateString(bucket)
    sn = b.CreateString(schema)
    fb_list_tables.Start(b)
    fb_list_tables.AddBucketName(b, bn)
    fb_list_tables.AddSchemaName(b, sn)
    fb_list_tables.AddTables(b, vec)
    b.Finish(fb_list_tables.End(b))
    return bytes(b.Output())


def _stats_body(num_rows: int, size: int, sorting: bool, external: bool) -> bytes:
    b = flatbuffers.Builder(256)
    fb_stats.StartVipsVector(b, 0)
    vips = b.EndVector()
    fb_stats.Start(b)
    fb_stats.AddNumRows(b, num_rows)
    fb_stats.AddSizeInBytes(b, size)
    fb_stats.AddIsExternalRowidAlloc(b, external)
    fb_stats.AddVips(b, vips)
    fb_stats.AddSortingKeyEnabled(b, sorting)
    fb_stats.AddSortingScore(b, -(1 << 63) if sorting else 0)
    fb_stats.AddAcummulativeRowInseritionCount(b, num_rows)
    b.Finish(fb_stats.End(b))
    return bytes(b.Output())


def _columns_body(meta: TableMeta, only_sorted: bool, start: int = 0,
                  max_keys: int | None = None) -> bytes:
    pos = {cid: i for i, cid in enumerate(meta.sort_key)}
    fields = []
    for cid, f in meta.fields:
        md = dict(f.metadata or {})
        if cid in pos:
            md[SORT_TYPE.encode()] = b"Sorted"
            md[SORT_INDEX.encode()] = str(pos[cid]).encode()
        else:
            md[SORT_TYPE.encode()] = b"Unsorted"
        fields.append((cid, f.with_metadata(md)))
    if only_sorted:
        by = dict(fields)
        fields = [(cid, by[cid]) for cid in meta.sort_key]
    if max_keys is not None:
        fields = fields[start:start + max_keys]
    schema = pa.schema([f for _, f in fields], metadata=dict(meta.schema_metadata) or None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------------------------
# faults


@dataclass
class Faults:
    """Fault-injection knobs (fractions are per request, 0..1)."""

    slowdown_rate: float = 0.0  # answer 503 <Code>SlowDown</Code> before doing anything
    drop_rate: float = 0.0  # drop the connection without applying the request
    drop_after_apply_rate: float = 0.0  # apply the request, then drop (lost response)
    commit_conflict_rate: float = 0.0  # answer a commit with 409 Conflict (tx rolled back)
    delay_s: float = 0.0  # delay every response by this much ...
    delay_jitter_s: float = 0.0  # ... plus uniform(0, jitter)
    # limit faults to these commands: "rows", "data", ... or "METHOD command" such as
    # "PUT transaction" (commit) or "POST rows" (insert)
    commands: tuple = ()
    seed: int | None = None

    @staticmethod
    def names() -> list[str]:
        return [f for f in Faults.__dataclass_fields__ if f != "seed"]


# --------------------------------------------------------------------------------------------
# HTTP


def _xml_error(code: str, message: str) -> bytes:
    from xml.sax.saxutils import escape

    return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error>").encode()


class _Dropped(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def version_string(self) -> str:
        return f"vast {self.server.sim_version}"

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    # ---- plumbing
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n <= self.server.max_body:
            return self.rfile.read(n) if n else b""
        left = n  # drain so the client can read our 400 instead of a broken pipe
        while left > 0:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                break
            left -= len(got)
        raise _bad(f"request body of {n} bytes exceeds the {self.server.max_body}-byte limit",
                   "EntityTooLarge")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _drop(self, partial: bytes = b"", total: int = 0) -> None:
        self.close_connection = True
        try:
            if total:
                self.send_response(200)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                self.wfile.write(partial)
                self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped()

    def _dispatch(self) -> None:
        srv = self.server
        srv.count("requests")
        self._pages = None
        path, _, query = self.path.partition("?")
        parts = [p for p in query.split("&") if p]
        command = next((p for p in parts if "=" not in p), "")
        params = dict(parse_qsl("&".join(p for p in parts if "=" in p)))
        segs = [s for s in path.split("/") if s]
        srv.count(f"{self.command} {command}" if command else self.command)
        probe = command == "transaction" and \
            self.headers.get("tabular-get-vast-version", "").lower() == "true"
        try:
            try:
                body = self._read_body()
            except SimError as e:
                self._send(e.status, _xml_error(e.code, e.message))
                return
            self._auth(body)
            faults = srv.faults
            active = not probe and (not faults.commands or command in faults.commands
                                    or f"{self.command} {command}" in faults.commands)
            rnd = srv.rng
            if active and self.command != "HEAD" and faults.slowdown_rate and \
                    rnd.random() < faults.slowdown_rate:
                srv.count("slowdown")
                self._send(503, _xml_error("SlowDown", "vastsim: injected slowdown"))
                return
            if active and faults.drop_rate and rnd.random() < faults.drop_rate:
                srv.count("dropped")
                self._drop()
            drop_after = active and faults.drop_after_apply_rate and \
                rnd.random() < faults.drop_after_apply_rate
            if active and command == "transaction" and self.command == "PUT" and \
                    faults.commit_conflict_rate and rnd.random() < faults.commit_conflict_rate:
                srv.count("conflict")
                txid = int(self.headers.get("tabular-txid", "0") or 0)
                try:
                    srv.state.rollback(txid)
                except SimError:
                    pass
                raise SimError(409, "Conflict", "vastsim: injected commit conflict")
            status, out, hdrs = self._route(command, params, segs, body)
            delay = faults.delay_s + (rnd.uniform(0, faults.delay_jitter_s)
                                      if faults.delay_jitter_s else 0.0)
            if active and delay > 0:
                time.sleep(delay)
            if drop_after:
                srv.count("dropped_after_apply")
                # a GET ?data is cut between two pages (after half of them), others before
                # any response byte
                pages = getattr(self, "_pages", None) or []
                self._drop(b"".join(pages[: len(pages) // 2]),
                           len(out) if command == "data" else 0)
            self._send(status, out, hdrs)
        except _Dropped:
            return
        except SimError as e:
            srv.count(f"error_{e.status}")
            self._send(e.status, _xml_error(e.code, e.message))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never drop a connection on an internal error
            log.exception("vastsim: internal error on %s %s", self.command, self.path)
            srv.count("error_500")
            self._send(500, _xml_error("InternalError", f"{type(e).__name__}: {e}"))

    def _auth(self, body: bytes) -> None:
        """Check the access key and, when a secret is configured, the SigV4 signature."""
        want = self.server.access_key
        if want is None:
            return
        auth = self.headers.get("Authorization", "")
        parts = dict(p.strip().split("=", 1) for p in auth.partition(" ")[2].split(",")
                     if "=" in p)
        cred = parts.get("Credential", "").split("/")
        if not cred or cred[0] != want:
            raise SimError(403, "InvalidAccessKeyId", "the access key is not recognised")
        secret = self.server.secret_key
        if secret is None:
            return
        if len(cred) != 5 or "Signature" not in parts or "SignedHeaders" not in parts:
            raise SimError(403, "AccessDenied", "malformed AWS4-HMAC-SHA256 authorization")
        _, date, region, service, _ = cred
        path, _, query = self.path.partition("?")
        canon_q = "&".join(q if "=" in q else q + "="
                           for q in sorted(query.split("&")) if q.split("=", 1)[0])
        signed = parts["SignedHeaders"].split(";")
        canon_h = "".join(f"{h}:{self.headers.get(h, '')}\n" for h in signed)
        creq = "\n".join([self.command, quote(path or "/", safe="/-_.~"), canon_q, canon_h,
                          parts["SignedHeaders"], hashlib.sha256(body).hexdigest()])
        amzdate = self.headers.get("x-amz-date", "")
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amzdate, f"{date}/{region}/{service}/aws4_request",
                             hashlib.sha256(creq.encode()).hexdigest()])
        key = ("AWS4" + secret).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, parts["Signature"]):
            raise SimError(403, "SignatureDoesNotMatch", "the request signature does not match")

    def _txid(self) -> int:
        try:
            return int(self.headers.get("tabular-txid", "0"))
        except ValueError as e:
            raise _bad("tabular-txid must be a decimal integer") from e

    def _list_window(self, names: list) -> tuple[list, dict]:
        h = self.headers
        exact = h.get("tabular-name-exact-match")
        prefix = h.get("tabular-name-prefix", "")
        if exact is not None:
            names = [x for x in names if x[0] == exact]
        elif prefix:
            names = [x for x in names if x[0].startswith(prefix)]
        start = int(h.get("tabular-next-key", "0") or 0)
        max_keys = int(h.get("tabular-max-keys", "1000") or 1000)
        page = names[start:start + max_keys]
        truncated = start + max_keys < len(names)
        hdrs = {"tabular-next-key": start + len(page) if truncated else 0,
                "tabular-is-truncated": "true" if truncated else "false",
                "tabular-list-count": len(names)}
        if h.get("tabular-list-count-only", "False").lower() == "true":
            page = []
        return page, hdrs

    def _sorting_headers(self) -> list[int]:
        out = []
        i = 0
        while (v := self.headers.get(f"tabular-sorted-column-{i}")) is not None:
            try:
                out.append(int(v))
            except ValueError as e:
                raise _bad(f"bad sorting column index {v!r}") from e
            i += 1
        return out

    def _route(self, command: str, params: dict, segs: list[str], body: bytes):
        st: SimState = self.server.state
        m = self.command
        if command == "transaction":
            if segs:
                raise _bad("transactions are addressed at /")
            if m == "GET":
                if self.headers.get("tabular-get-vast-version", "").lower() == "true":
                    return 200, b"", {}
                with st.lock:
                    st.tx(self._txid())
                return 200, b"", {}
            if m == "POST":
                return 200, b"", {"tabular-txid": st.begin()}
            if m == "PUT":
                st.commit(self._txid())
                return 200, b"", {}
            if m == "DELETE":
                st.rollback(self._txid())
                return 200, b"", {}
        if not segs:
            raise SimError(405, "MethodNotAllowed", f"{m} {self.path} is not supported")
        bucket = segs[0]
        if m == "HEAD" and not command:
            st.check_bucket(bucket)
            return 200, b"", {}
        txid = self._txid()
        if command == "schema":
            path = "/".join(segs[1:])
            with st.lock:
                tx = st.tx(txid)
                if m == "GET":
                    st.check_bucket(bucket)
                    if path:
                        st.need_schema(tx, bucket, path)
                    props = {p: (st.get_schema(tx, bucket, p) or SchemaMeta("", "")).properties
                             for p in st.all_schemas(tx, bucket)}
                    names = [(n, props.get(f"{path}/{n}" if path else n, ""))
                             for n in st.child_schemas(tx, bucket, path)]
                    page, hdrs = self._list_window(names)
                    return 200, _list_schemas_body(bucket, page), hdrs
                if m == "POST":
                    st.create_schema(tx, bucket, path, "")
                    return 200, b"", {}
                if m == "DELETE":
                    st.drop_schema(tx, bucket, path)
                    return 200, b"", {}
                if m == "PUT":
                    new = params.get("tabular-new-schema-name")
                    if new:
                        st.rename_schema(tx, bucket, path, new)
                    return 200, b"", {}
        if command == "table" and m == "GET":
            schema = "/".join(segs[1:])
            with st.lock:
                tx = st.tx(txid)
                st.need_schema(tx, bucket, schema)
                metas = st.schema_tables(tx, bucket, schema)
                rows = []
                for t in metas:
                    rows.append((t.name, t))
                page, hdrs = self._list_window(rows)
                out = []
                for name, t in page:
                    nrows, size = st.counts(tx, t)
                    out.append({"name": name, "handle": t.handle, "num_rows": nrows,
                                "size": size, "sorting": t.sorted})
            return 200, _list_tables_body(bucket, schema, out), hdrs
        if len(segs) < 3:
            raise _bad(f"{command}: the path must be /bucket/schema/table")
        schema, table = "/".join(segs[1:-1]), segs[-1]
        if params.get("sub-table"):
            raise SimError(501, "NotImplemented", "sub-tables (imports table) are not supported")
        if command == "table":
            with st.lock:
                tx = st.tx(txid)
                if m == "POST":
                    try:
                        arrow_schema = pa.ipc.read_schema(pa.py_buffer(body))
                    except (pa.ArrowInvalid, OSError) as e:
                        raise _bad(f"create table: body is not an Arrow schema: {e}") from e
                    if any(k.startswith(b"VAST:table:partition-key")
                           for k in (arrow_schema.metadata or {})):
                        raise SimError(501, "NotImplemented", "partitioned tables")
                    if self.headers.get("tabular-vector-index-column"):
                        raise SimError(501, "NotImplemented", "vector indexes")
                    st.create_table(tx, bucket, schema, table, arrow_schema,
                                    self._sorting_headers())
                    return 200, b"", {}
                if m == "DELETE":
                    st.drop_table(tx, bucket, schema, table)
                    return 200, b"", {}
                if m == "PUT":
                    new = params.get("tabular-new-table-name", "")
                    st.alter_table(tx, bucket, schema, table, new.rpartition("/")[2] or None,
                                   self._sorting_headers())
                    return 200, b"", {}
        if command in ("column", "sorted-columns"):
            with st.lock:
                tx = st.tx(txid)
                meta = st.need_table(tx, bucket, schema, table)
                if m == "GET":
                    if command == "sorted-columns" and not meta.sorted:
                        raise _bad("Listing sorted columns without elysium enabled")
                    total = len(meta.sort_key) if command == "sorted-columns" \
                        else len(meta.fields)
                    start = int(self.headers.get("tabular-next-key", "0") or 0)
                    max_keys = max(1, int(self.headers.get("tabular-max-keys", "10000")
                                          or 10000))
                    truncated = start + max_keys < total
                    hdrs = {"tabular-next-key": start + max_keys if truncated else 0,
                            "tabular-is-truncated": "true" if truncated else "false",
                            "tabular-list-count": total}
                    body = _columns_body(meta, command == "sorted-columns", start, max_keys)
                    return 200, body, hdrs
                if command == "column" and m in ("POST", "DELETE"):
                    try:
                        cols = pa.ipc.read_schema(pa.py_buffer(body))
                    except (pa.ArrowInvalid, OSError) as e:
                        raise _bad(f"column: body is not an Arrow schema: {e}") from e
                    if m == "POST":
                        st.add_columns(tx, bucket, schema, table, cols)
                    else:
                        st.drop_columns(tx, bucket, schema, table, cols)
                    return 200, b"", {}
                if command == "column" and m == "PUT":
                    old = params.get("tabular-column-name", "")
                    st.rename_column(tx, bucket, schema, table, old,
                                     params.get("tabular-new-column-name", ""))
                    return 200, b"", {}
        if command == "stats" and m == "GET":
            with st.lock:
                tx = st.tx(txid)
                meta = st.need_table(tx, bucket, schema, table)
                nrows, size = st.counts(tx, meta)
                td = st._tdata(tx, meta.handle)
                ext = td.external_rowid or meta.handle in tx.external
            return 200, _stats_body(nrows, size, meta.sorted, ext), {}
        if command == "rows":
            if m == "POST":
                return 200, st.insert(txid, bucket, schema, table, body), {}
            if m in ("PUT", "DELETE"):
                st.update(txid, bucket, schema, table, body, delete=(m == "DELETE"))
                return 200, b"", {}
        if command == "data" and m == "GET":
            if params.get("name"):
                raise SimError(501, "NotImplemented", "semi-sorted projections")
            pages = query_data(st, txid, bucket, schema, table, body, self.headers)
            self._pages = pages
            return 200, b"".join(pages), {}
        raise SimError(501, "NotImplemented", f"{m} ?{command} is not supported by vastsim")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, state: SimState, *, access_key: str | None,
                 secret_key: str | None, version: str, faults: Faults, max_body: int):
        super().__init__(addr, _Handler)
        self.state = state
        self.access_key = access_key
        self.secret_key = secret_key if access_key is not None else None
        self.sim_version = version
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.max_body = max_body
        self.counters: dict[str, int] = {}
        self._clock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("vastsim: client %s went away: %s", client_address, exc)
            return
        log.error("vastsim: error on connection from %s", client_address, exc_info=exc)

    def count(self, what: str) -> None:
        with self._clock:
            self.counters[what] = self.counters.get(what, 0) + 1


# --------------------------------------------------------------------------------------------
# public API


class VastSim:
    """A running in-process vastsim (background thread). Use as a context manager."""

    def __init__(self, data_dir: str | os.PathLike | None, port: int = 0, *,
                 host: str = "127.0.0.1", access_key: str | None = None,
                 secret_key: str | None = None, buckets=DEFAULT_BUCKETS,
                 version: str = DEFAULT_VERSION, max_cell_bytes: int = MAX_CELL_BYTES,
                 max_body: int = MAX_REQUEST_BODY, cell_error: tuple[int, str] = (400,
                                                                                   "TabularCellTooLarge"),
                 tx_timeout_s: float = 900.0, **faults: Any):
        unknown = set(faults) - set(Faults.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown vastsim options: {sorted(unknown)}")
        self.state = SimState(data_dir, buckets=buckets, max_cell_bytes=max_cell_bytes,
                              cell_error=cell_error, tx_timeout_s=tx_timeout_s)
        self._access = access_key
        self._secret = secret_key
        self._server = _Server((host, port), self.state, access_key=access_key,
                               secret_key=secret_key, version=version,
                               faults=Faults(**faults), max_body=max_body)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"vastsim:{self.port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def access_key(self) -> str:
        return self._access or "vastsim"

    @property
    def secret_key(self) -> str:
        return self._secret or "vastsim"

    @property
    def faults(self) -> Faults:
        return self._server.faults

    @property
    def counters(self) -> dict[str, int]:
        """Requests seen and faults injected (e.g. counters['slowdown'])."""
        with self._server._clock:
            return dict(self._server.counters)

    def set_faults(self, **faults: Any) -> None:
        """Change fault knobs at run time (unnamed knobs keep their values)."""
        cur = self._server.faults
        new = replace(cur, **faults)
        self._server.faults = new
        if "seed" in faults:
            self._server.rng = random.Random(new.seed)

    def clear_faults(self) -> None:
        self._server.faults = Faults()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> VastSim:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vastsim(data_dir: str | os.PathLike | None, port: int = 0, **opts: Any) -> VastSim:
    """Start vastsim in a background thread; `opts` are VastSim options and fault knobs."""
    return VastSim(data_dir, port, **opts)


class VastSimProcess:
    """vastsim in a child process (`python -m dvidetl.testing.vastsim`), for crash tests."""

    def __init__(self, data_dir: str | os.PathLike, port: int = 0, *,
                 access_key: str | None = None, secret_key: str | None = None,
                 extra_args: list[str] | None = None, **faults: Any):
        args = [sys.executable, "-m", "dvidetl.testing.vastsim", "--port", str(port),
                "--data-dir", str(data_dir)]
        for k, v in faults.items():
            if k not in Faults.__dataclass_fields__:
                raise TypeError(f"unknown fault knob {k!r}")
            if k == "commands":
                v = ",".join(v)
            args += [f"--{k.replace('_', '-')}", str(v)]
        args += extra_args or []
        env = dict(os.environ)
        if access_key is not None:  # secrets go through the environment, never argv
            env["VASTSIM_ACCESS_KEY"] = access_key
            env["VASTSIM_SECRET_KEY"] = secret_key or ""
        self._access, self._secret = access_key, secret_key
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"vastsim process failed to start: {line!r}")
        self.endpoint = line.strip().rsplit(" ", 1)[1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    @property
    def access_key(self) -> str:
        return self._access or "vastsim"

    @property
    def secret_key(self) -> str:
        return self._secret or "vastsim"

    def kill(self) -> None:
        """SIGKILL: uncommitted transactions are lost, committed data stays on disk."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> VastSimProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vastsim_process(data_dir: str | os.PathLike, port: int = 0,
                          **opts: Any) -> VastSimProcess:
    return VastSimProcess(data_dir, port, **opts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dvidetl.testing.vastsim",
                                description="Local wire-compatible VAST DataBase server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090, help="0 picks a free port")
    p.add_argument("--data-dir", default=None,
                   help="directory for committed state (default: in memory only)")
    p.add_argument("--bucket", action="append", default=None,
                   help=f"bucket that exists (repeatable; default {', '.join(DEFAULT_BUCKETS)})")
    p.add_argument("--version", default=DEFAULT_VERSION, help="reported VAST version A.B.C.D")
    p.add_argument("--max-cell-bytes", type=int, default=MAX_CELL_BYTES)
    p.add_argument("--max-body", type=int, default=MAX_REQUEST_BODY)
    p.add_argument("--tx-timeout-s", type=float, default=900.0,
                   help="roll back transactions idle this long (abandoned by a dead client)")
    p.add_argument("--slowdown-rate", type=float, default=0.0)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--drop-after-apply-rate", type=float, default=0.0)
    p.add_argument("--commit-conflict-rate", type=float, default=0.0)
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--delay-jitter-s", type=float, default=0.0)
    p.add_argument("--commands", default="", help="comma list of commands faults apply to")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="wipe --data-dir first")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING)
    if a.fresh and a.data_dir and Path(a.data_dir).exists():
        shutil.rmtree(a.data_dir)
    access = os.environ.get("VASTSIM_ACCESS_KEY") or None
    secret = os.environ.get("VASTSIM_SECRET_KEY") or None
    sim = VastSim(a.data_dir, a.port, host=a.host, access_key=access, secret_key=secret,
                  buckets=tuple(a.bucket) if a.bucket else DEFAULT_BUCKETS, version=a.version,
                  max_cell_bytes=a.max_cell_bytes, max_body=a.max_body,
                  tx_timeout_s=a.tx_timeout_s,
                  slowdown_rate=a.slowdown_rate, drop_rate=a.drop_rate,
                  drop_after_apply_rate=a.drop_after_apply_rate,
                  commit_conflict_rate=a.commit_conflict_rate, delay_s=a.delay_s,
                  delay_jitter_s=a.delay_jitter_s,
                  commands=tuple(c for c in a.commands.split(",") if c), seed=a.seed)
    print(f"vastsim listening on {sim.endpoint}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
