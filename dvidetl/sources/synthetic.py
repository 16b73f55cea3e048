"""``synthetic://NAME?...`` — a deterministic generated labelmap that looks like segmentation.

Why: every part of the export (Flight server, planner, transform, sinks, verification) needs a
labelmap whose ground truth is known exactly, at any size, with the hard cases on demand —
without shipping terabytes of test data.

URL: ``synthetic://NAME?size=X,Y,Z&scales=N&seed=S&...`` (``info().uuid == NAME``). Without a
query string every NAME gives the "demo" volume (1024x1024x768 voxels, 4 scales, a tissue mask
of ~2,200 scale-0 blocks, a few dense blocks). Query keys:

=============  =========================================================================
size           scale-0 volume in voxels (each axis 64 .. 262,144)
scales         number of scales (0 .. N-1); scale s grid = ceil(size / 2^s / 64)
seed           integer seed (different seed, different volume)
instance       instance name reported by ``info()`` (default "segmentation")
mask           tissue mask: ``ellipsoid`` (default, ~70 % of the box), ``sparse``
               (~10 %: lobes inside the ellipsoid), ``full`` (every block present)
empty          fraction of tissue bricks forced empty (holes, lots of empty regions)
solid          fraction of aligned 2x2x2-block regions filled by one supervoxel (solid blocks)
dense          fraction of blocks that are "dense": voxels pair up into two-voxel
               supervoxels. 2 of 3 are very dense (94-99.5 % of the voxels, ~124k-130k
               labels, 9 bits per voxel, table sorted by id so palettes look random:
               ~2.3 MB DVID blocks whose table-less rest is > 504 KiB after zstd); the
               others have 2-90 % (thousands to ~118k labels)
bigids         1: about half of the supervoxel ids (and bodies) are >= 2**63
lattice        supervoxel size: Voronoi lattice spacing in voxels (16 .. 256, default 32)
maxindex       refuse label indices / ``present_blocks`` / mapping above this many blocks or
               supervoxels (default 100,000 blocks; mapping 20,000,000 supervoxels)
cache          MiB of generated voxels and block bytes kept (default 256)
=============  =========================================================================

How it is built (all numba, lazily, per block):

* Tissue mask at BLOCK granularity, decidable without voxels: the scale-0 block grid is cut
  into bricks of 2^b blocks (b = 0..4 by volume size). A brick is empty, full, or "pattern"
  (tissue boundary: blocks on one side of a random plane through the brick, its origin block
  always present). So ``count()`` sums whole bricks analytically and evaluates blocks only in
  pattern bricks — exact, and seconds for the 3.8-billion-slot male-CNS-size grid.
  A coarse block (scale s) is present iff any of its 8^s scale-0 blocks is.
* Supervoxels: Voronoi cells of jittered seeds on a lattice, looked up through a smooth warp
  (irregular, neurite-ish boundaries), computed at half resolution and warped per voxel.
  Bodies group 3x3x12 lattice cells (elongated, spanning many blocks); 10 % of supervoxels
  are their own body, the group's anchor supervoxel id is the body id (as in DVID).
  Solid regions (2x2x2 blocks of one supervoxel, its own body) and dense blocks (fragments
  of two voxels in different sub-blocks, mapped to the body of their lattice cell) override
  the Voronoi labels. Present blocks touching an
  absent neighbour are zeroed to a wavy depth of 4..28 voxels on that side (never the
  centre, so a present block is never all zero; absent blocks are all zero).
* Coarse scales: DVID ``Downres`` (mode of the non-zero labels of each 2x2x2 cell, ties to
  the smallest, all-zero -> 0) of the 8 children one scale below. Cost: a scale-s block
  needs up to 8^s scale-0 blocks (~2 ms CPU each); an LRU of voxels and stored bytes
  (``cache``) lets a scale decode the cached bytes of the one below instead (~0.5 ms), so
  reading scales 0..N in order costs about one generation pass. A served scale-0 block
  costs ~3.5 ms CPU (generate 1.8, encode 0.7, gzip 0.6); all 2,344 blocks of the demo
  take ~9 s CPU, its label indices ~2 s more.
* Label indices need one pass over every present scale-0 block; they are computed once and
  cached (refused above ``maxindex`` blocks).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from dvidetl.batching import spans
from dvidetl.errors import UserError
from dvidetl.geometry import KEY_END, ScaleInfo, VolumeInfo, _bit_plan, vec3
from dvidetl.sources._synthetic_downres import _downres_kernel
from dvidetl.sources._synthetic_kernels import (
    BATCH_BYTES,
    BS,
    DEMO_QUERY,
    F_DENSE,
    F_EMPTY,
    F_PH,
    F_SINGLE,
    F_SOLID,
    MASKS,
    N_FP,
    N_IP,
    P_BB,
    P_BIG,
    P_G0X,
    P_G0Z,
    P_GRX,
    P_GRZ,
    P_LAT,
    P_MASK,
    P_NBX,
    P_NBZ,
    P_NLX,
    P_NLY,
    P_NLZ,
    P_SEED,
    TABLE_CAP,
    _apply_table,
    _block_kinds,
    _count_kernel,
    _dense_overlay,
    _enumerate,
    _gen_block0,
    _map_kernel,
    _mapping_kernel,
    _present,
)
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    MAPPING_SCHEMA,
    KeyCounts,
    count_sorted,
    mapping_batches,
)
from dvidetl.urlquery import Query

# Imports inside functions load protobuf, the compression libraries only where used: importing
# this module must not (CLI start-up, processes that never call them). Those in try/if/with
# blocks are optional or conditional.

__all__ = ["SyntheticSource", "open_url", "DEMO_QUERY"]

# ---- the source -----------------------------------------------------------------------------
def _parse_floats(key: str, v: str, lo: float, hi: float) -> float:
    try:
        f = float(v)
    except ValueError:
        raise UserError(f"synthetic URL: {key}={v!r} is not a number") from None
    if not (lo <= f <= hi):
        raise UserError(f"synthetic URL: {key}={v} out of range [{lo}, {hi}]")
    return f


def _parse_int(key: str, v: str, lo: int, hi: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"synthetic URL: {key}={v!r} is not an integer") from None
    if not (lo <= n <= hi):
        raise UserError(f"synthetic URL: {key}={v} out of range [{lo}, {hi}]")
    return n


KNOWN_KEYS = (
    "size",
    "scales",
    "seed",
    "instance",
    "mask",
    "empty",
    "solid",
    "dense",
    "bigids",
    "lattice",
    "maxindex",
    "cache",
)


class _LRU:
    """A byte-bounded, thread-safe LRU."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.d: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.d.get(key)
            if v is not None:
                self.d.move_to_end(key)
            return v

    def put(self, key, value, size: int):
        with self.lock:
            if key in self.d:
                return
            self.d[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self.d) > 1:
                _, (_, sz) = self.d.popitem(last=False)
                self.nbytes -= sz


class SyntheticSource:
    """A generated labelmap (see the module docstring); implements `Source`."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "synthetic":
            raise UserError(f"not a synthetic:// URL: {url!r}")
        name = (parts.netloc + parts.path).strip("/")
        if not name:
            raise UserError(f"synthetic URL needs a volume name (synthetic://NAME?...): {url!r}")
        self.url = url
        self.name = name
        query = parts.query or DEMO_QUERY
        q = Query(url, KNOWN_KEYS, query=query)
        g = {k: q.str(k, "") for k in KNOWN_KEYS if k in q}
        size_s = g.get("size", "1024,1024,768")
        try:
            size = tuple(int(t) for t in size_s.split(","))
        except ValueError:
            raise UserError(f"synthetic URL: size={size_s!r} must be X,Y,Z integers") from None
        if len(size) != 3 or any(not (BS <= s <= 1 << 18) for s in size):
            raise UserError(f"synthetic URL: size={size_s} needs 3 values in [64, 262144]")
        self.size: tuple[int, int, int] = size
        grid0 = tuple(-(-s // BS) for s in size)
        max_scales = max(1, max(int(g_ - 1).bit_length() for g_ in grid0) + 1)
        self.nscales = _parse_int("scales", g.get("scales", str(min(4, max_scales))), 1, 20)
        self.seed = _parse_int("seed", g.get("seed", "0"), 0, 2**62)
        self.instance = g.get("instance", "segmentation") or "segmentation"
        mask = g.get("mask", "ellipsoid")
        if mask not in MASKS:
            raise UserError(f"synthetic URL: mask={mask!r}; use one of {', '.join(MASKS)}")
        self.mask = mask
        dense = _parse_floats("dense", g.get("dense", "0"), 0.0, 1.0)
        solid = _parse_floats("solid", g.get("solid", "0.03"), 0.0, 1.0)
        empty = _parse_floats("empty", g.get("empty", "0"), 0.0, 1.0)
        bigids = _parse_int("bigids", g.get("bigids", "0"), 0, 1)
        lattice = _parse_int("lattice", g.get("lattice", "32"), 16, 256)
        self.maxindex = _parse_int("maxindex", g.get("maxindex", "100000"), 1, 2**40)
        cache_mb = _parse_int("cache", g.get("cache", "256"), 8, 1 << 20)

        maxg = max(grid0)
        bb = 0 if maxg <= 64 else min(4, math.ceil(math.log2(maxg / 64)))
        nbr = tuple(-(-g_ // (1 << bb)) for g_ in grid0)
        nlat = tuple(-(-s // lattice) for s in size)
        ip = np.zeros(N_IP, np.int64)
        ip[P_SEED] = self.seed
        ip[P_G0X : P_G0Z + 1] = grid0
        ip[P_BB] = bb
        ip[P_NBX : P_NBZ + 1] = nbr
        ip[P_MASK] = MASKS[mask]
        ip[P_BIG] = bigids
        ip[P_LAT] = lattice
        ip[P_NLX : P_NLZ + 1] = nlat
        ip[P_GRX : P_GRZ + 1] = (3, 3, 12)
        fp = np.zeros(N_FP, np.float64)
        fp[F_DENSE] = dense
        fp[F_SOLID] = solid
        fp[F_EMPTY] = empty
        fp[F_SINGLE] = 0.1
        rng = np.random.default_rng(self.seed)
        fp[F_PH : F_PH + 12] = rng.uniform(0, 2 * np.pi, 12)
        self._ip, self._fp = ip, fp
        self.brick_shift = bb

        scales = []
        for s in range(self.nscales):
            grid = vec3(-(-g_ // (1 << s)) for g_ in grid0)
            vmax = vec3(-(-sz // (1 << s)) for sz in size)
            scales.append(ScaleInfo(s, (BS, BS, BS), grid, (0, 0, 0), vmax))
        self._info = VolumeInfo(uuid=name, instance=self.instance, codec="gzip", scales=scales)
        self._plans = [np.array(_bit_plan(si.grid), dtype=np.int64).reshape(-1, 3) for si in scales]
        self._vox = _LRU(cache_mb << 19)  # half for voxels
        self._bytes = _LRU(cache_mb << 19)  # half for block bytes
        self._lock = threading.Lock()
        self._index_rows = None
        self._mapping_sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._idx_dummy = np.zeros((1, 1, 1), np.uint32)
        #: per-block (supervoxel, voxels) counts gathered while generating, so the index pass
        #: need not regenerate blocks already served (volumes small enough for indices only)
        self._stash: dict | None = {} if scales[0].block_slots <= 8 * self.maxindex else None
        self._stash_bytes = 0

    def __reduce__(self):
        """Pickle as the URL (caches and locks stay behind; the volume is the same)."""
        return (open_url, (self.url,))

    # -- protocol ------------------------------------------------------------------------------
    def info(self) -> VolumeInfo:
        return self._info

    def close(self) -> None:
        """Drop the caches (the source stays usable: everything regenerates on demand)."""
        self._vox = _LRU(self._vox.max_bytes)
        self._bytes = _LRU(self._bytes.max_bytes)
        self._index_rows = None
        self._mapping_sorted = None
        if self._stash is not None:
            self._stash = {}
            self._stash_bytes = 0

    def _scale(self, scale: int) -> ScaleInfo:
        if not (0 <= scale < self.nscales):
            raise UserError(
                f"scale {scale} not in volume {self.name} (scales 0..{self.nscales - 1})"
            )
        return self._info.scales[scale]

    def count(self, scale: int, cell_bits: int, max_pairs: int = 64_000_000):
        """Exact blocks per aligned Morton cell ``code >> cell_bits`` (see module docstring)."""
        si = self._scale(scale)
        if cell_bits < 0:
            raise UserError(f"count cell_bits must be >= 0, got {cell_bits}")
        plan = self._plans[scale]
        cell_bits = min(int(cell_bits), len(plan))  # past the code's bits every block is in cell 0
        gs = np.array(si.grid, np.int64)
        empty = np.zeros(0, np.uint64)
        n = _count_kernel(self._ip, self._fp, scale, plan, gs, cell_bits, False, empty, empty)
        if n > max_pairs:
            raise UserError(
                f"count of {self.name} scale {scale} with cell_bits {cell_bits} would list ~{n:,} cells; "
                "use coarser cells (more cell_bits)"
            )
        cells = np.empty(n, np.uint64)
        counts = np.empty(n, np.uint64)
        n = _count_kernel(self._ip, self._fp, scale, plan, gs, cell_bits, True, cells, counts)
        cells, counts = cells[:n], counts[:n]
        order = np.argsort(cells, kind="stable")
        cells, counts = cells[order], counts[order]
        if n:
            starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
            cells = cells[starts]
            counts = np.add.reduceat(counts, starts).astype(np.uint64)
        return cells, counts, True

    def _enumerate(self, scale: int, lo: int, hi: int, chunk: int = 1 << 18):
        """Present blocks in [lo, hi), ascending code, chunk by chunk (bounded memory)."""
        si = self._scale(scale)
        plan = self._plans[scale]
        gx, gy, gz = si.grid
        hi = min(hi, si.morton_end)
        lo = max(lo, 0)
        xs = np.empty(chunk, np.int32)
        ys = np.empty(chunk, np.int32)
        zs = np.empty(chunk, np.int32)
        codes = np.empty(chunk, np.uint64)
        a = lo
        while a < hi:
            b = min(hi, a + chunk)
            n = _enumerate(self._ip, self._fp, scale, plan, gx, gy, gz, a, b, xs, ys, zs, codes)
            if n:
                yield xs[:n].copy(), ys[:n].copy(), zs[:n].copy(), codes[:n].copy()
            a = b

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored (gzip-wrapped) blocks with lo <= morton < hi, ascending, batches <= 8 MiB."""
        if lo >= hi:
            raise UserError(f"empty Morton range [{lo}, {hi})")
        for xs, ys, zs, codes in self._enumerate(scale, lo, hi):
            start = 0
            datas: list[bytes] = []
            nbytes = 0
            for i in range(len(codes)):
                d = self.block_stored(scale, int(xs[i]), int(ys[i]), int(zs[i]))
                assert d is not None  # _enumerate lists only blocks that exist
                if datas and nbytes + len(d) > BATCH_BYTES:
                    yield self._batch(xs, ys, zs, codes, start, i, datas)
                    start, datas, nbytes = i, [], 0
                datas.append(d)
                nbytes += len(d)
            if datas:
                yield self._batch(xs, ys, zs, codes, start, len(codes), datas)

    @staticmethod
    def _batch(xs, ys, zs, codes, a, b, datas) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [
                pa.array(xs[a:b]),
                pa.array(ys[a:b]),
                pa.array(zs[a:b]),
                pa.array(codes[a:b]),
                pa.array(datas, pa.binary()),
            ],
            schema=BLOCKS_WIRE_SCHEMA,
        )

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel; identity for ids this volume does not map."""
        a = np.ascontiguousarray(np.asarray(svs), dtype=np.uint64)
        out = np.empty_like(a)
        _map_kernel(self._ip, self._fp, a.ravel(), out.ravel())
        return out

    def _n_lattice(self) -> int:
        ip = self._ip
        return int(ip[P_NLX]) * int(ip[P_NLY]) * int(ip[P_NLZ])

    def _mapping_batches(self, batch: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """All non-identity (supervoxel, body) pairs, in generation order (lattice, then the
        fragments of dense blocks)."""
        total = self._n_lattice()
        limit = max(self.maxindex * 200, 20_000_000)
        if total > limit:
            raise UserError(
                f"synthetic volume {self.name} has {total:,} supervoxels; read_mapping is "
                f"limited to {limit:,} (raise maxindex= or use map_supervoxels)"
            )
        sv = np.empty(batch, np.uint64)
        body = np.empty(batch, np.uint64)
        for a in range(0, total, batch):
            n = _mapping_kernel(self._ip, self._fp, a, min(total, a + batch), sv, body)
            if n:
                yield pa.RecordBatch.from_arrays(
                    [pa.array(sv[:n].copy()), pa.array(body[:n].copy())], schema=MAPPING_SCHEMA
                )
        if self._fp[F_DENSE] > 0:  # fragments of dense blocks belong to the Voronoi bodies
            xs, ys, zs, _ = self.present_blocks(0)
            dense = self.block_kinds(xs, ys, zs) == 2
            table = np.empty(TABLE_CAP, np.uint64)
            for x, y, z in zip(
                xs[dense].tolist(), ys[dense].tolist(), zs[dense].tolist(), strict=True
            ):
                n = _dense_overlay(self._ip, self._fp, x, y, z, self._idx_dummy, table, 0, False)
                frag = table[:n].copy()
                yield pa.RecordBatch.from_arrays(
                    [pa.array(frag), pa.array(self.map_supervoxels(frag))], schema=MAPPING_SCHEMA
                )

    def _mapping_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The non-identity pairs sorted by supervoxel, unique (generated once and cached, so
        range reads and counts are a searchsorted; bounded by read_mapping's limit)."""
        with self._lock:
            if self._mapping_sorted is not None:
                return self._mapping_sorted
        bs = list(self._mapping_batches())
        if bs:
            sv = np.concatenate([b.column(0).to_numpy() for b in bs]).astype(np.uint64)
            body = np.concatenate([b.column(1).to_numpy() for b in bs]).astype(np.uint64)
            sv, first = np.unique(sv, return_index=True)  # a fragment may sit in two blocks
            body = body[first]
        else:
            sv = body = np.zeros(0, np.uint64)
        with self._lock:
            self._mapping_sorted = (sv, body)
        return sv, body

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Non-identity (supervoxel, body) pairs with ``lo <= supervoxel < hi``, ascending."""
        return mapping_batches(*self._mapping_arrays(), lo, hi)

    def count_keys(self, kind: str, cell_bits: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """Exact: indices count the rows of the (cached) index table per body, the mapping
        its pairs per supervoxel."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, cell_bits, lo, hi)
        labels, rows = self._index_labels()
        return count_sorted(labels, rows, cell_bits, lo, hi)

    def _index_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Body labels with an index (ascending) and their label_index rows."""
        body = self._index_table()["body"]
        if body.size == 0:
            return body, np.zeros(0, np.uint64)
        starts = np.flatnonzero(np.concatenate([[True], body[1:] != body[:-1]]))
        return body[starts], np.diff(np.append(starts, body.size)).astype(np.uint64)

    def mapping_dict(self) -> dict[int, int]:
        """The non-identity mapping as a dict (small volumes; ground truth for tests)."""
        out: dict[int, int] = {}
        for b in self._mapping_batches():
            out.update(zip(b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True))
        return out

    # -- ground truth ---------------------------------------------------------------------------
    def present_blocks(self, scale: int):
        """(x, y, z, morton) of every present block of a scale, ascending morton."""
        si = self._scale(scale)
        if si.morton_end > max(self.maxindex * 64, 1 << 26):
            raise UserError(
                f"present_blocks({scale}) of {self.name}: {si.morton_end:,} codes is too many "
                "to enumerate; use count() or read_blocks on a range"
            )
        parts = list(self._enumerate(scale, 0, si.morton_end))
        if not parts:
            z = np.zeros(0, np.int32)
            return z, z, z, np.zeros(0, np.uint64)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

    def is_present(self, scale: int, x: int, y: int, z: int) -> bool:
        self._scale(scale)
        return bool(_present(self._ip, self._fp, scale, x, y, z))

    def block_kinds(self, xs, ys, zs) -> np.ndarray:
        """Kind of scale-0 blocks without generating them: 0 Voronoi, 1 solid, 2 dense."""
        xs, ys, zs = (np.ascontiguousarray(a, dtype=np.int64) for a in (xs, ys, zs))
        out = np.empty(len(xs), np.int8)
        _block_kinds(self._ip, self._fp, xs, ys, zs, out)
        return out

    def _gen0(self, x: int, y: int, z: int):
        """(idx uint32 volume, table) of a present scale-0 block."""
        idx = np.empty((BS, BS, BS), np.uint32)
        table = np.empty(TABLE_CAP, np.uint64)
        n = _gen_block0(self._ip, self._fp, x, y, z, idx, table)
        return idx, table[:n].copy()

    def _gen0_voxels(self, x: int, y: int, z: int, out: np.ndarray):
        """Fill ``out`` with the voxels of present scale-0 block; returns its (svs, counts)."""
        idx, table = self._gen0(x, y, z)
        cnt = np.empty(len(table), np.uint32)
        _apply_table(idx, table, out, cnt)
        sel = np.flatnonzero(cnt)
        sel = sel[table[sel] != 0]
        counts = (table[sel], cnt[sel])
        if self._stash is not None and self._stash_bytes < self._vox.max_bytes:
            if (x, y, z) not in self._stash:  # bounded: the index pass regenerates the rest
                self._stash[(x, y, z)] = counts
                self._stash_bytes += 12 * len(sel) + 200
        return counts

    def block_voxels(self, scale: int, x: int, y: int, z: int) -> np.ndarray:
        """uint64 supervoxel ids [z, y, x] of a block (zeros if absent). Do not modify."""
        self._scale(scale)
        key = (scale, x, y, z)
        hit = self._vox.get(key)
        if hit is not None:
            return hit[0]
        if not _present(self._ip, self._fp, scale, x, y, z):
            return np.zeros((BS, BS, BS), np.uint64)
        out = np.empty((BS, BS, BS), np.uint64)
        if scale == 0:
            self._gen0_voxels(x, y, z, out)
        else:
            children = np.zeros((8, BS, BS, BS), np.uint64)
            present = np.zeros(8, np.bool_)
            for c in range(8):
                cx, cy, cz = 2 * x + (c & 1), 2 * y + ((c >> 1) & 1), 2 * z + (c >> 2)
                if _present(self._ip, self._fp, scale - 1, cx, cy, cz):
                    present[c] = True
                    children[c] = self._child_voxels(scale - 1, cx, cy, cz)
            _downres_kernel(children, present, out)
        out.setflags(write=False)
        if scale > 0:  # scale 0 regenerates in ~2 ms; keep the cache for what is costly
            self._vox.put(key, out, out.nbytes)
        return out

    def _child_voxels(self, scale: int, x: int, y: int, z: int) -> np.ndarray:
        hit = self._vox.get((scale, x, y, z))
        if hit is not None:
            return hit[0]
        b = self._bytes.get((scale, x, y, z))
        if b is not None:  # decoding the cached bytes (~0.5 ms) beats regenerating (~2 ms)
            from dvidetl.codec import decode_block, unwrap

            return decode_block(unwrap(b[0], "gzip"))
        return self.block_voxels(scale, x, y, z)

    def _encoded(self, scale: int, x: int, y: int, z: int) -> tuple[bytes | None, bytes] | None:
        """(raw or None, stored) of a block, None if absent. Only the stored (gzip) bytes are
        cached — ~5x smaller than raw, so a whole test volume's scale fits the LRU."""
        key = (scale, x, y, z)
        hit = self._bytes.get(key)
        if hit is not None:
            return None, hit[0]
        if not _present(self._ip, self._fp, scale, x, y, z):
            return None
        from dvidetl.codec import encode_block, wrap

        vox = self.block_voxels(scale, x, y, z)
        if scale == 0 and self.block_kinds([x], [y], [z])[0] == 2:
            # a table sorted by (random-looking) id, as libdvid-style encoders may write it:
            # palette entries then look random, which is what makes real dense blocks big
            raw = encode_block(vox, label_order=np.unique(vox))
        else:
            raw = encode_block(vox)
        stored = wrap(raw, "gzip")
        self._bytes.put(key, stored, len(stored) + 100)
        return raw, stored

    def block_bytes(self, scale: int, x: int, y: int, z: int) -> bytes | None:
        """The unwrapped DVID block serialization, or None if the block is absent."""
        self._scale(scale)
        e = self._encoded(scale, x, y, z)
        if e is None:
            return None
        if e[0] is not None:
            return e[0]
        from dvidetl.codec import unwrap

        return bytes(unwrap(e[1], "gzip"))

    def block_stored(self, scale: int, x: int, y: int, z: int) -> bytes | None:
        """The block as stored and served (gzip of `block_bytes`), or None if absent."""
        self._scale(scale)
        e = self._encoded(scale, x, y, z)
        return None if e is None else e[1]

    # -- label indices --------------------------------------------------------------------------
    def _index_table(self):
        """Rows (body, x, y, z, sv, count) of every scale-0 block, sorted by body, block, sv."""
        with self._lock:
            if self._index_rows is not None:
                return self._index_rows
            cells, counts, _ = self.count(0, 64)
            total = int(counts.sum()) if len(counts) else 0
            if total > self.maxindex:
                raise UserError(
                    f"label indices of synthetic volume {self.name} need a pass over {total:,} "
                    f"scale-0 blocks; the limit is maxindex={self.maxindex:,}"
                )
            xs, ys, zs, _ = self.present_blocks(0)
            coords = list(zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True))

            def generate(chunk: list) -> list:
                # the kernels release the GIL: blocks generate on every core at once
                scratch = np.empty((BS, BS, BS), np.uint64)
                out = []
                for x, y, z in chunk:
                    got = self._stash.get((x, y, z)) if self._stash is not None else None
                    if got is None and self._stash is not None and \
                            self._stash_bytes < self._vox.max_bytes and \
                            self._bytes.nbytes < self._bytes.max_bytes // 2:
                        # encode the block too while its voxels are at hand: the export's
                        # read_blocks then serves it from the cache instead of regenerating
                        # (only while the stash keeps the counts, or they would be generated twice)
                        self._encoded(0, x, y, z)
                        got = self._stash.get((x, y, z))
                    if got is None:
                        got = self._gen0_voxels(x, y, z, scratch)
                    svs, cnt = got
                    n = len(svs)
                    out.append((np.full(n, x, np.int32), np.full(n, y, np.int32),
                                np.full(n, z, np.int32), svs, cnt))
                return out

            nthreads = max(1, min(os.cpu_count() or 1, 8))
            step = max(1, -(-len(coords) // (4 * nthreads)))
            chunks = [coords[i:i + step] for i in range(0, len(coords), step)]
            parts = []
            with ThreadPoolExecutor(nthreads, thread_name_prefix="synthetic-index") as pool:
                for got in pool.map(generate, chunks):
                    parts.extend(got)
            if parts:
                bx, by, bz, sv, vc = (np.concatenate([p[i] for p in parts]) for i in range(5))
            else:
                bx = by = bz = np.zeros(0, np.int32)
                sv = np.zeros(0, np.uint64)
                vc = np.zeros(0, np.uint32)
            body = self.map_supervoxels(sv)
            from dvidetl.codec.labelindex import encode_block_key

            key = encode_block_key(bx, by, bz) if len(bx) else np.zeros(0, np.uint64)
            order = np.lexsort((sv, key, body))
            self._index_rows = {
                "body": body[order],
                "x": bx[order],
                "y": by[order],
                "z": bz[order],
                "supervoxel": sv[order],
                "voxels": vc[order],
            }
            return self._index_rows

    def index_rows(self) -> dict[str, np.ndarray]:
        """Ground truth for label indices: flat rows (body, x, y, z, supervoxel, voxels)."""
        return self._index_table()

    def read_indices(self, lo: int, hi: int, batch_bytes: int = BATCH_BYTES):
        """LabelIndex protobufs (unwrapped) of bodies lo <= body < hi, ascending body."""
        from dvidetl.codec.labelindex import encode_label_indices

        rows = self._index_table()
        body = rows["body"]
        a = int(np.searchsorted(body, np.uint64(max(lo, 0)), "left"))
        b = int(np.searchsorted(body, np.uint64(min(hi, KEY_END - 1)), "left"))
        if hi > KEY_END - 1:
            b = len(body)
        step = 200_000
        while a < b:
            e = min(b, a + step)
            if e < b:  # do not cut a body
                e = int(np.searchsorted(body, body[e - 1], "right"))
            sl = slice(a, e)
            labels, datas = encode_label_indices(
                body[sl],
                np.stack([rows["x"][sl], rows["y"][sl], rows["z"][sl]], 1),
                rows["supervoxel"][sl],
                rows["voxels"][sl],
            )
            sizes = np.fromiter(map(len, datas), np.int64, len(datas))
            for i, j in spans(sizes, batch_bytes):
                yield pa.RecordBatch.from_arrays(
                    [pa.array(labels[i:j], pa.uint64()), pa.array(datas[i:j], pa.binary())],
                    schema=INDICES_SCHEMA,
                )
            a = e


def open_url(url: str) -> SyntheticSource:
    """Open ``synthetic://NAME?...`` (see module docstring)."""
    return SyntheticSource(url)
