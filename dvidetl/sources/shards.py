"""`shards:///dir[?spec=NG_SPEC.json&uuid=U&instance=I]` — DVID ``export-shards`` output.

DVID's exporter writes ``<dir>/s<scale>/<ox>_<oy>_<oz>.arrow`` (an Arrow IPC *stream*, one
record batch per block by default) next to a ``.csv`` sidecar giving each block's byte range
in the stream (dvid-formats §6). Real shards are multi-GB, so this source never loads a file:
it builds a per-scale Morton index from the CSVs alone and, for a Morton range, reads just the
byte ranges of the IPC messages it needs (``pyarrow.ipc.read_message`` + ``read_record_batch``
with the schema read from the start of the file).

* With ``spec`` (the neuroglancer multiscale spec DVID exported with) every scale's grid is
  ``ceil(size / 64)`` and the Morton codes are the real neuroglancer ones; without it the grid
  is the blocks' bounding box ``max + 1`` (block coordinates are never shifted).
* Blocks are served as stored: ``dvid_compressed_block`` is one zstd frame of the DVID block,
  so ``info().codec == "zstd"``.
* The mapping comes from the aligned ``supervoxels``/``labels`` columns (non-identity pairs,
  deduplicated; one supervoxel mapped to two bodies is an error). It needs a scan of every
  file, done once, lazily, through a memory map (only the list columns' pages are touched).
* Shards carry no label indices: ``has_indices=False`` and ``read_indices`` yields nothing.
* Path safety: only names matching ``s<digits>`` / ``<digits>_<digits>_<digits>.arrow`` are
  used (nothing from file contents or tickets becomes a path), and scale directories must
  resolve inside the root. Shard *files* may be symlinks (that is how tests assemble a
  directory from the shared data without copying it).
* Older sidecars (``x,y,z,rec`` and ``x,y,z,rec,offset,size``) are accepted; for ``rec``-only
  sidecars (or a missing sidecar) the message offsets are found by walking the stream's
  message headers through a memory map, without reading block bytes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from dvidetl.batching import spans
from dvidetl.errors import UserError
from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_encode
from dvidetl.sources._shard_files import (  # noqa: F401 - _load_spec, _scan_messages re-exported
    BLOCK,
    _is_ipc_file,
    _load_spec,
    _read_schema,
    _read_sidecar,
    _ScaleIndex,
    _scan_messages,
    _ShardFile,
)
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    KEY_END,
    KeyCounts,
    count_sorted,
    drop_background,
    mapping_batches,
)
from dvidetl.urlquery import Query

_SCALE_RE = re.compile(r"^s(\d+)$")
_FILE_RE = re.compile(r"^(\d+)_(\d+)_(\d+)\.arrow$")

#: bounds of one emitted record batch (payload bytes / blocks)
MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_BLOCKS = 4096
#: byte ranges closer than this are read with one pread
_COALESCE_GAP = 256 << 10
_MAPPING_BATCH = 1 << 20


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
        self._mapping: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        #: what in the files is not as DVID's exporter should have written it, each with its
        #: file, block coordinates and what was done about it (reported, never silent)
        self.anomalies: list[dict] = []
        self._build_index()
        self._report("index")

    def _note(self, kind: str, path, xyz, reason: str) -> None:
        with self._lock:
            self.anomalies.append({"kind": kind, "path": str(path),
                                   "block": None if xyz is None else tuple(int(v) for v in xyz),
                                   "reason": reason})

    def anomaly_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.anomalies:
            out[a["kind"]] = out.get(a["kind"], 0) + 1
        return out

    def _report(self, when: str, start: int = 0) -> None:
        """One warning per kind of anomaly found (count and the first examples)."""
        new = self.anomalies[start:]
        kinds: dict[str, list[dict]] = {}
        for a in new:
            kinds.setdefault(a["kind"], []).append(a)
        for kind, items in kinds.items():
            ex = "; ".join(f"{Path(a['path']).name}" + (f" block {a['block']}" if a["block"] else "")
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
                out.append((int(m.group(1)), p))
        return out

    def _build_index(self) -> None:
        scale_dirs = self._scale_dirs()
        if not scale_dirs:
            raise UserError(f"{self.root}: no s<scale> directories (not an export-shards output)")
        for scale, sdir in scale_dirs:
            files: list[_ShardFile] = []
            parts: list[dict[str, np.ndarray]] = []
            for name in sorted(os.listdir(sdir)):
                if not _FILE_RE.match(name):
                    continue
                path = sdir / name  # may be a symlink to the real file (tests, shared data)
                if not path.is_file():
                    raise UserError(f"{path}: not a regular file")
                sf = _ShardFile(path=path, schema=_read_schema(path), size=path.stat().st_size,
                                file_format=_is_ipc_file(path))
                csv_path = path.with_suffix(".csv")
                if csv_path.is_file():
                    d = _read_sidecar(csv_path, sf, self._note)
                else:  # no sidecar: walk the stream's message headers
                    moff, msize, mrows = _scan_messages(path, sf.schema)
                    d = self._index_by_scan(sf, moff, msize, mrows)
                d = self._last_copy_only(d, path)
                d["file_id"] = np.full(len(d["x"]), len(files), dtype=np.int32)
                sf.schema_msg = sf.schema.serialize().to_pybytes()
                sf.msg_off, first = np.unique(d["offset"], return_index=True)
                sf.msg_end = sf.msg_off + d["size"][first]
                files.append(sf)
                parts.append(d)
            self._scales[scale] = self._make_scale_index(scale, files, parts)

    def _last_copy_only(self, d: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
        """A block listed twice in one file (an appended rerun): keep the copy written last."""
        key = (d["x"].astype(np.int64) << 42) | (d["y"].astype(np.int64) << 21) | d["z"].astype(np.int64)
        if len(key) < 2:
            return d
        rev = key[::-1]
        _, first_rev = np.unique(rev, return_index=True)
        last = np.sort(len(key) - 1 - first_rev)
        if len(last) == len(key):
            return d
        dropped = np.setdiff1d(np.arange(len(key)), last)
        for i in dropped.tolist():
            self._note("duplicate", path, (d["x"][i], d["y"][i], d["z"][i]),
                       "block listed again later in the same file (a rerun appended it): the "
                       "later copy is exported")
        return {k: v[last] for k, v in d.items()}

    @staticmethod
    def _index_by_scan(sf: _ShardFile, moff, msize, mrows) -> dict[str, np.ndarray]:
        """Index of a file without sidecar: block coordinates need each batch's chunk columns."""
        xs, ys, zs, offs, sizes, rows = [], [], [], [], [], []
        with pa.memory_map(str(sf.path)) as mm:
            for off, size, nrows in zip(
                moff.tolist(), msize.tolist(), mrows.tolist(), strict=False
            ):
                mm.seek(off)
                batch = ipc.read_record_batch(ipc.read_message(mm.read_buffer(size)), sf.schema)
                xs.append(batch.column("chunk_x").to_numpy())
                ys.append(batch.column("chunk_y").to_numpy())
                zs.append(batch.column("chunk_z").to_numpy())
                offs.append(np.full(nrows, off, dtype=np.int64))
                sizes.append(np.full(nrows, size, dtype=np.int64))
                rows.append(np.arange(nrows, dtype=np.int64))

        def cat(a, dt):
            return np.concatenate(a).astype(dt) if a else np.zeros(0, dtype=dt)

        return {
            "x": cat(xs, np.int64),
            "y": cat(ys, np.int64),
            "z": cat(zs, np.int64),
            "offset": cat(offs, np.int64),
            "size": cat(sizes, np.int64),
            "row": cat(rows, np.int64),
        }

    def _make_scale_index(self, scale: int, files, parts) -> _ScaleIndex:
        def cat(key, dt):
            return np.concatenate([p[key] for p in parts]).astype(dt) if parts else np.zeros(0, dt)

        x, y, z = cat("x", np.int64), cat("y", np.int64), cat("z", np.int64)
        if self._spec is not None:
            if scale >= len(self._spec):
                raise UserError(
                    f"{self.root}/s{scale}: the spec {self._spec_path!r} has only "
                    f"{len(self._spec)} scales"
                )
            size = [int(v) for v in self._spec[scale]["size"]]
            grid = tuple(math.ceil(v / BLOCK) for v in size)
            vmin, vmax = (0, 0, 0), tuple(size)
            outside = (x >= grid[0]) | (y >= grid[1]) | (z >= grid[2])
            if outside.any():
                # DVID's exporter writes blocks past the spec's extent at coarse scales: export
                # them, on a grid grown to hold them (the Morton codes change only if an
                # axis then needs another bit)
                fids = cat("file_id", np.int32)
                grown = (max(grid[0], int(x.max()) + 1), max(grid[1], int(y.max()) + 1),
                         max(grid[2], int(z.max()) + 1))
                same = all(math.ceil(math.log2(max(a, 1))) == math.ceil(math.log2(max(b, 1)))
                           for a, b in zip(grid, grown, strict=True))
                for i in np.flatnonzero(outside).tolist():
                    self._note("outside_grid", files[int(fids[i])].path, (x[i], y[i], z[i]),
                               f"outside the scale-{scale} grid {grid} of the spec: exported on "
                               f"the grid {grown}" + ("" if same else " (Morton codes of this "
                               "scale then differ from the spec's)"))
                grid = grown
                vmax = tuple(max(v, g * BLOCK) for v, g in zip(vmax, grid, strict=True))
        elif len(x):
            grid = (int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1)
            vmin = (int(x.min()) * BLOCK, int(y.min()) * BLOCK, int(z.min()) * BLOCK)
            vmax = tuple(g * BLOCK for g in grid)
        else:
            grid, vmin, vmax = (1, 1, 1), (0, 0, 0), (0, 0, 0)
        info = ScaleInfo(
            scale=scale, block_size=(BLOCK,) * 3, grid=grid, voxel_min=vmin, voxel_max=vmax
        )
        morton = morton_encode(x, y, z, grid)
        order = np.argsort(morton, kind="stable")
        morton = morton[order]
        file_id = cat("file_id", np.int32)[order]
        dup = np.flatnonzero(morton[1:] == morton[:-1])
        if dup.size:
            i = int(order[dup[0]])
            j = int(order[dup[0] + 1])
            fids = cat("file_id", np.int32)
            raise UserError(
                f"block ({x[i]},{y[i]},{z[i]}) of scale {scale} appears twice: in "
                f"{files[fids[i]].path.name} and {files[fids[j]].path.name}"
            )
        return _ScaleIndex(
            info=info,
            files=files,
            morton=morton,
            x=x[order].astype(np.int32),
            y=y[order].astype(np.int32),
            z=z[order].astype(np.int32),
            file_id=file_id,
            offset=cat("offset", np.int64)[order],
            size=cat("size", np.int64)[order],
            row=cat("row", np.int64)[order].astype(np.int32),
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
        top = 1 << 64
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
            fd = os.open(sf.path, os.O_RDONLY)
            try:
                for s in range(int(span_ids[-1]) + 1):
                    sel = np.flatnonzero(span_ids == s)
                    s_lo = int(offs[sel[0]])
                    s_hi = int(ends[sel].max())
                    buf = os.pread(fd, s_hi - s_lo, s_lo)
                    if len(buf) != s_hi - s_lo:
                        raise UserError(
                            f"{sf.path}: file shorter than its sidecar says (byte {s_lo + len(buf)})"
                        )
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
                            raise UserError(
                                f"{sf.path}: sidecar row {r} past the {batch.num_rows}-row batch at byte {o}"
                            )
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
            raise UserError(
                f"{idx.files[int(idx.file_id[a + k])].path}: sidecar says block ({x[k]},{y[k]},{z[k]}) "
                f"at byte {idx.offset[a + k]} but the record there is block {tuple(xyz_check[k].tolist())}"
            )
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
            raise UserError(
                f"{sf.path}: no valid record batch at byte {absolute} (size {size}) as the sidecar says: {exc}"
            ) from None

    # ------------------------------------------------------------------ mapping
    def _mapping_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._build_lock:
            if self._mapping is None:
                start = len(self.anomalies)
                self._mapping = self._build_mapping()
                self._report("mapping", start)
            return self._mapping

    def _build_mapping(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-identity (sv, body) pairs of all files, deduplicated, sorted by sv."""
        acc_sv: list[np.ndarray] = []
        acc_body: list[np.ndarray] = []
        for scale in sorted(self._scales):
            for sf in self._scales[scale].files:
                sv, body = self._file_pairs(sf)
                acc_sv.append(sv)
                acc_body.append(body)
                if sum(len(a) for a in acc_sv) > (8 << 20):  # keep the accumulator compact
                    s, b = _dedupe_pairs(np.concatenate(acc_sv), np.concatenate(acc_body), sf.path)
                    acc_sv, acc_body = [s], [b]
        if not acc_sv:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        return _dedupe_pairs(np.concatenate(acc_sv), np.concatenate(acc_body), self.root)

    def _file_pairs(self, sf: _ShardFile) -> tuple[np.ndarray, np.ndarray]:
        try:
            with pa.memory_map(str(sf.path)) as mm:
                opened = ipc.open_file(mm) if sf.file_format else ipc.open_stream(mm)
                table = opened.read_all().select(["supervoxels", "labels", "chunk_x", "chunk_y", "chunk_z"])
                svs = table.column("supervoxels")
                bodies = table.column("labels")
                if table.num_rows == 0:
                    return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
                len_sv = pc.list_value_length(svs)
                len_b = pc.list_value_length(bodies)
                if not pc.all(pc.equal(len_sv, len_b)).as_py():
                    row = int(pc.index(pc.equal(len_sv, len_b), False).as_py())
                    raise UserError(
                        f"{sf.path}: row {row} has supervoxels and labels of different lengths "
                        "(they must be aligned one to one)"
                    )
                sv = pc.list_flatten(svs).to_numpy().astype(np.uint64, copy=True)
                body = pc.list_flatten(bodies).to_numpy().astype(np.uint64, copy=True)
                # all-background blocks (label list [0]): exported as stored, but reported
                one = pc.equal(len_sv, 1)
                zero = pc.and_(one, pc.equal(pc.list_element(pc.if_else(one, svs, None), 0), 0))
                zero = pc.fill_null(zero, False).to_numpy(zero_copy_only=False)
                for i in np.flatnonzero(zero).tolist():
                    self._note("background_block", sf.path,
                               tuple(table.column(c)[i].as_py() for c in ("chunk_x", "chunk_y", "chunk_z")),
                               "all-zero block (label list [0]): exported as stored")
        except pa.ArrowInvalid as exc:
            raise UserError(f"{sf.path}: cannot read the Arrow stream ({exc})") from None
        keep = sv != body
        sv, body = drop_background(sv[keep], body[keep], str(sf.path))
        return _dedupe_pairs(sv, body, sf.path)

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
        """Exact for the mapping (from the label lists of every block); shards carry no
        label indices, so ``indices`` counts nothing."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, cell_bits, lo, hi)
        return count_sorted(np.zeros(0, np.uint64), None, cell_bits, lo, hi)

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Shards carry no label indices (``info().has_indices`` is False)."""
        return iter(())

    def close(self) -> None:
        with self._lock:
            self._mapping = None


def _dedupe_pairs(sv: np.ndarray, body: np.ndarray, where) -> tuple[np.ndarray, np.ndarray]:
    """Unique (sv, body) pairs sorted by sv; a supervoxel with two bodies is an error."""
    if sv.size == 0:
        return sv.astype(np.uint64), body.astype(np.uint64)
    order = np.lexsort((body, sv))
    sv, body = sv[order], body[order]
    keep = np.concatenate([[True], (sv[1:] != sv[:-1]) | (body[1:] != body[:-1])])
    sv, body = sv[keep], body[keep]
    clash = np.flatnonzero(sv[1:] == sv[:-1])
    if clash.size:
        i = int(clash[0])
        raise UserError(
            f"{where}: supervoxel {int(sv[i])} is mapped to two bodies "
            f"({int(body[i])} and {int(body[i + 1])}) — the shards disagree about the mapping"
        )
    return sv, body


__all__ = ["ShardsSource", "open_url"]
