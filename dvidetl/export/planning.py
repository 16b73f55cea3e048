"""Planning: an export's partitions from the counts a source answers cheaply.

Pure functions over ``count`` (blocks per Morton cell) and ``count_keys`` (labels /
supervoxels and their rows per key cell) answers: no blocks, labels or index values are
read, and memory is bounded by the number of non-empty cells asked about, never by the
volume. The same counts always give the same plan.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dvidetl.errors import UserError, first_line
from dvidetl.export.kinds import KINDS, Partition
from dvidetl.export.options import RunOptions
from dvidetl.geometry import KEY_END, VolumeInfo
from dvidetl.sources.base import KeyCounts

if TYPE_CHECKING:
    from dvidetl.export.endpoint import FlightEndpoint

log = logging.getLogger(__name__)

DEFAULT_PARTITION_BLOCKS = 4096
MIN_AUTO_PARTITION = 128
#: auto sizing never cuts keyed tables finer than this many rows per partition
MIN_AUTO_ROWS = 16_384
#: a count_keys request refines one cell into at most 2**KEY_FAN_BITS child cells
KEY_FAN_BITS = 16

CountFn = Callable[[int, int], tuple[np.ndarray, np.ndarray, bool]]
#: count_keys(kind, cell_bits, lo, hi) -> KeyCounts (see sources.base.Source.count_keys)
KeyCountFn = Callable[[str, int, int, int], KeyCounts]




def plan_scale(
    count: CountFn, scale: int, morton_end: int, target: int, *, start_cell_bits: int | None = None
) -> list[Partition]:
    """Partitions of about ``target`` blocks covering every non-empty cell of one scale.

    ``count(scale, cell_bits)`` answers blocks per aligned cell ``morton >> cell_bits`` (only
    non-empty cells need be listed). By default ONE count call with the ``cell_bits`` whose cells hold
    at most ``target`` block slots (a source's count is a full pass over its index, so the
    number of calls matters more than their size). A cell still holding more than ``target``
    blocks (a coarser ``start_cell_bits``, or a source over-reporting) is replaced by its children
    with finer cells (``cell_bits`` 3 lower per round). Empty cells are dropped, then Morton-consecutive
    cells are merged greedily into partitions (cumulative sum, vectorized). Deterministic:
    the same counts give the same plan. Memory is bounded by the number of non-empty cells
    (<= blocks, and <= slots / 2**cell_bits), never by the blocks themselves.
    """
    if target < 1:
        raise ValueError(f"partition size must be at least 1 block (got {target})")
    total_bits = max(int(morton_end).bit_length() - 1, 0)
    fine = min(max(int(target).bit_length() - 1, 0), total_bits)  # 2**fine <= target
    cell_bits = fine if start_cell_bits is None else min(max(int(start_cell_bits), 0), total_bits)
    lo, hi, cnt = _cells(count, scale, cell_bits)
    while cell_bits > 0:
        heavy = cnt > target
        if not heavy.any():
            break
        nxt = max(cell_bits - 3, fine) if cell_bits > fine else cell_bits - 1
        flo, fhi, fcnt = _cells(count, scale, nxt)
        parents = flo >> np.uint64(cell_bits)
        heavy_ids = np.unique(lo[heavy] >> np.uint64(cell_bits))
        sel = np.isin(parents, heavy_ids)
        keep = ~heavy
        lo = np.concatenate([lo[keep], flo[sel]])
        hi = np.concatenate([hi[keep], fhi[sel]])
        cnt = np.concatenate([cnt[keep], fcnt[sel]])
        order = np.argsort(lo, kind="stable")
        lo, hi, cnt = lo[order], hi[order], cnt[order]
        cell_bits = nxt
    return merge_cells(scale, lo, hi, cnt, target, morton_end)


def plan_shards(count: CountFn, scale: int, morton_end: int, cell_bits: int) -> list[Partition]:
    """One partition per non-empty aligned Morton cell of 2^``cell_bits`` blocks: what a sink
    that writes one file per aligned box needs (``Sink.plan_cells``: a neuroglancer shard
    with identity hash is such a cell). One count call; empty cells are not planned, and a
    partition never straddles two cells."""
    lo, hi, cnt = _cells(count, scale, int(cell_bits))
    his = np.minimum(hi, np.uint64(morton_end))
    return [Partition("blocks", int(scale), int(a), int(b), int(c))
            for a, b, c in zip(lo.tolist(), his.tolist(), cnt.tolist(), strict=True)]


def combine_cells(wants: Sequence[Mapping[int, int]]) -> dict[int, int]:
    """The cells of several sinks' ``plan_cells`` (one dict of scale -> cell bits each): a
    scale two sinks want cut at different cells cannot be planned for both."""
    out: dict[int, int] = {}
    for w in wants:
        for s, b in w.items():
            if out.setdefault(int(s), int(b)) != int(b):
                raise UserError(f"the sinks of the run want scale {s} cut into Morton cells of 2^{out[int(s)]} "
                                f"and 2^{b} blocks: give them the same shard size, or export them apart")
    return out


def _cells(count: CountFn, scale: int, cell_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells, counts, _exact = count(scale, cell_bits)
    cells = np.asarray(cells, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    if cells.shape != counts.shape:
        raise ValueError(f"count(scale={scale}, cell_bits={cell_bits}) returned mismatched arrays")
    nz = counts > 0
    cells, counts = cells[nz], counts[nz]
    order = np.argsort(cells, kind="stable")
    cells, counts = cells[order], counts[order]
    if len(cells) > 1 and np.any(cells[1:] == cells[:-1]):
        raise ValueError(f"count(scale={scale}, cell_bits={cell_bits}) listed a cell twice")
    sh = np.uint64(cell_bits)
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
    ``target``, as ``merge_cells`` does), covering ``[0, KEY_END - 1)`` without gaps so that a
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
        ends = [*self.bounds[1:], KEY_END - 1]
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
    holds a label list — memory is one answer per round plus the partitions — and the
    answers total ~64 cells per partition and round. ``target=None``: the kind's ``default_rows``, lowered
    for small tables to give about ``auto_parts`` partitions (never below ``auto_min``)."""
    top = 64 - KEY_FAN_BITS
    first = count_keys(kind, top, 0, KEY_END)
    if target is None:
        total = int(np.asarray(first.rows, np.int64).sum())
        default = KINDS[kind].default_rows
        if kind == "anomalies":
            auto_min = default  # a handful of rows: never spread over the workers
        target = min(default, max(auto_min, -(-total // auto_parts)))
    if target < 1:
        raise ValueError(f"{kind} partition size must be at least 1 row (got {target})")
    out = _KeyRanges(kind, target)

    fine = max(target // 8, 1)  # cells are cut to at most this, so a partition is <= 1.125 x target

    def visit(cell_bits: int, answer) -> None:
        cells = np.asarray(answer.cells, np.uint64)
        rows = np.asarray(answer.rows, np.int64)
        keys = np.asarray(answer.keys, np.int64)
        nz = (rows > 0) | (keys > 0)
        cells, rows, keys = cells[nz], np.maximum(rows[nz], 1), keys[nz]
        if len(cells) > 1 and not bool(np.all(cells[1:] > cells[:-1])):
            raise ValueError(f"count_keys({kind}, cell_bits={cell_bits}) cells are not ascending and unique")
        lo = cells << np.uint64(cell_bits) if cell_bits < 64 else np.zeros(len(cells), np.uint64)
        coarse = np.flatnonzero((rows > fine) & (keys > 1)) if cell_bits > 0 else np.zeros(0, np.int64)
        start = 0
        for h in coarse.tolist():
            out.add(lo[start:h], rows[start:h])
            # enough child cells for ~64 per target's worth of rows, at most 2**KEY_FAN_BITS
            bits = min(KEY_FAN_BITS, max(1, int(np.ceil(np.log2(64 * int(rows[h]) / target)))), cell_bits)
            nxt = cell_bits - bits
            c_lo = int(lo[h])
            c_hi = min(c_lo + (1 << cell_bits), KEY_END)
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
    anomalies: bool = True,
    cells: Mapping[int, int] | None = None,
) -> list[Partition]:
    """The whole run's partitions: blocks of each scale (Morton order), then the label
    indices by body-label range and the mapping by supervoxel range, each planned from the
    source's ``count_keys`` (``index_rows`` / ``mapping_rows`` per partition; None = auto),
    and the source's anomalies (by number; none when it reports none), which every run
    stores. Without ``count_keys`` (a server predating it) indices and mapping are one
    partition each, and no anomalies are stored.

    ``partition_blocks=None`` (auto): ``DEFAULT_PARTITION_BLOCKS`` (4096: measured peak
    worker memory stays well under 1 GiB, and per-partition overhead — a Flight stream, a map
    exchange per 8 MiB group of blocks, a few Parquet files — is amortised), lowered for small volumes so that
    there are about 16 partitions to spread over the workers.

    ``cells`` (scale -> bits, from the run's sinks' ``Sink.plan_cells``): those scales are cut
    into exactly one partition per non-empty aligned Morton cell of 2^bits blocks
    (``plan_shards``: one neuroglancer shard each), whatever ``partition_blocks`` says."""
    scales = [s.scale for s in info.scales] if scales is None else list(scales)
    cells = dict(cells or {})
    auto = partition_blocks is None
    target = DEFAULT_PARTITION_BLOCKS if partition_blocks is None else int(partition_blocks)

    def plan(s: int, size: int) -> list[Partition]:
        end = info.scale(s).morton_end
        return plan_shards(count, s, end, cells[s]) if s in cells else plan_scale(count, s, end, size)

    parts: list[Partition] = []
    for s in scales:
        parts += plan(s, target)
    if auto and any(s not in cells for s in scales):
        # small volumes: smaller partitions so every worker gets work (at least ~16
        # partitions, never below MIN_AUTO_PARTITION blocks); big volumes keep the default
        total = sum(p.blocks for p in parts)
        small = max(MIN_AUTO_PARTITION, 1 << max(int(total // 16).bit_length() - 1, 0))
        if small < target:
            parts = []
            for s in scales:
                parts += plan(s, small)
    if indices and info.has_indices and 0 in scales:
        parts += _keyed_partitions(count_keys, "indices", index_rows)
    if mapping and info.has_mapping:
        parts += _keyed_partitions(count_keys, "mapping", mapping_rows)
    if anomalies:
        parts += _anomaly_partitions(count_keys)
    return parts


def _anomaly_partitions(count_keys: KeyCountFn | None) -> list[Partition]:
    """Partitions of the source's anomalies (none when it reports none). A server that
    cannot count them predates them: it has none to report, said once in the log."""
    if count_keys is None:
        return []
    from dvidetl.flight.protocol import TicketError

    try:
        return plan_keys(count_keys, "anomalies", None)
    except TicketError as exc:
        log.warning("the server reports no source anomalies (%s): none stored with the run",
                    first_line(exc))
        return []


def _keyed_partitions(count_keys: KeyCountFn | None, kind: str, target: int | None) -> list[Partition]:
    if count_keys is not None:
        from dvidetl.flight.protocol import TicketError

        try:
            return plan_keys(count_keys, kind, target)
        except TicketError as exc:
            if "count_keys" not in str(exc) and "unknown action" not in str(exc):
                raise
            log.warning("the server cannot count %s keys (%s): exporting %s as one partition",
                        kind, first_line(exc), kind)
    return [Partition(kind, 0, 0, KEY_END - 1)]


def new_run_id(after: Iterable[str] = ()) -> str:
    """A run id: UTC time to the microsecond plus 6 random hex digits, sorting after every
    id in ``after`` (the runs the sinks hold). Why: a sink's runs sort by id and the newest
    is the export plain readers see, so a new run must sort last even when the clock says
    otherwise — two runs started in one second (ids were made to the second), a driver
    whose clock is behind the one that wrote the last run. Ids of the older form
    (``YYYYmmddTHHMMSSZ-xxxxxx``) are passed by a whole second."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    last = max(after, default="")
    if _run_id(now) <= last:
        stamp = datetime.datetime.strptime(last[:15], "%Y%m%dT%H%M%S")
        micro = last[15:21]
        if len(micro) == 6 and micro.isdigit():
            now = stamp + datetime.timedelta(microseconds=int(micro) + 1)
        else:  # the older form, to the second: its micro part would sort before its 'Z'
            now = stamp + datetime.timedelta(seconds=1)
    return _run_id(now)


def _run_id(t: datetime.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S%fZ-") + os.urandom(3).hex()


#: the deadline of the planning calls: the Flight client's own (60 s) plus this per block the
#: counts found — a generated volume builds its label indices in ~4 ms CPU per block, a
#: loaded machine and the first numba compile take several times that
PLAN_S_PER_BLOCK = 0.02


def check_scales(options: RunOptions, info: VolumeInfo) -> None:
    """The scales asked for exist in the volume (a one-line error naming the flag)."""
    have = [s.scale for s in info.scales]
    missing = [s for s in options.scales or () if s not in have]
    if missing:
        raise UserError(f"--scales {','.join(map(str, options.scales or ()))}: scales {missing} "
                        f"not in the volume (has {have})")


class Planning:
    """The planning phase of ``plan`` and ``run``: the counts through the endpoint's Flight
    client (deadlines that grow with the volume), what it is doing now (:attr:`doing`, for
    the status line and the dashboard), and how long it took. :meth:`start` runs it in a
    daemon thread, so a Ctrl-C never waits for a server that is still counting."""

    def __init__(self, ep: FlightEndpoint, options: RunOptions, *, cells: Mapping[int, int] | None = None,
                 anomalies: bool = True):
        self.ep, self.options = ep, options
        self.cells, self.anomalies = dict(cells or {}), anomalies
        self.doing = "asking the server for counts"
        self.t0 = time.monotonic()
        self.seconds: float | None = None
        self.blocks = 0  # counted so far (for the scaled deadline)
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def deadline(self) -> float:
        """The deadline of the next count: ``--plan-timeout``, else the client's plus
        ``PLAN_S_PER_BLOCK`` for every block counted so far."""
        fixed = self.options.plan_timeout
        if fixed is not None:
            return float(fixed)
        return float(self.ep.client.timeout) + PLAN_S_PER_BLOCK * self.blocks

    def _count(self, scale: int, cell_bits: int):
        self.doing = f"counting the blocks of scale {scale}"
        got = self.ep.client.count(scale, cell_bits, timeout=self.deadline())
        # the largest scale's count (scale 0): what building the label indices costs
        self.blocks = max(self.blocks, int(np.asarray(got[1], np.int64).sum()))
        return got

    def _count_keys(self, kind: str, cell_bits: int, lo: int, hi: int):
        self.doing = ("counting label-index rows (the first count makes the source read its label "
                      "indices; a generated volume builds them)" if kind == "indices"
                      else "counting mapping pairs")
        return self.ep.client.count_keys(kind, cell_bits, lo, hi, timeout=self.deadline())

    def run(self) -> list[Partition]:
        """The partitions (synchronously); a deadline passed is a one-line error naming the
        option that gives more time."""
        from dvidetl.flight.client import FlightUnavailable

        o = self.options
        try:
            parts = make_plan(self.ep.info, self._count, None if o.scales is None else list(o.scales),
                              o.partition_blocks, indices=o.indices, mapping=o.mapping,
                              count_keys=self._count_keys, index_rows=o.index_partition_rows,
                              mapping_rows=o.mapping_partition_rows, anomalies=self.anomalies,
                              cells=self.cells)
        except FlightUnavailable as exc:
            from dvidetl.errors import first_line

            raise UserError(f"planning failed while {self.doing}: {first_line(exc, 300)} — if the "
                            f"server is just slow, give it longer: --plan-timeout SECONDS "
                            f"(was {self.deadline():.0f} s)") from None
        finally:
            self.seconds = time.monotonic() - self.t0
        return parts

    def start(self) -> Planning:
        def go():
            try:
                self._result = self.run()
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                self._error = exc
            finally:
                self._done.set()

        self.t0 = time.monotonic()
        threading.Thread(target=go, daemon=True, name="dvidetl-plan").start()
        return self

    def wait(self, tick=None, every: float = 0.5):
        """The plan of :meth:`start`, calling ``tick()`` every ``every`` seconds meanwhile
        (status line, dashboard). Interruptible: Ctrl-C is not held up by the server."""
        while not self._done.wait(every):
            if tick is not None:
                tick()
        if self._error is not None:
            raise self._error
        return self._result
