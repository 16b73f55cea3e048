"""The one byte-bounded cutter (dvidetl/batching.py) every batch size limit goes through."""

from __future__ import annotations

import numpy as np
import pytest

from dvidetl.batching import cut_points, spans


def _check(sizes, max_bytes, max_rows, cuts):
    assert cuts[0] == 0 and cuts[-1] == len(sizes)
    assert np.all(np.diff(cuts) >= 1)
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        total = int(sizes[a:b].sum())
        assert b - a == 1 or total <= max_bytes  # a single oversized row goes alone
        if max_rows is not None:
            assert b - a <= max_rows
        if b < len(sizes):  # greedy: the next row would break a limit
            over_bytes = total + int(sizes[b]) > max_bytes
            over_rows = max_rows is not None and b - a + 1 > max_rows
            assert over_bytes or over_rows


@pytest.mark.parametrize("seed", range(20))
def test_random_sizes_obey_both_limits_and_are_greedy(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 5000, rng.integers(1, 3000)).astype(np.int64)
    sizes[rng.integers(0, sizes.size, 5)] = 50_000  # some rows larger than the budget
    max_rows = None if seed % 2 else int(rng.integers(1, 200))
    cuts = cut_points(sizes, 20_000, max_rows)
    _check(sizes, 20_000, max_rows, cuts)


def test_edges():
    assert cut_points(np.zeros(0, np.int64), 10).tolist() == [0]
    assert cut_points(np.array([100, 1, 1]), 10).tolist() == [0, 1, 3]
    assert cut_points(np.zeros(10, np.int64), 10, max_rows=4).tolist() == [0, 4, 8, 10]
    assert list(spans(np.array([3, 3, 3, 3]), 6)) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError):
        cut_points(np.ones(3), 0)
    with pytest.raises(ValueError):
        cut_points(np.ones(3), 5, max_rows=0)
