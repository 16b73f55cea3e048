"""Spilled partition output (``dvidetl.export.spill``): the same rows as in memory, read back as
often as a retried write needs, and no file left behind on success or failure."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_transform import GRID, _batch, _volume

from dvidetl.codec import encode_block, wrap
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
from dvidetl.export.spill import SpilledTable, close_tables
from dvidetl.export.tasks import write_with_backoff
from dvidetl.export.transform import transform_blocks
from dvidetl.sinks import open_sink
from dvidetl.tables.cells import cut_blocks

KW = dict(scale=0, grid=GRID, lo=0, hi=512)
LIMIT = 16 * 1024


def _dense_batches(order=(0, 1, 2, 3, 4)):
    rng = np.random.default_rng(5)
    vols = [encode_block(_volume(rng, k)) for k in (20000, 3, 20000, 400, 20000)]
    coords = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]
    return [_batch([wrap(vols[i], "gzip")], [coords[i]]) for i in order]


def _as_table(t) -> pa.Table:
    return t.read_all() if isinstance(t, SpilledTable) else t.combine_chunks()


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (4, 2, 0, 3, 1)], ids=["ascending", "shuffled"])
def test_spilled_transform_equals_in_memory(tmp_path, order):
    """Spilled from the first group on (``spill_bytes=1``), the partition's blocks are row for
    row the in-memory ones, and so are the tables a sink cuts from them; groups out of
    Morton order still give blocks (and so overflow rows) in Morton order."""
    batches = _dense_batches(order)
    mem, st1 = transform_blocks(batches, "gzip", lambda s: s + np.uint64(1), **KW)
    sp, st2 = transform_blocks(batches, "gzip", lambda s: s + np.uint64(1), group_bytes=1,
                               spill_dir=str(tmp_path), spill_bytes=1, **KW)
    try:
        assert isinstance(sp.blocks, SpilledTable)
        assert len(list(tmp_path.iterdir())) == 1  # one file for the spilled blocks
        blocks = _as_table(sp.blocks)
        assert blocks.column("morton").to_pylist() == sorted(blocks.column("morton").to_pylist())
        cut_sp, cut_mem = cut_blocks(sp, "r", LIMIT), cut_blocks(mem, "r", LIMIT)
        ov = _as_table(cut_sp["block_overflow"])
        keys = list(zip(*(ov.column(c).to_pylist() for c in ("morton", "column", "part")), strict=True))
        assert keys == sorted(keys) and ov.num_rows > 0
        assert blocks.equals(_as_table(mem.blocks).sort_by("morton"))
        for t in ("blocks", "block_overflow", "export_errors"):
            assert _as_table(cut_sp[t]).equals(_as_table(cut_mem[t]).sort_by(
                [("morton", "ascending")] + ([("column", "ascending"), ("part", "ascending")]
                                             if t == "block_overflow" else []))), t
        assert sp.blocks.num_rows == st2.blocks == st1.blocks == 5
        # read back as often as asked
        assert _as_table(sp.blocks).equals(_as_table(sp.blocks))
    finally:
        close_tables(sp)
    assert list(tmp_path.iterdir()) == []


def test_spill_files_removed_when_the_transform_fails(tmp_path):
    calls = []

    def mapper(s):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("map exchange lost")
        return s

    with pytest.raises(RuntimeError, match="map exchange lost"):
        transform_blocks(_dense_batches(), "gzip", mapper, group_bytes=1, spill_dir=str(tmp_path),
                         spill_bytes=1, **KW)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_spill_below_budget_stays_in_memory(tmp_path):
    t, _ = transform_blocks(_dense_batches(), "gzip", lambda s: s, spill_dir=str(tmp_path), **KW)
    assert all(isinstance(v, pa.Table) for v in t.values())
    assert list(tmp_path.iterdir()) == []


class _FailOnce:
    """A Parquet sink whose first write fails with EIO after consuming part of the blocks."""

    def __init__(self, sink):
        self.sink, self.calls = sink, 0

    def write_partition(self, run_id, part, data, stats):
        self.calls += 1
        if self.calls == 1:
            next(iter(data.batches()))
            raise OSError(5, "Input/output error")
        self.sink.write_partition(run_id, part, data, stats)


def test_spilled_partition_write_is_retried_whole(tmp_path, monkeypatch):
    """A spilled table is replayable: the write retried after a failure that consumed part of
    it stores every row, the same as an in-memory partition's."""
    import dvidetl.export.tasks as P

    monkeypatch.setattr(P, "WRITE_BACKOFF_S", 0.01)
    mem, _ = transform_blocks(_dense_batches(), "gzip", lambda s: s, **KW)
    data, st = transform_blocks(_dense_batches(), "gzip", lambda s: s, group_bytes=1,
                                spill_dir=str(tmp_path / "spill"), spill_bytes=1, **KW)
    assert isinstance(data.blocks, SpilledTable)
    sink = open_sink(f"parquet://{tmp_path}/out", uuid="u", instance="seg")
    part = Partition("blocks", 0, 0, 512, 5)
    sink.prepare(RunInfo(run_id="r", uuid="u", instance="seg", partitions=[part],
                         options={"cell_limit": LIMIT}))
    flaky = _FailOnce(sink)
    try:
        write_with_backoff(flaky, "r", part, data, PartitionStats(part.key, "blocks", blocks=st.blocks,
                                                                  errors=st.errors))
    finally:
        close_tables(data)
    assert flaky.calls == 2
    want = cut_blocks(mem, "r", LIMIT)
    for t in ("blocks", "block_overflow"):
        assert sink.read(t, run_id="r").equals(want[t].combine_chunks()), t
    assert sink.ledger("r").column("blocks").to_pylist() == [5]
    assert list((tmp_path / "spill").iterdir()) == []


def test_failed_overflow_resort_leaves_no_file(tmp_path, monkeypatch):
    """Groups out of Morton order make the transform re-sort the spilled blocks into a new
    file; a failure while writing it (a full disk) leaves no spill file behind."""
    import errno

    from dvidetl.export.spill import TableSpill

    real_result = TableSpill.result

    def result_then_disk_full(self):
        out = real_result(self)
        if self.budget.limit == 0:  # the re-sort's own spill: its file is written, then fail
            raise OSError(errno.ENOSPC, "No space left on device")
        return out

    monkeypatch.setattr(TableSpill, "result", result_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        transform_blocks(_dense_batches((4, 2, 0, 3, 1)), "gzip", lambda s: s, group_bytes=1,
                         spill_dir=str(tmp_path), spill_bytes=1, **KW)
    assert list(tmp_path.iterdir()) == []
