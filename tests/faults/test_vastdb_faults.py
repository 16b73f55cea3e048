"""The VastDB sink under faults of the wire-level local server (dvidetl.testing.vastsim, the
real vastdb SDK talking HTTP to it): 503 SlowDown, dropped connections, lost responses and
commit conflicts at random, and a full outage of inserts and commits mid-run. Retried (SDK
backoff, per-transaction retries, task retries) and resolved by the ledger: exact."""

from __future__ import annotations

import os
import threading

import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source

from ._support import verify_and_record
from .conftest import VOLUME


@pytest.fixture(scope="module")
def sim(cluster):
    from dvidetl.testing.vastsim import start_vastsim

    with start_vastsim(None, access_key=os.environ["VASTDB_ACCESS_KEY"],
                       secret_key=os.environ["VASTDB_SECRET_KEY"]) as s:
        yield s


@pytest.fixture(scope="module")
def server():
    src = open_source(f"synthetic://vf?{VOLUME}")
    with start_server(src) as srv:
        yield srv
    src.close()


def _run(server, cluster, sink, *extra) -> int:
    return cli(["run", "--uuid", "vf", "--flight", server.location, "--sink", sink,
                "--cluster", cluster.scheduler_address, "--partition-blocks", "16", "--quiet",
                *extra])


def _fired(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) - before.get(k, 0) and
            any(w in k.lower() for w in ("slowdown", "drop", "conflict"))}


def test_vastdb_random_503_drops_and_conflicts(sim, server, cluster, nodeid, capsys):
    sink = f"vastdb://127.0.0.1:{sim.port}/bucket/rnd"
    before = dict(sim.counters)
    # on inserts, queries and commits, the driver's DDL commits in prepare() included: a
    # dropped commit or rollback there left a table locked by the abandoned transaction (409
    # until it expired) until the sink rolled it back itself; seed 17 hit one
    sim.set_faults(slowdown_rate=0.1, drop_rate=0.05, drop_after_apply_rate=0.05,
                   commit_conflict_rate=0.05, commands=("rows", "data", "PUT transaction"),
                   seed=17)
    try:
        rc = _run(server, cluster, sink, "--retries", "5")
        err = capsys.readouterr().err
    finally:
        sim.clear_faults()
    assert rc == 0, err
    fired = _fired(before, sim.counters)
    assert len(fired) >= 3, f"faults did not fire: {fired}"
    o = verify_and_record(nodeid, "VastDB 503/drops/lost responses/409 at random",
                          location=server.location, uuid="vf", sink_url=sink, runs=1)
    assert o.exact, o.report.text()


def test_vastdb_outage_of_inserts_and_commits(sim, server, cluster, nodeid, capsys):
    """Every insert and commit answers 503 for the first 4 s of the run: the SDK's backoff
    (and the sink's transaction retries) ride it out, nothing is lost or doubled."""
    sink = f"vastdb://127.0.0.1:{sim.port}/bucket/outage"
    before = dict(sim.counters)
    sim.set_faults(slowdown_rate=1.0, commands=("POST rows", "PUT transaction"), seed=1)
    timer = threading.Timer(4.0, sim.clear_faults)
    timer.start()
    try:
        rc = _run(server, cluster, sink, "--retries", "5")
        err = capsys.readouterr().err
    finally:
        timer.cancel()
        sim.clear_faults()
    assert rc == 0, err
    fired = _fired(before, sim.counters)
    # backed-off retries are few by design: each worker's first write waits out the outage
    assert sum(fired.values()) >= 2, f"the outage did not hit the run: {fired}"
    o = verify_and_record(nodeid, "VastDB 4 s outage: every insert/commit 503",
                          location=server.location, uuid="vf", sink_url=sink, runs=1)
    assert o.exact, o.report.text()
