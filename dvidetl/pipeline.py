"""The export, wired: plan (``planning``) -> tasks on the cluster (``tasks``), driven and
followed by ``driver``, reaching the source through a Flight ``endpoint``.

This module only re-exports those parts under the names other tools import
(``dvidetl.pipeline.make_plan``, ``execute``, ``export_partition``, ...); each lives in the
module that owns its job.
"""

from __future__ import annotations

from dvidetl.driver import RunResult, execute
from dvidetl.endpoint import FlightEndpoint, add_flight_arguments, open_flight, read_token
from dvidetl.planning import (
    DEFAULT_INDEX_ROWS,
    DEFAULT_MAPPING_ROWS,
    DEFAULT_PARTITION_BLOCKS,
    KEY_FAN_BITS,
    MIN_AUTO_PARTITION,
    MIN_AUTO_ROWS,
    CountFn,
    KeyCountFn,
    make_plan,
    merge_cells,
    new_run_id,
    plan_keys,
    plan_scale,
)
from dvidetl.sinks.base import LABEL_END, Partition, RunInfo
from dvidetl.tasks import (
    WRITE_BACKOFF_S,
    WRITE_TRIES,
    Secret,
    TaskContext,
    _client,
    _sink,
    export_partition,
    release_memory,
    task_context,
    write_with_backoff,
)

__all__ = [
    "DEFAULT_INDEX_ROWS", "DEFAULT_MAPPING_ROWS", "DEFAULT_PARTITION_BLOCKS", "KEY_FAN_BITS",
    "LABEL_END", "MIN_AUTO_PARTITION", "MIN_AUTO_ROWS", "WRITE_BACKOFF_S", "WRITE_TRIES",
    "CountFn", "FlightEndpoint", "KeyCountFn", "Partition", "RunInfo", "RunResult", "Secret",
    "TaskContext", "_client", "_sink", "add_flight_arguments", "execute", "export_partition",
    "make_plan", "merge_cells", "new_run_id", "open_flight", "plan_keys", "plan_scale",
    "read_token", "release_memory", "task_context", "write_with_backoff",
]
