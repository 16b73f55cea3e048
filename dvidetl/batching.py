"""Cutting rows into byte-bounded batches, in one place.

Every layer has a size limit for what it sends at once — a Flight message, a VastDB insert
RPC, a batch from DVID or an export-shards file — and each knows best what one of its rows
costs (wire bytes, serialized cells, payload length). What they share is the cut: given the
cost of each row, where to end each batch so it stays within a byte budget (and, optionally, a
row count), a row too large for any budget going alone. That is `cut_points`; it does one
cumulative sum and one binary search per batch, never a Python step per row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def cut_points(sizes: np.ndarray, max_bytes: int, max_rows: int | None = None) -> np.ndarray:
    """Row offsets ``[0, e1, ..., n]``: rows ``e[i]:e[i+1]`` cost at most ``max_bytes`` (summing
    ``sizes``) and number at most ``max_rows``; a single row over the budget is its own batch.
    Batches are as long as the limits allow, so consecutive ones could not be merged."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    n = len(sizes)
    cum = np.cumsum(sizes, dtype=np.int64)
    cuts = [0]
    start, base = 0, 0
    while start < n:
        end = int(np.searchsorted(cum, base + max_bytes, side="right"))
        if max_rows is not None:
            end = min(end, start + max_rows)
        end = max(end, start + 1)
        cuts.append(end)
        base = int(cum[end - 1])
        start = end
    return np.asarray(cuts, dtype=np.int64)


def spans(sizes: np.ndarray, max_bytes: int, max_rows: int | None = None) -> Iterator[tuple[int, int]]:
    """`cut_points` as ``(start, end)`` pairs."""
    c = cut_points(sizes, max_bytes, max_rows).tolist()
    return zip(c[:-1], c[1:], strict=True)
