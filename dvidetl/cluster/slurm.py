"""`--cluster slurm`: Dask workers as SLURM jobs. It goes through `dask_jobqueue.SLURMCluster`, which reads Dask's own
configuration (`jobqueue.slurm.*`: a site's `~/.config/dask/jobqueue.yaml`, `$DASK_CONFIG`,
`DASK_JOBQUEUE__SLURM__*` variables); our flags override it, and only where neither says
anything do dvidetl's defaults for this workload apply. Why the extra machinery around it:

- dask-jobqueue does not replace a worker job that SLURM took away (walltime, preemption,
  `scancel`) when the cluster was sized with `scale(jobs=N)`, and adaptive scaling does not
  either while the lost job still counts in its plan. `_JobKeeper` polls `squeue` every few
  seconds and resubmits ended jobs; the scheduler reschedules their partitions and the
  sink's ledger keeps every partition exactly once.
- A job SLURM rejects (memory larger than any node, unknown partition) is only *logged* by
  dask-jobqueue and the run would wait forever, so the worker job script is first checked
  with `sbatch --test-only` and a rejection becomes a one-line `UserError`.
- Job logs never land in the current directory: they go to `--log-directory` (or the
  config's `log-directory`, or `~/dvidetl-logs/slurm-<time>-<pid>`), with the job script.
- Workers stop themselves before the walltime (`--lifetime` with a stagger, derived from the
  walltime unless the config sets one), so SLURM's kill never hits a busy worker.
- SLURM stops the driver's own job with SIGTERM; it is turned into KeyboardInterrupt so the
  cluster closes and scancels its worker jobs instead of leaving them queued.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dvidetl.cluster.local import _dashboard_url, _say
from dvidetl.cluster.options import (
    DEFAULT_DASHBOARD,
    DEFAULT_JOBS,
    DEFAULT_MEMORY_PER_CORE_GIB,
    DEFAULT_WORKER_CORES,
    ClusterOptions,
)
from dvidetl.errors import UserError

# Imports inside functions load Dask, dask-jobqueue only where used: importing this module must
# not (CLI start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.

#: seconds between checks for lost SLURM jobs that need a replacement.
KEEPER_INTERVAL_S = 5.0
#: seconds after a worker disconnects during which squeue is asked every second.
PROMPT_CHECK_S = 10.0


def parse_adapt(text: str) -> tuple[int, int]:
    """`--adapt MIN:MAX` -> (MIN, MAX) in jobs; MAX >= 1 and 0 <= MIN <= MAX."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m:
        raise UserError(f"--adapt {text!r}: expected MIN:MAX worker jobs, e.g. 2:50")
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < 1 or lo > hi:
        raise UserError(f"--adapt {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


_WALLTIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def parse_walltime(text: str) -> int:
    """SLURM time formats (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`) -> s."""
    m = _WALLTIME.fullmatch(str(text).strip())
    if not m:
        raise UserError(f"walltime {text!r} not understood: use HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    a_, b_, c_ = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a_ * 3600 + (b_ or 0) * 60 + (c_ or 0)
    if c_ is not None:  # HH:MM:SS
        return a_ * 3600 + (b_ or 0) * 60 + c_
    if b_ is not None:  # MM:SS
        return a_ * 60 + b_
    return a_ * 60  # MM


def worker_lifetime(walltime_s: int) -> tuple[int, int]:
    """(lifetime, stagger) in seconds so a worker retires before SLURM's walltime kill.

    The margin is 10% of the walltime (at least 2 min, at most half of it); workers stop
    after walltime - margin, +- half the margin so that they do not all leave at once.
    """
    margin = min(max(walltime_s // 10, 120), walltime_s // 2)
    return walltime_s - margin, margin // 2


def _config(key: str) -> Any:
    import dask
    import dask_jobqueue  # noqa: F401  (registers the jobqueue.* defaults)

    return dask.config.get(f"jobqueue.slurm.{key}", None)


def slurm_cluster_kwargs(opts: ClusterOptions) -> dict[str, Any]:
    """Keyword arguments for `SLURMCluster`: flags, else Dask's jobqueue.slurm config, else ours.

    Keys left out fall through to dask-jobqueue's own reading of the config.
    """
    opt = lambda name: getattr(opts, name, None)  # noqa: E731
    kw: dict[str, Any] = {}

    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    cores = first(opt("worker_cores"), _config("cores"), DEFAULT_WORKER_CORES)
    if cores < 1:
        raise UserError(f"--worker-cores {cores}: must be at least 1")
    kw["cores"] = int(cores)
    memory = (
        opt("worker_memory") or _config("memory") or f"{cores * DEFAULT_MEMORY_PER_CORE_GIB}GiB"
    )
    if opt("worker_memory") is None:  # the flag was checked by its parser; the config is here
        try:
            from dask.utils import parse_bytes

            if parse_bytes(memory) <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"jobqueue.slurm.memory {memory!r}: expected a size like 8GiB") from None
    kw["memory"] = memory
    processes = opt("worker_processes")
    if processes is None:
        # keep the config's threads per process (cores/processes) when --worker-cores
        # changes the cores; without any config: one single-threaded process per core
        c_cores, c_procs = _config("cores"), _config("processes")
        threads = max(1, int(c_cores) // int(c_procs)) if c_cores and c_procs else 1
        processes = max(1, kw["cores"] // threads)
    if processes < 1 or processes > kw["cores"]:
        raise UserError(
            f"--worker-processes {processes}: must be between 1 and the cores per job ({kw['cores']})"
        )
    kw["processes"] = int(processes)
    # Workers run the very interpreter (and so the virtualenv) of the driver, unless the
    # site config names another one.
    kw["python"] = _config("python") or sys.executable

    for flag, key in (
        ("partition", "queue"),
        ("account", "account"),
        ("walltime", "walltime"),
        ("local_directory", "local_directory"),
        ("interface", "interface"),
    ):
        if opt(flag) is not None:
            kw[key] = opt(flag)
    walltime = kw.get("walltime") or _config("walltime")
    if walltime:
        walltime_s = parse_walltime(walltime)  # validates
    else:
        walltime_s = None

    log_dir = opt("log_directory") or _config("log-directory")
    if not log_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_dir = str(Path.home() / "dvidetl-logs" / f"slurm-{stamp}-{os.getpid()}")
    log_dir = os.path.abspath(os.path.expandvars(os.path.expanduser(str(log_dir))))
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the log directory {log_dir}: {exc}") from None
    kw["log_directory"] = log_dir

    if (_config("name") or "dask-worker") == "dask-worker":
        kw["job_name"] = "dvidetl-worker"

    # Retire before the walltime kill, unless the site config already chose a lifetime.
    extra = list(_config("worker-extra-args") or [])
    if walltime_s and "--lifetime" not in extra:
        life, stagger = worker_lifetime(walltime_s)
        extra += ["--lifetime", f"{life}s", "--lifetime-stagger", f"{stagger}s"]
    if "dvidetl.cluster" not in extra:  # workers redact their logs (cluster.dask_setup)
        extra += ["--preload", "dvidetl.cluster"]
    kw["worker_extra_args"] = extra

    sched = dict(_config("scheduler-options") or {})
    dash = opt("dashboard_address")
    if dash is not None and (dash != DEFAULT_DASHBOARD or "dashboard_address" not in sched):
        sched["dashboard_address"] = dash
    sched.setdefault("dashboard_address", DEFAULT_DASHBOARD)
    kw["scheduler_options"] = sched
    return kw


def _sizing(opts: ClusterOptions) -> tuple[str, int, int]:
    """("jobs", n, n) or ("adapt", lo, hi)."""
    adapt = opts.adapt
    jobs = opts.jobs
    if adapt is not None:
        if jobs is not None:
            raise UserError("--jobs and --adapt exclude each other")
        lo, hi = parse_adapt(adapt)
        return "adapt", lo, hi
    n = DEFAULT_JOBS if jobs is None else jobs
    if n < 1:
        raise UserError(f"--jobs {n}: must be at least 1")
    return "jobs", n, n


def _preflight(job_script: str, log_dir: str) -> None:
    """Refuse early, with SLURM's own words, what sbatch would reject later.

    dask-jobqueue only logs a failed submission, and the run would then wait forever for
    workers; `sbatch --test-only` validates the same script without queueing anything.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            "--cluster slurm needs the SLURM client commands (sbatch, squeue, scancel) on PATH"
        )
    script = Path(log_dir) / "worker-job.sh"
    script.write_text(job_script)
    try:
        proc = subprocess.run(
            [sbatch, "--test-only", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=log_dir,
        )
    except subprocess.TimeoutExpired:
        raise UserError("sbatch --test-only did not answer in 60 s: is slurmctld up?") from None
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
        raise UserError(
            f"SLURM rejects the worker job ({msg}); check --worker-memory/--worker-cores/"
            f"--partition/--account (job script: {script})"
        )


#: SLURM job states in which a worker job still is (or will be) a worker.
_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "RESIZING", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id -> SLURM state for these jobs (a job SLURM forgot is absent); None if squeue
    itself failed (controller busy), so that nothing is replaced on a guess."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # every id unknown (finished longer than MinJobAge ago): all gone
        return {} if "Invalid job id" in proc.stderr else None
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1].rstrip("+")
    return out


class _JobKeeper:
    """Resubmits worker jobs SLURM took away (scancel, preemption, walltime, node failure),
    so the cluster keeps its size while the scheduler reschedules their partitions.

    dask-jobqueue never replaces such a job: SpecCluster keeps it in its spec (so neither
    `scale` nor adaptive scaling sees a gap) and, with several processes per job, does not
    even notice it is gone. Every few seconds, and every second for a while after a worker
    disconnects, the keeper asks `squeue` for the state of the cluster's jobs; a job that
    has ended is dropped from the spec and the cluster is scaled back to its size, which
    submits a fresh job under a new name. Jobs that keep ending
    before their worker ever connected (broken environment) are not resubmitted forever:
    after a few, the keeper stops and says where the job logs are.
    """

    def __init__(self, cluster: Any, interval: float = KEEPER_INTERVAL_S) -> None:
        self.cluster = cluster
        self.interval = interval
        self.replaced = 0
        self.failed_starts = 0
        self.gave_up = False
        self._seen: set[str] = set()  # job names whose worker(s) connected at least once
        self._connected: set[str] = set()  # worker names the scheduler has seen connect
        # a worker left: ask squeue every second for a few seconds (its job may take a
        # moment to leave RUNNING) instead of waiting for the next regular poll
        self._prompt_until = 0.0
        self._handled: set[str] = set()  # ended job ids already reported and replaced
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dvidetl-slurm-keeper", daemon=True)

    def _loop(self) -> None:
        # Connected workers are noted every second (no subprocess: cheap); squeue is asked
        # only every `interval` seconds.
        last = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                self._note_connected()
                now = time.monotonic()
                if now - last >= self.interval or now < self._prompt_until:
                    last = now
                    self.check()
            except Exception as exc:  # noqa: BLE001 - never kill the run over a poll
                _say(f"SLURM job check failed ({exc!r}); will retry")

    def _note_connected(self) -> None:
        c = self.cluster
        connected = {str(w.get("name")) for w in dict(c.scheduler_info.get("workers", {})).values()}
        connected |= set(self._connected)
        for name in list(c.workers):
            name = str(name)
            if name in connected or any(n.startswith(f"{name}-") for n in connected):
                self._seen.add(name)

    def check(self) -> None:
        from distributed.core import Status

        c = self.cluster
        if self.gave_up or c.status != Status.running:
            return
        self._note_connected()
        jobs = {
            str(name): str(job.job_id)
            for name, job in list(c.workers.items())
            if getattr(job, "job_id", None)
        }
        states = squeue_states(sorted(set(jobs.values())))
        if states is None:
            return
        dead = {
            n: j for n, j in jobs.items() if states.get(j) not in _ALIVE and j not in self._handled
        }
        if not dead:
            return
        log_dir = getattr(c._dummy_job, "log_directory", None)
        for name, jid in sorted(dead.items()):
            state = states.get(jid, "gone")
            if name in self._seen:
                _say(f"SLURM worker job {jid} ended ({state}); submitting a replacement")
            else:
                self.failed_starts += 1
                _say(
                    f"SLURM worker job {jid} ended ({state}) before its worker connected; "
                    f"see {log_dir}/*-{jid}.err"
                )
        limit = max(3, 2 * len(c.worker_spec))
        if self.failed_starts >= limit:
            self.gave_up = True
            _say(
                f"{self.failed_starts} worker jobs ended before connecting: not resubmitting; "
                f"fix the worker environment (logs in {log_dir}) and resume the run"
            )
            return
        self.replaced += len(dead)
        self._handled |= set(dead.values())  # replaced on the loop; never counted twice
        c.loop.add_callback(self._replace, dead)

    def _replace(self, dead: dict[str, str]) -> None:
        """On the cluster's event loop: forget the ended jobs, scale back to the size."""
        c = self.cluster
        n = len(c.worker_spec)
        for name, jid in dead.items():
            for key in list(c.workers):
                if str(key) == name and str(getattr(c.workers[key], "job_id", "")) == jid:
                    del c.workers[key]
                    c.worker_spec.pop(key, None)
        c.scale(jobs=n)

    def start(self) -> None:
        """Start polling; also hook the (in-process) scheduler so that every worker that
        connects is noted at once, however short-lived it is, and one that leaves starts the
        prompt checks (its job may be gone)."""
        from distributed.diagnostics.plugin import SchedulerPlugin

        keeper = self

        class _NoteWorkers(SchedulerPlugin):
            name = "dvidetl-note-workers"

            def add_worker(self, scheduler: Any, worker: str) -> None:
                ws = scheduler.workers.get(worker)
                if ws is not None:
                    keeper._connected.add(str(ws.name))

            def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
                keeper._prompt_until = time.monotonic() + PROMPT_CHECK_S

        sched = getattr(self.cluster, "scheduler", None)
        if sched is not None and hasattr(sched, "add_plugin"):
            self.cluster.loop.add_callback(sched.add_plugin, _NoteWorkers())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=40)


def make_slurm_cluster(opts: ClusterOptions) -> Any:
    """A started (not yet scaled) `SLURMCluster` from flags + config, checked by sbatch."""
    from dask_jobqueue import SLURMCluster

    kw = slurm_cluster_kwargs(opts)
    if shutil.which("sbatch") is None:
        raise UserError(
            "--cluster slurm needs the SLURM client commands (sbatch, squeue, scancel) on PATH"
        )
    try:
        cluster = SLURMCluster(**kw)
    except ValueError as exc:  # bad combination in config/flags
        raise UserError(f"--cluster slurm: {exc}") from None
    try:
        _preflight(cluster.job_script(), kw["log_directory"])
    except BaseException:
        cluster.close()
        raise
    return cluster


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SLURM stops the driver's job (scancel, walltime, `--signal`) with SIGTERM, and Python's
    default action exits without running `finally:` -- the worker jobs would stay queued.
    As KeyboardInterrupt, the cluster closes (scancelling its jobs) and the CLI exits 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def open_slurm_client(opts: ClusterOptions, page: bool = False) -> Iterator[Any]:
    """`open_client` for `--cluster slurm`: SLURMCluster + lost-job keeper + client."""
    with _sigterm_as_interrupt():
        with _open_slurm_client(opts, page) as client:
            yield client


@contextlib.contextmanager
def _open_slurm_client(opts: ClusterOptions, page: bool = False) -> Iterator[Any]:
    from distributed import Client

    mode, lo, hi = _sizing(opts)
    cluster = make_slurm_cluster(opts)
    keeper = _JobKeeper(cluster)
    client = None
    try:
        if mode == "jobs":
            cluster.scale(jobs=hi)
            size = f"{hi} worker jobs"
        else:
            cluster.adapt(minimum_jobs=lo, maximum_jobs=hi)
            size = f"{lo}..{hi} worker jobs (adaptive)"
        keeper.start()
        client = Client(cluster)
        job = cluster._dummy_job
        queue = opts.partition or _config("queue") or "default partition"
        _say(
            f"SLURM cluster: {size} x {job.worker_cores} cores / {job.worker_memory / 2**30:.1f} GiB "
            f"({job.worker_processes} worker process(es) each) on {queue}; "
            f"job logs in {job.log_directory}"
        )
        _say(f"dashboard {_dashboard_url(client, page)}")
        yield client
    finally:
        keeper.stop()
        if client is not None:
            client.close()
        cluster.close()
