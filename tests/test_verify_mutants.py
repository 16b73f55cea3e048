"""The oracle's tamper tests (``test_verify_tamper``) over an export made in this process,
and what mutation testing found they left open (issue 22 item 4).

Why a second module: ``make mutants`` runs a mutant's covering tests in a fresh child per
mutant, and the tamper module's export (a Dask cluster, the CLI) costs half a minute per
child. Here the same real parts — synthetic source, real Flight server over loopback, the
partition task (``export.tasks.export_partition``: read, repack, map, cut, commit), Parquet
files — run without a scheduler, so a child pays a few seconds. The Parquet tamper tests are
the tamper module's own functions, collected here against this module's fixtures; the
scheduler path stays covered by ``test_verify_tamper`` itself. The last section does the same
for verify's precomputed volume check, ``--repair`` and the several-sink pass.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dvidetl.codec.ngshard import Sharding, derive_info, read_shard, shard_bytes
from dvidetl.export.options import RunOptions
from dvidetl.geometry import KEY_END
from dvidetl.read.verify import DIFF_COUNTERS, verify, verify_export, verify_exports
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from tests import test_verify_tamper as T

SRC = T.SRC
UUID = T.UUID

# the tamper module's Parquet tests, run against the fixtures below
test_untampered_parquet_export_is_exact = T.test_untampered_parquet_export_is_exact
test_parquet_flip_one_payload_byte = T.test_parquet_flip_one_payload_byte
test_parquet_drop_duplicate_rows = T.test_parquet_drop_duplicate_rows
test_parquet_foreign_rows = T.test_parquet_foreign_rows
test_parquet_label_index_and_mapping = T.test_parquet_label_index_and_mapping
test_parquet_truncated_and_deleted_files = T.test_parquet_truncated_and_deleted_files
test_uncovered_ranges_are_exactly_the_plans_complement = T.test_uncovered_ranges_are_exactly_the_plans_complement
test_damaged_run_records_are_one_line_errors = T.test_damaged_run_records_are_one_line_errors
test_vastdb_tampered_blocks = T.test_vastdb_tampered_blocks
test_vastdb_tampered_index_and_mapping = T.test_vastdb_tampered_index_and_mapping


@pytest.fixture(scope="module")
def server(src):
    from dvidetl.flight.server import start_server

    with start_server(src) as s:
        yield s


@pytest.fixture(scope="module")
def flight(server):
    from dvidetl.flight.client import FlightClient

    with FlightClient(server.location, uuid=UUID) as c:
        yield c


def export_in_process(location: str, sink_url: str, partition_blocks: int = 16, uuid: str = UUID, **options):
    """A whole run as ``dvidetl run`` makes it (plan, record, every partition's task, finish),
    the tasks called here in turn instead of on a cluster. Returns the run."""
    from dvidetl.export.api import ExportRun
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.options import RunOptions
    from dvidetl.export.tasks import _SINKS, export_partition, task_context

    ep = FlightEndpoint(location, None, uuid, None)
    try:
        job = ExportRun(ep, sink_url, RunOptions(partition_blocks=partition_blocks, **options))
        run = job.new_run(job.plan())
        run.record.update(state="running")
        job.sink.prepare(run)
        ctx = task_context(run, ep, sink_url)
        try:
            for p in run.partitions:
                st = export_partition(ctx, p)
                assert not st.skipped
        finally:
            _SINKS.clear()
        job.sink.finish(run)
        return run
    finally:
        ep.close()


@pytest.fixture(scope="module")
def parquet_export(server, tmp_path_factory):
    d = tmp_path_factory.mktemp("pq") / "out"
    export_in_process(server.location, f"parquet://{d}")
    return d


@pytest.fixture
def pq_sink(parquet_export, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(parquet_export, d)
    return open_sink(f"parquet://{d}", uuid=UUID, instance="segmentation")


@pytest.fixture(scope="module")
def sim():
    from dvidetl.testing.env import environ
    from dvidetl.testing.vastsim import start_vastsim

    with environ(VASTDB_ACCESS_KEY=T.ACCESS, VASTDB_SECRET_KEY=T.SECRET):
        with start_vastsim(None, access_key=T.ACCESS, secret_key=T.SECRET) as s:
            yield s


@pytest.fixture
def vast_sink(request, server, sim):
    from dvidetl.testing.env import environ

    url = f"vastdb://127.0.0.1:{sim.port}/bucket/{request.node.name[5:40]}"
    with environ(VASTDB_ACCESS_KEY=T.ACCESS, VASTDB_SECRET_KEY=T.SECRET):
        export_in_process(server.location, url)
        yield open_sink(url, uuid=UUID, instance="segmentation")


def test_planning_says_what_it_counts(server):
    """The planning status line (``Planning.doing``) names what the source is counting now —
    the label indices' rows (which a generated volume builds first) or the mapping pairs —
    and each count's deadline grows with the blocks counted so far."""
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.options import RunOptions
    from dvidetl.export.planning import PLAN_S_PER_BLOCK, Planning
    from dvidetl.geometry import KEY_END

    ep = FlightEndpoint(server.location, None, UUID, None)
    try:
        p = Planning(ep, RunOptions())
        assert p.deadline() == float(ep.client.timeout)
        p._count(0, 6)
        assert p.doing == "counting the blocks of scale 0" and p.blocks > 100
        assert p.deadline() == float(ep.client.timeout) + PLAN_S_PER_BLOCK * p.blocks
        p._count_keys("indices", 48, 0, KEY_END)
        assert p.doing.startswith("counting label-index rows (the first count makes the source read")
        p._count_keys("mapping", 48, 0, KEY_END)
        assert p.doing == "counting mapping pairs"
        assert Planning(ep, RunOptions(plan_timeout=7)).deadline() == 7.0
    finally:
        ep.close()


def test_report_text_says_what_was_found(flight, pq_sink):
    """``VerifyReport.text`` (what ``dvidetl verify`` prints): an exact export says OK with
    its sizes; a tampered one says DIFFERENCES FOUND with each counter on its line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dvidetl.read.verify import VerifyReport, verify_export

    rep = verify_export(flight, pq_sink)
    lines = rep.text().splitlines()
    assert lines[0] == f"verify run {rep.run_id}: OK" and lines[1] == "  export vs source (0 differences):"
    assert lines[2] == (f"  blocks      {rep.blocks_source:,} in the source, {rep.blocks_checked:,} exported and "
                        "byte-exact checked; missing 0, extra 0, duplicated 0, different 0, in export_errors 0")
    assert lines[3] == f"  label_index {rep.index_rows:,} rows, 0 differences"
    assert lines[4] == f"  mapping     {rep.mapping_rows:,} rows, 0 differences" and len(lines) == 5

    f = T._file_with(pq_sink, "blocks", scale=1, min_rows=3)
    T._rewrite(f, lambda t: pa.concat_tables([t.slice(1), t.slice(2, 1)]))
    pq.write_table(pq.read_table(f).slice(0, 1), f.parent / "part-stray.parquet")
    rep = verify_export(flight, pq_sink)
    text = rep.text()
    assert text.startswith(f"verify run {rep.run_id}: DIFFERENCES FOUND\n  export vs source ({rep.differences} differences):")
    assert "missing 1, extra 0, duplicated 1, different 0" in text
    assert "  1 rows outside every partition of the run (plain readers see them)" in text
    assert all(f"  - {p}" in text for p in rep.problems)
    odd = VerifyReport(run_id="r", source_inconsistent=2, unreadable_files=0)
    assert odd.text().splitlines()[0] == ("verify run r: OK (the export equals the source; the source "
                                           "disagrees with itself, see below)")
    assert "  source vs itself: in 2 label range(s)" in odd.text()
    assert VerifyReport(run_id="r", unreadable_files=3).text().splitlines()[-1] == "  3 files cannot be read"
    assert VerifyReport(run_id="r", partitions_unfinished=2).text().splitlines()[-1] == \
        "  2 planned partitions are not committed"
    # a kind the export does not hold says why, in its own line
    bare = VerifyReport(run_id="r", not_exported={"indices": "not exported (no label index)",
                                                  "mapping": "not exported (no mapping)"}).text().splitlines()
    assert bare[3:5] == ["  label_index not exported (no label index)", "  mapping     not exported (no mapping)"]


def test_a_mapping_range_of_one_pair_exported_without_it(flight):
    """The smallest mapping difference: the source has one pair in the range, the export
    none — one difference, not an early "nothing to compare"."""
    from dvidetl.export.kinds import Partition
    from dvidetl.read.verify import VerifyReport, _compare_mapping
    from dvidetl.tables import schema as S

    sv = next(iter(flight.read_mapping(0, 1 << 63))).column("supervoxel")[0].as_py()
    part = Partition("mapping", 0, sv, sv + 1)
    rep = VerifyReport(run_id="r")
    _compare_mapping(flight, part, rep, S.empty("mapping"))
    assert rep.mapping_diffs == 1 and rep.mapping_rows == 0
    assert rep.problems == [f"mapping: supervoxel {sv}: exported None, source " + str(
        next(iter(flight.read_mapping(sv, sv + 1))).column("body")[0].as_py())]


@pytest.mark.parametrize("coord", ["x", "y", "z"])
def test_label_index_row_moved_to_another_block(flight, pq_sink, coord):
    """One label_index row moved to another block (only its x, y or z changed): two differences
    against the source (gone here, extra there), and the cross-check with the exported
    blocks sees its partition disagree — the row hash covers every coordinate."""
    import pyarrow as pa
    import pyarrow.compute as pc

    li = T._file_with(pq_sink, "label_index")
    old = T._rewrite(li, lambda t: t.set_column(t.schema.get_field_index(coord), coord, pc.if_else(
        pc.equal(pa.array(range(t.num_rows)), 0), pc.add(t.column(coord), 1).cast(t.schema.field(coord).type),
        t.column(coord))))
    r = old.slice(0, 1).to_pylist()[0]
    rep = T._verify(flight, pq_sink)
    assert T._counts(rep) == {"index_diffs": 2, "index_vs_blocks": 1}
    assert any(f"label {r['label']} supervoxel {r['supervoxel']}" in p for p in rep.problems)


def test_corrupt_source_blocks_are_export_errors_not_missing(tmp_path):
    """Blocks the source serves corrupt land in ``export_errors``: verify counts each once as
    such (by coordinates, with the reason), never as missing, and checks every other block."""
    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.read.verify import verify_export
    from dvidetl.sources import open_source
    from dvidetl.testing.corrupt import CorruptSource

    src = CorruptSource(open_source("synthetic://cv?size=256,256,128&scales=1&seed=2"), rate=0.1, seed=4)
    with start_server(src) as srv, FlightClient(srv.location, uuid="cv") as c:
        export_in_process(srv.location, f"parquet://{tmp_path}/out", uuid="cv")
        sink = open_sink(f"parquet://{tmp_path}/out", uuid="cv", instance="segmentation")
        rep = verify_export(c, sink)
        bad = sorted(m for (s, m) in src.corrupted if s == 0)
        assert len(bad) >= 2
        assert T._counts(rep) == {"export_errors": len(bad)}
        assert rep.blocks_checked == rep.blocks_source - len(bad)
        grid = c.info().scale(0).grid
        assert any(p.startswith(f"{T._where(0, bad[0], grid)}: in export_errors (") for p in rep.problems)


def test_a_scale0_block_tamper_marks_the_indices_it_feeds(flight, pq_sink):
    """One voxel count of an exported scale-0 block changed: the block is different, and the
    label_index cross-check (exact against the source, not against that block) names its
    indices partition as wrong too — both are what ``--repair`` redoes."""
    import pyarrow as pa

    f = T._file_with(pq_sink, "blocks", scale=0)
    part_of = {str(pq_sink.file_of("blocks", p)): p for p in pq_sink.load_run(pq_sink.latest_run()).partitions
               if p.kind == "blocks"}

    def bump(t):  # the first entry of a non-background label (label 0 is not indexed)
        v, lab = t.column("sv_voxels").to_pylist(), t.column("labels").to_pylist()
        i, j = next((i, j) for i, ls in enumerate(lab) for j, x in enumerate(ls or []) if x)
        v[i][j] += 1
        return t.set_column(t.schema.get_field_index("sv_voxels"), "sv_voxels", pa.array(v, t.schema.field("sv_voxels").type))

    T._rewrite(f, bump)
    rep = T._verify(flight, pq_sink)
    assert T._counts(rep) == {"mismatched": 1, "index_vs_blocks": 1}
    idx = [p.key for p in pq_sink.load_run(rep.run_id).partitions if p.kind == "indices"]
    assert rep.bad_partitions == {part_of[str(f)].key, *idx} and len(idx) == 1


def test_stored_anomalies_are_checked_against_the_source(tmp_path):
    """A source's anomalies (here a shard volume whose records map one supervoxel to two
    bodies) are stored with the run and verified row for row: as stored, no difference; one
    stored detail changed, exactly one, named by its number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.read.verify import verify_export
    from dvidetl.sources.shards import ShardsSource
    from tests.test_source_shards import _write_shard

    (tmp_path / "vol" / "s0").mkdir(parents=True)
    _write_shard(tmp_path / "vol" / "s0" / "0_0_0.arrow", [(0, 0, 0, [5, 6], [7, 6], b"a"), (1, 0, 0, [5], [8], b"b")])
    with start_server(ShardsSource(tmp_path / "vol")) as srv, FlightClient(srv.location) as c0:
        uuid = c0.info().uuid
        with FlightClient(srv.location, uuid=uuid) as c:
            export_in_process(srv.location, f"parquet://{tmp_path}/out", uuid=uuid)
            sink = open_sink(f"parquet://{tmp_path}/out", uuid=uuid, instance=c.info().instance)
            rep = verify_export(c, sink)
            assert rep.anomalies >= 1 and rep.anomaly_diffs == 0
            assert rep.anomaly_kinds.get("mapping_conflict") == 1, rep.anomaly_kinds
            run = sink.load_run(rep.run_id)
            p = next(p for p in run.partitions if p.kind == "anomalies")
            f = sink.file_of("source_anomalies", p)
            t = pq.read_table(f)
            seq = t.column("seq")[0].as_py()
            det = t.column("detail").to_pylist()
            det[0] = "not what the source says"
            pq.write_table(t.set_column(t.schema.get_field_index("detail"), "detail", pa.array(det, pa.string())), f)
            rep = verify_export(c, sink)
            assert rep.anomaly_diffs == 1 and sink.file_of("source_anomalies", p) == f
            assert any(x.startswith(f"source_anomalies seq {seq}: stored ") and "'not what the source says'" in x
                       for x in rep.problems), rep.problems
            assert p.key in rep.bad_partitions
            det[0] = None  # a stored null where the source has a value is a difference too
            pq.write_table(t.set_column(t.schema.get_field_index("detail"), "detail", pa.array(det, pa.string())), f)
            rep = verify_export(c, sink)
            assert rep.anomaly_diffs == 1
            assert any(x.startswith(f"source_anomalies seq {seq}: stored ") and x.count("None") == 1
                       for x in rep.problems), rep.problems


def test_overwrite_is_staged_and_published_at_finish(server, flight, tmp_path):
    """``run --overwrite`` into a finished export (here with another partition size): the
    new run is written apart and published by ``finish``; then a plain reader of the table
    directories sees exactly the new run's rows, the old run is superseded, nothing staged is
    left, verify finds the new run exact, and the ledger of all runs holds both runs'."""
    import pyarrow.parquet as pq

    from dvidetl.read.verify import verify_export
    from dvidetl.sinks.parquet import STAGING, SUPERSEDED

    url = f"parquet://{tmp_path}/out"
    old = export_in_process(server.location, url, partition_blocks=16)
    new = export_in_process(server.location, url, partition_blocks=32, overwrite=True)
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    rec = sink.load_run(new.run_id).record
    assert rec["staged"] is True and rec["published"] is True and rec["state"] == "finished"
    assert sink.load_run(old.run_id).state == "superseded" and sink.latest_run() == new.run_id
    assert not list((sink.root / STAGING).glob("*/*")) and not list((sink.root / SUPERSEDED).glob("*/*"))
    rep = verify_export(flight, sink)
    assert rep.ok and rep.run_id == new.run_id, rep.text()
    plain = pq.read_table(sink.root / "blocks", columns=["scale", "morton"])
    assert plain.num_rows == rep.blocks_checked == len(set(zip(plain.column("scale").to_pylist(),
                                                              plain.column("morton").to_pylist(), strict=True)))
    assert sink.ledger().num_rows == len(old.partitions) + len(new.partitions)
    assert {str(f) for f in sink.committed_files("blocks")} == {
        str(sink.file_of("blocks", p)) for p in new.partitions if p.kind == "blocks" and sink.file_of("blocks", p).exists()}
    p0 = next(p for p in new.partitions if p.kind == "blocks" and sink.file_of("blocks", p).exists())
    assert sink.committed_files("blocks", scale=p0.scale, morton_range=(p0.lo, p0.lo + 1)) == [sink.file_of("blocks", p0)]


def test_vastdb_rows_outside_every_partition_are_found_and_finish_removes_them(flight, vast_sink):
    """VastDB: a row at a scale above every planned one is outside every partition (a plain
    reader sees it): verify counts it with the scales named, and ``finish`` (idempotent, as a
    resumed run calls it) removes exactly it."""
    import pyarrow as pa

    from dvidetl.read.verify import verify_export
    from dvidetl.sinks.vastdb import _col
    from dvidetl.testing.env import environ

    s = vast_sink
    with environ(VASTDB_ACCESS_KEY=T.ACCESS, VASTDB_SECRET_KEY=T.SECRET):
        m = s.read("blocks", scale=1, columns=["morton"]).column("morton")[0].as_py()
        T._vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == m),
                lambda t: pa.concat_tables([t, t.set_column(0, "scale", pa.array([7], pa.uint8()))]))
        run = s.load_run(s.latest_run())
        found = s.outside(run, s.done(run.run_id))
        assert [(o.table, o.rows, o.scales_above) for o in found] == [("blocks", 1, True)]
        rep = T._verify(flight, s)
        assert T._counts(rep) == {"outside_rows": 1} and any("scales >= " in p for p in rep.problems), rep.problems
        n = s.read("blocks").num_rows
        s.finish(run)
        assert s.read("blocks").num_rows == n - 1 and verify_export(flight, s).ok
        assert s.load_run(run.run_id).record["removed_at_finish"] == {"outside": 1, "outside_rows": 1}
        p = next(p for p in run.partitions if p.kind == "mapping")
        s.forget(run.run_id, p)  # what --repair does before it redoes a partition
        assert not s.is_done(run.run_id, p) and s.done(run.run_id) == {q.key for q in run.partitions} - {p.key}


# ---------------------------------------------------------------------------------------------
# verify's precomputed volume check, --repair and the several-sink pass (never measured by
# the mutation runs before: their own tests, test_sink_precomputed, test_multisink and the
# tamper module's repair tests, export through the CLI onto a TCP cluster). The same real
# parts here: a synthetic source behind a real Flight server (its reads counted, to see each
# partition read once), the partition task, the real Parquet and precomputed sinks, and — for
# --repair, which re-exports through the driver — a Dask scheduler with one worker thread in
# this process (no worker process, no TCP: a tenth of a second to start).
# ---------------------------------------------------------------------------------------------

VSRC = "synthetic://vr?size=200,150,140&scales=2&seed=6"
VUUID = "vr"
#: small shards (2^(2+1) = 8 chunks): scale 0 (a 4 x 3 x 3 block grid) has several
VSHARD = {"preshift_bits": 2, "minishard_bits": 1}


class Counted:
    """The source served as it is, each read of a range (blocks, label indices, mapping)
    counted — what the Flight server asks it once per partition a reader reads."""

    def __init__(self, src):
        self.calls: Counter = Counter()
        self._lock = threading.Lock()
        for name in ("read_blocks", "read_indices", "read_mapping"):
            self._count(src, name)

    def _count(self, src, name: str) -> None:
        real = getattr(src, name)

        def counted(*args):
            # read_mapping(): every pair, as a partition over all supervoxels says it
            key = tuple(int(a) for a in args[:3]) or (0, KEY_END - 1)
            with self._lock:
                self.calls[(name, *key)] += 1
            return real(*args)

        setattr(src, name, counted)  # the instance's method: what the server calls

    def take(self) -> Counter:
        with self._lock:
            got, self.calls = self.calls, Counter()
        return got


@pytest.fixture(scope="module")
def vsource():
    from dvidetl.flight.server import start_server

    src = open_source(VSRC)
    blocks = {s.scale: sum(b.num_rows for b in src.read_blocks(s.scale, 0, KEY_END)) for s in src.info().scales}
    counted = Counted(src)
    with start_server(src) as srv:
        yield srv, counted, blocks
    src.close()


@pytest.fixture(scope="module")
def vflight(vsource):
    from dvidetl.flight.client import FlightClient

    with FlightClient(vsource[0].location, uuid=VUUID) as c:
        yield c


@pytest.fixture(scope="module")
def dask():
    """A scheduler and one worker thread in this process (what ``--repair`` re-exports on)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \
            Client(c) as client:
        yield client


def _spec(d: Path) -> Path:
    info = derive_info(open_source(VSRC).info().scales, (8, 8, 8), **VSHARD)
    f = d / "spec.json"
    f.write_text(json.dumps(info))
    return f


@pytest.fixture(scope="module")
def volume(vsource, tmp_path_factory):
    """A precomputed export of the source (bodies), made in this process."""
    d = tmp_path_factory.mktemp("vol")
    export_in_process(vsource[0].location, f"precomputed://{d / 'vol'}?spec={_spec(d)}", uuid=VUUID)
    return d


@pytest.fixture
def vol(volume, tmp_path):
    """A copy of the volume export to tamper with: (its sink, the run)."""
    shutil.copytree(volume, tmp_path / "c")
    sink = open_sink(f"precomputed://{tmp_path / 'c' / 'vol'}?spec={tmp_path / 'c' / 'spec.json'}",
                     uuid=VUUID, instance="segmentation")
    return sink, sink.load_run(sink.latest_run())


def _counts(rep) -> dict[str, int]:
    return {k: getattr(rep, k) for k in DIFF_COUNTERS if getattr(rep, k)}


def _shards(sink, run, scale: int = 0) -> list:
    """(partition, its shard file) of every blocks partition of ``scale`` that wrote one."""
    return [(p, sink.shard_path(run.run_id, p)) for p in run.partitions
            if p.kind == "blocks" and p.scale == scale and sink.shard_path(run.run_id, p).exists()]


def _rewrite_shard(sink, scale: int, f: Path, fn) -> dict[int, bytes]:
    """The shard's chunks (decoded from their gzip), changed by ``fn``, written back as a
    whole valid shard (a tamper only the chunks' contents can show); returns the chunks it held."""
    sh: Sharding = sink.sharding(scale)
    chunks = read_shard(f.read_bytes(), sh)
    new = fn(dict(chunks))
    f.write_bytes(shard_bytes(list(new), list(new.values()), sh))
    return chunks


# -- the volume check: every chunk decoded and compared voxel for voxel -------------------


def test_volume_export_is_exact_chunk_for_chunk(vsource, vflight, vol):
    """The untampered volume: every source block checked (all its chunks decoded and equal
    to the mapped source block), nothing else; the report says it was a volume check and
    that the tables were not exported."""
    _, _, blocks = vsource
    sink, run = vol
    rep = verify_export(vflight, sink)
    assert rep.ok and rep.volume, rep.text()
    assert rep.blocks_source == rep.blocks_checked == sum(blocks.values())
    assert set(rep.not_exported) == {"indices", "mapping"}
    assert f"{rep.blocks_checked:,} exported and voxel-exact checked" in rep.text()


def test_volume_tampers_each_move_their_counter(vflight, vol):
    """One chunk's stored byte flipped, one chunk dropped from a valid shard, one foreign
    chunk added to another, one shard deleted: mismatched 1, missing 1, extra 1,
    unreadable_files 1 — the four partitions named, nothing else."""
    sink, run = vol
    shards = _shards(sink, run)
    assert len(shards) >= 4
    sh = sink.sharding(0)
    (p_flip, f_flip), (p_drop, f_drop), (p_add, f_add), (p_del, f_del) = shards[:4]

    data = bytearray(f_flip.read_bytes())
    data[sh.index_size + 15] ^= 0x55  # inside the shard's first chunk
    f_flip.write_bytes(bytes(data))
    dropped = max(read_shard(f_drop.read_bytes(), sh))
    _rewrite_shard(sink, 0, f_drop, lambda c: {k: v for k, v in c.items() if k != dropped})
    # a chunk of another shard's source block, stored in this shard: no block of this one
    foreign = min(read_shard(f_del.read_bytes(), sh))
    _rewrite_shard(sink, 0, f_add, lambda c: {**c, foreign: read_shard(f_del.read_bytes(), sh)[foreign]})
    f_del.unlink()

    rep = verify_export(vflight, sink)
    assert _counts(rep) == {"mismatched": 1, "missing": 1, "extra": 1, "unreadable_files": 1}, rep.text()
    assert rep.bad_partitions == {p_flip.key, p_drop.key, p_add.key, p_del.key}
    # the flipped and the dropped chunk's blocks, and every block of the deleted shard's partition
    assert rep.blocks_checked == rep.blocks_source - 2 - _blocks_of(vflight, p_del)
    assert any(p.endswith(f"(chunk {dropped}): in the source but its chunk is not in the shard")
               for p in rep.problems), rep.problems
    assert f"{f_add}: chunk {foreign} is not a block of the source in {p_add.where('blocks')}" in rep.problems
    assert any(p.startswith(f"{f_del} (partition {p_del.key}): missing: the ledger says") for p in rep.problems)


def _blocks_of(vflight, part) -> int:
    """Source blocks of a partition (its shard's chunks, all-background ones included)."""
    return sum(b.num_rows for b in vflight.read_blocks(part.scale, part.lo, part.hi))


def test_a_shard_whose_source_range_is_now_empty_holds_only_extra_chunks(vflight, vol):
    """The volume check of a partition whose source range holds no block (the source lost
    them since the export): every chunk its shard holds is extra, named by its integer id,
    and nothing is compared."""
    from dvidetl.read.verify import VerifyReport, _compare_volume, _ledger_env
    from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA

    sink, run = vol
    p, f = _shards(sink, run)[0]
    held = sorted(read_shard(f.read_bytes(), sink.sharding(0), decode=False))
    chunks = sink.read_chunks(run.run_id, p)
    _, env = _ledger_env(vflight, sink, run, [p], [])
    rep = VerifyReport(run_id=run.run_id)
    _compare_volume(vflight, sink, p, env, rep, BLOCKS_WIRE_SCHEMA.empty_table(), chunks,
                    sink.read("export_errors", run_id=run.run_id).slice(0, 0))
    assert _counts(rep) == {"extra": len(held)} and rep.blocks_checked == 0 and len(held) >= 2
    assert rep.problems == [f"{f}: chunk {c} is not a block of the source in {p.where('blocks')}" for c in held]


# -- several sinks: one pass over the source; --repair redoes a partition once for all -------


@pytest.fixture(scope="module")
def two_sinks(vsource, dask, tmp_path_factory):
    """One run into a Parquet export and a precomputed volume of supervoxel ids (the source
    read once per partition), exported on the in-process scheduler; returns the export's
    directory. (The ``volume`` fixture's volume holds bodies: both branches are checked.)"""
    from dvidetl.export.api import export

    d = tmp_path_factory.mktemp("two")
    res = export(vsource[0].location, [f"parquet://{d / 'pq'}",
                                       f"precomputed://{d / 'vol'}?spec={_spec(d)}&supervoxels=true"],
                 RunOptions(partition_blocks=16), uuid=VUUID, cluster=dask)
    assert res.ok
    return d


@pytest.fixture
def both(two_sinks, tmp_path):
    """A copy of the two-sink export to tamper with: (the two URLs, their sinks, the run)."""
    d = tmp_path / "two"
    shutil.copytree(two_sinks, d)
    urls = [f"parquet://{d / 'pq'}", f"precomputed://{d / 'vol'}?spec={d / 'spec.json'}&supervoxels=true"]
    sinks = [open_sink(u, uuid=VUUID, instance="segmentation") for u in urls]
    return urls, sinks, sinks[0].load_run(sinks[0].latest_run())


def _reads(calls: Counter, run) -> Counter:
    """Source reads per partition key (blocks by scale and range; indices, mapping by range)."""
    by = {("read_blocks", p.scale, p.lo, p.hi) if p.kind == "blocks" else
          (f"read_{'indices' if p.kind == 'indices' else 'mapping'}", p.lo, p.hi): p.key
          for p in run.partitions if p.kind in ("blocks", "indices", "mapping")}
    return Counter({by[k]: n for k, n in calls.items() if k in by})


def test_two_sinks_are_verified_in_one_pass_in_this_process(vsource, both):
    """``verify`` of two sinks without a cluster: one report each (the volume's a volume
    check), every partition read from the source exactly once for both, the checks run in
    this process (no worker process is started), progress after every partition over one
    merged report, and each sink's record holds its outcome."""
    _, counted, blocks = vsource
    urls, sinks, run = both
    parts = [p for p in run.partitions if p.kind in ("blocks", "indices", "mapping")]
    seen = []
    before = set(multiprocessing.active_children())  # other modules' clusters may still run

    def progress(rep, n, todo):
        assert set(multiprocessing.active_children()) <= before  # checked here, not on a cluster
        seen.append((n, len(todo), rep.blocks_source))

    counted.take()
    reps = verify(vsource[0].location, urls, uuid=VUUID, progress=progress)
    assert [r.ok for r in reps] == [True, True], [r.text() for r in reps]
    pq_rep, vol_rep = reps
    assert not pq_rep.volume and vol_rep.volume and pq_rep.run_id == vol_rep.run_id == run.run_id
    assert pq_rep.blocks_checked == vol_rep.blocks_checked == sum(blocks.values())
    assert pq_rep.index_rows > 0 and pq_rep.mapping_rows > 0 and vol_rep.index_rows == vol_rep.mapping_rows == 0
    reads = _reads(counted.take(), run)
    assert reads == Counter({p.key: 1 for p in parts})
    # progress: before the first partition and after each (counted once for both sinks)
    assert seen == [(n, len(run.partitions), b) for n, (_, _, b) in enumerate(seen)]
    assert len(seen) == len(run.partitions) + 1 and seen[0][2] == 0 and seen[-1][2] == sum(blocks.values())
    for s, r in zip(sinks, reps, strict=True):
        rec = s.load_run(run.run_id).record["verify"]
        assert rec["exact"] is True and rec["counters"] == r.counters() and "repaired" not in rec


def test_a_sink_without_a_run_is_reported_not_checked(vflight, tmp_path):
    """``verify_exports`` over a sink that holds no run: its report says so, naming the
    sink and the export, and nothing is checked."""
    url = f"parquet://{tmp_path / 'empty'}"
    (rep,) = verify_exports(vflight, [open_sink(url, uuid=VUUID, instance="segmentation")])
    assert rep.problems == [f"no run found in {url} for segmentation@{VUUID}"]
    assert rep.run_id is None and rep.blocks_source == 0


def test_repair_of_two_sinks_redoes_each_partition_once_for_both(vsource, dask, both):
    """``verify --repair`` over two sinks of one run: the scale-1 partition both lack (its
    Parquet file and its shard deleted) is read once to re-export it into both, a scale-0
    shard with a flipped chunk only into the volume; each sink is told what is redone (its
    URL first), only the redone partitions are checked again (the label indices, which no
    scale-1 block feeds, are not re-read), and both sinks end exact with the repair in
    their record."""
    _, counted, _ = vsource
    urls, (pq_sink, vol_sink), run = both
    p1 = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 1)
    pq_sink.file_of("blocks", p1).unlink()
    vol_sink.shard_path(run.run_id, p1).unlink()
    p0, f0 = _shards(vol_sink, run)[1]
    data = bytearray(f0.read_bytes())
    data[vol_sink.sharding(0).index_size + 15] ^= 0x55
    f0.write_bytes(bytes(data))
    said: list[str] = []
    counted.take()
    reps = verify(vsource[0].location, urls, uuid=VUUID, repair=True, cluster=dask, say=said.append)
    assert [r.ok for r in reps] == [True, True], [r.text() for r in reps]
    assert said == [f"{urls[0]}: re-exporting 1 partitions found wrong",
                    f"{urls[1]}: re-exporting 2 partitions found wrong"]
    assert [r.repaired for r in reps] == [
        {"partitions": [p1.key], "rows_removed": 0, "failed": []},
        {"partitions": sorted([p0.key, p1.key]), "rows_removed": 0, "failed": []}]
    assert all(r.before_repair.startswith(f"verify run {run.run_id}: DIFFERENCES FOUND") for r in reps)
    # checked, re-exported once for both sinks, checked again; everything else read once
    reads = _reads(counted.take(), run)
    assert reads == Counter({p.key: (3 if p.key in (p0.key, p1.key) else 1) for p in run.partitions
                             if p.kind in ("blocks", "indices", "mapping")})
    for s, r in zip((pq_sink, vol_sink), reps, strict=True):
        rec = s.load_run(run.run_id).record["verify"]
        assert rec["exact"] is True and rec["repaired"] == r.repaired
    fresh = verify(vsource[0].location, urls, uuid=VUUID)
    assert [r.ok for r in fresh] == [True, True]


def test_an_undecodable_chunk_is_one_mismatched_block(vflight, vol):
    """A chunk whose stored bytes are a valid gzip member of what is not compressed
    segmentation: one mismatched block, named with why (not a crash, not unreadable)."""
    sink, run = vol
    p, f = _shards(sink, run)[0]
    cid = min(read_shard(f.read_bytes(), sink.sharding(0)))
    _rewrite_shard(sink, 0, f, lambda c: {**c, cid: b"\x07" * 5})
    rep = verify_export(vflight, sink)
    assert _counts(rep) == {"mismatched": 1} and rep.bad_partitions == {p.key}, rep.text()
    assert any(f"(chunk {cid}): the chunk cannot be decoded (" in x for x in rep.problems), rep.problems
    assert rep.blocks_checked == rep.blocks_source - 1


def test_source_blocks_that_no_longer_parse_are_mismatched(vflight, vol):
    """The volume checked against the source as it answers now, some of its blocks corrupt
    (``testing.corrupt``): each such block is one mismatched block, named as the source's
    fault; every other block is checked exact."""
    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.testing.corrupt import CorruptSource

    sink, _ = vol
    src = CorruptSource(open_source(VSRC), rate=0.15, seed=3)
    with start_server(src) as srv, FlightClient(srv.location, uuid=VUUID) as c:
        rep = verify_export(c, sink)
    bad = sorted(src.corrupted)
    assert len(bad) >= 2 and _counts(rep) == {"mismatched": len(bad)}, rep.text()
    assert sum("the source block does not parse now" in x for x in rep.problems) == min(len(bad), 10)
    assert rep.blocks_checked == rep.blocks_source - len(bad)


@pytest.fixture(scope="module")
def small_volume(vsource, tmp_path_factory):
    """A volume exported with a spec smaller than the source's scale-0 block grid (x: 150
    voxels, 3 of the 4 block columns, the same Morton bits): the blocks past it go to
    export_errors."""
    d = tmp_path_factory.mktemp("small")
    info = derive_info(open_source(VSRC).info().scales, (8, 8, 8), **VSHARD)
    info["scales"][0]["size"] = [150, 150, 140]
    (d / "spec.json").write_text(json.dumps(info))
    export_in_process(vsource[0].location, f"precomputed://{d / 'vol'}?spec={d / 'spec.json'}", uuid=VUUID)
    return d


def test_blocks_past_the_volume_are_export_errors_and_one_dropped_is_missing(vflight, small_volume, tmp_path):
    """Blocks the volume cannot hold are export_errors (each counted as such, never
    missing); one of them dropped from export_errors is then missing, named as outside the
    info's volume."""
    from tests.test_verify_tamper import _rewrite

    shutil.copytree(small_volume, tmp_path / "c")
    sink = open_sink(f"precomputed://{tmp_path / 'c' / 'vol'}?spec={tmp_path / 'c' / 'spec.json'}",
                     uuid=VUUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    bx = np.concatenate([b.column("x").to_numpy() for b in vflight.read_blocks(0, 0, KEY_END)])
    outside = int((bx >= 3).sum())
    rep = verify_export(vflight, sink)
    assert outside >= 2 and _counts(rep) == {"export_errors": outside}, rep.text()
    assert rep.blocks_checked == rep.blocks_source - outside
    p = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 0
             and sink.file_of("export_errors", p).exists())
    old = _rewrite(sink.file_of("export_errors", p), lambda t: t.slice(1))
    x, y, z = (old.column(k)[0].as_py() for k in ("x", "y", "z"))
    rep = verify_export(vflight, sink)
    assert _counts(rep) == {"export_errors": outside - 1, "missing": 1}, rep.text()
    assert any(x_.startswith(f"scale 0 block ({x}, {y}, {z}) (chunk ") and
               x_.endswith(": outside the info's volume, not in export_errors") for x_ in rep.problems)


def test_verify_refuses_what_it_cannot_do_in_one_line(vsource, tmp_path):
    """``verify --repair --scales`` (repair checks the whole export) and a sink without a
    run: one-line errors naming what to do."""
    from dvidetl.errors import UserError

    with pytest.raises(UserError, match=r"^--repair checks the whole export: drop --scales$"):
        verify(vsource[0].location, f"parquet://{tmp_path / 'x'}", uuid=VUUID, repair=True, scales=(0,))
    url = f"parquet://{tmp_path / 'empty'}"
    with pytest.raises(UserError) as e:
        verify(vsource[0].location, url, uuid=VUUID)
    assert str(e.value) == (f"no run found in {url} for segmentation@{VUUID}: nothing to verify "
                            "(export it first with `dvidetl run`)")


def test_verify_on_a_cluster_checks_each_partition_in_one_task_for_both_sinks(vsource, dask, both):
    """``verify`` with a cluster: one task per partition of the run (for both sinks), the
    source still read once per partition, both sinks exact — the volume's chunks hold
    supervoxel ids (``supervoxels=true``), and they are checked as such."""
    from distributed import get_task_stream

    _, counted, blocks = vsource
    urls, (_, vol_sink), run = both
    assert vol_sink.supervoxels
    counted.take()
    with get_task_stream(dask) as ts:
        reps = verify(vsource[0].location, urls, uuid=VUUID, cluster=dask)
    assert [r.ok for r in reps] == [True, True], [r.text() for r in reps]
    assert reps[1].blocks_checked == sum(blocks.values())
    prefix = f"verify-{run.run_id}-"
    tasks = sorted(t["key"][len(prefix):-5] for t in ts.data if str(t["key"]).startswith(prefix))
    assert tasks == sorted(p.key for p in run.partitions)
    assert _reads(counted.take(), run) == Counter({p.key: 1 for p in run.partitions
                                                   if p.kind in ("blocks", "indices", "mapping")})


def test_an_all_background_block_has_no_chunk_and_is_checked(tmp_path):
    """A source block whose voxels are all 0 (a shard volume's record; the synthetic source
    never makes one): the volume stores no chunk for it (readers return 0 there) and verify
    counts it checked, not missing; the other block's chunk dropped is the one missing."""
    import zstandard

    from dvidetl.codec.block import encode_block
    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server
    from dvidetl.sources.shards import ShardsSource
    from tests.test_source_shards import _write_shard

    (tmp_path / "vol" / "s0").mkdir(parents=True)
    zc = zstandard.ZstdCompressor()
    fg = np.full((64, 64, 64), 5, np.uint64)
    fg[:32] = 6
    _write_shard(tmp_path / "vol" / "s0" / "0_0_0.arrow",
                 [(0, 0, 0, [0], [0], zc.compress(encode_block(np.zeros((64, 64, 64), np.uint64)))),
                  (1, 0, 0, [5, 6], [9, 9], zc.compress(encode_block(fg)))])
    with start_server(ShardsSource(tmp_path / "vol")) as srv, FlightClient(srv.location) as c0:
        uuid = c0.info().uuid
        with FlightClient(srv.location, uuid=uuid) as c:
            url = f"precomputed://{tmp_path}/out"
            run = export_in_process(srv.location, url, uuid=uuid)
            sink = open_sink(url, uuid=uuid, instance=c.info().instance)
            p = next(p for p in run.partitions if p.kind == "blocks")
            f = sink.shard_path(run.run_id, p)
            assert len(read_shard(f.read_bytes(), sink.sharding(0))) == 1  # the background block's: none
            rep = verify_export(c, sink)
            assert rep.ok and rep.blocks_source == rep.blocks_checked == 2, rep.text()
            _rewrite_shard(sink, 0, f, lambda ch: {})
            rep = verify_export(c, sink)
            assert _counts(rep) == {"missing": 1} and rep.blocks_checked == 1, rep.text()
            assert rep.problems[0].startswith("scale 0 block (1, 0, 0) (chunk ")


def test_index_rows_from_blocks_take_ids_past_2_63_and_leave_out_background():
    """The cross-check's label_index rows built from exported blocks: one row per (label,
    supervoxel, block) with its voxels summed, background (label 0) left out, and ids of 2**63
    and more (DVID's ids are uint64) kept, not refused by a signed comparison."""
    import pyarrow as pa

    from dvidetl.read.verify import _index_rows_from_blocks

    big = 2**63 + 5
    blocks = pa.table({
        "x": pa.array([1, 2], pa.int32()), "y": pa.array([0, 0], pa.int32()), "z": pa.array([0, 0], pa.int32()),
        "morton": pa.array([1, 2], pa.uint64()),
        "supervoxels": pa.array([[7, 8, 9], [big]], pa.list_(pa.uint64())),
        "labels": pa.array([[0, big, big], [big]], pa.list_(pa.uint64())),
        "sv_voxels": pa.array([[10, 20, 30], [40]], pa.list_(pa.uint32())),
    })
    got = _index_rows_from_blocks(blocks).sort_by([("morton", "ascending"), ("supervoxel", "ascending")])
    assert [(r["label"], r["supervoxel"], r["x"], r["voxels_sum"]) for r in got.to_pylist()] == [
        (big, 8, 1, 20), (big, 9, 1, 30), (big, big, 2, 40)]


def test_partitions_not_committed_are_each_named_with_their_range(flight, pq_sink):
    """A run whose ledger lacks a blocks and a mapping partition: ``verify`` counts both as
    not committed and names each, a blocks partition with its scale and Morton range."""
    run = pq_sink.load_run(pq_sink.latest_run())
    blocks = next(p for p in run.partitions if p.kind == "blocks")
    mapping = next(p for p in run.partitions if p.kind == "mapping")
    for p in (blocks, mapping):
        pq_sink.forget(run.run_id, p)
    rep = T._verify(flight, pq_sink)
    assert rep.partitions_unfinished == 2
    assert f"partition {blocks.key} (scale {blocks.scale} morton [{blocks.lo}, {blocks.hi})) not committed" \
        in rep.problems
    assert f"partition {mapping.key} not committed" in rep.problems


def test_source_blocks_outside_every_planned_partition_are_missing(flight, pq_sink):
    """A plan with a hole (a blocks partition taken out of the stored run, its ledger row
    and files gone): the source's blocks in the hole are counted missing and named as outside
    every planned partition — the run-wide gap check, not a partition's."""
    run = pq_sink.load_run(pq_sink.latest_run())
    hole = max((p for p in run.partitions if p.kind == "blocks" and p.scale == 1), key=lambda p: p.blocks)
    assert hole.blocks > 0
    pq_sink.forget(run.run_id, hole)
    for t in hole.spec.tables:
        pq_sink.file_of(t, hole).unlink(missing_ok=True)
    run.partitions = [p for p in run.partitions if p.key != hole.key]
    pq_sink.update_run(run)
    rep = T._verify(flight, pq_sink)
    assert rep.missing == hole.blocks and rep.partitions_unfinished == 0
    gap = [p for p in rep.problems if p.endswith(": in the source but outside every planned partition")]
    assert gap, rep.problems


class _OutOfOrder:
    """A source breaking the ascending-codes promise (served with ``check_source=False``):
    each range's lowest block first, then the rest highest first — every later code is at
    least the first, so only a check of each pair of neighbours sees the order is broken."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_blocks(self, scale: int, lo: int, hi: int):
        import pyarrow as pa

        batches = list(self.inner.read_blocks(scale, lo, hi))
        t = pa.Table.from_batches(batches) if batches else None
        if t is None or t.num_rows == 0:
            return
        t = t.sort_by("morton")
        yield from t.take(pa.array(np.r_[0, np.arange(t.num_rows - 1, 0, -1)])).to_batches()


def test_blocks_served_out_of_order_are_each_compared_with_their_own(tmp_path):
    """verify pairs every source block with the exported row of the same code even when the
    source serves a range out of code order: an untampered export is exact, block for block."""
    from dvidetl.flight.client import FlightClient
    from dvidetl.flight.server import start_server

    src = _OutOfOrder(open_source("synthetic://oo?size=192,128,128&scales=1&seed=3"))
    with start_server(src, check_source=False) as srv, FlightClient(srv.location, uuid="oo") as c:
        first = next(iter(c.read_blocks(0, 0, KEY_END))).column("morton").to_numpy()
        assert len(first) > 2 and first[0] == first.min() and np.any(first[2:] < first[1:-1])
        export_in_process(srv.location, f"parquet://{tmp_path}/out", uuid="oo")
        sink = open_sink(f"parquet://{tmp_path}/out", uuid="oo", instance="segmentation")
        rep = verify_export(c, sink)
        assert T._counts(rep) == {} and rep.blocks_checked == rep.blocks_source > 2, rep.problems


def test_a_partition_file_lacking_a_column_is_unreadable_not_rows_of_nulls(flight, pq_sink):
    """A blocks file rewritten without its crc32 column (a damaged or foreign writer): one
    unreadable file, named with its partition and the column it lacks — not every row of it
    reported as differing because the column read as nulls."""
    import pyarrow.parquet as pq

    run = pq_sink.load_run(pq_sink.latest_run())
    p = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 1  # at scale 0 the
             and pq_sink.file_of("blocks", p).exists())  # index cross-check would miss its blocks too
    f = pq_sink.file_of("blocks", p)
    t = pq.read_table(f)
    pq.write_table(t.drop_columns(["crc32"]), f)
    rep = T._verify(flight, pq_sink)
    assert T._counts(rep) == {"unreadable_files": 1}, rep.problems
    assert any(x.startswith(f"{f} (partition {p.key})") and "no column 'crc32'" in x for x in rep.problems), rep.problems
    assert rep.bad_partitions == {p.key}
    from dvidetl.errors import UserError

    with pytest.raises(UserError) as ei:  # a plain read of the table names that file too
        pq_sink.read("blocks", scale=1)
    assert str(ei.value).startswith(f"{f}: cannot read it (damaged: it has no column 'crc32'); "), str(ei.value)


def test_every_index_partition_is_judged_after_one_the_source_disagrees_with_itself():
    """``_compare_digests`` over four indices partitions whose exported label_index and
    scale-0 blocks disagree in three: two whose label_index equals the source's (the
    source's own indices disagree with its blocks: ``source_inconsistent``), then one found
    different from the source (``index_vs_blocks``, redone by ``--repair``) — each partition
    judged on its own, none skipped after the first."""
    from dvidetl.export.kinds import Partition
    from dvidetl.read.verify import VerifyReport, _compare_digests

    parts = [Partition("indices", 0, lo, lo + 10, rows=4) for lo in (0, 10, 20, 30)]
    rep = VerifyReport(run_id="r")
    rep.digest_index = np.array([[5, 1], [6, 2], [7, 3], [8, 4]], np.uint64)
    rep.digest_blocks = np.array([[5, 9], [6, 2], [7, 9], [8, 9]], np.uint64)  # 0, 2, 3 disagree
    rep.bad_partitions.add(parts[3].key)  # its label_index differs from the source's
    _compare_digests(rep, parts, ["blocks-s0-a"])
    assert (rep.source_inconsistent, rep.index_vs_blocks) == (2, 1)
    assert [x.split(":")[0:2] for x in rep.problems] == [
        ["label_index [0, 10)", " source vs itself"], ["label_index [20, 30)", " source vs itself"],
        ["label_index [30, 40)", " export vs source"]]
    assert rep.bad_partitions == {parts[3].key}


def test_a_resumed_run_says_what_its_finish_removed(server, dask, tmp_path):
    """A finished export with a killed writer's temporary file and a stray file beside its
    partition files: ``run --resume`` (nothing left to write) finishes the run again, and
    its summary, its per-sink figures and the run's record say what that finish removed."""
    import pyarrow.parquet as pq

    from dvidetl.export.api import ExportRun
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.progress import summary
    from dvidetl.sinks.parquet import temp_beside

    url = f"parquet://{tmp_path / 'out'}"
    run = export_in_process(server.location, url)
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    f = sink.file_of("blocks", next(p for p in run.partitions if p.kind == "blocks"))
    temp_beside(f).write_bytes(b"t" * 700)
    pq.write_table(pq.read_table(f).slice(0, 3), f.parent / "part-stray.parquet")
    ep = FlightEndpoint(server.location, None, UUID, None)
    try:
        job = ExportRun(ep, url, RunOptions(partition_blocks=16), resume=run.run_id)
        _, res = job.run(dask)
    finally:
        ep.close()
    assert res.done == 0 and res.skipped == len(run.partitions)
    want = {"outside": 1, "outside_rows": 3, "temp_files": 1, "temp_bytes": 700}
    assert res.removed_at_finish == want and res.sinks[0].removed_at_finish == want
    assert ("  removed     at finish: 1 stray file(s)/range(s) outside the run's partitions (3 rows), "
            "1 temporary file(s) of killed writers (700 bytes)") in summary(res).splitlines()
    assert sink.load_run(run.run_id).record["removed_at_finish"] == want
    assert "removed_at_finish" not in sink.load_run(run.run_id).record["result"]
    assert not list(f.parent.glob(".*")) and not (f.parent / "part-stray.parquet").exists()


def test_a_block_label_changed_is_one_block_whose_labels_differ_from_the_mapping(flight, pq_sink):
    """One entry of an exported block's ``labels`` (its supervoxels' bodies) changed, the
    payload and supervoxels untouched: one mismatched block, named by its coordinates, whose
    labels differ from what the server maps its supervoxels to."""
    import pyarrow as pa

    f = T._file_with(pq_sink, "blocks", scale=1)
    where = {}

    def relabel(t):
        lab = t.column("labels").to_pylist()
        i = next(i for i, ls in enumerate(lab) if ls)
        lab[i][0] += 1
        where["morton"] = t.column("morton")[i].as_py()
        return t.set_column(t.schema.get_field_index("labels"), "labels", pa.array(lab, t.schema.field("labels").type))

    T._rewrite(f, relabel)
    rep = T._verify(flight, pq_sink)
    assert T._counts(rep) == {"mismatched": 1}, rep.problems
    grid = flight.info().scale(1).grid
    assert [p for p in rep.problems if "labels differ" in p] == [
        f"{T._where(1, where['morton'], grid)}: labels differ from the server's mapping"], rep.problems
