"""Numba kernels: DVID compressed label Blocks → neuroglancer ``compressed_segmentation``
(uint64, 8³ encoding blocks) without materializing voxels.

Why this works: a DVID block is a grid of 8³ sub-blocks in x-fastest order, each with its own
palette and packed local indices in voxel order ``z·64 + y·8 + x``; a cseg chunk is a grid of
8³ blocks in the same orders, each with its own lookup table and packed indices. So per
sub-block only the palette is translated (table index → label → the caller's mapped label,
sorted and deduplicated) and the packed indices are re-packed from DVID's MSB-first stream of
``ceil(log2 Ns)`` bits into cseg's LSB-first little-endian words of 0/1/2/4/8/16 bits.

Full sub-blocks of 2-4 palette entries (1- or 2-bit DVID values; most sub-blocks of every
volume measured) never unpack voxels: which values occur and their re-packing are found 64
bits at a time (``_used_words``, ``_pack2_words``, the 1-bit bit reversal), ~3x faster over
the bench volume than the per-voxel path the others take.

The output is byte for byte what neuroglancer's (and the ``compressed-segmentation``
package's) encoder writes for the same voxels: sorted unique lookup tables, each block's
encoded values followed by its table, a table written once per chunk and shared by every later
block with the same table, padding positions of partial blocks at index 0 (the smallest value
inside the volume). Being deterministic and canonical, an encoded chunk can be verified by
re-encoding and comparing bytes.

Validation reuses the block parser of ``_kernels`` (``scan``; every packed local value is
checked against its palette size while it is read), so a corrupt block becomes an ``info`` row,
never an out-of-bounds read.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from dvidetl.codec._kernels import (
    E_LOCAL,
    E_OK,
    I_A,
    I_B,
    I_C,
    I_ERR,
    I_N,
    I_NSB,
    I_POS,
    I_S,
    INFO_LEN,
    MAX_NS,
    _find_bad_local,
    _le8,
    _popc,
    _row_acc,
    _row_value,
    _u16,
    _u32,
    _width,
    count_into,
    scan,
)

# error codes of this module (the block parser's are 1..12)
E_LABELS = 101  # the labels list does not match the block's table: a = given, b = N
E_SHAPE = 102  # chunk shape outside 1..block size: a, b, c = shape x, y, z
E_NULL = 103  # a null block or labels row (set by the caller)


@nb.njit(cache=True, inline="always")
def cseg_bits(u):
    """Bits per value of a cseg block with u distinct values: 0, 1, 2, 4, 8, 16 or 32."""
    if u <= 1:
        return 0
    if u <= 2:
        return 1
    if u <= 4:
        return 2
    if u <= 16:
        return 4
    if u <= 256:
        return 8
    if u <= 65536:
        return 16
    return 32


@nb.njit(cache=True, inline="always")
def _put_le8(out8, p, v):
    q = np.uint64(p)
    for k in range(8):
        out8[q + np.uint64(k)] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(0xFF))


@nb.njit(cache=True, inline="always")
def _locals_rows(buf, vp, B, loc):
    """Local indices of a full sub-block (64 rows of 8 B-bit MSB-first values; B literal at
    every call site) into loc[0:512]; returns the largest."""
    mx = 0
    for r in range(64):
        rp = vp + r * B
        acc = _row_acc(buf, rp, B)
        for x in range(8):
            v = _row_value(acc, x, B, buf, rp)
            loc[r * 8 + x] = v
            mx = max(mx, v)
    return mx


@nb.njit(cache=True)
def _locals(buf, vp, b, loc):
    # one branch per width: each call passes b as a literal, so the inlined row loop's shifts
    # and masks are constants (the dispatch pattern of _kernels._pack)
    if b == 1:
        return _locals_rows(buf, vp, 1, loc)
    if b == 2:
        return _locals_rows(buf, vp, 2, loc)
    if b == 3:
        return _locals_rows(buf, vp, 3, loc)
    if b == 4:
        return _locals_rows(buf, vp, 4, loc)
    if b == 5:
        return _locals_rows(buf, vp, 5, loc)
    if b == 6:
        return _locals_rows(buf, vp, 6, loc)
    if b == 7:
        return _locals_rows(buf, vp, 7, loc)
    if b == 8:
        return _locals_rows(buf, vp, 8, loc)
    return _locals_rows(buf, vp, 9, loc)


@nb.njit(cache=True, inline="always")
def _pack_le_rows(loc, m, out8, op, B):
    """Write m[loc[k]] for the 512 voxels as B-bit LSB-first values: a row of 8 voxels is B
    whole bytes of the little-endian stream (B literal at every call site)."""
    q0 = np.uint64(op)
    for r in range(64):
        q = q0 + np.uint64(r * B)
        if B <= 8:
            acc = np.uint64(0)
            for x in range(8):
                acc |= np.uint64(m[loc[r * 8 + x]]) << np.uint64(x * B)
            for k in range(B):
                out8[q + np.uint64(k)] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))
        else:
            for x in range(8):
                v = m[loc[r * 8 + x]]
                out8[q + np.uint64(2 * x)] = np.uint8(v & 0xFF)
                out8[q + np.uint64(2 * x + 1)] = np.uint8((v >> 8) & 0xFF)


@nb.njit(cache=True)
def _pack_le(loc, m, out8, op, B):
    if B == 1:
        _pack_le_rows(loc, m, out8, op, 1)
    elif B == 2:
        _pack_le_rows(loc, m, out8, op, 2)
    elif B == 4:
        _pack_le_rows(loc, m, out8, op, 4)
    elif B == 8:
        _pack_le_rows(loc, m, out8, op, 8)
    else:
        _pack_le_rows(loc, m, out8, op, 16)


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)


@nb.njit(cache=True, inline="always")
def _bitrev_bytes(x):
    """Reverse the bit order inside each byte of a uint64 (MSB-first → LSB-first 1-bit values)."""
    one = np.uint64(1)
    two = np.uint64(2)
    four = np.uint64(4)
    x = ((x >> one) & _M1) | ((x & _M1) << one)
    x = ((x >> two) & _M2) | ((x & _M2) << two)
    return ((x >> four) & _M4) | ((x & _M4) << four)


@nb.njit(cache=True, inline="always")
def _insertion_sort(vals, idx, n):
    for a in range(1, n):
        v = vals[a]
        j = idx[a]
        t = a - 1
        while t >= 0 and vals[t] > v:
            vals[t + 1] = vals[t]
            idx[t + 1] = idx[t]
            t -= 1
        vals[t + 1] = v
        idx[t + 1] = j


@nb.njit(cache=True)
def _sort_pairs(vals, idx, n, tv, ti, cnt):
    """Sort vals[0:n] ascending, carrying idx along, without allocating (tv, ti: n-long
    scratch, cnt: 256). Small palettes (the common case) by insertion; large ones by an LSD
    radix sort over the bytes that differ between the values: comparison sorts mispredict
    on every other step over random labels and cost 25 us per dense sub-block, more than
    all the rest of the transcoding together."""
    if n <= 24:
        _insertion_sort(vals, idx, n)
        return
    vor = np.uint64(0)
    vand = ~np.uint64(0)
    for k in range(n):
        vor |= vals[k]
        vand &= vals[k]
    diff = vor ^ vand
    src_v, src_i, dst_v, dst_i = vals, idx, tv, ti
    swapped = False
    for d in range(8):
        sh = np.uint64(8 * d)
        if (diff >> sh) & np.uint64(0xFF) == 0:
            continue  # every value has the same byte here
        for k in range(256):
            cnt[k] = 0
        for k in range(n):
            cnt[np.int64((src_v[k] >> sh) & np.uint64(0xFF))] += 1
        tot = 0
        for k in range(256):
            c = cnt[k]
            cnt[k] = tot
            tot += c
        for k in range(n):
            dg = np.int64((src_v[k] >> sh) & np.uint64(0xFF))
            p = cnt[dg]
            cnt[dg] = p + 1
            dst_v[p] = src_v[k]
            dst_i[p] = src_i[k]
        src_v, src_i, dst_v, dst_i = dst_v, dst_i, src_v, src_i
        swapped = not swapped
    if swapped:
        for k in range(n):
            vals[k] = tv[k]
            idx[k] = ti[k]


@nb.njit(cache=True, inline="always")
def _rev2_bytes(x):
    """Reverse the order of the four 2-bit values inside each byte of a uint64 (MSB-first →
    LSB-first 2-bit values)."""
    two = np.uint64(2)
    four = np.uint64(4)
    x = ((x >> two) & _M2) | ((x & _M2) << two)
    return ((x >> four) & _M4) | ((x & _M4) << four)


@nb.njit(cache=True, inline="always")
def _even_bits(x):
    """The 32 bits at even positions of x, packed into its low 32 bits (bit 2k → bit k)."""
    x &= _M1
    x = (x | (x >> np.uint64(1))) & _M2
    x = (x | (x >> np.uint64(2))) & _M4
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)


@nb.njit(cache=True, inline="always")
def _used_words(buf, vp, c, used):
    """Which local values a FULL sub-block of c = 2..4 palette entries (1- or 2-bit values)
    uses, into used[0:c], from its 64-bit words without unpacking voxels: the commonest
    sub-blocks (Ns 2-4 are most of every volume measured) cost 8-16 word operations instead
    of 512 per-voxel reads and writes. False when a 2-bit value >= c (3) occurs."""
    if c == 2:
        o = np.uint64(0)
        a = ~np.uint64(0)
        for w in range(8):
            x = _le8(buf, vp + 8 * w)
            o |= x
            a &= x
        used[0] = a != ~np.uint64(0)
        used[1] = o != 0
        return True
    a0 = np.uint64(0)
    a1 = np.uint64(0)
    a2 = np.uint64(0)
    a3 = np.uint64(0)
    for w in range(16):
        x = _le8(buf, vp + 8 * w)
        lo = x & _M1
        h = (x >> np.uint64(1)) & _M1
        a0 |= ~(h | lo) & _M1
        a1 |= lo & ~h
        a2 |= h & ~lo
        a3 |= h & lo
    used[0] = a0 != 0
    used[1] = a1 != 0
    used[2] = a2 != 0
    if c == 3:
        return a3 == 0
    used[3] = a3 != 0
    return True


@nb.njit(cache=True, inline="always")
def _pack2_words(buf, vp, m, used, c, out8, op, B):
    """A FULL sub-block of 2-bit DVID values (c = 3 or 4) as B-bit (1 or 2) cseg values
    m[local], word by word: each byte's four values reversed to LSB-first, then mapped by
    lane masks (a lane's value v → m[v]; the product of a one-bit lane mask and m[v] < 4
    stays inside the lane); for B = 1 the even bits are compacted, two words into one."""
    z = np.uint64(0)
    m0 = np.uint64(m[0]) if used[0] else z
    m1 = np.uint64(m[1]) if used[1] else z
    m2 = np.uint64(m[2]) if used[2] else z
    m3 = np.uint64(m[3]) if c == 4 and used[3] else z
    acc = z
    for w in range(16):
        y = _rev2_bytes(_le8(buf, vp + 8 * w))
        lo = y & _M1
        h = (y >> np.uint64(1)) & _M1
        v = (~(h | lo) & _M1) * m0 + (lo & ~h) * m1 + (h & ~lo) * m2 + (h & lo) * m3
        if B == 2:
            _put_le8(out8, op + 8 * w, v)
        elif w & 1 == 0:
            acc = _even_bits(v)
        else:
            _put_le8(out8, op + 8 * (w >> 1), acc | (_even_bits(v) << np.uint64(32)))


_GOLD = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(cache=True, inline="always")
def _table_hash(tab, u):
    h = np.uint64(u) * _GOLD
    for k in range(u):
        h = (h ^ tab[k]) * _GOLD
        h ^= h >> np.uint64(29)
    return h


@nb.njit(cache=True, nogil=True)
def bound_words(buf, s, info, cx, cy, cz):
    """An upper bound of the encoded size in uint32 words of the (scanned, valid) block
    buf[s:...] clipped to cx × cy × cz voxels: one header word, 2 header words per block, and
    per block its values and table as if no value were deduplicated and no table shared."""
    N = info[I_N]
    gx = _u32(buf, s)
    gy = _u32(buf, s + 4)
    bgx = (cx + 7) // 8
    bgy = (cy + 7) // 8
    bgz = (cz + 7) // 8
    words = 1 + 2 * bgx * bgy * bgz
    if N == 1:
        return words + 2
    ns_p = s + 16 + 8 * N
    for bz in range(bgz):
        for by in range(bgy):
            for bx in range(bgx):
                c = _u16(buf, ns_p + 2 * ((bz * gy + by) * gx + bx))
                if c < 1:
                    c = 1
                words += 2 * c + 16 * cseg_bits(c)
    return words


@nb.njit(cache=True, nogil=True)
def encode_chunk(buf, s, e, info, L, cx, cy, cz, outw, o, sc):
    """Encode the (scanned, valid) block ``buf[s:e]`` clipped to cx × cy × cz voxels as a
    single-channel cseg chunk at word ``o`` of ``outw`` (uint32; sized by ``bound_words``).
    ``L`` is the block's table mapped to output labels (``L[k]`` = label of table entry k).
    ``sc`` is the caller's ``Scratch``. Returns (words written, background): background is
    True when every in-volume voxel is label 0. On a corrupt packed value fills ``info`` and
    returns (-1, False)."""
    N = info[I_N]
    nsb = info[I_NSB]
    gx = _u32(buf, s)
    gy = _u32(buf, s + 4)
    out8 = outw.view(np.uint8)
    (pal_off, val_off, loc, pr, m, used, tab, ck_hash, ck_gen, ck_start, ck_len, ck_off,
     store, tv, ti, cnt, uv, ui, rk, bits, pos) = sc
    # prefix sums: where each sub-block's palette entries and packed values start
    ns_p = s + 16 + 8 * N
    pal_p = ns_p + 2 * nsb
    if N > 1:
        S = 0
        vb = 0
        for i in range(nsb):
            c = _u16(buf, ns_p + 2 * i)
            pal_off[i] = S
            val_off[i] = vb
            S += c
            vb += 64 * _width(c)
        val_p = pal_p + 4 * S
        # rank every table entry among the block's distinct mapped labels, once: a
        # sub-block's sorted, deduplicated table is then the ranks of its palette, read
        # in order from a bitset (no per-sub-block sort)
        for k in range(N):
            uv[k] = L[k]
            ui[k] = k
        _sort_pairs(uv, ui, N, tv, ti, cnt)
        nu = 0
        for t in range(N):
            if t == 0 or uv[t] != uv[nu - 1]:
                uv[nu] = uv[t]  # uv[0:nu] = the distinct labels, ascending
                nu += 1
            rk[ui[t]] = nu - 1
    else:
        val_p = 0
    bgx = (cx + 7) // 8
    bgy = (cy + 7) // 8
    bgz = (cz + 7) // 8
    nb_ = bgx * bgy * bgz
    outw[o] = 1  # the single channel starts right after this one-word offset table
    base = o + 1
    d = 2 * nb_  # next free word, relative to the channel start
    cmask = ck_hash.shape[0] - 1
    ck_gen[cmask + 1] += 1  # the last slot holds this chunk's generation stamp
    gen = ck_gen[cmask + 1]
    nstore = 0
    background = True
    k = -1
    for bz in range(bgz):
        az = min(8, cz - 8 * bz)
        for by in range(bgy):
            ay = min(8, cy - 8 * by)
            for bx in range(bgx):
                ax = min(8, cx - 8 * bx)
                k += 1
                i = (bz * gy + by) * gx + bx
                full = az == 8 and ay == 8 and ax == 8
                if N == 1:
                    c = 1
                else:
                    c = _u16(buf, ns_p + 2 * i)
                # -- the sub-block's palette, mapped; n entries sorted with their local index
                if c < 2:
                    if c == 0:
                        tab[0] = np.uint64(0)  # Ns == 0: the sub-block is label 0
                    elif N == 1:
                        tab[0] = L[0]
                    else:
                        tab[0] = L[_u32(buf, pal_p + 4 * pal_off[i])]
                    u = 1
                    B = 0
                else:
                    b = _width(c)
                    vp = val_p + val_off[i]
                    pp = pal_p + 4 * pal_off[i]
                    words = full and c <= 4  # 1- or 2-bit values: word-wise, no voxels
                    if words:
                        if not _used_words(buf, vp, c, used):
                            _find_bad_local(buf, vp, e, b, c, i, s, info)
                            return -1, False
                    else:
                        mx = _locals(buf, vp, b, loc)
                        if mx >= c:
                            _find_bad_local(buf, vp, e, b, c, i, s, info)
                            return -1, False
                    # only values that occur (inside the volume) enter the table: palettes
                    # may list entries no voxel uses, and voxels past the shape do not count
                    if not words:
                        for j in range(c):
                            used[j] = False
                        if full:
                            for t in range(512):
                                used[loc[t]] = True
                        else:
                            for z in range(az):
                                for y in range(ay):
                                    for x in range(ax):
                                        used[loc[z * 64 + y * 8 + x]] = True
                    wlo = nsb + N
                    whi = -1
                    for j in range(c):
                        if used[j]:
                            r = rk[_u32(buf, pp + 4 * j)]
                            pr[j] = r
                            w = r >> 6
                            bits[w] |= np.uint64(1) << np.uint64(r & 63)
                            wlo = min(wlo, w)
                            whi = max(whi, w)
                    u = 0
                    for w in range(wlo, whi + 1):
                        x = bits[w]
                        if x == 0:
                            continue
                        bits[w] = 0
                        while x != 0:
                            r = w * 64 + np.int64(_popc((x & (~x + np.uint64(1))) - np.uint64(1)))
                            pos[r] = u
                            tab[u] = uv[r]
                            u += 1
                            x &= x - np.uint64(1)
                    for j in range(c):
                        if used[j]:
                            m[j] = pos[pr[j]]
                    B = cseg_bits(u)
                    if B > 0 and not full:
                        m[c] = 0  # padding: index 0, the smallest value in the volume
                        for z in range(8):
                            for y in range(8):
                                for x in range(8):
                                    if z >= az or y >= ay or x >= ax:
                                        loc[z * 64 + y * 8 + x] = c
                if background and (u != 1 or tab[0] != 0):
                    background = False
                # -- encoded values
                voff = d
                if B > 0:
                    op = 4 * (base + d)
                    if B == 1 and full and c == 2:  # 1 bit in, 1 bit out: reverse each byte
                        flip = np.uint64(0xFFFFFFFFFFFFFFFF) if m[0] == 1 else np.uint64(0)
                        vp = val_p + val_off[i]
                        for w in range(8):
                            _put_le8(out8, op + 8 * w, _bitrev_bytes(_le8(buf, vp + 8 * w)) ^ flip)
                    elif full and c <= 4:  # 2 bits in (c = 3, 4; c = 2 never gets here), 1-2 out
                        _pack2_words(buf, val_p + val_off[i], m, used, c, out8, op, B)
                    else:
                        _pack_le(loc, m, out8, op, B)
                    d += 16 * B
                # -- the table: shared with an earlier block of this chunk if equal
                h = _table_hash(tab, u)
                slot = np.int64(h & np.uint64(cmask))
                toff = -1
                while ck_gen[slot] == gen:
                    if ck_hash[slot] == h and ck_len[slot] == u:
                        st = ck_start[slot]
                        same = True
                        for t in range(u):
                            if store[st + t] != tab[t]:
                                same = False
                                break
                        if same:
                            toff = ck_off[slot]
                            break
                    slot = (slot + 1) & cmask
                if toff < 0:
                    toff = d
                    for t in range(u):
                        v = tab[t]
                        outw[base + d] = np.uint32(v & np.uint64(0xFFFFFFFF))
                        outw[base + d + 1] = np.uint32(v >> np.uint64(32))
                        d += 2
                        store[nstore + t] = v
                    ck_gen[slot] = gen
                    ck_hash[slot] = h
                    ck_len[slot] = u
                    ck_start[slot] = nstore
                    ck_off[slot] = toff
                    nstore += u
                outw[base + 2 * k] = np.uint32(toff | (B << 24))
                outw[base + 2 * k + 1] = np.uint32(voff)
    return 1 + d, background


@nb.njit(cache=True)
def make_scratch(max_nsb, max_store, max_n):
    """Per-call working arrays of ``encode_chunk`` (sized for the largest block of a batch)."""
    nt = max(max_n, MAX_NS)
    cap = 1024
    while cap < 2 * max_nsb:
        cap *= 2
    ck_gen = np.zeros(cap + 1, np.int64)
    return (
        np.empty(max_nsb, np.int64),  # pal_off
        np.empty(max_nsb, np.int64),  # val_off
        np.empty(512, np.int64),  # loc
        np.empty(MAX_NS, np.int64),  # pr: rank of each palette entry
        np.empty(MAX_NS + 1, np.int64),  # m (+ the padding slot)
        np.empty(MAX_NS, np.bool_),  # used
        np.empty(MAX_NS, np.uint64),  # tab
        np.empty(cap, np.uint64),  # ck_hash
        ck_gen,  # ck_gen (+ the generation counter)
        np.empty(cap, np.int64),  # ck_start
        np.empty(cap, np.int64),  # ck_len
        np.empty(cap, np.int64),  # ck_off
        np.empty(max_store, np.uint64),  # store: tables written in this chunk
        np.empty(nt, np.uint64),  # tv: radix sort scratch
        np.empty(nt, np.int64),  # ti
        np.empty(256, np.int64),  # cnt
        np.empty(max_n, np.uint64),  # uv: the block's distinct mapped labels, ascending
        np.empty(max_n, np.int64),  # ui
        np.empty(max_n, np.int64),  # rk: rank of each table entry in uv
        np.zeros(max_n // 64 + 1, np.uint64),  # bits: a sub-block's ranks (left all 0)
        np.empty(max_n, np.int64),  # pos: rank -> index in the sub-block's table
    )


@nb.njit(cache=True, nogil=True)
def encode_many(buf, offs, ok, lab_vals, lab_offs, use_labels, shapes):
    """Encode every row r with ok[r]: the block ``buf[offs[r]:offs[r+1]]`` clipped to
    ``shapes[r]`` (x, y, z voxels), its table mapped through
    ``lab_vals[lab_offs[r]:lab_offs[r+1]]`` when ``use_labels``.

    Returns (info (R, 8), words uint32, word_offs (R+1), background bool (R)): row r's chunk
    is ``words[word_offs[r]:word_offs[r+1]]``; failed rows are empty with info[r, 0] != 0."""
    R = offs.shape[0] - 1
    info = np.zeros((R, INFO_LEN), np.int64)
    bound = np.zeros(R, np.int64)
    max_nsb = 1
    max_store = 1
    max_n = 1
    counts = np.zeros(1, np.int64)  # count_into's tallies: only its validation is used
    for r in range(R):
        if not ok[r]:
            continue
        row = info[r]
        s = offs[r]
        if scan(buf, s, offs[r + 1], row) != E_OK:
            continue
        N = row[I_N]
        if use_labels and lab_offs[r + 1] - lab_offs[r] != N:
            row[I_ERR] = E_LABELS
            row[I_A] = lab_offs[r + 1] - lab_offs[r]
            row[I_B] = N
            continue
        cx = shapes[r, 0]
        cy = shapes[r, 1]
        cz = shapes[r, 2]
        if (
            cx < 1 or cy < 1 or cz < 1
            or cx > 8 * _u32(buf, s) or cy > 8 * _u32(buf, s + 4) or cz > 8 * _u32(buf, s + 8)
        ):
            row[I_ERR] = E_SHAPE
            row[I_A] = cx
            row[I_B] = cy
            row[I_C] = cz
            continue
        if cx < 8 * _u32(buf, s) or cy < 8 * _u32(buf, s + 4) or cz < 8 * _u32(buf, s + 8):
            # a clipped chunk visits only its sub-blocks; the block is still validated whole
            # (the export's other sinks reject it otherwise), with the codec's own reason
            if counts.shape[0] < N:
                counts = np.zeros(2 * N, np.int64)
            if count_into(buf, s, offs[r + 1], row, counts, 0) != E_OK:
                continue
        bound[r] = bound_words(buf, s, row, cx, cy, cz)
        nsb = row[I_NSB]
        max_nsb = max(max_nsb, nsb)
        max_store = max(max_store, row[I_S] + nsb)  # palette entries, + one per Ns < 2
        max_n = max(max_n, N)
    total = 0
    for r in range(R):
        total += bound[r]
    words = np.empty(total, np.uint32)
    word_offs = np.zeros(R + 1, np.int64)
    background = np.zeros(R, np.bool_)
    sc = make_scratch(max_nsb, max_store, max_n)
    Lbuf = np.empty(max_n, np.uint64)
    o = 0
    for r in range(R):
        word_offs[r] = o
        if bound[r] == 0:
            continue
        s = offs[r]
        row = info[r]
        N = row[I_N]
        if use_labels:  # copied: one array type whatever the caller's buffers are
            l0 = lab_offs[r]
            for k in range(N):
                Lbuf[k] = lab_vals[l0 + k]
        else:
            for k in range(N):
                Lbuf[k] = _le8(buf, s + 16 + 8 * k)
        n, bg = encode_chunk(
            buf, s, offs[r + 1], row, Lbuf, shapes[r, 0], shapes[r, 1], shapes[r, 2], words, o, sc
        )
        if n < 0:
            continue
        background[r] = bg
        o += n
    word_offs[R] = o
    return info, words[:o], word_offs, background


# -------------------------------------------------------------------------------- decoding ---
# the reader's side, for ``verify`` (a stored chunk decoded by code that shares nothing with
# the encoder above but the format): every offset is checked against the chunk's length, so a
# damaged chunk is an error code, never an out-of-bounds read
D_OK = 0
D_SHORT = 1  # the chunk ends before its channel offset or a block header: a = words
D_HEADER = 2  # a block header points outside the chunk: a = block, b = word offset
D_BITS = 3  # a block's bit width is not 0/1/2/4/8/16/32: a = block, b = bits
D_INDEX = 4  # an encoded value indexes past its lookup table: a = block, b = value


@nb.njit(cache=True, nogil=True)
def decode_chunk_into(words, cx, cy, cz, out, err):
    """Decode a one-channel uint64 cseg chunk of shape (cx, cy, cz) (8³ encoding blocks) into
    ``out[z, y, x]``; returns 0 or an error code (details in ``err[0:2]``)."""
    n = words.shape[0]
    if n < 1:
        err[0] = n
        return D_SHORT
    base = np.int64(words[0])
    gx = (cx + 7) // 8
    gy = (cy + 7) // 8
    gz = (cz + 7) // 8
    nb_ = gx * gy * gz
    if base < 1 or base + 2 * nb_ > n:
        err[0] = n
        return D_SHORT
    for bz in range(gz):
        for by in range(gy):
            for bx in range(gx):
                b = bx + gx * (by + gy * bz)
                h0 = np.int64(words[base + 2 * b])
                h1 = np.int64(words[base + 2 * b + 1])
                toff = base + (h0 & 0xFFFFFF)
                bits = h0 >> 24
                voff = base + h1
                if bits != 0 and bits != 1 and bits != 2 and bits != 4 and bits != 8 and bits != 16 and bits != 32:
                    err[0] = b
                    err[1] = bits
                    return D_BITS
                nvw = (512 * bits + 31) // 32
                if voff < base or voff + nvw > n or toff < base or toff + 2 > n:
                    err[0] = b
                    err[1] = h1
                    return D_HEADER
                ntab = (n - toff) // 2
                for z in range(8):
                    zz = bz * 8 + z
                    if zz >= cz:
                        break
                    for y in range(8):
                        yy = by * 8 + y
                        if yy >= cy:
                            break
                        for x in range(8):
                            xx = bx * 8 + x
                            if xx >= cx:
                                break
                            if bits == 0:
                                v = np.int64(0)
                            else:
                                i = (z * 64 + y * 8 + x) * bits
                                v = np.int64((words[voff + (i >> 5)] >> np.uint32(i & 31)) & np.uint32((1 << bits) - 1)) if bits < 32 else np.int64(words[voff + (i >> 5)])
                            if v >= ntab:
                                err[0] = b
                                err[1] = v
                                return D_INDEX
                            lo = np.uint64(words[toff + 2 * v])
                            hi = np.uint64(words[toff + 2 * v + 1])
                            out[zz, yy, xx] = lo | (hi << np.uint64(32))
    return D_OK


__all__ = [
    "E_LABELS",
    "E_LOCAL",
    "E_NULL",
    "E_SHAPE",
    "D_OK",
    "decode_chunk_into",
    "I_POS",
    "bound_words",
    "cseg_bits",
    "encode_chunk",
    "encode_many",
    "make_scratch",
]
