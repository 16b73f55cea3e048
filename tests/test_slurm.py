"""`--cluster slurm` on a REAL single-node SLURM (munge + slurmctld + slurmd).

The module fixture brings SLURM up with `../shared/slurm/single-node-up.sh up` (as root;
it installs the Debian packages if needed, ~20 s from clean, ~1-3 s when already up) and
tears it down when this module is done. Where SLURM cannot start (not root, no script, no
apt), every test here skips with the reason; `.ci/run` fails the CI run if that happens.

What is proven: workers are SLURM jobs running the driver's interpreter, logs go to the log
directory (never the cwd), a job SLURM rejects is a one-line error, a scancelled worker job
is replaced and its tasks rescheduled, and (with the `run` command) a multi-scale export
over SLURM workers — also one whose worker job is scancelled mid-run — verifies exactly once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = Path(
    os.environ.get("DVIDETL_SLURM_SCRIPT", ROOT.parent / "shared" / "slurm" / "single-node-up.sh")
)
#: Advertise more CPUs than the 2-core CI machine has, so a replacement job can start while
#: a cancelled one is still completing (see the README's pitfall 7).
SLURM_ENV = {"SLURM_CI_CPUS": os.environ.get("SLURM_CI_CPUS", "4")}
JOB_NAME = "dvidetl-worker"
#: what the driver says when it resubmits a worker job SLURM took away
REPLACED = r"SLURM worker job {job} ended \((CANCELLED|COMPLETING)\); submitting a replacement"

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def _sh(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_SH), action],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **SLURM_ENV},
        cwd="/",
    )


@pytest.fixture(scope="module")
def slurm() -> Iterator[str]:
    """A running single-node SLURM for this module; torn down (jobs cancelled, daemons
    stopped) as soon as the module is done, so later tests never see it."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root to start slurmctld/slurmd (not root)")
    if not SLURM_SH.is_file():
        pytest.skip(f"SLURM bring-up script not found at {SLURM_SH}")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    t0 = time.monotonic()
    try:
        up = _sh("up", timeout=400)
    except subprocess.TimeoutExpired:
        _sh("down", timeout=120)
        pytest.skip("single-node SLURM did not come up within 400 s")
    if up.returncode != 0:
        tail = "\n".join(up.stderr.strip().splitlines()[-8:])
        _sh("down", timeout=120)
        pytest.skip(f"single-node SLURM could not start (rc={up.returncode}):\n{tail}")
    print(f"[slurm] up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        yield str(SLURM_SH)
    finally:
        down = _sh("down", timeout=180)
        print(f"[slurm] down rc={down.returncode}", file=sys.stderr)


def _our_jobs() -> dict[str, str]:
    """job id -> state for the dvidetl worker jobs in the queue."""
    out = subprocess.run(
        ["squeue", "-h", "-n", JOB_NAME, "-o", "%A %T"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _wait_no_jobs(timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while _our_jobs():
        if time.monotonic() > end:
            raise AssertionError(f"worker jobs still queued after close: {_our_jobs()}")
        time.sleep(0.5)


def _cluster_args(log_dir: Path, *extra: str) -> argparse.Namespace:
    from dvidetl.cluster import add_cluster_arguments

    p = argparse.ArgumentParser()
    add_cluster_arguments(p)
    return p.parse_args(
        [
            "--cluster", "slurm", "--worker-cores", "1", "--worker-memory", "2GiB",
            "--walltime", "00:15:00", "--interface", "lo", "--dashboard-address", "127.0.0.1:0",
            "--log-directory", str(log_dir), *extra,
        ]
    )  # fmt: skip


def _job_ids(client) -> set[str]:
    return set(client.run(lambda: os.environ.get("SLURM_JOB_ID", "")).values())


def _task_fn():
    """A task function shipped by value: SLURM workers cannot import this test module
    (tests/ is not on their path), and a module-level function would be pickled by name."""

    def slow_square(i: int) -> tuple[int, str]:
        time.sleep(0.3)
        return i * i, os.environ.get("SLURM_JOB_ID", "")

    return slow_square


def test_workers_are_slurm_jobs_and_survive_scancel(slurm, tmp_path, monkeypatch, capsys) -> None:
    from dvidetl.cluster import ClusterOptions, open_client

    monkeypatch.chdir(tmp_path)  # nothing may land in the cwd
    log_dir = tmp_path / "logs"
    slow_square = _task_fn()
    with open_client(ClusterOptions.from_args(_cluster_args(log_dir, "--jobs", "2"))) as client:
        err = capsys.readouterr().err
        assert "SLURM cluster: 2 worker jobs" in err and f"job logs in {log_dir}" in err
        assert "dashboard http://127.0.0.1:" in err
        client.wait_for_workers(2, timeout=120)
        queued = _our_jobs()
        ids = _job_ids(client)
        assert len(ids) == 2 and ids <= set(queued), (ids, queued)
        assert all(queued[j] == "RUNNING" for j in ids)
        # the workers run the driver's own interpreter (the project's virtualenv)
        assert set(client.run(lambda: sys.executable).values()) == {sys.executable}

        futures = client.map(slow_square, range(40))
        # wait until both jobs hold work, then take one away as SLURM would (preemption)
        victim = sorted(ids)[0]
        subprocess.run(["scancel", victim], check=True)
        results = client.gather(futures)
        assert [r for r, _ in results] == [i * i for i in range(40)]
        assert {j for _, j in results} <= ids | set(_our_jobs())
        # the lost job is replaced by a new one and the cluster is back at 2 workers
        end = time.monotonic() + 90
        while True:
            now = _job_ids(client)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < end, f"no replacement for job {victim}: {now}"
            time.sleep(1)
        assert re.search(REPLACED.format(job=victim), capsys.readouterr().err)
        # work after the replacement lands on both jobs, including the new one
        later = client.gather(client.map(slow_square, range(100, 110)))
        assert [r for r, _ in later] == [i * i for i in range(100, 110)]
    _wait_no_jobs()
    logs = sorted(p.name for p in log_dir.iterdir())
    assert "worker-job.sh" in logs
    assert sum(n.endswith(".err") for n in logs) >= 3  # 2 jobs + 1 replacement
    assert not list(tmp_path.glob("slurm-*.out")) and not list(tmp_path.glob("*.err"))


def test_rejected_job_is_a_one_line_error(slurm, tmp_path) -> None:
    from dvidetl.cluster import ClusterOptions, open_client
    from dvidetl.errors import UserError

    args = _cluster_args(tmp_path / "logs", "--jobs", "1", "--worker-memory", "64TiB")
    with pytest.raises(UserError, match="SLURM rejects the worker job") as info:
        with open_client(ClusterOptions.from_args(args)):
            pass
    assert "\n" not in str(info.value)
    assert _our_jobs() == {}


# ---------------------------------------------------------------- the export on SLURM ---

PY = sys.executable
#: multi-scale synthetic volumes over 3 scales: ~127 blocks (19 partitions of 8) for the
#: plain export, ~450 blocks (~115 partitions of 4) where a job is cancelled mid-run: long
#: enough that the run still has work when the driver notices the job is gone.
SRC = "synthetic://{uuid}?size=384,384,256&scales=3&seed=7"
SRC_BIG = "synthetic://{uuid}?size=512,512,512&scales=3&seed=7"


def _run_cmd(src: str, uuid: str, sink: str, log_dir: Path, *extra: str) -> list[str]:
    return [
        PY, "-m", "dvidetl", "run", "--uuid", uuid, "--source", src.format(uuid=uuid),
        "--sink", sink, "--cluster", "slurm", "--jobs", "2", "--worker-cores", "1",
        "--worker-memory", "2GiB", "--walltime", "00:15:00", "--interface", "lo",
        "--log-directory", str(log_dir), "--dashboard-address", "127.0.0.1:0", *extra,
    ]  # fmt: skip


def _check_exactly_once(src: str, uuid: str, sink_url: str, run_id: str) -> None:
    """`verify` passes, every planned partition has one ledger row, no block twice."""
    import numpy as np

    from dvidetl.cli import main as cli
    from dvidetl.sinks import open_sink

    rc = cli(["verify", "--uuid", uuid, "--source", src.format(uuid=uuid), "--sink", sink_url])
    assert rc == 0, "verify found differences"
    out_dir = Path(sink_url[len("parquet://") :])
    instance = next(p.name for p in out_dir.iterdir() if (p / uuid).is_dir())
    sink = open_sink(sink_url, uuid=uuid, instance=instance)
    plan = sink.load_run(run_id).partitions
    assert len(sink.done(run_id)) == len(plan)
    blocks = sink.read("blocks")
    key = blocks.column("morton").to_numpy().astype(np.uint64) + (
        blocks.column("scale").to_numpy().astype(np.uint64) << np.uint64(56)
    )
    assert len(np.unique(key)) == len(key), "a block is duplicated"
    assert len(key) == sum(p.blocks for p in plan)
    scales = int(re.search(r"scales=(\d+)", src).group(1))
    assert set(blocks.column("scale").to_pylist()) == set(range(scales))


def _run_id(stdout: str) -> str:
    ids = [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("run_id ")]
    assert ids, f"no run_id in the output: {stdout!r}"
    return ids[-1]


def test_multiscale_export_on_slurm_verifies(slurm, tmp_path, capsys) -> None:
    uuid = "slurm-ms"
    sink = f"parquet://{tmp_path}/out"
    log_dir = tmp_path / "logs"
    res = subprocess.run(
        _run_cmd(SRC, uuid, sink, log_dir, "--partition-blocks", "16", "--quiet"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SLURM cluster: 2 worker jobs" in res.stderr
    assert "dashboard http://127.0.0.1:" in res.stderr
    assert "0 blocks in export_errors" in res.stderr
    _check_exactly_once(SRC, uuid, sink, _run_id(res.stdout))
    _wait_no_jobs()
    # both worker jobs wrote their logs to the log directory, none to the cwd
    assert len(list(log_dir.glob(f"{JOB_NAME}-*.err"))) == 2
    assert not list(tmp_path.glob("slurm-*")) and not list(tmp_path.glob("*.err"))


def test_scancel_mid_export_still_exactly_once(slurm, tmp_path) -> None:
    uuid = "slurm-kill"
    sink = f"parquet://{tmp_path}/out"
    log_dir = tmp_path / "logs"
    p = subprocess.Popen(
        _run_cmd(SRC_BIG, uuid, sink, log_dir, "--partition-blocks", "4"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    victim = None
    try:
        # once the first partitions are committed (workers warm, ~110 partitions to go),
        # take one worker job away as SLURM would on preemption or walltime
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ledgers = list(Path(tmp_path, "out").glob(f"*/{uuid}/export_ledger/*/*.parquet"))
            running = [j for j, st in _our_jobs().items() if st == "RUNNING"]
            if len(ledgers) >= 2 and running:
                victim = running[0]
                subprocess.run(["scancel", victim], check=True)
                break
            assert p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.1)
        assert victim is not None, "the run never committed 2 partitions"
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    run_id = _run_id(out)
    # the run had work left when the job went away, and a replacement job was submitted
    done_at_kill = len(ledgers)
    from dvidetl.sinks import open_sink

    instance = next(d.name for d in Path(tmp_path, "out").iterdir() if (d / uuid).is_dir())
    total = len(open_sink(sink, uuid=uuid, instance=instance).load_run(run_id).partitions)
    assert done_at_kill < total, "killed too late: nothing left to reschedule"
    # reported (and replaced) once, although squeue is asked every second after the loss
    assert len(re.findall(REPLACED.format(job=victim), err)) == 1, err[-3000:]
    assert f"{JOB_NAME}-{victim}.err" in {f.name for f in log_dir.iterdir()}
    assert "CANCELLED" in (log_dir / f"{JOB_NAME}-{victim}.err").read_text()
    _check_exactly_once(SRC_BIG, uuid, sink, run_id)
    _wait_no_jobs()


def test_deploy_export_sbatch_runs_the_driver_as_a_job(slurm, tmp_path) -> None:
    """deploy/export.sbatch as an operator submits it: the driver is a SLURM job that
    submits its own worker jobs, with deploy/jobqueue.yaml as the Dask config (flags shrink
    its 8-core/16 GiB jobs to this machine); the export verifies exactly once."""
    uuid = "slurm-sbatch"
    src = "synthetic://{uuid}?size=256,256,256&scales=2&seed=1"
    sink = f"parquet://{tmp_path}/out"
    submit = tmp_path / "submit"
    (submit / "dvidetl-logs").mkdir(parents=True)
    env = {
        **{k: v for k, v in os.environ.items() if k != "DASK_CONFIG"},
        "UUID": uuid, "SOURCE": src.format(uuid=uuid), "SINK": sink,
        "VENV": str(Path(sys.executable).parent.parent), "LOG_ROOT": str(tmp_path / "logs"),
        "JOBS": "1", "WORKER_CORES": "1", "WORKER_MEMORY": "2GiB",
        "WORKER_WALLTIME": "00:10:00", "DASHBOARD": "127.0.0.1:0",
        "EXTRA_ARGS": "--interface lo --quiet --partition-blocks 16",
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    jid = subprocess.run(
        ["sbatch", "--parsable", "--mem=2G", str(ROOT / "deploy" / "export.sbatch")],
        cwd=submit, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    end = time.monotonic() + 240
    state = ""
    while time.monotonic() < end:
        out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
        state = re.search(r"JobState=(\w+)", out.stdout).group(1) if out.stdout else "GONE"
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        time.sleep(1)
    log = (submit / "dvidetl-logs" / f"dvidetl-driver-{jid}.out").read_text()
    assert state == "COMPLETED", f"driver job {jid} ended {state}:\n{log[-3000:]}"
    assert f"Dask config from {ROOT / 'deploy'}" in log
    assert "SLURM cluster: 1 worker jobs x 1 cores / 2.0 GiB" in log
    assert "dvidetl-driver: exit 0" in log
    worker_logs = tmp_path / "logs" / jid
    script = (worker_logs / "worker-job.sh").read_text()
    # the deploy config's choices reached the worker job
    assert "--local-directory ${TMPDIR:-/tmp}/dvidetl-$SLURM_JOB_ID" in script
    assert "--death-timeout 120" in script and "--lifetime " in script
    assert list(worker_logs.glob(f"{JOB_NAME}-*.err"))
    _check_exactly_once(src, uuid, sink, _run_id(log))
    _wait_no_jobs()
