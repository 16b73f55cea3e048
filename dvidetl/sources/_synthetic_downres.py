"""DVID's ``Downres`` for synthetic coarse scales: a numba kernel over the 8 children of a
block, and a plain-numpy reference for tests."""

from __future__ import annotations

import numba as nb
import numpy as np

from dvidetl.sources._synthetic_kernels import BS


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
