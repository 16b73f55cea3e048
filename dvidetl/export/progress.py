"""The live progress line, the rate and ETA behind it (shared with the dashboard page), and
the end-of-run summary.

Honest numbers: the counts include what running partitions have already streamed (workers
report it every ~second, ``tasks.ProgressReporter``), not only committed partitions, so the
line moves within a partition; the rate is the recent one (the last ``RATE_WINDOW_S``
seconds), not an average since start that warm-up and planning drag down; the ETA is what
is left divided by that rate, per kind of work (blocks, label_index rows, mapping pairs),
the slowest kind deciding. On a terminal the line is redrawn in place (``\\r``); otherwise
(logs, CI) a plain line is printed every ``interval`` seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from dvidetl.redact import redact

# Imports inside functions load the plugin registry's entry points, NumPy/Arrow only where used:
# importing this module must not (CLI start-up, processes that never call them).

#: the rate is measured over this many recent seconds
RATE_WINDOW_S = 20.0
#: no rate (and no ETA) before this much of a window has been seen
MIN_RATE_SPAN_S = 2.0


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _dur(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):  # unknown / nan / inf
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class RecentRate:
    """Units per second over the last ``window`` seconds of (time, cumulative count) samples."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, float(value)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """None until ``MIN_RATE_SPAN_S`` of samples exist."""
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_RATE_SPAN_S:
            return None
        return max(v1 - v0, 0.0) / (t1 - t0)


@dataclass
class Counts:
    """Work in the units progress is told in: how far the run is (committed plus what running
    partitions have streamed so far), or what the plan holds (:meth:`of_plan`: the planner's
    estimates)."""

    blocks: int = 0
    index_rows: int = 0
    mapping_rows: int = 0
    bytes_in: int = 0
    errors: int = 0
    parts: int = 0

    @classmethod
    def of_plan(cls, partitions) -> Counts:
        out = cls(parts=len(partitions))
        for p in partitions:
            counter = p.spec.counter
            if counter is not None:
                setattr(out, counter, getattr(out, counter) + p.size)
        return out


class Estimator:
    """Recent rates per kind of work and the ETA from what is left (one for the terminal
    line, one for the dashboard page: same arithmetic)."""

    KINDS = ("blocks", "index_rows", "mapping_rows")

    def __init__(self, planned: Counts, window: float = RATE_WINDOW_S):
        self.planned = planned
        self.rates = {k: RecentRate(window) for k in self.KINDS}

    def sample(self, done: Counts, now: float | None = None) -> None:
        for k in self.KINDS:
            self.rates[k].add(getattr(done, k), now)

    def rate(self, kind: str = "blocks") -> float | None:
        return self.rates[kind].rate()

    def eta(self, done: Counts) -> float | None:
        """Seconds left: per kind, what is left over its recent rate; the slowest kind. None
        while no kind with work left has a rate yet; 0 when nothing is left."""
        worst, unknown = 0.0, False
        for k in self.KINDS:
            left = max(getattr(self.planned, k) - getattr(done, k), 0)
            if not left:
                continue
            r = self.rates[k].rate()
            if not r:
                unknown = True
                continue
            worst = max(worst, left / r)
        if unknown and worst == 0.0:
            return None
        return worst


class Progress:
    """One line: partitions, blocks (and rows) done of planned, MB read, recent rate, ETA.

    ``update(done)`` may be called from any thread (the driver's ticker)."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None, *,
                 label: str = ""):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 5.0)
        self.label = label
        self._last = 0.0
        self._lock = threading.Lock()
        self.est = Estimator(Counts())

    def start(self, planned: Counts) -> None:
        self.est = Estimator(planned)

    def line(self, done: Counts) -> str:
        pl = self.est.planned
        pct = 100.0 * done.blocks / pl.blocks if pl.blocks else 100.0
        rate = self.est.rate("blocks")
        rows = ""
        if pl.index_rows or pl.mapping_rows:
            rows = (f"  rows {done.index_rows + done.mapping_rows:,}/"
                    f"~{pl.index_rows + pl.mapping_rows:,}")
        return (
            f"{self.label}[{done.parts}/{pl.parts} partitions] {done.blocks:,}/{pl.blocks:,} blocks "
            f"({pct:5.1f}%){rows}  {_mb(done.bytes_in)} read  "
            f"{'--' if rate is None else f'{rate:,.0f}'} blocks/s (last {RATE_WINDOW_S:.0f} s)  "
            f"errors {done.errors}  ETA {_dur(self.est.eta(done))}"
        )

    def update(self, done: Counts, force: bool = False) -> None:
        with self._lock:
            self.est.sample(done)
            now = time.monotonic()
            if not force and now - self._last < self.interval:
                return
            self._last = now
            if self.tty:
                self.stream.write("\r\x1b[2K" + self.line(done))
            else:
                self.stream.write(self.line(done) + "\n")
            self.stream.flush()

    def finish(self, done: Counts) -> None:
        self.update(done, force=True)
        if self.tty:
            with self._lock:
                self.stream.write("\n")
                self.stream.flush()


def not_exported_line(not_exported: dict) -> str:
    """``label_index, mapping not exported: WHY`` from a run record's ``not_exported``."""
    names = {"indices": "label_index", "mapping": "mapping"}
    why = next(iter(not_exported.values())).removeprefix("not exported: ")
    return f"{', '.join(names.get(k, k) for k in not_exported)} not exported: {why}"


def removed_line(rm: dict | None) -> str | None:
    """What a run's finish removed (``removed_at_finish``), in words; None when nothing."""
    rm = rm or {}
    if not (rm.get("outside") or rm.get("temp_files")):
        return None
    return (f"at finish: {rm.get('outside', 0):,} stray file(s)/range(s) outside the run's partitions "
            f"({rm.get('outside_rows', 0):,} rows), {rm.get('temp_files', 0):,} temporary file(s) of "
            f"killed writers ({rm.get('temp_bytes', 0):,} bytes)")


def summary(res, *, sink_desc: str = "", planning_s: float | None = None,
            index_note: str | None = None, not_exported: dict | None = None) -> str:
    """The end-of-run summary (several lines). The byte figures say what they measure: what
    was read from the source (blocks as served: usually gzip), the raw DVID block bytes that
    is (uncompressed, what a reader reconstructs), and what was written (zstd payloads plus
    the label lists); the ratio is raw over written. ``index_note``: why there is no
    label_index (a source without indices) instead of a bare "0 rows"; ``anomalies``: what
    the source found wrong in its input (stored in ``source_anomalies``); ``not_exported``:
    the kinds no sink of the run stores (the run record's, e.g. a precomputed-only run)."""
    from dvidetl.sources.base import anomaly_summary

    export_s = res.seconds
    total_s = export_s + (planning_s or 0.0)
    rate = res.blocks / export_s if export_s > 0 else 0.0
    index = index_note if index_note else f"{getattr(res, 'index_rows', 0):,} label_index"
    lines = [
        f"run {res.run_id}" + (f" -> {redact(sink_desc)}" if sink_desc else ""),
        f"  partitions  {res.partitions:,} planned, {res.done:,} written now, {res.skipped:,} already done, "
        f"{len(res.failed):,} failed",
        f"  blocks      {res.blocks:,}",
        (f"  rows        {not_exported_line(not_exported)}" if not_exported else
         f"  rows        {index}, {getattr(res, 'mapping_rows', 0):,} mapping"),
        f"  read        {_mb(res.bytes_in)} of blocks as the source served them (compressed)",
    ]
    # part of a resumed run committed by a dvidetl that kept no raw sizes: no honest ratio
    partial = getattr(res, "raw_partial", False)
    if res.raw_bytes:
        lines.append(f"  raw         {_mb(res.raw_bytes)} of DVID block bytes (uncompressed DVID format)"
                     + (" in the partitions that recorded it" if partial else ""))
    out = f"  written     {_mb(res.bytes_out)} (zstd block payloads + uncompressed label lists)"
    if res.raw_bytes and res.bytes_out and not partial:
        out += f": {res.raw_bytes / res.bytes_out:.2f}x smaller than the raw DVID bytes"
    removed = removed_line(getattr(res, "removed_at_finish", None))
    lines += [
        out,
        f"  errors      {res.errors:,} blocks in export_errors",
        *([f"  removed     {removed}"] if removed else []),
        *([f"  anomalies   {anomaly_summary(res.anomalies, res.lost)} -> source_anomalies"]
          if getattr(res, "anomalies", None) else []),
        "  time        " + (f"planning {_dur(planning_s)} ({planning_s:.1f} s), " if planning_s is not None else "")
        + f"export {_dur(export_s)} ({export_s:.1f} s, {rate:,.0f} blocks/s on average), "
        f"total {_dur(total_s)}",
    ]
    sinks = getattr(res, "sinks", None) or []
    if len(sinks) > 1:  # each sink's own figures: what it holds of the run now
        lines.append(f"  sinks       {len(sinks)}, each with its own ledger and record of the run:")
        for r in sinks:
            state = "complete" if r.complete else f"INCOMPLETE: {len(r.failed):,} partitions failed there"
            if not r.complete and not r.failed:
                state = f"INCOMPLETE: {r.partitions - r.done - r.skipped:,} partitions not written"
            lines.append(
                f"    {redact(r.sink)}: {r.done + r.skipped:,}/{r.partitions:,} partitions ({r.done:,} "
                f"written now, {r.skipped:,} already there), "
                + (f"its ledger could not be read back ({r.unreadable})" if r.unreadable else
                   f"{r.blocks:,} blocks, {r.index_rows:,} label_index, {r.mapping_rows:,} mapping, "
                   f"{_mb(r.bytes_out)} written")
                + f"; {state}")
    for key, reason in res.failed[:10]:
        lines.append(f"  FAILED {key}: {redact(reason)}")
    if len(res.failed) > 10:
        lines.append(f"  ... and {len(res.failed) - 10} more failed partitions")
    if res.aborted:
        lines.append(f"  ABORTED: {redact(res.aborted)}")
    return "\n".join(lines)
