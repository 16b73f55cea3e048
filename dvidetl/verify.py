"""Compare an export against its source, block by block, byte for byte.

For every block partition of the run's plan: re-read the source's blocks of that Morton
range through Flight, re-read the exported rows, reassemble each block's exact DVID bytes
(``body0..3`` joined with ``binary_join_element_wise`` + overflow parts, label table joined
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
    problems: list = field(default_factory=list)  # human-readable lines, capped

    def add(self, line: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(line)

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


def verify_blocks(client, sink, run, report: VerifyReport, scales=None, *, index_acc=None) -> None:
    """Check every block partition of ``run`` (optionally only ``scales``)."""
    from dvidetl.codec import repack, restore_block, unwrap

    info = client.info()
    codec = info.codec
    done = sink.done(run.run_id)
    errs_all = sink.read("export_errors", run_id=run.run_id)
    for part in run.partitions:
        if part.kind != "blocks" or (scales is not None and part.scale not in scales):
            continue
        if part.key not in done:
            report.partitions_unfinished += 1
            report.add(f"partition {part.key} (scale {part.scale}, morton [{part.lo}, {part.hi})) not committed")
        src = pa.Table.from_batches(list(client.read_blocks(part.scale, part.lo, part.hi)))
        report.blocks_source += src.num_rows
        exp = sink.read("blocks", scale=part.scale, morton_range=(part.lo, part.hi), run_id=run.run_id)
        ov = sink.read("block_overflow", scale=part.scale, morton_range=(part.lo, part.hi), run_id=run.run_id)
        errs = errs_all.filter(
            pc.and_(pc.equal(errs_all.column("scale"), part.scale),
                    pc.and_(pc.greater_equal(errs_all.column("morton"), part.lo),
                            pc.less(errs_all.column("morton"), part.hi)))
        ) if errs_all.num_rows else errs_all
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
            continue
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
        ebody = e.column("body").to_pylist()
        ecrc = e.column("crc32").to_numpy()
        sv_off = np.concatenate([[0], np.cumsum(pc.list_value_length(svs).to_numpy())])
        for i in range(len(common)):
            try:
                got = restore_block(flat[sv_off[i]:sv_off[i + 1]], ebody[i])
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
        if index_acc is not None and part.scale == 0:
            index_acc.append(_index_rows_from_blocks(e))
    # blocks the plan does not cover at all (a planner or count bug must not hide them)
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


def verify_index(sink, run, report: VerifyReport, derived: list[pa.Table]) -> None:
    """``label_index`` vs voxel counts derived from the exported scale-0 blocks."""
    idx = sink.read("label_index", run_id=run.run_id)
    report.index_rows = idx.num_rows
    keys = ["label", "supervoxel", "x", "y", "z"]
    if derived:
        d = pa.concat_tables(derived)
        d = d.group_by(keys).aggregate([("voxels_sum", "sum")]).rename_columns([*keys, "want"])
    else:
        d = pa.table({k: pa.array([], pa.uint64() if k in ("label", "supervoxel") else pa.int32()) for k in keys} | {"want": pa.array([], pa.uint64())})
    # scale-0 blocks the run put in export_errors are reported as such already; their index
    # rows cannot be derived from exported blocks, so they are left out of this comparison
    errs = sink.read("export_errors", run_id=run.run_id)
    errs = errs.filter(pc.equal(errs.column("scale"), 0)) if errs.num_rows else errs
    if errs.num_rows:
        bad = errs.select(["x", "y", "z"]).group_by(["x", "y", "z"]).aggregate([])
        idx = idx.join(bad.append_column("_bad", pa.array(np.ones(bad.num_rows, bool))),
                       keys=["x", "y", "z"], join_type="left outer")
        idx = idx.filter(pc.is_null(idx.column("_bad"))).drop_columns(["_bad"])
    got = idx.select([*keys, "voxels"]).group_by(keys).aggregate([("voxels", "sum"), ("voxels", "count")])
    got = got.rename_columns([*keys, "got", "n"])
    dup = got.filter(pc.greater(got.column("n"), 1))
    report.index_diffs += dup.num_rows
    for r in dup.slice(0, 5).to_pylist():
        report.add(f"label_index: label {r['label']} supervoxel {r['supervoxel']} block ({r['x']}, {r['y']}, {r['z']}) listed {r['n']} times")
    j = got.join(d, keys=keys, join_type="full outer")
    g = pc.fill_null(j.column("got").cast(pa.uint64()), 0)
    w = pc.fill_null(j.column("want").cast(pa.uint64()), 0)
    diff = j.filter(pc.not_equal(g, w))
    report.index_diffs += diff.num_rows
    for r in diff.slice(0, 10).to_pylist():
        report.add(
            f"label_index: label {r['label']} supervoxel {r['supervoxel']} block ({r['x']}, {r['y']}, "
            f"{r['z']}): index says {r['got'] or 0} voxels, blocks say {r['want'] or 0}"
        )


def verify_mapping(client, sink, run, report: VerifyReport) -> None:
    exp = sink.read("mapping", run_id=run.run_id)
    src = pa.Table.from_batches(list(client.read_mapping()))
    report.mapping_rows = exp.num_rows
    if src.num_rows == 0 and exp.num_rows == 0:
        return
    a = exp.sort_by("supervoxel")
    b = src.select(["supervoxel", "body"]).cast(S.MAPPING).sort_by("supervoxel")
    if a.num_rows != b.num_rows or not a.equals(b):
        j = a.join(b, keys="supervoxel", join_type="full outer", left_suffix="_exp", right_suffix="_src")
        bad = j.filter(pc.invert(pc.fill_null(pc.equal(j.column("body_exp"), j.column("body_src")), False)))
        report.mapping_diffs += max(bad.num_rows, 1)
        for r in bad.slice(0, 5).to_pylist():
            report.add(f"mapping: supervoxel {r['supervoxel']}: exported {r['body_exp']}, source {r['body_src']}")


def verify_export(client, sink, run_id: str | None = None, scales=None) -> VerifyReport:
    """The whole check for one run (default: the latest run in the sink)."""
    run_id = run_id or sink.latest_run()
    report = VerifyReport(run_id=run_id)
    if run_id is None:
        report.add(f"no run found in {sink.url} for {sink.instance}@{sink.uuid}")
        return report
    run = sink.load_run(run_id)
    done = sink.done(run_id)
    derived: list = []
    verify_blocks(client, sink, run, report, scales, index_acc=derived)
    kinds = {p.kind: p for p in run.partitions}
    for kind in ("indices", "mapping"):
        p = kinds.get(kind)
        if p is not None and p.key not in done:
            report.partitions_unfinished += 1
            report.add(f"partition {p.key} not committed")
    if "indices" in kinds and (scales is None or 0 in scales):
        verify_index(sink, run, report, derived)
    if "mapping" in kinds:
        verify_mapping(client, sink, run, report)
    return report
