"""DVID blocks built by plain numpy, independent of ``dvidetl.codec``'s encoder, so tests and
the fuzzer can check the kernels against bytes they did not produce (any sub-block palette
and local values, every width 0..9 bits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_block(grid: Sequence[int], table: Sequence[int], subs: Sequence[tuple]) -> bytes:
    """A raw DVID block from its sub-block grid, label table and, per sub-block, (palette of
    table indices, 512 local values), values packed MSB-first as DVID does."""
    ns, pals, vals = [], [], []
    for pal, local in subs:
        ns.append(len(pal))
        pals.extend(pal)
        if len(pal) >= 2:
            b = (len(pal) - 1).bit_length()
            bits = ((np.asarray(local)[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8)
            vals.append(np.packbits(bits.reshape(-1)).tobytes())
    return (np.array([*grid, len(table)], "<u4").tobytes() + np.asarray(table, "<u8").tobytes()
            + np.array(ns, "<u2").tobytes() + np.array(pals, "<u4").tobytes() + b"".join(vals))
