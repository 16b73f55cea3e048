"""The oracle tested by tampering: real exports (synthetic source -> real Flight server ->
real Dask tasks -> Parquet files / vastsim through the vastdb SDK) are damaged in one known
way each, and ``verify`` must report exactly that: every counter equal to the number of
rows/files tampered (all other counters 0), the coordinates named, exit code 1.

Blocks are tampered at scale 1 so the label_index cross-check (built from scale-0 blocks)
stays out of it; the label_index tamper shows the cross-check counting on its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.client import FlightClient
from dvidetl.geometry import morton_decode
from dvidetl.read.verify import DIFF_COUNTERS, verify_export
from dvidetl.sinks import open_sink
from dvidetl.tables.cells import reassemble
from dvidetl.testing.env import environ
from dvidetl.testing.vastsim import start_vastsim

SRC = "synthetic://tv?size=512,512,256&scales=2&seed=3&empty=0.3"
UUID = "tv"
ACCESS, SECRET = "AKIDTAMPER", "tamper-secret-only-in-env"  # noqa: S105 - test key


@pytest.fixture(scope="module")
def server(src):
    from dvidetl.flight.server import start_server

    with start_server(src) as s:
        yield s


@pytest.fixture(scope="module")
def flight(server):
    with FlightClient(server.location, uuid=UUID) as c:
        yield c


def _export(server, cluster, sink_url: str, *extra: str) -> None:
    rc = cli(["run", "--uuid", UUID, "--flight", server.location, "--sink", sink_url,
              "--cluster", cluster.scheduler_address, "--partition-blocks", "16", "--quiet", *extra])
    assert rc == 0


def _counts(rep) -> dict[str, int]:
    return {k: getattr(rep, k) for k in DIFF_COUNTERS if getattr(rep, k)}


def _where(scale: int, m: int, grid) -> str:
    x, y, z = morton_decode(np.asarray([m], np.uint64), grid)
    return f"scale {scale} block ({int(x[0])}, {int(y[0])}, {int(z[0])})"


def _absent_morton(flight, sink, scale: int) -> int:
    """A Morton code inside a planned partition of ``scale`` where the source has no block."""
    run = sink.load_run(sink.latest_run())
    have = set(sink.read("blocks", scale=scale, columns=["morton"]).column("morton").to_pylist())
    grid = flight.info().scale(scale).grid
    for p in run.partitions:
        if p.kind == "blocks" and p.scale == scale:
            for m in range(p.lo, min(p.hi, int(np.prod(grid)))):
                x, y, z = morton_decode(np.asarray([m], np.uint64), grid)
                if m not in have and all(int(c) < g for c, g in zip((x[0], y[0], z[0]), grid, strict=True)):
                    return m
    raise AssertionError("the test volume has no absent block at scale 1")


# ---------------------------------------------------------------------------------------------
# Parquet: tamper with the files a plain reader reads
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_export(server, cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("pq") / "out"
    _export(server, cluster, f"parquet://{d}")
    return d


@pytest.fixture
def pq_sink(parquet_export, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(parquet_export, d)
    return open_sink(f"parquet://{d}", uuid=UUID, instance="segmentation")


def _file_with(sink, table: str, scale: int | None = None, min_rows: int = 2) -> Path:
    run = sink.load_run(sink.latest_run())
    for p in run.partitions:
        if scale is not None and p.scale != scale:
            continue
        f = sink.file_of(table, p)
        if f.exists() and pq.read_metadata(f).num_rows >= min_rows:
            return f
    raise AssertionError(f"no {table} file with {min_rows} rows")


def _rewrite(path: Path, fn) -> pa.Table:
    """Read a file, change its rows with ``fn``, write it back in place (same schema)."""
    t = pq.read_table(path)
    out = fn(t)
    pq.write_table(out.cast(t.schema), path)
    return t


def _verify(flight, sink):
    rep = verify_export(flight, sink)
    assert not rep.ok
    return rep


def test_untampered_parquet_export_is_exact(flight, pq_sink):
    rep = verify_export(flight, pq_sink)
    assert rep.ok, rep.text()
    assert _counts(rep) == {}
    assert rep.blocks_checked == rep.blocks_source > 100


def test_parquet_flip_one_payload_byte(flight, pq_sink):
    f = _file_with(pq_sink, "blocks", scale=1)
    t = pq.read_table(f)
    i = 1
    b = bytearray(t.column("payload0")[i].as_py())
    b[len(b) // 2] ^= 0x01
    col = t.column("payload0").to_pylist()
    col[i] = bytes(b)
    pq.write_table(t.set_column(t.schema.get_field_index("payload0"), "payload0",
                                pa.array(col, pa.binary())), f)
    rep = _verify(flight, pq_sink)
    assert _counts(rep) == {"mismatched": 1}
    grid = flight.info().scale(1).grid
    assert any(_where(1, t.column("morton")[i].as_py(), grid) in p for p in rep.problems), rep.problems


def test_parquet_drop_duplicate_rows(flight, pq_sink):
    f = _file_with(pq_sink, "blocks", scale=1, min_rows=3)
    t = _rewrite(f, lambda t: pa.concat_tables([t.slice(1), t.slice(2, 1)]))  # drop row 0, repeat row 2
    rep = _verify(flight, pq_sink)
    assert _counts(rep) == {"missing": 1, "duplicated": 1}
    grid = flight.info().scale(1).grid
    text = "\n".join(rep.problems)
    assert f"{_where(1, t.column('morton')[0].as_py(), grid)}: in the source but not exported" in text
    assert f"{_where(1, t.column('morton')[2].as_py(), grid)}: exported 2 times" in text


def test_parquet_foreign_rows(flight, pq_sink):
    """A row at an absent block inside its file's range (extra), a row outside its file's
    range, and a stray file no partition wrote (both outside: plain readers see them)."""
    f = _file_with(pq_sink, "blocks", scale=1)
    m = _absent_morton(flight, pq_sink, 1)
    grid = flight.info().scale(1).grid
    x, y, z = (int(v[0]) for v in morton_decode(np.asarray([m], np.uint64), grid))
    run = pq_sink.load_run(pq_sink.latest_run())
    part = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 1 and p.lo <= m < p.hi)
    f = pq_sink.file_of("blocks", part)

    def add(t):
        row = t.slice(0, 1)
        for c, v in (("x", x), ("y", y), ("z", z), ("morton", m)):
            row = row.set_column(row.schema.get_field_index(c), c, pa.array([v], row.schema.field(c).type))
        out_of_range = row.set_column(row.schema.get_field_index("morton"), "morton",
                                      pa.array([part.hi + 5], pa.uint64()))
        return pa.concat_tables([t, row, out_of_range])

    _rewrite(f, add)
    stray = f.parent / "part-extra.parquet"
    pq.write_table(pq.read_table(f).slice(0, 1), stray)
    rep = _verify(flight, pq_sink)
    assert _counts(rep) == {"extra": 1, "outside_rows": 2}
    text = "\n".join(rep.problems)
    assert f"{_where(1, m, grid)}: exported but not in the source" in text
    assert str(stray) in text and str(f) in text


def test_parquet_label_index_and_mapping(flight, pq_sink):
    li = _file_with(pq_sink, "label_index")
    dropped = _rewrite(li, lambda t: t.slice(1)).slice(0, 1).to_pylist()[0]
    mp = _file_with(pq_sink, "mapping")
    old = _rewrite(mp, lambda t: t.set_column(1, "body", pc.if_else(
        pc.equal(pa.array(np.arange(t.num_rows)), 3), pa.scalar(12345, pa.uint64()), t.column("body"))))
    sv = old.column("supervoxel")[3].as_py()
    rep = _verify(flight, pq_sink)
    assert _counts(rep) == {"index_diffs": 1, "index_vs_blocks": 1, "mapping_diffs": 1}
    text = "\n".join(rep.problems)
    assert f"label {dropped['label']} supervoxel {dropped['supervoxel']} block ({dropped['x']}, " in text
    assert f"mapping: supervoxel {sv}: exported 12345" in text


def test_parquet_truncated_and_deleted_files(flight, pq_sink, capsys):
    """Unreadable files are differences (one line: the file and its partition), never a
    traceback — in verify and in inspect."""
    run = pq_sink.load_run(pq_sink.latest_run())
    p1 = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 1
              and pq_sink.file_of("blocks", p).exists())
    p2 = next(p for p in run.partitions if p.kind == "mapping" and pq_sink.file_of("mapping", p).exists())
    f1, f2 = pq_sink.file_of("blocks", p1), pq_sink.file_of("mapping", p2)
    data = f1.read_bytes()
    f1.write_bytes(data[: len(data) // 2])
    f2.unlink()
    rep = _verify(flight, pq_sink)
    assert _counts(rep) == {"unreadable_files": 2}
    text = "\n".join(rep.problems)
    assert f"{f1} (partition {p1.key})" in text and f"{f2} (partition {p2.key})" in text
    x, y, z = (int(v[0]) for v in morton_decode(np.asarray([p1.lo], np.uint64), flight.info().scale(1).grid))
    rc = cli(["inspect", "--sink", f"parquet://{pq_sink.base}", "--scale", "1", "--block", f"{x},{y},{z}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(f1) in err, err


# ---------------------------------------------------------------------------------------------
# VastDB (vastsim through the real SDK): tamper with rows in transactions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim():
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as s:
            yield s


@pytest.fixture
def vast_sink(request, server, cluster, sim):
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/{request.node.name[5:40]}"
    _export(server, cluster, url)
    return open_sink(url, uuid=UUID, instance="segmentation")


def _vast(sink, table: str, pred, fn) -> pa.Table:
    """Rows of ``table`` matching ``pred`` replaced by ``fn(rows)`` in one transaction."""
    with sink._session().transaction() as tx:
        t = tx.table_from_metadata(sink._md_of(table))
        rows = sink._select(tx, table, pred, None, row_ids=True)
        plain = rows.drop_columns(["$row_id"])
        if rows.num_rows:
            t.delete(rows.select(["$row_id"]))
        new = fn(plain)
        if new.num_rows:
            t.insert(new.cast(plain.schema))
        return plain


def test_vastdb_tampered_blocks(flight, vast_sink):
    from dvidetl.sinks.vastdb import _col

    s = vast_sink
    grid = flight.info().scale(1).grid
    ms = sorted(s.read("blocks", scale=1, columns=["morton"]).column("morton").to_pylist())
    flip, drop, dup = ms[0], ms[1], ms[2]
    absent = _absent_morton(flight, s, 1)

    def flipped(t):
        b = bytearray(t.column("payload0")[0].as_py())
        b[len(b) // 2] ^= 0x01
        return t.set_column(t.schema.get_field_index("payload0"), "payload0", pa.array([bytes(b)]))

    _vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == flip), flipped)
    _vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == drop), lambda t: t.slice(0, 0))
    _vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == dup), lambda t: pa.concat_tables([t, t]))
    x, y, z = (int(v[0]) for v in morton_decode(np.asarray([absent], np.uint64), grid))

    def moved(t, scale, m, xyz):
        for c, v in (("scale", scale), ("x", xyz[0]), ("y", xyz[1]), ("z", xyz[2]), ("morton", m)):
            t = t.set_column(t.schema.get_field_index(c), c, pa.array([v], t.schema.field(c).type))
        return t

    src_row = s.read("blocks", scale=1, morton_range=(ms[3], ms[3] + 1))
    with s._session().transaction() as tx:
        t = tx.table_from_metadata(s._md_of("blocks"))
        t.insert(moved(src_row, 1, absent, (x, y, z)))  # an absent block: extra
        t.insert(moved(src_row, 7, 5, (1, 0, 0)))  # a scale the run never planned: outside
    rep = _verify(flight, s)
    assert _counts(rep) == {"mismatched": 1, "missing": 1, "duplicated": 1, "extra": 1, "outside_rows": 1}
    text = "\n".join(rep.problems)
    for m, what in ((flip, "reassembled bytes differ"), (drop, "in the source but not exported"),
                    (dup, "exported 2 times"), (absent, "exported but not in the source")):
        assert f"{_where(1, m, grid)}: {what}" in text, (what, text)
    assert "blocks: 1 rows outside every partition" in text and "scale 7" in text


def test_vastdb_tampered_index_and_mapping(flight, vast_sink):
    from dvidetl.sinks.vastdb import _col

    s = vast_sink
    li = s.read("label_index")
    r = li.slice(7, 1).to_pylist()[0]
    pred = ((_col("label") == r["label"]) & (_col("supervoxel") == r["supervoxel"]) & (_col("x") == r["x"])
            & (_col("y") == r["y"]) & (_col("z") == r["z"]))
    _vast(s, "label_index", pred, lambda t: t.slice(0, 0))
    sv = s.read("mapping").column("supervoxel")[4].as_py()
    _vast(s, "mapping", _col("supervoxel") == sv,
          lambda t: t.set_column(1, "body", pa.array([12345], pa.uint64())))
    rep = _verify(flight, s)
    assert _counts(rep) == {"index_diffs": 1, "index_vs_blocks": 1, "mapping_diffs": 1}
    text = "\n".join(rep.problems)
    assert f"label {r['label']} supervoxel {r['supervoxel']} block ({r['x']}, {r['y']}, {r['z']})" in text
    assert f"mapping: supervoxel {sv}: exported 12345" in text


# ---------------------------------------------------------------------------------------------
# the run's totals: pinned against sums computed from the exported rows, and a resumed run
# reports what the uninterrupted one did
# ---------------------------------------------------------------------------------------------

TOTALS = ("blocks", "errors", "bytes_in", "bytes_out", "raw_bytes", "index_rows", "mapping_rows")


def test_bytes_out_and_raw_bytes_equal_independent_sums(parquet_export):

    sink = open_sink(f"parquet://{parquet_export}", uuid=UUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    res = run.record["result"]
    full = reassemble(sink.read("blocks"), sink.read("block_overflow"))

    def list_bytes(col, width):
        return int(pc.sum(pc.list_value_length(full.column(col))).as_py()) * width

    payload = int(pc.sum(full.column("payload_size").cast(pa.int64())).as_py())
    want_out = payload + list_bytes("supervoxels", 8) + list_bytes("labels", 8) + list_bytes("sv_voxels", 4)
    want_raw = int(pc.sum(full.column("raw_size").cast(pa.int64())).as_py())
    led = sink.ledger(run.run_id)
    isb = pc.equal(led.column("kind"), "blocks")
    assert res["bytes_out"] == want_out == int(pc.sum(pc.filter(led.column("bytes_out"), isb)).as_py())
    assert res["raw_bytes"] == want_raw == int(pc.sum(pc.filter(led.column("raw_bytes"), isb)).as_py())
    assert res["blocks"] == full.num_rows
    assert res["index_rows"] == sink.read("label_index").num_rows
    assert res["mapping_rows"] == sink.read("mapping").num_rows
    assert res["raw_bytes"] > 2 * res["bytes_out"] > 0  # the ratio the summary prints is real


def test_resumed_run_reports_the_uninterrupted_totals(server, cluster, parquet_export, tmp_path, capsys):
    """Partitions whose ledger rows are gone are redone by --resume; the totals (and the
    compression ratio) equal the uninterrupted run's."""
    d = tmp_path / "out"
    shutil.copytree(parquet_export, d)
    sink = open_sink(f"parquet://{d}", uuid=UUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    want = {k: run.record["result"][k] for k in TOTALS}
    for kind in ("blocks", "indices"):
        p = next(p for p in run.partitions if p.kind == kind)
        (sink.root / "export_ledger" / run.run_id / f"{p.key}.parquet").unlink()
    capsys.readouterr()
    rc = cli(["run", "--uuid", UUID, "--flight", server.location, "--sink", f"parquet://{d}",
              "--cluster", cluster.scheduler_address, "--resume", run.run_id, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "2 written now" in err
    got = sink.load_run(run.run_id).record["result"]
    assert {k: got[k] for k in TOTALS} == want
    ratio = want["raw_bytes"] / want["bytes_out"]
    assert f"{ratio:.2f}x smaller than the raw DVID bytes" in err  # the summary's ratio


# ---------------------------------------------------------------------------------------------
# verify --repair: exactly the partitions found wrong are re-exported, exactly the rows
# outside every partition removed; then the export verifies exact (exit 0)
# ---------------------------------------------------------------------------------------------


def _repair(server, cluster, sink_url: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli(["verify", "--uuid", UUID, "--flight", server.location, "--sink", sink_url,
              "--cluster", cluster.scheduler_address, "--repair"])
    return rc, capsys.readouterr().out


def test_parquet_repair(server, cluster, flight, pq_sink, capsys):
    run = pq_sink.load_run(pq_sink.latest_run())
    b1 = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 1)
    b0 = [p for p in run.partitions if p.kind == "blocks" and p.scale == 0
          and pq.read_metadata(pq_sink.file_of("blocks", p)).num_rows >= 2][:2]
    mp = next(p for p in run.partitions if p.kind == "mapping")
    _rewrite(pq_sink.file_of("blocks", b1), lambda t: pa.concat_tables([t.slice(1), t.slice(2, 1)]))
    data = pq_sink.file_of("blocks", b0[0]).read_bytes()
    pq_sink.file_of("blocks", b0[0]).write_bytes(data[: len(data) // 3])
    pq_sink.file_of("mapping", mp).unlink()
    stray = pq_sink.file_of("blocks", b1).parent / "part-stray.parquet"
    pq.write_table(pq.read_table(pq_sink.file_of("blocks", b0[1])).slice(0, 1), stray)
    before = _verify(flight, pq_sink)
    assert before.bad_partitions >= {b1.key, b0[0].key, mp.key}
    rc, out = _repair(server, cluster, f"parquet://{pq_sink.base}", capsys)
    assert rc == 0, out
    assert f"verify run {run.run_id}: OK" in out
    rec = pq_sink.load_run(run.run_id).record["verify"]
    assert rec["exact"] is True and rec["repaired"]["partitions"] == sorted(before.bad_partitions)
    assert rec["repaired"]["rows_removed"] == 1 and not stray.exists()
    rep = verify_export(flight, pq_sink)
    assert rep.ok, rep.text()


def test_vastdb_repair(server, cluster, flight, vast_sink, capsys):
    from dvidetl.sinks.vastdb import _col

    s = vast_sink
    ms = sorted(s.read("blocks", scale=1, columns=["morton"]).column("morton").to_pylist())
    _vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == ms[0]), lambda t: t.slice(0, 0))
    _vast(s, "blocks", (_col("scale") == 1) & (_col("morton") == ms[1]), lambda t: pa.concat_tables([t, t]))
    sv = s.read("mapping").column("supervoxel")[4].as_py()
    _vast(s, "mapping", _col("supervoxel") == sv, lambda t: t.set_column(1, "body", pa.array([9], pa.uint64())))
    row = s.read("blocks", scale=1, morton_range=(ms[2], ms[2] + 1))
    row = row.set_column(0, "scale", pa.array([6], pa.uint8()))
    with s._session().transaction() as tx:
        tx.table_from_metadata(s._md_of("blocks")).insert(row)
    before = _verify(flight, s)
    assert _counts(before) == {"missing": 1, "duplicated": 1, "mapping_diffs": 1, "outside_rows": 1}
    rc, out = _repair(server, cluster, s.url, capsys)
    assert rc == 0, out
    fresh = open_sink(s.url, uuid=UUID, instance="segmentation")
    rec = fresh.load_run(fresh.latest_run()).record["verify"]
    assert rec["exact"] is True and rec["repaired"]["rows_removed"] == 1
    assert rec["repaired"]["partitions"] == sorted(before.bad_partitions) and len(before.bad_partitions) == 2
    assert verify_export(flight, fresh).ok


def test_damaged_run_records_are_one_line_errors(pq_sink, capsys):
    """A truncated ledger file or run.json: `status` (and every reader of them) says which
    file, in one line, exit 2 — never a traceback."""
    run = pq_sink.load_run(pq_sink.latest_run())
    led = pq_sink.root / "export_ledger" / run.run_id / f"{run.partitions[0].key}.parquet"
    led.write_bytes(led.read_bytes()[:20])
    url = f"parquet://{pq_sink.base}"
    assert cli(["status", "--sink", url]) == 2
    err = capsys.readouterr().err
    assert str(led) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rj = pq_sink.root / "runs" / run.run_id / "run.json"
    rj.write_text(rj.read_text()[:100])
    assert cli(["status", "--sink", url]) == 2
    err = capsys.readouterr().err
    assert str(rj) in err and "Traceback" not in err


def test_uncovered_ranges_are_exactly_the_plans_complement():
    """The ranges VastDB's ``outside`` scans: every scale the plan lacks (the last entry: all
    scales past its largest), the Morton gaps of those it has, the key gaps of keyed kinds."""
    from dvidetl.export.kinds import Partition
    from dvidetl.geometry import KEY_END
    from dvidetl.sinks.vastdb import _uncovered

    E = 1 << 64
    blocks = [Partition("blocks", 0, 0, 10), Partition("blocks", 0, 10, 20), Partition("blocks", 2, 5, 9)]
    assert _uncovered(True, blocks) == [(0, 20, E, False), (1, 0, E, False), (2, 0, 5, False),
                                           (2, 9, E, False), (3, 0, E, True)]
    assert _uncovered(True, []) == [(0, 0, E, True)]
    keyed = [Partition("indices", 0, 0, 100), Partition("indices", 0, 200, KEY_END - 1)]
    assert _uncovered(False, keyed) == [(None, 100, 200, False), (None, KEY_END - 1, E, False)]
    assert _uncovered(False, []) == [(None, 0, E, False)]
