"""Which cluster a command runs on, as options: ``ClusterOptions`` (frozen, validated when
made, so a bad value fails before planning or any cluster starts), the argparse group that
fills them (``add_cluster_arguments``), and dvidetl's defaults where neither a flag nor the
site's jobqueue config says anything."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, fields

from dvidetl.errors import UserError
from dvidetl.units import format_size, parse_size

# Imports inside functions load tornado, ssl only where used: importing this module must not (CLI
# start-up, processes that never call them).

DEFAULT_WORKER_CORES = 1
#: measured (bench_pipeline): a warmed worker ~335 MiB plus ~120 MiB for the partition it
#: transforms, whatever its size (rows past 32 MiB spill to local disk); Dask pauses at 80 %
#: -> 1 GiB per core is enough, 2 GiB leaves room for dense volumes (deploy/README.md, Sizing).
DEFAULT_MEMORY_PER_CORE_GIB = 2
DEFAULT_JOBS = 2
#: loopback: the Dask dashboard has no authentication, so it is reachable from this machine
#: only unless ``--dashboard-address`` opens it (``0.0.0.0:8787`` / ``HOST:PORT``)
DEFAULT_DASHBOARD = "127.0.0.1:8787"
#: the least memory a worker can run a partition in: measured, a warmed worker holds ~335 MiB
#: (numba alone ~180 MiB) plus ~120 MiB for the partition it transforms (bench_pipeline);
#: below this a worker is paused or killed before it finishes anything
MIN_WORKER_MEMORY = 512 * 2**20


def _memory_arg(text: str | int) -> str:
    """``--worker-memory``: a size with a unit (or an int of bytes), at least
    ``MIN_WORKER_MEMORY`` (as a string of bytes, what Dask takes)."""

    n = int(text) if isinstance(text, int) else parse_size(str(text), "--worker-memory")
    if n < MIN_WORKER_MEMORY:
        raise UserError(f"--worker-memory {text}: a worker needs at least {format_size(MIN_WORKER_MEMORY)} "
                        f"to hold one partition ({DEFAULT_MEMORY_PER_CORE_GIB} GiB per core recommended)")
    return str(n)


def parse_dashboard_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``:PORT`` (all interfaces) / ``[::1]:PORT`` -> (host, port); a host
    that does not resolve or a port out of range is a ``UserError`` before any cluster starts."""

    from dvidetl.httpfiles import WILDCARDS

    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--dashboard-address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8787 "
                        "(0.0.0.0:8787 to open it to the network; port 0: any free port)")
    host = host.strip("[]")
    if host not in WILDCARDS:
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            raise UserError(f"--dashboard-address {text!r}: unknown host {host!r}") from None
    return host, int(port)


@dataclass(frozen=True)
class ClusterOptions:
    """Where the workers come from: ``cluster`` is ``local`` (a LocalCluster, one worker per
    core), ``tcp://HOST:PORT`` (an existing scheduler) or ``slurm`` (dask-jobqueue; Dask's
    ``jobqueue.slurm.*`` config applies, these override). The local-only and SLURM-only
    fields are ignored by the other kinds."""

    cluster: str = "local"
    workers: int | None = None  # local
    worker_memory: str | None = None  # bytes (local: per worker; slurm: per job)
    dashboard_address: str = DEFAULT_DASHBOARD
    jobs: int | None = None  # slurm: fixed number of worker jobs
    adapt: str | None = None  # slurm: "MIN:MAX" worker jobs
    worker_cores: int | None = None
    worker_processes: int | None = None
    partition: str | None = None
    account: str | None = None
    walltime: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None

    def __post_init__(self) -> None:
        kind = self.cluster
        if kind not in ("local", "slurm") and not str(kind).startswith("tcp://"):
            raise UserError(f"--cluster {kind!r} not understood: use local, tcp://HOST:PORT or slurm")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.worker_memory is not None:  # bytes (as --worker-memory gives them) or a size
            wm = self.worker_memory
            object.__setattr__(self, "worker_memory", _memory_arg(int(wm) if str(wm).isdigit() else wm))
        if kind == "local":  # a bad dashboard address fails before planning, not after
            parse_dashboard_address(self.dashboard_address)
        if self.jobs is not None and self.adapt is not None:
            raise UserError("--jobs and --adapt exclude each other")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterOptions:
        """The options ``add_cluster_arguments`` put on a command's parser."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `cluster` option group (local / tcp:// / slurm) to a command's parser
    (read back with ``ClusterOptions.from_args``)."""
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        default="local",
        help="local (LocalCluster, one worker per core), tcp://HOST:PORT (existing scheduler), "
        "or slurm (dask-jobqueue; Dask config jobqueue.slurm.* applies, flags override)",
    )
    g.add_argument("--workers", type=int, default=None, help="local: number of workers")
    g.add_argument(
        "--worker-memory",
        default=None,
        type=_memory_arg,
        metavar="SIZE",
        help="memory per worker (local) or per SLURM job (slurm), with a unit: 4GiB, 2000MB "
        f"(at least 512 MiB; default local: Dask's share of RAM, slurm: {DEFAULT_MEMORY_PER_CORE_GIB}GiB per core)",
    )
    g.add_argument(
        "--dashboard-address",
        default=DEFAULT_DASHBOARD,
        metavar="HOST:PORT",
        help=f"where the dashboard listens (default {DEFAULT_DASHBOARD}: this machine only; "
        "0.0.0.0:8787 opens it to the network, without authentication)",
    )
    s = parser.add_argument_group("slurm (with --cluster slurm)")
    size = s.add_mutually_exclusive_group()
    size.add_argument(
        "--jobs",
        type=int,
        default=None,
        help=f"fixed number of worker jobs (default {DEFAULT_JOBS})",
    )
    size.add_argument(
        "--adapt",
        default=None,
        metavar="MIN:MAX",
        help="adaptive number of worker jobs between MIN and MAX",
    )
    s.add_argument("--worker-cores", type=int, default=None, help="cores per worker job")
    s.add_argument(
        "--worker-processes",
        type=int,
        default=None,
        help="Dask worker processes per job (default: one single-threaded process per core)",
    )
    s.add_argument("--partition", default=None, help="SLURM partition (sbatch -p)")
    s.add_argument("--account", default=None, help="SLURM account (sbatch -A)")
    s.add_argument("--walltime", default=None, help="worker job walltime, e.g. 04:00:00")
    s.add_argument(
        "--local-directory", default=None, help="worker spill directory (fast node-local scratch)"
    )
    s.add_argument(
        "--log-directory",
        default=None,
        help="where worker job logs go (default: config, else ~/dvidetl-logs/slurm-<time>-<pid>)",
    )
    s.add_argument(
        "--interface",
        default=None,
        help="network interface for scheduler and workers, e.g. ib0 (lo on a single node)",
    )
