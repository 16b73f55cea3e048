"""Compare an export against its source, block by block, byte for byte.

For every block partition of the run's plan: re-read the source's blocks of that Morton
range through Flight, re-read the exported rows, reassemble each block's exact DVID bytes
(``payload0..3`` joined with ``binary_join_element_wise`` + overflow parts, label table joined
back) and check:

* every source block is exported exactly once (missing / duplicated / extra by coordinates;
  blocks the run put in ``export_errors`` are reported as such);
* the reassembled bytes equal the source's unwrapped bytes, and their CRC32 and size equal
  the exported ``crc32`` / ``raw_size``;
* ``supervoxels`` and ``sv_voxels`` equal a fresh parse of the source block (voxel counts
  computed from the block), ``labels`` equal the server's mapping of ``supervoxels``;
* ``label_index`` equals the (label, supervoxel, block) voxel counts derived from the
  exported scale-0 blocks (label 0 excluded, as DVID does not index background);
* ``mapping`` equals the server's mapping.

Differences are reported by coordinates. The source side is parsed with
``dvidetl.codec.repack`` over whole batches; only the byte comparison loops per block, and
only around C calls (zstd, zlib).
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.errors import first_line
from dvidetl.geometry import KEY_END, VolumeInfo, uncovered
from dvidetl.tables import schema as S
from dvidetl.tables.cells import reassemble

if TYPE_CHECKING:
    from collections.abc import Sequence

    from distributed import Client

    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.kinds import Partition, RunInfo
    from dvidetl.flight.client import FlightClient
    from dvidetl.sinks.base import Sink
    from dvidetl.sinks.precomputed import PrecomputedSink

MAX_LISTED = 50

#: the difference counters of a ``VerifyReport``: the export is exact only when all are 0.
#: Each counts one kind of difference, once (a tampered row or file moves exactly one of
#: them), so tests and ``--repair`` can rely on them; add new kinds here, documented below.
DIFF_COUNTERS = ("missing", "extra", "duplicated", "mismatched", "export_errors", "index_diffs",
                 "index_vs_blocks", "mapping_diffs", "outside_rows", "unreadable_files",
                 "partitions_unfinished", "anomaly_diffs")
#: the other counters (sizes of what was checked; ``anomalies``: the source's anomalies the
#: run stored, ``anomalies_lost``: those by which the export lacks blocks — reported, not
#: differences: the export holds what the source could give)
SIZE_COUNTERS = ("blocks_source", "blocks_checked", "index_rows", "mapping_rows", "anomalies",
                 "anomalies_lost")
#: "source vs itself": what the source's own answers disagree about, while the export equals
#: each of them — reported, never a difference of the export (the exit code ignores it)
SOURCE_COUNTERS = ("source_inconsistent",)


@dataclass
class VerifyReport:
    """What ``verify`` found. Counters (all summed over partitions by ``merge``):

    * ``blocks_source``: source blocks seen; ``blocks_checked``: exported blocks compared byte
      for byte and found exact; ``index_rows`` / ``mapping_rows``: exported rows read.
    * ``missing``: source blocks not exported (and not in ``export_errors``); ``extra``:
      exported blocks (inside a partition's range) the source does not have; ``duplicated``:
      blocks exported more than once; ``mismatched``: blocks whose bytes, lists, labels, size
      or CRC differ; ``export_errors``: source blocks the run put in ``export_errors``.
    * ``index_diffs``: (label, supervoxel, block) rows of ``label_index`` that differ from the
      source's label indices (missing, extra, other voxel count, listed twice);
      ``index_vs_blocks``: indices partitions whose rows disagree with the voxel counts of the
      exported scale-0 blocks (the cross-check); ``mapping_diffs``: supervoxels whose mapping
      differs (missing, extra, other body, listed twice).
    * ``outside_rows``: rows a plain reader of the export sees that lie outside every
      committed partition of the run (a stray file, a row outside its file's range, a VastDB
      row in no partition's range); ``unreadable_files``: files that cannot be read
      (truncated, corrupt, or deleted while the ledger says they hold rows);
      ``partitions_unfinished``: planned partitions without a ledger row.
    * ``anomalies``: rows of ``source_anomalies`` checked (``anomaly_kinds`` per kind,
      ``anomalies_lost`` of them losing blocks); ``anomaly_diffs``: anomalies the source
      reports that the run did not store as it reports them (missing, extra, different).

    * ``source_inconsistent`` (source vs itself, not a difference): indices partitions where
      the source's label indices disagree with its own blocks and mapping although the
      export equals both — DVID's index is stored, not derived, and can lag or miss what
      its blocks and mapping say (e.g. supervoxels mapped by ``POST /mappings`` before their
      ``POST /blocks`` get no index). The export holds what DVID answers; only the
      difference counters above make it wrong.

    ``bad_partitions`` holds the keys of the partitions found wrong and ``outside`` the
    places holding rows outside every partition (what ``verify --repair`` redoes / removes).
    """

    run_id: str | None = None
    blocks_source: int = 0
    blocks_checked: int = 0  # exported blocks compared byte for byte
    missing: int = 0
    extra: int = 0
    duplicated: int = 0
    mismatched: int = 0
    export_errors: int = 0
    index_rows: int = 0
    index_diffs: int = 0
    index_vs_blocks: int = 0
    mapping_rows: int = 0
    mapping_diffs: int = 0
    outside_rows: int = 0
    unreadable_files: int = 0
    partitions_unfinished: int = 0
    source_inconsistent: int = 0
    anomalies: int = 0
    anomalies_lost: int = 0
    anomaly_diffs: int = 0
    anomaly_kinds: dict = field(default_factory=dict)
    seconds: float = 0.0
    problems: list = field(default_factory=list)  # human-readable lines, capped
    bad_partitions: set = field(default_factory=set)  # Partition.key of partitions found wrong
    outside: list = field(default_factory=list)  # sink.Outside records (stray files / row ranges)
    repaired: dict | None = None  # what ``verify --repair`` did before this report
    #: kinds the run did not export, with why (the run record's ``not_exported``)
    not_exported: dict = field(default_factory=dict)
    #: the blocks were checked as a volume's chunks, voxel for voxel (a ``Sink.checks`` check)
    volume: bool = False
    before_repair: str | None = None  # the report that found what ``--repair`` redid
    #: per indices partition of the plan: (rows, hash sum) of label_index rows derived from
    #: the exported scale-0 blocks, and of the exported label_index rows themselves
    digest_blocks: np.ndarray | None = None
    digest_index: np.ndarray | None = None

    @contextlib.contextmanager
    def flags(self, part: Partition) -> Iterator[None]:
        """Marks ``part`` for ``--repair`` when the checks run inside find a difference
        (also when they stop with an error part way)."""
        before = self.differences
        try:
            yield
        finally:
            if self.differences > before:
                self.bad_partitions.add(part.key)

    def add(self, line: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(line)

    def merge(self, other: VerifyReport) -> None:
        """Add a partition's report into this one (counters, lines up to the cap, digests)."""
        for f in (*SIZE_COUNTERS, *DIFF_COUNTERS, *SOURCE_COUNTERS):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for line in other.problems:
            self.add(line)
        self.bad_partitions |= other.bad_partitions
        self.outside += other.outside
        for k, n in other.anomaly_kinds.items():
            self.anomaly_kinds[k] = self.anomaly_kinds.get(k, 0) + n
        for f in ("digest_blocks", "digest_index"):
            d = getattr(other, f)
            if d is not None:
                mine = getattr(self, f)
                setattr(self, f, d.copy() if mine is None else mine + d)  # uint64: wraps

    @property
    def differences(self) -> int:
        return sum(getattr(self, f) for f in DIFF_COUNTERS)

    @property
    def ok(self) -> bool:
        return self.differences == 0 and self.run_id is not None

    def counters(self) -> dict[str, int]:
        """Every counter by name (the JSON form of the report)."""
        return {f: int(getattr(self, f)) for f in (*SIZE_COUNTERS, *DIFF_COUNTERS, *SOURCE_COUNTERS)}

    def text(self) -> str:
        lines = [
            f"verify run {self.run_id}: {'OK' if self.ok else 'DIFFERENCES FOUND'}"
            + (" (the export equals the source; the source disagrees with itself, see below)"
               if self.ok and self.source_inconsistent else ""),
            f"  export vs source ({self.differences} differences):",
            f"  blocks      {self.blocks_source:,} in the source, {self.blocks_checked:,} exported and "
            f"{'voxel' if self.volume else 'byte'}-exact checked; missing {self.missing}, extra {self.extra}, duplicated "
            f"{self.duplicated}, different {self.mismatched}, in export_errors {self.export_errors}",
            (f"  label_index {self.not_exported['indices']}" if "indices" in self.not_exported else
             f"  label_index {self.index_rows:,} rows, {self.index_diffs} differences"
             + (f", {self.index_vs_blocks} partitions disagree with the exported blocks"
                if self.index_vs_blocks else "")),
            (f"  mapping     {self.not_exported['mapping']}" if "mapping" in self.not_exported else
             f"  mapping     {self.mapping_rows:,} rows, {self.mapping_diffs} differences"),
        ]
        if self.outside_rows:
            lines.append(f"  {self.outside_rows} rows outside every partition of the run (plain readers see them)")
        if self.unreadable_files:
            lines.append(f"  {self.unreadable_files} files cannot be read")
        if self.partitions_unfinished:
            lines.append(f"  {self.partitions_unfinished} planned partitions are not committed")
        if self.source_inconsistent:
            lines.append(f"  source vs itself: in {self.source_inconsistent} label range(s) the "
                         "source's label indices disagree with its own blocks and mapping; the "
                         "export holds what the source answers (not an export difference)")
        if self.anomalies or self.anomaly_diffs:
            from dvidetl.sources.base import anomaly_summary

            lines.append(f"  anomalies   {anomaly_summary(self.anomaly_kinds, self.anomalies_lost)}, "
                         f"stored in source_anomalies; {self.anomaly_diffs} differences")
        if self.repaired:
            lines.append(f"  repaired first: {len(self.repaired['partitions'])} partitions re-exported, "
                         f"{self.repaired['rows_removed']:,} rows outside every partition removed")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _lists_equal(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Per row: the two list arrays hold the same values (vectorized over flat buffers)."""
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    b = b.combine_chunks() if isinstance(b, pa.ChunkedArray) else b
    la = pc.fill_null(pc.list_value_length(a), -1).to_numpy()
    lb = pc.fill_null(pc.list_value_length(b), -1).to_numpy()
    same = la == lb
    if not len(a):
        return same
    fa = pc.list_flatten(a).to_numpy(zero_copy_only=False).astype(np.uint64)
    fb = pc.list_flatten(b).to_numpy(zero_copy_only=False).astype(np.uint64)
    if len(fa) == len(fb):
        # rows of equal length line up in the flat arrays only if all lengths match
        if same.all():
            rows = np.repeat(np.arange(len(la)), np.maximum(la, 0))
            diff = np.zeros(len(la), bool)
            np.logical_or.at(diff, rows, fa != fb)
            return same & ~diff
    out = same.copy()
    ia = np.concatenate([[0], np.cumsum(np.maximum(la, 0))])
    ib = np.concatenate([[0], np.cumsum(np.maximum(lb, 0))])
    for i in np.flatnonzero(same):  # only when lengths disagree elsewhere (rare, diagnostics)
        out[i] = np.array_equal(fa[ia[i]:ia[i + 1]], fb[ib[i]:ib[i + 1]])
    return out


@dataclass(frozen=True)
class VerifyEnv:
    """What every partition check needs besides its partition (small, picklable)."""

    info: VolumeInfo
    index_bounds: np.ndarray | None  # lo of each indices partition (ascending), if checked
    bad0: np.ndarray  # Morton codes of scale-0 blocks in export_errors (their index rows are skipped)
    #: keys of planned partitions without a ledger row: checked as exporting nothing (their
    #: blocks are missing); rows stored for them anyway are ``outside`` rows
    unfinished: frozenset = frozenset()


def _read_part(sink: Sink, run: RunInfo, part: Partition, table: str, report: VerifyReport,
               env: VerifyEnv) -> pa.Table | None:
    """The partition's rows of ``table`` as stored (all a plain reader sees there), rows
    outside the partition's range counted and dropped; None when the storage is unreadable
    (counted, with the file and the partition named)."""
    from dvidetl.sinks.base import UnreadableFile

    if part.key in env.unfinished:
        return S.empty(table)
    try:
        t = sink.read_partition(run.run_id, table, part)
    except UnreadableFile as exc:
        report.unreadable_files += 1
        report.bad_partitions.add(part.key)
        report.add(f"{exc.path} (partition {part.key}): {exc.reason}")
        return None
    if t.num_rows == 0:
        return t
    if part.spec.scaled:
        k = t.column("morton")
        inside = pc.and_(pc.equal(t.column("scale"), pa.scalar(part.scale, pa.uint8())),
                         pc.and_(pc.greater_equal(k, pa.scalar(part.lo, pa.uint64())),
                                 pc.less(k, pa.scalar(part.hi, pa.uint64()))))
    else:
        k = t.column(S.KEY_COLUMN[table])
        inside = pc.greater_equal(k, pa.scalar(part.lo, pa.uint64()))
        if part.hi < KEY_END:
            inside = pc.and_(inside, pc.less(k, pa.scalar(part.hi, pa.uint64())))
    n_out = t.num_rows - int(pc.sum(pc.cast(inside, pa.int64())).as_py() or 0)
    if n_out:
        report.outside_rows += n_out
        report.bad_partitions.add(part.key)
        report.add(f"{sink.location(table, part, run.run_id)} (partition {part.key}): {n_out} rows "
                   "outside the partition's range")
        t = t.filter(inside)
    return t


def verify_block_partition(client: FlightClient, sink: Sink, run: RunInfo, part: Partition,
                           env: VerifyEnv, report: VerifyReport) -> None:
    """Check one block partition: every source block once, byte-exact, lists and labels."""
    from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA

    batches = list(client.read_blocks(part.scale, part.lo, part.hi))  # none: the source has none there now
    src = pa.Table.from_batches(batches) if batches else BLOCKS_WIRE_SCHEMA.empty_table()
    report.blocks_source += src.num_rows
    exp = _read_part(sink, run, part, "blocks", report, env)
    ov = _read_part(sink, run, part, "block_overflow", report, env)
    errs = _read_part(sink, run, part, "export_errors", report, env)
    if exp is None or ov is None or errs is None:
        return  # reported (the file, the partition); its blocks cannot be compared
    with report.flags(part):
        _compare_blocks(client, part, env, report, src, exp, ov, errs)


def _compare_blocks(client: FlightClient, part: Partition, env: VerifyEnv, report: VerifyReport,
                    src: pa.Table, exp: pa.Table,
                    ov: pa.Table, errs: pa.Table) -> None:
    from dvidetl.codec import repack, restore_block, unwrap

    info = env.info
    codec = info.codec
    err_m = np.unique(errs.column("morton").to_numpy()) if errs.num_rows else np.zeros(0, np.uint64)
    sm = src.column("morton").to_numpy() if src.num_rows else np.zeros(0, np.uint64)
    em = exp.column("morton").to_numpy() if exp.num_rows else np.zeros(0, np.uint64)
    where = _Where(part.scale, info.scale(part.scale).grid)

    uniq, cnt = np.unique(em, return_counts=True)
    for m in uniq[cnt > 1]:
        report.duplicated += 1
        report.add(f"{where(m)}: exported {int(cnt[uniq == m][0])} times")
    for m in np.setdiff1d(uniq, sm):
        report.extra += 1
        report.add(f"{where(m)}: exported but not in the source")
    in_err = np.setdiff1d(np.intersect1d(sm, err_m), uniq)
    report.export_errors += len(in_err)
    for m in in_err[:10]:
        r = errs.filter(pc.equal(errs.column("morton"), m)).column("reason")[0].as_py()
        report.add(f"{where(m)}: in export_errors ({r})")
    for m in np.setdiff1d(np.setdiff1d(sm, uniq), err_m):
        report.missing += 1
        report.add(f"{where(m)}: in the source but not exported")
    # compare the blocks present on both sides, in source order
    common = np.intersect1d(sm, uniq)
    if len(common) == 0:
        return
    si = np.searchsorted(sm, common) if np.all(sm[1:] >= sm[:-1]) else _index_of(sm, common)
    order_e = np.argsort(em, kind="stable")
    ei = order_e[np.searchsorted(em[order_e], common)]
    s = src.take(pa.array(si))
    e = reassemble(exp.take(pa.array(ei)), ov)
    rp = repack(s.column("data"), codec)
    flags = _Flags(len(common))
    flag = flags.flag

    src_err = np.asarray(pc.is_valid(rp.errors)) if rp.errors.null_count != len(rp.errors) else np.zeros(len(common), bool)
    flag(src_err, "source block does not parse now")
    flag(~_lists_equal(e.column("supervoxels"), rp.supervoxels.cast(pa.list_(pa.uint64()))), "supervoxels differ")
    flag(~_lists_equal(e.column("sv_voxels"), rp.sv_voxels.cast(pa.list_(pa.uint32()))), "sv_voxels differ")
    flag(e.column("raw_size").to_numpy() != rp.raw_size.to_numpy(zero_copy_only=False), "raw_size differs")
    flag(e.column("crc32").to_numpy() != rp.crc32.to_numpy(zero_copy_only=False), "crc32 differs")
    for c in ("x", "y", "z"):
        flag(e.column(c).to_numpy() != s.column(c).to_numpy(), f"{c} differs")
    svs = e.column("supervoxels").combine_chunks()
    flat = pc.list_flatten(svs).to_numpy(zero_copy_only=False)
    uq = np.unique(flat)
    bodies = np.asarray(client.map_supervoxels(uq), np.uint64) if len(uq) else np.zeros(0, np.uint64)
    want_labels = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(pc.list_value_length(svs).to_numpy())]).astype(np.int32)),
        pa.array(bodies[np.searchsorted(uq, flat)] if len(flat) else np.zeros(0, np.uint64), pa.uint64()),
    )
    flag(~_lists_equal(e.column("labels"), want_labels), "labels differ from the server's mapping")
    # byte-exact: restore each block (C: zstd) and compare with the source's unwrapped bytes
    sdata = s.column("data").to_pylist()
    epayload = e.column("payload").to_pylist()
    ecrc = e.column("crc32").to_numpy()
    sv_off = np.concatenate([[0], np.cumsum(pc.list_value_length(svs).to_numpy())])
    for i in range(len(common)):
        try:
            got = restore_block(flat[sv_off[i]:sv_off[i + 1]], epayload[i])
            want = unwrap(sdata[i], codec)
        except Exception as exc:  # noqa: BLE001 — reported by coordinates
            flags.one(i, f"cannot restore: {exc}")
            continue
        if bytes(got) != bytes(want):
            flags.one(i, "reassembled bytes differ from the source")
        elif zlib.crc32(got) != int(ecrc[i]):
            flags.one(i, "crc32 of the reassembled block differs")
    report.blocks_checked += int((~flags.bad).sum())
    report.mismatched += int(flags.bad.sum())
    for i in np.flatnonzero(flags.bad)[:10]:
        report.add(f"{where(common[i])}: {', '.join(flags.why[i])}")
    if env.index_bounds is not None and part.scale == 0:
        report.digest_blocks = _digest(_index_rows_from_blocks(e), env.index_bounds)


def verify_volume_partition(client: FlightClient, sink: PrecomputedSink, run: RunInfo,
                            part: Partition, env: VerifyEnv, report: VerifyReport) -> None:
    """A blocks partition of a volume sink (``precomputed://``, ``Sink.checks``): every
    chunk of its shard is decoded (``codec.cseg.decode_chunk``, which shares nothing with the
    encoder but the format) and compared voxel for voxel with the source block, decoded and
    mapped (bodies, or supervoxels with ``supervoxels=true``), over the chunk's in-volume
    extent. A source block whose voxels are all 0 there must have no chunk (none is written);
    every other source block must have exactly its chunk. Counted as for a tabular sink:
    ``missing``, ``extra`` (a chunk no source block has), ``mismatched`` (voxels differ, or
    the chunk cannot be decoded), ``export_errors``; an unreadable or deleted shard is one
    ``unreadable_files``."""
    from dvidetl.sinks.base import UnreadableFile
    from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA

    batches = list(client.read_blocks(part.scale, part.lo, part.hi))
    src = pa.Table.from_batches(batches) if batches else BLOCKS_WIRE_SCHEMA.empty_table()
    report.blocks_source += src.num_rows
    errs = _read_part(sink, run, part, "export_errors", report, env)
    try:
        chunks = {} if part.key in env.unfinished else sink.read_chunks(run.run_id, part)
    except UnreadableFile as exc:
        report.unreadable_files += 1
        report.bad_partitions.add(part.key)
        report.add(f"{exc.path} (partition {part.key}): {exc.reason}")
        return
    if errs is None:
        return
    with report.flags(part):
        _compare_volume(client, sink, part, env, report, src, chunks, errs)


def _compare_volume(client: FlightClient, sink: PrecomputedSink, part: Partition, env: VerifyEnv,
                    report: VerifyReport, src: pa.Table,
                    chunks: dict, errs: pa.Table) -> None:
    from dvidetl.codec import decode_block, join_block, repack, split_block
    from dvidetl.codec.cseg import decode_chunk
    from dvidetl.codec.ngshard import ShardFormatError, chunk_ids, chunk_shapes, decode_chunk_data

    sc = sink.scale_info(part.scale)
    sh = sink.sharding(part.scale)
    where = _Where(part.scale, env.info.scale(part.scale).grid)
    err_m = set(errs.column("morton").to_pylist()) if errs.num_rows else set()
    n = src.num_rows
    sm = src.column("morton").to_numpy() if n else np.zeros(0, np.uint64)
    x, y, z = ((src.column(c).to_numpy() if n else np.zeros(0, np.int32)) for c in ("x", "y", "z"))
    ids = chunk_ids(x, y, z, sc) if n else np.zeros(0, np.uint64)
    shapes = chunk_shapes(x, y, z, sc) if n else np.zeros((0, 3), np.int64)
    stored = np.array(sorted(chunks), np.uint64)
    for cid in np.setdiff1d(stored, ids).tolist():
        report.extra += 1
        report.add(f"{sink.location('blocks', part, None)}: chunk {cid} is not a block of the source "
                   f"in {part.where('blocks')}")
    if n == 0:
        return
    rp = repack(src.column("data"), env.info.codec, keep_raw=True, payload=False)  # no zstd: unused
    bad_src = np.asarray(pc.is_valid(rp.errors)) if rp.errors.null_count != n else np.zeros(n, bool)
    assert rp.raw is not None  # keep_raw=True
    raws = rp.raw.to_pylist()
    svs = rp.supervoxels.cast(pa.list_(pa.uint64()))
    supervoxels = bool(getattr(sink, "supervoxels", False))
    if not supervoxels:
        flat = pc.list_flatten(svs).to_numpy(zero_copy_only=False)
        uq = np.unique(flat)
        bodies = np.asarray(client.map_supervoxels(uq), np.uint64) if len(uq) else np.zeros(0, np.uint64)
    checked = 0
    for i in range(n):
        m, cid = int(sm[i]), int(ids[i])
        here = f"{where(m)} (chunk {cid})"
        if m in err_m and cid not in chunks:
            report.export_errors += 1
            report.add(f"{here}: in export_errors")
            continue
        if bad_src[i]:
            report.mismatched += 1
            report.add(f"{here}: the source block does not parse now ({rp.errors[i].as_py()})")
            continue
        cx, cy, cz = (int(v) for v in shapes[i])
        if min(cx, cy, cz) < 1:
            report.missing += 1
            report.add(f"{here}: outside the info's volume, not in export_errors")
            continue
        table, body = split_block(raws[i])
        if not supervoxels:
            table = bodies[np.searchsorted(uq, np.asarray(table, np.uint64))]
        want = decode_block(join_block(np.asarray(table, np.uint64), body))[:cz, :cy, :cx]
        if cid not in chunks:
            if want.any():
                report.missing += 1
                report.add(f"{here}: in the source but its chunk is not in the shard")
            else:
                checked += 1  # all background: not written, as readers expect
            continue
        try:
            got = decode_chunk(decode_chunk_data(chunks[cid], sh, cid), (cx, cy, cz))
        except (ShardFormatError, ValueError) as exc:
            report.mismatched += 1
            report.add(f"{here}: the chunk cannot be decoded ({first_line(exc)})")
            continue
        if not np.array_equal(got, want):
            report.mismatched += 1
            report.add(f"{here}: {int((got != want).sum()):,} of {want.size:,} voxels differ from the source")
            continue
        checked += 1
    report.blocks_checked += checked


def verify_gaps(client: FlightClient, run: RunInfo, report: VerifyReport, scales=None) -> None:
    """Blocks the plan does not cover at all (a planner or count bug must not hide them)."""
    info = client.info()
    planned = {p.scale for p in run.partitions if p.spec.scaled}
    planned |= set(run.options.scales or ())
    for scale in sorted(planned):
        if scales is not None and scale not in scales:
            continue
        where = _Where(scale, info.scale(scale).grid)
        for lo, hi in _gaps(run, scale, info.scale(scale).morton_end):
            for b in client.read_blocks(scale, lo, hi):
                report.blocks_source += b.num_rows
                report.missing += b.num_rows
                for m in b.column("morton").to_numpy()[:5]:
                    report.add(f"{where(m)}: in the source but outside every planned partition")



def _gaps(run: RunInfo, scale: int, end: int) -> list[tuple[int, int]]:
    """Morton ranges of one scale that no planned partition covers."""
    return uncovered(((p.lo, p.hi) for p in run.partitions if p.spec.scaled and p.scale == scale), end)


class _Where:
    """Block coordinates of a Morton code, for messages."""

    def __init__(self, scale: int, grid):
        self.scale, self.grid = scale, grid

    def __call__(self, m) -> str:
        from dvidetl.geometry import morton_decode

        x, y, z = morton_decode(np.asarray([m], np.uint64), self.grid)
        return f"scale {self.scale} block ({int(x[0])}, {int(y[0])}, {int(z[0])})"


class _Flags:
    """Which compared blocks differ, and why."""

    def __init__(self, n: int):
        self.bad = np.zeros(n, bool)
        self.why: list[list[str]] = [[] for _ in range(n)]

    def flag(self, mask, text: str) -> None:
        for i in np.flatnonzero(mask):
            self.bad[i] = True
            self.why[i].append(text)

    def one(self, i: int, text: str) -> None:
        self.bad[i] = True
        self.why[i].append(text)


def _index_of(sorted_or_not: np.ndarray, values: np.ndarray) -> np.ndarray:
    order = np.argsort(sorted_or_not, kind="stable")
    return order[np.searchsorted(sorted_or_not[order], values)]


def _index_rows_from_blocks(blocks: pa.Table) -> pa.Table:
    """(label, supervoxel, x, y, z, morton, voxels) summed per block from exported rows."""
    lens = pc.list_value_length(blocks.column("supervoxels").combine_chunks()).to_numpy()
    rep = lambda c: np.repeat(blocks.column(c).to_numpy(), lens)  # noqa: E731
    t = pa.table({
        "label": pc.list_flatten(blocks.column("labels").combine_chunks()),
        "supervoxel": pc.list_flatten(blocks.column("supervoxels").combine_chunks()),
        "x": rep("x"), "y": rep("y"), "z": rep("z"), "morton": rep("morton"),
        "voxels": pc.list_flatten(blocks.column("sv_voxels").combine_chunks()).cast(pa.uint64()),
    })
    t = t.filter(pc.not_equal(t.column("label"), pa.scalar(0, pa.uint64())))  # ids >= 2**63
    return t.group_by(["label", "supervoxel", "x", "y", "z", "morton"]).aggregate([("voxels", "sum")])


_K = [np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                              0x27D4EB2F165667C5, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _row_hash(t: pa.Table) -> np.ndarray:
    """A 64-bit hash of each (label, supervoxel, x, y, z, voxels) row (splitmix-style mixing,
    vectorized; uint64 arithmetic wraps by design)."""
    def col(name):
        return t.column(name).to_numpy().astype(np.uint64)

    xyz = ((col("x") & np.uint64(0x1FFFFF)) << np.uint64(42)) | ((col("y") & np.uint64(0x1FFFFF)) << np.uint64(21)) \
        | (col("z") & np.uint64(0x1FFFFF))
    h = col("label") * _K[0] ^ col("supervoxel") * _K[1] ^ xyz * _K[2] ^ col("voxels") * _K[3]
    h ^= h >> np.uint64(31)
    h *= _K[4]
    h ^= h >> np.uint64(29)
    h *= _K[5]
    return h ^ (h >> np.uint64(32))


def _digest(rows: pa.Table, bounds: np.ndarray) -> np.ndarray:
    """(rows, wrapping hash sum) of ``rows`` per indices partition (``bounds``: their lo)."""
    out = np.zeros((len(bounds), 2), np.uint64)
    if rows.num_rows == 0:
        return out
    if "voxels" not in rows.column_names:
        rows = rows.rename_columns([("voxels" if c == "voxels_sum" else c) for c in rows.column_names])
    h = _row_hash(rows)
    part = np.searchsorted(bounds, rows.column("label").to_numpy().astype(np.uint64), "right") - 1
    order = np.argsort(part, kind="stable")
    part, h = part[order], h[order]
    starts = np.flatnonzero(np.concatenate([[True], part[1:] != part[:-1]]))
    out[part[starts], 0] = np.diff(np.append(starts, len(part))).astype(np.uint64)
    out[part[starts], 1] = np.add.reduceat(h, starts)
    return out


_INDEX_KEYS = ["label", "supervoxel", "x", "y", "z"]


def verify_index_partition(client: FlightClient, sink: Sink, run: RunInfo, part: Partition,
                           env: VerifyEnv, report: VerifyReport) -> None:
    """One indices partition: the exported label_index rows of its label range equal the
    source's label indices (decoded afresh), and their digest is kept for the cross-check
    against the exported scale-0 blocks."""
    idx = _read_part(sink, run, part, "label_index", report, env)
    if idx is None:
        return
    with report.flags(part):
        _compare_index(client, part, env, report, idx)


def _compare_index(client: FlightClient, part: Partition, env: VerifyEnv, report: VerifyReport,
                   idx: pa.Table) -> None:
    from dvidetl.export.transform import label_index_tables

    report.index_rows += idx.num_rows
    grid0 = env.info.scale(0).grid
    src_parts = list(label_index_tables(client.read_indices(part.lo, part.hi), grid0))
    src = pa.concat_tables(src_parts) if src_parts else S.empty("label_index")
    where = f"label_index [{part.lo}, {part.hi})"
    got = idx.select([*_INDEX_KEYS, "voxels"]).group_by(_INDEX_KEYS).aggregate(
        [("voxels", "sum"), ("voxels", "count")]).rename_columns([*_INDEX_KEYS, "got", "n"])
    dup = got.filter(pc.greater(got.column("n"), 1))
    report.index_diffs += dup.num_rows
    for r in dup.slice(0, 5).to_pylist():
        report.add(f"label_index: label {r['label']} supervoxel {r['supervoxel']} block ({r['x']}, {r['y']}, {r['z']}) listed {r['n']} times")
    want = src.select([*_INDEX_KEYS, "voxels"]).rename_columns([*_INDEX_KEYS, "want"])
    j = got.join(want, keys=_INDEX_KEYS, join_type="full outer")
    g = pc.fill_null(j.column("got").cast(pa.uint64()), 0)
    w = pc.fill_null(j.column("want").cast(pa.uint64()), 0)
    diff = j.filter(pc.not_equal(g, w))
    report.index_diffs += diff.num_rows
    for r in diff.slice(0, 10).to_pylist():
        report.add(f"{where}: label {r['label']} supervoxel {r['supervoxel']} block ({r['x']}, {r['y']}, "
                   f"{r['z']}): exported {r['got'] or 0} voxels, the source's index says {r['want'] or 0}")
    # the cross-check leaves out blocks the run put in export_errors (reported as such)
    if env.bad0.size and idx.num_rows:
        idx = idx.filter(pa.array(~np.isin(idx.column("morton").to_numpy(), env.bad0)))
    assert env.index_bounds is not None  # set whenever indices partitions are checked
    report.digest_index = _digest(idx, env.index_bounds)


def verify_mapping_partition(client: FlightClient, sink: Sink, run: RunInfo, part: Partition,
                             env: VerifyEnv, report: VerifyReport) -> None:
    """One mapping partition: the exported pairs of its supervoxel range equal the source's."""
    exp = _read_part(sink, run, part, "mapping", report, env)
    if exp is None:
        return
    with report.flags(part):
        _compare_mapping(client, part, report, exp)


def _compare_mapping(client: FlightClient, part: Partition, report: VerifyReport,
                     exp: pa.Table) -> None:
    src_b = list(client.read_mapping(part.lo, part.hi))
    src = pa.Table.from_batches(src_b) if src_b else S.empty("mapping")
    report.mapping_rows += exp.num_rows
    if src.num_rows == 0 and exp.num_rows == 0:
        return
    a = exp.select(["supervoxel", "body"]).sort_by("supervoxel")
    b = src.select(["supervoxel", "body"]).cast(S.MAPPING).sort_by("supervoxel")
    if a.num_rows != b.num_rows or not a.equals(b):
        j = a.join(b, keys="supervoxel", join_type="full outer", left_suffix="_exp", right_suffix="_src")
        bad = j.filter(pc.invert(pc.fill_null(pc.equal(j.column("body_exp"), j.column("body_src")), False)))
        dup = a.num_rows - len(np.unique(a.column("supervoxel").to_numpy()))
        report.mapping_diffs += max(bad.num_rows + dup, 1)
        if dup:
            report.add(f"mapping [{part.lo}, {part.hi}): {dup} supervoxels exported more than once")
        for r in bad.slice(0, 5).to_pylist():
            report.add(f"mapping: supervoxel {r['supervoxel']}: exported {r['body_exp']}, source {r['body_src']}")


def verify_anomalies_partition(client: FlightClient, sink: Sink, run: RunInfo, part: Partition,
                               env: VerifyEnv, report: VerifyReport) -> None:
    """One anomalies partition: the stored rows are the source's anomalies of its number
    range, column for column (the run id aside)."""
    exp = _read_part(sink, run, part, "source_anomalies", report, env)
    if exp is None:
        return
    src_b = list(client.read_anomalies(part.lo, part.hi))
    src = pa.Table.from_batches(src_b).replace_schema_metadata(None) if src_b else \
        S.empty("source_anomalies").drop_columns(["run_id"])
    exp = exp.drop_columns(["run_id"]).sort_by("seq")
    report.anomalies += exp.num_rows
    report.anomalies_lost += int(pc.sum(pc.cast(exp.column("lost"), pa.int64())).as_py() or 0)
    from dvidetl.sources.base import anomaly_counts

    for k, n in anomaly_counts(exp).items():
        report.anomaly_kinds[k] = report.anomaly_kinds.get(k, 0) + n
    src = src.cast(exp.schema).sort_by("seq")
    if exp.equals(src):
        return
    j = exp.join(src, keys="seq", join_type="full outer", left_suffix="_exp", right_suffix="_src")
    cols = [c for c in exp.column_names if c != "seq"]
    same = None
    for c in cols:
        a, b = j.column(f"{c}_exp"), j.column(f"{c}_src")
        eq = pc.or_kleene(pc.equal(a, b), pc.and_(pc.is_null(a), pc.is_null(b)))
        eq = pc.fill_null(eq, False)
        same = eq if same is None else pc.and_(same, eq)
    bad = j.filter(pc.invert(same)).sort_by("seq")
    dup = exp.num_rows - len(np.unique(exp.column("seq").to_numpy()))
    report.anomaly_diffs += max(bad.num_rows + dup, 1)
    report.bad_partitions.add(part.key)
    for r in bad.slice(0, 5).to_pylist():
        report.add(f"source_anomalies seq {r['seq']}: stored {r['kind_exp']} {r['detail_exp']!r}, "
                   f"the source reports {r['kind_src']} {r['detail_src']!r}")


def verify_unstored_anomalies(client: FlightClient, run: RunInfo, report: VerifyReport) -> None:
    """A run without anomalies partitions stored none: the source must report none (a run
    planned by a dvidetl that predates ``source_anomalies``, or a source that changed)."""
    from dvidetl.flight.protocol import TicketError

    if any(p.kind == "anomalies" for p in run.partitions):
        return
    try:
        n = sum(b.num_rows for b in client.read_anomalies())
    except TicketError:
        return  # a server that predates anomalies reports none
    if n:
        report.anomaly_diffs += n
        report.add(f"the source reports {n} anomalies that run {run.run_id} did not store (it was "
                   "planned before dvidetl stored source anomalies, or the source changed since): "
                   "export again to store them")


class _ReadOnce:
    """The source as the checks of one partition see it: each answer (blocks, indices,
    mapping, anomalies of a range; the bodies of a set of supervoxels) is read on first ask
    and handed again to every later check that asks the same, so checking one partition
    against several sinks reads the source once (the project's rule: the source is never
    read twice for one job). Lives for one partition: memory stays bounded by a partition."""

    def __init__(self, client: FlightClient):
        self._client = client
        self._memo: dict = {}

    def _once(self, name: str, *args) -> list:
        key = (name, *args)
        if key not in self._memo:
            self._memo[key] = list(getattr(self._client, name)(*args))
        return self._memo[key]

    def read_blocks(self, scale: int, lo: int, hi: int):
        return iter(self._once("read_blocks", int(scale), int(lo), int(hi)))

    def read_indices(self, lo: int, hi: int):
        return iter(self._once("read_indices", int(lo), int(hi)))

    def read_mapping(self, lo: int = 0, hi: int = KEY_END):
        return iter(self._once("read_mapping", int(lo), int(hi)))

    def read_anomalies(self, lo: int = 0, hi: int = KEY_END):
        return iter(self._once("read_anomalies", int(lo), int(hi)))

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        svs = np.ascontiguousarray(svs, np.uint64)
        key = ("map_supervoxels", svs.tobytes())
        if key not in self._memo:
            self._memo[key] = np.asarray(self._client.map_supervoxels(svs), np.uint64)
        return self._memo[key]

    def info(self) -> VolumeInfo:
        return self._client.info()


def check_partition(client: FlightClient, sink: Sink, run: RunInfo, part: Partition,
                    env: VerifyEnv) -> VerifyReport:
    """The report of one partition (merged by the driver)."""
    rep = VerifyReport(run_id=run.run_id)
    _check_of(sink, part)(client, sink, run, part, env, rep)
    return rep


def check_partition_sinks(client: FlightClient, targets, part: Partition) -> list[VerifyReport]:
    """One partition checked against several sinks (``targets``: (sink, run, env) each),
    the source read once for all of them (``_ReadOnce``); one report per target."""
    src = _ReadOnce(client)
    return [check_partition(src, sink, run, part, env) for sink, run, env in targets]  # type: ignore[arg-type]


def _check_of(sink: Sink, part: Partition):
    """The partition's check: the sink's own for the kind (``Sink.checks``: a volume is not
    the kind's tables), else the kind's."""
    import importlib

    named = getattr(sink, "checks", {}).get(part.kind)
    if named is None:
        return part.spec.function("check")
    modname, _, name = named.partition(":")
    return getattr(importlib.import_module(modname), name)


@dataclass(frozen=True)
class _Envs:
    """Every sink's ``VerifyEnv``, scattered to the workers as one object."""

    envs: tuple


def verify_task(ctxs: tuple, part: Partition, envs: _Envs, which: tuple[int, ...]) -> list[VerifyReport]:
    """A cluster task: check one partition against the sinks ``which`` (their TaskContexts
    ``ctxs``, same order), the source read once for all of them."""
    from dvidetl.export.tasks import release_memory, worker_client, worker_sink

    try:
        targets = []
        for ctx, i in zip(ctxs, which, strict=True):
            sink = worker_sink(ctx)
            targets.append((sink, sink.load_run(ctx.run_id), envs.envs[i]))
        return check_partition_sinks(worker_client(ctxs[0]), targets, part)
    finally:
        release_memory()


def _checked(run: RunInfo, scales) -> list:
    return [p for p in run.partitions
            # scaled kinds by scale; the label indices cross-check the scale-0 blocks
            if scales is None or (p.scale in scales if p.spec.scaled else p.kind != "indices" or 0 in scales)]


def _on_cluster(dask_client: Client, ctxs, jobs, envs: _Envs, window: int | None = None):
    """(partition, sinks, reports) as the cluster finishes them (``driver.TaskWindow``: a
    bounded window in flight); ``jobs``: (partition, indices of the sinks to check it in)."""
    from dvidetl.export.driver import TaskWindow

    env_f = dask_client.scatter(envs, broadcast=True)
    which_of = {p.key: which for p, which in jobs}

    def submit(p):
        which = which_of[p.key]
        return dask_client.submit(verify_task, tuple(ctxs[i] for i in which), p, env_f, which,
                                  pure=False, retries=2,
                                  key=f"verify-{ctxs[which[0]].run_id}-{p.key}-{os.urandom(2).hex()}")

    for p, fut in TaskWindow(dask_client, [p for p, _ in jobs], submit, window):
        yield p, which_of[p.key], fut.result()


def _sparse(d: np.ndarray | None):
    """A per-partition digest kept as its non-zero rows (a partition touches few label ranges)."""
    if d is None:
        return None
    rows = np.flatnonzero(np.any(d != 0, axis=1))
    return rows, d[rows]


@dataclass
class _Side:
    """One sink of a verification: its run, plan share, environment, and the report of each
    of its partitions checked so far (digests sparse), so a re-check after ``--repair``
    replaces only the partitions it redid."""

    sink: Sink
    run: RunInfo
    scales: object
    not_exported: dict
    volume: bool
    parts: list
    done: set
    env: VerifyEnv
    idx_parts: list
    held: dict = field(default_factory=dict)  # Partition.key -> (report, sparse digests)
    globals_: VerifyReport | None = None  # gaps and unstored anomalies (per run, shared)


def _side(client: FlightClient, sink: Sink, run_id: str, scales) -> _Side:
    run = sink.load_run(run_id)
    not_exported = dict(run.record.get("not_exported") or {})
    takes = getattr(sink, "takes", lambda k: True)
    for k in ("indices", "mapping"):  # a run of several sinks: kinds another sink stores
        if k not in not_exported and any(p.kind == k for p in run.partitions) and not takes(k):
            not_exported[k] = (f"not in this sink ({sink.url} stores the volume only); "
                               "another sink of the run holds it")
    parts = [p for p in _checked(run, scales) if takes(p.kind)]
    idx_parts = [p for p in parts if p.kind == "indices"]
    done, env = _ledger_env(client, sink, run, parts, idx_parts)
    return _Side(sink, run, scales, not_exported, "blocks" in getattr(sink, "checks", {}), parts,
                 done, env, idx_parts)


def _ledger_env(client: FlightClient, sink: Sink, run: RunInfo, parts: list,
                idx_parts: list) -> tuple[set, VerifyEnv]:
    """The sink's committed partitions of ``run`` and the checks' environment, read afresh."""
    done = sink.done(run.run_id)
    bounds = np.array([p.lo for p in idx_parts], np.uint64) if idx_parts else None
    bad0 = np.zeros(0, np.uint64)
    if bounds is not None:
        errs = sink.read("export_errors", scale=0, run_id=run.run_id, columns=["morton"])
        if errs.num_rows:
            bad0 = np.unique(errs.column("morton").to_numpy().astype(np.uint64))
    return done, VerifyEnv(client.info(), bounds, bad0, frozenset(p.key for p in parts if p.key not in done))


def _refresh(client: FlightClient, side: _Side) -> None:
    """The side's ledger state and environment, read again (after a repair)."""
    side.done, side.env = _ledger_env(client, side.sink, side.run, side.parts, side.idx_parts)


def _check_sides(client: FlightClient, sides: list[_Side], todo: list[set[str] | None], *,
                 dask_client: Client | None = None, ctxs=None, progress=None) -> None:
    """Check partitions of the sides (``todo[i]``: the keys to check in side i, None: all
    its partitions), each partition once for every side that has it to check: the source
    read once per partition. Each report is kept with its side. ``progress(report, done,
    parts)``: over the partitions, each counted once (its first side's report)."""
    jobs: dict[str, tuple] = {}
    for i, (side, keys) in enumerate(zip(sides, todo, strict=True)):
        for p in side.parts:
            if keys is None or p.key in keys:
                part, which = jobs.get(p.key, (p, ()))
                jobs[p.key] = (part, (*which, i))
    order = list(jobs.values())
    parts = [p for p, _ in order]
    seen = VerifyReport(run_id=sides[0].run.run_id if sides else None)
    if dask_client is None:
        results = ((p, which, check_partition_sinks(
            client, [(sides[i].sink, sides[i].run, sides[i].env) for i in which], p)) for p, which in order)
    else:
        results = _on_cluster(dask_client, ctxs, order, _Envs(tuple(s.env for s in sides)))
    if progress is not None:
        progress(seen, 0, parts)
    for n, (p, which, reps) in enumerate(results, 1):
        for i, rep in zip(which, reps, strict=True):
            sb, si = _sparse(rep.digest_blocks), _sparse(rep.digest_index)
            rep.digest_blocks = rep.digest_index = None
            sides[i].held[p.key] = (rep, sb, si)
        if progress is not None:
            seen.merge(reps[0])
            progress(seen, n, parts)


def _globals(client: FlightClient, sides: list[_Side]) -> None:
    """What each run's plan leaves unchecked by partitions (blocks outside every planned
    partition, anomalies a run did not store): read once per run however many sinks hold it."""
    by_run: dict[str, VerifyReport] = {}
    for side in sides:
        key = side.run.run_id
        if key not in by_run:
            rep = VerifyReport(run_id=key)
            verify_gaps(client, side.run, rep, side.scales)
            verify_unstored_anomalies(client, side.run, rep)
            by_run[key] = rep
        side.globals_ = by_run[key]


def _report(side: _Side, seconds: float) -> VerifyReport:
    """The side's report: its partitions' reports (as last checked) and the run-wide checks."""
    run, sink = side.run, side.sink
    report = VerifyReport(run_id=run.run_id, not_exported=dict(side.not_exported), volume=side.volume)
    for p in side.parts:
        if p.key not in side.done:
            report.partitions_unfinished += 1
            where = f" ({p.where('blocks')})" if p.spec.scaled else ""
            report.add(f"partition {p.key}{where} not committed")
    n_idx = len(side.idx_parts)
    for p in side.parts:
        if p.key not in side.held:
            continue
        rep, sb, si = side.held[p.key]
        report.merge(rep)
        for f, sp in (("digest_blocks", sb), ("digest_index", si)):
            if sp is not None:
                if getattr(report, f) is None:
                    setattr(report, f, np.zeros((n_idx, 2), np.uint64))
                getattr(report, f)[sp[0]] += sp[1]  # uint64: wraps, as merge
    if side.globals_ is not None:
        report.merge(side.globals_)
    if side.scales is None:
        check_outside(sink, run, side.done, report)
    if side.env.index_bounds is not None:
        _compare_digests(report, side.idx_parts,
                         [p.key for p in side.parts if p.kind == "blocks" and p.scale == 0])
    report.seconds = seconds
    return report


def verify_exports(client: FlightClient, sinks: Sequence[Sink], run_ids: Sequence[str | None] | None = None,
                   scales=None, *, dask_client: Client | None = None, ctxs=None,
                   progress=None) -> list[VerifyReport]:
    """``verify_export`` of several sinks in one pass: each partition read from the source
    once and compared with every sink that stores its kind (sinks may hold different runs:
    a partition's source answer is the same). One report per sink, in order; ``ctxs``: each
    sink's TaskContext (with ``dask_client``)."""
    reports, _ = _verify_sides(client, sinks, run_ids, scales, dask_client=dask_client, ctxs=ctxs,
                               progress=progress)
    return reports


def _verify_sides(client: FlightClient, sinks: Sequence[Sink], run_ids: Sequence[str | None] | None,
                  scales, *, dask_client: Client | None = None, ctxs=None,
                  progress=None) -> tuple[list[VerifyReport], tuple[list[_Side], list[int], list | None]]:
    """``verify_exports``, also returning the sides (for ``--repair``'s re-check)."""
    t0 = time.perf_counter()
    run_ids = list(run_ids) if run_ids is not None else [None] * len(sinks)
    out: list[VerifyReport] = [VerifyReport() for _ in sinks]
    sides: list[_Side] = []
    at: list[int] = []
    for i, (sink, rid) in enumerate(zip(sinks, run_ids, strict=True)):
        rid = rid or sink.latest_run()
        if rid is None:
            out[i].add(f"no run found in {sink.url} for {sink.instance}@{sink.uuid}")
            continue
        sides.append(_side(client, sink, rid, scales))
        at.append(i)
    sel_ctxs = [ctxs[i] for i in at] if ctxs is not None else None
    _check_sides(client, sides, [None] * len(sides), dask_client=dask_client, ctxs=sel_ctxs, progress=progress)
    _globals(client, sides)
    seconds = time.perf_counter() - t0
    for i, side in zip(at, sides, strict=True):
        out[i] = _report(side, seconds)
    return out, (sides, at, sel_ctxs)


def verify_export(client: FlightClient, sink: Sink, run_id: str | None = None, scales=None, *,
                  dask_client: Client | None = None,
                  ctx=None, progress=None) -> VerifyReport:
    """The whole check for one run (default: the latest run in the sink), one partition at a
    time: in this process, or as tasks on ``dask_client``'s cluster (``ctx``: the workers'
    TaskContext). Memory is bounded by a partition on either side: the index is compared
    with the source per label range, and with the exported blocks through per-partition
    digests (row count and hash sum of (label, supervoxel, block, voxels)), summed here.

    ``progress(report, parts_done, parts)``: called after every partition (the report so
    far), so a long check is never silent."""
    return verify_exports(client, [sink], [run_id], scales, dask_client=dask_client,
                          ctxs=None if ctx is None else [ctx], progress=progress)[0]


def check_outside(sink: Sink, run: RunInfo, done: set[str], report: VerifyReport) -> None:
    """Rows plain readers see outside every committed partition (stray files, VastDB rows in
    no partition's range): counted, named, kept for ``--repair``."""
    for o in sink.outside(run, done):
        report.outside.append(o)
        if o.rows < 0:
            report.unreadable_files += 1
        else:
            report.outside_rows += o.rows
        report.add(o.where)


def _compare_digests(report: VerifyReport, idx_parts: list, blocks0: list[str]) -> None:
    """Per indices partition: the exported label_index against the exported scale-0 blocks.

    A disagreement is the export's fault when the partition's label_index differs from the
    source's indices, or any scale-0 block partition from the source's blocks (or cannot be
    told apart from it: ``index_vs_blocks``, a difference). When both were found equal to the
    source, the disagreement is the source's own — its stored indices against its blocks
    and mapping — and is reported as such (``source_inconsistent``), not as a difference."""
    z = np.zeros((len(idx_parts), 2), np.uint64)
    a = report.digest_index if report.digest_index is not None else z
    b = report.digest_blocks if report.digest_blocks is not None else z
    blocks_exact = not report.bad_partitions.intersection(blocks0)
    for i in np.flatnonzero(np.any(a != b, axis=1)):
        p = idx_parts[i]
        rows = (f"{int(a[i, 0]):,} label_index rows, {int(b[i, 0]):,} (label, supervoxel, block) "
                "voxel counts of the scale-0 blocks"
                + (" (same rows, different values)" if a[i, 0] == b[i, 0] else ""))
        if blocks_exact and p.key not in report.bad_partitions:
            report.source_inconsistent += 1
            report.add(f"label_index [{p.lo}, {p.hi}): source vs itself: the source's label "
                       f"indices and its blocks and mapping disagree ({rows}); the export equals "
                       "the source's answers (for DVID: an index not rebuilt after its mapping "
                       "or blocks changed, e.g. POST /mappings before POST /blocks)")
            continue
        report.index_vs_blocks += 1
        report.bad_partitions.add(p.key)
        report.add(f"label_index [{p.lo}, {p.hi}): export vs source: {rows} do not match")


def repair_partitions(dask_client: Client, sink: Sink | list[Sink], run: RunInfo, ctx,
                      report: VerifyReport | list[VerifyReport], say=None) -> dict | list[dict]:
    """Re-export exactly the partitions ``report`` found wrong (unreadable, missing,
    extra, duplicated or different rows, not committed) and remove the rows it found outside
    every partition; returns what was done (for the summary and the run's record).
    ``sink`` / ``report``: lists for several sinks of the same run (``ctx``: a TaskContext of
    their URLs, same order) — a partition several of them need is read from the source once
    and written where it was found wrong; one dict per sink then. ``say(line)``: told what
    is about to be done (per sink)."""
    from dvidetl.export.driver import execute
    from dvidetl.redact import redact

    several = isinstance(sink, (list, tuple))
    sinks = list(sink) if isinstance(sink, (list, tuple)) else [sink]
    reports = list(report) if isinstance(report, (list, tuple)) else [report]
    redo, removed = [], []
    for s, rep in zip(sinks, reports, strict=True):
        bad = [p for p in run.partitions if p.key in rep.bad_partitions]
        unfinished = [p for p in run.partitions if s.takes(p.kind) and p.key not in s.done(run.run_id)]
        removed.append(s.remove_outside(run, rep.outside))
        for p in bad:
            s.forget(run.run_id, p)
        redo.append(sorted({p.key for p in bad + unfinished}))
        if say is not None:
            say((f"{redact(s.url)}: " if several else "")
                + f"re-exporting {len(bad)} partitions found wrong"
                + (f" and {len(unfinished)} not committed" if unfinished else "")
                + (f", removed {removed[-1]:,} rows outside every partition" if rep.outside else ""))
    res = execute(dask_client, run, ctx, sinks if several else sinks[0])
    failed = {k for k, _ in res.failed}
    out = []
    for s, keys, n in zip(sinks, redo, removed, strict=True):
        planned = {p.key for p in run.partitions if s.takes(p.kind)}
        if planned <= s.done(run.run_id):
            s.finish(run)
        out.append({"partitions": keys, "rows_removed": n, "failed": sorted(failed.intersection(keys))})
    return out if several else out[0]


def record_verify(sink: Sink, run: RunInfo, report: VerifyReport, scales) -> None:
    """The outcome into the run's record (``verify``: when, exact or not, the counters)."""
    run = sink.load_run(run.run_id)
    run.record["verify"] = {"at": time.time(), "exact": bool(report.ok), "scales": scales,
                            "counters": report.counters(), "seconds": round(report.seconds, 3),
                            **({"repaired": report.repaired} if report.repaired else {})}
    sink.update_run(run)


def verify(source, sink: str | Sequence[str], *, uuid: str | None = None, instance: str | None = None,
           token_file: str | None = None, serve_host: str = "127.0.0.1", run_id: str | None = None,
           scales=None, cluster=None, repair: bool = False, progress=None,
           say=None) -> VerifyReport | list[VerifyReport]:
    """Compare the export at sink URL ``sink`` with its source, block by block, and record
    the outcome with the run; ``repair``: re-export what is wrong, remove rows outside
    every partition, then check again what was redone (needs a cluster).

    ``sink``: one URL (returns its report) or several (returns one report per sink, in
    order): every partition is read from the source once and compared with each sink that
    stores its kind; ``repair`` re-exports a partition once for all the sinks that need it
    and checks again only what it redid, the source read once more per such partition.

    ``source``: as for ``dvidetl.export`` (a ``grpc://`` Flight server, a source URL, or an
    open ``FlightEndpoint``). ``run_id``: default the latest run (of each sink). ``scales``:
    only these. ``cluster``: None checks every partition in this process; else ``"local"``,
    ``"tcp://..."``, ``"slurm"``, a ``ClusterOptions`` or a connected ``distributed.Client``.
    ``progress(report, parts_done, parts)`` after every partition (each counted once, however
    many sinks check it); ``say(line)`` for what ``repair_partitions`` is about to do."""
    from dvidetl.errors import UserError
    from dvidetl.export.api import _client, endpoint
    from dvidetl.redact import redact
    from dvidetl.sinks import open_sink

    several = not isinstance(sink, str)
    urls = [sink] if isinstance(sink, str) else list(sink)
    if repair and scales is not None:
        raise UserError("--repair checks the whole export: drop --scales")
    with endpoint(source, uuid=uuid, instance=instance, token_file=token_file,
                  serve_host=serve_host) as ep:
        sinks, runs = [], []
        for url in urls:
            # the export is named by the full UUID the source resolved the asked name to
            s = open_sink(url, uuid=ep.info.uuid, instance=ep.instance)
            s.check(write=False)
            rid = run_id or s.latest_run()
            if rid is None:
                raise UserError(f"no run found in {redact(url)} for {s.instance}@{s.uuid}: "
                                "nothing to verify (export it first with `dvidetl run`)")
            sinks.append(s)
            runs.append(s.load_run(rid))
        run_ids = [r.run_id for r in runs]
        if cluster is None and not repair:
            reports = verify_exports(ep.client, sinks, run_ids, scales, progress=progress)
        else:
            from dvidetl.export.tasks import task_context

            ctxs = [task_context(r, ep, url) for r, url in zip(runs, urls, strict=True)]
            with _client(cluster or "local", False) as dask_client:
                on = {} if cluster is None else {"dask_client": dask_client}
                reports, (sides, _, sel_ctxs) = _verify_sides(
                    ep.client, sinks, run_ids, scales, ctxs=ctxs, progress=progress, **on)
                if repair and not all(r.ok for r in reports):
                    reports = _repair(ep, dask_client, sides, sel_ctxs if on else None, reports,
                                      on, say)
        for s, r, rep in zip(sinks, runs, reports, strict=True):
            record_verify(s, r, rep, scales)
    return reports if several else reports[0]


def _repair(ep: FlightEndpoint, dask_client: Client, sides: list[_Side], ctxs: list | None,
            reports: list[VerifyReport], on: dict, say) -> list[VerifyReport]:
    """``verify --repair`` after the first check: re-export what each differing sink has
    wrong (one pass per run, a partition read once for every sink that needs it), then
    check again only the partitions redone (the source read once per partition for all of
    them) and report each repaired sink from its kept and re-checked partition reports."""
    from dvidetl.export.tasks import task_context

    t0 = time.perf_counter()
    first = list(reports)
    bad = [i for i, r in enumerate(first) if not r.ok]
    by_run: dict[str, list[int]] = {}
    for i in bad:
        by_run.setdefault(sides[i].run.run_id, []).append(i)
    repaired: dict[int, dict] = {}
    for idx in by_run.values():
        run = sides[idx[0]].run
        ctx = task_context(run, ep, tuple(sides[i].sink.url for i in idx))
        done = repair_partitions(dask_client, [sides[i].sink for i in idx], run, ctx,
                                 [first[i] for i in idx], say)
        assert isinstance(done, list)  # lists in, a list out
        repaired.update(zip(idx, done, strict=True))
    todo: list[set[str] | None] = []
    for i, side in enumerate(sides):
        keys: set[str] = set(repaired[i]["partitions"]) if i in repaired else set()
        if i in repaired:
            bad0 = side.env.bad0
            _refresh(ep.client, side)
            if not np.array_equal(bad0, side.env.bad0):
                # blocks in export_errors changed: every index digest leaves out others now
                keys |= {p.key for p in side.idx_parts}
        todo.append(keys)
    _check_sides(ep.client, sides, todo, ctxs=ctxs, **on)
    out = list(first)
    for i in repaired:
        out[i] = _report(sides[i], first[i].seconds + time.perf_counter() - t0)
        out[i].repaired = repaired[i]
        out[i].before_repair = first[i].text()
    return out
