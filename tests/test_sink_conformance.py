"""Every sink against the one contract (``dvidetl.testing.sink_tests``): Parquet, the
fault-injecting wrapper with its faults off, and VastDB through the real SDK against the
wire simulator. A raw-block sink (``needs = {"raw"}``) checks that the partition data
carries the unwrapped DVID bytes and the bodies a volume sink transcodes from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dvidetl.testing.env import environ
from dvidetl.testing.sink_tests import SinkTests, TabularSinkTests
from dvidetl.testing.vastsim import start_vastsim

ACCESS, SECRET = "conf-access", "conf-secret-not-real"
_n = itertools.count()


class TestParquet(TabularSinkTests):
    @pytest.fixture
    def sink_url(self, tmp_path):
        return f"parquet://{tmp_path}/out"


class TestFlakyParquetWithoutFaults(TabularSinkTests):
    @pytest.fixture
    def sink_url(self, tmp_path):
        return f"flaky+parquet://{tmp_path}/out?rate=0"


@pytest.fixture(scope="module")
def vast():
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as s:
            yield s


class TestVastDB(TabularSinkTests):
    @pytest.fixture
    def sink_url(self, vast):
        with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
            yield f"vastdb://127.0.0.1:{vast.port}/bucket/conf{next(_n)}"


def test_a_sink_that_needs_raw_blocks_gets_the_unwrapped_bytes(tmp_path, shared_data):
    """The partition task reads once and hands a sink that asks for ``raw`` the exact
    unwrapped DVID bytes with the blocks' bodies, next to a tabular sink in the same task:
    what a precomputed sink transcodes (``codec.cseg``) without reassembling cells."""
    from dvidetl.codec import unwrap
    from dvidetl.export.batch import BlockData
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.kinds import RunInfo
    from dvidetl.export.planning import make_plan
    from dvidetl.export.tasks import _SINKS, export_partition, task_context
    from dvidetl.flight.server import start_server
    from dvidetl.sinks import open_sink
    from dvidetl.sinks.parquet import ParquetSink
    from dvidetl.sources import open_source

    got = {}

    class RawSink(ParquetSink):
        needs = ParquetSink.needs | {"raw"}

        def write_partition(self, run_id, part, data, stats):
            assert isinstance(data, BlockData)
            got[part.key] = [b for b in data.batches()]
            super().write_partition(run_id, part, data, stats)

    src = open_source("synthetic://rawcheck?size=256,256,128&scales=1&seed=3")
    server = start_server(src)
    ep = FlightEndpoint(server.location, None, "rawcheck", None, server, src)
    try:
        parts = make_plan(ep.info, ep.client.count, [0], 8, indices=False, mapping=False, anomalies=False)
        run = RunInfo("r1", ep.info.uuid, ep.instance, parts, options={"cell_limit": 4096})
        raw_url, plain_url = f"parquet://{tmp_path}/raw", f"parquet://{tmp_path}/plain"
        ctx = task_context(run, ep, (raw_url, plain_url))
        _SINKS[(raw_url, ctx.uuid, ctx.instance)] = RawSink(tmp_path / "raw", uuid=ctx.uuid,
                                                            instance=ctx.instance, url=raw_url)
        plain = open_sink(plain_url, uuid=ctx.uuid, instance=ctx.instance)
        for u in (raw_url, plain_url):
            open_sink(u, uuid=ctx.uuid, instance=ctx.instance).prepare(run)
        for p in parts:
            st = export_partition(ctx, p)
            assert not st.skipped and plain.is_done("r1", p)
        assert set(got) == {p.key for p in parts}
        n = 0
        for p in parts:
            wire = {r["morton"]: r["data"] for b in ep.client.read_blocks(0, p.lo, p.hi)
                    for r in b.select(["morton", "data"]).to_pylist()}
            for t in got[p.key]:
                for r in t.select(["morton", "raw", "supervoxels", "labels"]).to_pylist():
                    assert r["raw"] == unwrap(wire[r["morton"]], ep.info.codec)
                    bodies = ep.client.map_supervoxels(np.asarray(r["supervoxels"], np.uint64))
                    assert r["labels"] == bodies.tolist()
                    n += 1
        assert n == sum(p.blocks for p in parts) > 0
        # the tabular sink of the same task stored the same blocks (read once, both written)
        assert plain.read("blocks", run_id="r1").num_rows == n
    finally:
        _SINKS.clear()
        ep.close()


def test_a_precomputed_only_partition_is_never_given_payloads(tmp_path):
    """``Sink.needs`` decides what the transform makes: a partition whose only sink is the
    volume gets the unwrapped blocks and no zstd payloads (half the transform's cost, which
    a volume never reads); with a tabular sink beside it the same task makes both, once."""
    import json

    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.kinds import RunInfo
    from dvidetl.export.planning import make_plan
    from dvidetl.export.tasks import _SINKS, export_partition, task_context
    from dvidetl.flight.server import start_server
    from dvidetl.sinks import open_sink
    from dvidetl.sinks.precomputed import PrecomputedSink
    from dvidetl.sources import open_source

    seen: list[tuple[str, ...]] = []

    class Capture(PrecomputedSink):
        def write_partition(self, run_id, part, data, stats):
            seen.append(tuple(data.schema.names))
            super().write_partition(run_id, part, data, stats)

    src = open_source("synthetic://needs?size=256,256,128&scales=1&seed=4")
    server = start_server(src)
    ep = FlightEndpoint(server.location, None, "needs", None, server, src)
    try:
        for i, extra in enumerate(((), (f"parquet://{tmp_path}/pq",))):
            vol = f"precomputed://{tmp_path}/vol{i}"
            cap = Capture(vol, uuid=ep.info.uuid, instance=ep.instance)
            parts = make_plan(ep.info, ep.client.count, [0], 8, indices=False, mapping=False, anomalies=False,
                              cells=cap.plan_cells(ep.info))
            run = RunInfo(f"r{i}", ep.info.uuid, ep.instance, parts, volume=json.loads(ep.info.to_json()))
            ctx = task_context(run, ep, (vol, *extra))
            _SINKS[(vol, ctx.uuid, ctx.instance)] = cap
            cap.prepare(run)
            for u in extra:
                open_sink(u, uuid=ctx.uuid, instance=ctx.instance).prepare(run)
            seen.clear()
            for p in parts:
                assert not export_partition(ctx, p).skipped and cap.is_done(run.run_id, p)
            assert len(seen) == len(parts) > 0
            want_payload = bool(extra)
            assert all(("payload" in names) == want_payload and "raw" in names for names in seen), seen
            assert list((tmp_path / f"vol{i}").rglob("*.shard"))
    finally:
        _SINKS.clear()
        ep.close()


class TestPrecomputed(SinkTests):
    """The common contract over the neuroglancer volume sink: real DVID blocks in (its
    ``raw``), its shards read back (chunk ids = Morton codes), shards of 64 chunks so the
    two partitions are two shards."""

    @pytest.fixture
    def sink_url(self, tmp_path):
        import json

        from dvidetl.codec.ngshard import derive_info
        from dvidetl.geometry import VolumeInfo
        from dvidetl.testing.sink_tests import VOLUME

        info = derive_info(VolumeInfo.from_json(json.dumps(VOLUME)).scales, (8, 8, 8),
                           preshift_bits=6, minishard_bits=0)
        (tmp_path / "spec.json").write_text(json.dumps(info))
        return f"precomputed://{tmp_path}/vol?spec={tmp_path / 'spec.json'}"

    def parts(self):
        from dvidetl.export.kinds import Partition

        return Partition("blocks", 0, 0, 64, 3), Partition("blocks", 0, 64, 128, 2)

    def blocks(self, mortons, **kw):
        import pyarrow as pa

        from dvidetl.codec import encode_block
        from dvidetl.geometry import morton_decode
        from dvidetl.testing.sink_tests import block_batch

        t = block_batch(mortons, **kw)
        x, y, z = morton_decode(t.column("morton").to_numpy(), (16, 16, 16))
        raw = []
        for table in t.column("supervoxels").to_pylist():
            vol = np.asarray(table, np.uint64)[np.arange(64 ** 3) % len(table)].reshape(64, 64, 64)
            raw.append(encode_block(vol, label_order=table))
        for name, v in (("x", x), ("y", y), ("z", z)):
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(v, pa.int32()))
        return t.append_column("raw", pa.array(raw, pa.binary()))

    def bytes_out(self, sink, run_id, part, handed):
        return sink.shard_path(run_id, part).stat().st_size

    def stored(self, sink, run_id):
        run = sink.load_run(run_id)
        return sorted(cid for p in run.partitions if p.kind == "blocks"
                      for cid in sink.read_chunks(run_id, p))


def test_the_default_storage_key_is_the_url_without_its_query(tmp_path):
    """``Sink.storage_key``'s default (VastDB's, and a plugin's that keeps it): the URL up to
    the first ``?``, so two sinks of one storage whose queries differ — even by a value that
    holds a ``?`` itself — are one storage, which a run refuses as two sinks."""
    from dvidetl.sinks import Sink, open_sink
    from dvidetl.sinks.parquet import ParquetSink

    class KeepsTheDefault(ParquetSink):  # a plugin built on the Parquet sink
        storage_key = Sink.storage_key

    plugin = KeepsTheDefault(tmp_path, uuid="u", instance="i", url="plug://store/x/?token=a?b&n=1")
    assert plugin.storage_key() == "plug://store/x"
    vast = [open_sink(u, uuid="u", instance="i").storage_key()
            for u in ("vastdb://h:9/b/s", "vastdb://h:9/b/s/?tries=2&timeout=5")]
    assert vast == ["vastdb://h:9/b/s"] * 2


def test_where_filters_keep_every_term_in_order():
    """``Sink.read``'s pushed-down predicates: one term per equality, two per range, every
    column's in the order given (a range after an equality keeps the equality)."""
    from dvidetl.sinks.base import where_filters

    names = ["scale", "morton", "label"]
    assert where_filters({"scale": 1, "morton": (4, 9)}, names) == [
        ("scale", "=", 1), ("morton", ">=", 4), ("morton", "<", 9)]
    assert where_filters({"morton": (0, 2), "scale": 3}, names) == [
        ("morton", ">=", 0), ("morton", "<", 2), ("scale", "=", 3)]
    assert where_filters(None, names) == []
    with pytest.raises(ValueError, match=r"^no column 'x' to filter on: columns are \['scale', 'morton', 'label'\]$"):
        where_filters({"x": 1}, names)


def test_block_data_for_a_keyed_partition_is_refused_naming_the_kind(tmp_path):
    """``Sink.check_data``: a keyed partition (label indices) handed block data is a
    programming error named in one line, before anything is written."""
    from dvidetl.export.batch import BlockData
    from dvidetl.export.kinds import Partition
    from dvidetl.sinks.parquet import ParquetSink
    from dvidetl.testing.sink_tests import block_batch

    sink = ParquetSink(tmp_path, uuid="u", instance="i")
    with pytest.raises(ValueError, match=r"^partition kind 'indices' does not write blocks$"):
        sink.check_data(Partition("indices", 0, 0, 100, 0, rows=3), BlockData(block_batch([1, 2])))


def test_a_sink_that_cannot_hold_rows_outside_refuses_to_remove_any_naming_itself(tmp_path):
    """``Sink.outside`` / ``remove_outside``'s defaults (a sink whose rows cannot lie outside
    its partitions, e.g. a plugin): nothing found, nothing removed; handed rows to remove
    anyway (a caller's error), it refuses in one line naming its class, before touching
    anything."""
    from dvidetl.export.kinds import Partition, RunInfo
    from dvidetl.sinks import Sink
    from dvidetl.sinks.base import Outside
    from dvidetl.sinks.parquet import ParquetSink

    class NoOutside(ParquetSink):  # a plugin built on the Parquet sink, keeping the defaults
        outside = Sink.outside
        remove_outside = Sink.remove_outside

    sink = NoOutside(tmp_path, uuid="u", instance="i", url=f"parquet://{tmp_path}")
    run = RunInfo("r", "u", "i", [Partition("blocks", 0, 0, 8, 1)])
    assert sink.outside(run, set()) == [] and sink.remove_outside(run, []) == 0
    stray = Outside("blocks", 3, "blocks scale 0 [8, 16): 3 rows", scale=0, lo=8, hi=16)
    with pytest.raises(NotImplementedError, match=r"^NoOutside cannot remove rows outside partitions$"):
        sink.remove_outside(run, [stray])
