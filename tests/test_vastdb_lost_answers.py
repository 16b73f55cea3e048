"""The VastDB sink's exactly-once code when the server's answers go missing, fast enough for
``make mutants`` (issue 22 item 4): the real ``vastdb`` SDK against the in-process wire
simulator (``dvidetl.testing.vastsim``), whose fault knobs lose exactly the answers a test
names (``limit=1``: one). No Dask cluster, no DVID server; ``tests/faults`` covers the same
code under random faults during whole runs."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest

from dvidetl.errors import UserError
from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
from dvidetl.sinks import open_sink
from dvidetl.sinks.vastdb import VastDBUnavailable
from dvidetl.tables import schema as S
from dvidetl.testing.env import environ
from dvidetl.testing.vastsim import start_vastsim

ACCESS, SECRET = "lost-access", "lost-secret-not-real"


@pytest.fixture(scope="module")
def sim():
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as s:
            yield s


def _blocks(mortons: list[int], body: bytes) -> pa.Table:
    n = len(mortons)
    return pa.table({
        "scale": [0] * n, "x": mortons, "y": [0] * n, "z": [0] * n, "morton": mortons,
        "supervoxels": [[1, 2]] * n, "labels": [[1, 1]] * n, "sv_voxels": [[5, 6]] * n,
        "raw_size": [1] * n, "crc32": [0] * n, "payload_size": [len(body)] * n, "nparts": [1] * n,
        "payload0": [body] * n, "payload1": [None] * n, "payload2": [None] * n, "payload3": [None] * n,
        "overflow": [False] * n,
    }, schema=S.BLOCKS)


def _delta(sim, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in sim.counters.items() if v - before.get(k, 0)}


def _finished_export(sink, blocks: dict[Partition, list[int]]) -> RunInfo:
    """Run ``old`` (created at 1.0) of ``blocks``' partitions, each written with its mortons
    (body ``o``), finished: the export an ``--overwrite`` replaces."""
    old = RunInfo("old", "u", "seg", list(blocks), created=1.0)
    sink.prepare(old)
    for part, mortons in blocks.items():
        sink.write_partition("old", part, {"blocks": _blocks(mortons, b"o")},
                             PartitionStats(part.key, part.kind, blocks=len(mortons)))
    sink.finish(old)
    return old


def _write_losing(sim, sink, part: Partition, command: str, caplog) -> dict:
    """``write_partition`` of run ``r``'s ``part`` (blocks 1, 2, 3) while the simulator loses
    exactly one answer of ``command`` after applying it; the counters' change."""
    before = dict(sim.counters)
    sim.set_faults(drop_after_apply_rate=1.0, commands=(command,), limit=1)
    try:
        with caplog.at_level(logging.INFO, logger="dvidetl.sinks.vastdb"):
            sink.write_partition("r", part, {"blocks": _blocks([1, 2, 3], b"a")},
                                 PartitionStats(part.key, part.kind, blocks=3))
    finally:
        sim.clear_faults()
    return _delta(sim, before)


def test_a_lost_commit_answer_is_resolved_by_the_ledger_not_by_another_try(sim, caplog):
    """The commit applies, its answer is lost once: the sink reads the ledger, finds the
    partition committed and reports it written. With ``tries=1`` there is no second
    transaction to fall back on, so only that ledger read can tell; the rows are there once
    and the body was sent once (blocks + ledger row: two inserts)."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/lostcommit?tries=1"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        part = Partition("blocks", 0, 0, 100, 3)
        sink.prepare(RunInfo("r", "u", "seg", [part]))
        hit = _write_losing(sim, sink, part, "PUT transaction", caplog)
        assert hit.get("dropped_after_apply") == 1, hit  # exactly one answer was lost
        assert hit["POST rows"] == 2, hit  # the body was not sent again
        assert f"{part.key}: commit outcome resolved by the ledger: committed" in caplog.text
        assert sink.read("blocks").column("morton").to_pylist() == [1, 2, 3]
        assert sink.ledger("r").column("rows").to_pylist() == [3]
        assert sink.is_done("r", part)


def test_a_transaction_that_fails_for_good_names_its_step(sim):
    """``prepare``'s first transaction (the schema) never gets an answer: after the URL's
    tries the error is one line (a ``UserError``: the CLI prints it without a traceback)
    naming the step, the sink and the last error, and the schema was not half-made: a
    ``prepare`` once the server answers again creates it and every table."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/noschema?tries=2"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        run = RunInfo("r", "u", "seg", [Partition("blocks", 0, 0, 100, 3)])
        before = dict(sim.counters)
        sim.set_faults(drop_rate=1.0, commands=("POST schema",))
        try:
            with pytest.raises(VastDBUnavailable) as ei:
                sink.prepare(run)
        finally:
            sim.clear_faults()
        msg = str(ei.value)
        assert isinstance(ei.value, UserError) and "\n" not in msg
        assert msg.startswith(f"{sink!r}: create schema failed 2 time(s), last with ConnectionError"), msg
        hit = _delta(sim, before)
        assert hit["POST schema"] == hit["dropped"] == 2, hit  # one per try, none after
        assert sink.runs() == []  # nothing stored
        sink.prepare(run)
        assert sink.runs() == ["r"]
        assert sink.read("blocks").num_rows == 0


def _mortons(sink, **kw) -> list[int]:
    return sorted(sink.read("blocks", columns=["morton"], **kw).column("morton").to_pylist())


def test_a_staged_run_is_published_at_finish_in_one_switch(sim):
    """``run --overwrite`` on VastDB without a cluster: the staged run (another plan) writes
    its own tables; plain readers see only the finished run's rows until the staged run's
    ``finish``, then only its rows (and a fresh sink too); the staged and replaced tables are
    dropped, the new run is published and finished, the old one superseded."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/staged"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        a, b = Partition("blocks", 0, 0, 100, 2), Partition("blocks", 0, 100, 200, 2)
        _finished_export(sink, {a: [1, 2], b: [101, 102]})
        whole = Partition("blocks", 0, 0, 200, 3)
        new = RunInfo("new", "u", "seg", [whole], created=2.0, record={"staged": True, "state": "running"})
        sink.prepare(new)
        sink.write_partition("new", whole, {"blocks": _blocks([5, 150, 199], b"n")},
                             PartitionStats(whole.key, whole.kind, blocks=3))
        assert _mortons(sink) == [1, 2, 101, 102]  # not published yet: the old export
        assert _mortons(sink, run_id="new") == [5, 150, 199]  # the staged run reads its own
        sink.finish(new)
        fresh = open_sink(url, uuid="u", instance="seg")
        for s in (sink, fresh):
            assert _mortons(s) == [5, 150, 199]
            assert set(s.read("blocks", columns=["payload0"]).column("payload0").to_pylist()) == {b"n"}
        assert fresh.load_run("new").record.get("published") is True
        assert fresh.load_run("new").state == "finished" and fresh.load_run("old").state == "superseded"
        assert fresh.latest_run() == "new" and fresh.done("new") == {whole.key}
        with fresh._session().transaction() as tx:
            names = {t.name for t in tx.bucket("bucket").schema("staged").tables()}
        assert "blocks" in names and not [n for n in names if "__" in n], names


def test_a_refused_publish_commit_is_redone_not_taken_for_done(sim):
    """The server refuses the commit of the publish switch (409: rolled back, nothing
    renamed). The switch writes, so it must commit: the sink redoes it, and readers see the
    new run's rows afterwards — taking the refused commit for done would mark the run
    published while plain readers still see the replaced export."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/refusedpublish"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        a = Partition("blocks", 0, 0, 100, 2)
        _finished_export(sink, {a: [1, 2]})
        new = RunInfo("new", "u", "seg", [a], created=2.0, record={"staged": True, "state": "running"})
        sink.prepare(new)
        sink.write_partition("new", a, {"blocks": _blocks([7, 8], b"n")},
                             PartitionStats(a.key, a.kind, blocks=2))
        before = dict(sim.counters)
        # the first commit of finish is the publish switch's
        sim.set_faults(commit_conflict_rate=1.0, commands=("PUT transaction",), limit=1)
        try:
            sink.finish(new)
        finally:
            sim.clear_faults()
        assert _delta(sim, before).get("conflict") == 1
        fresh = open_sink(url, uuid="u", instance="seg")
        assert _mortons(fresh) == [7, 8]
        assert fresh.latest_run() == "new" and fresh.load_run("old").state == "superseded"


def test_a_partition_talks_only_to_the_endpoint_its_key_picks(sim):
    """Two names of one server stand for two CNode VIPs: a partition's transaction, the
    ledger check and range reads inside it, and ``is_done`` all go to the endpoint its key
    picks (the load is spread by partition), none to the other."""
    from dvidetl.sinks._vastdb_support import with_endpoints

    url = with_endpoints(f"vastdb://127.0.0.1:{sim.port}/bucket/eps", f"localhost:{sim.port}")
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        parts = [Partition("blocks", 0, i * 10, i * 10 + 10, 1) for i in range(6)]
        sink.prepare(RunInfo("r", "u", "seg", parts))
        names = {f"http://127.0.0.1:{sim.port}": f"127.0.0.1:{sim.port}",
                 f"http://localhost:{sim.port}": f"localhost:{sim.port}"}
        picked = {p.key: sink._endpoint_for(p.key) for p in parts}
        assert set(picked.values()) == set(names)  # both endpoints have partitions
        for i, p in enumerate(parts):
            mine, other = names[picked[p.key]], next(v for k, v in names.items() if k != picked[p.key])
            before = dict(sim.counters)
            sink.write_partition("r", p, {"blocks": _blocks([i * 10 + 1], b"x")}, PartitionStats(p.key, p.kind, blocks=1))
            assert sink.is_done("r", p)
            hit = _delta(sim, before)
            assert hit.get(f"via {mine}", 0) >= 6 and hit.get(f"via {other}", 0) == 0, (p.key, hit)
        assert _mortons(sink) == [i * 10 + 1 for i in range(6)]


def test_every_step_that_fails_for_good_is_named(sim):
    """No transaction can begin (every ``POST ?transaction`` dropped): each of the sink's
    steps gives up after the URL's tries with one line naming itself."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/named?tries=2"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        part = Partition("blocks", 0, 0, 100, 3)
        run = RunInfo("r", "u", "seg", [part])
        open_sink(url, uuid="u", instance="seg").prepare(run)
        steps = {
            "load_run": lambda s: s.load_run("r"),
            "runs": lambda s: s.runs(),
            "ledger": lambda s: s.ledger("r"),
            "is_done": lambda s: s.is_done("r", part),
            f"forget {part.key}": lambda s: s.forget("r", part),
            "read blocks": lambda s: s.read("blocks", run_id="r"),
            "update run record": lambda s: s.update_run(run),
        }
        for step, call in steps.items():
            sink = open_sink(url, uuid="u", instance="seg")  # nothing cached
            if step != "load_run":
                sink._runs["r"] = run
            sim.set_faults(drop_rate=1.0, commands=("POST transaction",))
            try:
                with pytest.raises(VastDBUnavailable) as ei:
                    call(sink)
            finally:
                sim.clear_faults()
            assert str(ei.value).startswith(f"{sink!r}: {step} failed 2 time(s), last with "), (step, str(ei.value))


@pytest.mark.parametrize("skip", [0, 2])
def test_a_ddl_commit_that_never_arrived_is_redone(sim, skip):
    """``prepare``'s commits never reach the server, one at a time (the schema's, the first
    table's): the sink rolls the abandoned transaction back (the server would hold its
    schema or table for 15 minutes, refusing every retry) and redoes the step at once; every
    table exists afterwards and no transaction is left open — a DDL transaction must
    commit, its lost commit is not taken for done."""
    from dvidetl.sinks.vastdb import ALL_TABLES

    url = f"vastdb://127.0.0.1:{sim.port}/bucket/ddl{skip}?tries=3"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        before = dict(sim.counters)
        sim.set_faults(drop_rate=1.0, commands=("PUT transaction",), skip=skip, limit=1)
        try:
            sink.prepare(RunInfo("r", "u", "seg", [Partition("blocks", 0, 0, 100, 3)]))
        finally:
            sim.clear_faults()
        delta = _delta(sim, before)
        assert delta.get("dropped") == 1 and not delta.get("error_409"), delta
        assert delta.get("DELETE transaction") == 1, delta  # the one rollback, of the lost commit
        assert not sim._server.state.txs  # nothing left open
        with sink._session().transaction() as tx:
            names = {t.name for t in tx.bucket("bucket").schema(f"ddl{skip}").tables()}
        assert names == set(ALL_TABLES)
        assert sink.runs() == ["r"]


def test_an_attempt_whose_rollback_never_arrived_is_rolled_back_before_the_retry(sim, caplog):
    """A step's first attempt creates a table, then its connection breaks; the SDK's rollback
    of that transaction never reaches the server (dropped). The transaction would hold the
    table for 15 minutes, refusing the retry's create (409) every time: the sink rolls it
    back, says so, and the retry makes the table at once; nothing is left open."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/lostrollback?tries=3"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        sink.prepare(RunInfo("r", "u", "seg", [Partition("blocks", 0, 0, 100, 3)]))
        attempts: list[int] = []

        def step(tx):
            sink._schema_obj(tx, create=False).create_table("probe", pa.schema([("a", pa.int64())]))
            attempts.append(tx.txid)
            if len(attempts) == 1:
                raise ConnectionError("the step's connection broke after the create")

        before = dict(sim.counters)
        sim.set_faults(drop_rate=1.0, commands=("DELETE transaction",), limit=1)
        try:
            with caplog.at_level(logging.INFO, logger="dvidetl.sinks.vastdb"):
                sink._tx(step, "make the probe table", write=True)
        finally:
            sim.clear_faults()
        delta = _delta(sim, before)
        assert len(attempts) == 2 and delta.get("dropped") == 1 and not delta.get("error_409"), delta
        assert not sim._server.state.txs
        said = f"make the probe table: transaction {attempts[0]:#x} was left open by the failed attempt: rolled back"
        assert [r.getMessage() for r in caplog.records if "left open" in r.getMessage()] == [said]
        with sink._session().transaction() as tx:
            assert tx.bucket("bucket").schema("lostrollback").table("probe", fail_if_missing=False) is not None


def test_a_step_failing_once_is_rolled_back_once_by_the_sdk_alone(sim, caplog):
    """A step's first attempt fails inside its transaction (a broken connection), the SDK's
    rollback arrives: the sink sends no second rollback of its own (nothing was left open)
    and says nothing of one; the retry commits."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/onerollback?tries=3"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        sink.prepare(RunInfo("r", "u", "seg", [Partition("blocks", 0, 0, 100, 3)]))
        attempts: list[int] = []

        def step(tx):
            attempts.append(tx.txid)
            if len(attempts) == 1:
                raise ConnectionError("the step's connection broke")
            return "read"

        before = dict(sim.counters)
        with caplog.at_level(logging.DEBUG, logger="dvidetl.sinks.vastdb"):
            assert sink._tx(step, "a step", write=True) == "read"
        delta = _delta(sim, before)
        assert len(attempts) == 2 and delta.get("DELETE transaction") == 1, delta
        assert delta.get("PUT transaction") == 1 and not sim._server.state.txs, delta
        assert "transaction" not in " ".join(r.getMessage() for r in caplog.records if "a step:" in r.getMessage())


def test_a_lost_insert_answer_redoes_the_transaction_once_and_says_so(sim, caplog):
    """An insert's answer is lost once: the transaction is abandoned and redone whole (the
    blocks inserted again, by the new transaction only), the retry logged by the sink
    naming the partition, and the table format prepare found logged at DEBUG."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/lostinsert"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        part = Partition("blocks", 0, 0, 100, 3)
        with caplog.at_level(logging.DEBUG, logger="dvidetl.sinks.vastdb"):
            sink.prepare(RunInfo("r", "u", "seg", [part]))
        assert f"{sink!r}: table format {S.FORMAT}" in caplog.messages
        caplog.clear()
        hit = _write_losing(sim, sink, part, "POST rows", caplog)
        assert hit.get("dropped_after_apply") == 1 and hit["POST rows"] == 3, hit  # blocks, again, ledger
        retried = [r for r in caplog.records if "transaction failed" in r.getMessage()]
        assert len(retried) == 1 and retried[0].name == "dvidetl.sinks.vastdb", caplog.text
        assert retried[0].getMessage().startswith(f"{part.key}: transaction failed: ")
        assert sink.read("blocks").column("morton").to_pylist() == [1, 2, 3]
        assert sink.ledger("r").column("rows").to_pylist() == [3]


def test_rows_outside_are_removed_in_bounded_transactions_and_all_counted(sim, monkeypatch):
    """An earlier run's rows outside every partition of the new run's plan: ``outside``
    finds them, ``remove_outside`` deletes them at most ``REPAIR_ROWS`` per transaction (2
    here: 5 rows take 3 delete transactions) and answers how many it removed in all; the
    rows inside the plan stay."""
    import dvidetl.sinks.vastdb as V

    monkeypatch.setattr(V, "REPAIR_ROWS", 2)
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/outside"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        wide = Partition("blocks", 0, 0, 200, 7)
        sink.prepare(RunInfo("a", "u", "seg", [wide], created=1.0))
        sink.write_partition("a", wide, {"blocks": _blocks([1, 2, 150, 151, 152, 153, 154], b"a")},
                             PartitionStats(wide.key, wide.kind, blocks=7))
        narrow = Partition("blocks", 0, 0, 100, 2)
        run = RunInfo("b", "u", "seg", [narrow], created=2.0)
        sink.prepare(run)
        found = sink.outside(run, set())
        assert [(o.table, o.rows, o.scale, o.lo, o.hi) for o in found] == [("blocks", 5, 0, 100, V.KEY_END)]
        assert found[0].where == ("blocks: 5 rows outside every partition of run b "
                                  f"(scale 0 morton [100, {V.KEY_END}); scale 0, first morton 150)")
        before = dict(sim.counters)
        assert sink.remove_outside(run, found) == 5
        assert _delta(sim, before)["PUT transaction"] == 3  # 2 + 2 + 1 rows, one commit each
        assert _mortons(sink) == [1, 2]
        assert sink.outside(run, set()) == []


def test_a_schema_holding_another_volume_is_refused_naming_it(sim):
    """One export per schema: preparing another volume (another uuid, then another
    instance) in it is one line naming the export there and its run, and stores nothing;
    the same volume's next run is stored beside the first."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/onevolume"
    part = Partition("blocks", 0, 0, 100, 3)
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        open_sink(url, uuid="u1", instance="seg").prepare(RunInfo("r1", "u1", "seg", [part]))
        for uuid, instance in (("u2", "seg"), ("u1", "other")):
            other = open_sink(url, uuid=uuid, instance=instance)
            with pytest.raises(UserError) as ei:
                other.prepare(RunInfo("r9", uuid, instance, [part]))
            assert str(ei.value) == (f"bucket/onevolume already holds the export of seg@u1 (run r1): "
                                     f"export {instance}@{uuid} into another schema")
            assert other.runs() == []
        same = open_sink(url, uuid="u1", instance="seg")
        same.prepare(RunInfo("r2", "u1", "seg", [part]))
        assert same.runs() == ["r1", "r2"]


def test_a_spilled_table_is_streamed_inside_the_transaction(sim, tmp_path):
    """A partition spilled to disk (``export.spill``) is read group by group inside its
    transaction, never all at once before it: with a cell over the limit in its last group,
    the earlier groups' inserts are already sent when the bad cell is found; the transaction
    then ends uncommitted, so nothing of the partition is visible and its ledger row absent."""
    import os

    from dvidetl.export.spill import SpillBudget, close_tables

    url = f"vastdb://127.0.0.1:{sim.port}/bucket/streamed"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        part = Partition("blocks", 0, 0, 1000, 41)
        sink.prepare(RunInfo("r", "u", "seg", [part]))
        sp = SpillBudget(1).table("blocks", S.BLOCKS, tmp_path)
        body = os.urandom(100_000)
        for lo in (0, 20):
            sp.append(_blocks(list(range(lo, lo + 20)), body))
        sp.append(_blocks([40], b"z" * (S.DEFAULT_CELL_LIMIT + 1)))
        tables = {"blocks": sp.result()}
        assert type(tables["blocks"]).__name__ == "SpilledTable"
        before = dict(sim.counters)
        try:
            with pytest.raises(ValueError, match="payload0.*cell limit"):
                sink.write_partition("r", part, tables, PartitionStats(part.key, part.kind, blocks=41))
        finally:
            close_tables(tables)
        hit = _delta(sim, before)
        assert hit.get("POST rows", 0) >= 1 and hit.get("PUT transaction", 0) == 0, hit
        assert sink.ledger("r").num_rows == 0 and sink.read("blocks").num_rows == 0


def test_a_replaced_table_is_emptied_in_bounded_transactions_before_it_is_dropped(sim, monkeypatch):
    """A staged run's finish empties each replaced table ``REPAIR_ROWS`` rows per transaction
    (2 here: the old export's 5 blocks take 3 delete transactions, the empty tables one
    each) selecting the row ids from the replaced table itself — not from the table that
    now holds the new run's rows — then drops it."""
    import dvidetl.sinks.vastdb as V

    monkeypatch.setattr(V, "REPAIR_ROWS", 2)
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/emptied"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        a = Partition("blocks", 0, 0, 100, 5)
        _finished_export(sink, {a: [1, 2, 3, 4, 5]})
        new = RunInfo("new", "u", "seg", [a], created=2.0, record={"staged": True, "state": "running"})
        sink.prepare(new)
        sink.write_partition("new", a, {"blocks": _blocks([7, 8, 9], b"n")}, PartitionStats(a.key, a.kind, blocks=3))
        deletes: dict[str, int] = {}
        real_tx = sink._tx

        def counted(fn, what, *args, **kw):
            if what.startswith("delete rows of "):
                name = what[len("delete rows of "):]
                deletes[name] = deletes.get(name, 0) + 1
                if deletes[name] > 20:
                    raise RuntimeError(f"{what}: never ends")
            return real_tx(fn, what, *args, **kw)

        monkeypatch.setattr(sink, "_tx", counted)
        sink.finish(new)
        assert deletes == {V.old_name(t, "new"): (3 if t == "blocks" else 1) for t in V.STAGED_TABLES}
        assert _mortons(sink) == [7, 8, 9]


def test_a_staged_run_finds_rows_outside_in_its_own_tables(sim):
    """``outside`` of a staged (``--overwrite``) run not yet published looks in the run's own
    tables: the published export's rows beyond the new plan are not the new run's strays
    (they go with the old tables at finish), the staged run's own stray row is."""
    url = f"vastdb://127.0.0.1:{sim.port}/bucket/stagedout"
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        sink = open_sink(url, uuid="u", instance="seg")
        wide = Partition("blocks", 0, 0, 200, 4)
        _finished_export(sink, {wide: [1, 2, 150, 160]})
        narrow = Partition("blocks", 0, 0, 100, 2)
        new = RunInfo("new", "u", "seg", [narrow], created=2.0, record={"staged": True, "state": "running"})
        sink.prepare(new)
        sink.write_partition("new", narrow, {"blocks": _blocks([5, 6], b"n")},
                             PartitionStats(narrow.key, narrow.kind, blocks=2))
        assert sink.outside(new, {narrow.key}) == []
        # a stray row in the staged table itself (another plan's attempt) is found there
        wide_new = Partition("blocks", 0, 100, 300, 1)
        sink.write_partition("new", wide_new, {"blocks": _blocks([250], b"n")},
                             PartitionStats(wide_new.key, wide_new.kind, blocks=1))
        found = sink.outside(new, {narrow.key})
        assert [(o.table, o.rows, o.lo) for o in found] == [("blocks", 1, 100)]


def test_a_partitions_rows_are_located_by_its_key_range():
    """What messages name as where a partition's rows are (``Sink.location``, which the
    VastDB sink does not override): the table and the partition's key range in it."""
    from dvidetl.sinks.vastdb import VastDBSink

    part = Partition("indices", 0, 5, 90, 0, rows=3)
    blocks = Partition("blocks", 1, 8, 16, 4)
    assert VastDBSink.location(None, "label_index", part) == "label_index label [5, 90)"  # type: ignore[arg-type]
    assert VastDBSink.location(None, "blocks", blocks) == "blocks scale 1 morton [8, 16)"  # type: ignore[arg-type]
