"""Planning and the Dask graph of an export run (wiring only: the work is in ``transform``).

Why futures, not ``dask.dataframe.from_map``: every task has a side effect (it commits its
partition and ledger row to the sink) and returns only a small stats dict; nothing is
shuffled or reduced, so a dataframe would add meta inference and graph optimisation for no
gain. With futures the driver streams completions (``distributed.as_completed``) into the
progress line, keeps a bounded window of partitions in flight (a CNS plan has ~10^5
partitions; the scheduler never holds them all), retries each failed task (``retries=``),
and can stop submitting when ``--max-errors`` is reached. Each task gets only small
arguments: the Flight location, the token (wrapped so it never prints), the sink URL, and
one plan entry — workers read their bytes from the Flight server themselves. Tasks are
``pure=False`` with keys derived from the partition, so a resubmitted partition is a new
attempt, never a cached result.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.export.kinds import KINDS, Partition, PartitionStats, RunInfo, kind
from dvidetl.export.progress import Counts
from dvidetl.export.tasks import PROGRESS_TOPIC, TaskContext, export_partition
from dvidetl.redact import redact
from dvidetl.tables import schema as S

if TYPE_CHECKING:
    from distributed import Client

    from dvidetl.sinks.base import Sink

# Imports inside functions load Dask, the plugin registry's entry points only where used:
# importing this module must not (CLI start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.

log = logging.getLogger(__name__)
T = TypeVar("T")

@dataclass
class RunResult:
    """A run's totals: added up from its partitions' stats as they complete (``add``), or —
    for partitions committed before this invocation — read back from the ledger
    (``add_ledger``), so a resumed run reports what an uninterrupted one does."""

    run_id: str
    partitions: int = 0  # in the plan
    done: int = 0  # committed by this invocation
    skipped: int = 0  # already committed (resume / retried after commit)
    failed: list = field(default_factory=list)  # (key, reason)
    blocks: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    raw_bytes: int = 0
    index_rows: int = 0  # label_index rows committed (this invocation and earlier ones)
    mapping_rows: int = 0
    seconds: float = 0.0
    aborted: str | None = None
    #: raw_bytes misses partitions committed by a dvidetl whose ledger had no raw_bytes
    raw_partial: bool = False
    #: the source's anomalies stored with the run (``source_anomalies``), per kind, and how
    #: many of them mean blocks the export lacks (a killed export's cut records, ...)
    anomalies: dict = field(default_factory=dict)
    lost: int = 0
    #: the sink these figures are of (a per-sink result), else "" (the run's)
    sink: str = ""
    #: one result per sink of the run, in ``--sink`` order (``sink_results``): what each
    #: sink holds of the run — partitions written now / already there / failed there, and
    #: its blocks and rows read back from its own ledger
    sinks: list = field(default_factory=list)
    #: a per-sink result whose ledger could not be read back at the end (why): its block
    #: and row figures are unknown (0), its partition counts are the tasks' own
    unreadable: str | None = None
    #: what the sink's finish removed (``Sink.clean_at_finish``: stray rows outside the run's
    #: partitions, killed writers' temporary files); the run's: summed over its sinks. Kept
    #: in the record apart from ``result`` (written before the finish)
    removed_at_finish: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every planned partition is committed (for a per-sink result: in that sink)."""
        return not self.failed and self.done + self.skipped >= self.partitions

    @property
    def ok(self) -> bool:
        return not self.failed and self.errors == 0 and self.aborted is None and self.lost == 0

    def add(self, st: PartitionStats) -> None:
        """A partition's task outcome (skipped: committed before)."""
        if st.skipped:
            self.skipped += 1
            return
        self.done += 1
        spec = kind(st.kind)
        if spec.scaled:
            self.blocks += st.blocks
            self.bytes_in += st.bytes_in
            self.bytes_out += st.bytes_out
            self.raw_bytes += st.raw_bytes
        elif spec.counter is not None:
            setattr(self, spec.counter, getattr(self, spec.counter) + st.rows)
        self.add_anomalies(st.anomalies, st.lost)
        self.errors += st.errors

    def add_ledger(self, ledger: pa.Table) -> None:
        """The figures of partitions committed earlier, from their ledger rows."""
        kinds = ledger.column("kind")
        self.errors += int(pc.sum(ledger.column("errors")).as_py() or 0)
        for spec in KINDS.values():
            mine = ledger.filter(pc.equal(kinds, spec.name))
            if mine.num_rows == 0:
                continue
            total = lambda col, t=mine: int(pc.sum(t.column(col)).as_py() or 0)  # noqa: E731
            if spec.scaled:
                self.blocks += total("blocks")
                self.bytes_in += total("bytes_in")
                self.bytes_out += total("bytes_out")
                self.raw_bytes += total("raw_bytes")
                self.raw_partial |= bool(mine.column("raw_bytes").null_count)
            elif spec.counter is not None:
                setattr(self, spec.counter, getattr(self, spec.counter) + total("rows"))

    def add_anomalies(self, kinds: dict, lost: int) -> None:
        for k, n in kinds.items():
            self.anomalies[k] = self.anomalies.get(k, 0) + int(n)
        self.lost += int(lost)

    def to_dict(self) -> dict:
        """The figures for the run's record (failed partitions: the count and the first ten,
        with reasons)."""
        d = asdict(self)
        del d["removed_at_finish"]  # the record's own key, written by the finish after this
        d["sinks"] = [r.to_dict() for r in self.sinks]
        if not self.sink:
            del d["sink"]
        if self.unreadable is None:
            del d["unreadable"]
        d["failed"] = len(self.failed)
        d["failed_partitions"] = [{"partition": k, "reason": r} for k, r in self.failed[:10]]
        d["ok"] = self.ok
        if self.sink:  # a sink's own figures: whether the run is whole there
            d["complete"] = self.complete
            del d["sinks"]
        return d


def stored_anomalies(sink: Sink, run_id: str, parts: Iterable[Partition] | None = None) -> tuple[dict, int]:
    """(rows per kind, lost rows) of the anomalies a run stored (for a resumed run's
    totals); ``parts``: only those anomalies partitions' rows."""
    from dvidetl.sources.base import anomaly_counts

    if parts is None:
        t = sink.read("source_anomalies", run_id=run_id, columns=["kind", "lost"])
    else:
        col = S.KEY_COLUMN["source_anomalies"]
        got = [sink.read("source_anomalies", run_id=run_id, columns=["kind", "lost"],
                         where={col: (p.lo, p.hi)}) for p in parts]
        if not got:
            return {}, 0
        t = pa.concat_tables(got)
    return anomaly_counts(t), int(pc.sum(pc.cast(t.column("lost"), "int64")).as_py() or 0)


def ledger_keys(ledger: pa.Table) -> list[str]:
    """``Partition.key`` of each ledger row."""
    return [Partition(k, s, lo, hi).key for k, s, lo, hi in zip(
        ledger.column("kind").to_pylist(), ledger.column("scale").to_pylist(),
        ledger.column("lo").to_pylist(), ledger.column("hi").to_pylist(), strict=True)]


def ledger_of(ledger: pa.Table, keys: set[str]) -> pa.Table:
    """The ledger rows of the partitions ``keys``."""
    return ledger.filter(pa.array([k in keys for k in ledger_keys(ledger)], pa.bool_()))


def plan_of(sink: Sink, run: RunInfo) -> set[str]:
    """The keys of the run's partitions ``sink`` stores (``Sink.takes`` their kind): what it
    must hold for the run to be whole there."""
    return {p.key for p in run.partitions if sink.takes(p.kind)}


def sink_results(sinks: Sequence, urls: Sequence[str], run: RunInfo, res: RunResult,
                 before: Sequence[set[str]], wrote: Sequence[set[str]]) -> list[RunResult]:
    """One ``RunResult`` per sink once the run's tasks are over: the partitions of the plan
    the sink held before (``before``: its committed keys then), took now (``wrote``) and
    lacks (the failed partitions it lacks, with their reasons), and — several sinks — its
    blocks, rows and errors read back from its own ledger: what that sink holds, whatever
    the other sinks hold. One sink: the run's own figures."""
    if len(sinks) == 1:
        r = replace(res, sink=redact(urls[0]), sinks=[], failed=list(res.failed))
        return [r]
    out = []
    for s, url, had, new in zip(sinks, urls, before, wrote, strict=True):
        plan = plan_of(s, run)
        r = RunResult(run.run_id, partitions=len(plan), seconds=res.seconds,
                      aborted=res.aborted, sink=redact(url))
        had, new = had & plan, (new & plan) - had
        r.skipped, r.done = len(had), len(new)
        r.failed = [(k, why) for k, why in res.failed if k in plan and k not in had and k not in new]
        try:
            r.add_ledger(ledger_of(s.ledger(run.run_id), had | new))
            if any("source_anomalies" in p.spec.tables and p.key in had | new for p in run.partitions):
                r.add_anomalies(*stored_anomalies(s, run.run_id))
        except Exception as exc:  # noqa: BLE001 - one sink's trouble is its own line, not the run's end
            r.unreadable = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:300]
            log.error("sink %s: its ledger cannot be read back: %s", r.sink, r.unreadable)
        out.append(r)
    return out


def _interleaved(todo: list[Partition]) -> list[Partition]:
    """Blocks in plan order with the indices and mapping partitions spread evenly among
    them (and the first ones early), so that all kinds run on all workers side by side
    and no kind is left as a long tail at the end."""
    blocks = [p for p in todo if p.spec.scaled]
    keyed = [p for p in todo if not p.spec.scaled]
    if not blocks or not keyed:
        return keyed + blocks
    # position of each keyed partition among the blocks: evenly over the first half of the run
    pos = (np.arange(len(keyed)) * (len(blocks) / 2 / len(keyed))).astype(np.int64)
    out: list[Partition] = []
    k = 0
    for i, b in enumerate(blocks):
        while k < len(keyed) and pos[k] <= i:
            out.append(keyed[k])
            k += 1
        out.append(b)
    out.extend(keyed[k:])
    return out


class LiveParts:
    """What running partitions have streamed so far (``tasks.ProgressReporter`` events),
    keyed by task; a partition's entry goes when its task completes (its committed figures
    then count in the ``RunResult``). Filled from the Dask client's event thread, read by
    the driver's ticker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, str] = {}  # running task key -> partition kind
        self._got: dict[str, dict] = {}

    def started(self, key: str, kind: str) -> None:
        with self._lock:
            self._kinds[key] = kind

    def ended(self, key: str) -> None:
        with self._lock:
            self._kinds.pop(key, None)
            self._got.pop(key, None)

    def on_event(self, event) -> None:
        _ts, msg = event
        key = msg.get("key") if isinstance(msg, dict) else None
        with self._lock:
            if key in self._kinds:
                self._got[key] = msg

    def done(self, res: RunResult) -> Counts:
        """Committed (``res``) plus streamed by running partitions."""
        d = Counts(blocks=res.blocks, index_rows=res.index_rows, mapping_rows=res.mapping_rows,
                 bytes_in=res.bytes_in, errors=res.errors,
                 parts=res.done + res.skipped + len(res.failed))
        with self._lock:
            got = list(self._got.values())
        for m in got:
            spec = KINDS.get(str(m.get("kind")))
            if spec is None:
                continue
            if spec.scaled:
                d.blocks += int(m.get("blocks", 0))
                d.bytes_in += int(m.get("bytes", 0))
            elif spec.counter is not None:
                setattr(d, spec.counter, getattr(d, spec.counter) + int(m.get("rows", 0)))
        return d


class _Ticker:
    """Redraws the progress line and republishes the page every ``interval`` seconds while
    the run goes, whether or not a partition completed (partials and rates move)."""

    def __init__(self, interval: float, fn):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(interval, fn), daemon=True,
                                   name="dvidetl-progress")

    def _loop(self, interval: float, fn) -> None:
        while not self._stop.wait(interval):
            try:
                fn()
            except Exception:  # noqa: BLE001 - progress is a convenience, never a failure
                log.debug("progress update failed", exc_info=True)

    def __enter__(self) -> _Ticker:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)


class TaskWindow(Generic[T]):
    """Tasks for a stream of items with at most ``window`` in flight — a CNS plan has 10^5+
    partitions, the scheduler never holds them all — yielding (item, future) as they
    finish and submitting the next item after each. ``stop()`` ends the submitting,
    ``cancel()`` cancels the tasks in flight. The one submitter of ``execute`` and
    ``verify`` (``window=None``: four per worker thread, at least 8)."""

    def __init__(self, client: Client, items: Iterable[T], submit: Callable[[T], Any],
                 window: int | None = None):
        from distributed import as_completed

        if window is None:
            window = max(8, 4 * (sum(client.nthreads().values()) or 1))
        self.client, self._items, self._submit = client, iter(items), submit
        self._ac = as_completed()
        self._flight: dict[str, tuple[T, Any]] = {}
        self.stopped = False
        for _ in range(window):
            if not self._next():
                break

    def _next(self) -> bool:
        if self.stopped:
            return False
        item = next(self._items, None)
        if item is None:
            return False
        fut = self._submit(item)
        self._flight[fut.key] = (item, fut)
        self._ac.add(fut)
        return True

    def __iter__(self) -> Iterator[tuple[T, Any]]:
        for fut in self._ac:
            item, _ = self._flight.pop(fut.key)
            try:
                yield item, fut
            finally:
                fut.release()
            self._next()

    def stop(self) -> None:
        self.stopped = True

    def cancel(self) -> None:
        self.stopped = True
        self.client.cancel([f for _, f in self._flight.values()])


def _killed_worker(exc: BaseException) -> bool:
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, KilledWorker)


def execute(
    client: Client,
    run: RunInfo,
    ctx: TaskContext,
    sink: Sink | Sequence[Sink],
    *,
    progress=None,
    retries: int = 3,
    max_errors: int | None = None,
    window: int | None = None,
    dashboard=None,
    tick: float = 0.5,
) -> RunResult:
    """Submit every partition of ``run`` not yet committed to every sink (bounded window),
    follow completions, and return totals. ``sink``: the run's sink, or its sinks in the
    order of ``ctx.sink_urls`` — a partition one sink holds and another lacks is read once
    more and written only where it is missing; the result's ``sinks`` are each sink's own
    figures (``sink_results``).

    A partition whose task killed its worker every time it ran (Dask's ``KilledWorker``:
    the worker cannot hold it, e.g. too little ``--worker-memory``) stops the run at once:
    every other partition would do the same, restart-looping the workers for minutes."""
    t0 = time.perf_counter()
    sinks: list[Sink] = list(sink) if isinstance(sink, (list, tuple)) else [sink]  # type: ignore[list-item]
    if len(sinks) != len(ctx.sink_urls):
        raise ValueError(f"{len(sinks)} sinks for a task context of {len(ctx.sink_urls)} sink URLs")
    res = RunResult(run.run_id, partitions=len(run.partitions))
    before = [s.done(run.run_id) for s in sinks]
    # committed to every sink that stores its kind: nothing to do
    done_keys = {p.key for p in run.partitions
                 if all(p.key in b for s, b in zip(sinks, before, strict=True) if s.takes(p.kind))}
    todo = [p for p in run.partitions if p.key not in done_keys]
    todo = _interleaved(todo)
    res.skipped = len(run.partitions) - len(todo)
    if res.skipped:
        if len(sinks) == 1:
            res.add_ledger(sinks[0].ledger(run.run_id))
            if any("source_anomalies" in p.spec.tables and p.key in done_keys for p in run.partitions):
                res.add_anomalies(*stored_anomalies(sinks[0], run.run_id))
        else:  # each kind's figures from the ledger of a sink that stores it
            ledgers: dict[int, pa.Table] = {}
            for k in {p.kind for p in run.partitions if p.key in done_keys}:
                i = next((i for i, s in enumerate(sinks) if s.takes(k)), None)
                if i is None:  # a kind no sink stores (never planned)
                    continue
                if i not in ledgers:
                    ledgers[i] = sinks[i].ledger(run.run_id)
                mine = [p for p in run.partitions if p.kind == k and p.key in done_keys]
                res.add_ledger(ledger_of(ledgers[i], {p.key for p in mine}))
                if "source_anomalies" in kind(k).tables:
                    res.add_anomalies(*stored_anomalies(sinks[i], run.run_id, mine))
    wrote: list[set[str]] = [set() for _ in sinks]  # committed by this invocation, per sink
    live = LiveParts()
    if dashboard is not None:
        dashboard.start(run)
        dashboard.skipped([p for p in run.partitions if p.key in done_keys])
        dashboard.sinks_before([len(b & plan_of(s, run)) for s, b in zip(sinks, before, strict=True)],
                               [len(plan_of(s, run)) for s in sinks])
        dashboard.publish(res, live.done(res), force=True)
    if progress is not None:
        progress.start(Counts.of_plan(run.partitions))

    def submit(p: Partition):
        key = f"export-{run.run_id}-{p.key}-{os.urandom(2).hex()}"
        live.started(key, p.kind)
        return client.submit(export_partition, ctx, p, key=key, retries=retries, pure=False)

    def refresh() -> None:
        d = live.done(res)
        if progress is not None:
            progress.update(d)
        if dashboard is not None:
            dashboard.publish(res, d)

    def lacking(part: Partition) -> list[int]:
        """The sinks that lack a failed partition (several sinks: some may have it)."""
        if len(sinks) == 1:
            return [0]
        out = []
        for i, s in enumerate(sinks):
            if not s.takes(part.kind):
                continue
            try:
                if not s.is_done(run.run_id, part):
                    out.append(i)
            except Exception:  # noqa: BLE001 - a sink that cannot answer lacks it, as far as we know
                out.append(i)
        return out

    try:
        client.subscribe_topic(PROGRESS_TOPIC, live.on_event)
    except Exception:  # noqa: BLE001 - an old scheduler: counts move at commits only
        log.debug("no progress events from this scheduler", exc_info=True)
    try:
        with _Ticker(tick, refresh):
            tasks = TaskWindow(client, todo, submit, window)
            for part, fut in tasks:
                killed = False
                try:
                    st = fut.result()
                except Exception as exc:  # noqa: BLE001 — a failed partition is reported, not fatal
                    reason = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:300]
                    res.failed.append((part.key, reason))
                    log.error("partition %s failed after %d retries: %s", part.key, retries, reason)
                    lack = lacking(part)
                    took = [i for i, s in enumerate(sinks) if s.takes(part.kind) and i not in lack]
                    for i in took:
                        wrote[i].add(part.key)
                    if dashboard is not None and len(sinks) > 1:
                        dashboard.completed(part, None, res, failure=reason, written=took, lacking=lack)
                    elif dashboard is not None:
                        dashboard.completed(part, None, res, failure=reason)
                    if _killed_worker(exc) and not tasks.stopped:
                        res.aborted = (f"partition {part.key} killed its worker every time it ran: "
                                       "the workers cannot hold one partition (raise --worker-memory, "
                                       "or lower --partition-blocks)")
                        killed = True
                else:
                    res.add(st)
                    took = [i for i in (range(len(sinks)) if st.skipped else st.written)
                            if sinks[i].takes(part.kind)]
                    for i in took:
                        wrote[i].add(part.key)
                    if dashboard is not None:
                        dashboard.completed(part, st, res, written=took if len(sinks) > 1 else ())
                finally:
                    live.ended(fut.key)
                if killed:  # the rest would kill their workers too: stop them now
                    tasks.cancel()
                    break
                if max_errors is not None and res.errors > max_errors and not tasks.stopped:
                    res.aborted = f"more than {max_errors} block errors ({res.errors})"
                    tasks.stop()
    finally:
        try:
            client.unsubscribe_topic(PROGRESS_TOPIC)
        except Exception:  # noqa: BLE001
            pass
    res.seconds = time.perf_counter() - t0
    res.sinks = sink_results(sinks, ctx.sink_urls, run, res, before, wrote)
    final = live.done(res)
    if dashboard is not None:
        dashboard.finish(res, final)
    if progress is not None:
        progress.finish(final)
    return res
