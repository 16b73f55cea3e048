"""Where the Dask workers come from: `--cluster local` (default), `tcp://host:port`, `slurm`.

`add_cluster_arguments` puts the options on a parser; `open_client(args)` returns a connected
`distributed.Client` plus a closer, so `pipeline.py` never cares which kind it got.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

from dvidetl.errors import UserError


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        default="local",
        help="local (LocalCluster, one worker per core), tcp://HOST:PORT (existing scheduler), "
        "or slurm (dask-jobqueue)",
    )
    g.add_argument("--workers", type=int, default=None, help="local: number of workers")
    g.add_argument(
        "--worker-memory", default=None, help="memory limit per worker, e.g. 4GiB"
    )
    g.add_argument(
        "--dashboard-address", default=":8787", help="Dask dashboard address (default :8787)"
    )


@contextlib.contextmanager
def open_client(args: argparse.Namespace) -> Iterator[object]:
    """A `distributed.Client` for the cluster the options name; closed on exit."""
    from distributed import Client, LocalCluster

    kind = args.cluster
    if kind == "local":
        n = args.workers or os.cpu_count() or 1
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.worker_memory or "auto",
            dashboard_address=args.dashboard_address,
        )
        client = Client(cluster)
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
        try:
            yield client
        finally:
            client.close()
    elif kind == "slurm":
        raise UserError("--cluster slurm is not available in this build yet")
    else:
        raise UserError(
            f"--cluster {kind!r} not understood: use local, tcp://HOST:PORT or slurm"
        )
