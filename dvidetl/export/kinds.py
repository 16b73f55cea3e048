"""Partition kinds: what a partition of each kind writes, how it is cut, read, checked and
counted — the one place a kind is described (numcodecs' registry, zarr's ``Registry``).

An export is a plan of partitions; each partition is one unit of work and of commit. Its
kind says everything the stages need to know about it:

============  ======================================  ===============  ==============
kind          tables (committed together)             cut along        counted as
============  ======================================  ===============  ==============
blocks        blocks, block_overflow, export_errors   morton per scale blocks
indices       label_index                             label            index_rows
mapping       mapping                                 supervoxel       mapping_rows
anomalies     source_anomalies                        seq              (per kind)
============  ======================================  ===============  ==============

plus the Flight read call that streams a partition (``read``), the worker function that
turns it into what the sinks take (``task``), and ``verify``'s check of it (``check``),
named as ``"module:function"`` and imported when first used, so this module stays a leaf
that every stage (and the sinks) may import. A new kind is one :func:`register` call and its
three functions; nothing else compares kind names.

Also here: :class:`Partition` (one plan entry), :class:`RunInfo` (a run: its plan, options
and record) and :class:`PartitionStats` (what a partition's task did: its ledger row and the
driver's totals come from it, ``to_ledger_row``). The end of every uint64 key space is
``geometry.KEY_END``.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dvidetl.export.options import RunOptions
from dvidetl.tables import schema as S

if TYPE_CHECKING:
    from dvidetl.flight.client import FlightClient


@dataclass(frozen=True)
class Kind:
    """One partition kind (see the module docstring)."""

    name: str
    #: the tables a partition writes, committed together with its ledger row
    tables: tuple[str, ...]
    #: the column partitions are cut along (``morton``, within one scale, for scaled kinds)
    key: str
    #: partitions are Morton ranges of one scale (else key ranges of the whole key space)
    scaled: bool
    #: the Flight client method that streams a partition: ``read(scale, lo, hi)`` when
    #: scaled, else ``read(lo, hi)``
    read: str
    #: ``"module:function"``: ``(client, ctx, part) -> (PartitionData, PartitionStats)``
    task: str
    #: ``"module:function"``: ``(client, sink, run, part, env, report) -> None`` (verify)
    check: str
    #: the ``RunResult`` / progress ``Counts`` field its rows add to (None: not counted there)
    counter: str | None
    #: per table, the ledger column saying how many rows the partition wrote to it
    ledger_counts: Mapping[str, str] = field(default_factory=dict)
    #: rows per partition the planner aims at when not told (keyed kinds)
    default_rows: int = 0

    @property
    def unit(self) -> str:
        """What a partition's planned size counts: ``blocks`` or ``rows``."""
        return "blocks" if self.scaled else "rows"

    def function(self, which: str) -> Callable[..., Any]:
        """The ``task`` or ``check`` function, imported on first use."""
        modname, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(modname), name)


#: kind name -> Kind, in plan order (blocks first, then the keyed kinds)
KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add (or replace) a kind; returns it."""
    unknown = [t for t in kind.tables if t not in S.TABLES]
    if unknown:
        raise ValueError(f"kind {kind.name!r}: unknown tables {unknown}")
    KINDS[kind.name] = kind
    return kind


def kind(name: str) -> Kind:
    """The kind called ``name``; an unknown one is a ``ValueError`` naming the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown partition kind {name!r}: kinds are {list(KINDS)}") from None


def kind_of_table(table: str) -> Kind | None:
    """The kind whose partitions write ``table`` (None for a table no partition writes)."""
    return next((k for k in KINDS.values() if table in k.tables), None)


register(Kind("blocks", ("blocks", "block_overflow", "export_errors"), "morton", True, "read_blocks",
              "dvidetl.export.tasks:blocks_task", "dvidetl.read.verify:verify_block_partition",
              "blocks", {"blocks": "blocks", "export_errors": "errors"}))
#: label_index rows per indices partition: ~40 B each in Arrow (plus the protobufs being
#: decoded), so ~80 MB of output, spilled past 32 MiB — well under 256 MiB on a worker; the
#: male CNS's ~6e9 rows become ~3,000 partitions
register(Kind("indices", ("label_index",), "label", False, "read_indices",
              "dvidetl.export.tasks:indices_task", "dvidetl.read.verify:verify_index_partition",
              "index_rows", {"label_index": "rows"}, 2_000_000))
#: mapping pairs per mapping partition (16 B each: 128 MB; 10^8 pairs -> ~13 partitions)
register(Kind("mapping", ("mapping",), "supervoxel", False, "read_mapping",
              "dvidetl.export.tasks:mapping_task", "dvidetl.read.verify:verify_mapping_partition",
              "mapping_rows", {"mapping": "rows"}, 8_000_000))
#: source anomalies per anomalies partition (~200 B each: 200 MB at most; nearly every
#: source has none or a few, one partition)
register(Kind("anomalies", ("source_anomalies",), "seq", False, "read_anomalies",
              "dvidetl.export.tasks:anomalies_task", "dvidetl.read.verify:verify_anomalies_partition",
              None, {"source_anomalies": "rows"}, 1_000_000))


@dataclass(frozen=True)
class Partition:
    """One unit of work and of commit: a Morton range of one scale (a scaled kind such as
    ``blocks``), or a key range (``indices``: body labels, ``mapping``: supervoxels,
    ``anomalies``: anomaly numbers)."""

    kind: str
    scale: int
    lo: int
    hi: int
    blocks: int = 0  # planned (estimated) blocks; 0 for keyed kinds
    rows: int = 0  # planned (estimated) rows; 0 for scaled kinds

    @property
    def key(self) -> str:
        """Stable name of the partition inside a run (used for ledger files and task keys)."""
        return f"{self.kind}-s{self.scale}-{self.lo:016x}-{self.hi:016x}"

    @property
    def spec(self) -> Kind:
        return kind(self.kind)

    @property
    def size(self) -> int:
        """The planned size in the kind's unit (blocks or rows)."""
        return self.blocks if self.spec.scaled else self.rows

    def read(self, client: FlightClient) -> Iterator[pa.RecordBatch]:
        """Stream the partition from a Flight client (the kind's read call)."""
        call = getattr(client, self.spec.read)
        return call(self.scale, self.lo, self.hi) if self.spec.scaled else call(self.lo, self.hi)

    def where(self, table: str) -> str:
        """The partition's range of ``table``, in words (for messages)."""
        if self.spec.scaled:
            return f"scale {self.scale} morton [{self.lo}, {self.hi})"
        return f"{S.KEY_COLUMN[table]} [{self.lo}, {self.hi})"

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
               "verify", "staged", "published", "superseded_by", "removed_at_finish", "not_exported", "sinks")
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
    ``Sink.update_run`` as the run goes. ``options`` are the run's ``RunOptions`` (a dict,
    as older records and callers give them, is read with ``RunOptions.from_dict``)."""

    run_id: str
    uuid: str
    instance: str
    partitions: list[Partition]
    options: RunOptions = field(default_factory=RunOptions)
    volume: dict = field(default_factory=dict)  # VolumeInfo as a dict
    created: float = field(default_factory=time.time)
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, RunOptions):
            self.options = RunOptions.from_dict(self.options)

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
            "options": self.options.to_dict(),
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
            options=RunOptions.from_dict(d.get("options")),
            volume=d.get("volume", {}),
            created=float(d.get("created", 0.0)),
            record={k: d[k] for k in RECORD_KEYS if k in d},
        )


@dataclass
class PartitionStats:
    """What one partition's task did: the ledger row's figures (``to_ledger_row``) and the
    driver's totals (``RunResult.add``).

    ``blocks``: blocks exported (block partitions); ``rows``: rows gathered (label_index
    rows, mapping pairs, anomalies; for block partitions the blocks); ``error_samples``: the
    first corrupt blocks (scale, x, y, z, reason) for the dashboard; ``anomalies``: the
    source's anomalies stored, per kind, and ``lost`` those of them by which the export
    lacks blocks (anomalies partitions); ``written``: which sinks of the run this attempt
    committed the partition to (indices into ``TaskContext.sink_urls``; the others held it
    already), for the driver's per-sink figures."""

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
    written: tuple[int, ...] = ()

    def to_ledger_row(self, run_id: str, part: Partition, rows: int) -> pa.Table:
        """The partition's ledger row (``schema.EXPORT_LEDGER``), stamped now; ``rows``:
        the rows the sink wrote over all the partition's tables."""
        row = {
            "run_id": run_id, "kind": part.kind, "scale": part.scale, "lo": part.lo, "hi": part.hi,
            "blocks": int(self.blocks), "rows": int(rows), "errors": int(self.errors),
            "bytes_in": int(self.bytes_in), "bytes_out": int(self.bytes_out),
            "seconds": float(self.seconds),
            "finished_at": pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC")),
            "raw_bytes": int(self.raw_bytes),
        }
        return pa.Table.from_pylist([row], schema=S.EXPORT_LEDGER)


__all__ = ["KINDS", "Kind", "Partition", "PartitionStats", "RunInfo", "RECORD_KEYS",
           "RUN_STATES", "kind", "kind_of_table", "register"]
