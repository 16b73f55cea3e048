"""The work of one partition, run on a Dask worker: read it through Flight, transform it,
commit it to the sink with its ledger row (write retried in-task), return small stats.

A task gets only small arguments (a :class:`TaskContext` and one plan entry); each worker
process keeps one Flight client and one sink per context (``_client`` / ``_sink``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa

from dvidetl.export.spill import close_tables
from dvidetl.retry import Backoff, retry
from dvidetl.sinks.base import Partition, RunInfo
from dvidetl.tables import schema as S

log = logging.getLogger(__name__)

class Secret:
    """A token that never shows in reprs, logs or the dashboard."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__

    def __reduce__(self):
        return (Secret, (self._value,))


@dataclass(frozen=True)
class TaskContext:
    """The small, picklable context every task gets."""

    run_id: str
    location: str
    token: Secret
    uuid: str
    instance: str
    sink_url: str
    codec: str
    grids: dict  # scale -> grid (x, y, z)
    cell_limit: int = S.DEFAULT_CELL_LIMIT
    zstd_level: int = 3


def task_context(run: RunInfo, ep, sink_url: str, *, cell_limit: int = S.DEFAULT_CELL_LIMIT,
                 zstd_level: int = 3) -> TaskContext:
    """The context of ``run``'s tasks, reaching the source through endpoint ``ep`` (the
    options the run was planned with win over the defaults given here)."""
    opts = run.options
    return TaskContext(
        run_id=run.run_id, location=ep.location, token=ep.token, uuid=run.uuid,
        instance=ep.instance, sink_url=sink_url, codec=ep.info.codec,
        grids={s.scale: tuple(s.grid) for s in ep.info.scales},
        cell_limit=int(opts.get("cell_limit") or cell_limit),
        zstd_level=int(opts.get("zstd_level", zstd_level)),
    )


_CLIENTS: dict = {}
_SINKS: dict = {}


def _client(ctx: TaskContext):
    from dvidetl.flight.client import FlightClient

    key = (ctx.location, ctx.token.get(), ctx.uuid, ctx.instance)
    c = _CLIENTS.get(key)
    if c is None:
        c = FlightClient(ctx.location, token=ctx.token.get(), uuid=ctx.uuid, instance=ctx.instance)
        _CLIENTS[key] = c
    return c


def _sink(ctx: TaskContext):
    from dvidetl.sinks import open_sink

    key = (ctx.sink_url, ctx.uuid, ctx.instance)
    s = _SINKS.get(key)
    if s is None:
        s = open_sink(ctx.sink_url, uuid=ctx.uuid, instance=ctx.instance)
        _SINKS[key] = s
    return s


#: the scheduler event topic running partitions report their progress under
PROGRESS_TOPIC = "dvidetl-progress"
#: a running partition reports at most this often
REPORT_S = 1.0


class ProgressReporter:
    """How far a running partition has got — blocks and bytes streamed (block partitions),
    rows gathered (label_index, mapping) — sent to the driver at most every ``REPORT_S``
    through the scheduler's event log (``Worker.log_event``; the driver subscribes to
    ``PROGRESS_TOPIC``), so the progress line and the page move within a partition instead
    of jumping when it commits. Each message is cumulative for this attempt, so a retried
    attempt simply overwrites. Outside a Dask worker it does nothing."""

    def __init__(self, kind: str):
        self.kind = kind
        self.blocks = self.rows = self.nbytes = 0
        self._last = time.monotonic()
        try:
            from distributed import get_worker

            self._worker = get_worker()
            self._key = self._worker.get_current_task()
        except (ImportError, ValueError):
            self._worker = self._key = None

    def add(self, *, blocks: int = 0, rows: int = 0, nbytes: int = 0) -> None:
        self.blocks += blocks
        self.rows += rows
        self.nbytes += nbytes
        now = time.monotonic()
        if self._worker is not None and now - self._last >= REPORT_S:
            self._last = now
            try:
                self._worker.log_event(PROGRESS_TOPIC, {"key": str(self._key), "kind": self.kind,
                                                        "blocks": self.blocks, "rows": self.rows,
                                                        "bytes": self.nbytes})
            except Exception:  # noqa: BLE001 - progress is a convenience, never a failure
                self._worker = None

    def blocks_of(self, batches):
        """``batches`` (wire batches of blocks) passed through, counted as they stream."""
        for b in batches:
            self.add(blocks=b.num_rows, nbytes=b.column("data").nbytes if b.num_rows else 0)
            yield b


@dataclass
class PartitionStats:
    """What one partition's task did: the ledger row's figures and the driver's totals.

    ``blocks``: blocks read (block partitions); ``rows``: rows written (label_index rows,
    mapping pairs, anomalies; for block partitions the blocks); ``error_samples``: the first
    corrupt blocks (scale, x, y, z, reason) for the dashboard; ``anomalies``: the source's
    anomalies stored, per kind, and ``lost`` those of them by which the export lacks blocks
    (anomalies partitions). Read like a mapping (``get``) by the sinks, which take the
    ledger figures from it."""

    key: str
    kind: str
    skipped: bool = False
    blocks: int = 0
    rows: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0
    error_samples: list = field(default_factory=list)
    anomalies: dict = field(default_factory=dict)
    lost: int = 0

    def get(self, name: str, default=None):
        return getattr(self, name, default)


def export_partition(ctx: TaskContext, part: Partition) -> PartitionStats:
    """One task: read, transform and commit one partition (or nothing if already committed
    by an earlier attempt). Returns small stats for the driver."""
    from dvidetl.export.transform import transform_blocks

    t0 = time.perf_counter()
    sink = _sink(ctx)
    if sink.is_done(ctx.run_id, part):
        return PartitionStats(part.key, part.kind, skipped=True)
    client = _client(ctx)
    if part.kind == "blocks":
        grid = tuple(ctx.grids[part.scale] if part.scale in ctx.grids else ctx.grids[str(part.scale)])
        tables, st = transform_blocks(
            ProgressReporter(part.kind).blocks_of(client.read_blocks(part.scale, part.lo, part.hi)),
            ctx.codec,
            client.map_supervoxels,
            scale=part.scale,
            grid=grid,
            lo=part.lo,
            hi=part.hi,
            run_id=ctx.run_id,
            cell_limit=ctx.cell_limit,
            zstd_level=ctx.zstd_level,
            spill_dir=_spill_dir(),
        )
        stats = PartitionStats(
            part.key, part.kind, blocks=st.blocks, rows=st.blocks, errors=st.errors,
            bytes_in=st.bytes_in, bytes_out=st.bytes_out, raw_bytes=st.raw_bytes,
            seconds=time.perf_counter() - t0,
            error_samples=_error_samples(tables.get("export_errors")) if st.errors else [])
    elif part.kind in ("indices", "mapping"):
        tables, stats = _keyed_tables(client, part, ctx)
    elif part.kind == "anomalies":
        tables, stats = _anomaly_tables(client, part, ctx)
    else:
        raise ValueError(f"unknown partition kind {part.kind!r}")
    try:
        write_with_backoff(sink, ctx.run_id, part, tables, stats)
    finally:
        close_tables(tables)
        del tables
        release_memory()
    stats.seconds = time.perf_counter() - t0
    return stats


def _error_samples(errors, limit: int = 5) -> list[dict]:
    """The first corrupt blocks of a partition (scale, x, y, z, reason) for the dashboard."""
    if errors is None:
        return []
    if not isinstance(errors, pa.Table):  # spilled: its first batch is enough
        first = next(iter(errors), None)
        errors = pa.Table.from_batches([first]) if first is not None else None
    if errors is None or errors.num_rows == 0:
        return []
    # a block's bytes are cut into parts (rows); its part 0 names it once. (Taking the first
    # rows and skipping repeats listed too few blocks when one block had many parts.)
    import pyarrow.compute as pc

    first = errors.filter(pc.equal(errors.column("part"), 0))
    t = first.slice(0, limit).select(["scale", "x", "y", "z", "reason"])
    return [{**r, "reason": str(r["reason"])[:200]} for r in t.to_pylist()]


def _keyed_tables(client, part: Partition, ctx: TaskContext) -> tuple[dict, PartitionStats]:
    """The label_index rows of a body-label range, or the mapping pairs of a supervoxel
    range, gathered whole before the write (in memory, spilled to the worker's disk past
    ``SPILL_BYTES``) so a failed write is retried from them and the source is read once."""
    from dvidetl.export.spill import SpillBudget
    from dvidetl.export.transform import label_index_tables

    t0 = time.perf_counter()
    table = "label_index" if part.kind == "indices" else "mapping"
    spill = SpillBudget().table(table, S.schema(table), _spill_dir())
    report = ProgressReporter(part.kind)
    nbytes = 0
    try:
        if part.kind == "indices":
            grid0 = tuple(ctx.grids.get(0) or ctx.grids.get("0"))
            for batch in client.read_indices(part.lo, part.hi):
                nbytes += batch.column("data").nbytes
                for t in label_index_tables([batch], grid0):
                    spill.append(t)
                    report.add(rows=t.num_rows, nbytes=0)
        else:
            for batch in client.read_mapping(part.lo, part.hi):
                nbytes += batch.nbytes
                spill.append(S.conform("mapping", pa.Table.from_batches([batch])))
                report.add(rows=batch.num_rows)
        result = spill.result()
    except BaseException:
        spill.discard()
        raise
    stats = PartitionStats(part.key, part.kind, rows=spill.num_rows, bytes_in=nbytes,
                           bytes_out=spill.nbytes, seconds=time.perf_counter() - t0)
    return {table: result}, stats


def _anomaly_tables(client, part: Partition, ctx: TaskContext) -> tuple[dict, PartitionStats]:
    """The source's anomalies numbered ``[lo, hi)`` with the run's id (a partition holds at
    most ``planning.DEFAULT_ANOMALY_ROWS``: kept in memory), counted per kind for the summary."""
    import pyarrow.compute as pc

    from dvidetl.sources.base import anomaly_counts

    t0 = time.perf_counter()
    batches = list(client.read_anomalies(part.lo, part.hi))
    t = pa.Table.from_batches(batches, schema=batches[0].schema) if batches else S.empty("source_anomalies").drop_columns(["run_id"])
    t = t.replace_schema_metadata(None)
    t = S.conform("source_anomalies", t.add_column(0, "run_id", pa.array([ctx.run_id] * t.num_rows, pa.string())))
    lost = int(pc.sum(pc.cast(t.column("lost"), pa.int64())).as_py() or 0)
    stats = PartitionStats(part.key, part.kind, rows=t.num_rows, bytes_in=t.nbytes, bytes_out=t.nbytes,
                           seconds=time.perf_counter() - t0, anomalies=anomaly_counts(t), lost=lost)
    return {"source_anomalies": t}, stats


def release_memory() -> None:
    """Hand freed heap back to the OS after a partition. A Dask worker pauses at 80% of its
    memory limit by *process* memory, and a partition's freed buffers otherwise stay in the
    allocators' free lists: measured, a worker that had finished a dense partition stayed
    paused above the threshold and never ran the next one."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _spill_dir() -> str:
    """Where a task spills partition output: the Dask worker's local directory (cleaned up
    with the worker), else the system temp directory."""
    import tempfile

    try:
        from distributed import get_worker

        return os.path.join(get_worker().local_directory, "dvidetl-spill")
    except (ImportError, ValueError):
        return os.path.join(tempfile.gettempdir(), "dvidetl-spill")


#: a failed sink write (EIO, a full disk, a store hiccup) is retried inside the task with
#: exponential backoff before the task fails: Dask's own retries are immediate and redo the
#: whole partition (re-read + transform), so a few seconds of trouble would use them all up
WRITE_TRIES = 3
WRITE_BACKOFF_S = 0.5


def write_with_backoff(sink, run_id: str, part: Partition, tables: dict, stats) -> None:
    """``sink.write_partition`` retried on ``OSError`` (up to ``WRITE_TRIES`` attempts,
    backoff doubling from ``WRITE_BACKOFF_S``), only when every table is materialized (a
    consumed stream cannot be sent again). Rewriting a partition is idempotent (sinks replace
    what an earlier attempt left), so this never duplicates rows."""
    replayable = all(isinstance(t, pa.Table) or getattr(t, "replayable", False) for t in tables.values())
    retry(lambda: sink.write_partition(run_id, part, tables, stats),
          Backoff(tries=WRITE_TRIES, base=WRITE_BACKOFF_S, cap=float("inf")),
          retryable=lambda exc: replayable and isinstance(exc, OSError),
          what=f"partition {part.key}: write failed", logger=log, level=logging.WARNING)
