"""Moved to ``dvidetl.tables.schema`` (the exported tables and their format versions): this
path still works, with a ``DeprecationWarning`` on every name read through it."""

from dvidetl._moved import moved

moved(__name__, "dvidetl.tables.schema")
