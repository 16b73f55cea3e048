"""Sources: what the reference Flight server serves, picked by URL scheme (like fsspec).

`open_source("synthetic://demo?size=...")` returns an object implementing
`dvidetl.sources.base.Source`. Modules are imported lazily so a scheme's dependencies load
only when used.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from dvidetl.errors import UserError
from dvidetl.sources.base import Source

#: URL scheme -> "module:callable" taking the URL and returning a Source
SCHEMES: dict[str, str] = {
    "synthetic": "dvidetl.sources.synthetic:open_url",
    "shards": "dvidetl.sources.shards:open_url",
    "dvid+http": "dvidetl.sources.dvid_http:open_url",
    "dvid+https": "dvidetl.sources.dvid_http:open_url",
}


def open_source(url: str) -> Source:
    """Open the source a URL names; an unknown scheme is a `UserError` naming the known ones."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise UserError(f"unknown source URL scheme in {url!r}: use one of {known}")
    modname, func = SCHEMES[scheme].split(":")
    return getattr(importlib.import_module(modname), func)(url)


__all__ = ["Source", "open_source", "SCHEMES"]
