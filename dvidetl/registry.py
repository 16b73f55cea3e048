"""Plugins picked by URL scheme, for sources and sinks alike (fsspec's ``known_implementations``
plus ``registry``, numcodecs' entry-point registry).

A scheme names a ``"module:callable"`` target. Three places add schemes, in this order of
precedence (the first wins): the built-in table of the package, :meth:`SchemeRegistry.register`
in this process, entry points of the package's group (``dvidetl.sources`` /
``dvidetl.sinks``: ``scheme = "module:callable"``), and an environment variable
(``DVIDETL_EXTRA_SOURCES`` / ``DVIDETL_EXTRA_SINKS``: ``scheme=module:callable,...``) —
which Dask workers and CLI subprocesses inherit, so a plugin named there opens on every
worker (the test suite registers its fault-injecting sink that way). Modules are imported
only when a URL of their scheme is opened, so a plugin's dependencies load only when used.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from dvidetl.errors import UserError


class SchemeRegistry:
    """The URL schemes of one kind of plugin (``what``: "source" or "sink")."""

    def __init__(self, what: str, builtin: dict[str, str], *, group: str, env: str):
        self.what, self.builtin, self.group, self.env = what, dict(builtin), group, env
        self._registered: dict[str, str] = {}

    def register(self, scheme: str, target: str) -> None:
        """Add ``scheme`` -> ``"module:callable"`` in this process (a plugin that is not
        installed as a package; workers in other processes need the environment variable)."""
        if ":" not in target:
            raise ValueError(f"{self.what} target {target!r} is not 'module:callable'")
        self._registered[scheme] = target

    def schemes(self) -> dict[str, str]:
        """Every known scheme -> target (a malformed environment entry is a ``UserError``
        naming the format)."""
        out = {**self.builtin}
        for scheme, target in self._registered.items():
            out.setdefault(scheme, target)
        for ep in entry_points(group=self.group):
            out.setdefault(ep.name, ep.value)
        for item in filter(None, (t.strip() for t in os.environ.get(self.env, "").split(","))):
            scheme, sep, target = item.partition("=")
            if not sep or ":" not in target or not scheme.strip():
                raise UserError(f"{self.env}: {item!r} is not scheme=module:callable")
            out.setdefault(scheme.strip(), target.strip())
        return out

    def target(self, url: str, what: str | None = None) -> tuple[str, str, str]:
        """(scheme, module, callable) of ``url``; an unknown scheme is a ``UserError``
        naming the known ones (and ``what`` the URL is: default the plugin kind)."""
        scheme = urlsplit(url).scheme
        schemes = self.schemes()
        if scheme not in schemes:
            known = ", ".join(f"{s}://" for s in schemes)
            raise UserError(f"unknown {what or self.what} URL scheme in {url!r}: use one of {known}")
        modname, _, func = schemes[scheme].partition(":")
        return scheme, modname, func

    def module(self, url: str, what: str | None = None) -> tuple[str, ModuleType, str]:
        """(scheme, the plugin's module, its callable's name) for ``url``."""
        scheme, modname, func = self.target(url, what)
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                raise UserError(f"{self.what} {scheme}:// is not available in this build "
                                f"(no module {modname})") from None
            raise
        return scheme, mod, func

    def open(self, url: str, **kwargs: Any) -> Any:
        """The plugin's callable applied to ``url`` (and ``kwargs``)."""
        _scheme, mod, func = self.module(url)
        return getattr(mod, func)(url, **kwargs)
