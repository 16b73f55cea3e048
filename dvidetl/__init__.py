"""dvidetl — export a DVID labelmap at one UUID into VastDB (or Parquet), exactly once.

The library API (what the commands, the benchmarks and other tools call), imported on first
use so ``import dvidetl`` stays light for the CLI and the workers:

* ``dvidetl.export(source, sinks, RunOptions(...), uuid=..., cluster=...) -> RunResult`` (``sinks``: one URL or several, written in the same pass);
* ``dvidetl.verify(source, sink, uuid=..., cluster=..., repair=...) -> VerifyReport``;
* ``dvidetl.open_export(url)`` — reading an export back (``dvidetl.read``);
* ``RunOptions``, ``RunResult``, ``ClusterOptions``; ``open_flight``, ``open_client``,
  ``open_source``, ``open_sink``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "verify": "dvidetl.read.verify",
    "open_export": "dvidetl.read",
    "RunOptions": "dvidetl.export.options",
    "RunResult": "dvidetl.export.driver",
    "ClusterOptions": "dvidetl.cluster",
    "open_client": "dvidetl.cluster",
    "open_flight": "dvidetl.export.endpoint",
    "open_source": "dvidetl.sources",
    "open_sink": "dvidetl.sinks",
}
__all__ = ["export", *_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "export":  # the export package, callable (see dvidetl/export/__init__.py)
        return importlib.import_module("dvidetl.export")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dvidetl' has no attribute {name!r}")
