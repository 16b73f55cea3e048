"""The export stage — and, called, the library API: ``dvidetl.export(source, sinks, options)``.

Modules: ``kinds`` and ``batch`` (partition kinds and the typed partition data: the
vocabulary every stage shares), ``options`` (``RunOptions``), ``planning``, ``tasks``,
``transform``, ``spill``, ``driver``, ``endpoint``, ``progress``, ``dashboard``, and ``api``
(``export``, ``ExportRun``).

``dvidetl.export`` is this package, and calling it calls ``api.export`` (see there):
Python binds a subpackage to its parent's attribute of the same name on import, so the
package itself is made callable (the module-class way zarr's ``VerboseModule`` uses) rather
than having a function that the first ``import dvidetl.export.tasks`` would replace.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any


class _CallableModule(ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from dvidetl.export.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
