"""Partition output that outgrows memory goes to local disk until the sink consumes it.

Why: a partition is committed in one atomic write (one transaction, one rename), so a task
must hold all of its rows until the write. Partitions are planned by block count, and a
partition of dense blocks (10^5 labels, ~1.5 MB each) holds ~100x the bytes of an average
one; with everything in memory a low-memory worker is killed by its nanny on every attempt.
Dask's own spilling does not help here — the rows are never a task result — so the task
spills them itself, the way Dask would: past ``limit`` bytes, a table's rows are appended to
an uncompressed Arrow IPC stream in the worker's local directory, and the sink reads them
back one group at a time (as often as a retried write needs).
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

#: output bytes a partition task keeps in memory before it spills its tables to disk
SPILL_BYTES = 32 << 20


class SpilledTable:
    """A table's rows in a local Arrow IPC stream file; iterating yields its record batches,
    read back one at a time (never the whole table), and can be repeated."""

    replayable = True

    def __init__(self, path: Path, schema: pa.Schema, num_rows: int, nbytes: int):
        self.path, self.schema, self.num_rows, self.nbytes = Path(path), schema, num_rows, nbytes

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        with pa.OSFile(str(self.path), "rb") as f:  # read, not mmap: pages do not stay in RSS
            yield from pa.ipc.open_stream(f)

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self), schema=self.schema)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"SpilledTable({self.path.name}, {self.num_rows} rows, {self.nbytes} bytes)"


class TableSpill:
    """Tables of one schema gathered in order: in memory while the shared budget lasts, then
    on disk. ``result()`` is a ``pa.Table`` (never spilled) or a :class:`SpilledTable`."""

    def __init__(self, name: str, schema: pa.Schema, directory: str | os.PathLike | None, budget: SpillBudget):
        self.name, self.schema, self.directory, self.budget = name, schema, directory, budget
        self.tables: list[pa.Table] = []
        self.num_rows = 0
        self.nbytes = 0
        self._writer: Any = None  # pa.ipc stream writer, once spilled
        self._file: Any = None
        self._path: Path | None = None

    def append(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.num_rows += table.num_rows
        self.nbytes += table.nbytes
        if self._writer is not None:
            self._writer.write_table(table)
            return
        self.tables.append(table)
        self.budget.used += table.nbytes
        if self.directory is not None and self.budget.used > self.budget.limit:
            self.budget.spill_all()

    def spill(self) -> None:
        """Move what is held in memory to disk; later tables go straight to the file."""
        if self._writer is not None or self.directory is None:
            return
        d = Path(self.directory)
        d.mkdir(parents=True, exist_ok=True)
        self._path = d / f"dvidetl-spill-{self.name}-{os.getpid()}-{uuidlib.uuid4().hex[:12]}.arrow"
        self._file = pa.OSFile(str(self._path), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)
        for t in self.tables:
            self._writer.write_table(t)
            self.budget.used -= t.nbytes
        self.tables = []

    def result(self) -> pa.Table | SpilledTable:
        if self._writer is None:
            if not self.tables:
                return self.schema.empty_table()
            return pa.concat_tables(self.tables)
        self._close_writer()
        assert self._path is not None  # set with the writer (spill)
        return SpilledTable(self._path, self.schema, self.num_rows, self.nbytes)

    def discard(self) -> None:
        """Drop everything (an error path): close and remove the file."""
        self._close_writer()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self.tables = []


    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None


class SpillBudget:
    """One memory budget shared by the tables of a partition: when their in-memory rows pass
    ``limit`` bytes, all of them spill (a partition's tables are consumed one after another,
    so any one left in memory would be held through the others' writes)."""

    def __init__(self, limit: int = SPILL_BYTES):
        self.limit = int(limit)
        self.used = 0
        self.spills: list[TableSpill] = []

    def table(self, name: str, schema: pa.Schema, directory: str | os.PathLike | None) -> TableSpill:
        s = TableSpill(name, schema, directory, self)
        self.spills.append(s)
        return s

    def spill_all(self) -> None:
        for s in self.spills:
            s.spill()


def close_tables(data) -> None:
    """Remove the spill files among a partition's data (its tables, or ``BlockData``) after
    the write, or on failure."""
    for t in data.values():
        if isinstance(t, SpilledTable):
            t.close()
