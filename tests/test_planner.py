"""The planner: pure functions over count() answers (no blocks read)."""

from __future__ import annotations

import json
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dvidetl.export.planning import make_plan, merge_cells, plan_scale


def _count_from_codes(codes: np.ndarray):
    codes = np.unique(np.asarray(codes, dtype=np.uint64))
    calls = []

    def count(scale, level):
        calls.append(level)
        cells, counts = np.unique(codes >> np.uint64(level), return_counts=True)
        return cells, counts.astype(np.uint64), True

    return count, calls


def _check(parts, codes, target):
    codes = np.unique(np.asarray(codes, dtype=np.uint64))
    los = np.array([p.lo for p in parts], dtype=np.uint64)
    his = np.array([p.hi for p in parts], dtype=np.uint64)
    assert np.all(los < his)
    assert np.all(his[:-1] <= los[1:]), "partitions overlap or are out of order"
    # every code in exactly one partition, and the estimates are exact counts
    idx = np.searchsorted(los, codes, side="right") - 1
    assert np.all(idx >= 0)
    assert np.all(codes < his[idx])
    per = np.bincount(idx, minlength=len(parts))
    assert per.tolist() == [p.blocks for p in parts]
    assert np.all(per > 0), "an empty partition was planned"
    assert max(p.blocks for p in parts) < 2 * target


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, (1 << 18) - 1), min_size=1, max_size=3000),
    st.integers(1, 600),
)
def test_plan_covers_every_block_once(codes, target):
    count, _ = _count_from_codes(codes)
    parts = plan_scale(count, 0, 1 << 18, target)
    _check(parts, codes, target)
    _check(plan_scale(count, 0, 1 << 18, target, start_cell_bits=12), codes, target)


def test_plan_is_deterministic_and_balances():
    rng = np.random.default_rng(1)
    # a dense clump and a sparse tail: heavy cells must be split, light ones merged
    codes = np.concatenate([np.arange(100_000, 160_000), rng.integers(0, 1 << 24, 5_000)]).astype(np.uint64)
    count, calls = _count_from_codes(codes)
    a = plan_scale(count, 3, 1 << 24, 1000, start_cell_bits=18)
    b = plan_scale(count, 3, 1 << 24, 1000, start_cell_bits=18)
    _check(plan_scale(count, 3, 1 << 24, 1000), codes, 1000)  # one call at the fine level
    assert a == b
    _check(a, codes, 1000)
    assert all(p.scale == 3 and p.kind == "blocks" for p in a)
    sizes = np.array([p.blocks for p in a])
    # the dense clump gives full partitions; the total count of partitions is close to ideal
    assert len(a) <= 2 * len(np.unique(codes)) / 1000 + 10
    assert calls[0] > calls[-1], "heavy cells were not refined at a finer level"
    assert np.median(sizes) >= 500


def test_merge_cells_vectorized_groups():
    lo = np.array([0, 8, 16, 64], np.uint64)
    hi = lo + np.uint64(8)
    parts = merge_cells(0, lo, hi, np.array([5, 5, 5, 5]), 10, 128)
    assert [(p.lo, p.hi, p.blocks) for p in parts] == [(0, 16, 10), (16, 72, 10)]


def test_cns_size_plan_is_fast_and_bounded(shared_data):
    """The synthetic source at the male CNS extents (scale 0 grid of the real spec, ~3.8
    billion block slots) with its sparse tissue mask (hundreds of millions of blocks), planned
    through the Flight ``count`` action exactly as ``run`` does — no block is read, and the
    planner's traced memory stays bounded (far below one byte per block slot)."""
    import tracemalloc

    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.sources import open_source

    spec = json.loads((shared_data / "dvid" / "mcns-ng-specs.json").read_text())
    size = spec["scales"][0]["size"]
    grid = tuple(-(-s // 64) for s in size)
    slots = grid[0] * grid[1] * grid[2]
    assert slots > 3.5e9
    source = open_source(f"synthetic://cns?size={','.join(map(str, size))}&scales=1&mask=sparse")
    server = start_server(source)
    client = FlightClient(server.location, uuid="cns")
    try:
        info = client.info()
        assert tuple(info.scales[0].grid) == grid
        tracemalloc.start()
        t0 = time.perf_counter()
        parts = make_plan(info, client.count, [0], 4096)
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        total = sum(p.blocks for p in parts if p.kind == "blocks")
        # the source's exact count, summed independently at the coarsest level
        _, counts, exact = source.count(0, 30)
        assert exact and total == int(np.sum(counts))
        assert 2e8 < total < 6e8, total
        blk = [p for p in parts if p.kind == "blocks"]
        assert abs(len(blk) - total / 4096) < 0.02 * len(blk) + 2
        assert max(p.blocks for p in blk) <= 2 * 4096
        assert all(a.hi <= b.lo for a, b in zip(blk, blk[1:], strict=False))
        assert [p.kind for p in parts[-2:]] == ["indices", "mapping"]
        assert peak < 512 * 2**20, f"planner peak {peak / 2**20:.0f} MiB"
        print(f"planned {len(blk)} partitions of {total} blocks in {dt:.2f} s, peak {peak / 2**20:.0f} MiB")
    finally:
        client.close()
        server.stop()
        source.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, (1 << 15) - 1), min_size=1, max_size=2000),
    st.integers(0, 15),
    st.sampled_from([None, 1, 64, 4096]),
)
def test_shard_cells_one_partition_per_non_empty_cell(codes, bits, partition_blocks):
    """With a sink's ``plan_cells`` (a neuroglancer shard: an aligned Morton cell), a scale
    is cut into exactly one partition per non-empty cell — never two partitions in a cell,
    never one straddling two, no empty one — in one count call, whatever the partition
    size; another scale of the same plan keeps the ordinary sizing."""
    from dvidetl.geometry import ScaleInfo, VolumeInfo

    codes = np.unique(np.asarray(codes, np.uint64))
    count, calls = _count_from_codes(codes)
    info = VolumeInfo("u", "seg", "gzip", [ScaleInfo(0, (64, 64, 64), (32, 32, 32)),
                                           ScaleInfo(1, (64, 64, 64), (32, 32, 32))])
    parts = make_plan(info, count, [0, 1], partition_blocks, indices=False, mapping=False,
                      anomalies=False, cells={0: bits})
    s0 = [p for p in parts if p.scale == 0]
    cells = np.unique(codes >> np.uint64(bits))
    assert [p.lo >> bits for p in s0] == cells.tolist()
    for p in s0:
        k = p.lo >> bits
        assert p.lo == k << bits and p.hi == min((k + 1) << bits, 1 << 15)
    _check(s0, codes, max(p.blocks for p in s0))
    _check([p for p in parts if p.scale == 1], codes, partition_blocks or 4096)


def test_sinks_wanting_different_cells_for_a_scale_are_refused():
    import pytest

    from dvidetl.errors import UserError
    from dvidetl.export.planning import combine_cells

    assert combine_cells([{0: 15, 1: 12}, {}, {0: 15}]) == {0: 15, 1: 12}
    with pytest.raises(UserError, match="scale 1 cut into Morton cells of 2\\^12 and 2\\^9"):
        combine_cells([{0: 15, 1: 12}, {1: 9}])


def test_key_ranges_close_a_partition_at_every_target_rows():
    """``_KeyRanges``: cells added in several calls close a partition once the rows before a
    cell reach a multiple of the target — also when the first call added a single row."""
    from dvidetl.export.planning import _KeyRanges
    from dvidetl.geometry import KEY_END

    r = _KeyRanges("mapping", 1)
    r.add(np.array([0], np.uint64), np.array([1]))
    r.add(np.array([5], np.uint64), np.array([1]))
    r.add(np.array([9, 12], np.uint64), np.array([1, 1]))
    assert [(p.lo, p.hi, p.rows) for p in r.partitions()] == [(0, 5, 1), (5, 9, 1), (9, 12, 1), (12, KEY_END - 1, 1)]
    r = _KeyRanges("indices", 4)
    r.add(np.array([0, 3], np.uint64), np.array([2, 1]))
    r.add(np.array([7, 8], np.uint64), np.array([2, 3]))
    assert [(p.kind, p.lo, p.hi, p.rows) for p in r.partitions()] == [("indices", 0, 8, 5), ("indices", 8, KEY_END - 1, 3)]
    assert _KeyRanges("mapping", 4).partitions() == []


def test_plan_keys_counts_a_key_without_rows_as_one_row():
    """A label whose index has no rows is still a key of the plan (one row, so a partition
    boundary can fall at it); a cell with neither keys nor rows is dropped."""
    from dvidetl.export.planning import plan_keys
    from dvidetl.geometry import KEY_END
    from dvidetl.sources.base import KeyCounts

    def count_keys(kind, cell_bits, lo, hi):
        assert (kind, cell_bits, lo, hi) == ("indices", 48, 0, KEY_END)
        return KeyCounts(np.array([1, 2, 3, 4], np.uint64), np.array([1, 1, 0, 1], np.uint64),
                         np.array([0, 1, 0, 1], np.uint64), True)

    parts = plan_keys(count_keys, "indices", 1)
    assert [(p.lo >> 48, p.rows) for p in parts] == [(0, 1), (2, 1), (4, 1)]


def test_plan_of_a_source_over_reporting_its_counts_ends_at_single_blocks():
    """A source whose counts exceed what a cell can hold (over-reporting) makes the planner
    refine down to single-block cells and stop there — never coarser, never forever."""
    codes = np.arange(0, 64, 3, dtype=np.uint64)
    count, calls = _count_from_codes(codes)

    def over(scale, level):
        cells, counts, exact = count(scale, level)
        return cells, counts * np.uint64(10), exact

    parts = plan_scale(over, 0, 64, 4)
    assert calls[-1] == 0 and calls == sorted(calls, reverse=True)
    assert [(p.lo, p.hi) for p in parts] == [(int(c), int(c) + 1) for c in codes]


def test_run_ids_sort_in_the_order_runs_are_made() -> None:
    """A sink's newest run (by id) is the export readers see: ids made one after the other
    sort in that order, within one second too, and after every id a sink already holds (a
    clock behind the one that wrote it; an id of the older to-the-second form)."""
    import re

    from dvidetl.export.planning import new_run_id

    ids = [new_run_id() for _ in range(2000)]  # well within a few seconds
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{6}", i) for i in ids)
    made = []
    for _ in range(200):  # each passing the last (what the driver does with a sink's runs)
        made.append(new_run_id(after=made[-1:]))
    assert sorted(made) == made and len(set(made)) == len(made)
    future = "29991231T235959999999Z-ffffff"  # a run written by a clock far ahead
    nxt = new_run_id(after=["20200101T000000000000Z-000000", future])
    assert nxt > future and nxt.startswith("30000101T000000000000Z-")
    old = "29991231T235958Z-abcdef"  # the older form: passed by a whole second
    nxt = new_run_id(after=[old])
    assert nxt > old and nxt.startswith("29991231T235959000000Z-")
    assert new_run_id(after=["20200101T000000Z-abcdef"]) > "2026"  # the past: the clock's time


def test_auto_partition_size_spreads_a_small_volume_and_keeps_the_default_for_a_big_one():
    """``partition_blocks=None``: a small volume is cut into partitions of about total/16
    blocks (so every worker gets work), never below MIN_AUTO_PARTITION; a big one keeps
    DEFAULT_PARTITION_BLOCKS; a size given is used as given."""
    from dvidetl.export.planning import DEFAULT_PARTITION_BLOCKS, MIN_AUTO_PARTITION
    from dvidetl.sources import open_source

    info = open_source("synthetic://auto?size=4096,4096,4096&scales=1").info()

    def plan(n: int, partition_blocks: int | None = None):
        count, _ = _count_from_codes(np.arange(n))
        parts = make_plan(info, count, [0], partition_blocks, indices=False, mapping=False, anomalies=False)
        assert sum(p.blocks for p in parts) == n
        return sorted(p.blocks for p in parts)

    small = plan(8000)  # 8000 // 16 = 500: 256-block partitions
    assert len(small) >= 16 and max(small) < 2 * 256 and small[1] > MIN_AUTO_PARTITION, small  # [0]: the rest
    assert plan(8000, DEFAULT_PARTITION_BLOCKS) == [8000 - DEFAULT_PARTITION_BLOCKS, DEFAULT_PARTITION_BLOCKS]  # as given
    tiny = plan(1000)  # 1000 // 16 = 62: never below MIN_AUTO_PARTITION
    assert 1000 // (2 * MIN_AUTO_PARTITION) <= len(tiny) <= 1000 // MIN_AUTO_PARTITION + 1, tiny
    assert tiny[1] >= MIN_AUTO_PARTITION, tiny
    big = plan(200_000)  # 200000 // 16 = 12500 > 4096: the default
    assert max(big) < 2 * DEFAULT_PARTITION_BLOCKS and len(big) <= 200_000 // (DEFAULT_PARTITION_BLOCKS // 2), big
    assert len(big) < len(plan(200_000, 1024))
