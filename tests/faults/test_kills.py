"""Processes killed mid-run — a Dask worker, the Flight server, the driver — and the export
still ends exact: every block once, verified byte for byte against the source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source

from ._support import ROOT, ServerProcess, SlowSource, ledger_count, verify_and_record, wait_for
from .conftest import VOLUME

#: seconds each partition's read waits: ~30 partitions on 2 workers last ~5 s
DELAY = 0.3


def _cmd(location: str, sink: str, scheduler: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dvidetl", "run", "--uuid", "k", "--flight", location,
            "--sink", sink, "--cluster", scheduler, "--partition-blocks", "8", "--quiet", *extra]


def _popen(cmd: list[str], log) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def slow_server():
    src = SlowSource(open_source(f"synthetic://k?{VOLUME}"), DELAY)
    with start_server(src) as srv:
        yield srv
    src.close()


def _alive(p: subprocess.Popen, logf):
    def check():
        if p.poll() is not None:
            raise AssertionError(f"run ended early ({p.returncode}): {logf.read_text()[-3000:]}")
    return check


def test_worker_sigkilled_mid_run(slow_server, cluster, tmp_path, nodeid):
    from distributed import Client

    out = tmp_path / "out"
    logf = tmp_path / "run.log"
    with Client(cluster.scheduler_address) as dc:
        pids = dc.run(os.getpid)
        with open(logf, "wb") as log:
            p = _popen(_cmd(slow_server.location, f"parquet://{out}", cluster.scheduler_address),
                       log)
            try:
                _, n = wait_for(lambda: (lambda r: r if r[1] >= 4 else None)(ledger_count(out, "k")),
                                120, "4 committed partitions", alive=_alive(p, logf))
                addr, victim = sorted(pids.items())[0]
                os.kill(victim, signal.SIGKILL)
                rc = p.wait(240)
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        assert rc == 0, logf.read_text()[-3000:]
        # the nanny brought up a fresh worker process; the killed one is gone
        wait_for(lambda: len(dc.scheduler_info()["workers"]) == 2, 60, "the worker to restart")
        assert victim not in dc.run(os.getpid).values()
    run_id, total = ledger_count(out, "k")
    assert n < total, "killed too late: every partition was already committed"
    o = verify_and_record(nodeid, "dask worker SIGKILL mid-run (nanny restarts it)",
                          location=slow_server.location, uuid="k", sink_url=f"parquet://{out}",
                          runs=1)
    assert o.exact, o.report.text()


def _keyed_committed(out, kind: str) -> int:
    return sum(1 for f in out.glob(f"*/k/export_ledger/*/{kind}-*.parquet"))


def test_worker_sigkilled_mid_indices(slow_server, cluster, tmp_path, nodeid):
    """Many small indices partitions; a worker dies while they run: each label range still
    ends committed exactly once (no label_index row twice, none missing)."""
    from distributed import Client

    out = tmp_path / "out"
    logf = tmp_path / "run.log"
    cmd = _cmd(slow_server.location, f"parquet://{out}", cluster.scheduler_address,
               "--scales", "0", "--index-partition-rows", "300", "--no-mapping")
    cmd[cmd.index("--partition-blocks") + 1] = "64"  # few block partitions: indices dominate
    with Client(cluster.scheduler_address) as dc:
        pids = dc.run(os.getpid)
        with open(logf, "wb") as log:
            p = _popen(cmd, log)
            try:
                n = wait_for(lambda: (lambda k: k if k >= 2 else None)(_keyed_committed(out, "indices")),
                             120, "2 committed indices partitions", alive=_alive(p, logf))
                os.kill(sorted(pids.items())[0][1], signal.SIGKILL)
                rc = p.wait(240)
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        assert rc == 0, logf.read_text()[-3000:]
    total = _keyed_committed(out, "indices")
    assert n < total, "killed too late: every indices partition was already committed"
    o = verify_and_record(nodeid, "dask worker SIGKILL mid-indices (many label ranges)",
                          location=slow_server.location, uuid="k", sink_url=f"parquet://{out}",
                          runs=1)
    assert o.exact, o.report.text()
    assert o.report.index_rows > 0 and o.report.index_diffs == 0


def test_flight_server_killed_and_restarted_mid_run(cluster, tmp_path, nodeid):
    out = tmp_path / "out"
    logf = tmp_path / "run.log"
    with ServerProcess(f"synthetic://k?{VOLUME}", delay=DELAY) as srv, open(logf, "wb") as log:
        p = _popen(_cmd(srv.location, f"parquet://{out}", cluster.scheduler_address,
                        "--retries", "5"), log)
        try:
            _, n = wait_for(lambda: (lambda r: r if r[1] >= 4 else None)(ledger_count(out, "k")),
                            120, "4 committed partitions", alive=_alive(p, logf))
            srv.kill()  # SIGKILL: open streams die mid-partition
            time.sleep(1.0)  # partitions fail against a dead port meanwhile
            srv.start()  # same port
            rc = p.wait(240)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        assert rc == 0, logf.read_text()[-3000:]
        run_id, total = ledger_count(out, "k")
        assert n < total, "killed too late: every partition was already committed"
        o = verify_and_record(nodeid, "Flight server SIGKILL mid-run, restarted",
                              location=srv.location, uuid="k", sink_url=f"parquet://{out}", runs=1)
    assert o.exact, o.report.text()


def test_driver_sigkilled_then_resumed(slow_server, cluster, tmp_path, nodeid, capsys):
    out = tmp_path / "out"
    logf = tmp_path / "run.log"
    cmd = _cmd(slow_server.location, f"parquet://{out}", cluster.scheduler_address)
    with open(logf, "wb") as log:
        p = _popen(cmd, log)
        try:
            run_id, n = wait_for(
                lambda: (lambda r: r if r[1] >= 4 else None)(ledger_count(out, "k")),
                120, "4 committed partitions", alive=_alive(p, logf))
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    from dvidetl.sinks import open_sink

    sink = open_sink(f"parquet://{out}", uuid="k", instance="segmentation")
    plan = sink.load_run(run_id).partitions
    # tasks the dead driver had submitted may still finish on the workers: let them settle
    time.sleep(2 * DELAY + 1)
    before = len(sink.done(run_id))
    assert before < len(plan), "killed too late: nothing left to resume"
    rc = cli(cmd[3:] + ["--resume", run_id])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "already done" in err
    o = verify_and_record(nodeid, "driver SIGKILL mid-run, then run --resume",
                          location=slow_server.location, uuid="k", sink_url=f"parquet://{out}",
                          runs=2, run_id=run_id)
    assert o.exact, o.report.text()
    assert len(sink.done(run_id)) == len(plan)
