"""Sinks: where the exported tables go, picked by URL scheme (like sources).

``open_sink("parquet://./dvidetl-out", uuid=..., instance=...)`` returns a
``dvidetl.sinks.base.Sink``. A sink plugin is a module with ``open_url(url, *, uuid,
instance)`` and, to let readers open an export without naming it, ``list_exports(url)``
(the (instance, uuid) pairs it holds). Schemes beyond the built-in ones come from entry
points of the ``dvidetl.sinks`` group or ``DVIDETL_EXTRA_SINKS`` (``dvidetl.registry``) —
the test suite registers its fault-injecting ``flaky+parquet://`` that way.
"""

from __future__ import annotations

from dvidetl.errors import UserError
from dvidetl.registry import SchemeRegistry
from dvidetl.sinks.base import Sink

#: URL scheme -> "module:callable" taking (url, uuid=, instance=) and returning a Sink
SCHEMES: dict[str, str] = {
    "parquet": "dvidetl.sinks.parquet:open_url",
    "vastdb": "dvidetl.sinks.vastdb:open_url",
    "precomputed": "dvidetl.sinks.precomputed:open_url",
}

REGISTRY = SchemeRegistry("sink", SCHEMES, group="dvidetl.sinks", env="DVIDETL_EXTRA_SINKS")

DEFAULT_SINK = "parquet://./dvidetl-out"


def open_sink(url: str, *, uuid: str, instance: str) -> Sink:
    """Open the sink a URL names for one (uuid, instance); an unknown scheme is a
    ``UserError`` naming the known ones."""
    return REGISTRY.open(url, uuid=uuid, instance=instance)


def known_schemes() -> dict[str, str]:
    """The built-in schemes, plus registered ones, entry points of the ``dvidetl.sinks``
    group and ``DVIDETL_EXTRA_SINKS`` (a malformed entry there is a ``UserError``)."""
    return REGISTRY.schemes()


def find_export(url: str, uuid: str | None = None, instance: str | None = None) -> tuple[str, str]:
    """(instance, uuid) of the export at sink ``url``: as given, or the only one the sink
    holds (through its plugin's ``list_exports``); one-line ``UserError`` otherwise. ``uuid``
    may be a UUID prefix, as DVID accepts: an export is named by its full node UUID (a run
    resolves what the user asked for), so ``status``/``inspect`` given the prefix they typed
    for ``run`` find the same export; a prefix matching several exports is refused."""
    scheme, mod, _ = REGISTRY.module(url, "export")
    lister = getattr(mod, "list_exports", None)
    if lister is None:
        if uuid and instance:
            return instance, uuid
        raise UserError(f"{scheme}:// cannot list its exports: pass uuid= and instance=")
    mine = [(i, u) for i, u in lister(url) if not instance or i == instance]
    found = [(i, u) for i, u in mine if not uuid or u == uuid]
    if uuid and not found:
        found = [(i, u) for i, u in mine if u.startswith(uuid)]
    if not found:
        if uuid and instance:  # nothing stored yet: the caller's own message says what is missing
            return instance, uuid
        hint = (" (a Parquet export is <instance>/<uuid>/runs/ under its directory)"
                if scheme.endswith("parquet") else "")
        what = f" for uuid {uuid}" if uuid else ""
        raise UserError(f"no export found at {url}{what}{hint}")
    if len(found) > 1:
        names = ", ".join(f"{i}@{u}" for i, u in found[:6])
        raise UserError(f"several exports at {url} ({names}): pass "
                        + ("a longer uuid" if uuid else "uuid=") + " and instance=")
    return found[0]


__all__ = ["Sink", "open_sink", "find_export", "known_schemes", "SCHEMES", "REGISTRY", "DEFAULT_SINK"]
