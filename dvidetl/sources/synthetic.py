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

import numba as nb
import numpy as np
import pyarrow as pa

from dvidetl.errors import UserError
from dvidetl.geometry import ScaleInfo, VolumeInfo, _bit_plan
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    KEY_END,
    MAPPING_SCHEMA,
    KeyCounts,
    count_sorted,
    mapping_batches,
)
from dvidetl.urlquery import Query

__all__ = ["SyntheticSource", "open_url", "downres_dvid", "DEMO_QUERY"]

BS = 64  # block size (voxels per side), the only size DVID exports
BATCH_BYTES = 8 << 20  # bound on a record batch's data column
DEMO_QUERY = "size=1024,1024,768&scales=4&dense=0.002&solid=0.03&empty=0.03&seed=0"

# ---- parameter vector layout (ints) ---------------------------------------------------------
P_SEED, P_G0X, P_G0Y, P_G0Z, P_BB, P_NBX, P_NBY, P_NBZ, P_MASK, P_BIG = range(10)
P_LAT, P_NLX, P_NLY, P_NLZ, P_GRX, P_GRY, P_GRZ = range(10, 17)
N_IP = 17
# floats
F_DENSE, F_SOLID, F_EMPTY, F_SINGLE = range(4)
F_PH = 4  # 12 phases from the seed
N_FP = 16

MASK_ELLIPSOID, MASK_SPARSE, MASK_FULL = 0, 1, 2
MASKS = {"ellipsoid": MASK_ELLIPSOID, "sparse": MASK_SPARSE, "full": MASK_FULL}

TAG_VORONOI, TAG_SOLID, TAG_DENSE = 1, 2, 3
M56 = (1 << 56) - 1
MIX = 0x9E3779B97F4A7C15 & M56 | 1  # odd: multiplication is a bijection mod 2^56
MIX_INV = pow(MIX, -1, 1 << 56)

_U = np.uint64


# ---- hashing --------------------------------------------------------------------------------
@nb.njit(cache=True)
def _mix(h):
    h ^= h >> _U(33)
    h *= _U(0xFF51AFD7ED558CCD)
    h ^= h >> _U(33)
    h *= _U(0xC4CEB9FE1A85EC53)
    h ^= h >> _U(33)
    return h


@nb.njit(cache=True)
def _h4(seed, salt, a, b, c):
    """Hash of (seed, salt, three non-negative ints) -> uint64."""
    h = _mix(_U(seed) * _U(0x9E3779B97F4A7C15) + _U(salt))
    h = _mix(h ^ (_U(a) * _U(0xD6E8FEB86659FD93)))
    h = _mix(h ^ (_U(b) * _U(0xA0761D6478BD642F)))
    h = _mix(h ^ (_U(c) * _U(0xE7037ED1A0B428DB)))
    return h


@nb.njit(cache=True)
def _unit(h):
    """uint64 hash -> float in [0, 1)."""
    return float(h >> _U(11)) * (1.0 / 9007199254740992.0)


# ---- ids ------------------------------------------------------------------------------------
@nb.njit(cache=True)
def _mix56(v):
    return (v * _U(MIX)) & _U(M56)


@nb.njit(cache=True)
def _unmix56(v):
    return (v * _U(MIX_INV)) & _U(M56)


@nb.njit(cache=True)
def _voronoi_id(ip, ci, cj, ck):
    packed = (_U(ci) << _U(40)) | (_U(cj) << _U(20)) | _U(ck)
    sv = (_U(TAG_VORONOI) << _U(56)) | _mix56(packed)
    if ip[P_BIG] != 0 and (_h4(ip[P_SEED], 77, ci, cj, ck) & _U(1)) != _U(0):
        sv |= _U(1) << _U(63)
    return sv


@nb.njit(cache=True)
def _solid_id(ip, rx, ry, rz):
    packed = (_U(rx) << _U(40)) | (_U(ry) << _U(20)) | _U(rz)
    return (_U(TAG_SOLID) << _U(56)) | _mix56(packed)


@nb.njit(cache=True)
def _dense_id(x, y, z):
    """Fragment id of the pair whose canonical voxel is (x, y, z); coords < 2^18 (checked)."""
    packed = _U(x) | (_U(y) << _U(18)) | (_U(z) << _U(36))
    return (_U(TAG_DENSE) << _U(56)) | _mix56(packed)


@nb.njit(cache=True)
def _body_of_cell(ip, fp, ci, cj, ck):
    """Body of lattice cell (ci, cj, ck): its group's anchor supervoxel (or itself, 10 %).

    Groups are GRX x GRY x GRZ cells, staggered so bodies are not boxes: each row (cj) has
    its own x phase, each column (ci, cj) its own z phase. The anchor is the group's cell
    in its first row, first x, first z (unique per group, so body ids never collide)."""
    seed = ip[P_SEED]
    if _unit(_h4(seed, 78, ci, cj, ck)) < fp[F_SINGLE]:
        return _voronoi_id(ip, ci, cj, ck)
    grx, gry, grz = ip[P_GRX], ip[P_GRY], ip[P_GRZ]
    gi = (ci + np.int64(_h4(seed, 79, cj, 0, 0) % _U(grx))) // grx
    gj = cj // gry
    gk = (ck + np.int64(_h4(seed, 80, ci, cj, 0) % _U(grz))) // grz
    aj = gj * gry
    ai = max(gi * grx - np.int64(_h4(seed, 79, aj, 0, 0) % _U(grx)), 0)
    ak = max(gk * grz - np.int64(_h4(seed, 80, ai, aj, 0) % _U(grz)), 0)
    return _voronoi_id(ip, ai, aj, ak)


@nb.njit(cache=True)
def _is_dense(ip, fp, bx, by, bz):
    seed = ip[P_SEED]
    if fp[F_DENSE] <= 0.0:
        return False
    if fp[F_SOLID] > 0.0 and _unit(_h4(seed, 31, bx >> 1, by >> 1, bz >> 1)) < fp[F_SOLID]:
        return False
    return _unit(_h4(seed, 51, bx, by, bz)) < fp[F_DENSE]


@nb.njit(cache=True)
def _dense_mask(ip, bx, by, bz):
    """The XOR offset pairing voxels of a dense block: always into another sub-block."""
    h = _h4(ip[P_SEED], 54, bx, by, bz)
    m = 1 + np.int64(h % _U(511))  # sub-block part: (a, b, c) in 0..7, not all zero
    v = np.int64((h >> _U(20)) & _U(511))  # voxel part: the partner's position differs too
    return 8 * (m & 7) + (v & 7), 8 * ((m >> 3) & 7) + ((v >> 3) & 7), 8 * (m >> 6) + (v >> 6)


@nb.njit(cache=True)
def _dense_q(ip, bx, by, bz):
    """Fraction of voxel pairs that become fragments: 2 of 3 dense blocks are very dense
    (94-99.5 %, ~124k-130k labels), the rest anywhere from 2 % to 90 % (~2.6k-118k)."""
    h = _h4(ip[P_SEED], 52, bx, by, bz)
    if h % _U(3) != _U(0):
        return 0.94 + 0.055 * _unit(_mix(h))
    return 0.02 + 0.88 * _unit(_mix(h))


@nb.njit(cache=True)
def _is_fragment(ip, fp, x, y, z):
    """Is global voxel (x, y, z) the canonical voxel of a dense-block fragment?"""
    if x < 0 or y < 0 or z < 0:
        return False
    bx, by, bz = x // BS, y // BS, z // BS
    if bx >= ip[P_G0X] or by >= ip[P_G0Y] or bz >= ip[P_G0Z]:
        return False
    if not _is_dense(ip, fp, bx, by, bz) or not _present0(ip, fp, bx, by, bz):
        return False
    mx, my, mz = _dense_mask(ip, bx, by, bz)
    lx, ly, lz = x - bx * BS, y - by * BS, z - bz * BS
    px, py, pz = lx ^ mx, ly ^ my, lz ^ mz
    if (pz * BS + py) * BS + px < (lz * BS + ly) * BS + lx:
        return False
    return _unit(_h4(ip[P_SEED], 53, x, y, z)) < _dense_q(ip, bx, by, bz)


@nb.njit(nogil=True, cache=True)
def _dense_overlay(ip, fp, bx, by, bz, idx, table, ntab, write):
    """Pair voxels (v, v XOR offset) of a dense block into fragments (a fraction q of pairs).

    With ``write`` the pairs are written into idx/table from ``ntab`` on; without, the
    fragment ids are stored in ``table[ntab:]`` only (for the mapping). Returns the new length.
    """
    mx, my, mz = _dense_mask(ip, bx, by, bz)
    q = _dense_q(ip, bx, by, bz)
    ox, oy, oz = bx * BS, by * BS, bz * BS
    seed = ip[P_SEED]
    for z in range(BS):
        for y in range(BS):
            for x in range(BS):
                px, py, pz = x ^ mx, y ^ my, z ^ mz
                if (pz * BS + py) * BS + px < (z * BS + y) * BS + x:
                    continue  # the partner is the canonical voxel
                if _unit(_h4(seed, 53, ox + x, oy + y, oz + z)) < q:
                    table[ntab] = _dense_id(ox + x, oy + y, oz + z)
                    if write:
                        idx[z, y, x] = ntab
                        idx[pz, py, px] = ntab
                    ntab += 1
    return ntab


@nb.njit(nogil=True, cache=True)
def _map_kernel(ip, fp, svs, out):
    m20 = _U((1 << 20) - 1)
    for i in range(svs.shape[0]):
        sv = svs[i]
        out[i] = sv
        tag = (sv >> _U(56)) & _U(0x7F)
        if tag == _U(TAG_DENSE) and (sv >> _U(63)) == _U(0):
            packed = _unmix56(sv & _U(M56))
            m18 = _U((1 << 18) - 1)
            x = np.int64(packed & m18)
            y = np.int64((packed >> _U(18)) & m18)
            z = np.int64(packed >> _U(36))
            if _is_fragment(ip, fp, x, y, z):
                lat = ip[P_LAT]
                out[i] = _body_of_cell(ip, fp, x // lat, y // lat, z // lat)
            continue
        if tag != _U(TAG_VORONOI):
            continue  # solid regions are their own bodies
        packed = _unmix56(sv & _U(M56))
        ci = np.int64(packed >> _U(40))
        cj = np.int64((packed >> _U(20)) & m20)
        ck = np.int64(packed & m20)
        if ci >= ip[P_NLX] or cj >= ip[P_NLY] or ck >= ip[P_NLZ]:
            continue
        if _voronoi_id(ip, ci, cj, ck) != sv:
            continue  # not one of ours (e.g. wrong bit 63)
        out[i] = _body_of_cell(ip, fp, ci, cj, ck)


@nb.njit(nogil=True, cache=True)
def _mapping_kernel(ip, fp, start, stop, sv_out, body_out):
    """Non-identity (sv, body) of lattice cells with flat index in [start, stop)."""
    n = 0
    nly, nlz = ip[P_NLY], ip[P_NLZ]
    for f in range(start, stop):
        ci = f // (nly * nlz)
        cj = (f // nlz) % nly
        ck = f % nlz
        sv = _voronoi_id(ip, ci, cj, ck)
        body = _body_of_cell(ip, fp, ci, cj, ck)
        if body != sv:
            sv_out[n] = sv
            body_out[n] = body
            n += 1
    return n


# ---- mask -----------------------------------------------------------------------------------
@nb.njit(cache=True)
def _brick_state(ip, fp, i, j, k):
    """0 empty, 1 full, 2 pattern (tissue boundary inside the brick)."""
    kind = ip[P_MASK]
    if kind == MASK_FULL:
        st = 1
    else:
        nbx, nby, nbz = ip[P_NBX], ip[P_NBY], ip[P_NBZ]
        u = 2.0 * (i + 0.5) / nbx - 1.0
        v = 2.0 * (j + 0.5) / nby - 1.0
        w = 2.0 * (k + 0.5) / nbz - 1.0
        ph = fp[F_PH:]
        r = (abs(u) ** 3 + abs(v) ** 3 + abs(w) ** 3) ** (1.0 / 3.0)
        r *= (
            1.0
            + 0.07 * math.sin(2.5 * u + ph[0]) * math.sin(3.1 * v + ph[1])
            + 0.05 * math.sin(2.2 * w + ph[2])
        )
        t = 1.2 / max(nbx, nby, nbz)
        R = 0.99
        if r > R + t:
            return 0
        st = 1 if r < R - t else 2
        if kind == MASK_SPARSE:
            g = (
                math.sin(7.0 * u + ph[3])
                + math.sin(6.0 * v + ph[4])
                + math.sin(5.0 * w + ph[5])
                + 0.5 * math.sin(11.0 * (u + v) + ph[6])
            )
            thr = 1.65
            tg = 12.0 * t
            if g < thr - tg:
                return 0
            if g < thr + tg:
                st = 2
        if st == 2 and ip[P_BB] == 0:
            st = 1 if r < R else 0  # bricks of one block: no pattern, decide by the centre
            if kind == MASK_SPARSE and st == 1:
                st = 1 if g >= thr else 0
            if st == 0:
                return 0
    if fp[F_EMPTY] > 0.0 and _unit(_h4(ip[P_SEED], 11, i >> 1, j >> 1, k >> 1)) < fp[F_EMPTY]:
        return 0
    return st


@nb.njit(cache=True)
def _plane(ip, i, j, k):
    """The random plane (nx, ny, nz, d) of pattern brick (i, j, k)."""
    B = 1 << ip[P_BB]
    h = _h4(ip[P_SEED], 21, i, j, k)
    a = 2.0 * math.pi * _unit(h)
    c = 2.0 * _unit(_mix(h + _U(1))) - 1.0
    s = math.sqrt(1.0 - c * c)
    d = 1.0 + _unit(_mix(h + _U(2))) * (B / 2.0 - 1.0)
    return s * math.cos(a), s * math.sin(a), c, d


@nb.njit(cache=True)
def _in_plane(pl, half, lx, ly, lz):
    if lx == 0 and ly == 0 and lz == 0:
        return True  # the origin block of a pattern brick is always present
    return (lx + 0.5 - half) * pl[0] + (ly + 0.5 - half) * pl[1] + (lz + 0.5 - half) * pl[2] < pl[3]


@nb.njit(cache=True)
def _pattern_present(ip, i, j, k, lx, ly, lz):
    """Inside a pattern brick: blocks on one side of a random plane; the origin block always."""
    return _in_plane(_plane(ip, i, j, k), (1 << ip[P_BB]) / 2.0, lx, ly, lz)


@nb.njit(cache=True)
def _present0(ip, fp, x, y, z):
    if x < 0 or y < 0 or z < 0 or x >= ip[P_G0X] or y >= ip[P_G0Y] or z >= ip[P_G0Z]:
        return False
    bb = ip[P_BB]
    i, j, k = x >> bb, y >> bb, z >> bb
    st = _brick_state(ip, fp, i, j, k)
    if st == 0:
        return False
    if st == 1:
        return True
    m = (1 << bb) - 1
    return _pattern_present(ip, i, j, k, x & m, y & m, z & m)


@nb.njit(cache=True)
def _present_in_pattern(ip, pl, s, i, j, k, x, y, z):
    """Block (x, y, z) of scale s <= b lying in pattern brick (i, j, k) with plane ``pl``:
    is any of its scale-0 blocks present?"""
    bb = ip[P_BB]
    B = 1 << bb
    half = B / 2.0
    ox, oy, oz = i * B, j * B, k * B
    ax, ay, az = x << s, y << s, z << s
    ex = min((x + 1) << s, ip[P_G0X])
    ey = min((y + 1) << s, ip[P_G0Y])
    ez = min((z + 1) << s, ip[P_G0Z])
    for zz in range(az, ez):
        for yy in range(ay, ey):
            for xx in range(ax, ex):
                if _in_plane(pl, half, xx - ox, yy - oy, zz - oz):
                    return True
    return False


@nb.njit(cache=True)
def _present(ip, fp, s, x, y, z):
    """Block (x, y, z) of scale s is present iff any scale-0 block under it is."""
    if s == 0:
        return _present0(ip, fp, x, y, z)
    g0 = (ip[P_G0X], ip[P_G0Y], ip[P_G0Z])
    ax, ay, az = x << s, y << s, z << s
    if ax >= g0[0] or ay >= g0[1] or az >= g0[2] or x < 0 or y < 0 or z < 0:
        return False
    ex = min((x + 1) << s, g0[0])
    ey = min((y + 1) << s, g0[1])
    ez = min((z + 1) << s, g0[2])
    bb = ip[P_BB]
    B = 1 << bb
    for k in range(az >> bb, ((ez - 1) >> bb) + 1):
        for j in range(ay >> bb, ((ey - 1) >> bb) + 1):
            for i in range(ax >> bb, ((ex - 1) >> bb) + 1):
                st = _brick_state(ip, fp, i, j, k)
                if st == 0:
                    continue
                if st == 1:
                    return True
                ox, oy, oz = i * B, j * B, k * B
                if ax <= ox < ex and ay <= oy < ey and az <= oz < ez:
                    return True  # the origin block of a pattern brick is always present
                pl = _plane(ip, i, j, k)
                half = B / 2.0
                for zz in range(max(az, oz), min(ez, oz + B)):
                    for yy in range(max(ay, oy), min(ey, oy + B)):
                        for xx in range(max(ax, ox), min(ex, ox + B)):
                            if _in_plane(pl, half, xx - ox, yy - oy, zz - oz):
                                return True
    return False


# ---- Morton ---------------------------------------------------------------------------------
@nb.njit(cache=True)
def _morton(plan, x, y, z):
    code = _U(0)
    for t in range(plan.shape[0]):
        d = plan[t, 0]
        c = x if d == 0 else (y if d == 1 else z)
        code |= _U((c >> plan[t, 1]) & 1) << _U(plan[t, 2])
    return code


@nb.njit(nogil=True, cache=True)
def _enumerate(ip, fp, s, plan, gx, gy, gz, lo, hi, xs, ys, zs, codes):
    """Present blocks of scale s with lo <= code < hi (codes ascending); returns how many."""
    n = 0
    for code in range(lo, hi):
        x = 0
        y = 0
        z = 0
        for t in range(plan.shape[0]):
            bit = (code >> plan[t, 2]) & 1
            d = plan[t, 0]
            if d == 0:
                x |= bit << plan[t, 1]
            elif d == 1:
                y |= bit << plan[t, 1]
            else:
                z |= bit << plan[t, 1]
        if x >= gx or y >= gy or z >= gz:
            continue
        if _present(ip, fp, s, x, y, z):
            xs[n] = x
            ys[n] = y
            zs[n] = z
            codes[n] = code
            n += 1
    return n


# ---- count ----------------------------------------------------------------------------------
@nb.njit(cache=True)
def _emit(write, cells, counts, n, cell, cnt):
    if write:
        cells[n] = cell
        counts[n] = cnt
    return n + 1


@nb.njit(nogil=True, cache=True)
def _count_kernel(ip, fp, s, plan, gs, L, write, cells, counts):
    """(cell, count) pairs of present blocks of scale s, cell = code >> L (not yet merged).

    With ``write=False`` it only sizes the output (an upper bound on the pairs); the writing
    pass returns the exact number written.

    Units are scale-0 bricks (s <= b) or single scale-s blocks (s > b); a full unit adds its
    box analytically per aligned cell, a pattern unit evaluates its blocks."""
    kx = 0
    ky = 0
    kz = 0
    for t in range(plan.shape[0]):
        if plan[t, 2] < L:
            if plan[t, 0] == 0:
                kx += 1
            elif plan[t, 0] == 1:
                ky += 1
            else:
                kz += 1
    bb = ip[P_BB]
    n = 0
    uL = _U(L)
    if s <= bb:
        sh = bb - s
        U = 1 << sh
        for k in range(ip[P_NBZ]):
            for j in range(ip[P_NBY]):
                for i in range(ip[P_NBX]):
                    st = _brick_state(ip, fp, i, j, k)
                    if st == 0:
                        continue
                    ax, ay, az = i << sh, j << sh, k << sh
                    ex = min(ax + U, gs[0])
                    ey = min(ay + U, gs[1])
                    ez = min(az + U, gs[2])
                    if st == 1:
                        for cz in range(az >> kz, ((ez - 1) >> kz) + 1):
                            nz = min(ez, (cz + 1) << kz) - max(az, cz << kz)
                            for cy in range(ay >> ky, ((ey - 1) >> ky) + 1):
                                ny = min(ey, (cy + 1) << ky) - max(ay, cy << ky)
                                for cx in range(ax >> kx, ((ex - 1) >> kx) + 1):
                                    nx = min(ex, (cx + 1) << kx) - max(ax, cx << kx)
                                    cell = _morton(plan, cx << kx, cy << ky, cz << kz) >> uL
                                    n = _emit(write, cells, counts, n, cell, nx * ny * nz)
                    else:
                        one = (
                            (ax >> kx) == ((ex - 1) >> kx)
                            and (ay >> ky) == ((ey - 1) >> ky)
                            and (az >> kz) == ((ez - 1) >> kz)
                        )
                        if not write:  # sizing pass: an upper bound is enough (never 0:
                            # a pattern brick's origin block is always present)
                            n += 1 if one else (ex - ax) * (ey - ay) * (ez - az)
                            continue
                        last = _U(0)
                        cnt = 0
                        pl = _plane(ip, i, j, k)
                        for z in range(az, ez):
                            for y in range(ay, ey):
                                for x in range(ax, ex):
                                    if not _present_in_pattern(ip, pl, s, i, j, k, x, y, z):
                                        continue
                                    if one:
                                        cnt += 1
                                        continue
                                    cell = _morton(plan, x, y, z) >> uL
                                    if cnt > 0 and cell == last:
                                        cnt += 1
                                    else:
                                        if cnt > 0:
                                            n = _emit(write, cells, counts, n, last, cnt)
                                        last = cell
                                        cnt = 1
                        if cnt > 0:
                            if one:
                                last = _morton(plan, ax, ay, az) >> uL
                            n = _emit(write, cells, counts, n, last, cnt)
    else:
        last = _U(0)
        cnt = 0
        for z in range(gs[2]):
            for y in range(gs[1]):
                for x in range(gs[0]):
                    if _present(ip, fp, s, x, y, z):
                        cell = _morton(plan, x, y, z) >> uL
                        if cnt > 0 and cell == last:
                            cnt += 1
                        else:
                            if cnt > 0:
                                n = _emit(write, cells, counts, n, last, cnt)
                            last = cell
                            cnt = 1
        if cnt > 0:
            n = _emit(write, cells, counts, n, last, cnt)
    return n


# ---- voxels ---------------------------------------------------------------------------------
HALF_M = 3  # half-resolution margin cells (6 voxels) around a block for the warp
HR = BS // 2 + 2 * HALF_M
FRAG_CAP = BS * BS * BS // 2
SEED_CAP = 4096
TABLE_CAP = 2 + SEED_CAP + FRAG_CAP


@nb.njit(nogil=True, cache=True)
def _gen_block0(ip, fp, bx, by, bz, idx, table):
    """Local label indices (uint32 [z, y, x]) and table of scale-0 block (bx, by, bz).

    table[0] = 0 (background), table[1] = solid supervoxel, then Voronoi seeds, then dense
    fragments. Returns the table length. The caller guarantees the block is present."""
    seed = ip[P_SEED]
    ox, oy, oz = bx * BS, by * BS, bz * BS
    table[0] = _U(0)
    table[1] = _U(0)
    # solid region: 2x2x2 blocks of one supervoxel
    if fp[F_SOLID] > 0.0 and _unit(_h4(seed, 31, bx >> 1, by >> 1, bz >> 1)) < fp[F_SOLID]:
        table[1] = _solid_id(ip, bx >> 1, by >> 1, bz >> 1)
        idx[:, :, :] = 1
        return 2
    S = float(ip[P_LAT])
    nl = (ip[P_NLX], ip[P_NLY], ip[P_NLZ])
    o = (ox, oy, oz)
    cmin = np.empty(3, np.int64)
    cmax = np.empty(3, np.int64)
    for d in range(3):
        cmin[d] = max(0, int(math.floor((o[d] - 2 * HALF_M) / S)) - 1)
        cmax[d] = min(nl[d] - 1, int(math.floor((o[d] + BS + 2 * HALF_M) / S)) + 1)
    n0 = cmax[0] - cmin[0] + 1
    n1 = cmax[1] - cmin[1] + 1
    n2 = cmax[2] - cmin[2] + 1
    nseed = n0 * n1 * n2
    spos = np.empty((nseed, 3), np.float64)
    for a in range(n0):
        for b in range(n1):
            for c in range(n2):
                ci, cj, ck = cmin[0] + a, cmin[1] + b, cmin[2] + c
                t = (a * n1 + b) * n2 + c
                h = _h4(seed, 41, ci, cj, ck)
                spos[t, 0] = (ci + 0.15 + 0.7 * _unit(h)) * S
                spos[t, 1] = (cj + 0.15 + 0.7 * _unit(_mix(h + _U(1)))) * S
                spos[t, 2] = (ck + 0.15 + 0.7 * _unit(_mix(h + _U(2)))) * S
                table[2 + t] = _voronoi_id(ip, ci, cj, ck)
    # nearest seed at half resolution (cell centres), with a margin for the warp; points are
    # visited lattice cell by lattice cell so each cell gathers its <= 27 candidates once
    hr = np.empty((HR, HR, HR), np.uint16)
    ks = np.empty((3, HR), np.int64)
    for d in range(3):
        for m in range(HR):
            pd = o[d] - 2 * HALF_M + 2 * m + 1.0
            ks[d, m] = min(max(int(math.floor(pd / S)), cmin[d]), cmax[d])
    csx = np.empty(27)
    csy = np.empty(27)
    csz = np.empty(27)
    cst = np.empty(27, np.int64)
    ksx = np.empty(27)
    ksy = np.empty(27)
    ksz = np.empty(27)
    kst = np.empty(27, np.int64)
    z0 = 0
    while z0 < HR:
        kz = ks[2, z0]
        z1 = z0
        while z1 < HR and ks[2, z1] == kz:
            z1 += 1
        y0 = 0
        while y0 < HR:
            ky = ks[1, y0]
            y1 = y0
            while y1 < HR and ks[1, y1] == ky:
                y1 += 1
            x0 = 0
            while x0 < HR:
                kx = ks[0, x0]
                x1 = x0
                while x1 < HR and ks[0, x1] == kx:
                    x1 += 1
                nc = 0
                for c in range(max(kz - 1, cmin[2]), min(kz + 1, cmax[2]) + 1):
                    for b in range(max(ky - 1, cmin[1]), min(ky + 1, cmax[1]) + 1):
                        for a in range(max(kx - 1, cmin[0]), min(kx + 1, cmax[0]) + 1):
                            t = ((a - cmin[0]) * n1 + (b - cmin[1])) * n2 + (c - cmin[2])
                            csx[nc] = spos[t, 0]
                            csy[nc] = spos[t, 1]
                            csz[nc] = spos[t, 2]
                            cst[nc] = t
                            nc += 1
                # sub-boxes of 4^3 points: keep only candidates that can be nearest to some
                # point of the box (exact pruning: min distance <= best max distance)
                for bz0 in range(z0, z1, 4):
                    bz1 = min(bz0 + 4, z1)
                    lz = oz - 2 * HALF_M + 2 * bz0 + 1.0
                    hz = oz - 2 * HALF_M + 2 * (bz1 - 1) + 1.0
                    for by0 in range(y0, y1, 4):
                        by1 = min(by0 + 4, y1)
                        ly = oy - 2 * HALF_M + 2 * by0 + 1.0
                        hy = oy - 2 * HALF_M + 2 * (by1 - 1) + 1.0
                        for bx0 in range(x0, x1, 4):
                            bx1 = min(bx0 + 4, x1)
                            lx = ox - 2 * HALF_M + 2 * bx0 + 1.0
                            hx = ox - 2 * HALF_M + 2 * (bx1 - 1) + 1.0
                            ub = 1e300
                            for q in range(nc):
                                ex = max(abs(csx[q] - lx), abs(csx[q] - hx))
                                ey = max(abs(csy[q] - ly), abs(csy[q] - hy))
                                ez = max(abs(csz[q] - lz), abs(csz[q] - hz))
                                dmx = ex * ex + ey * ey + ez * ez
                                if dmx < ub:
                                    ub = dmx
                            nk = 0
                            for q in range(nc):
                                ex = max(0.0, lx - csx[q], csx[q] - hx)
                                ey = max(0.0, ly - csy[q], csy[q] - hy)
                                ez = max(0.0, lz - csz[q], csz[q] - hz)
                                if ex * ex + ey * ey + ez * ez <= ub:
                                    ksx[nk] = csx[q]
                                    ksy[nk] = csy[q]
                                    ksz[nk] = csz[q]
                                    kst[nk] = cst[q]
                                    nk += 1
                            for mz in range(bz0, bz1):
                                pz = oz - 2 * HALF_M + 2 * mz + 1.0
                                for my in range(by0, by1):
                                    py = oy - 2 * HALF_M + 2 * my + 1.0
                                    for mx in range(bx0, bx1):
                                        px = ox - 2 * HALF_M + 2 * mx + 1.0
                                        best = 1e300
                                        bi = 0
                                        for q in range(nk):
                                            dx = ksx[q] - px
                                            dy = ksy[q] - py
                                            dz = ksz[q] - pz
                                            dd = dx * dx + dy * dy + dz * dz
                                            if dd < best:
                                                best = dd
                                                bi = q
                                        hr[mz, my, mx] = kst[bi]
                x0 = x1
            y0 = y1
        z0 = z1
    # smooth separable warp (global coordinates, so continuous across blocks), |w| <= 5.6
    ph = fp[F_PH:]
    wxy = np.empty(BS)
    wxz = np.empty(BS)
    wyx = np.empty(BS)
    wyz = np.empty(BS)
    wzx = np.empty(BS)
    wzy = np.empty(BS)
    for q in range(BS):
        wxy[q] = 2.8 * math.sin((oy + q) / 23.0 + ph[0])
        wxz[q] = 2.8 * math.sin((oz + q) / 31.0 + ph[1])
        wyx[q] = 2.8 * math.sin((ox + q) / 19.0 + ph[2])
        wyz[q] = 2.8 * math.sin((oz + q) / 27.0 + ph[3])
        wzx[q] = 2.8 * math.sin((ox + q) / 29.0 + ph[4])
        wzy[q] = 2.8 * math.sin((oy + q) / 17.0 + ph[5])
    off = 2 * HALF_M - 0.5  # voxel centre -> half-res cell coordinate
    for z in range(BS):
        for y in range(BS):
            for x in range(BS):
                wx = (x + wxy[y] + wxz[z] + off) * 0.5
                wy = (y + wyx[x] + wyz[z] + off) * 0.5
                wz = (z + wzx[x] + wzy[y] + off) * 0.5
                mx = min(max(int(wx + 0.5), 0), HR - 1)
                my = min(max(int(wy + 0.5), 0), HR - 1)
                mz = min(max(int(wz + 0.5), 0), HR - 1)
                idx[z, y, x] = 2 + hr[mz, my, mx]
    ntab = 2 + nseed
    # dense block: most voxels pair up into tiny supervoxels; no tissue edge
    if _is_dense(ip, fp, bx, by, bz):
        ntab = _dense_overlay(ip, fp, bx, by, bz, idx, table, ntab, True)
        return ntab
    # tissue edge: zero a wavy layer on each side whose neighbour block is absent
    lim = np.empty((BS, BS), np.int64)
    for side in range(6):
        d = side >> 1
        sgn = 1 if side & 1 else -1
        nbx_, nby_, nbz_ = bx, by, bz
        if d == 0:
            nbx_ += sgn
        elif d == 1:
            nby_ += sgn
        else:
            nbz_ += sgn
        if _present0(ip, fp, nbx_, nby_, nbz_):
            continue
        h = _h4(seed, 61 + side, bx, by, bz)
        p1 = 6.28 * _unit(h)
        p2 = 6.28 * _unit(_mix(h + _U(1)))
        for v in range(BS):
            sv_ = math.sin(v / 11.0 + p2)
            for u in range(BS):
                lim[v, u] = int(math.ceil(4.0 + 12.0 * (1.0 + math.sin(u / 9.0 + p1) * sv_)))
        for v in range(BS):
            for u in range(BS):
                for t in range(lim[v, u]):
                    depth = t if sgn < 0 else BS - 1 - t
                    if d == 0:
                        idx[v, u, depth] = 0
                    elif d == 1:
                        idx[v, depth, u] = 0
                    else:
                        idx[depth, v, u] = 0
    return ntab


@nb.njit(nogil=True, cache=True)
def _block_kinds(ip, fp, xs, ys, zs, out):
    """0 Voronoi, 1 solid, 2 dense for scale-0 blocks (as `_gen_block0` decides)."""
    seed = ip[P_SEED]
    for i in range(xs.shape[0]):
        bx, by, bz = xs[i], ys[i], zs[i]
        if fp[F_SOLID] > 0.0 and _unit(_h4(seed, 31, bx >> 1, by >> 1, bz >> 1)) < fp[F_SOLID]:
            out[i] = 1
        elif _is_dense(ip, fp, bx, by, bz):
            out[i] = 2
        else:
            out[i] = 0


@nb.njit(nogil=True, cache=True)
def _apply_table(idx, table, out, cnt):
    """out = table[idx], and cnt = voxels per table entry (one pass)."""
    fi = idx.ravel()
    fo = out.ravel()
    cnt[:] = 0
    for i in range(fi.shape[0]):
        t = fi[i]
        fo[i] = table[t]
        cnt[t] += 1


@nb.njit(nogil=True, cache=True)
def _downres_kernel(children, present, out):
    """DVID Downres of 2x2x2 child blocks (children[c] with c = cz*4+cy*2+cx) into out."""
    vals = np.empty(8, np.uint64)
    for z in range(BS):
        cz = z >> 5
        for y in range(BS):
            cy = y >> 5
            for x in range(BS):
                cx = x >> 5
                c = cz * 4 + cy * 2 + cx
                if not present[c]:
                    out[z, y, x] = 0
                    continue
                ch = children[c]
                zz = 2 * (z & 31)
                yy = 2 * (y & 31)
                xx = 2 * (x & 31)
                v0 = ch[zz, yy, xx]
                if (
                    v0 != 0
                    and ch[zz, yy, xx + 1] == v0
                    and ch[zz, yy + 1, xx] == v0
                    and ch[zz, yy + 1, xx + 1] == v0
                    and ch[zz + 1, yy, xx] == v0
                    and ch[zz + 1, yy, xx + 1] == v0
                    and ch[zz + 1, yy + 1, xx] == v0
                    and ch[zz + 1, yy + 1, xx + 1] == v0
                ):
                    out[z, y, x] = v0  # uniform cell (most of them)
                    continue
                n = 0
                for dz in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            v = ch[zz + dz, yy + dy, xx + dx]
                            if v != 0:
                                # insertion sort
                                j = n
                                while j > 0 and vals[j - 1] > v:
                                    vals[j] = vals[j - 1]
                                    j -= 1
                                vals[j] = v
                                n += 1
                if n == 0:
                    out[z, y, x] = 0
                    continue
                best = vals[0]
                bestc = 0
                i = 0
                while i < n:
                    j = i
                    while j < n and vals[j] == vals[i]:
                        j += 1
                    if j - i > bestc:  # strictly more: ties keep the smaller label
                        bestc = j - i
                        best = vals[i]
                    i = j
                out[z, y, x] = best


def downres_dvid(volume: np.ndarray) -> np.ndarray:
    """DVID's 2x downsampling of a (2n, 2n, 2n)-voxel uint64 array [z, y, x]: the mode of the
    non-zero labels of each 2x2x2 cell, ties to the smallest, all-zero cells -> 0.

    A plain-numpy reference (for tests of other modules; the source uses a numba kernel)."""
    v = np.asarray(volume, dtype=np.uint64)
    nz, ny, nx = (s // 2 for s in v.shape)
    cells = v.reshape(nz, 2, ny, 2, nx, 2).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    s = np.sort(cells, axis=1)
    best = np.zeros(len(s), dtype=np.uint64)
    bestc = np.zeros(len(s), dtype=np.int64)
    for i in range(8):  # count of the value at position i among the 8
        c = (s == s[:, i : i + 1]).sum(1)
        better = (s[:, i] != 0) & ((c > bestc) | ((c == bestc) & (s[:, i] < best)))
        best = np.where(better, s[:, i], best)
        bestc = np.where(better, c, bestc)
    return best.reshape(nz, ny, nx)


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
        g = {k: q.str(k) for k in KNOWN_KEYS if k in q}
        size_s = g.get("size", "1024,1024,768")
        try:
            size = tuple(int(t) for t in size_s.split(","))
        except ValueError:
            raise UserError(f"synthetic URL: size={size_s!r} must be X,Y,Z integers") from None
        if len(size) != 3 or any(not (BS <= s <= 1 << 18) for s in size):
            raise UserError(f"synthetic URL: size={size_s} needs 3 values in [64, 262144]")
        self.size: tuple[int, int, int] = size  # type: ignore[assignment]
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
            grid = tuple(-(-g_ // (1 << s)) for g_ in grid0)
            vmax = tuple(-(-sz // (1 << s)) for sz in size)
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

    def count(self, scale: int, level: int, max_pairs: int = 64_000_000):
        """Exact blocks per aligned Morton cell ``code >> level`` (see module docstring)."""
        si = self._scale(scale)
        if level < 0:
            raise UserError(f"count level must be >= 0, got {level}")
        plan = self._plans[scale]
        level = min(int(level), len(plan))  # past the code's bits every block is in cell 0
        gs = np.array(si.grid, np.int64)
        empty = np.zeros(0, np.uint64)
        n = _count_kernel(self._ip, self._fp, scale, plan, gs, level, False, empty, empty)
        if n > max_pairs:
            raise UserError(
                f"count of {self.name} scale {scale} at level {level} would list ~{n:,} cells; "
                "use a coarser level"
            )
        cells = np.empty(n, np.uint64)
        counts = np.empty(n, np.uint64)
        n = _count_kernel(self._ip, self._fp, scale, plan, gs, level, True, cells, counts)
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

    def count_keys(self, kind: str, level: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """Exact: indices count the rows of the (cached) index table per body, the mapping
        its pairs per supervoxel."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, level, lo, hi)
        labels, rows = self._index_labels()
        return count_sorted(labels, rows, level, lo, hi)

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
                            self._bytes.nbytes < self._bytes.max_bytes // 2:
                        # encode the block too while its voxels are at hand: the export's
                        # read_blocks then serves it from the cache instead of regenerating
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
        b = int(np.searchsorted(body, np.uint64(min(hi, 2**64 - 1)), "left"))
        if hi > 2**64 - 1:
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
            i = 0
            while i < len(labels):
                j, nbytes = i, 0
                while j < len(labels) and (j == i or nbytes + len(datas[j]) <= batch_bytes):
                    nbytes += len(datas[j])
                    j += 1
                yield pa.RecordBatch.from_arrays(
                    [pa.array(labels[i:j], pa.uint64()), pa.array(datas[i:j], pa.binary())],
                    schema=INDICES_SCHEMA,
                )
                i = j
            a = e


def open_url(url: str) -> SyntheticSource:
    """Open ``synthetic://NAME?...`` (see module docstring)."""
    return SyntheticSource(url)
