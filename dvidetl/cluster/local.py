"""A local cluster (``--cluster local``: a LocalCluster of worker processes on this machine)
or an existing scheduler (``tcp://HOST:PORT``), and what every kind shares: the dashboard
link it prints and the distributed logging kept quiet unless ``-v``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from dvidetl.cluster.options import ClusterOptions, parse_dashboard_address
from dvidetl.errors import UserError

# Imports inside functions load Dask, tornado, ssl, the plugin registry's entry points,
# NumPy/Arrow, the compression libraries only where used: importing this module must not (CLI
# start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.


def dashboard_link(host: str, port: int, path: str = "status") -> str:
    """The URL a browser uses for the dashboard bound at ``host:port``."""
    from dvidetl.httpfiles import browser_url

    return browser_url(host, port, path)


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
    from dvidetl.export.dashboard import install

    run_page = install(client)
    if run_page is None:
        return link
    base = link.rsplit("/", 1)[0] if link.endswith("/status") else link.rstrip("/")
    return f"{base}/dvidetl (the run; Dask's own pages: {base}/status)"


class _ClosedCommLine(logging.Filter):
    """distributed logs "Batched Comm Closed" at INFO *with a traceback* when a worker's
    stream closes while the scheduler still sends to it — an ordinary race as a cluster shuts
    down (seen at the end of a successful ``run -v``). Keep the line, drop the traceback: a
    run's output holds no traceback that says nothing about the run. Anything above INFO,
    or any other exception, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.comm.core import CommClosedError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CommClosedError) and record.levelno <= logging.INFO:
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def quiet_distributed() -> Iterator[None]:
    """Keep the in-process scheduler's INFO chatter off the terminal unless `-v` was given
    (and its shutdown race's traceback always: ``_ClosedCommLine``).

    distributed logs at INFO and its records also reach the root handler the CLI installs;
    with `-v` (root at INFO or lower) everything is shown as before.
    """

    import distributed  # noqa: F401  (its import configures this logger: do that first)

    logger = logging.getLogger("distributed")
    batched = logging.getLogger("distributed.batched")
    closed = _ClosedCommLine()
    batched.addFilter(closed)
    old = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)
        batched.removeFilter(closed)


@contextlib.contextmanager
def open_local_client(opts: ClusterOptions, page: bool = False) -> Iterator[Any]:
    """A client of a local cluster (``local``) or of an existing scheduler (``tcp://``)."""
    from distributed import Client, LocalCluster

    from dvidetl.httpfiles import WILDCARDS

    kind = opts.cluster
    if kind == "local":
        host, port = parse_dashboard_address(opts.dashboard_address)
        n = opts.workers or os.cpu_count() or 1
        import logging

        # a failed task is reported once, in the run's summary: without -v the worker
        # processes do not also print each failure's traceback on the terminal
        verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=opts.worker_memory or "auto",
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
    else:
        raise ValueError(f"not a local or tcp:// cluster: {kind!r}")


def _bound_port(http_server: Any, asked: int) -> int:
    """The port the scheduler's HTTP server really listens on (``asked`` may be 0, or taken)."""
    try:
        return int(next(iter(http_server._sockets.values())).getsockname()[1])
    except Exception:  # noqa: BLE001 - tornado internals moved: the asked port
        return asked

