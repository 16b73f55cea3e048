"""Sources: what the reference Flight server serves, picked by URL scheme (like fsspec).

``open_source("synthetic://demo?size=...")`` returns a ``dvidetl.sources.base.Source``.
Schemes beyond the built-in ones come from entry points of the ``dvidetl.sources`` group or
``DVIDETL_EXTRA_SOURCES`` (``dvidetl.registry``, the same hooks as sinks); a scheme's module
is imported only when a URL of it is opened.
"""

from __future__ import annotations

from dvidetl.registry import SchemeRegistry
from dvidetl.sources.base import Source

#: URL scheme -> "module:callable" taking the URL and returning a Source
SCHEMES: dict[str, str] = {
    "synthetic": "dvidetl.sources.synthetic:open_url",
    "shards": "dvidetl.sources.shards:open_url",
    "dvid+http": "dvidetl.sources.dvid_http:open_url",
    "dvid+https": "dvidetl.sources.dvid_http:open_url",
}

REGISTRY = SchemeRegistry("source", SCHEMES, group="dvidetl.sources", env="DVIDETL_EXTRA_SOURCES")


def open_source(url: str) -> Source:
    """Open the source a URL names; an unknown scheme is a ``UserError`` naming the known ones."""
    return REGISTRY.open(url)


def known_schemes() -> dict[str, str]:
    """The built-in schemes plus registered ones, entry points and ``DVIDETL_EXTRA_SOURCES``."""
    return REGISTRY.schemes()


__all__ = ["Source", "open_source", "known_schemes", "SCHEMES", "REGISTRY"]
