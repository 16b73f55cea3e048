"""``vastdb://HOST[:PORT]/BUCKET/SCHEMA``: the export written into VAST DataBase with the
real ``vastdb`` SDK.

The tables of ``dvidetl.tables.schema`` live in ``BUCKET/SCHEMA`` (one export, instance@uuid, per
schema; a schema holding another export is refused, because rewriting a partition deletes
rows by range) plus ``export_runs`` (each run's plan as JSON, cut into cell-limit parts).

Why it is shaped like this (see ``../shared/docs/vastdb-notes.md``):

* **DDL once, on the driver** (``prepare``), committed before any worker starts: the SDK's
  create-if-not-exists is check-then-create and races between processes. An existing table
  whose columns differ is a ``UserError`` naming the column.
* **One transaction per partition**: the ledger row is checked inside it (skip when present),
  the rows an earlier run left in the partition's range are deleted by predicate, the new rows
  and the ledger row inserted; commit = exported, anything else = nothing is.
* **Unknown outcomes are resolved by reading the ledger**: a dropped insert poisons only its
  own (uncommitted) transaction, which is abandoned and redone from the start; a commit whose
  answer is lost is followed by a ledger read before anything is written again.
* **One RPC per insert**: every cell is checked against the cell limit on the client (the SDK
  never does) and batches are cut below ``INSERT_BUDGET`` bytes, so the SDK never falls back
  to its insert + update splitting.
* **The table format is the ``blocks`` table's columns** (VAST keeps no other marker we
  could trust): an export in an older format (``dvidetl.tables.schema.FORMAT``) is read under
  today's column names and appended to in its own format, like the Parquet sink does.
* Credentials come only from the environment (``VASTDB_ACCESS_KEY``/``VASTDB_SECRET_KEY``,
  then ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or the file named by
  ``VASTDB_CREDENTIALS_FILE``; they never appear in the URL, ``repr`` or logs.

URL query options: ``endpoints=H:P,H:P`` (more CNode VIPs; the partition key picks one per
transaction, reads use them all), ``cell_limit=N`` (default 129,024), ``timeout=S`` (read
timeout per request, default 120 s), ``tries=N`` (transaction attempts, default 8).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dvidetl.errors import UserError, first_line
from dvidetl.export.batch import BlockData, PartitionData, TableData
from dvidetl.export.kinds import KINDS, Partition, PartitionStats, RunInfo
from dvidetl.geometry import KEY_END, uncovered
from dvidetl.retry import Backoff, retry
from dvidetl.sinks._vastdb_support import (
    DEFAULT_TIMEOUT,
    _Creds,
    _describe,
    _install_log_filter,
    _retryable,
    check_cells,
    chunk_json,
    cut_rows,
    load_credentials,
    parse_url,
)
from dvidetl.sinks.base import Outside, Sink, Where
from dvidetl.tables import schema as S
from dvidetl.tables.cells import block_cells, check_cell_limit, failed_cells

# Imports inside functions load vastdb, ibis, vastdb's HTTP client only where used: importing this
# module must not (CLI start-up, processes that never call them). Those in try/if/with blocks are
# optional or conditional.

log = logging.getLogger(__name__)

#: the run plans: one row per part of a run's JSON
EXPORT_RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("instance", pa.string()),
        ("uuid", pa.string()),
        ("created", pa.float64()),
        ("part", pa.uint32()),
        ("nparts", pa.uint32()),
        ("plan", pa.binary()),
    ]
)
#: connect and read deadline of the preflight check (``VastDBSink.check``), in seconds
CHECK_TIMEOUT_S = 5.0
#: what a connection error says when nothing could be connected to (no retry then)
_NO_CONNECTION = ("NewConnectionError", "Failed to establish", "Name or service not known",
                  "nodename nor servname", "Temporary failure in name resolution",
                  "ConnectTimeout", "Connection refused")
#: every table the sink creates
ALL_TABLES: dict[str, pa.Schema] = {**S.TABLES, "export_runs": EXPORT_RUNS}
#: sorting keys: range reads of a scale / a label prune server-side
SORTING_KEYS: dict[str, list[str]] = {"blocks": ["scale", "morton"], "label_index": ["label"]}


# ---------------------------------------------------------------------------------------------
# the sink
# ---------------------------------------------------------------------------------------------


class VastDBUnavailable(UserError, ConnectionError):
    """A sink step (a transaction, a connect) kept failing with transient errors for every
    try: one line naming the step, the sink and the last error, like a DVID server that
    stays unavailable. Still a ``ConnectionError``, so an enclosing retry (a partition's
    transaction, a task) treats it as the transient failure it wraps."""


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (requests' messages nest the whole pool
    state; the innermost OS error is what the user can act on)."""

    text = first_line(exc, 400)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return type(exc).__name__


class VastDBSink(Sink):
    """``vastdb://HOST[:PORT]/BUCKET/SCHEMA`` for one (uuid, instance)."""

    needs = frozenset({"payload"})  # blocks rows store the zstd payload (cut into cells)

    def __init__(self, url: str, *, uuid: str, instance: str):
        self.url = url
        self.uuid = uuid
        self.instance = instance
        self.cfg = parse_url(url)
        self._creds: _Creds | None = None
        self._local = threading.local()  # one SDK session per (process, thread, endpoint)
        self._runs: dict[str, RunInfo] = {}
        self._md: dict[str, object] = {}
        self._format: int | None = None

    def __repr__(self) -> str:
        return f"VastDBSink({self.cfg.endpoints[0]}/{self.cfg.bucket}/{self.cfg.schema})"

    __str__ = __repr__

    def __getstate__(self):
        return {"url": self.url, "uuid": self.uuid, "instance": self.instance, "format": self._format}

    def __setstate__(self, st):
        self.__init__(st["url"], uuid=st["uuid"], instance=st["instance"])
        self._format = st.get("format")

    @property
    def format(self) -> int:
        """The export's table format: from the stored ``blocks`` columns, this code's format
        when there is no table yet (asked once per process; workers get it pickled)."""
        if self._format is None:
            self._format = self._tx(self._stored_format, "table format")
        return self._format

    def _stored_format(self, tx) -> int:
        from vastdb import errors as E

        try:
            sch = self._schema_obj(tx, create=False)
            t = sch.table("blocks", fail_if_missing=False) if sch is not None else None
        except (E.MissingSchema, E.MissingBucket, E.NotFound):
            return S.FORMAT
        if t is None:
            return S.FORMAT
        fmt = S.format_of_columns("blocks", t.arrow_schema.names)
        if fmt is None:
            raise UserError(f"VastDB table {self.cfg.bucket}/{self.cfg.schema}/blocks has columns "
                            f"of no table format this dvidetl knows (1..{S.FORMAT}): written by a "
                            "newer dvidetl? upgrade dvidetl")
        return fmt

    def _stored_schema(self, table: str) -> pa.Schema:
        return EXPORT_RUNS if table == "export_runs" else S.stored_schema(table, self.format)

    # -- sessions ------------------------------------------------------------------------------
    def _session(self, endpoint: str | None = None):
        """An SDK session for this thread and endpoint, made after fork (never inherited)."""
        import backoff
        import vastdb
        from vastdb.config import BackoffConfig

        _install_log_filter()
        endpoint = endpoint or self.cfg.endpoints[0]
        cache = getattr(self._local, "sessions", None)
        if cache is None or getattr(self._local, "pid", None) != os.getpid():
            cache = self._local.sessions = {}
            self._local.pid = os.getpid()
        s = cache.get(endpoint)
        if s is None:
            if self._creds is None:
                self._creds = load_credentials()
            bo = BackoffConfig(wait_gen=backoff.expo, max_value=5.0, max_tries=8, max_time=60.0)
            s = self._call(lambda: vastdb.connect(
                endpoint=endpoint, access=self._creds.access, secret=self._creds.secret,
                timeout=(DEFAULT_TIMEOUT[0], self.cfg.timeout), backoff_config=bo), f"connect {endpoint}")
            cache[endpoint] = s
        return s

    def _endpoint_for(self, key: str) -> str:
        eps = self.cfg.endpoints
        return eps[zlib.crc32(key.encode()) % len(eps)]

    def _md_of(self, table: str, name: str | None = None):
        """TableMetadata with the schema and type known: an insert is then exactly one RPC.
        ``name``: the stored table holding ``table``'s rows, if not ``table`` (a staged run's)."""
        from vastdb.table_metadata import TableMetadata, TableRef, TableType

        name = name or table
        md = self._md.get(name)
        if md is None:
            ttype = TableType.Elysium if table in SORTING_KEYS else TableType.Regular
            md = TableMetadata(TableRef(self.cfg.bucket, self.cfg.schema, name),
                               arrow_schema=self._stored_schema(table), table_type=ttype)
            self._md[name] = md
        return md

    def _name(self, table: str, run_id: str | None) -> str:
        """The stored table holding ``run_id``'s rows of ``table``: the table itself, or for a
        staged run (``run --overwrite``) not yet published its own ``<table>__stage_<run>``."""
        if run_id is None or table not in STAGED_TABLES:
            return table
        run = self.load_run(run_id)
        if not run.staged or run.record.get("published"):
            return table
        return staged_name(table, run_id)

    def _qcfg(self, endpoint: str | None, splits: int = 1):
        from vastdb.config import QueryConfig

        eps = [endpoint] if endpoint else list(self.cfg.endpoints)
        return QueryConfig(num_splits=max(splits, 1), num_sub_splits=4, data_endpoints=eps)

    def _policy(self) -> Backoff:
        return Backoff(tries=self.cfg.tries, base=0.2, cap=10.0)

    def _retryable(self, exc: BaseException) -> bool:
        """Transient? Errors the user must fix become a `UserError` here instead."""
        from vastdb import errors as E
        from vastdb._internal import UnsupportedServer

        if isinstance(exc, E.MissingBucket):
            raise UserError(f"{self!r}: bucket {self.cfg.bucket!r} does not exist") from None
        if isinstance(exc, E.Forbidden):
            raise UserError(f"{self!r}: access denied ({getattr(exc, 'code', None) or 'Forbidden'}): "
                            "check the VastDB credentials") from None
        if isinstance(exc, UnsupportedServer):
            raise UserError(f"{self!r}: not a VAST server ({exc})") from None
        return _retryable(exc)

    def _call(self, fn, what: str):
        """``fn()`` with retries on transient errors (only for idempotent work: reads, connect,
        whole transactions that abort cleanly)."""
        def unavailable(attempts: int, exc: BaseException) -> VastDBUnavailable:
            return VastDBUnavailable(f"{self!r}: {what} failed {attempts} time(s), last with "
                                     f"{_describe(exc)}: the VAST cluster is unreachable or failing; "
                                     "try again later (or raise the URL's tries=)")

        return retry(fn, self._policy(), retryable=self._retryable, what=what, describe=_describe,
                     exhausted=unavailable, logger=log)

    def _tx(self, fn, what: str, endpoint: str | None = None, *, write: bool = False):
        """``fn(tx)`` in a fresh transaction, retried as a whole on transient errors (readers
        are consumed inside it). A read-only transaction (``write=False``) whose commit
        answer is lost still returns what it read; a writing one must commit."""

        def once():
            user_error = raised = None
            done, result, txid = False, None, None
            session = self._session(endpoint)
            try:
                with session.transaction() as tx:
                    txid = tx.txid
                    try:
                        result = fn(tx)
                        done = True
                    except BaseException as exc:
                        # a user error wrote nothing: end the transaction quietly; anything
                        # else (a nested step failed for good too) the SDK rolls back
                        if isinstance(exc, UserError) and not isinstance(exc, VastDBUnavailable):
                            user_error = exc
                        else:
                            raised = exc
                            raise
            except Exception as exc:
                if exc is not raised:  # the commit, or the SDK's rollback, failed: maybe still open
                    _abandon(session, txid, what)
                if done and not write:
                    return result
                raise
            if user_error is not None:
                raise user_error
            return result

        return self._call(once, what)

    # -- selects -----------------------------------------------------------------------------
    def _select(self, tx, table: str, pred, columns: list[str] | None, *, endpoint: str | None = None,
                row_ids: bool = False, splits: int = 1, name: str | None = None) -> pa.Table:
        t = tx.table_from_metadata(self._md_of(table, name))
        cols = None if columns is None else list(columns)  # the SDK appends to the list it gets
        rd = t.select(columns=cols, predicate=pred, config=self._qcfg(endpoint, splits),
                      internal_row_id=row_ids)
        return rd.read_all()

    @staticmethod
    def _and(terms: list):
        if not terms:
            return None
        p = terms[0]
        for t in terms[1:]:
            p = p & t
        return p

    # -- DDL ---------------------------------------------------------------------------------
    def _schema_obj(self, tx, create: bool):
        sch = tx.bucket(self.cfg.bucket)
        for name in self.cfg.schema.split("/"):
            nxt = sch.schema(name, fail_if_missing=False)
            if nxt is None and not create:
                return None
            sch = nxt if nxt is not None else sch.create_schema(name, fail_if_exists=False)
        return sch

    def _ensure_table(self, tx, table: str, name: str | None = None) -> None:
        """One table, created if missing (with its sorting key); an existing table must have
        exactly our columns. Idempotent, so a retried transaction just finds it."""
        from vastdb import errors as E

        sch = self._schema_obj(tx, create=False)
        want = self._stored_schema(table)
        name = name or table
        t = sch.table(name, fail_if_missing=False)
        if t is None:
            try:
                sch.create_table(name, want, fail_if_exists=True, sorting_key=SORTING_KEYS.get(table, []))
            except E.TableExists:
                t = sch.table(name)
        if t is not None:
            added = [f for f in want if f.name in S.ADDED_COLUMNS.get(table, ())
                     and f.name not in t.arrow_schema.names]
            if added:  # an export written before these columns existed: add them (null)
                t.add_column(pa.schema(added))
                t = sch.table(table)
            _compare_columns(f"{self.cfg.bucket}/{self.cfg.schema}", table, t.arrow_schema, want)

    def prepare(self, run: RunInfo) -> None:
        check_cell_limit(run.options.cell_limit, most=self.cfg.cell_limit)
        if run.instance != self.instance or run.uuid != self.uuid:
            raise ValueError("run is for another volume than this sink object")

        # DDL in small idempotent transactions (schema, then one per table), each retried:
        # progress survives a fault, and nothing is half-created (uncommitted = absent)
        self._tx(lambda tx: self._schema_obj(tx, create=True), "create schema", write=True)
        self._format = None  # the tables decide (an older export keeps its format) ...
        fmt = self.format  # ... asked here, not from inside the DDL transactions below
        log.debug("%r: table format %d", self, fmt)
        for table in ALL_TABLES:
            self._tx(lambda tx, table=table: self._ensure_table(tx, table), f"create table {table}",
                     write=True)
        if run.staged:  # run --overwrite: its own tables until it finishes
            for table in STAGED_TABLES:
                name = staged_name(table, run.run_id)
                self._tx(lambda tx, table=table, name=name: self._ensure_table(tx, table, name),
                         f"create table {name}", write=True)

        def store_plan(tx):
            other = self._select(tx, "export_runs", _col("part") == 0, ["run_id", "instance", "uuid"])
            for r in other.to_pylist():
                if (r["instance"], r["uuid"]) != (self.instance, self.uuid):
                    raise UserError(
                        f"{self.cfg.bucket}/{self.cfg.schema} already holds the export of "
                        f"{r['instance']}@{r['uuid']} (run {r['run_id']}): export "
                        f"{self.instance}@{self.uuid} into another schema")
            if run.run_id in set(other.column("run_id").to_pylist()):
                return
            self._insert_run(tx, run)

        self._tx(store_plan, "store run plan", write=True)
        self._runs[run.run_id] = run

    def _insert_run(self, tx, run: RunInfo) -> None:
        parts = chunk_json(run.to_json().encode(), self.cfg.cell_limit)
        rows = pa.table({
            "run_id": [run.run_id] * len(parts), "instance": [run.instance] * len(parts),
            "uuid": [run.uuid] * len(parts), "created": [float(run.created)] * len(parts),
            "part": list(range(len(parts))), "nparts": [len(parts)] * len(parts), "plan": parts,
        }, schema=EXPORT_RUNS)
        t = tx.table_from_metadata(self._md_of("export_runs"))
        for rb in cut_rows(rows):
            t.insert(rb)

    def _replace_run(self, tx, run: RunInfo) -> None:
        """Inside ``tx``: the run's rows of ``export_runs`` replaced by its JSON now."""
        old = self._select(tx, "export_runs", (_col("run_id") == run.run_id) & self._mine(), [],
                           row_ids=True)
        if old.num_rows:
            tx.table_from_metadata(self._md_of("export_runs")).delete(old)
        self._insert_run(tx, run)

    def update_run(self, run: RunInfo) -> None:
        """The run's record replaced in one transaction (one run's plan)."""
        self._tx(lambda tx: self._replace_run(tx, run), "update run record", write=True)
        self._runs[run.run_id] = run

    def check(self, *, write: bool = True, create: bool = True) -> None:
        """Credentials present, every endpoint reachable and answering as VAST, the bucket
        there and the keys accepted: one attempt per endpoint with ``CHECK_TIMEOUT_S``
        deadlines (no retries: a wrong host or port is not transient), before planning and
        before any worker starts. ``write``/``create`` change nothing here: the schema and
        tables are created by ``prepare``."""
        _install_log_filter()
        creds = self._creds or load_credentials()
        # the SDK's "RPC failed: {...}" and backoff's "Giving up ..." say below, in one line
        # (imported first: importing backoff sets its logger's level)
        import backoff  # noqa: F401
        import vastdb  # noqa: F401

        quiet = [logging.getLogger(n) for n in ("vastdb.errors", "backoff")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
        try:
            self._check_endpoints(creds)
        finally:
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)
        self._creds = creds

    def _check_endpoints(self, creds: _Creds) -> None:
        import backoff
        import requests
        import vastdb
        from vastdb import errors as E
        from vastdb._internal import UnsupportedServer
        from vastdb.config import BackoffConfig

        busy = (E.ServiceUnavailable, E.RequestTimeout, E.Conflict)

        def answering(exc: BaseException) -> bool:
            """The server is there but busy, or dropped one request: worth another try. Not
            when nothing could connect (refused, unknown host, connect timeout)."""
            if isinstance(exc, busy):
                return True
            text = repr(exc) + repr(exc.__cause__ or "")
            return isinstance(exc, (E.ConnectionError, requests.exceptions.RequestException)) and \
                not any(w in text for w in _NO_CONNECTION)
        for endpoint in self.cfg.endpoints:
            def once(endpoint=endpoint):
                s = vastdb.connect(endpoint=endpoint, access=creds.access, secret=creds.secret,
                                   timeout=(CHECK_TIMEOUT_S, CHECK_TIMEOUT_S),
                                   backoff_config=BackoffConfig(wait_gen=backoff.expo, max_value=1.0, max_tries=1,
                                                                max_time=CHECK_TIMEOUT_S))
                with s.transaction() as tx:
                    tx.bucket(self.cfg.bucket)

            try:
                # a server that answers "busy" (503, 408, 409) is there: wait it out like any
                # call (the sink's tries); one that does not answer fails at once
                retry(once, Backoff(tries=self.cfg.tries, base=0.5, cap=5.0),
                      retryable=answering, what=f"check {endpoint}",
                      describe=_describe, logger=log)
            except E.MissingBucket:
                raise UserError(f"{self!r}: bucket {self.cfg.bucket!r} does not exist at {endpoint} "
                                "(create it first; dvidetl creates only the schema and tables)") from None
            except E.Forbidden as exc:
                raise UserError(f"{self!r}: {endpoint} refused the credentials from {creds.source} "
                                f"({getattr(exc, 'code', None) or 'Forbidden'})") from None
            except UnsupportedServer as exc:
                raise UserError(f"{self!r}: {endpoint} is not a VAST server ({first_line(exc)})") from None
            except busy as exc:
                raise UserError(f"{self!r}: {endpoint} kept answering {_describe(exc)} for "
                                f"{self.cfg.tries} tries: the VAST cluster is busy or down; try again later"
                                ) from None
            except (requests.exceptions.RequestException, ConnectionError, TimeoutError, OSError,
                    E.ConnectionError) as exc:
                raise UserError(f"{self!r}: cannot reach {endpoint} within {CHECK_TIMEOUT_S:g} s "
                                f"({_reason(exc)}): check the host and port of the sink URL") from None

    # -- runs --------------------------------------------------------------------------------
    def _mine(self):
        return (_col("instance") == self.instance) & (_col("uuid") == self.uuid)

    def load_run(self, run_id: str) -> RunInfo:
        if run_id in self._runs:
            return self._runs[run_id]
        t = self._tx(lambda tx: self._select_missing_ok(
            tx, "export_runs", (_col("run_id") == run_id) & self._mine(), ["part", "nparts", "plan"]),
            "load_run")
        if t is None or t.num_rows == 0:
            known = ", ".join(self.runs()[-5:]) or "none"
            raise UserError(f"no run {run_id!r} in {self!r} for {self.instance}@{self.uuid} (runs: {known})")
        t = t.sort_by("part")
        nparts = int(t.column("nparts")[0].as_py())
        if t.column("part").to_pylist() != list(range(nparts)):
            raise UserError(f"run {run_id!r} in {self!r}: its stored plan is incomplete "
                            f"({t.num_rows} of {nparts} parts)")
        run = RunInfo.from_json(b"".join(t.column("plan").to_pylist()))
        self._runs[run_id] = run
        return run

    def _select_missing_ok(self, tx, table, pred, columns, name=None):
        """A select that answers None when the schema or table does not exist yet."""
        from vastdb import errors as E

        try:
            return self._select(tx, table, pred, columns, name=name)
        except (E.MissingSchema, E.MissingTable, E.NotFound):
            return None

    def runs(self) -> list[str]:
        t = self._tx(lambda tx: self._select_missing_ok(
            tx, "export_runs", (_col("part") == 0) & self._mine(), ["run_id"]), "runs")
        if t is None:
            return []
        return sorted(set(t.column("run_id").to_pylist()))

    # -- ledger ------------------------------------------------------------------------------
    @staticmethod
    def _ledger_pred(run_id: str, part: Partition):
        return ((_col("run_id") == run_id) & (_col("kind") == part.kind) & (_col("scale") == part.scale)
                & (_col("lo") == part.lo) & (_col("hi") == part.hi))

    def _ledger_count(self, tx, run_id: str, part: Partition, endpoint: str | None = None) -> int:
        t = self._select(tx, "export_ledger", self._ledger_pred(run_id, part), ["run_id"], endpoint=endpoint)
        return t.num_rows

    def is_done(self, run_id: str, part: Partition) -> bool:
        ep = self._endpoint_for(part.key)
        return self._tx(lambda tx: self._ledger_count(tx, run_id, part, ep), "is_done", ep) > 0

    def forget(self, run_id: str, part: Partition) -> None:
        def drop(tx) -> None:
            old = self._select(tx, "export_ledger", self._ledger_pred(run_id, part), [], row_ids=True)
            if old.num_rows:
                tx.table_from_metadata(self._md_of("export_ledger")).delete(old)

        self._tx(drop, f"forget {part.key}", write=True)

    def ledger(self, run_id: str | None = None) -> pa.Table:
        pred = None if run_id is None else (_col("run_id") == run_id)
        t = self._tx(lambda tx: self._select_missing_ok(tx, "export_ledger", pred, None), "ledger")
        if t is None:
            return S.empty("export_ledger")
        return _as_schema(t, S.EXPORT_LEDGER)

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def _range_pred(table: str, part: Partition):
        """Rows of ``table`` that belong to the partition (whatever run wrote them)."""
        if part.spec.scaled:
            return (_col("scale") == part.scale) & (_col("morton") >= part.lo) & (_col("morton") < part.hi)
        col = S.KEY_COLUMN[table]
        if part.lo == 0 and part.hi >= KEY_END - 1:
            return None  # all rows (also label 2**64-1, never a real label)
        return (_col(col) >= part.lo) & (_col(col) < part.hi)

    def _conformed(self, table: str, data: TableData) -> Iterator[pa.RecordBatch]:
        chunks: Iterable = [data] if isinstance(data, (pa.Table, pa.RecordBatch)) else data
        for chunk in chunks:
            if isinstance(chunk, pa.RecordBatch):
                chunk = pa.Table.from_batches([chunk])
            chunk = S.to_stored(table, S.conform(table, chunk), self.format)
            if chunk.num_rows == 0:
                continue
            check_cells(table, chunk, self.cfg.cell_limit)
            yield from cut_rows(chunk)

    def _rows(self, run_id: str, part: Partition, data: PartitionData) -> Callable[[], Iterator[tuple[str, pa.RecordBatch]]]:
        """The partition's rows as (table, one-RPC batch) pairs, conformed and cell-checked:
        a blocks partition cut into cells for the run's cell limit in one pass over its
        blocks. Data spilled to disk (``spill.SpilledTable``) is read by each transaction
        attempt, one group at a time (its rows are never all in memory; a bad cell fails the
        attempt before its commit, so nothing of it becomes visible); anything else is cut,
        conformed and checked here, before the transaction (a one-shot stream is consumed,
        so a retried transaction can resend it)."""
        if isinstance(data, BlockData):
            limit = self.cell_limit(run_id)
            errors = failed_cells(data.failed, run_id, limit)

            def rows() -> Iterator[tuple[str, pa.RecordBatch]]:
                for batch in data.batches():
                    for table, t in zip(("blocks", "block_overflow"), block_cells(batch, limit), strict=True):
                        yield from ((table, rb) for rb in self._conformed(table, t))
                yield from (("export_errors", rb) for rb in self._conformed("export_errors", errors))

            spilled = _spilled(data.blocks)
        else:
            tables = {t: data[t] for t in part.spec.tables if data.get(t) is not None}

            def rows() -> Iterator[tuple[str, pa.RecordBatch]]:
                for table, d in tables.items():
                    yield from ((table, rb) for rb in self._conformed(table, d))

            spilled = bool(tables) and all(_spilled(d) for d in tables.values())
        if spilled:
            return rows
        once = list(rows())
        return lambda: iter(once)

    def write_partition(self, run_id: str, part: Partition, data: PartitionData,
                        stats: PartitionStats) -> None:
        self.check_data(part, data)
        rows = self._rows(run_id, part, data)
        ep = self._endpoint_for(part.key)

        def attempt() -> None:
            state = {"body_done": False}
            try:
                self._write_tx(ep, run_id, part, rows, stats, state)
            except Exception:
                if state["body_done"]:
                    # the commit's answer was lost or refused: did it apply? Only the ledger knows.
                    if self._tx(lambda tx: self._ledger_count(tx, run_id, part, ep), "ledger check", ep):
                        log.info("%s: commit outcome resolved by the ledger: committed", part.key)
                        return
                raise

        retry(attempt, self._policy(), retryable=_retryable, what=f"{part.key}: transaction failed",
              describe=_describe, logger=log)

    def _write_tx(self, ep: str, run_id: str, part: Partition,
                  rows: Callable[[], Iterator[tuple[str, pa.RecordBatch]]], stats: PartitionStats,
                  state: dict) -> None:
        """One transaction: ledger check, delete the partition's old rows, insert, ledger row.
        Any failure before the commit leaves the transaction uncommitted (rolled back by
        ``__exit__``, or abandoned and timed out by the server if the rollback is lost)."""
        with self._session(ep).transaction() as tx:
            if self._ledger_count(tx, run_id, part, ep):
                return  # an earlier attempt committed
            handles = {}
            for table in part.spec.tables:
                name = self._name(table, run_id)
                t = handles[table] = tx.table_from_metadata(self._md_of(table, name))
                pred = self._range_pred(table, part)
                old = self._select(tx, table, pred, [], endpoint=ep, row_ids=True, name=name)
                if old.num_rows:
                    t.delete(old)
            n = 0
            for table, rb in rows():
                handles[table].insert(rb)
                n += rb.num_rows
            ledger_rb = stats.to_ledger_row(run_id, part, n).to_batches()[0]
            tx.table_from_metadata(self._md_of("export_ledger")).insert(ledger_rb)
            state["body_done"] = True

    # -- reading -----------------------------------------------------------------------------
    def read(
        self,
        table: str,
        scale: int | None = None,
        morton_range: tuple[int, int] | None = None,
        run_id: str | None = None,
        *,
        where: Where | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        sch = S.schema(table)
        names = sch.names
        terms = []
        for col, v in (where or {}).items():
            if col not in names:
                raise ValueError(f"no column {col!r} to filter on: columns are {list(names)}")
            col = S.stored_name(table, col, self.format)
            if isinstance(v, tuple):
                terms += [_col(col) >= int(v[0]), _col(col) < int(v[1])]
            else:
                terms.append(_col(col) == int(v))
        if scale is not None and "scale" in names:
            terms.append(_col("scale") == int(scale))
        if morton_range is not None and "morton" in names:
            terms += [_col("morton") >= int(morton_range[0]), _col("morton") < int(morton_range[1])]
        if table in ("export_ledger", "export_errors", "source_anomalies"):
            # rows carrying a run id: those of the run read (default the latest), as Parquet does
            run_id = run_id or self.latest_run()
            if run_id is not None:
                terms.append(_col("run_id") == run_id)
        pred = self._and(terms)
        cols = None if columns is None else [n for n in names if n in set(columns)]
        stored = None if cols is None else [S.stored_name(table, c, self.format) for c in cols]
        splits = len(self.cfg.endpoints)
        name = self._name(table, run_id)
        t = self._tx(lambda tx: self._select_read(tx, table, pred, stored, splits, name), f"read {table}")
        out_schema = sch if cols is None else pa.schema([sch.field(n) for n in cols])
        if t is None:
            return out_schema.empty_table()
        return _as_schema(S.from_stored(table, t, self.format), out_schema)

    # -- rows outside every partition ------------------------------------------------------
    def outside(self, run: RunInfo, done: set[str]) -> list[Outside]:
        """Rows in no planned partition's key range (per table: scales the plan has not, and
        the gaps between its ranges): one narrow select per range, all in one read
        transaction."""
        ranges = [(table, self._name(table, run.run_id), *r) for k in KINDS.values()
                  for r in _uncovered(k.scaled, [p for p in run.partitions if p.kind == k.name])
                  for table in k.tables]

        def scan(tx) -> list[Outside]:
            out = []
            for table, name, scale, lo, hi, above in ranges:
                key = "morton" if scale is not None else S.KEY_COLUMN[table]
                cols = [key] if scale is None else ["scale", key]
                t = self._select_missing_ok(tx, table, self._outside_pred(key, scale, lo, hi, above), cols,
                                            name=name)
                if t is None or t.num_rows == 0:
                    continue
                ks = t.column(key).to_numpy()
                first = f"first {key} {int(ks.min())}"
                if scale is not None:
                    sc = t.column("scale").to_numpy()
                    first = f"scale {int(sc.min())}" + (f"..{int(sc.max())}" if sc.max() > sc.min() else "") \
                        + f", first morton {int(ks.min())}"
                rng = f"{key} [{lo}, {hi})" if scale is None else (
                    f"scales >= {scale}" if above else f"scale {scale}"
                    + ("" if (lo, hi) == (0, KEY_END) else f" morton [{lo}, {hi})"))
                out.append(Outside(table, t.num_rows, f"{table}: {t.num_rows:,} rows outside every partition "
                                                      f"of run {run.run_id} ({rng}; {first})",
                                   scale=scale, lo=lo, hi=hi, scales_above=above))
            return out

        return self._tx(scan, "rows outside every partition")

    @staticmethod
    def _outside_pred(key: str, scale: int | None, lo: int, hi: int, above: bool = False):
        terms = [] if scale is None else [_col("scale") >= scale] if above else [_col("scale") == scale]
        if lo > 0:
            terms.append(_col(key) >= lo)
        if hi < KEY_END:
            terms.append(_col(key) < hi)
        return VastDBSink._and(terms)

    def remove_outside(self, run: RunInfo, found) -> int:
        """Delete the rows ``outside`` found, one transaction per range and at most
        ``REPAIR_ROWS`` row ids at a time (a stray range can be large)."""
        n = 0
        for o in found:
            key = "morton" if o.scale is not None else S.KEY_COLUMN[o.table]
            pred = self._outside_pred(key, o.scale, o.lo, o.hi, o.scales_above)

            n += self._delete_rows(o.table, pred, self._name(o.table, run.run_id))
        return n

    def _delete_rows(self, table: str, pred, name: str | None = None) -> int:
        """Delete the rows of ``pred``, at most ``REPAIR_ROWS`` per transaction."""
        def one(tx) -> int:
            ids = self._select(tx, table, pred, [], row_ids=True, name=name).slice(0, REPAIR_ROWS)
            if ids.num_rows:
                tx.table_from_metadata(self._md_of(table, name)).delete(ids)
            return ids.num_rows

        n = 0
        while True:
            k = self._tx(one, f"delete rows of {name or table}", write=True)
            n += k
            if k < REPAIR_ROWS:
                return n

    # -- finishing a run -------------------------------------------------------------------
    def finish(self, run: RunInfo) -> None:
        """Every partition of ``run`` is committed. A staged run's tables replace the
        published ones in ONE transaction (renames, and the run's record marked published),
        so readers switch at once; the replaced tables are then emptied in bounded
        transactions (``REPAIR_ROWS`` rows each) and dropped. Rows outside every partition
        of the run (an earlier run's other plan) are removed the same way."""
        if run.staged and not run.record.get("published"):
            run.record.update(state="publishing", published=True)

            def switch(tx) -> None:
                sch = self._schema_obj(tx, create=False)
                if sch.table(staged_name("blocks", run.run_id), fail_if_missing=False) is None:
                    return  # switched by an earlier attempt (its answer lost)
                for table in STAGED_TABLES:
                    sch.table(table).rename(old_name(table, run.run_id))
                    sch.table(staged_name(table, run.run_id)).rename(table)
                self._replace_run(tx, run)

            self._tx(switch, "publish the run's tables", write=True)
            self._runs[run.run_id] = run
            for table in STAGED_TABLES:
                name = old_name(table, run.run_id)
                self._delete_rows(table, None, name)
                self._tx(lambda tx, name=name: self._drop(tx, name), f"drop {name}", write=True)
            self._md.clear()
        self.clean_at_finish(run)
        super().finish(run)

    def _drop(self, tx, name: str) -> None:
        t = self._schema_obj(tx, create=False).table(name, fail_if_missing=False)
        if t is not None:
            t.drop()

    def _select_read(self, tx, table, pred, cols, splits, name=None):
        from vastdb import errors as E

        try:
            return self._select(tx, table, pred, cols, splits=splits, name=name)
        except (E.MissingSchema, E.MissingTable, E.NotFound):
            return None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

#: rows deleted per transaction when removing rows outside every partition
REPAIR_ROWS = 100_000
#: the tables a staged run (``run --overwrite``) writes apart until it finishes
STAGED_TABLES = tuple(t for k in KINDS.values() for t in k.tables)


def _abandon(session, txid: int | None, what: str) -> None:
    """Roll back ``txid``, an attempt whose commit or rollback failed. Why: a commit or
    rollback that never reached the server leaves the transaction open, holding what it
    changed (a DDL step's schema or table), and every retry of the step would conflict with
    it until the server expires it (15 minutes). A commit that applied (only its answer
    lost) or that the server refused has ended the transaction already: the server's
    refusal of this rollback is expected and ignored."""
    if txid is None:
        return
    try:
        session.api.rollback_transaction(txid)
    except Exception as exc:  # noqa: BLE001 — already ended, or the server is unreachable
        log.debug("%s: transaction %#x already ended (%s)", what, txid, _describe(exc))
    else:
        log.info("%s: transaction %#x was left open by the failed attempt: rolled back", what, txid)


def _run_tag(run_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in run_id)


def staged_name(table: str, run_id: str) -> str:
    """The table a staged run writes ``table``'s rows to until it finishes."""
    return f"{table}__stage_{_run_tag(run_id)}"


def old_name(table: str, run_id: str) -> str:
    """What the table ``run_id`` replaced is called until it is emptied and dropped."""
    return f"{table}__replaced_by_{_run_tag(run_id)}"


def _uncovered(scaled: bool, parts: list[Partition]) -> list[tuple[int | None, int, int, bool]]:
    """(scale, lo, hi, and every scale above) ranges no partition of ``parts`` covers: for
    blocks, every scale the plan does not have (the last entry: all scales past its
    largest) and the Morton gaps of the ones it has; for keyed kinds (scale None) the gaps
    of [0, 2**64)."""
    if not scaled:
        return [(None, lo, hi, False) for lo, hi in uncovered((p.lo, p.hi) for p in parts)]
    scales = {p.scale for p in parts}
    top = max(scales, default=-1) + 1
    out: list[tuple[int | None, int, int, bool]] = []
    for s in range(top):
        if s not in scales:
            out.append((s, 0, KEY_END, False))
        else:
            out += [(s, lo, hi, False) for lo, hi in uncovered((p.lo, p.hi) for p in parts if p.scale == s)]
    out.append((top, 0, KEY_END, True))
    return out


def _spilled(data) -> bool:
    """Rows on disk that can be read again (``spill.SpilledTable``), not held in memory."""
    return not isinstance(data, pa.Table) and bool(getattr(data, "replayable", False))


class _col:  # noqa: N801 — reads like the ibis ``_`` it wraps
    """``_.name`` for predicates, with integer literals >= 2**63 typed ``uint64`` (an untyped
    Python int that large makes ibis answer ``False`` for ``==`` and fail for ``<``)."""

    __slots__ = ("d",)

    def __init__(self, name: str):
        from ibis import _

        self.d = _[name]

    @staticmethod
    def _lit(v):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) >= 1 << 63:
            import ibis

            return ibis.literal(int(v), type="uint64")
        return int(v) if isinstance(v, np.integer) else v

    def __eq__(self, v):
        return self.d == self._lit(v)

    def __ge__(self, v):
        return self.d >= self._lit(v)

    def __lt__(self, v):
        return self.d < self._lit(v)

    __hash__ = None  # type: ignore[assignment]


def _as_schema(t: pa.Table, sch: pa.Schema) -> pa.Table:
    """Select rows come back with VAST field metadata (sort keys); give the plain schema."""
    t = t.select(sch.names)
    return pa.Table.from_arrays([c.cast(f.type) if c.type != f.type else c for c, f in zip(t.columns, sch, strict=True)],
                                schema=sch)


def _compare_columns(where: str, table: str, have: pa.Schema, want: pa.Schema) -> None:
    hn = {f.name: f.type for f in have}
    for f in want:
        if f.name not in hn:
            raise UserError(f"VastDB table {where}/{table} has no column {f.name!r} ({f.type}): "
                            "drop the table or export into another schema")
        if hn[f.name] != f.type:
            raise UserError(f"VastDB table {where}/{table}: column {f.name!r} is {hn[f.name]}, "
                            f"dvidetl writes {f.type}: drop the table or export into another schema")
    extra = [n for n in hn if n not in want.names]
    if extra:
        raise UserError(f"VastDB table {where}/{table} has column {extra[0]!r} that dvidetl does not "
                        "write: drop the table or export into another schema")


def list_exports(url: str) -> list[tuple[str, str]]:
    """(instance, uuid) of the exports stored at ``url`` (from ``export_runs``; [] when the
    schema or table does not exist) — lets readers open an export without naming it."""
    probe = VastDBSink(url, uuid="", instance="")
    t = probe._tx(lambda tx: probe._select_missing_ok(tx, "export_runs", _col("part") == 0,
                                                      ["instance", "uuid"]), "list exports")
    if t is None:
        return []
    return sorted(set(zip(t.column("instance").to_pylist(), t.column("uuid").to_pylist(), strict=True)))


def open_url(url: str, *, uuid: str, instance: str) -> VastDBSink:
    """``vastdb://HOST[:PORT]/BUCKET/SCHEMA``; credentials from the environment."""
    return VastDBSink(url, uuid=uuid, instance=instance)
