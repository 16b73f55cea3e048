"""Numba kernels for the DVID compressed label Block (the layout of DVID's
datatype/common/labels/compressed.go).

All kernels work on a flat ``uint8`` buffer with explicit ``[s, e)`` bounds so the same code
serves one block (``decode_block``) and a whole concatenated Arrow buffer (``repack``).
Every read is preceded by a length check: numba does not bounds-check array indexing, so a
malformed block must be rejected by ``scan`` before any kernel trusts its section sizes, and
the value kernels re-check every local index against its palette size.

Top-level kernels release the GIL (``nogil``) so threaded workers decode in parallel.
Results and errors travel through an ``info`` row (int64[8]) instead of exceptions (numba
cannot build rich messages); ``describe`` in ``block.py`` turns it into a sentence.
"""

from __future__ import annotations

import sys

import numba as nb
import numpy as np
from llvmlite import ir as llir
from numba.core import cgutils
from numba.core import types as nbt
from numba.extending import intrinsic

# info row layout
I_ERR, I_POS, I_A, I_B, I_N, I_NSB, I_S, I_C = range(8)
INFO_LEN = 8

E_OK = 0
E_HDR = 1  # a = length
E_GRID = 2  # a, b, c = gx, gy, gz
E_N0 = 3
E_TABLE = 4  # a = need, b = have
E_SOLID = 5  # a = length
E_NS_TRUNC = 6  # a = need, b = have
E_NS_BIG = 7  # a = sub-block, b = Ns
E_PAL_TRUNC = 8  # a = need, b = have
E_PAL_IDX = 9  # a = index, b = sub-block
E_VAL_TRUNC = 10  # a = need, b = have
E_TRAIL = 11  # a = need, b = have
E_LOCAL = 12  # a = local value, b = sub-block, c = Ns

MAX_GRID = 128  # Go's UnmarshalBinary limit: gx, gy, gz <= 128
MAX_NS = 512  # an 8x8x8 sub-block has at most 512 distinct values


# Loaders with unsigned indices. numba fixes up every signed index (``if i < 0: i += n``),
# which keeps LLVM from fusing a run of byte loads into one load; an unsigned index has no
# fix-up (and is still bounds-checked under NUMBA_BOUNDSCHECK). Callers guarantee p >= 0.


@nb.njit(cache=True, inline="always")
def _u16(buf, p):
    q = np.uint64(p)
    return np.int64(buf[q]) | (np.int64(buf[q + np.uint64(1)]) << 8)


@nb.njit(cache=True, inline="always")
def _u32(buf, p):
    q = np.uint64(p)
    return (
        np.int64(buf[q])
        | (np.int64(buf[q + np.uint64(1)]) << 8)
        | (np.int64(buf[q + np.uint64(2)]) << 16)
        | (np.int64(buf[q + np.uint64(3)]) << 24)
    )


@intrinsic
def _load_u64(typingctx, buf, p):
    """One unaligned 8-byte load of buf[p:p+8] in host byte order (no bounds check)."""
    if not isinstance(buf, nbt.Array) or buf.dtype != nbt.uint8 or not isinstance(p, nbt.Integer):
        return None
    sig = nbt.uint64(buf, p)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], nbt.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), llir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return sig, codegen


@nb.njit(cache=True, inline="always")
def _le8_bytes(buf, p):
    q = np.uint64(p)
    v = np.uint64(0)
    for k in range(7, -1, -1):
        v = (v << np.uint64(8)) | np.uint64(buf[q + np.uint64(k)])
    return v


# _le8: little-endian uint64 of buf[p:p+8] (caller guarantees 0 <= p, p + 8 <= end). One
# 8-byte load on little-endian hosts. The byte loop it replaces let LLVM's loop vectorizer
# turn the POPCNT loops into byte gathers (vpinsrb/insertq) behind a runtime alias check, so
# the speed of the same cached kernel depended on where the heap put the arrays (4x apart,
# bench_numba_cache). The byte loop stays under NUMBA_BOUNDSCHECK (the fuzz relies on it to
# catch out-of-bounds reads) and on big-endian hosts.
_le8 = _load_u64 if sys.byteorder == "little" and not nb.config.BOUNDSCHECK else _le8_bytes  # type: ignore[attr-defined]  # numba.config sets its options at import


@nb.njit(cache=True, inline="always")
def _lbe8(buf, p):
    """Big-endian uint64 of buf[p:p+8] (caller guarantees 0 <= p, p + 8 <= end)."""
    q = np.uint64(p)
    v = np.uint64(0)
    for k in range(8):
        v = (v << np.uint64(8)) | np.uint64(buf[q + np.uint64(k)])
    return v


@nb.njit(cache=True, inline="always")
def _width(c):
    """Bits per local value of a sub-block with c palette entries (0 for c < 2; c <= 512 =
    MAX_NS, which every caller guarantees): ceil(log2(c)), branch-free."""
    return (
        np.int64(c > 1) + np.int64(c > 2) + np.int64(c > 4) + np.int64(c > 8) + np.int64(c > 16)
        + np.int64(c > 32) + np.int64(c > 64) + np.int64(c > 128) + np.int64(c > 256)
    )


@nb.njit(cache=True, nogil=True)
def scan(buf, s, e, info):
    """Validate the structure of the block ``buf[s:e]`` (header, section lengths, Ns <= 512,
    palette indices < N, exact total length). Fills ``info``; returns the error code.

    Does not look at the packed values (``count_into``/``decode_into`` check those)."""
    for k in range(INFO_LEN):
        info[k] = 0
    n = e - s
    if n < 16:
        info[I_ERR] = E_HDR
        info[I_POS] = n
        info[I_A] = n
        return E_HDR
    gx = _u32(buf, s)
    gy = _u32(buf, s + 4)
    gz = _u32(buf, s + 8)
    N = _u32(buf, s + 12)
    if gx < 1 or gy < 1 or gz < 1 or gx > MAX_GRID or gy > MAX_GRID or gz > MAX_GRID:
        info[I_ERR] = E_GRID
        info[I_A] = gx
        info[I_B] = gy
        info[I_C] = gz
        return E_GRID
    info[I_N] = N
    nsb = gx * gy * gz
    info[I_NSB] = nsb
    if N == 0:
        info[I_ERR] = E_N0
        info[I_POS] = 12
        return E_N0
    tab_end = 16 + 8 * N
    if tab_end > n:
        info[I_ERR] = E_TABLE
        info[I_POS] = n
        info[I_A] = tab_end
        info[I_B] = n
        return E_TABLE
    if N == 1:
        if n != 24:
            info[I_ERR] = E_SOLID
            info[I_POS] = 24
            info[I_A] = n
            return E_SOLID
        return E_OK
    ns_end = tab_end + 2 * nsb
    if ns_end > n:
        info[I_ERR] = E_NS_TRUNC
        info[I_POS] = n
        info[I_A] = ns_end
        info[I_B] = n
        return E_NS_TRUNC
    S = 0
    wsum = 0
    cmax = 0
    for i in range(nsb):  # branch-free: vectorizes
        c = _u16(buf, s + tab_end + 2 * i)
        cmax = max(cmax, c)
        S += c
        wsum += _width(c)
    if cmax > MAX_NS:  # rare: locate the first oversized sub-block
        for i in range(nsb):
            c = _u16(buf, s + tab_end + 2 * i)
            if c > MAX_NS:
                info[I_ERR] = E_NS_BIG
                info[I_POS] = tab_end + 2 * i
                info[I_A] = i
                info[I_B] = c
                return E_NS_BIG
    vbytes = 64 * wsum
    info[I_S] = S
    pal_end = ns_end + 4 * S
    if pal_end > n:
        info[I_ERR] = E_PAL_TRUNC
        info[I_POS] = n
        info[I_A] = pal_end
        info[I_B] = n
        return E_PAL_TRUNC
    mx = 0
    for j in range(S):
        mx = max(mx, _u32(buf, s + ns_end + 4 * j))
    if mx >= N:  # rare: locate the first bad entry and its sub-block
        p = s + ns_end
        for i in range(nsb):
            c = _u16(buf, s + tab_end + 2 * i)
            for _j in range(c):
                idx = _u32(buf, p)
                if idx >= N:
                    info[I_ERR] = E_PAL_IDX
                    info[I_POS] = p - s
                    info[I_A] = idx
                    info[I_B] = i
                    return E_PAL_IDX
                p += 4
    total = pal_end + vbytes
    if total > n:
        info[I_ERR] = E_VAL_TRUNC
        info[I_POS] = n
        info[I_A] = total
        info[I_B] = n
        return E_VAL_TRUNC
    if total < n:
        info[I_ERR] = E_TRAIL
        info[I_POS] = total
        info[I_A] = total
        info[I_B] = n
        return E_TRAIL
    return E_OK


@intrinsic
def _popc(typingctx, x):
    """llvm.ctpop on a uint64 (one POPCNT instruction)."""
    if not isinstance(x, nbt.Integer):
        return None
    sig = nbt.uint64(nbt.uint64)

    def codegen(context, builder, signature, args):
        fnty = llir.FunctionType(llir.IntType(64), [llir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return sig, codegen


@nb.njit(cache=True, inline="always")
def _be8(buf, p, e):
    """Big-endian uint64 of buf[p:p+8]; bytes at or past e read as 0 (never out of bounds)."""
    if p + 8 <= e:
        return (
            (np.uint64(buf[p]) << np.uint64(56))
            | (np.uint64(buf[p + 1]) << np.uint64(48))
            | (np.uint64(buf[p + 2]) << np.uint64(40))
            | (np.uint64(buf[p + 3]) << np.uint64(32))
            | (np.uint64(buf[p + 4]) << np.uint64(24))
            | (np.uint64(buf[p + 5]) << np.uint64(16))
            | (np.uint64(buf[p + 6]) << np.uint64(8))
            | np.uint64(buf[p + 7])
        )
    v = np.uint64(0)
    for k in range(8):
        v <<= np.uint64(8)
        if p + k < e:
            v |= np.uint64(buf[p + k])
    return v


@nb.njit(cache=True, inline="always")
def _row_acc(buf, rp, B):
    """The first min(B, 8) bytes of a row of 8 B-bit values, big-endian, left-aligned in a
    uint64. Reads only the row's own bytes (always inside a validated block); B is a literal
    at each call site so the loop unrolls."""
    nbytes = B if B < 8 else 8
    acc = np.uint64(0)
    r = np.uint64(rp)  # unsigned: the byte loads fuse (see _u16)
    for q in range(nbytes):
        acc = (acc << np.uint64(8)) | np.uint64(buf[r + np.uint64(q)])
    if nbytes < 8:
        acc <<= np.uint64(8 * (8 - nbytes))
    return acc


@nb.njit(cache=True, inline="always")
def _row_value(acc, x, b, buf, rp):
    """Value x (0..7) of a row of 8 b-bit values whose first 8 bytes are ``acc`` (big-endian);
    for b == 9 the 9th byte is buf[rp + 8] (inside the row, so in bounds)."""
    if b <= 8:
        return np.int64((acc >> np.uint64(64 - (x + 1) * b)) & np.uint64((1 << b) - 1))
    if x < 7:
        return np.int64((acc >> np.uint64(64 - (x + 1) * 9)) & np.uint64(511))
    return (np.int64(acc & np.uint64(1)) << 8) | np.int64(buf[np.uint64(rp + 8)])


@nb.njit(cache=True, inline="always")
def _hist_rows(buf, vp, e, B, hist):
    """Tally 64 rows of 8 B-bit values; B is a literal at every call site so after inlining
    the shifts and masks are constants."""
    n = 1 << B
    for j in range(n, 2 * n):  # a second tally for odd x: fewer store-to-load stalls
        hist[j] = 0
    for r in range(64):
        rp = vp + r * B
        acc = _row_acc(buf, rp, B)
        for x in range(0, 8, 2):
            hist[_row_value(acc, x, B, buf, rp)] += 1
            hist[n + _row_value(acc, x + 1, B, buf, rp)] += 1
    for j in range(n):
        hist[j] += hist[n + j]


def _first_bit_mask(w: int, b: int) -> np.uint64:
    """Bits of word w (big-endian, MSB = stream bit 64 w) at stream positions t = 0 mod b."""
    m = 0
    for i in range(64):
        if (64 * w + i) % b == 0:
            m |= 1 << (63 - i)
    return np.uint64(m)


_M3A = _first_bit_mask(0, 3)
_M3B = _first_bit_mask(1, 3)
_M3C = _first_bit_mask(2, 3)


@nb.njit(cache=True, inline="always")
def _slice3(x, x1, x2, m):
    """Popcounts (h, m, l, hm, hl, ml, hml) of the bit planes of the 3-bit values whose first
    bit is at a set bit of mask m; x, x1, x2 = the stream word, shifted left by 0, 1, 2 bits."""
    h = x & m
    md = x1 & m
    lo = x2 & m
    hm = h & md
    return (
        np.int64(_popc(h)),
        np.int64(_popc(md)),
        np.int64(_popc(lo)),
        np.int64(_popc(hm)),
        np.int64(_popc(h & lo)),
        np.int64(_popc(md & lo)),
        np.int64(_popc(hm & lo)),
    )


@nb.njit(cache=True, inline="always")
def _hist3(buf, vp, hist):
    """hist[0:8] for 512 3-bit values by bit slicing: 24 bytes (three big-endian words) hold
    64 values exactly; the high, middle and low bit of every value are gathered in place (the
    stream shifted by 0, 1, 2 bits, masked at each value's first bit) and popcounted, and
    inclusion-exclusion turns the 7 plane/intersection counts into the 8 value counts."""
    a = 0
    b = 0
    c = 0
    ab = 0
    ac = 0
    bc = 0
    abc = 0
    for g in range(8):
        p = vp + 24 * g
        w0 = _lbe8(buf, p)
        w1 = _lbe8(buf, p + 8)
        w2 = _lbe8(buf, p + 16)
        one = np.uint64(1)
        two = np.uint64(2)
        r0 = _slice3(
            w0, (w0 << one) | (w1 >> np.uint64(63)), (w0 << two) | (w1 >> np.uint64(62)), _M3A
        )
        r1 = _slice3(
            w1, (w1 << one) | (w2 >> np.uint64(63)), (w1 << two) | (w2 >> np.uint64(62)), _M3B
        )
        r2 = _slice3(w2, w2 << one, w2 << two, _M3C)
        a += r0[0] + r1[0] + r2[0]
        b += r0[1] + r1[1] + r2[1]
        c += r0[2] + r1[2] + r2[2]
        ab += r0[3] + r1[3] + r2[3]
        ac += r0[4] + r1[4] + r2[4]
        bc += r0[5] + r1[5] + r2[5]
        abc += r0[6] + r1[6] + r2[6]
    hist[7] = abc
    hist[6] = ab - abc
    hist[5] = ac - abc
    hist[3] = bc - abc
    hist[4] = a - ab - ac + abc
    hist[2] = b - ab - bc + abc
    hist[1] = c - ac - bc + abc
    hist[0] = 512 - a - b - c + ab + ac + bc - abc


@nb.njit(cache=True)
def _hist_subblock(buf, vp, e, b, hist):
    """hist[v] = number of the sub-block's 512 b-bit values equal to v (v < 2**b)."""
    for j in range(1 << b):
        hist[j] = 0
    if b == 1:
        ones = 0
        for w in range(8):
            ones += np.int64(_popc(_le8(buf, vp + 8 * w)))
        hist[1] = ones
        hist[0] = 512 - ones
    elif b == 2:  # 2-bit values never straddle a byte: any byte order works
        lo_m = np.uint64(0x5555555555555555)
        nh = 0
        nl = 0
        nhl = 0
        for w in range(16):
            x = _le8(buf, vp + 8 * w)
            hi = (x >> np.uint64(1)) & lo_m
            lo = x & lo_m
            nh += np.int64(_popc(hi))
            nl += np.int64(_popc(lo))
            nhl += np.int64(_popc(hi & lo))
        hist[3] = nhl
        hist[2] = nh - nhl
        hist[1] = nl - nhl
        hist[0] = 512 - nh - nl + nhl
    elif b == 3:
        _hist3(buf, vp, hist)
    elif b == 4:
        for j in range(16, 32):  # a second tally at hist[16:32]: fewer store-to-load stalls
            hist[j] = 0
        for q in range(256):
            v = buf[vp + q]
            hist[v >> 4] += 1
            hist[16 + (v & 15)] += 1
        for j in range(16):
            hist[j] += hist[16 + j]
    elif b == 8:
        for j in range(256, 1024):  # four tallies in hist[0:1024]
            hist[j] = 0
        for q in range(0, 512, 4):
            hist[buf[vp + q]] += 1
            hist[256 + buf[vp + q + 1]] += 1
            hist[512 + buf[vp + q + 2]] += 1
            hist[768 + buf[vp + q + 3]] += 1
        for j in range(256):
            hist[j] += hist[256 + j] + hist[512 + j] + hist[768 + j]
    elif b == 5:
        _hist_rows(buf, vp, e, 5, hist)
    elif b == 6:
        _hist_rows(buf, vp, e, 6, hist)
    elif b == 7:
        _hist_rows(buf, vp, e, 7, hist)
    else:
        _hist_rows(buf, vp, e, 9, hist)


@nb.njit(cache=True)
def _find_bad_local(buf, vp, e, b, c, i, s, info):
    """Locate the first local value >= c of sub-block i (values at vp); fill info."""
    for r in range(64):
        rp = vp + r * b
        acc = _be8(buf, rp, e)
        for x in range(8):
            v = _row_value(acc, x, b, buf, rp)
            if v >= c:
                info[I_ERR] = E_LOCAL
                info[I_POS] = rp + ((x * b) >> 3) - s
                info[I_A] = v
                info[I_B] = i
                info[I_C] = c
                return E_LOCAL
    return E_OK


@nb.njit(cache=True, nogil=True)
def count_into(buf, s, e, info, counts, c0):
    """Add voxels per label-table entry of the (scanned, valid) block ``buf[s:e]`` into
    ``counts[c0:c0+N]`` without materializing voxels: per sub-block a histogram of its packed
    local values (POPCNT for 1 and 2 bits, byte/nibble tallies for 8 and 4). Ns == 0
    sub-blocks reference no entry and are not counted. Returns the error code (E_LOCAL on a
    local value >= Ns)."""
    N = info[I_N]
    nsb = info[I_NSB]
    if N == 1:
        counts[c0] += 512 * nsb
        return E_OK
    ns_p = s + 16 + 8 * N
    pal_p = ns_p + 2 * nsb
    val_p = pal_p + 4 * info[I_S]
    hist = np.zeros(2 * MAX_NS, np.int64)  # 512 bins + room for the 8-bit path's tallies
    for i in range(nsb):
        c = _u16(buf, ns_p + 2 * i)
        if c == 0:
            continue
        if c == 1:
            counts[c0 + _u32(buf, pal_p)] += 512
            pal_p += 4
            continue
        if c == 2:  # the commonest case: one POPCNT per 64 voxels, no histogram
            ones = 0
            for w in range(8):
                ones += np.int64(_popc(_le8(buf, val_p + 8 * w)))
            counts[c0 + _u32(buf, pal_p)] += 512 - ones
            counts[c0 + _u32(buf, pal_p + 4)] += ones
            pal_p += 8
            val_p += 64
            continue
        b = _width(c)
        _hist_subblock(buf, val_p, e, b, hist)
        for j in range(c, 1 << b):
            if hist[j] != 0:
                return _find_bad_local(buf, val_p, e, b, c, i, s, info)
        for j in range(c):
            counts[c0 + _u32(buf, pal_p + 4 * j)] += hist[j]
        pal_p += 4 * c
        val_p += 64 * b
    return E_OK


@nb.njit(cache=True, inline="always")
def _dec_rows(buf, vp, e, B, pl, c, outf, o0, sz_, sy_):
    """Write a sub-block's 8x8 rows of 8 voxels (B-bit values, B literal at each call site)
    into the flat output starting at o0 with z/y strides sz_/sy_. Returns the largest local
    value seen (the caller reports it if >= c)."""
    mx = 0
    for z in range(8):
        for y in range(8):
            rp = vp + (z * 8 + y) * B  # a row of 8 values is exactly B bytes
            acc = _row_acc(buf, rp, B)
            ob = o0 + z * sz_ + y * sy_
            for x in range(8):
                v = _row_value(acc, x, B, buf, rp)
                mx = max(mx, v)
                outf[np.uint64(ob + x)] = pl[v & 511]
    return mx


@nb.njit(cache=True, nogil=True)
def decode_into(buf, s, e, info, out):
    """Decode the (scanned, valid) block ``buf[s:e]`` into ``out`` (nz, ny, nx) uint64,
    C-contiguous. Returns the error code (E_LOCAL on a local value >= Ns)."""
    N = info[I_N]
    nsb = info[I_NSB]
    gx = _u32(buf, s)
    gy = _u32(buf, s + 4)
    gz = _u32(buf, s + 8)
    outf = out.reshape(out.size)
    if N == 1:
        outf[:] = _le8(buf, s + 16)
        return E_OK
    L = np.empty(N, np.uint64)
    for k in range(N):
        L[k] = _le8(buf, s + 16 + 8 * k)
    nx = 8 * gx
    sy_ = nx
    sz_ = nx * 8 * gy
    ns_p = s + 16 + 8 * N
    pal_p = ns_p + 2 * nsb
    val_p = pal_p + 4 * info[I_S]
    pl = np.empty(MAX_NS, np.uint64)
    i = -1
    for bz in range(gz):
        for by in range(gy):
            for bx in range(gx):
                i += 1
                o0 = bz * 8 * sz_ + by * 8 * sy_ + bx * 8
                c = _u16(buf, ns_p + 2 * i)
                if c < 2:
                    lab = np.uint64(0)
                    if c == 1:
                        lab = L[_u32(buf, pal_p)]
                        pal_p += 4
                    for z in range(8):
                        for y in range(8):
                            ob = o0 + z * sz_ + y * sy_
                            for x in range(8):
                                outf[np.uint64(ob + x)] = lab
                    continue
                for j in range(c):
                    pl[j] = L[_u32(buf, pal_p + 4 * j)]
                pal_p += 4 * c
                b = _width(c)
                if b == 1:  # c == 2, every value valid: a branch-free select, 8 lanes per row
                    p0 = pl[0]
                    d = pl[1] ^ p0
                    for z in range(8):
                        for y in range(8):
                            byte = np.uint64(buf[np.uint64(val_p + z * 8 + y)])
                            ob = o0 + z * sz_ + y * sy_
                            for x in range(8):
                                bit = (byte >> np.uint64(7 - x)) & np.uint64(1)
                                outf[np.uint64(ob + x)] = p0 ^ (d & (np.uint64(0) - bit))
                    bad = 0
                elif b == 2:
                    bad = _dec_rows(buf, val_p, e, 2, pl, c, outf, o0, sz_, sy_)
                elif b == 3:
                    bad = _dec_rows(buf, val_p, e, 3, pl, c, outf, o0, sz_, sy_)
                elif b == 4:
                    bad = _dec_rows(buf, val_p, e, 4, pl, c, outf, o0, sz_, sy_)
                elif b == 5:
                    bad = _dec_rows(buf, val_p, e, 5, pl, c, outf, o0, sz_, sy_)
                elif b == 6:
                    bad = _dec_rows(buf, val_p, e, 6, pl, c, outf, o0, sz_, sy_)
                elif b == 7:
                    bad = _dec_rows(buf, val_p, e, 7, pl, c, outf, o0, sz_, sy_)
                elif b == 8:
                    bad = _dec_rows(buf, val_p, e, 8, pl, c, outf, o0, sz_, sy_)
                else:
                    bad = _dec_rows(buf, val_p, e, 9, pl, c, outf, o0, sz_, sy_)
                if bad >= c:
                    return _find_bad_local(buf, val_p, e, b, c, i, s, info)
                val_p += 64 * b
    return E_OK


# ----------------------------------------------------------------------------------------
# encoder

_GOLD = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(cache=True, inline="always")
def _hash(v, shift):
    return np.int64((v * _GOLD) >> np.uint64(shift))


@nb.njit(cache=True)
def _tab_find(tk, tv, v, shift):
    """Slot of v in the open-addressing table (tv < 0 = empty)."""
    mask = tk.shape[0] - 1
    h = _hash(v, shift)
    while True:
        if tv[h] < 0 or tk[h] == v:
            return h
        h = (h + 1) & mask


@nb.njit(cache=True)
def _tab_grow(tk, tv, shift):
    cap = tk.shape[0] * 2
    nk = np.empty(cap, np.uint64)
    nv = np.full(cap, -1, np.int64)
    nshift = shift - 1
    for h in range(tk.shape[0]):
        if tv[h] >= 0:
            g = _tab_find(nk, nv, tk[h], nshift)
            nk[g] = tk[h]
            nv[g] = tv[h]
    return nk, nv, nshift


@nb.njit(cache=True, inline="always")
def _pack_rows(loc, vals, vp, B):
    """Pack 512 local indices as 64 rows of 8 B-bit MSB-first values (B bytes per row) at
    vals[vp:]; B is a literal at each call site."""
    for r in range(64):
        k = r * 8
        acc = np.uint64(0)
        if B <= 8:
            for x in range(8):
                acc = (acc << np.uint64(B)) | np.uint64(loc[k + x])
            for q in range(B):
                vals[vp + r * B + q] = np.uint8((acc >> np.uint64(8 * (B - 1 - q))) & np.uint64(255))
        else:  # B == 9: 7 values + the top bit of the 8th fill 64 bits, its low 8 bits the 9th byte
            for x in range(7):
                acc = (acc << np.uint64(9)) | np.uint64(loc[k + x])
            last = np.uint64(loc[k + 7])
            acc = (acc << np.uint64(1)) | (last >> np.uint64(8))
            for q in range(8):
                vals[vp + r * 9 + q] = np.uint8((acc >> np.uint64(8 * (7 - q))) & np.uint64(255))
            vals[vp + r * 9 + 8] = np.uint8(last & np.uint64(255))


@nb.njit(cache=True)
def _pack(loc, vals, vp, b):
    if b == 1:
        _pack_rows(loc, vals, vp, 1)
    elif b == 2:
        _pack_rows(loc, vals, vp, 2)
    elif b == 3:
        _pack_rows(loc, vals, vp, 3)
    elif b == 4:
        _pack_rows(loc, vals, vp, 4)
    elif b == 5:
        _pack_rows(loc, vals, vp, 5)
    elif b == 6:
        _pack_rows(loc, vals, vp, 6)
    elif b == 7:
        _pack_rows(loc, vals, vp, 7)
    elif b == 8:
        _pack_rows(loc, vals, vp, 8)
    else:
        _pack_rows(loc, vals, vp, 9)


_LINEAR = 16  # distinct labels per sub-block found by linear search before switching to a hash


@nb.njit(cache=True, nogil=True)
def encode(vol, order, use_order, vals, dist, out):
    """Encode a C-contiguous uint64 (nz, ny, nx) volume (sides multiples of 8).

    One pass over sub-blocks: gather the 512 voxels, find distinct labels in first-occurrence
    order (run cache, then a linear search of the first 16, then a stamped hash), pack the
    local indices at once. Then the block table (first occurrence, or ``order``) via a hash.
    ``vals`` (>= 576 * nsb bytes), ``dist`` (>= 512 * nsb labels) and ``out`` (>=
    ``encode_bound``) are the caller's reusable scratch: fresh multi-megabyte allocations
    page-fault on every call, which costs more than the encoding itself.
    Returns (size of the block in out, err, bad_label): err 1 = a voxel label missing from
    ``order`` (only with ``use_order``)."""
    nz, ny, nx = vol.shape
    gz = nz // 8
    gy = ny // 8
    gx = nx // 8
    nsb = gx * gy * gz
    flat = vol.reshape(vol.size)
    sy_ = nx
    sz_ = nx * ny
    ns = np.empty(nsb, np.int64)
    blk = np.empty(512, np.uint64)
    loc = np.empty(512, np.int64)
    lab = np.empty(512, np.uint64)
    hk = np.empty(1024, np.uint64)
    hv = np.empty(1024, np.int64)
    hs = np.zeros(1024, np.int64)  # stamp: slot is live iff hs[h] == gen
    gen = 0
    nd = 0
    vp = 0
    i = -1
    for bz in range(gz):
        for by in range(gy):
            for bx in range(gx):
                i += 1
                o0 = bz * 8 * sz_ + by * 8 * sy_ + bx * 8
                for z in range(8):
                    for y in range(8):
                        ob = o0 + z * sz_ + y * sy_
                        for x in range(8):
                            blk[z * 64 + y * 8 + x] = flat[ob + x]
                v0 = blk[0]
                diff = np.uint64(0)
                for k in range(512):  # integer OR-reduction: vectorizes (a bool &= does not)
                    diff |= blk[k] ^ v0
                if diff == 0:
                    lab[0] = v0
                    c = 1
                else:
                    c = 0
                    last = ~v0
                    lastli = 0
                    hashed = False
                    for k in range(512):
                        v = blk[k]
                        if v == last:
                            loc[k] = lastli
                            continue
                        if not hashed:
                            j = 0
                            while j < c and lab[j] != v:
                                j += 1
                            if j == c:
                                lab[c] = v
                                c += 1
                                if c == _LINEAR:
                                    hashed = True
                                    gen += 1
                                    for t in range(c):
                                        h = _hash(lab[t], 54)
                                        while hs[h] == gen:
                                            h = (h + 1) & 1023
                                        hs[h] = gen
                                        hk[h] = lab[t]
                                        hv[h] = t
                        else:
                            h = _hash(v, 54)
                            while hs[h] == gen and hk[h] != v:
                                h = (h + 1) & 1023
                            if hs[h] == gen:
                                j = hv[h]
                            else:
                                hs[h] = gen
                                hk[h] = v
                                hv[h] = c
                                lab[c] = v
                                j = c
                                c += 1
                        loc[k] = j
                        last = v
                        lastli = j
                    b = _width(c)
                    _pack(loc, vals, vp, b)
                    vp += 64 * b
                ns[i] = c
                for t in range(c):
                    dist[nd + t] = lab[t]
                nd += c

    # block label table: hash label -> table index
    shift = 52  # 4096 slots
    tk = np.empty(4096, np.uint64)
    tv = np.full(4096, -1, np.int64)
    nt = 0
    if use_order:
        table = order
        for k in range(order.shape[0]):
            if (nt + 1) * 2 > tk.shape[0]:
                tk, tv, shift = _tab_grow(tk, tv, shift)
            h = _tab_find(tk, tv, order[k], shift)
            if tv[h] < 0:
                tk[h] = order[k]
                tv[h] = k
                nt += 1
        N = order.shape[0]
    else:
        table = np.empty(nd, np.uint64)
        N = 0
    pal = np.empty(nd, np.int64)
    prev = ~dist[0] if nd > 0 else np.uint64(0)
    prev_idx = -1
    for j in range(nd):
        v = dist[j]
        if v == prev:  # consecutive sub-blocks often share their labels
            pal[j] = prev_idx
            continue
        if (nt + 1) * 2 > tk.shape[0]:
            tk, tv, shift = _tab_grow(tk, tv, shift)
        h = _tab_find(tk, tv, v, shift)
        if tv[h] < 0:
            if use_order:
                return 0, 1, v
            tk[h] = v
            tv[h] = N
            table[N] = v
            N += 1
            nt += 1
        pal[j] = tv[h]
        prev = v
        prev_idx = tv[h]

    if N == 1:
        _put32(out, 0, gx)
        _put32(out, 4, gy)
        _put32(out, 8, gz)
        _put32(out, 12, 1)
        _put64(out, 16, table[0])
        return 24, 0, np.uint64(0)

    size = 16 + 8 * N + 2 * nsb + 4 * nd + vp
    _put32(out, 0, gx)
    _put32(out, 4, gy)
    _put32(out, 8, gz)
    _put32(out, 12, N)
    p = 16
    for k in range(N):
        _put64(out, p, table[k])
        p += 8
    for k in range(nsb):
        out[p] = ns[k] & 0xFF
        out[p + 1] = (ns[k] >> 8) & 0xFF
        p += 2
    for j in range(nd):
        _put32(out, p, pal[j])
        p += 4
    out[p : p + vp] = vals[:vp]
    return size, 0, np.uint64(0)


@nb.njit(cache=True, inline="always")
def _put32(out, p, v):
    out[p] = v & 0xFF
    out[p + 1] = (v >> 8) & 0xFF
    out[p + 2] = (v >> 16) & 0xFF
    out[p + 3] = (v >> 24) & 0xFF


@nb.njit(cache=True, inline="always")
def _put64(out, p, v):
    for k in range(8):
        out[p + k] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(0xFF))


# ----------------------------------------------------------------------------------------
# repack: one pass over a concatenated buffer of unwrapped blocks


@nb.njit(cache=True, nogil=True)
def repack_kernel(buf, offs, ok):
    """For each row r with ok[r], validate block buf[offs[r]:offs[r+1]] completely, count
    voxels per table entry and copy out its table; then move its 16-byte header in place to
    just before the values so the body (header + everything after the table) is the
    contiguous slice ``buf[body_start[r]:offs[r+1]]`` — no copy of the bulk bytes.
    ``buf`` is modified (it must be the caller's scratch copy).

    Returns (info (R, 8), sv_offs (R+1), sv uint64, counts uint32, body_start (R)). Rows that
    fail (or are not ok) get empty slices and a nonzero info[r, 0]."""
    R = offs.shape[0] - 1
    info = np.zeros((R, INFO_LEN), np.int64)
    tot = 0
    for r in range(R):
        if ok[r] and scan(buf, offs[r], offs[r + 1], info[r]) == E_OK:
            tot += info[r, I_N]
    sv = np.empty(tot, np.uint64)
    counts = np.zeros(tot, np.int64)
    sv_offs = np.zeros(R + 1, np.int64)
    body_start = np.zeros(R, np.int64)
    c0 = 0
    for r in range(R):
        sv_offs[r] = c0
        if not ok[r] or info[r, I_ERR] != E_OK:
            continue
        s = offs[r]
        e = offs[r + 1]
        row = info[r]
        N = row[I_N]
        if count_into(buf, s, e, row, counts, c0) != E_OK:
            for k in range(N):
                counts[c0 + k] = 0
            continue
        for k in range(N):
            sv[c0 + k] = _le8(buf, s + 16 + 8 * k)
        for k in range(15, -1, -1):  # backwards: source and destination overlap when N == 1
            buf[s + 8 * N + k] = buf[s + k]
        body_start[r] = s + 8 * N
        c0 += N
    sv_offs[R] = c0
    return info, sv_offs, sv[:c0], counts[:c0].astype(np.uint32), body_start


@nb.njit(cache=True, nogil=True)
def check_many(buf, offs):
    """Full validation (structure and every packed value) of many concatenated blocks,
    read-only; returns info (R, 8) with info[r, 0] == 0 for valid blocks."""
    R = offs.shape[0] - 1
    info = np.zeros((R, INFO_LEN), np.int64)
    max_n = 1
    for r in range(R):
        if scan(buf, offs[r], offs[r + 1], info[r]) == E_OK:
            max_n = max(max_n, info[r, I_N])
    counts = np.zeros(max_n, np.int64)
    for r in range(R):
        if info[r, I_ERR] == E_OK:
            count_into(buf, offs[r], offs[r + 1], info[r], counts, 0)
    return info


@nb.njit(cache=True, nogil=True)
def count_block(buf):
    """scan + count_into for one whole-buffer block in a single call (one dispatch from
    Python). Returns (info, counts uint32)."""
    info = np.zeros(INFO_LEN, np.int64)
    if scan(buf, 0, buf.shape[0], info) != E_OK:
        return info, np.zeros(0, np.uint32)
    counts = np.zeros(info[I_N], np.int64)
    count_into(buf, 0, buf.shape[0], info, counts, 0)
    return info, counts.astype(np.uint32)
