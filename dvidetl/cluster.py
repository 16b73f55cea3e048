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
DEFAULT_DASHBOARD = ":8787"


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
        help="memory per worker (local) or per SLURM job (slurm), e.g. 4GiB",
    )
    g.add_argument(
        "--dashboard-address",
        default=DEFAULT_DASHBOARD,
        help="Dask dashboard address (default :8787)",
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


def _dashboard_url(client: Any) -> str:
    try:
        return str(client.dashboard_link)
    except Exception:  # no dashboard (bokeh missing) or scheduler without the service
        return "(no dashboard)"


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
def open_client(args: argparse.Namespace) -> Iterator[Any]:
    """A `distributed.Client` for the cluster the options name; closed on exit."""
    with _quiet_distributed():
        with _open_client(args) as client:
            yield client


@contextlib.contextmanager
def _open_client(args: argparse.Namespace) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    kind = args.cluster
    if kind == "local":
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {args.workers})")
        if args.worker_memory:
            from dask.utils import parse_bytes

            try:
                parse_bytes(args.worker_memory)
            except ValueError:
                raise UserError(f"--worker-memory {args.worker_memory!r}: expected a size such "
                                "as 4GiB or 2000MB") from None
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
            dashboard_address=args.dashboard_address,
            silence_logs=logging.WARNING if verbose else logging.CRITICAL,
        )
        client = Client(cluster)
        _say(f"local cluster with {n} workers; dashboard {_dashboard_url(client)}")
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
        _say(f"scheduler {kind}; dashboard {_dashboard_url(client)}")
        try:
            yield client
        finally:
            client.close()
    elif kind == "slurm":
        from dvidetl.slurm import open_slurm_client

        with open_slurm_client(args) as client:
            yield client
    else:
        raise UserError(f"--cluster {kind!r} not understood: use local, tcp://HOST:PORT or slurm")


#: names that moved to ``dvidetl.slurm``, still reachable here (other tools import them)
_MOVED = ("parse_adapt", "parse_walltime", "worker_lifetime", "slurm_cluster_kwargs", "_sizing",
          "squeue_states", "make_slurm_cluster", "open_slurm_client", "KEEPER_INTERVAL_S",
          "PROMPT_CHECK_S")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from dvidetl import slurm

        return getattr(slurm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
