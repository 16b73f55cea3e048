"""The embedded default sink: a local Parquet dataset with the same tables as VastDB.

Layout under ``DIR/<instance>/<uuid>/`` (layout 3, recorded in ``layout.json`` with the
table format, ``dvidetl.tables.schema.FORMAT``)::

    layout.json                                   {"layout": 3, "format": 2}
    <table>/scale-<s>/part-<lo>-<hi>.parquet      blocks, block_overflow, export_errors
    <table>/part-<lo>-<hi>.parquet                label_index (label range), mapping
    export_ledger/<run_id>/<partition key>.parquet
    runs/<run_id>/run.json                        the run's options and plan

``lo``/``hi`` are 16 hex digits (Morton codes, or labels), so names sort in range order.

Why no ``key=value`` directory names: every column lives in the files with its documented
type (``scale`` uint8, ``run_id`` string), so a table directory reads as it is with the
defaults of pandas, pyarrow (``parquet.read_table``, ``dataset(partitioning="hive")``),
DuckDB (``hive_partitioning``) and polars. Hive-style names would add a second ``scale``
column of another type, and those readers refuse to merge the two. Pushdown by scale and
Morton range stays: our reader picks files from the plan, plain readers prune row groups by
the ``scale`` / ``morton`` statistics. Layout 3 is layout 2's directories with a table
format in ``layout.json``: a dvidetl that knows only layouts 1 and 2 refuses it instead of
appending format-1 files to it. Exports of layout 1 (``scale=<s>``, ``run=<id>``
directories, no ``layout.json``) are still read and appended to in their own layout, and an
export in an older table format (a ``layout.json`` without ``"format"``: format 1) is read
with today's column names and appended to in its own format; a newer layout or format than
this code knows is refused.

Exactly once: each table file is written to a hidden temp name in its directory and renamed
into place (atomic on POSIX); the partition's ledger file is renamed LAST. Readers use only
files whose partition has a ledger row in the run they read (default: the latest run), so a
driver or worker killed between renames leaves nothing visible; the retried or resumed
partition rewrites the same names. Table files carry no run id, so a later run over the same
plan replaces them with identical content. (A plain reader pointed at a table directory sees
every file in it: exact for a finished run; see the README.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dvidetl.errors import UserError, first_line
from dvidetl.export.batch import BlockData, PartitionData, TableData
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo, kind_of_table
from dvidetl.sinks.base import Outside, Sink, UnreadableFile, Where, where_filters
from dvidetl.tables import schema as S
from dvidetl.tables.cells import block_cells, failed_cells

log = logging.getLogger(__name__)

#: the directory layout this code writes into a new export (see the module docstring)
LAYOUT = 3
#: the layouts this code reads and appends to (2 and 3 differ only in ``layout.json``)
LAYOUTS = (1, 2, 3)
LAYOUT_FILE = "layout.json"
#: a ``run --overwrite``'s tables until it finishes (hidden: outside every table directory)
STAGING = ".staging"
#: the replaced tables during the switch (removed when it completes)
SUPERSEDED = ".superseded"

#: binary payload columns are zstd already: store them uncompressed, no dictionary
_PAYLOAD = {*S.PAYLOAD_COLUMNS, *(S.stored_name("blocks", c, 1) for c in S.PAYLOAD_COLUMNS), "data"}


def _fmt(v: int) -> str:
    return f"{int(v):016x}"


def _safe(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise UserError(f"{what} {name!r} cannot be used as a directory name")
    return name


class ParquetSink(Sink):
    """``parquet://DIR`` for one (uuid, instance)."""

    needs = frozenset({"payload"})  # blocks rows store the zstd payload (cut into cells)

    def __init__(self, base: str | os.PathLike, *, uuid: str, instance: str, url: str | None = None):
        self.base = Path(base)
        self.uuid = uuid
        self.instance = instance
        self.url = url or f"parquet://{self.base}"
        self.root = self.base / _safe(instance, "instance") / _safe(uuid, "uuid")
        self._runs: dict[str, tuple[int, RunInfo]] = {}  # run id -> (run.json mtime, run)
        self.layout, self.format = self._read_layout()

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.root)!r})"

    def storage_key(self) -> str:
        """The export's directory, resolved (``parquet://./x`` and ``parquet:///abs/x`` are
        one export, and so is a wrapper's URL over the same directory)."""
        return f"parquet:{self.root.resolve()}"

    def _read_layout(self) -> tuple[int, int]:
        """(layout, table format): this code's for a new export, (1, 1) for an export written
        before ``layout.json`` existed, format 1 for a layout file without ``"format"``; a
        newer layout or format than this code knows is refused (not misread)."""
        f = self.root / LAYOUT_FILE
        if f.exists():
            try:
                d = json.loads(f.read_text())
                layout, fmt = d["layout"], d.get("format", 1)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{f}: not a dvidetl layout file ({exc})") from None
            if type(layout) is not int or layout < 1:
                raise UserError(f"{f}: not a dvidetl layout file (layout {layout!r})")
            if layout not in LAYOUTS:
                raise UserError(f"{self.root}: written with Parquet layout {layout}; this dvidetl "
                                f"reads layouts {', '.join(map(str, LAYOUTS))} — upgrade dvidetl")
            if layout >= 3 and "format" not in d:
                raise UserError(f"{f}: layout {layout} names no table format")
            return layout, S.check_format(fmt, str(self.root))
        if (self.root / "runs").is_dir():  # an export, but no layout file: layout 1
            return 1, 1
        return LAYOUT, S.FORMAT

    # -- paths ---------------------------------------------------------------------------
    def table_dir(self, table: str, scale: int | None = None) -> Path:
        S.schema(table)
        d = self.root / table
        if table in S.SCALED_TABLES:
            d = d / (f"scale={int(scale or 0)}" if self.layout == 1 else f"scale-{int(scale or 0)}")
        return d

    def file_of(self, table: str, part: Partition, run_id: str | None = None) -> Path:
        """The partition's file of ``table``: in the table directory, or — for a run written
        with ``--overwrite`` that has not finished — in its staging directory."""
        d = self.table_dir(table, part.scale)
        if run_id is not None:
            staged = self._staging_root(run_id)
            if staged is not None and (not self._publishing(run_id) or (staged / table).is_dir()):
                d = staged / d.relative_to(self.root)
        return d / f"part-{_fmt(part.lo)}-{_fmt(part.hi)}.parquet"

    def _staging_root(self, run_id: str) -> Path | None:
        """Where a staged run writes until it is published (None: in place)."""
        run = self.load_run(run_id)
        if not run.staged or run.record.get("published"):
            return None
        return self.root / STAGING / _safe(run_id, "run id")

    def _publishing(self, run_id: str) -> bool:
        return self.load_run(run_id).state in ("publishing", "finished")

    def _ledger_dir(self, run_id: str) -> Path:
        name = _safe(run_id, "run id")
        return self.root / "export_ledger" / (f"run={name}" if self.layout == 1 else name)

    def ledger_files(self) -> list[Path]:
        """Every run's ledger files (the ledger of all runs, as one directory tree)."""
        pattern = "run=*/*.parquet" if self.layout == 1 else "*/*.parquet"
        return sorted((self.root / "export_ledger").glob(pattern))

    def _run_file(self, run_id: str) -> Path:
        return self.root / "runs" / _safe(run_id, "run id") / "run.json"

    def check(self, *, write: bool = True, create: bool = True) -> None:
        """The export directory can be created and written (a probe file is written and
        removed in it), or, with ``create=False``, its nearest existing ancestor is a
        writable directory; a path that is a file, a read-only file system or a missing
        permission is one line naming the path."""
        where = f"sink {self.url}"
        probe_dir = self.root
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise UserError(f"{where}: {existing} is a file, not a directory")
        if not write:
            return
        try:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = probe_dir / f".dvidetl-probe-{uuidlib.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(existing))
        except OSError as exc:
            raise UserError(f"{where}: cannot write to {exc.filename or self.root}: "
                            f"{exc.strerror or exc}") from None

    # -- runs ------------------------------------------------------------------------------
    def prepare(self, run: RunInfo) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / LAYOUT_FILE).exists():
            _atomic_write_bytes(self.root / LAYOUT_FILE,
                                json.dumps({"layout": self.layout, "format": self.format}).encode())
        for table in S.TABLES:
            if table != "export_ledger":
                (self.root / table).mkdir(parents=True, exist_ok=True)
        self._ledger_dir(run.run_id).mkdir(parents=True, exist_ok=True)
        f = self._run_file(run.run_id)
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            _atomic_write_bytes(f, run.to_json().encode())

    def load_run(self, run_id: str) -> RunInfo:
        f = self._run_file(run_id)
        try:
            stamp = f.stat().st_mtime_ns
        except FileNotFoundError:
            known = ", ".join(self.runs()[-5:]) or "none"
            raise UserError(f"no run {run_id!r} under {self.root} (runs: {known})") from None
        cached = self._runs.get(run_id)
        if cached is not None and cached[0] == stamp:  # the record changes; the plan never
            return cached[1]
        try:
            run = RunInfo.from_json(f.read_bytes())
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{f}: not a dvidetl run record ({first_line(exc)})") from None
        self._runs[run_id] = (stamp, run)
        return run

    def update_run(self, run: RunInfo) -> None:
        _atomic_write_bytes(self._run_file(run.run_id), run.to_json().encode())

    def runs(self) -> list[str]:
        d = self.root / "runs"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "run.json").exists())

    def finish(self, run: RunInfo) -> None:
        """Every partition of ``run`` is committed: make it what plain readers see. A staged
        run's table directories replace the published ones (one rename per table, after the
        record says ``publishing``: a crash in between is rolled forward by the next
        ``finish``); then files that belong to no committed partition of the run (left by
        earlier runs with another plan, or killed ones) are removed."""
        if run.staged and not run.record.get("published"):
            if run.state != "publishing":
                run.record["state"] = "publishing"
                self.update_run(run)
            stage = self.root / STAGING / run.run_id
            old = self.root / SUPERSEDED / run.run_id
            for table in S.TABLES:
                if table == "export_ledger" or not (stage / table).is_dir():
                    continue
                main = self.root / table
                if main.exists():
                    old.mkdir(parents=True, exist_ok=True)
                    os.replace(main, old / table)
                os.replace(stage / table, main)
            run.record["published"] = True
            self.update_run(run)
            for d in (old, stage):
                shutil.rmtree(d, ignore_errors=True)
        files, size = self._sweep_temporary_files()
        self.clean_at_finish(run, temp_files=files, temp_bytes=size)
        super().finish(run)

    def _data_dirs(self) -> list[Path]:
        """The directories writers write data files into (each through a temporary file)."""
        return [self.root / t for t in S.TABLES if (self.root / t).is_dir()]

    def _sweep_temporary_files(self) -> tuple[int, int]:
        """Remove the temporary files (``temp_beside``) left in the data directories by writers
        killed before their rename: every partition is committed when a run finishes, so none
        is in use (a straggler's late rename fails, its partition already committed).
        Returns (files, bytes)."""
        files = size = 0
        for d in self._data_dirs():
            for f in d.rglob(".*.tmp-*"):
                if not _TEMP_NAME.fullmatch(f.name):
                    continue
                try:
                    n = f.stat().st_size
                    f.unlink()
                except FileNotFoundError:
                    continue
                files, size = files + 1, size + n
        if files:
            log.info("%r: removed %d temporary file(s) (%d bytes) left by writers that were killed",
                     self, files, size)
        return files, size

    # -- ledger ----------------------------------------------------------------------------
    def is_done(self, run_id: str, part: Partition) -> bool:
        return (self._ledger_dir(run_id) / f"{part.key}.parquet").exists()

    def forget(self, run_id: str, part: Partition) -> None:
        (self._ledger_dir(run_id) / f"{part.key}.parquet").unlink(missing_ok=True)

    def done(self, run_id: str) -> set[str]:
        d = self._ledger_dir(run_id)
        if not d.is_dir():
            return set()
        return {n[: -len(".parquet")] for n in os.listdir(d) if n.endswith(".parquet") and not n.startswith(".")}

    def ledger(self, run_id: str | None = None) -> pa.Table:
        if run_id is None:
            files = [str(f) for f in self.ledger_files()]
        else:
            d = self._ledger_dir(run_id)
            files = [str(f) for f in sorted(d.glob("*.parquet"))] if d.is_dir() else []
        if not files:
            return S.empty("export_ledger")
        return pa.concat_tables([self._read_file(Path(f), "export_ledger", user_error=True) for f in files])

    # -- writing ---------------------------------------------------------------------------
    def write_partition(self, run_id: str, part: Partition, data: PartitionData,
                        stats: PartitionStats) -> None:
        self.check_data(part, data)
        if isinstance(data, BlockData):
            rows = self._write_blocks(run_id, part, data)
        else:
            rows = sum(self._write_table(run_id, part, t, data.get(t)) for t in part.spec.tables)
        ledger = stats.to_ledger_row(run_id, part, rows)
        d = self._ledger_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / f"{part.key}.parquet", "export_ledger", ledger, keep_empty=True)

    def _write_table(self, run_id: str, part: Partition, table: str, data: TableData | None) -> int:
        """One table's file of the partition, renamed into place (or, with no rows, removed:
        an earlier attempt may have left one). Returns rows written."""
        final = self.file_of(table, part, run_id)
        n = _write_atomic(final, table, data, fmt=self.format) if data is not None else 0
        if n == 0:
            final.unlink(missing_ok=True)
        return n

    def _write_blocks(self, run_id: str, part: Partition, data: BlockData) -> int:
        """``blocks`` and ``block_overflow`` cut from the partition's blocks in one pass (two
        files written side by side, renamed into place together), then ``export_errors``."""
        limit = self.cell_limit(run_id)
        files = {t: _AtomicFile(self.file_of(t, part, run_id), t, self.format)
                 for t in ("blocks", "block_overflow")}
        try:
            for batch in data.batches():
                for t, rows in zip(files, block_cells(batch, limit), strict=True):
                    files[t].write(rows)
            n = sum(f.commit() for f in files.values())
        finally:
            for f in files.values():
                f.discard()
        return n + self._write_table(run_id, part, "export_errors", failed_cells(data.failed, run_id, limit))

    # -- reading ---------------------------------------------------------------------------
    def committed_files(
        self, table: str, scale: int | None = None, morton_range: tuple[int, int] | None = None,
        run_id: str | None = None, key_range: tuple[int, int] | None = None,
    ) -> list[Path]:
        """Files of ``table`` whose partitions are committed in the run (default latest);
        ``key_range`` keeps only the label / supervoxel partitions that meet it."""
        spec = kind_of_table(table)
        if spec is None:
            raise ValueError(f"table {table!r} is not written by partitions")
        run_id = run_id or self.latest_run()
        if run_id is None:
            return []
        run = self.load_run(run_id)
        if run.state == "superseded":
            raise UserError(f"run {run_id} of {self.root} was replaced by run "
                            f"{run.record.get('superseded_by')} (run --overwrite): its rows are gone")
        rng = morton_range if spec.scaled else key_range
        cands = [
            p for p in run.partitions
            if p.kind == spec.name
            and not (scale is not None and spec.scaled and p.scale != scale)
            and not (rng is not None and (p.hi <= rng[0] or p.lo >= rng[1]))
        ]
        if len(cands) <= 64:
            done = {p.key for p in cands if self.is_done(run_id, p)}
        else:
            done = self.done(run_id)
        out = []
        for p in cands:
            if p.key in done:
                f = self.file_of(table, p, run_id)
                if f.exists():
                    out.append(f)
        return out

    def location(self, table: str, part: Partition, run_id: str | None = None) -> str:
        return str(self.file_of(table, part, run_id))

    def _ledger_of(self, run_id: str, part: Partition) -> dict | None:
        f = self._ledger_dir(run_id) / f"{part.key}.parquet"
        if not f.exists():
            return None
        rows = self._read_file(f, "export_ledger").to_pylist()
        return rows[0] if rows else None

    def read_partition(self, run_id: str, table: str, part: Partition) -> pa.Table:
        """The partition's whole file (no range filter: a plain reader sees every row in it);
        ``UnreadableFile`` when it cannot be read, or is gone while the ledger says the
        partition wrote such rows."""
        f = self.file_of(table, part, run_id)
        if not f.exists():
            led = self._ledger_of(run_id, part) or {}
            column = part.spec.ledger_counts.get(table)
            want = led.get(column, 0) if column else 0
            if want:
                what = part.spec.unit
                raise UnreadableFile(str(f), f"missing: the ledger says the partition wrote {want:,} {what} to it")
            return S.empty(table)
        return self._read_file(f, table)

    def _read_file(self, f: Path, table: str, *, user_error: bool = False) -> pa.Table:
        """One stored file as ``table``'s schema; ``UnreadableFile`` (or, with ``user_error``,
        a one-line ``UserError`` naming the file) when it cannot be read. Only a ledger's
        added columns may be absent (``conform`` fills them); a file that lacks another
        column is damaged, not rows of nulls (which verify would report as rows that differ)."""
        try:
            if table == "export_ledger":
                t = pq.read_table(str(f))
            else:
                stored = S.stored_schema(table, self.format)
                _check_columns(f, stored)
                t = pq.read_table(str(f), schema=stored)
            return S.conform(table, S.from_stored(table, t, self.format))
        except (pa.ArrowException, OSError, ValueError) as exc:
            if user_error:
                raise UserError(f"{f}: cannot read it ({first_line(exc)}); remove it and "
                                "resume the run to redo its partition") from None
            raise UnreadableFile(str(f), f"unreadable ({first_line(exc)})") from None

    def outside(self, run: RunInfo, done: set[str]) -> list[Outside]:
        """Parquet files in the table directories that are not a committed partition file of
        the run (a plain reader reads every ``*.parquet`` there), with their rows."""
        expected = {self.file_of(t, p, run.run_id) for p in run.partitions if p.key in done
                    for t in p.spec.tables}
        out = []
        for table in S.TABLES:
            if table == "export_ledger" or not (self.root / table).is_dir():
                continue
            for f in sorted((self.root / table).rglob("*.parquet")):
                if f in expected:
                    continue
                try:
                    rows = pq.read_metadata(f).num_rows
                    out.append(Outside(table, rows, f"{f}: {rows:,} rows in no committed partition of "
                                                    f"run {run.run_id} (a stray file)", path=str(f)))
                except (pa.ArrowException, OSError) as exc:
                    out.append(Outside(table, -1, f"{f}: a stray file, unreadable ({first_line(exc)})",
                                       path=str(f)))
        return out

    def remove_outside(self, run: RunInfo, found) -> int:
        n = 0
        for o in found:
            if o.path is None:
                raise ValueError(f"{o.where}: not a file of this sink")
            Path(o.path).unlink(missing_ok=True)
            n += max(o.rows, 0)
        return n

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
        if table == "export_ledger":
            t = self.ledger(run_id or self.latest_run())
            return _project(t, columns)
        key = S.KEY_COLUMN.get(table)
        kr = (where or {}).get(key) if key else None
        if kr is not None and not isinstance(kr, tuple):
            kr = (int(kr), int(kr) + 1)
        files = self.committed_files(table, scale, morton_range, run_id, key_range=kr)
        if not files:
            return _project(S.empty(table), columns)
        filters = where_filters(where, S.schema(table).names)
        if scale is not None and "scale" in S.schema(table).names:
            filters.append(("scale", "=", scale))
        if morton_range is not None and "morton" in S.schema(table).names:
            filters += [("morton", ">=", morton_range[0]), ("morton", "<", morton_range[1])]
        sch = S.schema(table)
        cols = None if columns is None else [n for n in sch.names if n in set(columns)]
        # files hold the export's format: filter and project by stored names, then rename
        stored = S.stored_schema(table, self.format)
        filters = [(S.stored_name(table, c, self.format), op, v) for c, op, v in filters]
        try:
            for f in files:  # read with the stored schema, a column a file lacks would be nulls
                _check_columns(f, stored)
            t = pq.read_table([str(f) for f in files], schema=stored, filters=_expr(filters, stored),
                              columns=None if cols is None else [S.stored_name(table, c, self.format) for c in cols])
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._unreadable(files, table, exc) from None
        t = S.from_stored(table, t, self.format)
        if cols is None:
            return S.conform(table, t)
        return t.cast(pa.schema([sch.field(n) for n in cols]))

    def _unreadable(self, files: list[Path], table: str, exc: BaseException) -> UserError:
        """The one line for a read that failed: which file, and what to do about it."""
        stored = S.stored_schema(table, self.format)
        for f in files:
            try:
                pq.read_metadata(f)
                _check_columns(f, stored)
            except (pa.ArrowException, OSError, ValueError) as e:
                bad, why = f, first_line(e)
                break
        else:
            bad, why = files[0] if len(files) == 1 else self.root / table, first_line(exc)
        return UserError(f"{bad}: cannot read it ({why}); `dvidetl verify --repair` re-exports "
                         "the damaged partitions")


def _expr(filters: list[tuple[str, str, int]], sch: pa.Schema):
    """DNF triples as one Arrow expression whose literals have the column's type (a plain
    Python int becomes int64, which cannot hold labels >= 2**63)."""

    ops = {"=": "__eq__", ">=": "__ge__", "<": "__lt__", ">": "__gt__", "<=": "__le__"}
    expr = None
    for col, op, v in filters:
        t = sch.field(col).type
        if pa.types.is_unsigned_integer(t) and ((op == "<" and v >= 1 << t.bit_width)
                                                 or (op == ">=" and v <= 0)):
            continue  # always true (e.g. an exclusive bound of 2**64)
        e = getattr(pc.field(col), ops[op])(pa.scalar(v, sch.field(col).type))
        expr = e if expr is None else expr & e
    return expr


def _project(t: pa.Table, columns: Sequence[str] | None) -> pa.Table:
    if columns is None:
        return t
    return t.select([n for n in t.schema.names if n in set(columns)])


def _leaf_paths(field: pa.Field, prefix: str = "") -> list[str]:
    """The Parquet column paths of ``field``: its name, or for a list the path of its values
    (``supervoxels.list.element``; ``.list.item`` as older writers name it) — the names
    pyarrow's per-column options match: a list column's own name matches nothing."""
    path = prefix + field.name
    if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
        value = field.type.value_field
        return [q for child in ("element", "item")
                for q in _leaf_paths(value.with_name(child), f"{path}.list.")]
    return [path]


def _writer_options(table: str, fmt: int = S.FORMAT) -> dict:
    sch = S.stored_schema(table, fmt)
    comp = {p: ("none" if f.name in _PAYLOAD else "zstd") for f in sch for p in _leaf_paths(f)}
    dict_cols = [f.name for f in sch if f.name not in _PAYLOAD and not pa.types.is_list(f.type)]
    return dict(compression=comp, use_dictionary=dict_cols, write_statistics=True)


#: bound on a row group's bytes: a reader filtering on (scale, morton) reads one row group,
#: so a one-block read from a 4,096-block partition file costs ~1 MB, not the whole file
ROW_GROUP_BYTES = 1 << 20


def _row_group_rows(chunk: pa.Table) -> int:
    """Rows per row group so each holds about ``ROW_GROUP_BYTES`` (8 .. 65,536 rows)."""
    per_row = chunk.nbytes / max(chunk.num_rows, 1)
    return int(min(64 * 1024, max(8, ROW_GROUP_BYTES // max(per_row, 1))))


class _AtomicFile:
    """One Parquet file written under a temp name beside ``final`` (table format ``fmt``),
    renamed into place by ``commit``; ``discard`` removes what was not committed."""

    def __init__(self, final: Path, table: str, fmt: int = S.FORMAT, keep_empty: bool = False):
        self.final, self.table, self.fmt, self.keep_empty = final, table, fmt, keep_empty
        self.tmp = temp_beside(final)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, chunk: pa.Table | pa.RecordBatch) -> None:
        if isinstance(chunk, pa.RecordBatch):
            chunk = pa.Table.from_batches([chunk])
        chunk = S.to_stored(self.table, S.conform(self.table, chunk), self.fmt)
        if chunk.num_rows == 0 and not self.keep_empty:
            return
        if self._writer is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(str(self.tmp), S.stored_schema(self.table, self.fmt),
                                            **_writer_options(self.table, self.fmt))
        self._writer.write_table(chunk, row_group_size=_row_group_rows(chunk))
        self.rows += chunk.num_rows

    def commit(self) -> int:
        """Rename the file into place; with no rows written, remove ``final`` instead (an
        earlier attempt may have left one). Returns rows written."""
        if self._writer is None:
            self.final.unlink(missing_ok=True)
            return 0
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.final)
        return self.rows

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


def _write_atomic(final: Path, table: str, data: TableData, keep_empty: bool = False,
                  fmt: int = S.FORMAT) -> int:
    """Write ``data`` (a table or a stream of batches/tables) to a temp file beside ``final``,
    in table format ``fmt``, and rename it into place. Returns rows written; with no rows (and
    not ``keep_empty``) nothing is left on disk and 0 is returned."""
    f = _AtomicFile(final, table, fmt, keep_empty)
    try:
        chunks: Iterable = [data] if isinstance(data, (pa.Table, pa.RecordBatch)) else data
        for chunk in chunks:
            f.write(chunk)
        if f.rows == 0 and f._writer is None:
            return 0
        return f.commit()
    finally:
        f.discard()


def _check_columns(f: Path, stored: pa.Schema) -> None:
    """Raise ``ValueError`` naming the columns of ``stored`` that file ``f`` lacks: read with
    an explicit schema, Arrow would return them as nulls, and a damaged file would pass for
    rows that differ."""
    have = set(pq.read_schema(str(f)).names)
    lacking = [n for n in stored.names if n not in have]
    if lacking:
        raise ValueError(f"damaged: it has no column {', '.join(map(repr, lacking))}")


def temp_beside(final: Path) -> Path:
    """A writer's temporary file for ``final``: hidden (a plain reader, ``dvidetl view``,
    passes over it), in the same directory (renamed into place atomically), unique per
    process and attempt (``_TEMP_NAME``: what a finish sweeps)."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuidlib.uuid4().hex[:8]}"


_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9]+-[0-9a-f]{8}")


def _atomic_write_bytes(final: Path, data: bytes) -> None:
    """``data`` into ``final`` whole or not at all: a failed write (a full disk) leaves
    ``final`` as it was and no temporary file behind."""
    tmp = temp_beside(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_url(url: str, *, uuid: str, instance: str) -> ParquetSink:
    """``parquet://DIR`` (``parquet://./out``, ``parquet:///abs/out``, ``parquet://out``)."""
    rest = url[len("parquet://"):] if url.startswith("parquet://") else url
    if not rest:
        raise UserError(f"sink URL {url!r} names no directory: use parquet://DIR")
    return ParquetSink(rest, uuid=uuid, instance=instance, url=url)


def list_exports(url: str) -> list[tuple[str, str]]:
    """(instance, uuid) of every export under a ``parquet://DIR`` (``<instance>/<uuid>/runs/``)."""
    rest = url[len("parquet://"):] if url.startswith("parquet://") else url
    if not rest:
        raise UserError(f"export URL {url!r} names no directory: use parquet://DIR")
    base = Path(rest)
    found = []
    if base.is_dir():
        for inst in sorted(p for p in base.iterdir() if p.is_dir()):
            for u in sorted(p for p in inst.iterdir() if p.is_dir() and (p / "runs").is_dir()):
                found.append((inst.name, u.name))
    return found
