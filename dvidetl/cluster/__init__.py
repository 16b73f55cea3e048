"""Where the Dask workers come from: ``local`` (default), ``tcp://HOST:PORT``, ``slurm``.

``open_client(cluster, **options)`` (keywords of :class:`ClusterOptions`, or a
``ClusterOptions``) returns a connected ``distributed.Client``, closed with the cluster on
exit, so the driver never cares which kind it got; every kind prints the dashboard URL
when it starts. ``options`` holds the options and their argparse group, ``local`` the local
cluster and an existing scheduler, ``slurm`` SLURM through dask-jobqueue.

This package is also the workers' Dask preload (``--preload dvidetl.cluster``:
:func:`dask_setup`), so its import stays light.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dvidetl.cluster.local import open_local_client, quiet_distributed
from dvidetl.cluster.options import ClusterOptions, add_cluster_arguments
from dvidetl.redact import install_log_redaction

# Imports inside functions load Dask, tornado, ssl, the plugin registry's entry points,
# NumPy/Arrow, the compression libraries only where used: importing this module must not (CLI
# start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.


@contextlib.contextmanager
def open_client(cluster: str | ClusterOptions = "local", *, page: bool = False,
                **options: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for the cluster named (``cluster`` plus the keywords of
    :class:`ClusterOptions`); closed on exit. ``page``: serve the run's own dvidetl page on
    the dashboard and print *its* link (Dask's own pages show only the submission window
    of a run)."""
    from dvidetl.cluster.logs import forward_worker_logs
    from dvidetl.export.dashboard import silence_bokeh_disconnects

    opts = cluster if isinstance(cluster, ClusterOptions) else ClusterOptions(cluster, **options)
    silence_bokeh_disconnects()
    if opts.cluster == "slurm":
        from dvidetl.cluster.slurm import open_slurm_client as opener
    else:
        opener = open_local_client
    with quiet_distributed(), opener(opts, page) as client:
        forward_worker_logs(client)
        yield client


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook signature
    """Worker preload (``--preload dvidetl.cluster``): a worker process we start ignores
    Ctrl-C (the terminal sends SIGINT to the whole process group; the driver stops the
    workers itself, without a traceback from each) and redacts its log like the CLI does."""

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_log_redaction()


__all__ = ["open_client", "ClusterOptions", "add_cluster_arguments", "dask_setup"]
