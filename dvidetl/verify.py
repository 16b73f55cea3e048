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

import os
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl import schema as S

MAX_LISTED = 50


@dataclass
class VerifyReport:
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
    mapping_rows: int = 0
    mapping_diffs: int = 0
    partitions_unfinished: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)  # human-readable lines, capped
    #: per indices partition of the plan: (rows, hash sum) of label_index rows derived from
    #: the exported scale-0 blocks, and of the exported label_index rows themselves
    digest_blocks: np.ndarray | None = None
    digest_index: np.ndarray | None = None

    def add(self, line: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(line)

    def merge(self, other: VerifyReport) -> None:
        """Add a partition's report into this one (counters, lines up to the cap, digests)."""
        for f in ("blocks_source", "blocks_checked", "missing", "extra", "duplicated", "mismatched",
                  "export_errors", "index_rows", "index_diffs", "mapping_rows", "mapping_diffs",
                  "partitions_unfinished"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for line in other.problems:
            self.add(line)
        for f in ("digest_blocks", "digest_index"):
            d = getattr(other, f)
            if d is not None:
                mine = getattr(self, f)
                setattr(self, f, d.copy() if mine is None else mine + d)  # uint64: wraps

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.extra or self.duplicated or self.mismatched or self.export_errors
            or self.index_diffs or self.mapping_diffs or self.partitions_unfinished
        ) and self.run_id is not None

    def text(self) -> str:
        lines = [
            f"verify run {self.run_id}: {'OK' if self.ok else 'DIFFERENCES FOUND'}",
            f"  blocks      {self.blocks_source:,} in the source, {self.blocks_checked:,} exported and "
            f"byte-exact checked; missing {self.missing}, extra {self.extra}, duplicated "
            f"{self.duplicated}, different {self.mismatched}, in export_errors {self.export_errors}",
            f"  label_index {self.index_rows:,} rows, {self.index_diffs} differences",
            f"  mapping     {self.mapping_rows:,} rows, {self.mapping_diffs} differences",
        ]
        if self.partitions_unfinished:
            lines.append(f"  {self.partitions_unfinished} planned partitions are not committed")
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

    info: object  # VolumeInfo
    index_bounds: np.ndarray | None  # lo of each indices partition (ascending), if checked
    bad0: np.ndarray  # Morton codes of scale-0 blocks in export_errors (their index rows are skipped)


def verify_block_partition(client, sink, run, part, env: VerifyEnv, report: VerifyReport) -> None:
    """Check one block partition: every source block once, byte-exact, lists and labels."""
    from dvidetl.codec import repack, restore_block, unwrap

    info = env.info
    codec = info.codec
    src = pa.Table.from_batches(list(client.read_blocks(part.scale, part.lo, part.hi)))
    report.blocks_source += src.num_rows
    exp = sink.read("blocks", scale=part.scale, morton_range=(part.lo, part.hi), run_id=run.run_id)
    ov = sink.read("block_overflow", scale=part.scale, morton_range=(part.lo, part.hi), run_id=run.run_id)
    errs = sink.read("export_errors", scale=part.scale, morton_range=(part.lo, part.hi),
                     run_id=run.run_id, columns=["morton", "reason"])
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
    e = S.reassemble(exp.take(pa.array(ei)), ov)
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


def verify_gaps(client, run, report: VerifyReport, scales=None) -> None:
    """Blocks the plan does not cover at all (a planner or count bug must not hide them)."""
    info = client.info()
    planned = {p.scale for p in run.partitions if p.kind == "blocks"}
    planned |= {int(x) for x in (run.options.get("scales") or [])}
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



def _gaps(run, scale: int, end: int) -> list[tuple[int, int]]:
    """Morton ranges of one scale that no planned partition covers."""
    parts = sorted((p.lo, p.hi) for p in run.partitions if p.kind == "blocks" and p.scale == scale)
    out, pos = [], 0
    for lo, hi in parts:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        out.append((pos, end))
    return out


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


def verify_index_partition(client, sink, run, part, env: VerifyEnv, report: VerifyReport) -> None:
    """One indices partition: the exported label_index rows of its label range equal the
    source's label indices (decoded afresh), and their digest is kept for the cross-check
    against the exported scale-0 blocks."""
    from dvidetl.transform import label_index_tables

    idx = sink.read("label_index", run_id=run.run_id, where={"label": (part.lo, part.hi)})
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
    report.digest_index = _digest(idx, env.index_bounds)


def verify_mapping_partition(client, sink, run, part, env: VerifyEnv, report: VerifyReport) -> None:
    """One mapping partition: the exported pairs of its supervoxel range equal the source's."""
    exp = sink.read("mapping", run_id=run.run_id, where={"supervoxel": (part.lo, part.hi)})
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


_CHECKS = {"blocks": verify_block_partition, "indices": verify_index_partition,
           "mapping": verify_mapping_partition}


def check_partition(client, sink, run, part, env: VerifyEnv) -> VerifyReport:
    """The report of one partition (merged by the driver)."""
    rep = VerifyReport(run_id=run.run_id)
    _CHECKS[part.kind](client, sink, run, part, env, rep)
    return rep


def verify_task(ctx, part, env: VerifyEnv) -> VerifyReport:
    """A cluster task: check one partition with the worker's Flight client and sink."""
    from dvidetl.tasks import _client, _sink, release_memory

    sink = _sink(ctx)
    try:
        return check_partition(_client(ctx), sink, sink.load_run(ctx.run_id), part, env)
    finally:
        release_memory()


def _checked(run, scales) -> list:
    return [p for p in run.partitions
            if (p.kind == "blocks" and (scales is None or p.scale in scales))
            or (p.kind == "indices" and (scales is None or 0 in scales)) or p.kind == "mapping"]


def _on_cluster(dask_client, ctx, parts, env: VerifyEnv, window: int | None = None):
    """Partition reports as the cluster finishes them (a bounded window in flight)."""
    from distributed import as_completed

    if window is None:
        window = max(8, 4 * (sum(dask_client.nthreads().values()) or 1))
    env_f = dask_client.scatter(env, broadcast=True)
    pending = iter(parts)
    ac = as_completed()

    def submit() -> bool:
        p = next(pending, None)
        if p is None:
            return False
        ac.add(dask_client.submit(verify_task, ctx, p, env_f, pure=False, retries=2,
                                  key=f"verify-{ctx.run_id}-{p.key}-{os.urandom(2).hex()}"))
        return True

    for _ in range(window):
        if not submit():
            break
    for fut in ac:
        rep = fut.result()
        fut.release()
        submit()
        yield rep


def verify_export(client, sink, run_id: str | None = None, scales=None, *, dask_client=None,
                  ctx=None) -> VerifyReport:
    """The whole check for one run (default: the latest run in the sink), one partition at a
    time: in this process, or as tasks on ``dask_client``'s cluster (``ctx``: the workers'
    TaskContext). Memory is bounded by a partition on either side: the index is compared
    with the source per label range, and with the exported blocks through per-partition
    digests (row count and hash sum of (label, supervoxel, block, voxels)), summed here."""
    run_id = run_id or sink.latest_run()
    report = VerifyReport(run_id=run_id)
    if run_id is None:
        report.add(f"no run found in {sink.url} for {sink.instance}@{sink.uuid}")
        return report
    t0 = time.perf_counter()
    run = sink.load_run(run_id)
    done = sink.done(run_id)
    parts = _checked(run, scales)
    for p in parts:
        if p.key not in done:
            report.partitions_unfinished += 1
            where = f" (scale {p.scale}, morton [{p.lo}, {p.hi}))" if p.kind == "blocks" else ""
            report.add(f"partition {p.key}{where} not committed")
    idx_parts = [p for p in parts if p.kind == "indices"]
    bounds = np.array([p.lo for p in idx_parts], np.uint64) if idx_parts else None
    bad0 = np.zeros(0, np.uint64)
    if bounds is not None:
        errs = sink.read("export_errors", scale=0, run_id=run_id, columns=["morton"])
        if errs.num_rows:
            bad0 = np.unique(errs.column("morton").to_numpy().astype(np.uint64))
    env = VerifyEnv(client.info(), bounds, bad0)
    if dask_client is None:
        reports = (check_partition(client, sink, run, p, env) for p in parts)
    else:
        reports = _on_cluster(dask_client, ctx, parts, env)
    for rep in reports:
        report.merge(rep)
    verify_gaps(client, run, report, scales)
    if bounds is not None:
        _compare_digests(report, idx_parts)
    report.seconds = time.perf_counter() - t0
    return report


def _compare_digests(report: VerifyReport, idx_parts: list) -> None:
    """Per indices partition: the exported label_index against the exported scale-0 blocks."""
    z = np.zeros((len(idx_parts), 2), np.uint64)
    a = report.digest_index if report.digest_index is not None else z
    b = report.digest_blocks if report.digest_blocks is not None else z
    for i in np.flatnonzero(np.any(a != b, axis=1)):
        p = idx_parts[i]
        report.index_diffs += 1
        report.add(f"label_index [{p.lo}, {p.hi}): {int(a[i, 0]):,} exported rows do not match the "
                   f"{int(b[i, 0]):,} (label, supervoxel, block) voxel counts of the exported "
                   "scale-0 blocks" + (" (same rows, different values)" if a[i, 0] == b[i, 0] else ""))
