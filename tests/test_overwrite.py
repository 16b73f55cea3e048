"""A second run into an existing export (issue 22 item 1): a plain run refuses, ``--overwrite``
replaces the old rows only when the new run finishes (a run killed before that leaves the old
export exactly as it was, for plain readers too), and after any finished run every plain
reader (DuckDB, pandas, pyarrow.dataset; our readers) sees each source row exactly once —
on Parquet and on VastDB (vastsim through the real SDK)."""

from __future__ import annotations

import time

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest

from dvidetl.cli import main as cli
from dvidetl.export.kinds import RunInfo
from dvidetl.export.tasks import Secret, export_partition, task_context
from dvidetl.flight.client import FlightClient
from dvidetl.flight.server import start_server
from dvidetl.read.verify import verify_export
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.testing.env import environ
from dvidetl.testing.vastsim import start_vastsim

OLD = "synthetic://ow?size=384,384,256&scales=2&seed=3&empty=0.3"
NEW = "synthetic://ow?size=384,384,256&scales=2&seed=7&empty=0.3"
ACCESS, SECRET = "AKIDOVERWRITE", "overwrite-secret-only-in-env"  # noqa: S105 - test key


@pytest.fixture(scope="module")
def servers():
    srcs = [open_source(OLD), open_source(NEW)]
    with start_server(srcs[0]) as a, start_server(srcs[1]) as b:
        yield a, b
    for s in srcs:
        s.close()


def _run(server, cluster, sink, *extra) -> int:
    return cli(["run", "--uuid", "ow", "--flight", server.location, "--sink", sink,
                "--cluster", cluster.scheduler_address, "--quiet", *extra])


def _source_blocks(server) -> set[tuple[int, int]]:
    with FlightClient(server.location, uuid="ow") as c:
        return {(s.scale, int(m)) for s in c.info().scales
                for b in c.read_blocks(s.scale, 0, 1 << 62) for m in b.column("morton").to_pylist()}


def _verify(server, sink, run_id=None):
    with FlightClient(server.location, uuid="ow") as c:
        return verify_export(c, sink, run_id)


def _killed_overwrite(server, sink_url, sink, old_run: RunInfo, parts: int) -> RunInfo:
    """What a `run --overwrite` killed after ``parts`` committed partitions leaves: its run
    stored (staged) and those partitions committed by the real task code."""
    from dvidetl.export.planning import make_plan

    class Ep:
        location, token, instance = server.location, Secret(None), old_run.instance

    with FlightClient(server.location, uuid="ow") as c:
        Ep.info = c.info()
        plan = make_plan(Ep.info, c.count, None, 8, count_keys=c.count_keys)
    run = RunInfo(run_id=f"{old_run.run_id}-new", uuid="ow", instance=old_run.instance,
                  partitions=plan, options=old_run.options, volume=old_run.volume,
                  created=time.time(), record={"staged": True, "state": "running", "source": NEW})
    sink.prepare(run)
    ctx = task_context(run, Ep, sink_url)
    for p in run.partitions[::-1][:parts]:
        assert not export_partition(ctx, p).skipped
    return run


def _plain_parquet(root) -> dict[str, list]:
    """(scale, morton) of every block row as DuckDB, pandas and pyarrow.dataset read the
    table directory of a Parquet export."""
    d = root / "segmentation" / "ow" / "blocks"
    got = {"duckdb": duckdb.sql(f"SELECT scale, morton FROM read_parquet('{d}/**/*.parquet')").fetchall()}
    df = pd.read_parquet(d, columns=["scale", "morton"])
    got["pandas"] = list(zip(df["scale"].tolist(), df["morton"].tolist(), strict=True))
    t = ds.dataset(str(d)).to_table(columns=["scale", "morton"])
    got["pyarrow.dataset"] = list(zip(t.column("scale").to_pylist(), t.column("morton").to_pylist(), strict=True))
    return got


def _exactly(rows: list, want: set) -> None:
    assert len(rows) == len(set(rows)) == len(want) and set(rows) == want


def _exported_then_refused(servers, cluster, url: str, capsys):
    """A finished export of the old source; a plain second run (another plan) refuses with
    one line naming both ways on."""
    old_srv, new_srv = servers
    assert _run(old_srv, cluster, url, "--partition-blocks", "8") == 0
    sink = open_sink(url, uuid="ow", instance="segmentation")
    old = sink.load_run(sink.latest_run())
    capsys.readouterr()
    assert _run(new_srv, cluster, url, "--partition-blocks", "16") == 2
    err = capsys.readouterr().err
    assert f"--resume {old.run_id}" in err and "--overwrite" in err and "Traceback" not in err
    return sink, old


def test_parquet_second_run_refuses_then_overwrite_switches_at_finish(servers, cluster, tmp_path, capsys):
    old_srv, new_srv = servers
    url = f"parquet://{tmp_path}/out"
    sink, old = _exported_then_refused(servers, cluster, url, capsys)
    want_old, want_new = _source_blocks(old_srv), _source_blocks(new_srv)
    assert want_old != want_new
    # an overwrite killed half-way: plain readers and verify still see the old export exactly
    new = _killed_overwrite(new_srv, url, sink, old, parts=3)
    for rows in _plain_parquet(tmp_path / "out").values():
        _exactly(rows, want_old)
    assert sink.latest_run() == old.run_id
    assert _verify(old_srv, sink).ok
    # resumed to the end: the switch happens, every plain reader sees the new rows once
    assert _run(new_srv, cluster, url, "--resume", new.run_id) == 0
    for rows in _plain_parquet(tmp_path / "out").values():
        _exactly(rows, want_new)
    assert sink.latest_run() == new.run_id
    rep = _verify(new_srv, sink)
    assert rep.ok, rep.text()
    assert sink.load_run(old.run_id).state == "superseded"
    assert sink.load_run(new.run_id).state == "finished"
    assert not (tmp_path / "out" / "segmentation" / "ow" / ".staging" / new.run_id).exists()
    # a plain --overwrite with another plan (the issue's --partition-blocks 16): still one copy
    assert _run(new_srv, cluster, url, "--partition-blocks", "16", "--overwrite") == 0
    for rows in _plain_parquet(tmp_path / "out").values():
        _exactly(rows, want_new)
    from dvidetl.read import open_export

    ex = open_export(url)
    assert {(0, int(m)) for m in ex.read("blocks", scale=0, columns=["morton"]).column("morton").to_pylist()} \
        == {b for b in want_new if b[0] == 0}


@pytest.fixture(scope="module")
def sim():
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as s:
            yield s


def _vast_blocks(sink, name: str = "blocks") -> list:
    """Every row of the stored table, read by the SDK as any plain client would."""
    with sink._session().transaction() as tx:
        t = tx.bucket(sink.cfg.bucket).schema(sink.cfg.schema).table(name)
        r = t.select(columns=["scale", "morton"]).read_all()
    return list(zip(r.column("scale").to_pylist(), r.column("morton").to_pylist(), strict=True))


def test_vastdb_second_run_refuses_then_overwrite_switches_at_finish(servers, cluster, sim, capsys):
    old_srv, new_srv = servers
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/overwrite"
    sink, old = _exported_then_refused(servers, cluster, url, capsys)
    want_old, want_new = _source_blocks(old_srv), _source_blocks(new_srv)
    new = _killed_overwrite(new_srv, url, sink, old, parts=3)
    _exactly(_vast_blocks(sink), want_old)
    assert _verify(old_srv, open_sink(url, uuid="ow", instance="segmentation")).ok
    assert _run(new_srv, cluster, url, "--resume", new.run_id) == 0
    fresh = open_sink(url, uuid="ow", instance="segmentation")
    _exactly(_vast_blocks(fresh), want_new)
    assert fresh.latest_run() == new.run_id
    rep = _verify(new_srv, fresh)
    assert rep.ok, rep.text()
    assert fresh.load_run(old.run_id).state == "superseded"
    # the records live in export_runs: status reads them like run.json
    import json

    capsys.readouterr()
    assert cli(["status", "--sink", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    st = {r["run_id"]: r for r in doc["runs"]}
    assert doc["current_run"] == new.run_id
    assert st[old.run_id]["state"] == "superseded" and st[old.run_id]["superseded_by"] == new.run_id
    assert st[new.run_id]["state"] == "finished" and st[new.run_id]["staged"]
    assert st[new.run_id]["partitions_done"] == st[new.run_id]["partitions_planned"]
    assert st[new.run_id]["result"]["blocks"] == len(want_new) and st[old.run_id]["source"] == old_srv.location
    with fresh._session().transaction() as tx:
        names = {t.name for t in tx.bucket(fresh.cfg.bucket).schema(fresh.cfg.schema).tables()}
    assert not [n for n in names if "__" in n], names  # staged and replaced tables are gone


def test_status_of_a_finished_and_a_running_run(servers, cluster, tmp_path, capsys):
    """`dvidetl status`: every run with its state, partitions done/planned, errors and verify
    outcome; --json is one document on stdout, the text on stderr. The record holds the
    source without secrets, the requested and resolved uuid and the options."""
    import json

    old_srv, new_srv = servers
    url = f"parquet://{tmp_path}/out"
    assert _run(old_srv, cluster, url, "--partition-blocks", "8") == 0
    assert cli(["verify", "--uuid", "ow", "--flight", old_srv.location, "--sink", url, "--in-process"]) == 0
    sink = open_sink(url, uuid="ow", instance="segmentation")
    old = sink.load_run(sink.latest_run())
    new = _killed_overwrite(new_srv, url, sink, old, parts=2)
    capsys.readouterr()
    assert cli(["status", "--sink", url, "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["current_run"] == old.run_id and [r["run_id"] for r in doc["runs"]] == [old.run_id, new.run_id]
    a, b = doc["runs"]
    assert a["state"] == "finished" and a["partitions_done"] == a["partitions_planned"] == len(old.partitions)
    assert a["verify"]["exact"] is True and a["verify"]["counters"]["missing"] == 0
    assert a["source"] == old_srv.location and a["uuid_requested"] == a["uuid_resolved"] == "ow"
    assert a["options"]["partition_blocks"] == 8 and a["result"]["blocks"] == a["blocks_done"] > 0
    assert a["errors"] == 0 and a["failed_partitions"] == []
    assert b["state"] == "running" and b["staged"] and b["partitions_done"] == 2 < b["partitions_planned"]
    assert b["last_commit"] is not None and b["verify"] is None
    assert f"run {new.run_id}: running" in cap.err and f"2/{b['partitions_planned']} done" in cap.err
    assert f"run {old.run_id}: finished" in cap.err and "exact" in cap.err
    assert cli(["status", "--sink", url, "--run", new.run_id]) == 0
    out = capsys.readouterr().out
    assert f"run {new.run_id}: running" in out and f"run {old.run_id}:" not in out


def test_run_record_keeps_no_secret(tmp_path):
    from dvidetl.urlquery import redact_url

    assert redact_url("dvid+http://user:pw@host:8000?uuid=ab&instance=seg&token=abc") == \
        "dvid+http://user:***@host:8000?uuid=ab&instance=seg&token=***"
    assert redact_url("synthetic://x?size=64,64,64&seed=3") == "synthetic://x?size=64,64,64&seed=3"
