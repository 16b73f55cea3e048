"""`shards:///dir[?spec=NG_SPEC.json&uuid=U&instance=I]` — DVID ``export-shards`` output.

DVID's exporter writes ``<dir>/s<scale>/<ox>_<oy>_<oz>.arrow`` (an Arrow IPC *stream*, one
record batch per block by default) next to a ``.csv`` sidecar giving each block's byte range
in the stream (dvid-formats §6), and ``export.log`` when the export has finished. How DVID
really writes them — reruns appended as whole new streams, sidecars truncated and written
after their records, killed exports — is in ``sources._shard_files``; this source reads the
files that way:

* **The stream is the truth, the sidecar an index to check.** Each file's message headers
  are walked once (a numba kernel over a memory map: block bytes are never read here); the
  **last stream is the current export** and older streams are superseded copies, never
  exported. Sidecar rows are checked against the records; a row that does not point at its
  block's record is *dangling* (past the end, inside the file at no record, or at another
  block's record) and reported; a record the sidecar does not list (a killed export's empty
  sidecar) is exported all the same.
* **A killed export is readable.** A cut record, a stream without its end marker, a 0-byte
  shard or sidecar, bytes that are no Arrow message: the readable records are exported, the
  rest reported with coordinates where the bytes still hold them.
* **export.log says what the last finished export wrote.** Files written after it mean an
  unfinished rerun; files older than the ones the log counts are left over from an earlier
  run (a block set that lost a whole shard) and are not exported.
* Nothing is silent: every such finding is an anomaly row (``anomalies()``, the
  ``ANOMALIES_SCHEMA`` of ``sources.base``: kind, scale, file, block, blocks it stands for,
  whether blocks are lost, a sentence), stored with the export by the run. A directory is
  refused only when it holds no exportable block at all.

Serving:

* With ``spec`` (the neuroglancer multiscale spec DVID exported with) every scale's grid is
  ``ceil(size / 64)`` and the Morton codes are the real neuroglancer ones; blocks outside it
  (DVID writes some at coarse scales) are exported on a grid grown to hold them, and
  reported. Without a spec the grid is the blocks' bounding box ``max + 1``.
* Blocks are served as stored: ``dvid_compressed_block`` is one zstd frame of the DVID block,
  so ``info().codec == "zstd"``; a Morton range is read by byte ranges of its records.
* The mapping comes from the aligned ``supervoxels``/``labels`` columns of **exactly the
  records that are exported** (non-identity pairs, deduplicated), read once at open with one
  zero-copy read per stream (only the list columns' pages are touched).
* Shards carry no label indices: ``has_indices=False`` and ``read_indices`` yields nothing.
* Path safety: only names matching ``s<digits>`` / ``<digits>_<digits>_<digits>.arrow`` are
  used (nothing from file contents or tickets becomes a path), and scale directories must
  resolve inside the root. Shard *files* may be symlinks (that is how tests assemble a
  directory from the shared data without copying it).
* Older sidecars (``x,y,z,rec`` and ``x,y,z,rec,offset,size``) are checked the same way, and
  Arrow IPC *files* (other tools) are read like streams.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from dvidetl.batching import spans
from dvidetl.errors import UserError
from dvidetl.geometry import KEY_END, ScaleInfo, VolumeInfo, in_grid, morton_encode, vec3
from dvidetl.sources._shard_files import (
    BLOCK,
    M_OFF,
    M_ROWS,
    R_OK,
    W_BAD,
    W_CUT,
    FileScan,
    _load_spec,
    _ScaleIndex,
    _ShardFile,
    match_sidecar,
    read_export_log,
    read_sidecar,
    record_lists,
    scan_file,
)
from dvidetl.sources.base import (
    ANOMALIES_SCHEMA,
    BLOCKS_WIRE_SCHEMA,
    KeyCounts,
    count_sorted,
    drop_background,
    mapping_batches,
    unique_pairs,
)
from dvidetl.urlquery import Query

_SCALE_RE = re.compile(r"^s(\d+)$")
_FILE_RE = re.compile(r"^(\d+)_(\d+)_(\d+)\.arrow$")
_SIDECAR_RE = re.compile(r"^(\d+)_(\d+)_(\d+)\.csv$")

#: bounds of one emitted record batch (payload bytes / blocks)
MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_BLOCKS = 4096
#: byte ranges closer than this are read with one pread
_COALESCE_GAP = 256 << 10
_MAPPING_BATCH = 1 << 20
#: mapping pairs gathered before they are deduplicated (bounds the accumulator)
_PAIRS_COMPACT = 8 << 20


log = logging.getLogger(__name__)


def open_url(url: str) -> ShardsSource:
    """Open ``shards:///dir[?spec=...&uuid=...&instance=...]`` (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme != "shards":
        raise UserError(f"not a shards:// URL: {url!r}")
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise UserError(f"shards URL {url!r} names no directory (use shards:///abs/dir)")
    q = Query(url, ("spec", "uuid", "instance"))
    return ShardsSource(path, spec=q.str("spec"), uuid=q.str("uuid", "*"),
                        instance=q.str("instance", "segmentation"))


@dataclass
class _File:
    """One shard file while the index is built: its scan and the records it exports."""

    scale: int
    path: Path
    scan: FileScan
    time: float  # when it was last written (the shard or its sidecar, the later)
    keep: np.ndarray  # indices of the scan's records that are exported
    rank: int = 0  # order of ``time`` among all files (the newest is the highest)


class ShardsSource:
    """A directory of DVID export-shards files as a `Source` (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        spec: str | None = None,
        uuid: str = "*",
        instance: str = "segmentation",
    ) -> None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise UserError(
                f"shards directory {str(directory)!r} does not exist or is not a directory"
            )
        self.root = root.resolve()
        self.uuid = uuid
        self.instance = instance
        self._spec = _load_spec(spec) if spec else None
        self._spec_path = spec
        self._scales: dict[int, _ScaleIndex] = {}
        self._mapping: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        #: what in the directory is not as DVID's exporter would have written it, each with
        #: its scale, file, block coordinates, the blocks it stands for, whether blocks are
        #: lost, and what was done about it (stored with the export: ``anomalies()``)
        self.anomalies_found: list[dict] = []
        self._table: pa.Table | None = None
        self._build()
        self._report()

    # ------------------------------------------------------------------ anomalies
    def _note(self, kind: str, scale: int | None, path: Path | None, xyz=None, reason: str = "", *,
              blocks: int = 0, lost: bool = False) -> None:
        rel = "" if path is None else os.path.relpath(path, self.root)
        self.anomalies_found.append({
            "kind": kind, "scale": scale, "file": rel, "path": str(path or self.root),
            "block": None if xyz is None else tuple(int(v) for v in xyz),
            "blocks": int(blocks), "lost": bool(lost), "reason": reason})

    @property
    def anomalies(self) -> list[dict]:
        """The anomalies as dicts (kind, scale, file, path, block, blocks, lost, reason);
        ``anomalies_table()`` is the same as rows of ``sources.base.ANOMALIES_SCHEMA``."""
        return self.anomalies_found

    def anomaly_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.anomalies_found:
            out[a["kind"]] = out.get(a["kind"], 0) + 1
        return out

    def anomalies_table(self) -> pa.Table:
        """The anomalies as ``ANOMALIES_SCHEMA`` rows (``seq`` in the order they were found;
        ``morton`` where the block lies inside its scale's grid)."""
        if self._table is None:
            rows = self.anomalies_found
            n = len(rows)
            xyz = np.array([a["block"] if a["block"] is not None else (0, 0, 0) for a in rows],
                           np.int64).reshape(n, 3)
            has = np.array([a["block"] is not None for a in rows], bool)
            scale = np.array([-1 if a["scale"] is None else a["scale"] for a in rows], np.int64)
            morton = np.zeros(n, np.uint64)
            placed = np.zeros(n, bool)
            for s, idx in self._scales.items():
                sel = has & (scale == s)
                g = idx.info.grid
                sel &= in_grid(xyz[:, 0], xyz[:, 1], xyz[:, 2], g)
                morton[sel] = morton_encode(xyz[sel, 0], xyz[sel, 1], xyz[sel, 2], g)
                placed |= sel
            small = has & np.all((xyz >= 0) & (xyz < 2**31), axis=1)
            self._table = pa.table({
                "seq": pa.array(np.arange(n, dtype=np.uint64)),
                "kind": pa.array([a["kind"] for a in rows], pa.string()),
                "scale": pa.array(scale.clip(0, 255).astype(np.uint8), mask=scale < 0),
                "file": pa.array([a["file"] for a in rows], pa.string()),
                **{c: pa.array(xyz[:, i].clip(0, 2**31 - 1).astype(np.int32), mask=~small)
                   for i, c in enumerate("xyz")},
                "morton": pa.array(morton, mask=~placed),
                "blocks": pa.array(np.array([a["blocks"] for a in rows], np.uint64)),
                "lost": pa.array([a["lost"] for a in rows], pa.bool_()),
                "detail": pa.array([a["reason"] for a in rows], pa.string()),
            }, schema=ANOMALIES_SCHEMA)
        return self._table

    def _report(self) -> None:
        """One warning per kind of anomaly found (count and the first examples)."""
        kinds: dict[str, list[dict]] = {}
        for a in self.anomalies_found:
            kinds.setdefault(a["kind"], []).append(a)
        for kind, items in kinds.items():
            ex = "; ".join(f"{a['file'] or '.'}" + (f" block {a['block']}" if a["block"] else "")
                           + f": {a['reason']}" for a in items[:3])
            log.warning("%s: %d x %s (%s)%s", self.root, len(items), kind, ex,
                        " ..." if len(items) > 3 else "")

    # ------------------------------------------------------------------ index
    def _scale_dirs(self) -> list[tuple[int, Path]]:
        out = []
        for entry in sorted(os.listdir(self.root)):
            m = _SCALE_RE.match(entry)
            if not m:
                continue
            p = (self.root / entry).resolve()
            if p.parent != self.root:
                raise UserError(
                    f"{self.root / entry}: scale directory resolves outside {self.root}"
                )
            if p.is_dir():
                out.append((int(m.group(1)), self.root / entry))
        return out

    def _build(self) -> None:
        scale_dirs = self._scale_dirs()
        if not scale_dirs:
            raise UserError(f"{self.root}: no s<scale> directories (not an export-shards output)")
        files: list[_File] = []
        for scale, sdir in scale_dirs:
            names = sorted(os.listdir(sdir))
            for name in names:
                if _FILE_RE.match(name):
                    f = self._read_file(scale, sdir / name)
                    if f is not None:
                        files.append(f)
                elif _SIDECAR_RE.match(name) and name[:-4] + ".arrow" not in names:
                    sc = read_sidecar(sdir / name)
                    self._note("missing_shard", scale, sdir / name, None,
                               f"a sidecar listing {sc.rows} blocks without its .arrow shard: "
                               "those blocks are not in the directory", blocks=sc.rows,
                               lost=sc.rows > 0)
        for rank, k in enumerate(sorted(range(len(files)), key=lambda i: (files[i].time, i))):
            files[k].rank = rank
        self._check_export_log(files, [s for s, _ in scale_dirs])
        for scale, _ in scale_dirs:
            self._drop_duplicates([f for f in files if f.scale == scale])
        self._mapping = self._read_lists(files)
        for scale, _ in scale_dirs:
            self._scales[scale] = self._make_scale_index(scale, [f for f in files if f.scale == scale])
        if files and not any(len(idx.morton) for idx in self._scales.values()) and self.anomalies_found:
            first = self.anomalies_found[0]
            raise UserError(f"{self.root}: no exportable block in {len(files)} shard file(s); "
                            f"{len(self.anomalies_found)} problem(s), the first: "
                            f"{first['file'] or '.'}: {first['reason']}")

    def _read_file(self, scale: int, path: Path) -> _File | None:
        """One shard file: its streams walked, its sidecar checked, its anomalies noted."""
        if not path.is_file():
            self._note("unreadable", scale, path, None, "not a regular file", lost=True)
            return None
        csv = path.with_suffix(".csv")
        st = path.stat()
        time = max(st.st_mtime, csv.stat().st_mtime if csv.is_file() else 0.0)
        if st.st_size == 0:
            scan = FileScan(path, 0, st.st_mtime, False, np.zeros((0, 10), np.int64), [], 0, 0)
            self._note("empty_file", scale, path, None, "0 bytes: the export created this shard "
                       "and was killed before it wrote the first record", lost=True)
        else:
            with pa.memory_map(str(path)) as mm:
                scan = scan_file(path, mm.read_buffer())
            self._note_streams(scale, scan)
        keep = np.flatnonzero(scan.readable)
        if csv.is_file():
            self._check_sidecar(scale, scan, csv)
        bad = np.flatnonzero(~scan.readable)
        if len(bad) and scan.current is not None and not scan.current.problem:
            for r in bad.tolist():
                self._note("bad_record", scale, path, None,
                           f"record {int(scan.rec_row[r])} of the batch at byte "
                           f"{int(scan.msgs[scan.rec_msg[r], M_OFF])}: its block coordinates "
                           "cannot be read; not exported", blocks=1, lost=True)
        neg = keep[np.any(scan.xyz[keep] < 0, axis=1)]
        for r in neg.tolist():
            self._note("bad_record", scale, path, None, f"negative block coordinates "
                       f"{tuple(int(v) for v in scan.xyz[r])}: on no neuroglancer grid; not "
                       "exported", blocks=1, lost=True)
        keep = np.setdiff1d(keep, neg)
        return _File(scale, path, scan, time, keep)

    def _note_streams(self, scale: int, scan: FileScan) -> None:
        path, streams = scan.path, scan.streams
        msgs = scan.msgs
        for i, s in enumerate(streams[:-1]):
            n = int(msgs[s.batches, M_ROWS].sum())
            end = streams[i + 1].start
            self._note("superseded", scale, path, None,
                       f"stream {i + 1} of {len(streams)} (bytes {s.start}..{end}): {n} block "
                       "records an earlier export-shards run into this directory wrote; the last "
                       "stream is the current export, these copies are not exported", blocks=n)
        cur = scan.current
        if scan.orphans:
            self._note("unreadable", scale, path, None, f"{scan.orphans} record batch(es) outside "
                       "any stream (no schema before them): not exported", blocks=scan.orphans,
                       lost=True)
        if cur is None:
            if scan.reason not in (W_BAD, W_CUT):  # those are said below, once
                self._note("unreadable", scale, path, None, "no Arrow IPC stream in it", lost=True)
        elif cur.problem:
            self._note("unreadable", scale, path, None, f"its current stream: {cur.problem}; its "
                       f"{cur.records} records are not exported", blocks=cur.records, lost=True)
        elif cur.writers > 1:
            self._note("interleaved", scale, path, None,
                       f"{cur.writers} writers wrote their streams into this file at once "
                       "(DVID's exporter gives every shard of a non-cubic shard shape the same "
                       f"file name): all their {cur.records} records are read; the sidecar, which "
                       "each of them rewrote, cannot index them")
        if scan.reason == W_BAD:
            self._note("unreadable", scale, path, None, f"bytes {scan.stop}..{scan.size} are not "
                       "Arrow IPC messages; the records before them are read", lost=True)
        elif scan.reason == W_CUT:
            why = ("its writers tore each other's messages apart" if cur is not None and cur.writers > 1
                   else "the export was killed while writing it")
            for xyz, off in scan.cut:
                self._note("truncated", scale, path, xyz,
                           f"the file ends at byte {scan.size} inside this record (it starts at "
                           f"byte {off}): {why}; not exported"
                           + ("" if xyz else " (its block coordinates are not in the file)"),
                           blocks=1, lost=True)
            if not scan.cut:
                self._note("truncated", scale, path, None,
                           f"the file ends inside a message header at byte {scan.size}: the "
                           "export was killed while writing it", lost=True)
        elif cur is not None and not cur.eos and not scan.file_format:
            why = ("its writers tore each other's messages apart" if cur.writers > 1 else
                   "the export stopped writing this shard before finishing it (killed, or still "
                   "running)")
            self._note("unterminated", scale, path, None,
                       f"the current stream has no end-of-stream marker: {why}; its "
                       f"{cur.records} records are read, blocks not in them are missing", lost=True)

    def _check_sidecar(self, scale: int, scan: FileScan, csv: Path) -> None:
        sc = read_sidecar(csv)
        records = len(scan.rec_msg)
        if sc.size == 0 or (sc.rows == 0 and not sc.problems):
            if records:
                self._note("empty_sidecar", scale, csv, None,
                           f"{'0-byte' if sc.size == 0 else 'header-only'} sidecar (DVID writes "
                           "it when the shard is finished, so the export was killed while writing "
                           f"this shard): its {records} records were indexed from the stream")
            return
        status, rec, why = match_sidecar(sc, scan)
        bad = np.flatnonzero(status != R_OK)
        have = {tuple(v) for v in scan.xyz[scan.readable].tolist()} if len(bad) else set()
        for i, reason in zip(bad.tolist(), why, strict=True):
            xyz = (int(sc.x[i]), int(sc.y[i]), int(sc.z[i]))
            lost = xyz not in have
            self._note("dangling_row", scale, csv, xyz if min(xyz) >= 0 else None,
                       f"sidecar row {i + 1}: {reason}; " + ("this block has no record in the "
                       "current stream: not exported" if lost else "the block's record is "
                       "elsewhere in the stream and is exported"), blocks=1, lost=lost)
        if sc.problems:
            self._note("bad_sidecar", scale, csv, None, "; ".join(sc.problems)
                       + f"; {sc.rows} rows read and checked, the records indexed from the stream")
        listed = np.zeros(records, bool)
        listed[rec[rec >= 0]] = True
        unlisted = int((~listed & scan.readable).sum())
        if unlisted and not (scan.current is not None and scan.current.writers > 1):
            self._note("unlisted", scale, scan.path, None,
                       f"{unlisted} records of the current stream are not in the sidecar: indexed "
                       "from the stream and exported", blocks=unlisted)

    def _check_export_log(self, files: list[_File], scales: list[int]) -> None:
        """What ``export.log`` says the last finished export wrote, against the files:
        files older than the ones it counts are an earlier run's leftovers (not exported)."""
        elog = read_export_log(self.root)
        where = self.root / "export.log"
        if elog is None or not elog.finished:
            self._note("no_export_log", None, where, None,
                       ("export.log is incomplete" if elog else "no export.log")
                       + " (DVID writes it when export-shards has finished): dvidetl cannot tell "
                       "whether the export finished, nor whether files of an earlier run into this "
                       "directory are left over; every shard's current stream is exported")
            return
        newer = [f for f in files if f.time > elog.mtime]
        if newer:
            self._note("unfinished_export", None, where, None,
                       f"{len(newer)} shard file(s) (the first: {os.path.relpath(newer[0].path, self.root)}) "
                       "were written after export.log: an export-shards run into this directory "
                       "did not finish (killed, or still running); every shard's current stream "
                       "is exported, and shards that run had not reached hold an earlier run's "
                       "blocks", lost=True)
            return
        for scale in sorted(set(scales) | set(elog.scales)):
            fs = sorted((f for f in files if f.scale == scale and len(f.scan.rec_msg)),
                        key=lambda f: -f.rank)
            written = elog.scales.get(scale, (0, 0))[1]
            cum = np.cumsum([len(f.scan.rec_msg) for f in fs]).tolist()
            if written == 0:
                k = 0
            elif written in cum:
                k = cum.index(written) + 1
            else:
                have = cum[-1] if cum else 0
                self._note("export_log_mismatch", scale, where, None,
                           f"export.log says the export wrote {written} blocks at scale {scale}; "
                           f"the current streams of its {len(fs)} files hold {have}: files are "
                           "missing or were changed after the export; every file's current "
                           "stream is exported", lost=have < written)
                continue
            for f in fs[k:]:
                n = len(f.scan.rec_msg)
                self._note("stale_file", scale, f.path, None,
                           f"not written by the export export.log reports ({written} blocks at "
                           f"scale {scale}, all in newer files): its {n} blocks are left over from "
                           "an earlier export-shards run and are not exported", blocks=n)
                f.keep = f.keep[:0]

    def _drop_duplicates(self, files: list[_File]) -> None:
        """A block with more than one current record in a scale (the same file twice, or two
        files): the record written last is exported, the others reported."""
        fid = np.concatenate([np.full(len(f.keep), i) for i, f in enumerate(files)] or [np.zeros(0, int)])
        rec = np.concatenate([f.keep for f in files] or [np.zeros(0, int)]).astype(np.int64)
        if len(rec) < 2:
            return
        xyz = np.concatenate([f.scan.xyz[f.keep] for f in files])
        rank = np.array([f.rank for f in files])[fid]
        order = np.lexsort((-rec, -rank, xyz[:, 2], xyz[:, 1], xyz[:, 0]))
        sx = xyz[order]
        dup = np.concatenate([[False], np.all(sx[1:] == sx[:-1], axis=1)])
        if not dup.any():
            return
        keeper = order[np.maximum.accumulate(np.where(~dup, np.arange(len(order)), 0))]
        drop = np.zeros(len(rec), bool)
        for j in np.flatnonzero(dup).tolist():
            i, w = int(order[j]), int(keeper[j])
            drop[i] = True
            f, fw = files[fid[i]], files[fid[w]]
            where = ("later in the same stream" if fid[i] == fid[w] else
                     f"also in {os.path.relpath(fw.path, self.root)}, written later")
            self._note("duplicate", f.scale, f.path, xyz[i],
                       f"the block has another record {where}: that one is exported, not this one",
                       blocks=1)
        for i, f in enumerate(files):
            f.keep = rec[(fid == i) & ~drop]

    def _read_lists(self, files: list[_File]) -> tuple[np.ndarray, np.ndarray]:
        """The label lists of exactly the exported records: records that do not decode (or
        whose lists disagree) leave the index, all-background blocks are noted, and the
        non-identity (supervoxel, body) pairs become the mapping — where files disagree about
        a supervoxel, the file written last decides (and the disagreement is reported)."""
        acc_sv: list[np.ndarray] = []
        acc_body: list[np.ndarray] = []
        acc_rank: list[np.ndarray] = []
        for f in files:
            if not len(f.keep):
                continue
            with pa.memory_map(str(f.path)) as mm:
                table, ok = record_lists(mm.read_buffer(), f.scan)
                bad = f.keep[~ok[f.keep]]
                for r in bad.tolist():
                    self._note("bad_record", f.scale, f.path, f.scan.xyz[r],
                               f"the record at byte {int(f.scan.msgs[f.scan.rec_msg[r], M_OFF])} "
                               "does not decode: not exported", blocks=1, lost=True)
                keep = f.keep[ok[f.keep]]
                if table is None or not len(keep):  # nothing of the file decodes (noted above)
                    f.keep = keep
                    continue
                sub = table if len(keep) == table.num_rows else table.take(pa.array(keep))
                svs, bodies = sub.column("supervoxels"), sub.column("labels")
                len_sv = pc.fill_null(pc.list_value_length(svs), -1).to_numpy()
                len_b = pc.fill_null(pc.list_value_length(bodies), -2).to_numpy()
                xyz_t = np.stack([sub.column(c).to_numpy(zero_copy_only=False) for c in
                                  ("chunk_x", "chunk_y", "chunk_z")], 1)
                good = (len_sv == len_b) & np.all(xyz_t == f.scan.xyz[keep], axis=1)
                for j in np.flatnonzero(~good).tolist():
                    self._note("bad_record", f.scale, f.path, f.scan.xyz[keep[j]],
                               "its supervoxels and labels lists differ in length (they must be "
                               "aligned one to one): not exported", blocks=1, lost=True)
                if not good.all():
                    keep, sub = keep[good], sub.filter(pa.array(good))
                    svs, bodies = sub.column("supervoxels"), sub.column("labels")
                    len_sv = len_sv[good]
                f.keep = keep
                sv = pc.list_flatten(svs).to_numpy().astype(np.uint64, copy=True)
                body = pc.list_flatten(bodies).to_numpy().astype(np.uint64, copy=True)
                starts = np.concatenate([[0], np.cumsum(len_sv)[:-1]]).astype(np.int64)
                zero = (len_sv == 1) & (sv[np.minimum(starts, max(len(sv) - 1, 0))] == 0) \
                    if len(sv) else np.zeros(len(keep), bool)
                for j in np.flatnonzero(zero).tolist():
                    self._note("background_block", f.scale, f.path, f.scan.xyz[keep[j]],
                               "all-zero block (label list [0]; DVID's exporter skips these): "
                               "exported as stored")
            nonid = sv != body
            acc_sv.append(sv[nonid])
            acc_body.append(body[nonid])
            acc_rank.append(np.full(int(nonid.sum()), f.rank, np.int64))
            if sum(len(a) for a in acc_sv) > _PAIRS_COMPACT:
                acc_sv, acc_body, acc_rank = (
                    [a] for a in unique_pairs(*map(np.concatenate, (acc_sv, acc_body, acc_rank))))
        if not acc_sv:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        sv, body, rank = unique_pairs(*map(np.concatenate, (acc_sv, acc_body, acc_rank)))
        rank = rank[sv != 0]
        sv, body = drop_background(sv, body, str(self.root))
        clash = np.flatnonzero(np.concatenate([sv[1:] == sv[:-1], [False]]))
        keep = np.ones(len(sv), bool)
        by_rank = sorted(files, key=lambda f: f.rank)
        for i in clash.tolist():
            # pairs of one supervoxel sorted by rank: the last (newest) wins
            j = i
            while j + 1 < len(sv) and sv[j + 1] == sv[i]:
                j += 1
            keep[i:j] = False
            if i == 0 or sv[i - 1] != sv[i]:
                self._note("mapping_conflict", None, by_rank[int(rank[j])].path, None,
                           f"supervoxel {int(sv[i])} is mapped to body {int(body[j])} in this file "
                           "and to " + ", ".join(f"{int(b)}" for b in body[i:j])
                           + " in files written earlier (" + ", ".join(
                               os.path.relpath(by_rank[int(r)].path, self.root) for r in rank[i:j])
                           + f"): {int(body[j])} is exported")
        return sv[keep], body[keep]

    def _make_scale_index(self, scale: int, files: list[_File]) -> _ScaleIndex:
        files = [f for f in files if len(f.keep)]
        shard_files: list[_ShardFile] = []
        parts = []
        for i, f in enumerate(files):
            scan, cur = f.scan, f.scan.current
            assert cur is not None  # records are kept only from a file's current stream
            msg = scan.rec_msg[f.keep]
            complete = scan.complete()
            with pa.memory_map(str(f.path)) as mm:
                schema_msg = bytes(mm.read_at(cur.schema_end - cur.start, cur.start))
            shard_files.append(_ShardFile(
                path=f.path, schema=cur.schema, size=scan.size, file_format=scan.file_format,
                schema_msg=schema_msg, msg_off=scan.msgs[complete, M_OFF],
                msg_end=scan.msg_end(complete)))
            parts.append((scan.xyz[f.keep], scan.msgs[msg, M_OFF], scan.msg_end(msg) - scan.msgs[msg, M_OFF],
                          scan.rec_row[f.keep], np.full(len(f.keep), i, np.int32)))
        if parts:
            xyz, off, size, row, fid = (np.concatenate(c) for c in zip(*parts, strict=True))
        else:
            xyz = np.zeros((0, 3), np.int64)
            off = size = row = np.zeros(0, np.int64)
            fid = np.zeros(0, np.int32)
        x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        if self._spec is not None:
            if scale >= len(self._spec):
                raise UserError(
                    f"{self.root}/s{scale}: the spec {self._spec_path!r} has only "
                    f"{len(self._spec)} scales"
                )
            size_v = [int(v) for v in self._spec[scale]["size"]]
            grid = tuple(math.ceil(v / BLOCK) for v in size_v)
            vmin, vmax = (0, 0, 0), tuple(size_v)
            outside = (x >= grid[0]) | (y >= grid[1]) | (z >= grid[2])
            if outside.any():
                # DVID's exporter writes blocks past the spec's extent at coarse scales: export
                # them, on a grid grown to hold them (the Morton codes change only if an
                # axis then needs another bit)
                grown = (max(grid[0], int(x.max()) + 1), max(grid[1], int(y.max()) + 1),
                         max(grid[2], int(z.max()) + 1))
                same = all(math.ceil(math.log2(max(a, 1))) == math.ceil(math.log2(max(b, 1)))
                           for a, b in zip(grid, grown, strict=True))
                for i in np.flatnonzero(outside).tolist():
                    self._note("outside_grid", scale, files[int(fid[i])].path, xyz[i],
                               f"outside the scale-{scale} grid {grid} of the spec: exported on "
                               f"the grid {grown}" + ("" if same else " (Morton codes of this "
                               "scale then differ from the spec's)"), blocks=1)
                grid = grown
                vmax = tuple(max(v, g * BLOCK) for v, g in zip(vmax, grid, strict=True))
        elif len(x):
            grid = (int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1)
            vmin = (int(x.min()) * BLOCK, int(y.min()) * BLOCK, int(z.min()) * BLOCK)
            vmax = tuple(g * BLOCK for g in grid)
        else:
            grid, vmin, vmax = (1, 1, 1), (0, 0, 0), (0, 0, 0)
        info = ScaleInfo(
            scale=scale, block_size=(BLOCK, BLOCK, BLOCK), grid=vec3(grid), voxel_min=vmin,
            voxel_max=vec3(vmax)
        )
        morton = morton_encode(x, y, z, info.grid)
        order = np.argsort(morton, kind="stable")
        return _ScaleIndex(
            info=info,
            files=shard_files,
            morton=morton[order],
            x=x[order].astype(np.int32),
            y=y[order].astype(np.int32),
            z=z[order].astype(np.int32),
            file_id=fid[order],
            offset=off[order].astype(np.int64),
            size=size[order].astype(np.int64),
            row=row[order].astype(np.int32),
        )

    # ------------------------------------------------------------------ Source
    def info(self) -> VolumeInfo:
        """One labelmap; scales are the ``s<k>`` directories present."""
        return VolumeInfo(
            uuid=self.uuid,
            instance=self.instance,
            codec="zstd",
            scales=[self._scales[s].info for s in sorted(self._scales)],
            has_mapping=True,
            has_indices=False,
        )

    def _scale(self, scale: int) -> _ScaleIndex:
        try:
            return self._scales[scale]
        except KeyError:
            raise UserError(
                f"scale {scale} not in {self.root} (scales {sorted(self._scales)})"
            ) from None

    def count(self, scale: int, cell_bits: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Exact block counts per Morton cell, straight from the sidecar index."""
        idx = self._scale(scale)
        if cell_bits < 0:
            raise UserError(f"count cell_bits must be >= 0, got {cell_bits}")
        cells = idx.morton >> np.uint64(min(cell_bits, 63)) if cell_bits < 64 else np.zeros_like(idx.morton)
        uniq, counts = np.unique(cells, return_counts=True)
        return uniq.astype(np.uint64), counts.astype(np.uint64), True

    def block_range(self, scale: int, lo: int, hi: int) -> tuple[int, int]:
        """Index positions ``[i0, i1)`` of the blocks with ``lo <= morton < hi``."""
        m = self._scale(scale).morton
        lo = max(int(lo), 0)
        hi = max(int(hi), lo)
        top = KEY_END
        i0 = (
            int(np.searchsorted(m, np.uint64(min(lo, top - 1)), side="left"))
            if lo < top
            else len(m)
        )
        i1 = int(np.searchsorted(m, np.uint64(hi), side="left")) if hi < top else len(m)
        return i0, i1

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Blocks with ``lo <= morton < hi`` in ascending Morton order, read by byte range."""
        idx = self._scale(scale)
        i0, i1 = self.block_range(scale, lo, hi)
        # cut at <= MAX_BATCH_BYTES of IPC messages (an upper bound of the payloads)
        for a, b in spans(idx.size[i0:i1], MAX_BATCH_BYTES, MAX_BATCH_BLOCKS):
            yield self._read_span(idx, i0 + a, i0 + b)

    def _read_span(self, idx: _ScaleIndex, a: int, b: int) -> pa.RecordBatch:
        n = b - a
        pieces: list[tuple[np.ndarray, pa.Array]] = []  # (positions in the span, their data)
        xyz_check = np.zeros((n, 3), dtype=np.int64)
        fids = idx.file_id[a:b]
        for fid in np.unique(fids).tolist():
            sf = idx.files[fid]
            pos = np.flatnonzero(fids == fid)
            offs = idx.offset[a:b][pos]
            sizes = idx.size[a:b][pos]
            rows = idx.row[a:b][pos]
            order = np.argsort(offs, kind="stable")
            pos, offs, sizes, rows = pos[order], offs[order], sizes[order], rows[order]
            ends = offs + sizes
            # coalesce neighbouring ranges into spans read with one pread each
            run_end = np.maximum.accumulate(ends)
            new_span = np.concatenate([[True], offs[1:] > run_end[:-1] + _COALESCE_GAP])
            span_ids = np.cumsum(new_span) - 1
            try:
                fd = os.open(sf.path, os.O_RDONLY)
            except FileNotFoundError:
                raise _changed(sf, "the file is gone") from None
            try:
                for s in range(int(span_ids[-1]) + 1):
                    sel = np.flatnonzero(span_ids == s)
                    s_lo = int(offs[sel[0]])
                    s_hi = int(ends[sel].max())
                    buf = os.pread(fd, s_hi - s_lo, s_lo)
                    if len(buf) != s_hi - s_lo:
                        raise _changed(sf, f"it ends at byte {s_lo + len(buf)}, inside a record "
                                           f"that was complete (was {sf.size} bytes)")
                    if self._read_run(
                        sf, buf, s_lo, s_hi, offs[sel], rows[sel], pos[sel], pieces, xyz_check
                    ):
                        continue
                    pbuf = pa.py_buffer(buf)
                    cache: dict[int, pa.RecordBatch] = {}
                    for k in sel.tolist():
                        o = int(offs[k])
                        batch = cache.get(o)
                        if batch is None:
                            batch = self._decode_message(sf, pbuf, o - s_lo, int(sizes[k]), o)
                            cache[o] = batch
                        r = int(rows[k])
                        if r >= batch.num_rows:
                            raise _changed(sf, f"the batch at byte {o} has {batch.num_rows} rows, "
                                               f"not the {r + 1} it had")
                        p = int(pos[k])
                        pieces.append(
                            (pos[k : k + 1], batch.column("dvid_compressed_block").slice(r, 1))
                        )
                        xyz_check[p] = (
                            batch.column("chunk_x")[r].as_py(),
                            batch.column("chunk_y")[r].as_py(),
                            batch.column("chunk_z")[r].as_py(),
                        )
            finally:
                os.close(fd)
        x, y, z = idx.x[a:b], idx.y[a:b], idx.z[a:b]
        bad = np.flatnonzero(
            (xyz_check[:, 0] != x) | (xyz_check[:, 1] != y) | (xyz_check[:, 2] != z)
        )
        if bad.size:
            k = int(bad[0])
            raise _changed(idx.files[int(idx.file_id[a + k])],
                           f"the record at byte {idx.offset[a + k]} is block "
                           f"{tuple(xyz_check[k].tolist())}, it was ({x[k]}, {y[k]}, {z[k]})")
        where = np.concatenate([pc_[0] for pc_ in pieces])
        data = pa.concat_arrays([pc_[1].cast(pa.binary()) for pc_ in pieces])
        if not np.array_equal(where, np.arange(n)):
            data = data.take(pa.array(np.argsort(where, kind="stable")))
        return pa.RecordBatch.from_arrays(
            [
                pa.array(x, pa.int32()),
                pa.array(y, pa.int32()),
                pa.array(z, pa.int32()),
                pa.array(idx.morton[a:b], pa.uint64()),
                data,
            ],
            schema=BLOCKS_WIRE_SCHEMA,
        )

    @staticmethod
    def _read_run(sf, buf, s_lo, s_hi, offs, rows, pos, pieces, xyz_check) -> bool:
        """Fast path: when the span is exactly a run of the file's record-batch messages, read
        it as one IPC stream (schema + run) and take the wanted rows with one vectorized
        ``take`` — no Python per block. False (caller falls back) when it is not such a run."""
        mo, me = sf.msg_off, sf.msg_end
        if mo is None or me is None:
            return False
        i0 = int(np.searchsorted(mo, s_lo))
        i1 = int(np.searchsorted(mo, s_hi))
        if (
            i1 <= i0
            or mo[i0] != s_lo
            or me[i1 - 1] != s_hi
            or np.any(mo[i0 + 1 : i1] != me[i0 : i1 - 1])
        ):
            return False
        try:
            table = ipc.open_stream(
                pa.py_buffer(sf.schema_msg + buf + b"\xff\xff\xff\xff\x00\x00\x00\x00")
            ).read_all()
        except (pa.ArrowInvalid, OSError):
            return False  # let the per-message path name the bad message
        col_x = table.column("chunk_x")
        if col_x.num_chunks != i1 - i0:
            return False
        lens = np.array([len(c) for c in col_x.chunks], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        b = np.searchsorted(mo[i0:i1], offs)
        if np.any(rows >= lens[b]):
            return False
        take = pa.array(starts[b] + rows, pa.int64())
        sub = table.select(["chunk_x", "chunk_y", "chunk_z", "dvid_compressed_block"]).take(take)
        xyz_check[pos, 0] = sub.column(0).to_numpy()
        xyz_check[pos, 1] = sub.column(1).to_numpy()
        xyz_check[pos, 2] = sub.column(2).to_numpy()
        pieces.append((pos, sub.column(3).combine_chunks()))
        return True

    @staticmethod
    def _decode_message(
        sf: _ShardFile, pbuf: pa.Buffer, rel: int, size: int, absolute: int
    ) -> pa.RecordBatch:
        try:
            msg = ipc.read_message(pa.BufferReader(pbuf.slice(rel, size)))
            if msg.type != "record batch":
                raise ValueError(f"message type is {msg.type!r}")
            return ipc.read_record_batch(msg, sf.schema)
        except (pa.ArrowInvalid, ValueError, OSError) as exc:
            raise _changed(sf, f"no valid record batch at byte {absolute} (size {size}): {exc}") from None

    # ------------------------------------------------------------------ mapping
    def _mapping_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._mapping

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel (identity where unmapped); vectorized searchsorted."""
        keys, vals = self._mapping_arrays()
        svs = np.asarray(svs, dtype=np.uint64)
        out = svs.copy()
        if keys.size == 0 or svs.size == 0:
            return out
        pos = np.searchsorted(keys, svs)
        pos_c = np.minimum(pos, keys.size - 1)
        hit = keys[pos_c] == svs
        out[hit] = vals[pos_c[hit]]
        out[svs == 0] = 0  # background is never mapped
        return out

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Non-identity pairs with ``lo <= supervoxel < hi``, sorted by supervoxel."""
        return mapping_batches(*self._mapping_arrays(), lo, hi, _MAPPING_BATCH)

    def count_keys(self, kind: str, cell_bits: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """Exact for the mapping (from the label lists of the exported records); shards carry
        no label indices, so ``indices`` counts nothing."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, cell_bits, lo, hi)
        return count_sorted(np.zeros(0, np.uint64), None, cell_bits, lo, hi)

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Shards carry no label indices (``info().has_indices`` is False)."""
        return iter(())

    def close(self) -> None:
        """Nothing to release: files are opened per read."""


def _changed(sf: _ShardFile, why: str) -> UserError:
    """A file that no longer holds what it held when the source indexed it: a data problem
    (not transient, so never retried as one), most likely an export running into the
    directory."""
    return UserError(f"{sf.path}: {why}: the file changed after the shards source indexed it "
                     "(is an export-shards run writing into this directory?); open the source "
                     "again once it has finished")


__all__ = ["ShardsSource", "open_url"]
