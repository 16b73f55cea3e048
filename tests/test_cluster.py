"""`dvidetl.cluster` without SLURM: option parsing, config precedence, the worker job script,
and the local / tcp:// kinds on real distributed clusters (the SLURM runs are in
test_slurm.py)."""

from __future__ import annotations

import argparse
import os
import sys

import dask
import pytest
from dask_jobqueue.slurm import SLURMJob

from dvidetl import cluster as cl
from dvidetl.cluster import options as co
from dvidetl.cluster import slurm as sl
from dvidetl.errors import UserError


def _args(*argv: str) -> cl.ClusterOptions:
    p = argparse.ArgumentParser()
    cl.add_cluster_arguments(p)
    return cl.ClusterOptions.from_args(p.parse_args(list(argv)))


def _job_script(kw: dict) -> str:
    """The script SLURMCluster would submit, built from the same kwargs (no scheduler)."""
    kw = {k: v for k, v in kw.items() if k != "scheduler_options"}
    return SLURMJob(scheduler="tcp://10.0.0.1:8786", name="w-0", **kw).job_script()


def test_parse_adapt() -> None:
    assert sl.parse_adapt("2:50") == (2, 50)
    assert sl.parse_adapt(" 0 : 1 ") == (0, 1)
    for bad in ("", "5", "3:2", "0:0", "a:b", "-1:3"):
        with pytest.raises(UserError, match="--adapt"):
            sl.parse_adapt(bad)


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("04:00:00", 14400),
        ("1-00", 86400),
        ("1-02:30", 86400 + 2 * 3600 + 30 * 60),
        ("2-01:00:05", 2 * 86400 + 3600 + 5),
    ],
)
def test_parse_walltime(text: str, seconds: int) -> None:
    assert sl.parse_walltime(text) == seconds


def test_parse_walltime_rejects_garbage() -> None:
    with pytest.raises(UserError, match="walltime"):
        sl.parse_walltime("4h")


def test_worker_lifetime_retires_before_walltime() -> None:
    for wall in (600, 1800, 3600, 4 * 3600, 2 * 86400):
        life, stagger = sl.worker_lifetime(wall)
        # the latest a worker leaves is lifetime + stagger: still before the kill
        assert 0 < life + stagger < wall
        assert life - stagger > wall // 2


def test_flags_override_site_config_and_defaults_fill_gaps(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    site = {
        "jobqueue.slurm.queue": "site-part",
        "jobqueue.slurm.account": "site-acct",
        "jobqueue.slurm.cores": 8,
        "jobqueue.slurm.memory": "64GiB",
        "jobqueue.slurm.walltime": "02:00:00",
        "jobqueue.slurm.job-extra-directives": ["--comment=from-site-config"],
        "jobqueue.slurm.scheduler-options": {"dashboard_address": ":9999"},
    }
    with dask.config.set(site):
        # nothing on the command line: the site config decides
        kw = sl.slurm_cluster_kwargs(_args("--cluster", "slurm"))
        assert kw["cores"] == 8 and kw["memory"] == "64GiB" and kw["processes"] == 8
        assert kw["python"] == sys.executable
        assert kw["scheduler_options"]["dashboard_address"] == ":9999"
        log_dir = kw["log_directory"]
        assert log_dir.startswith(str(tmp_path / "home" / "dvidetl-logs"))
        assert os.path.isdir(log_dir)
        script = _job_script(kw)
        assert "#SBATCH -p site-part" in script and "#SBATCH -A site-acct" in script
        assert "#SBATCH --comment=from-site-config" in script
        assert "#SBATCH -t 02:00:00" in script
        assert "#SBATCH --mem=64G" in script
        assert f"-o {log_dir}/" in script and f"-e {log_dir}/" in script
        assert script.split("\n")[-2].startswith(f"{sys.executable} -m distributed.cli.dask_worker")
        # lifetime derived from the 2 h walltime: retire at 108 min +- 6 min
        assert "--lifetime 6480s --lifetime-stagger 360s" in script

        # flags win over the site config
        kw = sl.slurm_cluster_kwargs(
            _args(
                "--cluster", "slurm", "--partition", "gpu", "--account", "lab",
                "--worker-cores", "2", "--worker-memory", "6GiB", "--walltime", "00:30:00",
                "--local-directory", "/scratch/x", "--log-directory", str(tmp_path / "logs"),
                "--dashboard-address", ":8800", "--worker-processes", "1",
            )
        )  # fmt: skip
        script = _job_script(kw)
        assert "#SBATCH -p gpu" in script and "#SBATCH -A lab" in script
        assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem=6G" in script
        assert "#SBATCH -t 00:30:00" in script
        assert "--nthreads 2" in script and "--local-directory /scratch/x" in script
        assert f"-o {tmp_path / 'logs'}/" in script
        assert kw["scheduler_options"]["dashboard_address"] == ":8800"


def test_site_lifetime_and_python_are_respected(tmp_path) -> None:
    site = {
        "jobqueue.slurm.worker-extra-args": ["--lifetime", "50m", "--lifetime-stagger", "5m"],
        "jobqueue.slurm.python": "/opt/site/python3",
        "jobqueue.slurm.log-directory": str(tmp_path / "site-logs"),
    }
    with dask.config.set(site):
        kw = sl.slurm_cluster_kwargs(_args("--cluster", "slurm", "--walltime", "01:00:00"))
    script = _job_script(kw)
    assert script.count("--lifetime ") == 1 and "--lifetime 50m" in script
    assert "/opt/site/python3 -m distributed.cli.dask_worker" in script
    assert kw["log_directory"] == str(tmp_path / "site-logs")


def test_defaults_without_any_config(tmp_path) -> None:
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        kw = sl.slurm_cluster_kwargs(_args("--cluster", "slurm", "--log-directory", str(tmp_path)))
    assert kw["cores"] == co.DEFAULT_WORKER_CORES
    assert kw["memory"] == f"{co.DEFAULT_WORKER_CORES * co.DEFAULT_MEMORY_PER_CORE_GIB}GiB"
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"  # loopback by default
    assert kw["job_name"] == "dvidetl-worker"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--worker-memory", "lots"], "--worker-memory"),
        (["--worker-cores", "0"], "--worker-cores"),
        (["--worker-cores", "2", "--worker-processes", "3"], "--worker-processes"),
        (["--walltime", "tomorrow"], "walltime"),
    ],
)
def test_bad_slurm_options_are_user_errors(argv, match, tmp_path) -> None:
    with pytest.raises(UserError, match=match):
        sl.slurm_cluster_kwargs(
            _args("--cluster", "slurm", "--log-directory", str(tmp_path), *argv)
        )


def test_sizing_options() -> None:
    assert sl._sizing(_args("--cluster", "slurm")) == ("jobs", co.DEFAULT_JOBS, co.DEFAULT_JOBS)
    assert sl._sizing(_args("--jobs", "5")) == ("jobs", 5, 5)
    assert sl._sizing(_args("--adapt", "1:8")) == ("adapt", 1, 8)
    with pytest.raises(UserError, match="--jobs"):
        sl._sizing(_args("--jobs", "0"))
    with pytest.raises(SystemExit):  # argparse: not allowed together
        _args("--jobs", "2", "--adapt", "1:3")


def test_slurm_without_sbatch_is_a_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    args = _args("--cluster", "slurm", "--log-directory", str(tmp_path / "logs"))
    with pytest.raises(UserError, match="sbatch"):
        with cl.open_client(args):
            pass


def test_unknown_cluster_kind() -> None:
    with pytest.raises(UserError, match="not understood"):
        with cl.open_client(_args("--cluster", "kubernetes")):
            pass


def test_local_and_tcp_print_the_dashboard(capsys) -> None:
    args = _args("--cluster", "local", "--workers", "1", "--dashboard-address", "127.0.0.1:0")
    with cl.open_client(args) as client:
        assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
        address = client.scheduler.address
        err = capsys.readouterr().err
        assert "local cluster with 1 workers" in err
        assert "dashboard http://127.0.0.1:" in err and "/status" in err
        # an existing scheduler (tcp://): same calls, its dashboard printed too
        with cl.open_client(_args("--cluster", address)) as other:
            assert other.submit(lambda x: x * 2, 21).result(timeout=60) == 42
        err = capsys.readouterr().err
        assert f"scheduler {address}; dashboard http://127.0.0.1:" in err


def test_worker_cores_flag_keeps_the_configs_threads_per_process(tmp_path) -> None:
    base = ["--cluster", "slurm", "--log-directory", str(tmp_path)]
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.processes": 8}):
        assert sl.slurm_cluster_kwargs(_args(*base, "--worker-cores", "2"))["processes"] == 2
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.processes": 4}):
        assert sl.slurm_cluster_kwargs(_args(*base))["processes"] == 4
        assert sl.slurm_cluster_kwargs(_args(*base, "--worker-cores", "16"))["processes"] == 8
        kw = sl.slurm_cluster_kwargs(_args(*base, "--worker-cores", "1"))
        assert kw["processes"] == 1


def test_deploy_jobqueue_yaml_is_valid_dask_config(tmp_path) -> None:
    """Every key of deploy/jobqueue.yaml is one dask-jobqueue / distributed knows (a typo
    would be silently ignored on a real cluster), and it renders a sensible job script."""
    import dask_jobqueue
    import distributed
    import yaml

    root = cl.__file__.rsplit("/dvidetl/", 1)[0]
    ours = yaml.safe_load(open(f"{root}/deploy/jobqueue.yaml"))
    known_jq = yaml.safe_load(
        open(os.path.join(os.path.dirname(dask_jobqueue.__file__), "jobqueue.yaml"))
    )
    known_d = yaml.safe_load(
        open(os.path.join(os.path.dirname(distributed.__file__), "distributed.yaml"))
    )

    def check(mine: dict, known: dict, where: str) -> None:
        for k, v in mine.items():
            assert k in known, f"unknown config key {where}.{k}"
            if isinstance(v, dict) and isinstance(known[k], dict) and known[k]:
                check(v, known[k], f"{where}.{k}")

    check(ours["jobqueue"]["slurm"], known_jq["jobqueue"]["slurm"], "jobqueue.slurm")
    check(ours["distributed"], known_d["distributed"], "distributed")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    with dask.config.set(flat(ours)):  # as if it were ~/.config/dask/jobqueue.yaml
        kw = sl.slurm_cluster_kwargs(_args("--cluster", "slurm", "--log-directory", str(tmp_path)))
        script = _job_script(kw)
    assert kw["processes"] == kw["cores"]  # one single-threaded process per core
    assert "--nthreads 1" in script
    assert "--local-directory ${TMPDIR:-/tmp}/dvidetl-$SLURM_JOB_ID" in script
    assert "--lifetime " in script and "--lifetime-stagger " in script
    mem_per_core = dask.utils.parse_bytes(kw["memory"]) / kw["cores"]
    assert mem_per_core >= 2 * 2**30


def _log_on_the_worker() -> int:
    import logging
    import os

    lg = logging.getLogger("dvidetl.test_worker_logs")
    lg.debug("a debug line")
    lg.info("the token is %s", os.environ["DVIDETL_FLIGHT_TOKEN"])
    lg.warning("a warning")
    return os.getpid()


def _worker_records(level: int, monkeypatch) -> tuple[list, int]:
    """The records of ``_log_on_the_worker`` that reach the driver's root logger set to ``level``
    (through a handler with no redaction of its own), and the worker's pid."""
    import logging
    import time

    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == "dvidetl.test_worker_logs":
                got.append(record)

    root, h = logging.getLogger(), Keep()
    old = root.level
    root.addHandler(h)
    root.setLevel(level)
    try:
        with cl.open_client(_args("--cluster", "local", "--workers", "1",
                                  "--dashboard-address", "127.0.0.1:0")) as client:
            pid = client.submit(_log_on_the_worker, pure=False).result(timeout=60)
            deadline = time.monotonic() + 30  # events reach the client asynchronously
            while not any(r.levelno == logging.WARNING for r in got) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        root.removeHandler(h)
        root.setLevel(old)
    return got, pid


def test_worker_log_records_reach_the_driver_redacted_at_its_level(monkeypatch) -> None:
    """A worker's dvidetl records reach the driver's handlers (so ``--log-file`` has them),
    at the driver's level, naming the worker, redacted before they leave the worker."""
    import logging

    from dvidetl.redact import MASK

    secret = "wrkFlightToken31"
    monkeypatch.setenv("DVIDETL_FLIGHT_TOKEN", secret)
    got, pid = _worker_records(logging.INFO, monkeypatch)
    assert [r.levelno for r in got] == [logging.INFO, logging.WARNING]  # no DEBUG
    assert {r.process for r in got} == {pid} != {os.getpid()}  # made in the worker
    info = got[0].getMessage()
    assert info.startswith("[worker tcp://127.0.0.1:") and f"the token is {MASK}" in info
    assert all(secret not in r.getMessage() for r in got)
    # a driver at WARNING (no -v, no --log-file): the worker makes no INFO record to send
    got, _ = _worker_records(logging.WARNING, monkeypatch)
    assert [r.levelno for r in got] == [logging.WARNING]


def test_a_closed_worker_stream_at_shutdown_is_one_line_without_its_traceback() -> None:
    """distributed's INFO "Batched Comm Closed" record carries the CommClosedError's
    traceback (a shutdown race seen at the end of a successful ``run -v``): inside
    ``quiet_distributed`` it is one line; a warning with that error, or another error at
    INFO, keeps its traceback; outside, nothing is changed."""
    import io
    import logging

    from distributed.comm.core import CommClosedError

    from dvidetl.cluster.local import quiet_distributed

    def logged(level: int, exc: BaseException) -> str:
        out = io.StringIO()
        h = logging.StreamHandler(out)
        lg = logging.getLogger("distributed.batched")
        lg.addHandler(h)
        old = lg.level
        lg.setLevel(logging.INFO)
        try:
            try:
                raise exc
            except Exception:
                lg.log(level, "Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
        finally:
            lg.removeHandler(h)
            lg.setLevel(old)
        return out.getvalue()

    with quiet_distributed():
        assert logged(logging.INFO, CommClosedError()) == "Batched Comm Closed '<TCP (closed)>'\n"
        assert "Traceback" in logged(logging.WARNING, CommClosedError())
        assert "Traceback" in logged(logging.INFO, ValueError("other"))
    assert "Traceback" in logged(logging.INFO, CommClosedError())
