"""The small protocol every sink implements (parquet://, vastdb://), and the plan types.

Exactly once rests on one rule: **a partition's rows and its ledger row become visible
together** (one VastDB transaction; for Parquet, data files renamed into place and then the
ledger file renamed last — a reader only trusts files whose ledger row exists). A partition
whose ledger row exists for the run is skipped; re-writing a partition replaces its rows
(deterministic file names / delete-then-insert in the same transaction), so retries, killed
workers and resumed runs never duplicate or lose a block.

Who calls what:

* driver: ``prepare(run)`` once (DDL, directories, store the plan with the run);
  ``load_run(run_id)`` on ``--resume``; ``done(run_id)`` to skip finished partitions;
  ``ledger(run_id)`` for the summary.
* worker task: ``is_done(run_id, part)`` (a retried task whose first attempt committed), then
  ``write_partition(run_id, part, tables, stats)``.
* readers / verify: ``read(table, scale=, morton_range=)``, ``latest_run()``.
* the run's lifecycle (``docs/runs.md``): ``update_run(run)`` stores its record (state,
  result, verify outcome); ``finish(run)`` once every partition is committed publishes a
  staged ``--overwrite`` run and removes what earlier runs left outside its partitions;
  ``verify`` reads ``read_partition`` (every stored row of a partition, ``UnreadableFile``
  when its storage cannot be read) and ``outside``; ``--repair`` uses ``forget`` and
  ``remove_outside``.

A sink object must be cheap to construct from its URL on a worker (``open_sink(url, uuid=,
instance=)``) and must not hold secrets in its ``repr``.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa

from dvidetl.tables import schema as S

#: exclusive upper bound used for "all labels" ranges (label 2**64-1 is never a real label)
LABEL_END = (1 << 64) - 1


@dataclass(frozen=True)
class Partition:
    """One unit of work and of commit: a Morton range of one scale (``kind="blocks"``), a
    label range of the label indices (``"indices"``) or the mapping (``"mapping"``)."""

    kind: str
    scale: int
    lo: int
    hi: int
    blocks: int = 0  # planned (estimated) blocks; 0 for indices / mapping
    rows: int = 0  # planned (estimated) label_index rows / mapping pairs; 0 for blocks

    @property
    def key(self) -> str:
        """Stable name of the partition inside a run (used for ledger files and task keys)."""
        return f"{self.kind}-s{self.scale}-{self.lo:016x}-{self.hi:016x}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["rows"]:
            del d["rows"]  # block partitions: keep stored plans (10^5+ entries) compact
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Partition:
        return cls(str(d["kind"]), int(d["scale"]), int(d["lo"]), int(d["hi"]), int(d.get("blocks", 0)),
                   int(d.get("rows", 0)))


#: the keys of a run's record (``RunInfo.record``), documented in docs/runs.md
RECORD_KEYS = ("source", "uuid_requested", "uuid_resolved", "state", "started", "ended", "result",
               "verify", "staged", "published", "superseded_by")
#: run states: ``running`` (started, not ended — or its driver died), ``finished`` (every
#: partition committed), ``failed`` (ended with partitions not committed, or aborted),
#: ``superseded`` (a later run of the export replaced it: its rows are gone)
RUN_STATES = ("running", "finished", "failed", "superseded")


@dataclass
class RunInfo:
    """A run: what it exports, its plan, and its record. Stored with the run by
    ``Sink.prepare`` so a resumed run reuses the plan exactly; the record (``record``: the
    source URL without secrets, the requested and resolved uuid, state, start and end, the
    result, the last verify outcome; see ``RECORD_KEYS``) is rewritten by
    ``Sink.update_run`` as the run goes."""

    run_id: str
    uuid: str
    instance: str
    partitions: list[Partition]
    options: dict = field(default_factory=dict)  # scales, partition_blocks, cell_limit, ...
    volume: dict = field(default_factory=dict)  # VolumeInfo as a dict
    created: float = field(default_factory=time.time)
    record: dict = field(default_factory=dict)

    @property
    def state(self) -> str | None:
        """The recorded state (None for a run stored before runs had records)."""
        return self.record.get("state")

    @property
    def staged(self) -> bool:
        """Written apart from the published export until it finishes (``run --overwrite``)."""
        return bool(self.record.get("staged"))

    def to_json(self) -> str:
        d = {
            "run_id": self.run_id,
            "uuid": self.uuid,
            "instance": self.instance,
            "options": self.options,
            "volume": self.volume,
            "created": self.created,
            **{k: self.record[k] for k in RECORD_KEYS if k in self.record},
            "partitions": [p.to_dict() for p in self.partitions],
        }
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunInfo:
        d = json.loads(text)
        return cls(
            run_id=d["run_id"],
            uuid=d["uuid"],
            instance=d["instance"],
            partitions=[Partition.from_dict(p) for p in d["partitions"]],
            options=d.get("options", {}),
            volume=d.get("volume", {}),
            created=float(d.get("created", 0.0)),
            record={k: d[k] for k in RECORD_KEYS if k in d},
        )


class UnreadableFile(Exception):
    """A stored file that cannot be read: truncated, corrupt, or gone while the ledger says
    it holds rows. ``verify`` reports it (file and partition) as a difference, and readers
    turn it into a one-line ``UserError``; never a traceback."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Outside:
    """Rows a plain reader of the export sees that lie outside every committed partition of
    a run: a stray file (``path``), or a key range of a table (``scale``, ``lo``, ``hi``; the
    key is ``morton`` for the scaled tables, ``schema.KEY_COLUMN`` otherwise). ``rows`` is
    -1 for a stray file that cannot be read. ``verify`` counts them, ``--repair`` removes them
    (``Sink.remove_outside``)."""

    table: str
    rows: int
    where: str  # the one line shown for it
    path: str | None = None
    scale: int | None = None
    lo: int = 0
    hi: int = 1 << 64
    scales_above: bool = False  # the range covers every scale >= ``scale``


#: a table's rows for ``write_partition``: a whole table, or a stream of batches/tables
#: (written incrementally, e.g. the mapping), committed all the same at the end
TableData = pa.Table | Iterable[pa.RecordBatch | pa.Table]

#: pushed-down predicates for ``Sink.read``: column -> value (==) or (lo, hi) (lo <= v < hi)
Where = Mapping[str, "int | tuple[int, int]"]


def where_filters(where: Where | None, names: Sequence[str]) -> list[tuple[str, str, int]]:
    """``where`` as (column, op, value) triples (pyarrow / DNF style); unknown column is a
    ``ValueError`` naming the table's columns."""
    out: list[tuple[str, str, int]] = []
    for col, v in (where or {}).items():
        if col not in names:
            raise ValueError(f"no column {col!r} to filter on: columns are {list(names)}")
        if isinstance(v, tuple):
            lo, hi = v
            out += [(col, ">=", int(lo)), (col, "<", int(hi))]
        else:
            out.append((col, "=", int(v)))
    return out


class SinkBase(abc.ABC):
    """What every sink shares, so a new sink implements only its storage: the abstract core
    (``prepare``, ``load_run``, ``runs``, ``is_done``, ``ledger``, ``write_partition``,
    ``read``) and, optionally, a faster ``done``. The defaults here are the contract's
    semantics written once: the latest run, the finished keys from the ledger, the tables a
    partition may write, and its ledger row."""

    url: str
    uuid: str
    instance: str

    @abc.abstractmethod
    def prepare(self, run: RunInfo) -> None: ...

    @abc.abstractmethod
    def load_run(self, run_id: str) -> RunInfo: ...

    @abc.abstractmethod
    def runs(self) -> list[str]: ...

    @abc.abstractmethod
    def is_done(self, run_id: str, part: Partition) -> bool: ...

    @abc.abstractmethod
    def ledger(self, run_id: str | None = None) -> pa.Table: ...

    @abc.abstractmethod
    def write_partition(self, run_id: str, part: Partition, tables: Mapping[str, TableData],
                        stats: Mapping) -> None: ...

    @abc.abstractmethod
    def read(self, table: str, scale: int | None = None,
             morton_range: tuple[int, int] | None = None, run_id: str | None = None, *,
             where: Where | None = None, columns: Sequence[str] | None = None) -> pa.Table: ...

    def latest_run(self) -> str | None:
        """The run readers see by default: the newest run, passing over runs still staged
        (a ``run --overwrite`` not yet finished: the export they replace stays current)."""
        runs = self.runs()
        for r in reversed(runs):
            run = self.load_run(r)
            if run.state == "superseded":
                continue
            if not run.staged or run.state in ("publishing", "finished"):
                return r
        return runs[-1] if runs else None

    def update_run(self, run: RunInfo) -> None:
        """Store ``run``'s record again (its plan never changes)."""
        raise NotImplementedError

    def finish(self, run: RunInfo) -> None:
        """The driver, once every partition of ``run`` is committed: make the run the export
        plain readers see (sinks publish a staged run and remove what earlier runs left
        outside its partitions first), record it ``finished`` and every earlier run
        ``superseded``. Idempotent (a crash inside is redone by the next call)."""
        for r in self.runs():
            if r == run.run_id:
                continue
            old = self.load_run(r)
            if old.state != "superseded" and old.created <= run.created:
                old.record.update(state="superseded", superseded_by=run.run_id)
                self.update_run(old)
        run.record.update(state="finished", published=True)
        self.update_run(run)

    def forget(self, run_id: str, part: Partition) -> None:
        """Drop the partition's ledger row, so the next ``execute`` of the run redoes it
        (``verify --repair``); its rows stay until the redo replaces them."""
        raise NotImplementedError

    def finished_runs(self) -> list[str]:
        """Runs that finished (every partition committed) and were not superseded, oldest
        first; a run stored before runs had records counts when its ledger is complete."""
        out = []
        for r in self.runs():
            run = self.load_run(r)
            if run.state == "finished" or (run.state is None and len(self.done(r)) >= len(run.partitions)):
                out.append(r)
        return out

    def location(self, table: str, part: Partition, run_id: str | None = None) -> str:
        """Where the partition's rows of ``table`` are stored, for messages (a file, a range)."""
        rng = f"scale {part.scale} morton [{part.lo}, {part.hi})" if part.kind == "blocks" else \
            f"{S.KEY_COLUMN[table]} [{part.lo}, {part.hi})"
        return f"{table} {rng}"

    def read_partition(self, run_id: str, table: str, part: Partition) -> pa.Table:
        """Every stored row a plain reader sees for the partition's share of ``table`` — for
        ``verify``, which must also see rows the partition should not hold. Raises
        ``UnreadableFile`` when its storage cannot be read. Default: the range read."""
        if part.kind == "blocks":
            return self.read(table, scale=part.scale, morton_range=(part.lo, part.hi), run_id=run_id)
        return self.read(table, run_id=run_id, where={S.KEY_COLUMN[table]: (part.lo, part.hi)})

    def outside(self, run: RunInfo, done: set[str]) -> list[Outside]:
        """Rows plain readers see outside every committed partition of ``run`` (``done``: its
        committed keys). A sink that cannot hold such rows answers []."""
        return []

    def remove_outside(self, run: RunInfo, found: Sequence[Outside]) -> int:
        """Remove what ``outside`` found (``verify --repair``); returns rows removed."""
        if found:
            raise NotImplementedError(f"{type(self).__name__} cannot remove rows outside partitions")
        return 0

    def check(self, *, write: bool = True, create: bool = True) -> None:
        """Preflight (driver, before planning or any cluster): can this sink be used? A
        ``UserError`` naming what to fix, in seconds. The default checks nothing."""
        return None

    def done(self, run_id: str) -> set[str]:
        t = self.ledger(run_id)
        return {Partition(k, s, lo, hi).key for k, s, lo, hi in zip(
            t.column("kind").to_pylist(), t.column("scale").to_pylist(),
            t.column("lo").to_pylist(), t.column("hi").to_pylist(), strict=True)}

    @staticmethod
    def check_tables(part: Partition, tables: Mapping[str, TableData]) -> None:
        """A partition writes only its kind's tables (``schema.KIND_TABLES``)."""
        unknown = set(tables) - set(S.KIND_TABLES[part.kind])
        if unknown:
            raise ValueError(f"partition kind {part.kind!r} does not write tables {sorted(unknown)}")

    @staticmethod
    def ledger_row(run_id: str, part: Partition, stats: Mapping, rows: int) -> pa.Table:
        """The partition's ledger row (``schema.EXPORT_LEDGER``), stamped now."""
        row = {
            "run_id": run_id, "kind": part.kind, "scale": part.scale, "lo": part.lo, "hi": part.hi,
            "blocks": int(stats.get("blocks", 0)), "rows": int(rows),
            "errors": int(stats.get("errors", 0)), "bytes_in": int(stats.get("bytes_in", 0)),
            "bytes_out": int(stats.get("bytes_out", 0)), "seconds": float(stats.get("seconds", 0.0)),
            "finished_at": pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC")),
            "raw_bytes": int(stats.get("raw_bytes", 0)),
        }
        return pa.Table.from_pylist([row], schema=S.EXPORT_LEDGER)


@runtime_checkable
class Sink(Protocol):
    """Where the tables go. One object per (sink URL, uuid, instance)."""

    url: str
    uuid: str
    instance: str

    def prepare(self, run: RunInfo) -> None:
        """Driver, once per run (idempotent): create tables / directories, store the plan."""
        ...

    def load_run(self, run_id: str) -> RunInfo:
        """The stored run (plan included); ``UserError`` if there is no such run."""
        ...

    def runs(self) -> list[str]:
        """Run ids with a stored plan, oldest first."""
        ...

    def latest_run(self) -> str | None:
        """The run readers see by default (the newest), or None before any run."""
        ...

    def check(self, *, write: bool = True, create: bool = True) -> None:
        """Preflight on the driver before planning and before any cluster starts: the
        credentials, the store (bucket, directory) and that it is reachable and, with
        ``write``, writable (``create=False``: without creating anything, for a dry run).
        A ``UserError`` with one line saying what to fix, within seconds — never retries."""
        ...

    def is_done(self, run_id: str, part: Partition) -> bool:
        """True when the partition's ledger row exists for the run."""
        ...

    def done(self, run_id: str) -> set[str]:
        """Keys (``Partition.key``) of the run's finished partitions, in one cheap call."""
        ...

    def write_partition(
        self, run_id: str, part: Partition, tables: Mapping[str, TableData], stats: Mapping
    ) -> None:
        """Write the partition's tables (``schema.KIND_TABLES[part.kind]``; a missing or empty
        table writes no rows) and its ledger row (from ``stats``: blocks, rows, errors,
        bytes_in, bytes_out, raw_bytes, seconds) atomically: all visible or none. Replaces rows an
        earlier attempt of the same partition may have left behind. Read ``stats`` only
        after consuming the table streams (streamed partitions fill it as they go)."""
        ...

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
        """Committed rows of a table, optionally one scale and ``lo <= morton < hi``.

        ``where`` adds conjunctive predicates pushed down to the store: ``{"label": 7}``
        (equality) or ``{"supervoxel": (lo, hi)}`` (``lo <= v < hi``) on any integer column;
        ``columns`` projects (the result then has only those columns, in schema order).

        ``run_id`` (default: the latest run) matters for sinks whose uncommitted rows could
        be seen otherwise (Parquet: only files of partitions committed in that run are read);
        a transactional sink (VastDB), where rows are only ever visible committed and a
        rewritten partition replaces its rows, may ignore it."""
        ...

    def ledger(self, run_id: str | None = None) -> pa.Table:
        """Ledger rows (of one run, or all), as ``schema.EXPORT_LEDGER``."""
        ...
