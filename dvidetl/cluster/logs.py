"""The workers' dvidetl log in the driver: a worker's records reach the driver's handlers (the
terminal, ``--log-file``), redacted before they leave the worker.

Why: a worker process has no handler of its own (its records went to Python's last-resort
stderr handler, WARNING and up: on the terminal of a local cluster, in a SLURM job's log
file), so ``--log-file`` held the driver's side of a run only — not a task's retries, a
sink's backoff, a source's slow reads. ``distributed``'s ``ForwardLoggingPlugin`` ships the
records as scheduler events; this subclass also sets the worker's level to the driver's (a
worker starts at WARNING, so INFO records were never made) and redacts on the forwarding
handler (the scheduler keeps events: a secret must not reach it either)."""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import ForwardLoggingPlugin

from dvidetl.redact import RedactingFilter

LOGGER = "dvidetl"
PLUGIN = "dvidetl-worker-logs"
TOPIC = "forwarded-log-record-dvidetl-worker-logs"


class _WorkerFilter(logging.Filter):
    """Names the worker in a record (``[worker ADDR] ...`` in the driver's log)."""

    def __init__(self, address: str):
        super().__init__()
        self.address = address

    def filter(self, record: logging.LogRecord) -> bool:
        record.dvidetl_worker = self.address
        return True


class WorkerLogs(ForwardLoggingPlugin):
    """Forward the worker's ``dvidetl`` records at ``level`` and up, redacted, to ``TOPIC``."""

    def setup(self, worker: Any) -> None:
        super().setup(worker)
        assert self.handler is not None
        self.handler.addFilter(_WorkerFilter(str(worker.address)))
        self.handler.addFilter(RedactingFilter())
        logging.getLogger(self.logger_name).setLevel(self.level)


def _handle(event: tuple[float, dict]) -> None:
    """A forwarded record, handled by the driver's logger of the same name."""
    _, attrs = event
    record = logging.makeLogRecord(attrs)
    worker = attrs.get("dvidetl_worker")
    if worker:
        record.msg = f"[worker {worker}] {record.msg}"
    logging.getLogger(record.name).handle(record)


def forward_worker_logs(client: Any) -> None:
    """Workers of ``client`` (those there now and those that join later) send their dvidetl
    records at the driver's level (the root's: INFO with ``-v`` or ``--log-file``, else
    WARNING) to this process's handlers."""
    level = logging.getLogger().getEffectiveLevel()
    client.subscribe_topic(TOPIC, _handle)
    client.register_plugin(WorkerLogs(LOGGER, level, TOPIC), name=PLUGIN)
