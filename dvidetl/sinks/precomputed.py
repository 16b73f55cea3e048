"""``precomputed:///DIR`` — a neuroglancer precomputed segmentation volume, written in the
export's one pass over the blocks, one whole shard per partition.

URL options (strict, like every sink's): ``spec=PATH`` a neuroglancer ``info`` or volume spec
to follow (DVID's export-shards spec, e.g. the male CNS one), ``supervoxels=true`` to store
supervoxel ids instead of bodies (default: bodies, each block's ``labels`` list),
``resolution=X,Y,Z`` the scale-0 voxel size in nm of a derived ``info`` (default 8,8,8).

What it writes::

    DIR/info                       the neuroglancer info (written once, by the driver)
    DIR/<scale key>/<shard>.shard  neuroglancer_uint64_sharded_v1 shard files
    DIR/.dvidetl/<instance>/<uuid>/  the run records, ledger, export_errors and
                                   source_anomalies (the Parquet sink's layout; hidden from
                                   neuroglancer, which reads only the info and the shards)

The ``info``: from ``spec`` completed by ``codec.ngshard.complete_info`` (an absent
``compressed_segmentation_block_size`` is [8, 8, 8], absent ``data_encoding`` and
``minishard_index_encoding`` gzip), or derived from the source's volume
(``codec.ngshard.derive_info``: chunk = the DVID block, sharding chosen so a shard is an
aligned box of up to 32,768 chunks). Every scale the source has is written; source scale
``s`` is ``info.scales[s]``. Chunks are ``compressed_segmentation`` transcoded from the DVID
blocks without decoding voxels (``codec.cseg``), edge chunks at their clipped size;
all-background chunks are not written (readers return 0 for them). A gzip ``data_encoding``
is written with ISA-L at level 1 (``codec.ngshard.GZIP_LEVEL``): measured on the bench
volume's chunks, 4.5x faster than libdeflate's level 6 (2x its level 1) for chunks ~17%
larger; the gzip of every chunk was the largest cost of a partition after the transform
(``python -m bench precomputed`` prints the sweep of levels, time and bytes).

Costs per block: a partition whose sinks are all precomputed asks the transform only for the
unwrapped blocks (``needs = {"raw"}``), never for the zstd payload the tabular sinks store
(about half of the shared transform's time).

Exactly once: the planner makes every blocks partition exactly one shard (``plan_cells``:
with ``hash: identity`` a shard is one aligned Morton range of 2^(preshift+minishard)
chunks; a shard with no blocks is not planned). A partition streams its chunks into a
temporary file beside the shard (``codec.ngshard.ShardWriter``: memory bounded by the shard's
index, 24 bytes a chunk), renames it into place, then writes its ledger row: a shard a reader
may trust is one the ledger names, a retried or resumed partition rewrites the whole file,
and no shard is ever read, modified and written back. ``murmurhash3_x86_128`` sharding
scatters a shard over the volume (no partition can write one whole) and is refused, as are
unsharded scales.

Kinds: this sink stores blocks (as the volume) and the source's anomalies; it has no tables
for the label indices or the mapping (``kinds``). A run whose only sinks are precomputed
ones exports neither — the run says so when it starts, in its record (``options``), its
summary and ``verify``; a run with a tabular sink beside it stores them there.
``verify`` decodes every stored chunk and compares it voxel for voxel with the source block
mapped (``read.verify.verify_volume_partition``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from dvidetl.errors import UserError, first_line
from dvidetl.export.batch import FAILED_BLOCKS, BlockData, PartitionData
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
from dvidetl.geometry import ScaleInfo, VolumeInfo, axis_bits, morton_bits
from dvidetl.sinks.base import Outside, UnreadableFile, Where
from dvidetl.sinks.parquet import STAGING, SUPERSEDED, ParquetSink, _atomic_write_bytes, temp_beside
from dvidetl.tables.cells import failed_cells
from dvidetl.urlquery import Query

#: the run bookkeeping directory inside DIR (a Parquet export of the run's records)
BOOK = ".dvidetl"
#: the tables this sink reads back (the bookkeeping); the volume is read by its own readers
TABLES = ("export_errors", "source_anomalies", "export_ledger")
DEFAULT_RESOLUTION = (8.0, 8.0, 8.0)


def _dir_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "precomputed":
        raise UserError(f"not a precomputed:// URL: {url!r}")
    path = parts.netloc + parts.path
    if not path:
        raise UserError(f"sink URL {url!r} names no directory: use precomputed:///DIR")
    return path


class PrecomputedSink(ParquetSink):
    """``precomputed://DIR`` for one (uuid, instance); see the module docstring."""

    needs = frozenset({"raw"})  # transcodes the unwrapped blocks; never reads the zstd payload
    kinds = frozenset({"blocks", "anomalies"})
    checks = {"blocks": "dvidetl.read.verify:verify_volume_partition"}

    def __init__(self, url: str, *, uuid: str, instance: str):
        q = Query(url, ("spec", "supervoxels", "resolution"))
        self.dir = Path(_dir_of(url))
        self.spec_path = q.str("spec")
        self.supervoxels = q.bool("supervoxels")
        res = q.str("resolution")
        if res is None:
            self.resolution = DEFAULT_RESOLUTION
        else:
            try:
                r = tuple(float(v) for v in res.split(","))
            except ValueError:
                r = ()
            if len(r) != 3 or not all(v > 0 for v in r):
                raise UserError(f"{url!r}: parameter resolution={res!r} must be 3 positive numbers (nm), e.g. 8,8,8")
            self.resolution = r
        if self.spec_path is not None and "resolution" in q:
            raise UserError(f"{url!r}: resolution= is for a derived info; the spec {self.spec_path!r} "
                            "gives its own resolutions")
        self._info: dict | None = None
        super().__init__(self.dir / BOOK, uuid=uuid, instance=instance, url=url)

    def __repr__(self) -> str:
        return f"PrecomputedSink({str(self.dir)!r})"

    # -- the info ------------------------------------------------------------------------
    def _spec(self) -> dict:
        from dvidetl.codec.ngshard import ShardFormatError, complete_info

        path = Path(self.spec_path or "")
        try:
            spec = json.loads(path.read_text())
        except OSError as exc:
            raise UserError(f"sink {self.url}: cannot read the spec {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UserError(f"sink {self.url}: the spec {path} is not JSON ({first_line(exc)})") from None
        try:
            return complete_info(spec)
        except ShardFormatError as exc:
            raise UserError(f"sink {self.url}: the spec {path}: {exc}") from None

    def make_info(self, volume: VolumeInfo) -> dict:
        """The ``info`` this sink writes for ``volume`` (from the spec, or derived), checked
        against it: every scale the source has is in it with the source's block size as its
        chunk size, the same Morton code bits (so partitions are shards), identity-hash
        sharding whose bits cover the chunk ids. One-line ``UserError`` otherwise."""
        from dvidetl.codec.ngshard import ShardFormatError, derive_info

        scales = sorted(volume.scales, key=lambda s: s.scale)
        if self.spec_path is not None:
            info = self._spec()
        else:
            have = [s.scale for s in scales]
            if have != list(range(len(have))):
                raise UserError(f"sink {self.url}: the source has scales {have}, not 0..N: give the "
                                "neuroglancer spec that places them (spec=)")
            try:
                info = derive_info(scales, self.resolution)
            except ShardFormatError as exc:
                raise UserError(f"sink {self.url}: {exc}") from None
        for si in scales:
            self._check_scale(info, si)
        return info

    def _check_scale(self, info: dict, si: ScaleInfo) -> None:
        from dvidetl.codec.ngshard import Sharding, scale_grid

        s = si.scale
        where = f"sink {self.url}: scale {s}"
        if s >= len(info["scales"]):
            raise UserError(f"{where}: the info lists only {len(info['scales'])} scales, the source has scale {s}")
        sc = info["scales"][s]
        chunk = tuple(sc["chunk_sizes"][0])
        if chunk != tuple(si.block_size):
            raise UserError(f"{where} ({sc['key']}): chunk size {list(chunk)} is not the source's "
                            f"block size {list(si.block_size)} (chunks are transcoded blocks)")
        if any(sc.get("voxel_offset", [0, 0, 0])):
            raise UserError(f"{where} ({sc['key']}): voxel_offset {sc['voxel_offset']} must be [0, 0, 0]: "
                            "DVID block coordinates are the chunk positions (an offset would move "
                            "every chunk id off the source's Morton code)")
        if "sharding" not in sc:
            raise UserError(f"{where} ({sc['key']}): unsharded scales are not written (one file per "
                            "chunk); give the scale a neuroglancer_uint64_sharded_v1 'sharding'")
        sh = Sharding.from_json(sc["sharding"])
        if sh.hash != "identity":
            raise UserError(f"{where} ({sc['key']}): sharding hash {sh.hash!r} scatters a shard's chunks "
                            "over the volume, so no partition can write one shard whole (and a shard "
                            "is never rewritten): use hash 'identity'")
        grid = scale_grid(sc)
        if axis_bits(grid) != axis_bits(si.grid):
            raise UserError(f"{where} ({sc['key']}): the info's chunk grid {list(grid)} and the source's "
                            f"block grid {list(si.grid)} give different Morton codes (chunk ids): "
                            "the spec does not describe this volume")
        need = morton_bits(grid)
        have = sh.preshift_bits + sh.minishard_bits + sh.shard_bits
        if have < need:
            raise UserError(f"{where} ({sc['key']}): preshift+minishard+shard bits ({have}) do not cover "
                            f"the {need}-bit chunk ids, so a shard would be several Morton ranges")

    @property
    def info(self) -> dict:
        """The ``info`` written in DIR (by ``prepare``)."""
        if self._info is None:
            f = self.dir / "info"
            try:
                self._info = json.loads(f.read_text())
            except FileNotFoundError:
                raise UserError(f"{f}: no neuroglancer info (the export was not prepared)") from None
            except ValueError as exc:
                raise UserError(f"{f}: not a JSON info ({first_line(exc)})") from None
        return self._info

    def scale_info(self, scale: int) -> dict:
        return self.info["scales"][scale]

    def sharding(self, scale: int):
        from dvidetl.codec.ngshard import Sharding

        return Sharding.from_json(self.scale_info(scale)["sharding"])

    def plan_cells(self, volume: VolumeInfo) -> dict[int, int]:
        """One partition per shard: the Morton cell of 2^(preshift+minishard) chunks."""
        from dvidetl.codec.ngshard import Sharding

        info = self.make_info(volume)
        out = {}
        for si in volume.scales:
            sh = Sharding.from_json(info["scales"][si.scale]["sharding"])
            out[si.scale] = sh.preshift_bits + sh.minishard_bits
        return out

    # -- checks and the run ----------------------------------------------------------------
    def check(self, *, write: bool = True, create: bool = True) -> None:
        """The directory (a writable directory, not a file), the spec (readable, a valid
        info), and that DIR holds no other export (one volume per directory)."""
        if self.spec_path is not None:
            self._spec()
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"sink {self.url}: {self.dir} is a file, not a directory")
        others = [(i, u) for i, u in _exports(self.dir) if (i, u) != (self.instance, self.uuid)]
        if others:
            raise UserError(f"sink {self.url}: {self.dir} holds the volume of {others[0][0]}@{others[0][1]}: "
                            "a precomputed directory holds one volume; use another directory")
        super().check(write=write, create=create)

    def prepare(self, run: RunInfo) -> None:
        """The run's records (Parquet bookkeeping) and the ``info``: written once; a
        different ``info`` already in DIR (another spec or source) is refused."""
        volume = VolumeInfo.from_json(json.dumps(run.volume)) if run.volume else None
        if volume is None:
            raise UserError(f"sink {self.url}: run {run.run_id} has no volume description")
        info = self.make_info(volume)
        f = self.dir / "info"
        text = json.dumps(info, indent=1, sort_keys=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if f.exists():
            try:
                old = json.loads(f.read_text())
            except ValueError:
                old = None
            if old != json.loads(text):
                raise UserError(f"sink {self.url}: {f} describes another volume (another spec or "
                                "source): use another directory")
        else:
            _atomic_write_bytes(f, text.encode())
        self._info = json.loads(text)
        super().prepare(run)

    # -- where shards go ---------------------------------------------------------------------
    def _scale_dir(self, run_id: str | None, key: str) -> Path:
        """DIR/<key>, or a staged (``--overwrite``) run's own until it is published."""
        if run_id is not None:
            staged = self._staging_root(run_id)
            if staged is not None and (not self._publishing(run_id) or (staged / "volume" / key).is_dir()):
                return staged / "volume" / key
        return self.dir / key

    def shard_of(self, part: Partition) -> int:
        """The shard a blocks partition writes; a partition that is not one shard's Morton
        range (a run planned without this sink) is refused."""
        sh = self.sharding(part.scale)
        low = sh.preshift_bits + sh.minishard_bits
        shard = part.lo >> low
        if part.lo != shard << low or part.hi > (shard + 1) << low:
            raise UserError(f"partition {part.key} is not one shard of scale {part.scale} (Morton "
                            f"cells of 2^{low} chunks): the run was planned without the precomputed "
                            "sink; start a new run with it")
        return shard

    def shard_path(self, run_id: str | None, part: Partition) -> Path:
        key = self.scale_info(part.scale)["key"]
        return self._scale_dir(run_id, key) / self.sharding(part.scale).shard_filename(self.shard_of(part))

    def location(self, table: str, part: Partition, run_id: str | None = None) -> str:
        if table == "blocks":
            return str(self.shard_path(run_id, part))
        return super().location(table, part, run_id)

    # -- writing -----------------------------------------------------------------------------
    def write_partition(self, run_id: str, part: Partition, data: PartitionData,
                        stats: PartitionStats) -> None:
        self.check_data(part, data)
        if not self.takes(part.kind):
            raise ValueError(f"{self.url}: a precomputed volume does not take {part.kind} partitions "
                             f"(it takes {', '.join(sorted(self.kinds or ()))})")
        if not isinstance(data, BlockData):
            super().write_partition(run_id, part, data, stats)
            return
        chunks, nbytes, failed = self._write_shard(run_id, part, data)
        if failed.num_rows:
            # blocks the transcode refused (outside the info's volume): counted with the
            # run's corrupt blocks, stored in export_errors with their reason
            stats.errors += failed.num_rows
            stats.error_samples = (stats.error_samples + failed.slice(0, 5).select(
                ["scale", "x", "y", "z", "reason"]).to_pylist())[:5]
        all_failed = pa.concat_tables([data.failed, failed]) if failed.num_rows else data.failed
        self._write_table(run_id, part, "export_errors",
                          failed_cells(all_failed, run_id, self.cell_limit(run_id)))
        # this sink's ledger row: its own chunks (rows) and bytes written (the shard file)
        ledger = dataclasses.replace(stats, bytes_out=nbytes).to_ledger_row(run_id, part, chunks)
        d = self._ledger_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        from dvidetl.sinks.parquet import _write_atomic

        _write_atomic(d / f"{part.key}.parquet", "export_ledger", ledger, keep_empty=True)

    def _write_shard(self, run_id: str, part: Partition, data: BlockData) -> tuple[int, int, pa.Table]:
        """Stream the partition's chunks into its shard (temporary name, renamed when whole);
        returns (chunks written, the shard's bytes, blocks the transcode refused as
        ``FAILED_BLOCKS``)."""
        from dvidetl.codec.cseg import encode_chunks
        from dvidetl.codec.ngshard import ShardWriter, chunk_ids, chunk_shapes

        sc = self.scale_info(part.scale)
        sh = self.sharding(part.scale)
        shard = self.shard_of(part)
        final = self.shard_path(run_id, part)
        tmp = temp_beside(final)
        fails: list[pa.Table] = []
        f = w = None
        n = nbytes = 0
        try:
            for t in data.batches():
                if "raw" not in t.column_names:
                    raise ValueError("precomputed sink: the partition data lacks the raw blocks (needs)")
                x, y, z = (t.column(c).to_numpy() for c in ("x", "y", "z"))
                enc = encode_chunks(t.column("raw"), None if self.supervoxels else t.column("labels"),
                                    chunk_shapes(x, y, z, sc))
                ok = enc.ok
                if not ok.all():
                    bad = np.flatnonzero(~ok)
                    fails.append(_failed(t, bad, [f"transcode: {enc.errors[i]}" for i in bad.tolist()]))
                keep = np.flatnonzero(ok & ~enc.background)
                if keep.size == 0:
                    del enc
                    continue
                if w is None:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    f = open(tmp, "wb")  # noqa: SIM115 - closed below, renamed when whole
                    w = ShardWriter(f, sh, shard=shard)
                offs = enc.offsets
                mv = enc.data.data  # the array's memoryview
                w.add_many(chunk_ids(x[keep], y[keep], z[keep], sc),
                           [mv[offs[i]:offs[i + 1]] for i in keep.tolist()])
                n += int(keep.size)
                del enc, mv  # one batch's chunks in memory at a time, not two
            if w is not None and f is not None:
                nbytes = w.finish()
                f.flush()
                os.fsync(f.fileno())
                f.close()
                f = None
                os.replace(tmp, final)
            else:
                final.unlink(missing_ok=True)  # all background: no shard (an earlier attempt's goes)
        finally:
            if f is not None:
                f.close()
            tmp.unlink(missing_ok=True)
        return n, nbytes, (pa.concat_tables(fails) if fails else FAILED_BLOCKS.empty_table())

    # -- reading -----------------------------------------------------------------------------
    def read(self, table: str, scale: int | None = None, morton_range: tuple[int, int] | None = None,
             run_id: str | None = None, *, where: Where | None = None,
             columns: Sequence[str] | None = None) -> pa.Table:
        if table not in TABLES:
            raise UserError(f"{self.url} is a neuroglancer precomputed volume: it has no {table!r} table "
                            "(read the volume with tensorstore, cloud-volume or `dvidetl view`)")
        return super().read(table, scale, morton_range, run_id, where=where, columns=columns)

    def read_chunks(self, run_id: str, part: Partition) -> dict[int, bytes]:
        """The chunks of the partition's shard as stored ({chunk id: bytes before the data
        encoding is undone}); ``UnreadableFile`` when the shard cannot be read, or is gone
        while the ledger says it holds chunks. {} for a partition that wrote none."""
        from dvidetl.codec.ngshard import ShardFormatError, read_shard

        f = self.shard_path(run_id, part)
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            led = self._ledger_of(run_id, part) or {}
            if led.get("rows"):
                raise UnreadableFile(str(f), f"missing: the ledger says the partition wrote "
                                             f"{led['rows']:,} chunks to it") from None
            return {}
        except OSError as exc:
            raise UnreadableFile(str(f), f"unreadable ({exc.strerror or exc})") from None
        try:
            return read_shard(data, self.sharding(part.scale), decode=False)
        except ShardFormatError as exc:
            raise UnreadableFile(str(f), f"not a readable shard ({first_line(exc)})") from None

    def outside(self, run: RunInfo, done: set[str]) -> list[Outside]:
        """Shard files in DIR that no committed partition of the run wrote (neuroglancer reads
        every shard a chunk id leads to), with their chunks; plus the bookkeeping's."""
        from dvidetl.codec.ngshard import ShardFormatError, read_shard

        out = super().outside(run, done)
        if not (self.dir / "info").exists():
            return out
        expected = {self.shard_path(run.run_id, p) for p in run.partitions
                    if p.key in done and p.kind == "blocks"}
        for s, sc in enumerate(self.info["scales"]):
            d = self.dir / sc["key"]
            if not d.is_dir():
                continue
            for f in sorted(d.glob("*.shard")):
                if f in expected:
                    continue
                try:
                    rows = len(read_shard(f.read_bytes(), self.sharding(s), decode=False))
                    out.append(Outside("blocks", rows, f"{f}: a shard of {rows:,} chunks that no committed "
                                                       f"partition of run {run.run_id} wrote (a stray file)",
                                       path=str(f), scale=s))
                except (ShardFormatError, OSError) as exc:
                    out.append(Outside("blocks", -1, f"{f}: a stray shard, unreadable ({first_line(exc)})",
                                       path=str(f), scale=s))
        return out

    # -- the run's end -------------------------------------------------------------------------
    def finish(self, run: RunInfo) -> None:
        """A staged (``--overwrite``) run's scale directories replace the published ones
        (one rename each, after the record says ``publishing``; a crash in between is rolled
        forward by the next call), then the bookkeeping is published and stray shards are
        removed (``ParquetSink.finish``)."""
        if run.staged and not run.record.get("published"):
            if run.state != "publishing":
                run.record["state"] = "publishing"
                self.update_run(run)
            stage = self.root / STAGING / run.run_id / "volume"
            old = self.root / SUPERSEDED / run.run_id / "volume"
            for sc in self.info["scales"]:
                if not (stage / sc["key"]).is_dir():
                    continue
                main = self.dir / sc["key"]
                if main.exists():
                    old.mkdir(parents=True, exist_ok=True)
                    os.replace(main, old / sc["key"])
                os.replace(stage / sc["key"], main)
            shutil.rmtree(old, ignore_errors=True)
        super().finish(run)

    def _data_dirs(self) -> list[Path]:
        """The bookkeeping's table directories and the volume's scale directories (shards)."""
        scales = [self.dir / sc["key"] for sc in self.info["scales"]] if (self.dir / "info").exists() else []
        return super()._data_dirs() + [d for d in scales if d.is_dir()]


def _failed(t: pa.Table, rows: np.ndarray, reasons: list[str]) -> pa.Table:
    """``FAILED_BLOCKS`` rows for rows of a block batch (the bytes: the unwrapped block)."""
    idx = pa.array(rows)
    n = len(rows)
    return pa.table({
        "scale": t.column("scale").take(idx), "x": t.column("x").take(idx), "y": t.column("y").take(idx),
        "z": t.column("z").take(idx), "morton": t.column("morton").take(idx),
        "stage": pa.array(["transcode"] * n, pa.string()), "reason": pa.array(reasons, pa.string()),
        "data": t.column("raw").take(idx).cast(pa.binary()),
    }, schema=FAILED_BLOCKS)


def _exports(d: Path) -> list[tuple[str, str]]:
    from dvidetl.sinks.parquet import list_exports as parquet_exports

    return parquet_exports(f"parquet://{d / BOOK}") if (d / BOOK).is_dir() else []


def open_url(url: str, *, uuid: str, instance: str) -> PrecomputedSink:
    """``precomputed:///abs/dir`` or ``precomputed://rel/dir``, options in the query."""
    return PrecomputedSink(url, uuid=uuid, instance=instance)


def list_exports(url: str) -> list[tuple[str, str]]:
    """The (instance, uuid) whose volume DIR holds (one at most)."""
    return _exports(Path(_dir_of(url)))


__all__ = ["PrecomputedSink", "open_url", "list_exports"]
