"""What the end-to-end benches share: a source held in memory behind an embedded Flight
server, a local cluster of single-threaded worker processes, and a partition exported by one
task that samples its own memory. Why: the benches compare ratios measured in one run, so
they must build the endpoint and the cluster the same way."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


def measured_export(ctx, part) -> tuple[int, int]:
    """export_partition on the worker, sampling this process's RSS every 2 ms:
    (peak gained during the task, RSS at its start)."""
    import psutil

    from dvidetl.export.tasks import export_partition

    proc = psutil.Process()
    start = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        export_partition(ctx, part)
    finally:
        stop.set()
        t.join()
    return peak - start, start


def memory_endpoint(src, name: str):
    """A ``FlightEndpoint`` over ``src`` served by an embedded Flight server on loopback (the
    workers read it as they read a remote one); ``close()`` stops the server."""
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.flight.server import start_server

    server = start_server(src)
    return FlightEndpoint(server.location, None, name, None, server, src)


@contextlib.contextmanager
def local_client(n_workers: int) -> Iterator[object]:
    """A ``distributed.Client`` on ``n_workers`` fresh worker processes of one thread each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client
