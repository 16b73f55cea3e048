"""Where the Dask workers come from: `--cluster local` (default), `tcp://host:port`, `slurm`.

`add_cluster_arguments` puts the options on a parser; `open_client(args)` returns a connected
`distributed.Client` (closed with the cluster on exit), so the driver never cares which kind
it got. Every kind prints the dashboard URL when it starts.

SLURM (`--cluster slurm`) lives in `dvidetl.slurm`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from dvidetl.errors import UserError

#: dvidetl's fallbacks where neither a flag nor the site's jobqueue config says anything.
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


def _memory_arg(text: str) -> str:
    """``--worker-memory``: a size with a unit, at least ``MIN_WORKER_MEMORY`` (as bytes)."""
    from dvidetl.units import format_size, parse_size

    n = parse_size(text, "--worker-memory")
    if n < MIN_WORKER_MEMORY:
        raise UserError(f"--worker-memory {text}: a worker needs at least {format_size(MIN_WORKER_MEMORY)} "
                        f"to hold one partition ({DEFAULT_MEMORY_PER_CORE_GIB} GiB per core recommended)")
    return str(n)


def parse_dashboard_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``:PORT`` (all interfaces) / ``[::1]:PORT`` -> (host, port); a host
    that does not resolve or a port out of range is a ``UserError`` before any cluster starts."""
    import socket

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


def dashboard_link(host: str, port: int, path: str = "status") -> str:
    """The URL a browser uses for the dashboard bound at ``host:port``."""
    from dvidetl.httpfiles import browser_url

    return browser_url(host, port, path)


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook signature
    """Worker preload (``--preload dvidetl.cluster``): a worker process we start ignores
    Ctrl-C (the terminal sends SIGINT to the whole process group; the driver stops the
    workers itself, without a traceback from each) and redacts its log like the CLI does."""
    import signal
    import threading

    from dvidetl.redact import install_log_redaction

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_log_redaction()


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `cluster` option group (local / tcp:// / slurm) to a command's parser."""
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


def _say(msg: str) -> None:
    print(f"dvidetl: {msg}", file=sys.stderr, flush=True)


def _dashboard_url(client: Any, page: bool = False, bound: tuple[str, int] | None = None) -> str:
    """The dashboard link to print: what is really bound (``bound``: the local cluster's
    dashboard host and port) or what the scheduler reports; with ``page`` the run's own
    dvidetl page (installed on the scheduler), Dask's status page named beside it."""
    try:
        link = str(client.dashboard_link)
    except Exception:  # no dashboard (bokeh missing) or scheduler without the service
        return "(no dashboard)"
    if bound is not None:
        link = dashboard_link(*bound)
    if not page:
        return link
    from dvidetl.dashboard import install

    run_page = install(client)
    if run_page is None:
        return link
    base = link.rsplit("/", 1)[0] if link.endswith("/status") else link.rstrip("/")
    return f"{base}/dvidetl (the run; Dask's own pages: {base}/status)"


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep the in-process scheduler's INFO chatter off the terminal unless `-v` was given.

    distributed logs at INFO and its records also reach the root handler the CLI installs;
    with `-v` (root at INFO or lower) everything is shown as before.
    """
    import logging

    import distributed  # noqa: F401  (its import configures this logger: do that first)

    logger = logging.getLogger("distributed")
    old = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def open_client(args: argparse.Namespace, *, page: bool = False) -> Iterator[Any]:
    """A `distributed.Client` for the cluster the options name; closed on exit. ``page``:
    serve the run's own dvidetl page on the dashboard and print *its* link (Dask's own
    pages show only the submission window of a run)."""
    from dvidetl.dashboard import silence_bokeh_disconnects

    silence_bokeh_disconnects()
    with _quiet_distributed():
        with _open_client(args, page=page) as client:
            yield client


@contextlib.contextmanager
def _open_client(args: argparse.Namespace, page: bool = False) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    from dvidetl.httpfiles import WILDCARDS

    kind = args.cluster
    if kind == "local":
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {args.workers})")
        host, port = parse_dashboard_address(args.dashboard_address)
        n = args.workers or os.cpu_count() or 1
        import logging

        # a failed task is reported once, in the run's summary: without -v the worker
        # processes do not also print each failure's traceback on the terminal
        verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.worker_memory or "auto",
            dashboard_address=f"{'0.0.0.0' if host in WILDCARDS else host}:{port}",
            silence_logs=logging.WARNING if verbose else logging.CRITICAL,
            preload=["dvidetl.cluster"],
        )
        client = Client(cluster)
        bound = None
        http = getattr(getattr(cluster, "scheduler", None), "http_server", None)
        if http is not None:
            bound = (host, _bound_port(http, port))
        opened = " (open to the network, no authentication)" if host in WILDCARDS else ""
        _say(f"local cluster with {n} workers; dashboard {_dashboard_url(client, page, bound)}{opened}")
        try:
            yield client
        finally:
            client.close()
            cluster.close()
    elif kind.startswith("tcp://"):
        try:
            client = Client(kind, timeout="30s")
        except OSError as exc:
            raise UserError(f"cannot reach the Dask scheduler at {kind}: {exc}") from None
        _say(f"scheduler {kind}; dashboard {_dashboard_url(client, page)}")
        try:
            yield client
        finally:
            client.close()
    elif kind == "slurm":
        from dvidetl.slurm import open_slurm_client

        with open_slurm_client(args, page) as client:
            yield client
    else:
        raise UserError(f"--cluster {kind!r} not understood: use local, tcp://HOST:PORT or slurm")


def _bound_port(http_server: Any, asked: int) -> int:
    """The port the scheduler's HTTP server really listens on (``asked`` may be 0, or taken)."""
    try:
        return int(next(iter(http_server._sockets.values())).getsockname()[1])
    except Exception:  # noqa: BLE001 - tornado internals moved: the asked port
        return asked


#: names that moved to ``dvidetl.slurm``, still reachable here (other tools import them)
_MOVED = ("parse_adapt", "parse_walltime", "worker_lifetime", "slurm_cluster_kwargs", "_sizing",
          "squeue_states", "make_slurm_cluster", "open_slurm_client", "KEEPER_INTERVAL_S",
          "PROMPT_CHECK_S")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from dvidetl import slurm

        return getattr(slurm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
