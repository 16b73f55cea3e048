"""The work of one partition, run on a Dask worker: read it through Flight once, turn it
into typed partition data (``export.batch``) with its kind's task function, commit it to
each sink of the run with its ledger row (write retried in-task), return small stats.

A task gets only small arguments (a :class:`TaskContext` and one plan entry); each worker
process keeps one Flight client and one object per sink (``worker_client`` /
``worker_sink``). Which function does a partition's work is the kind's business
(``export.kinds``): :func:`blocks_task`, :func:`indices_task`, :func:`mapping_task`,
:func:`anomalies_task` here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.export.batch import BlockData, PartitionData
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
from dvidetl.export.spill import SpillBudget, close_tables
from dvidetl.export.transform import label_index_tables, transform_blocks
from dvidetl.geometry import vec3
from dvidetl.redact import redact
from dvidetl.retry import Backoff, retry
from dvidetl.tables import schema as S

if TYPE_CHECKING:
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.flight.client import FlightClient
    from dvidetl.sinks.base import Sink

# Imports inside functions load Arrow Flight, the plugin registry's entry points only where used:
# importing this module must not (CLI start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.

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
    """The small, picklable context every task gets. ``sink_urls``: every sink of the run —
    the source is read once per partition, and each sink commits it with its own ledger."""

    run_id: str
    location: str
    token: Secret
    uuid: str
    instance: str
    sink_urls: tuple[str, ...]
    codec: str
    grids: dict  # scale -> grid (x, y, z)
    zstd_level: int = 3

    @property
    def sink_url(self) -> str:
        return self.sink_urls[0]


def task_context(run: RunInfo, ep: FlightEndpoint, sink_urls: str | tuple[str, ...]) -> TaskContext:
    """The context of ``run``'s tasks, reaching the source through endpoint ``ep``, with the
    options the run was planned with (stored with it)."""
    urls = (sink_urls,) if isinstance(sink_urls, str) else tuple(sink_urls)
    return TaskContext(
        run_id=run.run_id, location=ep.location, token=ep.token, uuid=run.uuid,
        instance=ep.instance, sink_urls=urls, codec=ep.info.codec,
        grids={s.scale: tuple(s.grid) for s in ep.info.scales},
        zstd_level=run.options.zstd_level,
    )


_CLIENTS: dict = {}
_SINKS: dict = {}


def worker_client(ctx: TaskContext):
    """This process's Flight client for the context (one per location, token, volume)."""
    from dvidetl.flight.client import FlightClient

    key = (ctx.location, ctx.token.get(), ctx.uuid, ctx.instance)
    c = _CLIENTS.get(key)
    if c is None:
        c = FlightClient(ctx.location, token=ctx.token.get(), uuid=ctx.uuid, instance=ctx.instance)
        _CLIENTS[key] = c
    return c


def worker_sink(ctx: TaskContext, url: str | None = None):
    """This process's object for a sink of the context (default: its first sink)."""
    from dvidetl.sinks import open_sink

    url = url or ctx.sink_url
    key = (url, ctx.uuid, ctx.instance)
    s = _SINKS.get(key)
    if s is None:
        s = open_sink(url, uuid=ctx.uuid, instance=ctx.instance)
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

            self._worker: Any = get_worker()
            self._key: Any = self._worker.get_current_task()
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


class SinkWriteError(Exception):
    """A partition could not be committed to some sinks of a several-sink run (the others
    have it): the message names each failing sink (without secrets) and why, so the run's
    summary says where to look. A one-sink run raises the sink's own error instead."""


def export_partition(ctx: TaskContext, part: Partition) -> PartitionStats:
    """One task: read, transform and commit one partition to every sink of the run that does
    not hold it yet (an earlier attempt may have committed it to some). Returns small stats
    for the driver (``skipped`` when every sink had it; ``written``: the sinks it committed
    to now).

    A sink whose write fails (after ``write_with_backoff``'s retries) does not keep the
    partition from the other sinks: each is written, then the task fails naming the sinks
    that failed, and the task's retry (or a resumed run) writes only those."""
    t0 = time.perf_counter()
    sinks = [worker_sink(ctx, u) for u in ctx.sink_urls]
    # a sink that does not store the kind (a precomputed volume: no label_index table) is
    # never handed it; the planner plans a kind only when a sink of the run takes it
    todo = [i for i, s in enumerate(sinks) if s.takes(part.kind) and not s.is_done(ctx.run_id, part)]
    if not todo:
        return PartitionStats(part.key, part.kind, skipped=True)
    needs = frozenset().union(*(sinks[i].needs for i in todo))
    data, stats = part.spec.function("task")(worker_client(ctx), ctx, part, needs=needs)
    failed: list[tuple[int, BaseException]] = []
    extra = 0  # blocks a sink refused on its own (a volume's transcode), for the driver's totals
    samples = list(stats.error_samples)
    try:
        for i in todo:
            try:
                mine = write_with_backoff(sinks[i], ctx.run_id, part, data, stats)
                extra += mine.errors - stats.errors
                samples += mine.error_samples[len(stats.error_samples):]
            except Exception as exc:
                if len(ctx.sink_urls) == 1:
                    raise
                log.warning("partition %s: write to %s failed: %s", part.key,
                            redact(ctx.sink_urls[i]), redact(f"{type(exc).__name__}: {exc}"))
                failed.append((i, exc))
    finally:
        close_tables(data)
        del data
        release_memory()
    if failed:
        why = "; ".join(f"{redact(ctx.sink_urls[i])}: {type(e).__name__}: {e}" for i, e in failed)
        raise SinkWriteError(f"write failed in {len(failed)} of {len(ctx.sink_urls)} sinks ({why})") \
            from failed[0][1]
    stats.errors += extra
    stats.error_samples = samples[:5]
    stats.written = tuple(todo)
    stats.seconds = time.perf_counter() - t0
    # INFO: in the driver's --log-file (cluster.logs forwards it), one line per commit
    log.info("partition %s: %d rows, %d errors, committed to %s in %.2f s", part.key, stats.rows,
             stats.errors, ", ".join(redact(ctx.sink_urls[i]) for i in todo), stats.seconds)
    return stats


def blocks_task(client: FlightClient, ctx: TaskContext, part: Partition, *,
                needs: frozenset = frozenset()) -> tuple[BlockData, PartitionStats]:
    """A blocks partition: its blocks read, repacked, mapped (``transform.transform_blocks``)."""

    t0 = time.perf_counter()
    grid = vec3(ctx.grids[part.scale] if part.scale in ctx.grids else ctx.grids[str(part.scale)])
    data, st = transform_blocks(
        ProgressReporter(part.kind).blocks_of(part.read(client)), ctx.codec, client.map_supervoxels,
        scale=part.scale, grid=grid, lo=part.lo, hi=part.hi, zstd_level=ctx.zstd_level,
        keep_raw="raw" in needs, keep_payload="payload" in needs, spill_dir=_spill_dir())
    stats = PartitionStats(
        part.key, part.kind, blocks=st.blocks, rows=st.blocks, errors=st.errors,
        bytes_in=st.bytes_in, bytes_out=st.bytes_out, raw_bytes=st.raw_bytes,
        seconds=time.perf_counter() - t0,
        error_samples=_error_samples(data.failed) if st.errors else [])
    return data, stats


def _error_samples(failed: pa.Table, limit: int = 5) -> list[dict]:
    """The first corrupt blocks of a partition (scale, x, y, z, reason) for the dashboard
    (``failed``: one row per block, ``export.batch.FAILED_BLOCKS``)."""
    if failed is None or failed.num_rows == 0:
        return []
    t = failed.slice(0, limit).select(["scale", "x", "y", "z", "reason"])
    return [{**r, "reason": str(r["reason"])[:200]} for r in t.to_pylist()]


def _gathered(part: Partition, table: str, rows) -> tuple[dict, PartitionStats]:
    """A keyed partition's rows of ``table`` gathered whole before the write (in memory,
    spilled to the worker's disk past ``SPILL_BYTES``) so a failed write is retried from them
    and the source is read once. ``rows`` yields (table chunk, bytes read for it)."""

    t0 = time.perf_counter()
    spill = SpillBudget().table(table, S.schema(table), _spill_dir())
    report = ProgressReporter(part.kind)
    nbytes = 0
    try:
        for t, n in rows:
            nbytes += n
            spill.append(t)
            report.add(rows=t.num_rows)
        result = spill.result()
    except BaseException:
        spill.discard()
        raise
    stats = PartitionStats(part.key, part.kind, rows=spill.num_rows, bytes_in=nbytes,
                           bytes_out=spill.nbytes, seconds=time.perf_counter() - t0)
    return {table: result}, stats


def indices_task(client: FlightClient, ctx: TaskContext, part: Partition, *,
                 needs: frozenset = frozenset()) -> tuple[dict, PartitionStats]:
    """The label_index rows of a body-label range, decoded from the source's label indices."""

    grid0 = vec3(ctx.grids[0] if 0 in ctx.grids else ctx.grids["0"])

    def rows():
        for batch in part.read(client):
            n = batch.column("data").nbytes
            for t in label_index_tables([batch], grid0):
                yield t, n
                n = 0
            if n:
                yield S.empty("label_index"), n

    return _gathered(part, "label_index", rows())


def mapping_task(client: FlightClient, ctx: TaskContext, part: Partition, *,
                 needs: frozenset = frozenset()) -> tuple[dict, PartitionStats]:
    """The mapping pairs of a supervoxel range."""
    return _gathered(part, "mapping", ((S.conform("mapping", pa.Table.from_batches([b])), b.nbytes)
                                       for b in part.read(client)))


def anomalies_task(client: FlightClient, ctx: TaskContext, part: Partition, *,
                   needs: frozenset = frozenset()) -> tuple[dict, PartitionStats]:
    """The source's anomalies numbered ``[lo, hi)`` with the run's id (a partition holds at
    most ``kinds.KINDS['anomalies'].default_rows``: kept in memory), counted per kind for the summary."""

    from dvidetl.sources.base import anomaly_counts

    t0 = time.perf_counter()
    batches = list(part.read(client))
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

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _spill_dir() -> str:
    """Where a task spills partition output: the Dask worker's local directory (cleaned up
    with the worker), else the system temp directory."""

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


def write_with_backoff(sink: Sink, run_id: str, part: Partition, data: PartitionData,
                       stats: PartitionStats) -> PartitionStats:
    """``sink.write_partition`` retried on ``OSError`` (up to ``WRITE_TRIES`` attempts,
    backoff doubling from ``WRITE_BACKOFF_S``), only when the data can be read again (a
    consumed stream cannot be sent again). Rewriting a partition is idempotent (sinks replace
    what an earlier attempt left), so this never duplicates rows.

    Each attempt gets its own copy of ``stats``: a sink may add what it alone refused (blocks
    outside a precomputed volume) to its ledger row, and that must count neither twice when
    an attempt is retried nor in the ledger of another sink of the run. Returns the committed
    attempt's copy."""

    def attempt() -> PartitionStats:
        mine = dataclasses.replace(stats, error_samples=list(stats.error_samples))
        sink.write_partition(run_id, part, data, mine)
        return mine

    if isinstance(data, BlockData):
        replayable = data.replayable
    else:
        replayable = all(isinstance(t, pa.Table) or getattr(t, "replayable", False) for t in data.values())
    return retry(attempt,
          Backoff(tries=WRITE_TRIES, base=WRITE_BACKOFF_S, cap=float("inf")),
          retryable=lambda exc: replayable and isinstance(exc, OSError),
          what=f"partition {part.key}: write failed", logger=log, level=logging.WARNING)
