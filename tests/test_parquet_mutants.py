"""The Parquet sink's exactly-once code where mutation testing found no fast test (issue 22
item 4): the ledger of a layout-1 export, an older table format kept by a partition handed as
tables, a crash between a staged run's publish renames, and a resumed ``--overwrite`` run
whose record says published.

Fast on purpose (``make mutants`` runs them in a child per mutant): the older exports are the
format-1 fixture written by old code (``tests/data/format1-parquet``), and the staged runs are
made by the real task code over a real Flight server in this process
(``test_verify_mutants.export_in_process``), no scheduler.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dvidetl.errors import UserError, first_line
from dvidetl.export.kinds import PartitionStats
from dvidetl.read.verify import verify_export
from dvidetl.sinks import open_sink
from dvidetl.sinks.parquet import STAGING, SUPERSEDED, ParquetSink, temp_beside
from dvidetl.tables import schema as S
from dvidetl.testing.layouts import to_layout_1
from tests.test_verify_mutants import UUID, export_in_process, flight, server  # noqa: F401 - fixtures

FIXTURE = Path(__file__).parent / "data" / "format1-parquet"
F1 = ("segmentation", "f1")  # the fixture's instance and uuid
LEGACY = {"body_size", "body0", "body1", "body2", "body3"}
TODAY = {"payload_size", *S.PAYLOAD_COLUMNS}
#: the staged runs' source (conftest's ``src``, served by ``server``): small, so two runs take seconds
SRC = f"synthetic://{UUID}?size=256,256,128&scales=2&seed=3&empty=0.3"


def _fixture(tmp_path: Path) -> Path:
    out = tmp_path / "f1"
    shutil.copytree(FIXTURE, out)
    return out


# -- older exports -----------------------------------------------------------------------------
def test_the_ledger_of_every_run_of_a_layout_1_export_is_read(tmp_path):
    """A layout-1 export (before ``layout.json``: ``scale=<s>`` and ``run=<id>`` directories,
    table format 1 — the fixture's directories renamed back): the ledger of all runs, which
    ``ParquetSink.ledger()`` and the DuckDB ``export_ledger`` view read, is every ledger file
    under ``export_ledger/run=<id>/``."""
    from dvidetl.read.sql import connect

    out = _fixture(tmp_path)
    root = out.joinpath(*F1)
    to_layout_1(root)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    assert (sink.layout, sink.format) == (1, 1)
    (run_id,) = sink.runs()
    run = sink.load_run(run_id)
    files = sink.ledger_files()
    assert [f.parent.name for f in files] == [f"run={run_id}"] * len(run.partitions)
    assert sorted(f.stem for f in files) == sorted(p.key for p in run.partitions)
    every = sink.ledger()
    assert every.num_rows == len(run.partitions) and set(every.column("run_id").to_pylist()) == {run_id}
    assert every.sort_by("kind").equals(sink.ledger(run_id).sort_by("kind"))
    con = connect(out, uuid=F1[1], instance=F1[0])
    assert con.execute("SELECT count(*) FROM export_ledger").fetchall() == [(len(run.partitions),)]


def _compression(f: Path) -> dict[str, str]:
    meta = pq.ParquetFile(f).metadata.row_group(0)
    return {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}


def test_a_blocks_partition_handed_as_tables_keeps_an_older_exports_format(tmp_path):
    """The table format of an export (``layout.json``'s ``"format"``) holds for every file a
    run appends to it. Formats 1 and 2 differ only in ``blocks`` and ``block_overflow``; a
    blocks partition handed as its stored tables (already cut: ``write_partition`` takes a
    kind's tables for any kind) is written by the per-table path, and into the format-1
    fixture it must be stored as the old code stored it (``body0..3``, overflow ``"body"``),
    row for row, not in today's names beside format-1 files."""
    out = _fixture(tmp_path)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    assert (sink.layout, sink.format) == (2, 1)
    run = sink.load_run(sink.latest_run())
    p = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 0)
    tables = {t: sink.read_partition(run.run_id, t, p) for t in p.spec.tables}
    assert tables["blocks"].num_rows and tables["block_overflow"].num_rows  # the fixture overflows
    files = {t: sink.file_of(t, p, run.run_id) for t in ("blocks", "block_overflow")}
    as_old_code_stored = {t: pq.read_table(f) for t, f in files.items()}
    old_comp = _compression(files["blocks"])
    (led,) = [r for r in sink.ledger(run.run_id).to_pylist() if r["kind"] == "blocks" and r["lo"] == p.lo
              and r["scale"] == p.scale]
    sink.forget(run.run_id, p)
    for f in files.values():
        f.unlink()
    sink.write_partition(run.run_id, p, tables, PartitionStats(p.key, p.kind, blocks=led["blocks"]))
    assert sink.is_done(run.run_id, p)
    names = set(pq.read_schema(files["blocks"]).names)
    assert LEGACY <= names and not (TODAY & names)
    for t, f in files.items():
        again = pq.read_table(f)
        assert again.schema.names == as_old_code_stored[t].schema.names, t
        assert again.sort_by([("morton", "ascending")] + ([("part", "ascending")] if t == "block_overflow" else [])) \
            .to_pylist() == as_old_code_stored[t].sort_by(
                [("morton", "ascending")] + ([("part", "ascending")] if t == "block_overflow" else [])).to_pylist(), t
    assert set(pq.read_table(files["block_overflow"], columns=["column"]).column("column").to_pylist()) >= {"body"}
    # and compressed as the old code compressed it (the zstd payload parts stored as they are),
    # but for the lists, which the old code left uncompressed by mistake
    comp = _compression(files["blocks"])
    lists = {k for k in comp if ".list." in k}
    assert {k: v for k, v in comp.items() if k not in lists} == {k: v for k, v in old_comp.items() if k not in lists}
    assert {comp["body0"], comp["body_size"]} == {"UNCOMPRESSED", "ZSTD"}
    assert len(lists) == 3 and {comp[k] for k in lists} == {"ZSTD"} and {old_comp[k] for k in lists} == {"UNCOMPRESSED"}
    for t in tables:
        assert sink.read_partition(run.run_id, t, p).equals(tables[t]), t


def test_names_that_cannot_be_directories_are_refused_by_name():
    """An instance, uuid or run id that would leave the export's directory is one line
    naming which of them it is."""
    for kw, what in (({"uuid": "u", "instance": "../x"}, "instance '../x'"),
                     ({"uuid": ".hidden", "instance": "seg"}, "uuid '.hidden'")):
        with pytest.raises(UserError, match=f"^{what} cannot be used as a directory name$"):
            ParquetSink("/nonexistent-base", **kw)
    sink = ParquetSink("/nonexistent-base", uuid="u", instance="seg")
    with pytest.raises(UserError, match="^run id 'a/b' cannot be used as a directory name$"):
        sink.load_run("a/b")


def test_an_unreadable_ledger_file_is_one_line_naming_it(tmp_path):
    """A truncated ledger file: reading the ledger is a ``UserError`` naming the file and
    what to do, not an Arrow error."""
    out = _fixture(tmp_path)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    bad = sink.ledger_files()[1]
    bad.write_bytes(bad.read_bytes()[:40])
    for run_id in (None, sink.latest_run()):
        with pytest.raises(UserError, match=f"^{bad}: cannot read it .*remove it and resume the run"):
            sink.ledger(run_id)


def test_a_ledger_file_lacking_a_column_is_damaged_not_nulls(tmp_path):
    """A ledger file without one of its columns (not one added since: ``raw_bytes`` may be
    absent, as in this format-1 fixture) is a damaged file, named in one line — never read
    as a ledger row of nulls."""
    out = _fixture(tmp_path)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    assert sink.ledger().column("raw_bytes").null_count == len(sink.ledger_files())  # added since
    bad = sink.ledger_files()[0]
    pq.write_table(pq.read_table(bad).drop_columns(["rows"]), bad)
    with pytest.raises(UserError, match=rf"^{bad}: cannot read it \(table 'export_ledger' is missing columns \['rows'\]\)"):
        sink.ledger()


def test_finish_removes_stray_files_readable_or_not(tmp_path, caplog):
    """Files in a table directory that are no committed partition's (one readable with
    rows, one truncated): ``outside`` names both with their paths (rows unknown for the
    unreadable one), ``remove_outside`` deletes exactly them and counts the rows it knew,
    and a resumed run's ``finish`` leaves only the run's files."""
    out = _fixture(tmp_path)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    run = sink.load_run(sink.latest_run())
    committed = sorted(str(f) for t in ("blocks", "block_overflow", "label_index", "mapping")
                       for f in sink.committed_files(t))
    f = Path(committed[0])
    readable, truncated = f.parent / "part-stray-a.parquet", f.parent / "part-stray-b.parquet"
    pq.write_table(pq.read_table(f).slice(0, 2), readable)
    truncated.write_bytes(f.read_bytes()[:100])
    found = sink.outside(run, sink.done(run.run_id))
    assert sorted((o.path, o.rows) for o in found) == [(str(readable), 2), (str(truncated), -1)]
    with pytest.raises(pa.ArrowException) as why:
        pq.read_metadata(truncated)
    assert sorted(o.where for o in found)[1] == f"{truncated}: a stray file, unreadable ({first_line(why.value)})"
    assert sink.remove_outside(run, found[:1]) == (2 if found[0].path == str(readable) else 0)
    assert not Path(found[0].path).exists() and Path(found[1].path).exists()
    # a writer killed before its rename left its hidden temporary file (not a *.parquet:
    # outside() passes over it); a hidden file of another kind is not ours to remove
    temp, other = temp_beside(f), f.parent / ".notes.tmp-by-hand"
    temp.write_bytes(b"x" * 1000)
    other.write_bytes(b"keep")
    run.record.pop("removed_at_finish", None)
    with caplog.at_level(logging.INFO, logger="dvidetl.sinks"):
        sink.finish(run)
    assert [r.getMessage() for r in caplog.records if "outside its partitions" in r.getMessage()] == [
        f"{sink!r}: finishing run {run.run_id} removed 1 stray range(s) or file(s) outside its partitions (0 rows)"]
    assert [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()] == [
        f"{sink!r}: removed 1 temporary file(s) (1000 bytes) left by writers that were killed"]
    assert not readable.exists() and not truncated.exists() and not temp.exists() and other.exists()
    assert sorted(str(p) for p in out.rglob("part-*.parquet") if "export_ledger" not in p.parts) == committed
    assert sink.outside(run, sink.done(run.run_id)) == []
    # said: kept in the run's record and shown by status
    want = {"outside": 1, "outside_rows": 0, "temp_files": 1, "temp_bytes": 1000}
    assert ParquetSink(out, uuid=F1[1], instance=F1[0]).load_run(run.run_id).record["removed_at_finish"] == want
    from dvidetl.commands.status import run_status, text

    st = run_status(sink, run.run_id)
    assert st["removed_at_finish"] == want
    assert ("  removed     at finish: 1 stray file(s)/range(s) outside the run's partitions (0 rows), "
            "1 temporary file(s) of killed writers (1,000 bytes)") in text("x", [st]).splitlines()
    sink.finish(run)  # a finish redone adds what it removed: nothing more
    assert sink.load_run(run.run_id).record["removed_at_finish"] == want


def test_written_files_keep_the_statistics_and_encodings_readers_rely_on(tmp_path):
    """A committed blocks file holds per-row-group min/max statistics of ``scale`` and
    ``morton`` (plain readers prune row groups by them), dictionary-encodes and zstd-compresses
    its flat columns, and stores the zstd payload parts as they are (no compression, no
    dictionary: they are compressed already)."""
    from dvidetl.export.batch import BlockData
    from dvidetl.export.kinds import Partition
    from dvidetl.testing.sink_tests import SinkTests, block_batch, stats

    sink = ParquetSink(tmp_path, uuid="u", instance="i")
    p = Partition("blocks", 0, 0, 100, 3)
    sink.prepare(SinkTests.run("r1", [p]))
    sink.write_partition("r1", p, BlockData(block_batch([5, 9, 40])), stats(p, blocks=3))
    md = pq.ParquetFile(sink.file_of("blocks", p)).metadata
    rg = md.row_group(0)
    cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
    assert md.num_row_groups == 1
    assert (cols["morton"].statistics.min, cols["morton"].statistics.max) == (5, 40)
    assert (cols["scale"].statistics.min, cols["scale"].statistics.max) == (0, 0)
    for name in ("morton", "crc32", "payload_size"):
        assert cols[name].compression == "ZSTD" and "RLE_DICTIONARY" in cols[name].encodings, name
    for name in S.PAYLOAD_COLUMNS:
        assert cols[name].compression == "UNCOMPRESSED", name
        assert not {"RLE_DICTIONARY", "PLAIN_DICTIONARY"} & set(cols[name].encodings), name
    # every other column is zstd'd, the lists too (supervoxels, labels, sv_voxels: a third of a
    # blocks file; a list's Parquet path is its values')
    assert {f"{c}.list.element" for c in S.LIST_COLUMNS} <= set(cols)
    assert {p: c.compression for p, c in cols.items() if p not in S.PAYLOAD_COLUMNS} == \
        {p: "ZSTD" for p in cols if p not in S.PAYLOAD_COLUMNS}


def test_a_newer_table_format_is_refused_naming_the_export(tmp_path):
    out = _fixture(tmp_path)
    root = out.joinpath(*F1)
    (root / "layout.json").write_text('{"layout": 3, "format": 9}')
    with pytest.raises(UserError, match=f"^{root}: written in table format 9; .* upgrade dvidetl$"):
        ParquetSink(out, uuid=F1[1], instance=F1[0])


def test_reads_of_an_older_format_filter_and_project_by_todays_names(tmp_path):
    """The format-1 fixture read through today's names: a ``where`` on a column stored under
    its old name (``payload_size``, stored ``body_size``) keeps exactly the rows a filter of
    the whole table keeps, and ``columns`` projects the ledger and an empty read too."""
    import pyarrow.compute as pc

    sink = ParquetSink(_fixture(tmp_path), uuid=F1[1], instance=F1[0])
    every = sink.read("blocks")
    sizes = sorted(every.column("payload_size").to_pylist())
    lo, hi = sizes[len(sizes) // 4], sizes[3 * len(sizes) // 4]
    got = sink.read("blocks", where={"payload_size": (lo, hi)}, columns=["morton", "payload_size"])
    want = every.filter(pc.and_(pc.greater_equal(every["payload_size"], lo), pc.less(every["payload_size"], hi)))
    assert 0 < got.num_rows < every.num_rows
    assert sorted(got.to_pylist(), key=str) == sorted(want.select(["morton", "payload_size"]).to_pylist(), key=str)
    assert sink.read("export_ledger", columns=["rows", "kind"]).column_names == ["kind", "rows"]
    assert sink.read("blocks", scale=7, columns=["morton", "x"]).column_names == ["x", "morton"]


def test_open_url_takes_a_plain_directory_too(tmp_path):
    from dvidetl.sinks.parquet import list_exports, open_url

    out = _fixture(tmp_path)
    for url in (str(out), f"parquet://{out}"):
        assert open_url(url, uuid=F1[1], instance=F1[0]).root == out.joinpath(*F1)
        assert list_exports(url) == [F1]


def test_a_file_whose_pages_are_damaged_is_named_by_a_read(tmp_path):
    """A file whose footer reads but whose data does not (bytes overwritten in its first
    column chunk): a read of its partition is one line naming that file."""
    out = _fixture(tmp_path)
    sink = ParquetSink(out, uuid=F1[1], instance=F1[0])
    run = sink.load_run(sink.latest_run())
    p = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 0)
    f = sink.file_of("blocks", p)
    data = bytearray(f.read_bytes())
    data[4:404] = b"\xff" * 400
    f.write_bytes(bytes(data))
    pq.read_metadata(f)  # the footer still reads
    with pytest.raises(UserError, match=f"^{f}: cannot read it "):
        sink.read("blocks", scale=0, morton_range=(p.lo, p.hi))


# -- a staged (--overwrite) run: publish, crash, resume ----------------------------------------
def _overwritten(location: str, url: str):
    """A finished export (4-block partitions) and a finished ``--overwrite`` of it
    (8-block partitions, staged then published)."""
    old = export_in_process(location, url, partition_blocks=4, cell_limit=1024)
    new = export_in_process(location, url, partition_blocks=8, cell_limit=1024, overwrite=True)
    return old, new


def _plain_blocks(sink: ParquetSink) -> list[tuple[int, int]]:
    t = pq.read_table(sink.root / "blocks", columns=["scale", "morton"])
    return list(zip(t.column("scale").to_pylist(), t.column("morton").to_pylist(), strict=True))


TABLES = ("blocks", "block_overflow", "label_index", "mapping")


def _rows(sink: ParquetSink, table: str) -> list:
    """Every row our reader returns for ``table`` (latest run), in a stable order."""
    return sorted(map(repr, sink.read(table).to_pylist()))


def _next_second() -> None:
    """Wait for the clock's next second: run ids sort runs by the second they start in (plus
    random digits), and a run started in the same second as the one it replaces may sort
    before it — which real runs, seconds apart, never do."""
    time.sleep(1.001 - time.time() % 1)


def test_a_crash_between_the_publish_renames_is_read_and_rolled_forward(server, flight, tmp_path, monkeypatch):  # noqa: F811
    """``run --overwrite``'s finish killed between its table renames (``blocks`` moved into
    place, the other tables still staged): the record already says ``publishing``, so a
    reader opened afterwards takes the new run as the export and finds each table where it
    is now (the rows it reads are the ones the export holds once the switch completes:
verify then finds them exact; verify before would rightly count the old keyed tables a plain
reader still sees), and the next ``finish`` (a resumed run's) completes the switch.
    The kill is simulated (a fake: no real part stops a process between two renames): the
    sink's second rename out of the staging directory raises."""
    url = f"parquet://{tmp_path}/out"
    old = export_in_process(server.location, url, partition_blocks=4, cell_limit=1024)
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    stage_of = sink.root / STAGING
    real, moved = os.replace, []

    def replace(src, dst):
        if Path(src).parent.parent == stage_of and Path(dst).parent == sink.root:
            if moved:
                raise OSError("killed between the publish renames")
            moved.append(Path(dst).name)
        return real(src, dst)

    _next_second()
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="killed between"):
        export_in_process(server.location, url, partition_blocks=8, cell_limit=1024, overwrite=True)
    monkeypatch.undo()
    assert moved == ["blocks"]
    (new_id,) = set(sink.runs()) - {old.run_id}
    reader = open_sink(url, uuid=UUID, instance="segmentation")  # a new process's view
    assert reader.load_run(new_id).state == "publishing" and not reader.load_run(new_id).record.get("published")
    assert [d.name for d in (reader.root / STAGING / new_id).iterdir()]  # the crash left tables staged
    assert reader.latest_run() == new_id
    mid = {t: _rows(reader, t) for t in TABLES}
    assert all(mid.values())
    # the next finish rolls the switch forward: what the reader saw was the new run
    reader.finish(reader.load_run(new_id))
    rec = reader.load_run(new_id).record
    assert rec["state"] == "finished" and rec["published"] is True
    assert reader.load_run(old.run_id).state == "superseded"
    assert not list((reader.root / STAGING).glob("*/*")) and not list((reader.root / SUPERSEDED).glob("*/*"))
    rep = verify_export(flight, reader)
    assert rep.ok and rep.run_id == new_id, rep.text()
    assert {t: _rows(reader, t) for t in TABLES} == mid
    plain = _plain_blocks(reader)
    assert len(plain) == len(set(plain)) == rep.blocks_checked


def test_a_resumed_overwrite_run_writes_and_keeps_the_published_tables(server, flight, tmp_path):  # noqa: F811
    """``run --resume`` of an ``--overwrite`` run that finished (its record says running
    again, as the driver writes it, and published): a partition redone because its file was
    lost is written into the table directory (where the run now lives, not the staging
    directory it was written to first), and the resumed run's finish removes nothing of it."""
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.tasks import _SINKS, export_partition, task_context

    url = f"parquet://{tmp_path}/out"
    old, new = _overwritten(server.location, url)
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    with pytest.raises(UserError, match=f"^run {old.run_id} of .* was replaced by run {new.run_id} "):
        sink.read("blocks", run_id=old.run_id)
    before = sorted(_plain_blocks(sink))
    p = next(p for p in new.partitions if p.kind == "blocks" and sink.file_of("blocks", p).exists())
    lost = sink.file_of("blocks", p)
    lost.unlink()
    sink.forget(new.run_id, p)
    run = sink.load_run(new.run_id)
    assert run.staged and run.record["published"] is True
    run.record.update(state="running")  # what the driver does when it resumes a run
    sink.prepare(run)
    sink.update_run(run)
    ep = FlightEndpoint(server.location, None, UUID, None)
    try:
        ctx = task_context(run, ep, url)
        try:
            assert not export_partition(ctx, p).skipped
        finally:
            _SINKS.clear()
    finally:
        ep.close()
    assert lost.exists() and sink.file_of("blocks", p, new.run_id) == lost
    assert not (sink.root / STAGING / new.run_id).exists()
    sink.finish(sink.load_run(new.run_id))
    assert sorted(_plain_blocks(sink)) == before
    rep = verify_export(flight, sink)
    assert rep.ok and rep.run_id == new.run_id, rep.text()


def test_a_record_write_that_fails_leaves_the_record_as_it_was_and_no_temp_file(tmp_path, monkeypatch):
    """A run record rewritten on a full disk: the error is raised, the record on disk is the
    one before, and no hidden temporary file is left beside it (the disk-full fault run's
    driver failed this way writing the run's end)."""
    import errno

    from dvidetl.export.kinds import Partition
    from dvidetl.testing.sink_tests import SinkTests

    sink = ParquetSink(tmp_path, uuid="u", instance="i")
    run = SinkTests.run("r1", [Partition("blocks", 0, 0, 100, 3)])
    sink.prepare(run)
    before = sink._run_file("r1").read_bytes()
    run.record["state"] = "failed"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        sink.update_run(run)
    monkeypatch.undo()
    assert sink._run_file("r1").read_bytes() == before
    assert [p.name for p in sink._run_file("r1").parent.iterdir()] == ["run.json"]
