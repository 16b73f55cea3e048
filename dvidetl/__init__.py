"""dvidetl — export a DVID labelmap at one UUID into VastDB (or Parquet), exactly once.

``from dvidetl import open_export`` is the reading entry point (see ``dvidetl.read``); it is
imported on first use so ``import dvidetl`` stays light for the CLI and the workers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_export", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "open_export":
        from dvidetl.read import open_export

        return open_export
    raise AttributeError(f"module 'dvidetl' has no attribute {name!r}")
