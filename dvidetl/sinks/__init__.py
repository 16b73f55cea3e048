"""Sinks: where the exported tables go, picked by URL scheme (like sources).

``open_sink("parquet://./dvidetl-out", uuid=..., instance=...)`` returns an object
implementing ``dvidetl.sinks.base.Sink``. Modules are imported lazily, so the VastDB client
loads only for ``vastdb://`` URLs.

More schemes plug in without editing this table (the fsspec way): a package declares an
entry point in the ``dvidetl.sinks`` group (``scheme = "module:callable"``), or the
environment names them in ``DVIDETL_EXTRA_SINKS="scheme=module:callable,..."`` — the test
suite registers its fault-injecting ``flaky+parquet://`` that way, and Dask workers and CLI
subprocesses inherit it with the environment.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from dvidetl.errors import UserError
from dvidetl.sinks.base import Partition, RunInfo, Sink

#: URL scheme -> "module:callable" taking (url, uuid=, instance=) and returning a Sink
SCHEMES: dict[str, str] = {
    "parquet": "dvidetl.sinks.parquet:open_url",
    "vastdb": "dvidetl.sinks.vastdb:open_url",
}

EXTRA_ENV = "DVIDETL_EXTRA_SINKS"

DEFAULT_SINK = "parquet://./dvidetl-out"


def open_sink(url: str, *, uuid: str, instance: str) -> Sink:
    """Open the sink a URL names for one (uuid, instance); an unknown scheme is a
    ``UserError`` naming the known ones."""
    scheme = urlsplit(url).scheme
    schemes = known_schemes()
    if scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        raise UserError(f"unknown sink URL scheme in {url!r}: use one of {known}")
    modname, func = schemes[scheme].split(":")
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            raise UserError(f"sink {scheme}:// is not available in this build") from None
        raise
    return getattr(mod, func)(url, uuid=uuid, instance=instance)


def known_schemes() -> dict[str, str]:
    """The built-in schemes, plus entry points of the ``dvidetl.sinks`` group, plus
    ``DVIDETL_EXTRA_SINKS`` (a malformed entry there is a ``UserError`` naming the format)."""
    out = dict(SCHEMES)
    for ep in entry_points(group="dvidetl.sinks"):
        out.setdefault(ep.name, ep.value)
    for item in filter(None, (t.strip() for t in os.environ.get(EXTRA_ENV, "").split(","))):
        scheme, sep, target = item.partition("=")
        if not sep or ":" not in target or not scheme.strip():
            raise UserError(f"{EXTRA_ENV}: {item!r} is not scheme=module:callable")
        out.setdefault(scheme.strip(), target.strip())
    return out


__all__ = ["Sink", "Partition", "RunInfo", "open_sink", "known_schemes", "SCHEMES", "DEFAULT_SINK"]
