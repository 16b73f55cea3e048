"""``flaky+parquet://DIR?rate=R&fails=K&seed=S&poison=SCALE:MORTON&mode=M`` — a Parquet sink
that fails on purpose, for the fault-injection suite (tests/faults).

Why a wrapper and not a mock: the export runs unchanged on real Dask workers against the
real Parquet sink; only ``write_partition`` is made to fail, the way a flaky file system or
object store would. The wrapper is opened by URL on every worker like any sink (the scheme
is registered through ``DVIDETL_EXTRA_SINKS``, ``dvidetl.registry``), so faults happen inside real tasks and are retried
by the real scheduler.

Which writes fail is deterministic, so a test can assert exact outcomes:

* ``rate`` — the fraction of partitions (chosen by a hash of ``seed`` and the partition key)
  whose first ``fails`` attempts (default 1) raise ``OSError(EIO)``. Attempts are counted in
  files under ``DIR/.faults/`` so they add up across worker processes and retries.
* ``poison=SCALE:MORTON`` — the block partition holding that block fails on every attempt
  (``poison`` may repeat). Such a partition must be reported by the run, never dropped.
* ``mode`` — where an attempt fails: ``before`` (nothing written), ``mid`` (the data files
  are written and renamed into place, then the failure hits before the ledger row: the
  worst case for exactly-once), ``mixed`` (default: alternate by attempt) or ``die`` (the
  worker process exits on the spot, as one the kernel kills for memory does: a partition a
  worker cannot hold; outside a Dask worker it raises instead).

``faults(DIR, RUN)`` tells a test how many failures were injected per partition,
``attempts(DIR, RUN)`` which process made each counted attempt and when.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from dvidetl.errors import UserError
from dvidetl.export.kinds import Partition, PartitionStats
from dvidetl.sinks.parquet import ParquetSink
from dvidetl.sinks.parquet import list_exports as parquet_exports
from dvidetl.urlquery import Query

# Those in try/if/with blocks are optional or conditional.

SCHEME = "flaky+parquet"
MODES = ("before", "mid", "mixed", "die")
FAULT_DIR = ".faults"


class InjectedFault(OSError):
    """The error a flaky write raises (an ``OSError``, as a real I/O failure would be)."""


@dataclass
class _FailingStats(PartitionStats):
    """Stats whose ledger row raises: the Parquet sink makes the ledger row
    (``PartitionStats.to_ledger_row``) only after its data files are in place, so this fails
    an attempt exactly there."""

    msg: str = ""

    @classmethod
    def of(cls, inner: PartitionStats, msg: str) -> _FailingStats:
        return cls(**{f.name: getattr(inner, f.name) for f in fields(inner)}, msg=msg)

    def to_ledger_row(self, run_id: str, part: Partition, rows: int) -> pa.Table:
        raise InjectedFault(errno.EIO, self.msg)


class FlakySink(ParquetSink):
    """A ``ParquetSink`` whose ``write_partition`` fails as the URL says (see module doc)."""

    def __init__(self, base: str, *, uuid: str, instance: str, url: str, rate: float = 0.0,
                 fails: int = 1, seed: int = 0, poison: tuple[tuple[int, int], ...] = (),
                 mode: str = "mixed"):
        super().__init__(base, uuid=uuid, instance=instance, url=url)
        self.rate, self.fails, self.seed = rate, fails, seed
        self.poison, self.mode = poison, mode

    def __repr__(self) -> str:
        return f"FlakySink({str(self.root)!r}, rate={self.rate}, fails={self.fails})"

    def _selected(self, part: Partition) -> bool:
        h = hashlib.blake2b(f"{self.seed}:{part.key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64 < self.rate

    def _poisoned(self, part: Partition) -> bool:
        return part.kind == "blocks" and any(
            s == part.scale and part.lo <= m < part.hi for s, m in self.poison
        )

    def _attempt(self, run_id: str, part: Partition) -> int:
        """Count this attempt (one file per attempt: O_EXCL makes it race-free across
        processes) and return its number, from 0."""
        d = self.base / FAULT_DIR / run_id
        d.mkdir(parents=True, exist_ok=True)
        k = 0
        while True:
            try:
                fd = os.open(d / f"{part.key}.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                k += 1
                continue
            os.write(fd, f"{os.getpid()} {time.time():.6f}".encode())  # who and when
            os.close(fd)
            return k

    def _note_fault(self, run_id: str, part: Partition, attempt: int) -> None:
        (self.base / FAULT_DIR / run_id / f"{part.key}.{attempt}.failed").touch()

    def write_partition(self, run_id, part: Partition, tables, stats) -> None:
        poisoned = self._poisoned(part)
        if not poisoned and not self._selected(part):
            return super().write_partition(run_id, part, tables, stats)
        attempt = self._attempt(run_id, part)
        if not poisoned and attempt >= self.fails:
            return super().write_partition(run_id, part, tables, stats)
        self._note_fault(run_id, part, attempt)
        what = "poisoned partition" if poisoned else "transient fault"
        msg = f"injected {what}: write of {part.key} failed (attempt {attempt + 1})"
        mode = self.mode if self.mode != "mixed" else ("before", "mid")[attempt % 2]
        if mode == "die":
            try:
                from distributed import get_worker

                get_worker()
            except (ImportError, ValueError):
                raise InjectedFault(errno.EIO, msg) from None
            os._exit(137)  # SIGKILL's exit status: the nanny sees a dead worker
        if mode == "before":
            raise InjectedFault(errno.EIO, msg)
        super().write_partition(run_id, part, tables, _FailingStats.of(stats, msg))
        raise AssertionError("unreachable: the failing stats must have raised")  # pragma: no cover


def faults(base: str | os.PathLike, run_id: str) -> dict[str, int]:
    """Injected failures per partition key of one run (for test assertions)."""
    d = Path(base) / FAULT_DIR / run_id
    out: dict[str, int] = {}
    if d.is_dir():
        for f in d.glob("*.failed"):
            key = f.name.split(".")[0]
            out[key] = out.get(key, 0) + 1
    return out


def attempts(base: str | os.PathLike, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(pid, time) of every counted write attempt per partition key, in attempt order: tells
    a test whether retries happened in the same process (inside the task) and how far apart."""
    d = Path(base) / FAULT_DIR / run_id
    out: dict[str, list[tuple[int, int, float]]] = {}
    if d.is_dir():
        for f in d.iterdir():
            key, _, k = f.name.partition(".")
            if not k.isdigit():
                continue
            pid, t = f.read_text().split()
            out.setdefault(key, []).append((int(k), int(pid), float(t)))
    return {key: [(pid, t) for _, pid, t in sorted(v)] for key, v in out.items()}


def open_url(url: str, *, uuid: str, instance: str) -> FlakySink:
    """Open ``flaky+parquet://DIR?...`` (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise UserError(f"not a {SCHEME}:// URL: {url!r}")
    base = parts.netloc + parts.path
    if not base:
        raise UserError(f"sink URL {url!r} names no directory: use {SCHEME}://DIR?rate=0.3")
    q = Query(url, ("rate", "fails", "seed", "poison", "mode"), multi=("poison",))
    rate = q.float("rate", 0.0, 0.0, 1.0)
    fails = q.int("fails", 1, 0)
    seed = q.int("seed", 0)
    try:
        pairs = [tuple(int(v) for v in p.split(":")) for p in q.all("poison")]
    except ValueError:
        pairs = [()]
    if any(len(p) != 2 for p in pairs):
        raise UserError(f"{url!r}: poison must be SCALE:MORTON")
    poison = tuple((p[0], p[1]) for p in pairs)
    mode = q.choice("mode", MODES, "mixed")
    return FlakySink(base, uuid=uuid, instance=instance, url=url, rate=rate, fails=fails,
                     seed=seed, poison=poison, mode=mode)


def list_exports(url: str) -> list[tuple[str, str]]:
    """The exports under the wrapped Parquet directory (readers open them by this URL too)."""

    parts = urlsplit(url)
    return parquet_exports(f"parquet://{parts.netloc + parts.path}")
