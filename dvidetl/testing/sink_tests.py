"""The sink contract as tests, run over every sink (zarr's ``StoreTests``, fsspec's
``tests/abstract``): subclass :class:`TabularSinkTests` (a sink of tables) or
:class:`SinkTests` (any sink: what every sink must do, whatever it stores) in a test module
and give it a ``sink_url`` fixture (a fresh, empty export location per test); every test
here then runs against that sink. ``tests/test_sink_conformance.py`` runs the tabular suite
over ``parquet://``, ``flaky+parquet://`` (faults off: the wrapper must not change the
contract) and ``vastdb://`` (the VAST wire simulator with the real SDK), and the common one
over ``precomputed://`` (a volume: its hooks ``blocks`` / ``stored`` / ``parts`` hand it
real DVID blocks and read back its shards).

What it pins, through the public ``Sink`` interface only (common: the first three and
resume, the run's lifecycle; tabular: all):

* exactly once: a partition's rows and its ledger row appear together (``is_done``,
  ``done``, the ledger's figures from ``PartitionStats.to_ledger_row``);
* replace on rewrite: a later run writing the same partition replaces its rows;
* skip when done: what a retried task relies on (``is_done`` for the run, not another run);
* the typed partition data: ``BlockData`` is cut into cells for the run's cell limit and
  reassembles to exactly the blocks handed over; the keyed kinds' tables are stored as given;
* pushed-down reads (scale, Morton range, ``where`` equality and ranges, ``columns``);
* resume: a stored run loads back with its plan and options; unfinished partitions are not
  in ``done``;
* ``read_partition`` sees a partition's rows (of the run asked for); ``open_export`` finds
  the export by its URL;
* the run's lifecycle: ``finish`` supersedes earlier runs; a staged (``--overwrite``) run is
  read apart and becomes the latest run only when it finishes;
* a write that fails part way leaves nothing: no ledger row, nothing a reader sees.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dvidetl.export.batch import BLOCK_BATCH, FAILED_BLOCKS, BlockData
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
from dvidetl.export.options import RunOptions
from dvidetl.geometry import KEY_END
from dvidetl.read import open_export
from dvidetl.sinks import Sink, open_sink
from dvidetl.tables import schema as S
from dvidetl.tables.cells import reassemble

UUID, INSTANCE = "u-conf", "seg"
#: small enough that the payloads and label lists below overflow into block_overflow
CELL_LIMIT = 1024


def block_batch(mortons, *, payload_bytes: int = 100, labels: int = 3, scale: int = 0) -> pa.Table:
    """``BLOCK_BATCH`` rows for the given Morton codes: payloads of ``payload_bytes`` bytes
    and label tables of ``labels`` entries, all different per block."""
    m = np.asarray(list(mortons), np.uint64)
    n = len(m)
    sv = [[int(k) * 1000 + j + 1 for j in range(labels)] for k in m]
    return pa.table({
        "scale": pa.array(np.full(n, scale, np.uint8)),
        "x": pa.array(m.astype(np.int32)), "y": pa.array(np.zeros(n, np.int32)),
        "z": pa.array(np.zeros(n, np.int32)), "morton": pa.array(m),
        "supervoxels": pa.array(sv, pa.list_(pa.uint64())),
        "labels": pa.array([[v // 2 for v in s] for s in sv], pa.list_(pa.uint64())),
        "sv_voxels": pa.array([[7] * labels for _ in range(n)], pa.list_(pa.uint32())),
        "raw_size": pa.array(np.full(n, 4096, np.uint32)), "crc32": pa.array(np.arange(n, dtype=np.uint32)),
        "payload": pa.array([bytes([int(k) % 251]) * payload_bytes for k in m], pa.binary()),
    }, schema=BLOCK_BATCH)


def failed_blocks(mortons, scale: int = 0) -> pa.Table:
    m = np.asarray(list(mortons), np.uint64)
    n = len(m)
    return pa.table({
        "scale": pa.array(np.full(n, scale, np.uint8)), "x": pa.array(m.astype(np.int32)),
        "y": pa.array(np.zeros(n, np.int32)), "z": pa.array(np.zeros(n, np.int32)),
        "morton": pa.array(m), "stage": pa.array(["repack"] * n), "reason": pa.array(["corrupt"] * n),
        "data": pa.array([b"\x01" * 3000] * n, pa.binary()),
    }, schema=FAILED_BLOCKS)


def mapping(lo: int, n: int) -> pa.Table:
    sv = np.arange(lo, lo + n, dtype=np.uint64)
    return pa.table({"supervoxel": pa.array(sv), "body": pa.array(sv // np.uint64(10) + np.uint64(1))},
                    schema=S.MAPPING)


def stats(part: Partition, **figures) -> PartitionStats:
    return PartitionStats(part.key, part.kind, **figures)


#: the volume the contract's runs describe (scale-0 grid 16³): what a volume sink derives its
#: layout from (a tabular sink only stores it with the run)
VOLUME = {"uuid": UUID, "instance": INSTANCE, "codec": "gzip", "scales": [
    {"scale": 0, "block_size": [64, 64, 64], "grid": [16, 16, 16]}]}


class SinkTests:
    """What every sink must do, whatever it stores. Subclass with a ``sink_url`` fixture;
    a sink that does not store tables overrides the hooks ``parts``, ``blocks`` and
    ``stored`` (see the module docstring)."""

    @pytest.fixture
    def sink(self, sink_url):
        return open_sink(sink_url, uuid=UUID, instance=INSTANCE)

    @staticmethod
    def run(run_id: str, parts, **options) -> RunInfo:
        return RunInfo(run_id, UUID, INSTANCE, list(parts),
                       options=RunOptions.from_dict({"cell_limit": CELL_LIMIT, **options}), volume=VOLUME)

    # -- hooks: how the tests make blocks and see what a sink stored -------------------------
    def parts(self) -> tuple[Partition, Partition]:
        """Two blocks partitions of scale 0 that this sink can hold side by side (each
        holding Morton codes 1..9)."""
        return Partition("blocks", 0, 0, 100, 3), Partition("blocks", 0, 100, 200, 2)

    def blocks(self, mortons, **kw) -> pa.Table:
        """``BLOCK_BATCH`` rows (``block_batch``) for ``mortons`` — with ``raw`` for a sink
        that needs it."""
        return block_batch(mortons, **kw)

    def bytes_out(self, sink: Sink, run_id: str, part: Partition, handed: int) -> int:
        """The ledger's ``bytes_out`` of a partition whose stats said ``handed``: as handed
        for a tabular sink (the payloads it stores); a sink that writes another form (a
        volume's shard) records what it wrote."""
        return handed

    def stored(self, sink: Sink, run_id: str) -> list[int]:
        """The Morton codes of the blocks a reader of ``run_id`` sees, sorted."""
        return sorted(sink.read("blocks", run_id=run_id).column("morton").to_pylist())

    # -- exactly once, the ledger, resume ----------------------------------------------------
    def test_partition_and_ledger_row_appear_together(self, sink):
        a, b = self.parts()
        run = self.run("r1", [a, b])
        sink.prepare(run)
        assert sink.runs() == ["r1"] and sink.done("r1") == set() and not sink.is_done("r1", a)
        data = BlockData(self.blocks([1, 5, 9], payload_bytes=3000, labels=200), failed_blocks([7]), 3)
        sink.write_partition("r1", a, data, stats(a, blocks=3, errors=1, bytes_in=11, bytes_out=22,
                                                  raw_bytes=33))
        assert sink.is_done("r1", a) and not sink.is_done("r1", b) and sink.done("r1") == {a.key}
        led = sink.ledger("r1").to_pylist()
        assert len(led) == 1
        row = led[0]
        assert (row["run_id"], row["kind"], row["lo"], row["hi"], row["blocks"], row["errors"], row["bytes_in"],
                row["bytes_out"], row["raw_bytes"]) == ("r1", "blocks", a.lo, a.hi, 3, 1, 11,
                                                        self.bytes_out(sink, "r1", a, 22), 33)
        assert sink.ledger().column("run_id").to_pylist() == ["r1"]  # the ledger of every run says whose
        assert self.stored(sink, "r1") == [1, 5, 9]
        # resume: the stored run comes back with its plan and options
        back = sink.load_run("r1")
        assert back.partitions == [a, b] and back.options.cell_limit == CELL_LIMIT
        assert sink.latest_run() == "r1"

    def test_rewrite_replaces_rows_and_a_committed_partition_stays_done(self, sink):
        part, _ = self.parts()
        sink.prepare(self.run("r1", [part]))
        sink.write_partition("r1", part, BlockData(self.blocks([1, 2, 3])), stats(part, blocks=3))
        sink.prepare(self.run("r2", [part]))
        assert sink.is_done("r1", part) and not sink.is_done("r2", part)  # done per run
        sink.write_partition("r2", part, BlockData(self.blocks([2, 3, 4, 5])), stats(part, blocks=4))
        assert self.stored(sink, "r2") == [2, 3, 4, 5]
        assert sink.is_done("r2", part)
        # the same partition written again in its run: still its rows once
        sink.write_partition("r2", part, BlockData(self.blocks([2, 3, 4, 5])), stats(part, blocks=4))
        assert self.stored(sink, "r2") == [2, 3, 4, 5]
        assert sink.ledger("r2").num_rows == 1

    def test_a_write_that_fails_part_way_leaves_nothing(self, sink):
        part, _ = self.parts()
        sink.prepare(self.run("r1", [part]))
        good = self.blocks([1, 2, 3])

        def broken():
            yield good.slice(0, 2)
            raise ValueError("the stream broke")

        with pytest.raises(ValueError, match="the stream broke"):
            sink.write_partition("r1", part, BlockData(broken()), stats(part, blocks=3))
        assert not sink.is_done("r1", part) and sink.done("r1") == set()
        assert self.stored(sink, "r1") == []
        sink.write_partition("r1", part, BlockData(good), stats(part, blocks=3))  # the retry
        assert sink.is_done("r1", part) and self.stored(sink, "r1") == [1, 2, 3]


    # -- the run's lifecycle: finish, superseded runs, --overwrite staged until it finishes -----
    def staged(self, run: RunInfo) -> RunInfo:
        """``run`` as ``run --overwrite`` stores it: written apart until it finishes."""
        run.record.update(staged=True, state="running")
        return run

    def test_finish_supersedes_earlier_runs_and_a_staged_run_waits_for_it(self, sink):
        """``finish`` records the run finished and every run started before it — or at the
        same instant — superseded; ``finished_runs`` and ``latest_run`` follow. A staged run
        is read under its own run id while readers by default still see the export it
        replaces, until its ``finish``."""
        part, _ = self.parts()
        r1 = self.run("r1", [part])
        sink.prepare(r1)
        sink.write_partition("r1", part, BlockData(self.blocks([1, 2, 3])), stats(part, blocks=3))
        sink.finish(r1)
        assert sink.finished_runs() == ["r1"] and sink.latest_run() == "r1"
        # an --overwrite started at the same instant (a coarse clock): r1 stays current until r2 finishes
        r2 = self.staged(self.run("r2", [part]))
        r2.created = r1.created
        sink.prepare(r2)
        sink.write_partition("r2", part, BlockData(self.blocks([2, 3, 4, 5])), stats(part, blocks=4))
        assert sink.latest_run() == "r1" and sink.finished_runs() == ["r1"]
        assert self.stored(sink, "r2") == [2, 3, 4, 5] and self.stored(sink, "r1") == [1, 2, 3]
        sink.finish(sink.load_run("r2"))
        old = sink.load_run("r1")
        assert (old.state, old.record.get("superseded_by")) == ("superseded", "r2")
        assert sink.load_run("r2").state == "finished"
        assert sink.finished_runs() == ["r2"] and sink.latest_run() == "r2"
        assert self.stored(sink, "r2") == [2, 3, 4, 5]
        # a third run: r2 is superseded by it, r1 still names the run that replaced it
        r3 = self.staged(self.run("r3", [part]))
        r3.created = r2.created + 1
        sink.prepare(r3)
        sink.write_partition("r3", part, BlockData(self.blocks([7])), stats(part, blocks=1))
        sink.finish(sink.load_run("r3"))
        assert [(r, sink.load_run(r).record.get("superseded_by")) for r in ("r1", "r2")] == [("r1", "r2"), ("r2", "r3")]
        assert sink.finished_runs() == ["r3"] and self.stored(sink, "r3") == [7]

    def test_with_no_published_run_readers_see_the_newest(self, sink):
        """``latest_run``'s last resort: a sink whose only run is staged and unfinished (the
        export it was to replace is gone) shows that run rather than no export."""
        part, _ = self.parts()
        sink.prepare(self.staged(self.run("r1", [part])))
        sink.write_partition("r1", part, BlockData(self.blocks([1, 2])), stats(part, blocks=2))
        assert sink.finished_runs() == [] and sink.latest_run() == "r1"


class TabularSinkTests(SinkTests):
    """The contract of a sink that stores the export's tables (Parquet, VastDB): cells,
    the keyed kinds' tables, pushed-down reads, ``open_export``."""

    def test_block_data_is_cut_for_the_run_cell_limit_and_reassembles(self, sink):
        part = Partition("blocks", 0, 0, 100, 3)
        sink.prepare(self.run("r1", [part]))
        batch = block_batch([2, 4, 8], payload_bytes=5 * CELL_LIMIT + 17, labels=300)
        data = BlockData(pa.concat_tables([batch.slice(0, 2), batch.slice(2)]), failed_blocks([3]), 3)
        sink.write_partition("r1", part, data, stats(part, blocks=3, errors=1))
        blocks = sink.read("blocks", run_id="r1")
        for c in ("supervoxels", "labels", "sv_voxels", *S.PAYLOAD_COLUMNS):  # every cell in the limit
            col = blocks.column(c)
            sizes = [len(v) * (8 if c != "sv_voxels" else 4) if isinstance(v, list) else len(v)
                     for v in col.to_pylist() if v is not None]
            assert max(sizes, default=0) <= CELL_LIMIT, c
        r = reassemble(blocks, sink.read("block_overflow", run_id="r1")).sort_by("morton")
        want = batch.sort_by("morton")
        for c in ("morton", "supervoxels", "labels", "sv_voxels", "raw_size", "crc32", "payload"):
            assert r.column(c).to_pylist() == want.column(c).to_pylist(), c
        errs = sink.read("export_errors", run_id="r1")
        assert errs.num_rows == 3 and set(errs.column("morton").to_pylist()) == {3}  # 3000 B: 3 parts
        assert b"".join(errs.sort_by("part").column("data").to_pylist()) == b"\x01" * 3000

    # -- keyed kinds and pushed-down reads --------------------------------------------------
    def test_keyed_tables_and_pushed_down_reads(self, sink):
        b0, b1 = Partition("blocks", 0, 0, 64, 2), Partition("blocks", 1, 0, 8, 1)
        m0, m1 = Partition("mapping", 0, 0, 100, 0, 50), Partition("mapping", 0, 100, KEY_END - 1, 0, 30)
        sink.prepare(self.run("r1", [b0, b1, m0, m1]))
        sink.write_partition("r1", b0, BlockData(block_batch([3, 40])), stats(b0, blocks=2))
        sink.write_partition("r1", b1, BlockData(block_batch([5], scale=1)), stats(b1, blocks=1))
        sink.write_partition("r1", m0, {"mapping": mapping(0, 50)}, stats(m0, rows=50))
        sink.write_partition("r1", m1, {"mapping": iter(mapping(100, 30).to_batches(7))}, stats(m1, rows=30))
        assert sink.read("blocks", scale=1).column("morton").to_pylist() == [5]
        assert sink.read("blocks", scale=0, morton_range=(0, 10)).column("morton").to_pylist() == [3]
        t = sink.read("mapping", where={"supervoxel": (20, 110)}, columns=["body"])
        assert t.column_names == ["body"] and t.num_rows == 40
        assert sink.read("mapping", where={"supervoxel": 105}).to_pylist() == [{"supervoxel": 105, "body": 11}]
        assert sink.read("mapping").num_rows == 80
        assert sink.read_partition("r1", "mapping", m1).num_rows == 30
        assert {r["kind"]: r["rows"] for r in sink.ledger("r1").to_pylist() if r["kind"] == "mapping"} == \
            {"mapping": sink.ledger("r1").filter(pa.compute.equal(sink.ledger("r1").column("lo"), 100))
             .column("rows")[0].as_py()}
        with pytest.raises(ValueError, match="does not write"):
            sink.write_partition("r1", m0, {"blocks": S.empty("blocks")}, stats(m0))

    def test_read_partition_reads_the_run_asked_for(self, sink):
        """``read_partition`` (what ``verify`` reads) of a staged run's partition sees that
        run's rows, not those of the export readers see meanwhile — blocks and keyed kinds."""
        b, m = Partition("blocks", 0, 0, 100, 3), Partition("mapping", 0, 0, 1000, 0, 50)
        r1 = self.run("r1", [b, m])
        sink.prepare(r1)
        sink.write_partition("r1", b, BlockData(block_batch([1, 2, 3])), stats(b, blocks=3))
        sink.write_partition("r1", m, {"mapping": mapping(0, 50)}, stats(m, rows=50))
        sink.finish(r1)
        sink.prepare(self.staged(self.run("r2", [b, m])))
        sink.write_partition("r2", b, BlockData(block_batch([2, 3, 4, 5])), stats(b, blocks=4))
        sink.write_partition("r2", m, {"mapping": mapping(0, 20)}, stats(m, rows=20))
        assert sink.latest_run() == "r1"
        for run_id, blocks, pairs in (("r2", [2, 3, 4, 5], 20), ("r1", [1, 2, 3], 50)):
            assert sorted(sink.read_partition(run_id, "blocks", b).column("morton").to_pylist()) == blocks
            assert sink.read_partition(run_id, "mapping", m).num_rows == pairs

    def test_open_export_finds_it(self, sink, sink_url):
        part = Partition("blocks", 0, 0, 100, 1)
        sink.prepare(RunInfo("r1", UUID, INSTANCE, [part], options={"scales": [0], "cell_limit": CELL_LIMIT},
                             volume={"uuid": UUID, "instance": INSTANCE, "codec": "gzip", "scales": [
                                 {"scale": 0, "block_size": [64, 64, 64], "grid": [16, 16, 16]}]}))
        sink.write_partition("r1", part, BlockData(block_batch([1])), stats(part, blocks=1))
        ex = open_export(sink_url)
        assert (ex.instance, ex.uuid, ex.run_id) == (INSTANCE, UUID, "r1")
        assert ex.read("blocks").column("morton").to_pylist() == [1]
