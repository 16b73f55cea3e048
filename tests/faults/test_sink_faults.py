"""A sink that fails: transient write errors are retried (with backoff, inside the task) to an
exact export; a partition
that keeps failing is reported by the run (exit 1, its key, how to resume) and completed by
``--resume`` once the fault is gone."""

from __future__ import annotations

import pytest

from dvidetl.cli import main as cli
from dvidetl.export.tasks import WRITE_BACKOFF_S, WRITE_TRIES
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source
from dvidetl.testing.faulty_sink import attempts, faults

from ._support import verify_and_record
from .conftest import VOLUME


@pytest.fixture(scope="module")
def server():
    src = open_source(f"synthetic://fs?{VOLUME}")
    with start_server(src) as srv:
        yield srv
    src.close()


def _run(server, cluster, sink, *extra):
    return cli(["run", "--uuid", "fs", "--flight", server.location, "--sink", sink,
                "--cluster", cluster.scheduler_address, "--partition-blocks", "8", "--quiet",
                *extra])


def test_transient_sink_failures_are_retried(server, cluster, tmp_path, nodeid, capsys):
    out = tmp_path / "out"
    sink = f"flaky+parquet://{out}?rate=0.5&fails=2&seed=3"
    rc = _run(server, cluster, sink, "--retries", "2")
    err = capsys.readouterr().err
    assert rc == 0, err
    run_id = next((out / "segmentation" / "fs" / "runs").iterdir()).name
    # block partitions retried their write inside the task (same process), backing off
    # (>= half the base delay, doubling); the streamed mapping / label indices cannot be
    # re-sent, so Dask re-ran those tasks
    tries = attempts(out, run_id)
    blocks = {k: v for k, v in tries.items() if k.startswith("blocks-")}
    assert len(blocks) >= 5
    for key, v in blocks.items():
        assert len(v) == 3 and len({pid for pid, _ in v}) == 1, (key, v)
        gaps = [b[1] - a[1] for a, b in zip(v, v[1:], strict=False)]
        assert gaps[0] >= 0.5 * WRITE_BACKOFF_S and gaps[1] >= WRITE_BACKOFF_S, (key, gaps)
    injected = faults(out, run_id)
    # half the partitions failed twice each, half of those after their data files landed
    assert len(injected) >= 5 and set(injected.values()) == {2}, injected
    o = verify_and_record(nodeid, "sink write fails transiently (EIO, before/after data)",
                          location=server.location, uuid="fs", sink_url=sink, runs=1)
    assert o.exact, o.report.text()
    assert o.found > 150


def test_partition_that_keeps_failing_is_reported_then_resumed(server, cluster, tmp_path,
                                                               nodeid, capsys):
    first = next(open_source(f"synthetic://fs?{VOLUME}").read_blocks(0, 0, 1 << 40))
    m = int(first.column("morton")[0].as_py())
    out = tmp_path / "out"
    rc = _run(server, cluster, f"flaky+parquet://{out}?poison=0:{m}", "--retries", "2")
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 failed" in err and "FAILED blocks-s0-" in err and "injected poisoned partition" in err
    assert "--resume" in err
    run_id = next((out / "segmentation" / "fs" / "runs").iterdir()).name
    # each of the 3 task attempts (--retries 2) tried the write WRITE_TRIES times, then reported
    assert sum(faults(out, run_id).values()) == 3 * WRITE_TRIES
    # the failed partition is visible as such: verify names it, nothing else is missing
    from dvidetl.flight.client import FlightClient
    from dvidetl.read.verify import verify_export
    from dvidetl.sinks import open_sink

    c = FlightClient(server.location, uuid="fs")
    rep = verify_export(c, open_sink(f"parquet://{out}", uuid="fs", instance="segmentation"))
    c.close()
    assert not rep.ok and rep.partitions_unfinished == 1 and 0 < rep.missing <= 16
    assert rep.duplicated == 0 and rep.extra == 0
    # the fault is gone: resume finishes exactly the missing partition
    rc = _run(server, cluster, f"parquet://{out}", "--resume", run_id)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 written now" in err
    o = verify_and_record(nodeid, "sink partition keeps failing -> reported, resumed",
                          location=server.location, uuid="fs", sink_url=f"parquet://{out}",
                          runs=2, run_id=run_id)
    assert o.exact, o.report.text()


def test_failed_partition_output_has_no_traceback(server, tmp_path):
    """Through `python -m dvidetl run` with its own LocalCluster, as a user runs it: a
    partition that cannot be written is one FAILED line in the summary, no worker traceback."""
    import subprocess
    import sys

    first = next(open_source(f"synthetic://fs?{VOLUME}").read_blocks(0, 0, 1 << 40))
    m = int(first.column("morton")[0].as_py())
    p = subprocess.run(
        [sys.executable, "-m", "dvidetl", "run", "--uuid", "fs", "--flight", server.location,
         "--sink", f"flaky+parquet://{tmp_path}/out?poison=0:{m}", "--workers", "1",
         "--dashboard-address", ":0", "--partition-blocks", "64", "--retries", "0", "--quiet",
         "--no-indices", "--no-mapping"],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "FAILED blocks-s0-" in p.stderr and "injected poisoned partition" in p.stderr
    assert "Traceback" not in p.stderr and "Compute Failed" not in p.stderr, p.stderr


def test_killed_worker_in_one_of_two_sinks_resumes_per_sink(server, cluster, tmp_path, nodeid,
                                                            capsys):
    """Two sinks (issue 27 item 4): the second one's write of one partition kills its worker
    process every time (``mode=die``: as the kernel's OOM killer would). The first sink
    holds that partition (written before the kill), the run stops (exit 1, naming the
    partition and how to resume); ``--resume`` with the fault gone writes each partition
    only where it is missing, and both sinks verify exact."""
    first = next(open_source(f"synthetic://fs?{VOLUME}").read_blocks(0, 0, 1 << 40))
    m = int(first.column("morton")[0].as_py())
    a, b = tmp_path / "a", tmp_path / "b"
    good, dying = f"parquet://{a}", f"flaky+parquet://{b}?poison=0:{m}&mode=die"
    rc = cli(["run", "--uuid", "fs", "--flight", server.location, "--sink", good, "--sink", dying,
              "--cluster", cluster.scheduler_address, "--partition-blocks", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "killed its worker every time it ran" in err and "--resume" in err
    from dvidetl.sinks import open_sink

    sa = open_sink(good, uuid="fs", instance="segmentation")
    sb = open_sink(f"parquet://{b}", uuid="fs", instance="segmentation")
    (run_id,) = sa.runs()
    assert sb.runs() == [run_id]
    run = sa.load_run(run_id)
    poisoned = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 0 and p.lo <= m < p.hi)
    # the good sink took the partition before the other sink's write killed the worker
    assert poisoned.key in sa.done(run_id) and poisoned.key not in sb.done(run_id)
    assert sa.load_run(run_id).state in ("failed", "finished") and sb.load_run(run_id).state == "failed"
    had_a, had_b = sa.done(run_id), sb.done(run_id)

    rc = cli(["run", "--uuid", "fs", "--flight", server.location, "--sink", good,
              "--sink", f"parquet://{b}", "--cluster", cluster.scheduler_address, "--quiet",
              "--resume", run_id, "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    import json

    doc = json.loads(cap.out)
    n = len(run.partitions)
    ra, rb = doc["sinks"]
    assert ra["partitions"] == {"planned": n, "written": n - len(had_a), "already_done": len(had_a), "failed": 0}
    assert rb["partitions"] == {"planned": n, "written": n - len(had_b), "already_done": len(had_b), "failed": 0}
    assert ra["complete"] and rb["complete"] and ra["blocks"] == rb["blocks"]
    # the table's row is the sink whose writes killed the worker (the other verified too)
    for url, key in ((good, nodeid + "[first sink]"), (f"parquet://{b}", nodeid)):
        o = verify_and_record(key, "two sinks, one kills its worker -> resumed per sink",
                              location=server.location, uuid="fs", sink_url=url, runs=2, run_id=run_id)
        assert o.exact, o.report.text()
        assert o.found == ra["blocks"]
