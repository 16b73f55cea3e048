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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dvidetl import schema as S
from dvidetl.geometry import VolumeInfo
from dvidetl.sinks.base import LABEL_END, Partition, RunInfo
from dvidetl.sources.base import KeyCounts
from dvidetl.spill import close_tables

log = logging.getLogger(__name__)

DEFAULT_PARTITION_BLOCKS = 4096
MIN_AUTO_PARTITION = 128
#: label_index rows per indices partition: ~40 B each in Arrow (plus the protobufs being
#: decoded), so ~80 MB of output, spilled past 32 MiB — well under 256 MiB on a worker; the
#: male CNS's ~6e9 rows become ~3,000 partitions
DEFAULT_INDEX_ROWS = 2_000_000
#: mapping pairs per mapping partition (16 B each: 128 MB; 10^8 pairs -> ~13 partitions)
DEFAULT_MAPPING_ROWS = 8_000_000
#: auto sizing never cuts keyed tables finer than this many rows per partition
MIN_AUTO_ROWS = 16_384
#: a count_keys request refines one cell into at most 2**KEY_FAN_BITS child cells
KEY_FAN_BITS = 16

CountFn = Callable[[int, int], tuple[np.ndarray, np.ndarray, bool]]
#: count_keys(kind, level, lo, hi) -> KeyCounts (see sources.base.Source.count_keys)
KeyCountFn = Callable[[str, int, int, int], KeyCounts]


# ---------------------------------------------------------------------------------------------
# planning (pure functions over count() answers)
# ---------------------------------------------------------------------------------------------


def plan_scale(
    count: CountFn, scale: int, morton_end: int, target: int, *, start_level: int | None = None
) -> list[Partition]:
    """Partitions of about ``target`` blocks covering every non-empty cell of one scale.

    ``count(scale, level)`` answers blocks per aligned cell ``morton >> level`` (only
    non-empty cells need be listed). By default ONE count call at the level whose cells hold
    at most ``target`` block slots (a source's count is a full pass over its index, so the
    number of calls matters more than their size). A cell still holding more than ``target``
    blocks (a coarser ``start_level``, or a source over-reporting) is replaced by its children
    at a finer level (three levels per round). Empty cells are dropped, then Morton-consecutive
    cells are merged greedily into partitions (cumulative sum, vectorized). Deterministic:
    the same counts give the same plan. Memory is bounded by the number of non-empty cells
    (<= blocks, and <= slots / 2**level), never by the blocks themselves.
    """
    if target < 1:
        raise ValueError(f"partition size must be at least 1 block (got {target})")
    total_bits = max(int(morton_end).bit_length() - 1, 0)
    fine = min(max(int(target).bit_length() - 1, 0), total_bits)  # 2**fine <= target
    level = fine if start_level is None else min(max(int(start_level), 0), total_bits)
    lo, hi, cnt = _cells(count, scale, level)
    while level > 0:
        heavy = cnt > target
        if not heavy.any():
            break
        nxt = max(level - 3, fine) if level > fine else level - 1
        flo, fhi, fcnt = _cells(count, scale, nxt)
        parents = flo >> np.uint64(level)
        heavy_ids = np.unique(lo[heavy] >> np.uint64(level))
        sel = np.isin(parents, heavy_ids)
        keep = ~heavy
        lo = np.concatenate([lo[keep], flo[sel]])
        hi = np.concatenate([hi[keep], fhi[sel]])
        cnt = np.concatenate([cnt[keep], fcnt[sel]])
        order = np.argsort(lo, kind="stable")
        lo, hi, cnt = lo[order], hi[order], cnt[order]
        level = nxt
    return merge_cells(scale, lo, hi, cnt, target, morton_end)


def _cells(count: CountFn, scale: int, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells, counts, _exact = count(scale, level)
    cells = np.asarray(cells, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    if cells.shape != counts.shape:
        raise ValueError(f"count(scale={scale}, level={level}) returned mismatched arrays")
    nz = counts > 0
    cells, counts = cells[nz], counts[nz]
    order = np.argsort(cells, kind="stable")
    cells, counts = cells[order], counts[order]
    if len(cells) > 1 and np.any(cells[1:] == cells[:-1]):
        raise ValueError(f"count(scale={scale}, level={level}) listed a cell twice")
    sh = np.uint64(level)
    return cells << sh, (cells + np.uint64(1)) << sh, counts


def merge_cells(
    scale: int, lo: np.ndarray, hi: np.ndarray, cnt: np.ndarray, target: int, morton_end: int
) -> list[Partition]:
    """Group Morton-sorted non-empty cells into consecutive runs of about ``target`` blocks
    (a group closes once its cumulative count reaches a multiple of ``target``)."""
    if len(lo) == 0:
        return []
    cum = np.cumsum(cnt)
    excl = cum - cnt
    group = excl // int(target)
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    ends = np.concatenate([starts[1:], [len(lo)]]) - 1
    sums = cum[ends] - excl[starts]
    his = np.minimum(hi[ends], np.uint64(morton_end))
    return [
        Partition("blocks", int(scale), int(a), int(b), int(c))
        for a, b, c in zip(lo[starts].tolist(), his.tolist(), sums.tolist(), strict=True)
    ]


class _KeyRanges:
    """Gathers key-ordered cells (lo, rows) into contiguous partitions of about
    ``target`` rows (a partition closes once the rows before a cell reach a multiple of
    ``target``, as ``merge_cells`` does), covering ``[0, LABEL_END)`` without gaps so that a
    key the counts missed still belongs to a partition. Memory: the partitions only."""

    def __init__(self, kind: str, target: int):
        self.kind, self.target = kind, int(target)
        self.bounds: list[int] = [0]
        self.rows: list[int] = [0]
        self.total = 0  # rows added so far
        self.group = 0  # group of the last cell added

    def add(self, lo: np.ndarray, rows: np.ndarray) -> None:
        if len(lo) == 0:
            return
        rows = rows.astype(np.int64)
        excl = self.total + np.cumsum(rows) - rows
        group = excl // self.target
        prev = np.concatenate([[self.group], group[:-1]])
        new = np.flatnonzero(group != prev)
        if self.total == 0:  # the first cell opens the first partition (which starts at 0)
            new = new[new != 0]
        csum = np.concatenate([[0], np.cumsum(rows)])
        edges = np.concatenate([[0], new, [len(lo)]])
        sums = csum[edges[1:]] - csum[edges[:-1]]  # rows before the first new group, then each
        self.rows[-1] += int(sums[0])
        for start, n in zip(new.tolist(), sums[1:].tolist(), strict=True):
            self.bounds.append(int(lo[start]))
            self.rows.append(int(n))
        self.total += int(rows.sum())
        self.group = int(group[-1])

    def partitions(self) -> list[Partition]:
        if self.total == 0:
            return []
        ends = [*self.bounds[1:], LABEL_END]
        return [Partition(self.kind, 0, a, b, 0, r)
                for a, b, r in zip(self.bounds, ends, self.rows, strict=True)]


def plan_keys(count_keys: KeyCountFn, kind: str, target: int | None, *, auto_min: int = MIN_AUTO_ROWS,
              auto_parts: int = 8) -> list[Partition]:
    """Partitions of ``kind`` (``indices``: body labels, ``mapping``: supervoxels) of about
    ``target`` output rows, from the source's ``count_keys``.

    Top-down and depth-first in key order: one request counts the whole key space in 2**16
    cells; a cell of more than ``target / 8`` rows (and more than one key) is counted again
    in finer cells — about 64 per target's worth of its rows, at most 2**16 — and so on down
    to single keys (one label over the target is a partition of its own). Cells are then
    merged in order, so a partition holds at most ~1.125 x ``target`` rows. The planner never
    holds a label list — memory is one answer per level plus the partitions — and the
    answers total ~64 cells per partition and level. ``target=None``: ``DEFAULT_*_ROWS``, lowered
    for small tables to give about ``auto_parts`` partitions (never below ``auto_min``)."""
    top = 64 - KEY_FAN_BITS
    first = count_keys(kind, top, 0, LABEL_END + 1)
    if target is None:
        total = int(np.asarray(first.rows, np.int64).sum())
        default = DEFAULT_INDEX_ROWS if kind == "indices" else DEFAULT_MAPPING_ROWS
        target = min(default, max(auto_min, -(-total // auto_parts)))
    if target < 1:
        raise ValueError(f"{kind} partition size must be at least 1 row (got {target})")
    out = _KeyRanges(kind, target)

    fine = max(target // 8, 1)  # cells are cut to at most this, so a partition is <= 1.125 x target

    def visit(level: int, answer) -> None:
        cells = np.asarray(answer.cells, np.uint64)
        rows = np.asarray(answer.rows, np.int64)
        keys = np.asarray(answer.keys, np.int64)
        nz = (rows > 0) | (keys > 0)
        cells, rows, keys = cells[nz], np.maximum(rows[nz], 1), keys[nz]
        if len(cells) > 1 and not bool(np.all(cells[1:] > cells[:-1])):
            raise ValueError(f"count_keys({kind}, level={level}) cells are not ascending and unique")
        lo = cells << np.uint64(level) if level < 64 else np.zeros(len(cells), np.uint64)
        coarse = np.flatnonzero((rows > fine) & (keys > 1)) if level > 0 else np.zeros(0, np.int64)
        start = 0
        for h in coarse.tolist():
            out.add(lo[start:h], rows[start:h])
            # enough child cells for ~64 per target's worth of rows, at most 2**KEY_FAN_BITS
            bits = min(KEY_FAN_BITS, max(1, int(np.ceil(np.log2(64 * int(rows[h]) / target)))), level)
            nxt = level - bits
            c_lo = int(lo[h])
            c_hi = min(c_lo + (1 << level), LABEL_END + 1)
            visit(nxt, count_keys(kind, nxt, c_lo, c_hi))
            start = h + 1
        out.add(lo[start:], rows[start:])

    visit(top, first)
    return out.partitions()


def make_plan(
    info: VolumeInfo,
    count: CountFn,
    scales: list[int] | None = None,
    partition_blocks: int | None = None,
    *,
    indices: bool = True,
    mapping: bool = True,
    count_keys: KeyCountFn | None = None,
    index_rows: int | None = None,
    mapping_rows: int | None = None,
) -> list[Partition]:
    """The whole run's partitions: blocks of each scale (Morton order), then the label
    indices by body-label range and the mapping by supervoxel range, each planned from the
    source's ``count_keys`` (``index_rows`` / ``mapping_rows`` per partition; None = auto).
    Without ``count_keys`` (a server predating it) each is one partition.

    ``partition_blocks=None`` (auto): ``DEFAULT_PARTITION_BLOCKS`` (4096: measured peak
    worker memory stays well under 1 GiB, and per-partition overhead — a Flight stream, one
    map exchange, a few Parquet files — is amortised), lowered for small volumes so that
    there are about 16 partitions to spread over the workers."""
    scales = [s.scale for s in info.scales] if scales is None else list(scales)
    auto = partition_blocks is None
    target = DEFAULT_PARTITION_BLOCKS if auto else int(partition_blocks)
    parts: list[Partition] = []
    for s in scales:
        si = info.scale(s)
        parts += plan_scale(count, s, si.morton_end, target)
    if auto:
        # small volumes: smaller partitions so every worker gets work (at least ~16
        # partitions, never below MIN_AUTO_PARTITION blocks); big volumes keep the default
        total = sum(p.blocks for p in parts)
        small = max(MIN_AUTO_PARTITION, 1 << max(int(total // 16).bit_length() - 1, 0))
        if small < target:
            parts = []
            for s in scales:
                parts += plan_scale(count, s, info.scale(s).morton_end, small)
    if indices and info.has_indices and 0 in scales:
        parts += _keyed_partitions(count_keys, "indices", index_rows)
    if mapping and info.has_mapping:
        parts += _keyed_partitions(count_keys, "mapping", mapping_rows)
    return parts


def _keyed_partitions(count_keys: KeyCountFn | None, kind: str, target: int | None) -> list[Partition]:
    if count_keys is not None:
        from dvidetl.flight.protocol import TicketError

        try:
            return plan_keys(count_keys, kind, target)
        except TicketError as exc:
            if "count_keys" not in str(exc) and "unknown action" not in str(exc):
                raise
            log.warning("the server cannot count %s keys (%s): exporting %s as one partition",
                        kind, str(exc).splitlines()[0][:200], kind)
    return [Partition(kind, 0, 0, LABEL_END)]


def new_run_id() -> str:
    """Sortable, unique enough: UTC time to the second plus 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


# ---------------------------------------------------------------------------------------------
# tasks (run on the workers)
# ---------------------------------------------------------------------------------------------


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


def _skipped(part: Partition) -> dict:
    return {"key": part.key, "kind": part.kind, "skipped": True, "blocks": 0, "errors": 0,
            "bytes_in": 0, "bytes_out": 0, "rows": 0}


def export_partition(ctx: TaskContext, part: Partition) -> dict:
    """One task: read, transform and commit one partition (or nothing if already committed
    by an earlier attempt). Returns small stats for the driver."""
    from dvidetl.transform import transform_blocks

    t0 = time.perf_counter()
    sink = _sink(ctx)
    if sink.is_done(ctx.run_id, part):
        return _skipped(part)
    client = _client(ctx)
    if part.kind == "blocks":
        grid = tuple(ctx.grids[part.scale] if part.scale in ctx.grids else ctx.grids[str(part.scale)])
        tables, st = transform_blocks(
            client.read_blocks(part.scale, part.lo, part.hi),
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
        stats = {"blocks": st.blocks, "errors": st.errors, "bytes_in": st.bytes_in,
                 "bytes_out": st.bytes_out, "raw_bytes": st.raw_bytes,
                 "seconds": time.perf_counter() - t0}
        if st.errors:
            stats["error_samples"] = _error_samples(tables.get("export_errors"))
    elif part.kind in ("indices", "mapping"):
        tables, stats = _keyed_tables(client, part, ctx)
    else:
        raise ValueError(f"unknown partition kind {part.kind!r}")
    try:
        write_with_backoff(sink, ctx.run_id, part, tables, stats)
    finally:
        close_tables(tables)
        del tables
        release_memory()
    out = dict(stats)
    out["seconds"] = time.perf_counter() - t0
    out.update(key=part.key, kind=part.kind, skipped=False)
    out.setdefault("rows", out.get("blocks", 0))
    return out


def _error_samples(errors, limit: int = 5) -> list[dict]:
    """The first corrupt blocks of a partition (scale, x, y, z, reason) for the dashboard."""
    if errors is None:
        return []
    first = errors if isinstance(errors, pa.Table) else next(iter(errors), None)
    if first is None or first.num_rows == 0:
        return []
    t = first.slice(0, limit * 4).select(["scale", "x", "y", "z", "reason"]) if isinstance(first, pa.Table) \
        else pa.Table.from_batches([first]).slice(0, limit * 4).select(["scale", "x", "y", "z", "reason"])
    out, seen = [], set()
    for r in t.to_pylist():  # a block split over several parts is listed once
        k = (r["scale"], r["x"], r["y"], r["z"])
        if k not in seen and len(out) < limit:
            seen.add(k)
            out.append({**r, "reason": str(r["reason"])[:200]})
    return out


def _keyed_tables(client, part: Partition, ctx: TaskContext) -> tuple[dict, dict]:
    """The label_index rows of a body-label range, or the mapping pairs of a supervoxel
    range, gathered whole before the write (in memory, spilled to the worker's disk past
    ``SPILL_BYTES``) so a failed write is retried from them and the source is read once."""
    from dvidetl.spill import SpillBudget
    from dvidetl.transform import label_index_rows

    t0 = time.perf_counter()
    table = "label_index" if part.kind == "indices" else "mapping"
    spill = SpillBudget().table(table, S.schema(table), _spill_dir())
    nbytes = 0
    try:
        if part.kind == "indices":
            grid0 = tuple(ctx.grids.get(0) or ctx.grids.get("0"))
            for batch in _counted(client.read_indices(part.lo, part.hi), "data"):
                nbytes += batch[1]
                for t in label_index_rows([batch[0]], grid0):
                    spill.append(t)
        else:
            for batch, n in _counted(client.read_mapping(part.lo, part.hi), None):
                nbytes += n
                spill.append(S.conform("mapping", pa.Table.from_batches([batch])))
        result = spill.result()
    except BaseException:
        spill.discard()
        raise
    stats = {"blocks": 0, "errors": 0, "rows": spill.num_rows, "bytes_in": nbytes,
             "bytes_out": spill.nbytes, "seconds": time.perf_counter() - t0}
    return {table: result}, stats


def _counted(batches, data_col: str | None) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Each batch with the bytes it brought (its data column, else the whole batch)."""
    for b in batches:
        yield b, (b.column(data_col).nbytes if data_col else b.nbytes)


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
    import random

    import pyarrow as pa

    replayable = all(isinstance(t, pa.Table) or getattr(t, "replayable", False) for t in tables.values())
    delay = WRITE_BACKOFF_S
    for attempt in range(1, WRITE_TRIES + 1):
        try:
            sink.write_partition(run_id, part, tables, stats)
            return
        except OSError as exc:
            if not replayable or attempt == WRITE_TRIES:
                raise
            log.warning("partition %s: write failed (%s); retry %d/%d in %.1f s", part.key,
                        str(exc).splitlines()[0][:200], attempt, WRITE_TRIES - 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay *= 2


# ---------------------------------------------------------------------------------------------
# the run (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
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

    @property
    def ok(self) -> bool:
        return not self.failed and self.errors == 0 and self.aborted is None


def _interleaved(todo: list[Partition]) -> list[Partition]:
    """Blocks in plan order with the indices and mapping partitions spread evenly among
    them (and the first ones early), so that all kinds run on all workers side by side
    and no kind is left as a long tail at the end."""
    blocks = [p for p in todo if p.kind == "blocks"]
    keyed = [p for p in todo if p.kind != "blocks"]
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


def execute(
    client,
    run: RunInfo,
    ctx: TaskContext,
    sink,
    *,
    progress=None,
    retries: int = 3,
    max_errors: int | None = None,
    window: int | None = None,
    dashboard=None,
) -> RunResult:
    """Submit every not-yet-committed partition of ``run`` (bounded window), follow
    completions, and return totals. Partitions already in the ledger are skipped."""
    from distributed import as_completed

    t0 = time.perf_counter()
    res = RunResult(run.run_id, partitions=len(run.partitions))
    done_keys = sink.done(run.run_id)
    todo = [p for p in run.partitions if p.key not in done_keys]
    todo = _interleaved(todo)
    res.skipped = len(run.partitions) - len(todo)
    if res.skipped:
        prev = sink.ledger(run.run_id)
        if prev.num_rows:
            import pyarrow.compute as pc

            isb = pc.equal(prev.column("kind"), "blocks")
            res.blocks += int(pc.sum(pc.filter(prev.column("blocks"), isb)).as_py() or 0)
            res.errors += int(pc.sum(prev.column("errors")).as_py() or 0)
            res.bytes_in += int(pc.sum(pc.filter(prev.column("bytes_in"), isb)).as_py() or 0)
            res.bytes_out += int(pc.sum(pc.filter(prev.column("bytes_out"), isb)).as_py() or 0)
            for kind, attr in (("indices", "index_rows"), ("mapping", "mapping_rows")):
                rows = pc.filter(prev.column("rows"), pc.equal(prev.column("kind"), kind))
                setattr(res, attr, int(pc.sum(rows).as_py() or 0))
    if dashboard is not None:
        dashboard.skipped([p for p in run.partitions if p.key in done_keys])
        dashboard.publish(res, force=True)
    if progress is not None:
        progress.start(total_blocks=sum(p.blocks for p in run.partitions),
                       done_blocks=res.blocks, total_parts=len(run.partitions), done_parts=res.skipped)
    if window is None:
        nthreads = sum(client.nthreads().values()) or 1
        window = max(8, 4 * nthreads)
    ctx_f = ctx
    pending = iter(todo)
    ac = as_completed()
    futs = {}

    def submit_next() -> bool:
        p = next(pending, None)
        if p is None:
            return False
        f = client.submit(export_partition, ctx_f, p, key=f"export-{run.run_id}-{p.key}-{os.urandom(2).hex()}",
                          retries=retries, pure=False)
        futs[f.key] = p
        ac.add(f)
        return True

    for _ in range(window):
        if not submit_next():
            break
    stop = False
    for fut in ac:
        part = futs.pop(fut.key)
        try:
            st = fut.result()
        except Exception as exc:  # noqa: BLE001 — a failed partition is reported, not fatal
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            res.failed.append((part.key, reason))
            log.error("partition %s failed after %d retries: %s", part.key, retries, reason)
            if dashboard is not None:
                dashboard.completed(part, None, res, failure=reason)
        else:
            if st.get("skipped"):
                res.skipped += 1
            else:
                res.done += 1
                if part.kind == "blocks":
                    res.blocks += int(st.get("blocks", 0))
                    res.bytes_in += int(st.get("bytes_in", 0))
                    res.bytes_out += int(st.get("bytes_out", 0))
                    res.raw_bytes += int(st.get("raw_bytes", 0))
                elif part.kind == "indices":
                    res.index_rows += int(st.get("rows", 0))
                elif part.kind == "mapping":
                    res.mapping_rows += int(st.get("rows", 0))
                res.errors += int(st.get("errors", 0))
            if dashboard is not None:
                dashboard.completed(part, st, res)
        finally:
            fut.release()
        if progress is not None:
            progress.update(part, res)
        if max_errors is not None and res.errors > max_errors and not stop:
            res.aborted = f"more than {max_errors} block errors ({res.errors})"
            stop = True
        if not stop:
            submit_next()
    res.seconds = time.perf_counter() - t0
    if dashboard is not None:
        dashboard.finish(res)
    if progress is not None:
        progress.finish(res)
    return res


# ---------------------------------------------------------------------------------------------
# the Flight endpoint a command talks to (given, or the embedded reference server)
# ---------------------------------------------------------------------------------------------


def add_flight_arguments(parser) -> None:
    """--uuid / --instance / --flight / --token-file, shared by run, plan, verify, inspect."""
    parser.add_argument("--uuid", required=True, help="version UUID to export (embedded default: synthetic volume name, e.g. demo)")
    parser.add_argument("--instance", default=None, help="labelmap instance (default: the server's)")
    parser.add_argument(
        "--flight", default=None, metavar="grpc://HOST:PORT",
        help="Flight server; without it an in-process reference server over synthetic://UUID is started",
    )
    parser.add_argument("--token-file", default=None, help="file holding the server's bearer token")
    parser.add_argument(
        "--source", default=None, metavar="URL",
        help="what the embedded server serves (default synthetic://UUID); not used with --flight",
    )
    parser.add_argument(
        "--serve-host", default="127.0.0.1", metavar="ADDR",
        help="address the embedded server binds (default 127.0.0.1); 0.0.0.0 lets workers on "
             "other nodes reach it (advertised under this host's name); not used with --flight",
    )


def read_token(path: str | None) -> str | None:
    """The bearer token from a file (never from argv), else env ``DVIDETL_FLIGHT_TOKEN``
    (as docs/flight-protocol.md promises); a missing file is a UserError."""
    if not path:
        from dvidetl.flight.client import load_token

        return load_token()
    from dvidetl.errors import UserError

    try:
        tok = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise UserError(f"cannot read --token-file {path!r}: {exc.strerror}") from None
    if not tok:
        raise UserError(f"--token-file {path!r} is empty")
    return tok


class FlightEndpoint:
    """A Flight location (+ token) and a driver-side client; the embedded server if any."""

    def __init__(self, location: str, token: str | None, uuid: str, instance: str | None,
                 server=None, source=None):
        from dvidetl.flight.client import FlightClient

        self.source = source
        self.location = location
        self.token = Secret(token)
        self.server = server
        self.uuid = uuid
        self.client = FlightClient(location, token=token, uuid=uuid, instance=instance)
        self.info = self.client.info()
        self.instance = instance or self.info.instance

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
        if self.server is not None:
            self.server.stop()
        if self.source is not None:
            self.source.close()


def open_flight(args) -> FlightEndpoint:
    """The endpoint the options name: ``--flight`` or the embedded reference server over
    ``synthetic://<uuid>`` (or ``--source``), bound to ``--serve-host`` — loopback by default,
    which only workers on this node can reach; a wildcard bind is advertised under this
    host's fully qualified name so SLURM workers on other nodes can connect."""
    import socket

    from dvidetl.errors import UserError

    token = read_token(getattr(args, "token_file", None))
    server = source = None
    location = args.flight
    if location is None:
        from dvidetl.flight.server import start_server
        from dvidetl.sources import open_source

        host = getattr(args, "serve_host", None) or "127.0.0.1"
        source = open_source(getattr(args, "source", None) or f"synthetic://{args.uuid}")
        try:
            server = start_server(source, host=host, port=0, token=token)
        except Exception as exc:  # noqa: BLE001 - a bad bind address is the user's to fix
            source.close()
            raise UserError(f"--serve-host {host!r}: cannot listen there ({exc})") from None
        location = server.location
        if host in ("0.0.0.0", "::", "[::]"):
            location = f"grpc://{socket.getfqdn()}:{server.port}"
    elif not location.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")):
        raise UserError(f"--flight {location!r}: expected grpc://HOST:PORT or grpc+tls://HOST:PORT")
    from dvidetl.flight.client import FlightUnavailable

    try:
        return FlightEndpoint(location, token, args.uuid, args.instance, server, source)
    except Exception as exc:
        if server is not None:
            server.stop()
        if source is not None:
            source.close()
        if isinstance(exc, FlightUnavailable):  # nothing listening / wrong --flight
            raise UserError(f"{str(exc).splitlines()[0]} (is a Flight server running there? "
                            "check --flight)") from None
        raise
