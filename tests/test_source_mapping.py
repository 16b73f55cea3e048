"""Mapping pairs are normalized in one place (``sources.base.unique_pairs``): the same answer
as a plain-Python reference on random pairs with repeats and conflicts, with and without the
write order (``rank``) that lets the shards source take the newest body of a supervoxel."""

from __future__ import annotations

import numpy as np
import pytest

from dvidetl.errors import UserError
from dvidetl.sources.base import dedupe_pairs, unique_pairs


def _reference(sv, body, rank=None):
    """{(sv, body): highest rank}, then sorted by (sv, rank, body) or (sv, body)."""
    best: dict[tuple[int, int], int] = {}
    for i, (s, b) in enumerate(zip(sv.tolist(), body.tolist(), strict=True)):
        r = 0 if rank is None else int(rank[i])
        best[(s, b)] = max(best.get((s, b), r), r)
    key = (lambda kv: (kv[0][0], kv[0][1])) if rank is None else (lambda kv: (kv[0][0], kv[1], kv[0][1]))
    items = sorted(best.items(), key=key)
    return ([s for (s, _), _ in items], [b for (_, b), _ in items], [r for _, r in items])


@pytest.mark.parametrize("seed", range(5))
def test_unique_pairs_matches_a_reference(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    sv = rng.integers(1, 300, n).astype(np.uint64)
    sv[:5] = np.uint64(2**64 - 1)  # the top of the key space sorts last, unsigned
    body = rng.integers(1, 4, n).astype(np.uint64) + sv  # up to 3 bodies per supervoxel
    rank = rng.integers(0, 50, n)
    for r in (None, rank):
        got = unique_pairs(sv, body, r)
        want = _reference(sv, body, r)
        assert got[0].tolist() == want[0] and got[1].tolist() == want[1]
        if r is not None:
            assert got[2].tolist() == want[2]
            # the last pair of each supervoxel is one seen at the newest rank of it
            last = np.concatenate([got[0][1:] != got[0][:-1], [True]])
            for s, b, k in zip(got[0][last].tolist(), got[1][last].tolist(), got[2][last].tolist(), strict=True):
                assert k == max(kk for ss, kk in zip(sv.tolist(), rank.tolist(), strict=True) if ss == s)
                assert (s, b) in {(ss, bb) for ss, bb, kk in zip(sv.tolist(), body.tolist(), rank.tolist(),
                                                                   strict=True) if kk == k}


def test_unique_pairs_edge_cases():
    z = np.zeros(0, np.uint64)
    s, b, r = unique_pairs(z, z)
    assert s.size == b.size == r.size == 0 and s.dtype == b.dtype == np.uint64
    with pytest.raises(ValueError, match="3 supervoxels, 2 bodies"):
        unique_pairs(np.arange(3), np.arange(2))


def test_dedupe_pairs_names_a_supervoxel_with_two_bodies():
    sv = np.array([5, 3, 5, 3, 9], np.uint64)
    body = np.array([50, 30, 50, 30, 90], np.uint64)
    s, b = dedupe_pairs(sv, body, "here")
    assert s.tolist() == [3, 5, 9] and b.tolist() == [30, 50, 90]
    with pytest.raises(UserError, match=r"^here: supervoxel 5 is mapped to two bodies \(50 and 51\) \(why\)$"):
        dedupe_pairs(np.append(sv, 5), np.append(body, 51), "here", why=" (why)")

    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        dedupe_pairs(np.array([1, 1], np.uint64), np.array([2, 3], np.uint64), "x", error=Mine)
