"""vastsim's state: catalog, table data, transactions with snapshot isolation, and the
directory that keeps committed state across restarts."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dvidetl.testing._vastsim_model import (
    _CID,
    DEFAULT_BUCKETS,
    MAX_CELL_BYTES,
    ROW_ID,
    SchemaMeta,
    SimError,
    TableData,
    TableMeta,
    Tx,
    _aligned,
    _apply_op,
    _bad,
    _cell_sizes,
    _check_type,
    _cname,
    _combine,
    _ipc_stream,
    _read_stream_batch,
    _rowids_to_u64,
    _sort_by_rowid,
)

log = logging.getLogger("dvidetl.vastsim")

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
    def begin(self, client: tuple = ()) -> int:
        with self.lock:
            now = time.monotonic()  # abandoned transactions (a killed client) expire
            for old in [t for t in self.txs.values() if now - t.last_used > self.tx_timeout_s]:
                log.info("vastsim: transaction %d idle for %.0f s: rolled back", old.txid,
                         now - old.last_used)
                del self.txs[old.txid]
                self._release(old.txid)
            txid = self.next_txid
            self.next_txid += 1
            self.txs[txid] = Tx(txid=txid, begin_seq=self.seq, client=tuple(client))
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
        for committed, changes in ((self.schemas, tx.schemas), (self.tables, tx.tables)):
            for key, meta in changes.items():
                if meta is None:  # dropped
                    committed.pop(key, None)
                else:
                    committed[key] = meta
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
                        gone = td.files[i]
                        if gone:
                            removed_files.append(gone)
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
