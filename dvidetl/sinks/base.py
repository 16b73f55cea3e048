"""The one interface every sink implements (parquet://, vastdb://, and plugins): ``Sink``.

Exactly once rests on one rule: **a partition's rows and its ledger row become visible
together** (one VastDB transaction; for Parquet, data files renamed into place and then the
ledger file renamed last — a reader only trusts files whose ledger row exists). A partition
whose ledger row exists for the run is skipped; re-writing a partition replaces its rows
(deterministic file names / delete-then-insert in the same transaction), so retries, killed
workers and resumed runs never duplicate or lose a block.

Who calls what:

* driver: ``check()`` first (seconds, before planning); ``prepare(run)`` once (DDL,
  directories, store the plan with the run); ``load_run(run_id)`` on ``--resume``;
  ``done(run_id)`` to skip finished partitions; ``ledger(run_id)`` for the summary.
* worker task: ``is_done(run_id, part)`` (a retried task whose first attempt committed), then
  ``write_partition(run_id, part, data, stats)`` — ``data`` is the typed partition data of
  ``export.batch`` (blocks as ``BlockData``, which a tabular sink cuts into cells for the
  run's cell limit, ``cell_limit(run_id)``; the keyed kinds' rows as tables), and what the
  transform must add for this sink is in ``needs`` (``payload``: the zstd block body a tabular
  sink stores; ``raw``: the unwrapped block bytes a volume sink transcodes).
* readers / verify: ``read(table, scale=, morton_range=)``, ``latest_run()``.
* the run's lifecycle (``docs/runs.md``): ``update_run(run)`` stores its record (state,
  result, verify outcome); ``finish(run)`` once every partition is committed publishes a
  staged ``--overwrite`` run and removes what earlier runs left outside its partitions;
  ``verify`` reads ``read_partition`` (every stored row of a partition, ``UnreadableFile``
  when its storage cannot be read) and ``outside``; ``--repair`` uses ``forget`` and
  ``remove_outside``.

A sink object must be cheap to construct from its URL on a worker (``open_sink(url, uuid=,
instance=)``) and must not hold secrets in its ``repr``. ``dvidetl.testing.sink_tests`` is
the contract as tests, run over every sink.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from dvidetl.export.batch import BlockData, PartitionData
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo, kind
from dvidetl.geometry import KEY_END, VolumeInfo
from dvidetl.tables import schema as S

log = logging.getLogger(__name__)


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
    hi: int = KEY_END
    scales_above: bool = False  # the range covers every scale >= ``scale``


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


class Sink(abc.ABC):
    """Where an export's tables go; one object per (sink URL, uuid, instance). A new sink
    implements the abstract core (``check`` may stay the default) — the rest are the
    contract's semantics written once here, which a sink may replace with a faster or
    storage-aware version."""

    url: str
    uuid: str
    instance: str
    #: what a blocks partition's data must carry for this sink besides the base columns
    #: (``export.batch.NEEDS``: ``"payload"``, the zstd block body without its label table,
    #: which a tabular sink stores; ``"raw"``, the unwrapped DVID block bytes, which a volume
    #: sink transcodes). The transform makes only what some sink of the partition needs (the
    #: payload is about half its cost), so a sink reading a column it did not declare is
    #: refused by ``check_data``
    needs: frozenset[str] = frozenset()
    #: the partition kinds this sink stores (None: every kind). A run plans a keyed kind
    #: only when a sink of it takes the kind, and a task hands a partition only to the sinks
    #: that take it (``takes``); a sink that stores volumes, not tables, takes blocks only.
    kinds: frozenset[str] | None = None
    #: per kind, the ``verify`` check replacing the kind's own (``"module:function"``, same
    #: signature as ``Kind.check``): a sink whose storage is not the kind's tables (a volume)
    #: says how its partitions are compared with the source
    checks: Mapping[str, str] = {}

    # -- the abstract core -------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, run: RunInfo) -> None:
        """Driver, once per run (idempotent): create tables / directories, store the plan."""

    @abc.abstractmethod
    def load_run(self, run_id: str) -> RunInfo:
        """The stored run (plan included); ``UserError`` if there is no such run."""

    @abc.abstractmethod
    def runs(self) -> list[str]:
        """Run ids with a stored plan, oldest first."""

    @abc.abstractmethod
    def is_done(self, run_id: str, part: Partition) -> bool:
        """True when the partition's ledger row exists for the run."""

    @abc.abstractmethod
    def ledger(self, run_id: str | None = None) -> pa.Table:
        """Ledger rows (of one run, or all), as ``schema.EXPORT_LEDGER``."""

    @abc.abstractmethod
    def write_partition(self, run_id: str, part: Partition, data: PartitionData,
                        stats: PartitionStats) -> None:
        """Write the partition's data (``export.batch``: ``BlockData`` for blocks, else the
        kind's tables; a missing or empty table writes no rows) and its ledger row
        (``stats.to_ledger_row``) atomically: all visible or none. Replaces rows an earlier
        attempt of the same partition may have left behind. Read ``stats`` only after
        consuming the data (streamed partitions fill it as they go)."""

    @abc.abstractmethod
    def read(self, table: str, scale: int | None = None,
             morton_range: tuple[int, int] | None = None, run_id: str | None = None, *,
             where: Where | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """Committed rows of a table, optionally one scale and ``lo <= morton < hi``.

        ``where`` adds conjunctive predicates pushed down to the store: ``{"label": 7}``
        (equality) or ``{"supervoxel": (lo, hi)}`` (``lo <= v < hi``) on any integer column;
        ``columns`` projects (the result then has only those columns, in schema order).

        ``run_id`` (default: the latest run) matters for sinks whose uncommitted rows could
        be seen otherwise (Parquet: only files of partitions committed in that run are read);
        a transactional sink (VastDB), where rows are only ever visible committed and a
        rewritten partition replaces its rows, may ignore it."""

    @abc.abstractmethod
    def update_run(self, run: RunInfo) -> None:
        """Store ``run``'s record again (its plan never changes)."""

    @abc.abstractmethod
    def forget(self, run_id: str, part: Partition) -> None:
        """Drop the partition's ledger row, so the next ``execute`` of the run redoes it
        (``verify --repair``); its rows stay until the redo replaces them."""

    # -- the contract's semantics, written once --------------------------------------------
    def check(self, *, write: bool = True, create: bool = True) -> None:
        """Preflight on the driver before planning and before any cluster starts: the
        credentials, the store (bucket, directory) and that it is reachable and, with
        ``write``, writable (``create=False``: without creating anything, for a dry run).
        A ``UserError`` with one line saying what to fix, within seconds — never retries.
        The default checks nothing."""
        return None

    def takes(self, kind_name: str) -> bool:
        """Whether this sink stores partitions of kind ``kind_name`` (``kinds``)."""
        return self.kinds is None or kind_name in self.kinds

    def plan_cells(self, volume: VolumeInfo) -> dict[int, int]:
        """Per scale, the Morton cell bits ``b`` a blocks partition must be exactly one
        aligned cell of (``[k << b, (k + 1) << b)``: a sink that writes one file per aligned
        box, such as a neuroglancer shard); {} when any range will do. Called before
        planning, so a volume this sink cannot store fails here, in one line."""
        return {}

    def storage_key(self) -> str:
        """What names the storage this sink writes the export to: two sinks of one run must
        not share it (their ledgers would be one). Default: the URL without its query."""
        return self.url.split("?", 1)[0].rstrip("/")

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

    def finished_runs(self) -> list[str]:
        """Runs that finished (every partition committed) and were not superseded, oldest
        first; a run stored before runs had records counts when its ledger is complete."""
        out = []
        for r in self.runs():
            run = self.load_run(r)
            if run.state == "finished" or (run.state is None and len(self.done(r)) >= len(run.partitions)):
                out.append(r)
        return out

    def done(self, run_id: str) -> set[str]:
        """Keys (``Partition.key``) of the run's finished partitions, in one cheap call."""
        t = self.ledger(run_id)
        return {Partition(k, s, lo, hi).key for k, s, lo, hi in zip(
            t.column("kind").to_pylist(), t.column("scale").to_pylist(),
            t.column("lo").to_pylist(), t.column("hi").to_pylist(), strict=True)}

    def location(self, table: str, part: Partition, run_id: str | None = None) -> str:
        """Where the partition's rows of ``table`` are stored, for messages (a file, a range)."""
        return f"{table} {part.where(table)}"

    def read_partition(self, run_id: str, table: str, part: Partition) -> pa.Table:
        """Every stored row a plain reader sees for the partition's share of ``table`` — for
        ``verify``, which must also see rows the partition should not hold. Raises
        ``UnreadableFile`` when its storage cannot be read. Default: the range read."""
        if part.spec.scaled:
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

    def clean_at_finish(self, run: RunInfo, **extra: int) -> None:
        """``finish``'s removal of what plain readers would see besides ``run`` (rows outside
        its partitions, left by earlier runs with another plan or by killed ones), said in the
        log and kept in the run's record (``removed_at_finish``, shown by ``status``): a
        finish deletes nothing unsaid. ``extra``: a sink's own counts (temporary files)."""
        found = self.outside(run, self.done(run.run_id))
        rows = self.remove_outside(run, found)
        done = dict(run.record.get("removed_at_finish") or {})  # a finish redone adds to it
        now = {"outside": len(found), "outside_rows": rows, **extra}
        for k, v in now.items():
            done[k] = int(done.get(k, 0)) + int(v)
        run.record["removed_at_finish"] = done
        if found:
            log.info("%r: finishing run %s removed %d stray range(s) or file(s) outside its partitions "
                     "(%d rows)", self, run.run_id, len(found), rows)

    # -- helpers for tabular sinks ---------------------------------------------------------
    def cell_limit(self, run_id: str) -> int:
        """The run's cell limit (``RunOptions.cell_limit``, stored with the run): the bytes a
        binary or list cell may hold in this sink's tables."""
        return self.load_run(run_id).options.cell_limit

    def check_data(self, part: Partition, data: PartitionData) -> None:
        """A blocks partition hands ``BlockData`` carrying what this sink ``needs``; a keyed
        one only its kind's tables."""
        spec = kind(part.kind)
        if isinstance(data, BlockData):
            if "blocks" not in spec.tables:
                raise ValueError(f"partition kind {part.kind!r} does not write blocks")
            missing = data.lacks(self.needs)
            if missing:
                raise ValueError(f"{type(self).__name__}: partition {part.key}'s block data lacks "
                                 f"{missing} (made only for the sinks that declare them in Sink.needs; "
                                 f"this sink declares {sorted(self.needs)})")
            return
        unknown = set(data) - set(spec.tables)
        if unknown:
            raise ValueError(f"partition kind {part.kind!r} does not write tables {sorted(unknown)}")


__all__ = ["Sink", "Outside", "UnreadableFile", "Where", "where_filters"]
