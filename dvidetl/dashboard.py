"""Moved to ``dvidetl.export.dashboard`` (the run's page on the Dask dashboard; list that
module under ``distributed.scheduler.http.routes``): this path still works, with a
``DeprecationWarning`` on every name read through it."""

from dvidetl._moved import moved

moved(__name__, "dvidetl.export.dashboard")
