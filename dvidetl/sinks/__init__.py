"""Sinks: where the exported tables go, picked by URL scheme (like sources).

``open_sink("parquet://./dvidetl-out", uuid=..., instance=...)`` returns an object
implementing ``dvidetl.sinks.base.Sink``. Modules are imported lazily, so the VastDB client
loads only for ``vastdb://`` URLs.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from dvidetl.errors import UserError
from dvidetl.sinks.base import Partition, RunInfo, Sink

#: URL scheme -> "module:callable" taking (url, uuid=, instance=) and returning a Sink
SCHEMES: dict[str, str] = {
    "parquet": "dvidetl.sinks.parquet:open_url",
    "vastdb": "dvidetl.sinks.vastdb:open_url",
    # fault injection for tests/faults (a Parquet sink that fails on purpose)
    "flaky+parquet": "dvidetl.testing.faulty_sink:open_url",
}

DEFAULT_SINK = "parquet://./dvidetl-out"


def open_sink(url: str, *, uuid: str, instance: str) -> Sink:
    """Open the sink a URL names for one (uuid, instance); an unknown scheme is a
    ``UserError`` naming the known ones."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise UserError(f"unknown sink URL scheme in {url!r}: use one of {known}")
    modname, func = SCHEMES[scheme].split(":")
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise UserError(f"sink {scheme}:// is not available in this build") from None
        raise
    return getattr(mod, func)(url, uuid=uuid, instance=instance)


__all__ = ["Sink", "Partition", "RunInfo", "open_sink", "SCHEMES", "DEFAULT_SINK"]
