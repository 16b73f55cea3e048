"""Module paths other tools may still import after a module moved: the old path stays as a
module that forwards every attribute to the new one with a ``DeprecationWarning`` naming it
(zarr's ``VerboseModule`` way), instead of a silent alias that hides the move."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any


class _MovedModule(ModuleType):
    _new: str

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # pickle, inspect, doctest probing: neither warn nor forward
            raise AttributeError(name)
        try:
            value = getattr(importlib.import_module(self._new), name)
        except AttributeError:  # not there either: no warning that would send anyone there
            raise AttributeError(f"module {self.__name__!r} (moved to {self._new}) has no "
                                 f"attribute {name!r}") from None
        warnings.warn(f"{self.__name__} moved to {self._new}: import {name} from there",
                      DeprecationWarning, stacklevel=2)
        return value

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self._new))


def moved(old: str, new: str) -> None:
    """Make module ``old`` (already in ``sys.modules``, being imported) forward to ``new``."""
    mod = sys.modules[old]
    mod.__class__ = _MovedModule
    mod._new = new  # type: ignore[attr-defined]
