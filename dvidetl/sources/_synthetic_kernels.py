"""The numba kernels that generate ``synthetic://`` volumes: tissue mask, Voronoi
supervoxels, bodies, solid and dense blocks, counts and enumeration by Morton range (see
``dvidetl.sources.synthetic`` for what they build and why)."""

from __future__ import annotations

import math

import numba as nb
import numpy as np

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
