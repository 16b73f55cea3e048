"""Reading an export back: ``open_export(url)`` for Parquet or VastDB, the same calls on both.

``Export`` goes through the ``Sink.read`` protocol only (pushed-down ``scale`` / Morton range /
``where`` predicates and column projection), so one block of a 100,000-block export is one
small ranged read, not a scan, and the VastDB sink needs no code of its own here.

    >>> ex = open_export("parquet://./dvidetl-out")
    >>> ex.block(0, 10, 11, 12)                 # 64^3 uint64 bodies, [z, y, x]
    >>> ex.raw_block(0, 10, 11, 12)             # the exact DVID block bytes
    >>> ex.subvolume(0, ((0, 0, 0), (512, 512, 512)))[256].compute()   # a dask array
    >>> ex.body_blocks(body), ex.body_size(body), ex.bodies_in(box)

``connect(DIR)`` gives a DuckDB connection with a view per table (Parquet only), for SQL.
Only committed partitions are visible (files whose ledger row exists in the run read, by
default the latest run), so a half-written run never shows partial or duplicate rows.

    >>> con = connect("./dvidetl-out")
    >>> con.sql("select scale, count(*) from blocks group by scale").fetchall()
    >>> reassemble_block(con, 0, 10, 11, 12)    # the exact DVID block bytes of one block
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.errors import UserError
from dvidetl.export.kinds import KINDS, kind, kind_of_table
from dvidetl.geometry import VolumeInfo, morton_encode, vec3
from dvidetl.tables import schema as S
from dvidetl.tables.cells import reassemble

if TYPE_CHECKING:
    from dvidetl.sinks.base import Sink

# Imports inside functions load numba (dvidetl.codec), Dask, the plugin registry's entry points,
# the compression libraries only where used: importing this module must not (CLI start-up,
# processes that never call them).

# ---------------------------------------------------------------------------------------------
# open_export: the same read calls over any sink
# ---------------------------------------------------------------------------------------------

#: a voxel box at one scale: ((x0, y0, z0), (x1, y1, z1)), min inclusive, max exclusive
Box = tuple[tuple[int, int, int], tuple[int, int, int]]

#: present blocks fetched per task / per read call by ``subvolume`` and ``bodies_in``
GROUP_BLOCKS = 64


def open_export(
    url: str, *, uuid: str | None = None, instance: str | None = None, run_id: str | None = None
) -> Export:
    """The export at a sink URL (``parquet://DIR``, ``vastdb://...``; a bare directory is
    Parquet). ``uuid`` / ``instance`` may be left out when the sink holds only one export;
    ``run_id`` defaults to the latest run."""
    url = str(url)
    if "://" not in url:
        url = f"parquet://{url}"
    from dvidetl.sinks import find_export, open_sink

    instance, uuid = find_export(url, uuid, instance)
    return Export(open_sink(url, uuid=uuid, instance=instance), run_id=run_id)


def _frame_meta(table: str, columns: list[str] | None):
    t = S.empty(table)
    if columns is not None:
        t = t.select([n for n in t.schema.names if n in set(columns)])
    return t.to_pandas()


def _frame_part(part: tuple, *, export: Export, table: str, columns, where: dict):
    """One dataframe partition: the rows of one export partition, read through the sink."""
    kind_name, scale, lo, hi = part
    spec = kind(kind_name)
    if spec.scaled:
        t = export.read(table, scale=scale, morton_range=(lo, hi), where=where or None,
                        columns=columns)
    else:
        key = spec.key
        w = dict(where)
        # a range on the key is cut to this partition; an equality was pruned to the one
        # partition holding the value (partition ranges are disjoint) and stays as it is
        r = w.get(key)
        if r is None or isinstance(r, tuple):
            w[key] = (lo, hi) if r is None else (max(lo, int(r[0])), min(hi, int(r[1])))
        t = export.read(table, where=w, columns=columns)
    return t.to_pandas()


def _reopen(url: str, uuid: str, instance: str, run_id: str | None) -> Export:
    return open_export(url, uuid=uuid, instance=instance, run_id=run_id)


def _block_voxels(rows: pa.Table, i: int, bodies: bool) -> np.ndarray:
    """Decoded voxels [z, y, x] of row ``i`` of reassembled ``blocks`` rows.

    Bodies cost nothing extra: the stored ``labels`` (the body of each label-table entry,
    mapped at export) replace the supervoxels as the block's label table before decoding —
    the format allows repeated table entries, and every voxel indexes the table."""
    from dvidetl.codec import decode_block, restore_block

    table = rows.column("labels" if bodies else "supervoxels")[i].values
    return decode_block(restore_block(table.to_numpy(zero_copy_only=False), rows.column("payload")[i].as_py()))


def _chunk(rows: pa.Table, xyz: tuple[int, int, int], sl: tuple, bodies: bool) -> np.ndarray:
    """One subvolume chunk: the block at ``xyz`` in a fetched group, decoded and sliced."""
    x, y, z = xyz
    hit = np.flatnonzero(
        (rows.column("x").to_numpy() == x) & (rows.column("y").to_numpy() == y)
        & (rows.column("z").to_numpy() == z)
    )
    if len(hit) != 1:
        raise ValueError(f"block ({x}, {y}, {z}) is in the export {len(hit)} times, expected once")
    return np.ascontiguousarray(_block_voxels(rows, int(hit[0]), bodies)[sl])


def _zeros(shape: tuple[int, int, int]) -> np.ndarray:
    return np.zeros(shape, np.uint64)


def _sum_by(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, summed values) — uint64 keys, uint64 sums."""
    if len(keys) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv, weights=vals.astype(np.float64), minlength=len(u)).astype(np.uint64)


def _body_table(bodies: np.ndarray, voxels: np.ndarray) -> pa.Table:
    """(body, voxels) rows, background dropped, largest first (ties by body)."""
    keep = bodies != 0
    bodies, voxels = bodies[keep], voxels[keep]
    order = np.lexsort((bodies, -voxels.astype(np.int64)))
    return pa.table({"body": pa.array(bodies[order], pa.uint64()),
                     "voxels": pa.array(voxels[order], pa.uint64())})


class Export:
    """One exported labelmap (one uuid / instance / run), read through its sink.

    Every call is a pushed-down read: blocks by (scale, Morton range) plus x/y/z ranges,
    label indices by ``label`` or ``supervoxel`` equality, projected to the columns needed.
    Voxel arrays are uint64 in [z, y, x] order (as DVID and ``decode_block``); boxes and
    block coordinates are given x, y, z. Pickles as its URL (dask workers reopen it)."""

    def __init__(self, sink: Sink, *, run_id: str | None = None):
        self.sink = sink
        self.run_id = run_id or sink.latest_run()
        if self.run_id is None:
            raise UserError(f"no export run of {sink.instance}@{sink.uuid} in {sink.url}")
        self.run = sink.load_run(self.run_id)
        if not self.run.volume:
            raise UserError(f"run {self.run_id} in {sink.url} stores no volume description")
        self.volume = VolumeInfo.from_json(json.dumps(self.run.volume))
        scales = self.run.options.scales
        if scales is None:
            scales = tuple({p.scale for p in self.run.partitions if p.spec.scaled})
        self.scales: list[int] = sorted(int(s) for s in scales)

    def __repr__(self) -> str:
        return f"Export({self.sink.url!r}, {self.sink.instance}@{self.sink.uuid}, run {self.run_id})"

    def __reduce__(self):
        return (_reopen, (self.sink.url, self.sink.uuid, self.sink.instance, self.run_id))

    @property
    def uuid(self) -> str:
        return self.sink.uuid

    @property
    def instance(self) -> str:
        return self.sink.instance

    # -- plumbing --------------------------------------------------------------------------
    def read(
        self,
        table: str,
        *,
        scale: int | None = None,
        morton_range: tuple[int, int] | None = None,
        where: dict | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Committed rows of any table of this run (``Sink.read``, predicates pushed down)."""
        return self.sink.read(table, scale, morton_range, self.run_id, where=where, columns=columns)

    def grid(self, scale: int) -> tuple[int, int, int]:
        """Block grid (x, y, z) of an exported scale; ``UserError`` for a scale not exported."""
        if int(scale) not in self.scales:
            raise UserError(f"scale {scale} is not in this export (scales {self.scales})")
        return vec3(self.volume.scale(int(scale)).grid)

    def block_size(self, scale: int) -> tuple[int, int, int]:
        self.grid(scale)
        return vec3(self.volume.scale(int(scale)).block_size)

    def _morton(self, scale: int, x: int, y: int, z: int) -> int:
        g = self.grid(scale)
        if not (0 <= x < g[0] and 0 <= y < g[1] and 0 <= z < g[2]):
            raise UserError(f"block ({x}, {y}, {z}) is outside the scale-{scale} grid {g}")
        return int(morton_encode(x, y, z, g))

    def _fetch(self, scale: int, lo: int, hi: int, where: dict | None = None) -> pa.Table:
        """Reassembled ``blocks`` rows of ``lo <= morton < hi`` (and ``where``): one ranged
        read of ``blocks``, one of ``block_overflow`` only if a row overflowed."""
        b = self.read("blocks", scale=scale, morton_range=(lo, hi), where=where)
        ov = None
        if b.num_rows and pc.any(b.column("overflow")).as_py():
            m = pc.filter(b.column("morton"), b.column("overflow")).to_numpy()
            ov = self.read("block_overflow", scale=scale, morton_range=(int(m.min()), int(m.max()) + 1))
        return reassemble(b, ov)

    def _one(self, scale: int, x: int, y: int, z: int) -> pa.Table:
        m = self._morton(scale, x, y, z)
        r = self._fetch(scale, m, m + 1)
        if r.num_rows > 1:
            raise ValueError(f"block ({x}, {y}, {z}) of scale {scale} is exported {r.num_rows} times")
        return r

    def _present(self, scale: int, b0, b1, columns=("x", "y", "z", "morton")) -> pa.Table:
        """Rows (``columns``) of the exported blocks with b0 <= block < b1 (x, y, z), by Morton."""

        g = self.grid(scale)
        b0 = [max(0, int(v)) for v in b0]
        b1 = [min(int(v), int(gv)) for v, gv in zip(b1, g, strict=True)]
        if any(a >= b for a, b in zip(b0, b1, strict=True)):
            return self.read("blocks", scale=scale, morton_range=(0, 0), columns=list(columns))
        lo = int(morton_encode(b0[0], b0[1], b0[2], g))
        hi = int(morton_encode(b1[0] - 1, b1[1] - 1, b1[2] - 1, g)) + 1
        where = {"x": (b0[0], b1[0]), "y": (b0[1], b1[1]), "z": (b0[2], b1[2])}
        t = self.read("blocks", scale=scale, morton_range=(lo, hi), where=where, columns=list(columns))
        return t.sort_by("morton")

    def _box(self, scale: int, box) -> tuple[list[int], list[int], list[int], list[int]]:
        """(voxel min, voxel max, block min, block max) of a box; ``UserError`` if malformed."""
        try:
            (x0, y0, z0), (x1, y1, z1) = box
            v0, v1 = [int(x0), int(y0), int(z0)], [int(x1), int(y1), int(z1)]
        except (TypeError, ValueError):
            raise UserError(f"box {box!r}: expected ((x0, y0, z0), (x1, y1, z1))") from None
        if min(v0) < 0 or any(a >= b for a, b in zip(v0, v1, strict=True)):
            raise UserError(f"box {box!r}: need 0 <= min < max on every axis")
        bs = self.block_size(scale)
        b0 = [a // s for a, s in zip(v0, bs, strict=True)]
        b1 = [-(-b // s) for b, s in zip(v1, bs, strict=True)]
        return v0, v1, b0, b1

    def _groups(self, present: pa.Table, where: dict) -> list[tuple[int, int, dict]]:
        """Consecutive (by Morton) runs of at most ``GROUP_BLOCKS`` present blocks, each one
        ranged read: (lo, hi, where)."""
        m = present.column("morton").to_numpy()
        return [(int(m[i]), int(m[min(i + GROUP_BLOCKS, len(m)) - 1]) + 1, where)
                for i in range(0, len(m), GROUP_BLOCKS)]

    # -- blocks ----------------------------------------------------------------------------
    def block(self, scale: int, x: int, y: int, z: int, *, bodies: bool = True) -> np.ndarray:
        """The block's voxels (uint64 [z, y, x]): bodies (default) or supervoxels; all zero
        for a block not in the export (absent in DVID)."""
        r = self._one(scale, x, y, z)
        if r.num_rows == 0:
            return np.zeros(tuple(reversed(self.block_size(scale))), np.uint64)
        return _block_voxels(r, 0, bodies)

    def raw_block(self, scale: int, x: int, y: int, z: int) -> bytes | None:
        """The exact original (unwrapped) DVID block bytes, or None if not in the export."""
        from dvidetl.codec import restore_block

        r = self._one(scale, x, y, z)
        if r.num_rows == 0:
            return None
        return restore_block(r.column("supervoxels")[0].values.to_numpy(zero_copy_only=False),
                             r.column("payload")[0].as_py())

    def subvolume(self, scale: int, box: Box, *, bodies: bool = True):
        """A dask array (uint64 [z, y, x]) of the voxel box ((x0, y0, z0), (x1, y1, z1)) at
        ``scale``, one chunk per block; blocks not in the export (or outside the volume) are 0.

        Building it lists the present blocks of the box (one read of four small columns);
        computing it reads the blocks in ranged groups of up to ``GROUP_BLOCKS`` by Morton
        order, so a slice reads only the groups holding the blocks it touches."""
        import dask.array as da
        from dask.base import tokenize
        from dask.highlevelgraph import HighLevelGraph

        v0, v1, b0, b1 = self._box(scale, box)
        bs = self.block_size(scale)
        present = self._present(scale, b0, b1)
        where = {"x": (b0[0], b1[0]), "y": (b0[1], b1[1]), "z": (b0[2], b1[2])}
        groups = self._groups(present, where)
        token = tokenize(self.sink.url, self.uuid, self.instance, self.run_id, scale, v0, v1, bodies)
        name, fname = f"dvidetl-subvolume-{token}", f"dvidetl-fetch-{token}"
        dsk: dict = {}
        for g, (lo, hi, w) in enumerate(groups):
            dsk[(fname, g)] = (Export._fetch, self, scale, lo, hi, w)
        px, py, pz = (present.column(c).to_numpy() for c in ("x", "y", "z"))
        where_of = {(int(a), int(b), int(c)): i // GROUP_BLOCKS
                    for i, (a, b, c) in enumerate(zip(px, py, pz, strict=True))}
        axes = []  # per axis (x, y, z): list of (block, local slice, chunk length)
        for d in range(3):
            ax = []
            for blk in range(b0[d], b1[d]):
                lo_v = max(v0[d], blk * bs[d])
                hi_v = min(v1[d], (blk + 1) * bs[d])
                ax.append((blk, slice(lo_v - blk * bs[d], hi_v - blk * bs[d]), hi_v - lo_v))
            axes.append(ax)
        for iz, (bz, sz, nz) in enumerate(axes[2]):
            for iy, (by, sy, ny) in enumerate(axes[1]):
                for ix, (bx, sx, nx) in enumerate(axes[0]):
                    grp = where_of.get((bx, by, bz))
                    if grp is None:
                        dsk[(name, iz, iy, ix)] = (_zeros, (nz, ny, nx))
                    else:
                        dsk[(name, iz, iy, ix)] = (_chunk, (fname, grp), (bx, by, bz), (sz, sy, sx), bodies)
        chunks = tuple(tuple(n for _, _, n in axes[d]) for d in (2, 1, 0))
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
        return da.Array(graph, name, chunks, dtype=np.uint64)

    def block_stats(self, scale: int) -> pa.Table:
        """Per exported block of a scale: x, y, z, raw_size (DVID bytes), payload_size (zstd payload
        bytes) and ``labels`` (label-table entries) — for histograms; reads no block bodies
        except those whose label table overflowed."""
        cols = ["x", "y", "z", "morton", "raw_size", "payload_size", "supervoxels"]
        t = self.read("blocks", scale=scale, columns=cols)
        n = pc.fill_null(pc.list_value_length(t.column("supervoxels")), -1).to_numpy().astype(np.int64)
        missing = np.flatnonzero(n < 0)
        if len(missing):  # label tables kept in block_overflow: their parts' bytes / 8
            ov = self.read("block_overflow", scale=scale, where=None,
                           columns=["morton", "column", "data"])
            ov = ov.filter(pc.equal(ov.column("column"), "supervoxels"))
            keys, sizes = _sum_by(ov.column("morton").to_numpy(),
                                  pc.binary_length(ov.column("data")).to_numpy())
            m = t.column("morton").to_numpy()[missing]
            n[missing] = (sizes[np.searchsorted(keys, m)] // 8).astype(np.int64)
        return t.drop_columns(["supervoxels"]).append_column("labels", pa.array(n, pa.int64()))

    # -- labels ----------------------------------------------------------------------------
    def body_blocks(self, body: int) -> pa.Table:
        """Scale-0 blocks of a body from ``label_index`` (``label == body`` pushed down):
        x, y, z, morton, voxels (summed over its supervoxels), by Morton."""
        t = self.read("label_index", where={"label": int(body)},
                      columns=["x", "y", "z", "morton", "voxels"])
        if t.num_rows == 0:
            return t
        g = t.group_by(["x", "y", "z", "morton"]).aggregate([("voxels", "sum")])
        g = g.rename_columns(["x", "y", "z", "morton", "voxels"])
        return g.set_column(4, "voxels", g.column("voxels").cast(pa.uint64())).sort_by("morton")

    def supervoxel_blocks(self, sv: int) -> pa.Table:
        """Scale-0 blocks of a supervoxel from ``label_index`` (``supervoxel == sv`` pushed
        down): x, y, z, morton, voxels, by Morton."""
        t = self.read("label_index", where={"supervoxel": int(sv)},
                      columns=["x", "y", "z", "morton", "voxels"])
        return t.set_column(4, "voxels", t.column("voxels").cast(pa.uint64())).sort_by("morton")

    def body_size(self, body: int, scale: int = 0) -> int:
        """Voxels of a body: at scale 0 the sum of its ``label_index`` rows; at a coarser
        scale the sum over the stored label tables of the parents of its scale-0 blocks."""
        blocks = self.body_blocks(body)
        if scale == 0 or blocks.num_rows == 0:
            self.grid(scale)
            return int(pc.sum(blocks.column("voxels")).as_py() or 0) if blocks.num_rows else 0

        g = self.grid(scale)
        xyz = np.stack([blocks.column(c).to_numpy() >> scale for c in ("x", "y", "z")], 1)
        xyz = np.unique(xyz, axis=0)
        m = np.sort(morton_encode(xyz[:, 0], xyz[:, 1], xyz[:, 2], g))
        total = 0
        cols = ["morton", "labels", "sv_voxels", "overflow"]
        for i in range(0, len(m), GROUP_BLOCKS):
            part = m[i:i + GROUP_BLOCKS]
            t = self.read("blocks", scale=scale, morton_range=(int(part[0]), int(part[-1]) + 1),
                          columns=cols)
            t = t.filter(pa.array(np.isin(t.column("morton").to_numpy(), part)))
            if t.num_rows and pc.any(t.column("overflow")).as_py():
                t = self._fetch(scale, int(part[0]), int(part[-1]) + 1)
                t = t.filter(pa.array(np.isin(t.column("morton").to_numpy(), part)))
            lab = pc.list_flatten(t.column("labels")).to_numpy()
            vox = pc.list_flatten(t.column("sv_voxels")).to_numpy()
            total += int(vox[lab == np.uint64(body)].sum(dtype=np.uint64))
        return total

    def bodies_in(self, box: Box, scale: int = 0) -> pa.Table:
        """Bodies with voxels in the voxel box at ``scale`` and their voxel counts inside it
        (body, voxels; largest first, background excluded). Blocks wholly inside the box
        are counted from their stored label tables (no decode); only the blocks the box
        cuts are decoded."""
        v0, v1, b0, b1 = self._box(scale, box)
        bs = self.block_size(scale)
        t = self._present(scale, b0, b1, ("x", "y", "z", "morton", "labels", "sv_voxels", "overflow"))
        xyz = [t.column(c).to_numpy().astype(np.int64) for c in ("x", "y", "z")]
        inside = np.ones(t.num_rows, bool)
        for d in range(3):
            inside &= (xyz[d] * bs[d] >= v0[d]) & ((xyz[d] + 1) * bs[d] <= v1[d])
        inside &= ~t.column("overflow").to_numpy(zero_copy_only=False).astype(bool)
        whole = t.filter(pa.array(inside))
        keys = [pc.list_flatten(whole.column("labels")).to_numpy()]
        vals = [pc.list_flatten(whole.column("sv_voxels")).to_numpy().astype(np.uint64)]
        cut = t.filter(pa.array(~inside))
        where = {"x": (b0[0], b1[0]), "y": (b0[1], b1[1]), "z": (b0[2], b1[2])}
        for lo, hi, w in self._groups(cut, where):
            rows = self._fetch(scale, lo, hi, w)
            rx, ry, rz = (rows.column(c).to_numpy().astype(np.int64) for c in ("x", "y", "z"))
            want = np.isin(rows.column("morton").to_numpy(), cut.column("morton").to_numpy())
            for i in np.flatnonzero(want):
                org = (rx[i] * bs[0], ry[i] * bs[1], rz[i] * bs[2])
                sl = tuple(slice(max(v0[d] - org[d], 0), min(v1[d] - org[d], bs[d])) for d in (2, 1, 0))
                u, c = np.unique(_block_voxels(rows, int(i), True)[sl], return_counts=True)
                keys.append(u)
                vals.append(c.astype(np.uint64))
        u, s = _sum_by(np.concatenate(keys), np.concatenate(vals))
        return _body_table(u, s)

    # -- dask dataframes -------------------------------------------------------------------
    def frame(
        self,
        table: str,
        *,
        scale: int | None = None,
        columns: list[str] | None = None,
        where: dict | None = None,
    ):
        """A ``dask.dataframe`` over ``blocks``, ``block_overflow``, ``export_errors``,
        ``label_index`` or ``mapping``: one dataframe partition per export partition of the
        run (a Morton range of one scale, a label range, a supervoxel range), so the graph is
        as long as the plan and every task reads only its own range through the sink, with
        ``columns`` projected and ``where`` pushed down (``{"label": 7}``,
        ``{"supervoxel": (lo, hi)}``; a range on the partition key also prunes partitions).
        Runs on whatever dask scheduler is active — on a cluster, with ``distributed``.
        Column types are the table's (``dvidetl/tables/schema.py``); list columns hold arrays."""
        import dask.dataframe as dd

        spec = kind_of_table(table)
        if spec is None:
            raise UserError(f"frame({table!r}): tables with partitions are "
                            f"{sorted(t for k in KINDS.values() for t in k.tables)}")
        names = S.schema(table).names
        if columns is not None:
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise UserError(f"frame({table!r}): no column(s) {unknown}; columns are {names}")
        rng = (where or {}).get(spec.key)
        parts = []
        for p in self.run.partitions:
            if p.kind != spec.name or (spec.scaled and scale is not None and p.scale != scale):
                continue
            if isinstance(rng, tuple) and (p.hi <= rng[0] or p.lo >= rng[1]):
                continue
            if rng is not None and not isinstance(rng, tuple) and not p.lo <= int(rng) < p.hi:
                continue
            parts.append((p.kind, p.scale, p.lo, p.hi))
        meta = _frame_meta(table, columns)
        if not parts:
            return dd.from_pandas(meta, npartitions=1)
        return dd.from_map(_frame_part, parts, export=self, table=table, columns=columns,
                           where=dict(where or {}), meta=meta, enforce_metadata=False,
                           label=f"dvidetl-{table}")

    def largest_bodies(self, n: int = 10) -> pa.Table:
        """The ``n`` largest bodies by scale-0 voxels (body, voxels, blocks). Aggregates the
        whole ``label_index`` (two columns): an analysis query, not a point lookup."""
        t = self.read("label_index", columns=["label", "x", "y", "z", "voxels"])
        if t.num_rows == 0:
            return pa.table({"body": pa.array([], pa.uint64()), "voxels": pa.array([], pa.uint64()),
                             "blocks": pa.array([], pa.int64())})
        v = t.group_by("label").aggregate([("voxels", "sum")])
        b = t.group_by(["label", "x", "y", "z"]).aggregate([]).group_by("label").aggregate(
            [("label", "count")])
        j = v.join(b, "label").rename_columns(["body", "voxels", "blocks"])
        j = j.set_column(1, "voxels", j.column("voxels").cast(pa.uint64()))
        return j.sort_by([("voxels", "descending"), ("body", "ascending")]).slice(0, n)

    def bodies_of(self, svs) -> np.ndarray:
        """Body of each supervoxel through the exported ``mapping`` (non-identity pairs only,
        so an unmapped supervoxel is its own body). Reads the mapping rows of the supervoxel
        range [min, max] (pushed down), or one equality read per id for a few ids."""
        svs = np.asarray(svs, dtype=np.uint64)
        out = svs.copy()
        u = np.unique(svs)
        if len(u) == 0:
            return out
        if len(u) <= 16:
            parts = [self.read("mapping", where={"supervoxel": int(s)}) for s in u]
            t = pa.concat_tables(parts)
        else:
            t = self.read("mapping", where={"supervoxel": (int(u[0]), int(u[-1]) + 1)})
        if t.num_rows:
            t = t.sort_by("supervoxel")
            ks, bs = t.column("supervoxel").to_numpy(), t.column("body").to_numpy()
            pos = np.minimum(np.searchsorted(ks, svs), len(ks) - 1)
            hit = ks[pos] == svs
            out[hit] = bs[pos[hit]]
        return out
