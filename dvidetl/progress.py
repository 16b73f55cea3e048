"""The live progress line and the end-of-run summary.

Driven by task completions (the driver's ``as_completed`` loop calls ``update``), so it
costs nothing on the workers. On a terminal the line is redrawn in place (``\\r``) at most a
few times a second; otherwise (logs, CI) a plain line is printed every ``interval`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _dur(s: float) -> str:
    if s != s or s == float("inf"):  # nan / inf
        return "--:--"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Blocks and MB done, rate, ETA — one line."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self._last = 0.0
        self.t0 = time.perf_counter()
        self.total_blocks = 0
        self.base_blocks = 0
        self.total_parts = 0
        self.parts_done = 0

    def start(self, *, total_blocks: int, done_blocks: int, total_parts: int, done_parts: int) -> None:
        self.t0 = time.perf_counter()
        self.total_blocks = total_blocks
        self.base_blocks = done_blocks
        self.total_parts = total_parts
        self.parts_done = done_parts

    def line(self, res) -> str:
        el = max(time.perf_counter() - self.t0, 1e-9)
        new = res.blocks - self.base_blocks
        rate = new / el
        left = max(self.total_blocks - res.blocks, 0)
        eta = left / rate if rate > 0 else float("inf")
        pct = 100.0 * res.blocks / self.total_blocks if self.total_blocks else 100.0
        parts = res.done + res.skipped + len(res.failed)
        return (
            f"[{parts}/{self.total_parts} partitions] {res.blocks:,}/{self.total_blocks:,} blocks "
            f"({pct:5.1f}%)  {_mb(res.bytes_in)} in  {rate:,.0f} blocks/s  "
            f"{res.bytes_in / el / 1e6:,.1f} MB/s  errors {res.errors}  ETA {_dur(eta)}"
        )

    def update(self, part, res, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(res))
        else:
            self.stream.write(self.line(res) + "\n")
        self.stream.flush()

    def finish(self, res) -> None:
        self.update(None, res, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def summary(res, *, sink_desc: str = "") -> str:
    """The end-of-run summary (several lines)."""
    ratio = (res.raw_bytes / res.bytes_out) if res.bytes_out and res.raw_bytes else 0.0
    if getattr(res, "raw_partial", False):
        ratio = 0.0  # part of the run was committed without raw sizes: no honest ratio
    rate = res.blocks / res.seconds if res.seconds > 0 else 0.0
    lines = [
        f"run {res.run_id}" + (f" -> {sink_desc}" if sink_desc else ""),
        f"  partitions  {res.partitions:,} planned, {res.done:,} written now, {res.skipped:,} already done, "
        f"{len(res.failed):,} failed",
        f"  blocks      {res.blocks:,}",
        f"  rows        {getattr(res, 'index_rows', 0):,} label_index, {getattr(res, 'mapping_rows', 0):,} mapping",
        f"  bytes in    {_mb(res.bytes_in)} (as served)   out {_mb(res.bytes_out)} (zstd payloads + lists)"
        + (f"   compression {ratio:.2f}x of raw DVID blocks" if ratio else ""),
        f"  errors      {res.errors:,} blocks in export_errors",
        f"  wall time   {_dur(res.seconds)} ({res.seconds:.1f} s), {rate:,.0f} blocks/s",
    ]
    for key, reason in res.failed[:10]:
        lines.append(f"  FAILED {key}: {reason}")
    if len(res.failed) > 10:
        lines.append(f"  ... and {len(res.failed) - 10} more failed partitions")
    if res.aborted:
        lines.append(f"  ABORTED: {res.aborted}")
    return "\n".join(lines)
