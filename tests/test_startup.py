"""What a command line start-up costs: building the parser (``dvidetl --help``, and every
command before it runs) imports no heavy package. The function-local imports in dvidetl are
there for this (and for the workers, which load only what their tasks use); everything
else is imported at module top (``make lint``'s mypy sees those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: packages that take hundreds of milliseconds or more to import, none of which the parser needs
HEAVY = ("distributed", "dask", "numba", "vastdb", "duckdb", "pyarrow.flight", "pyarrow.parquet",
         "bokeh", "tornado", "neuroglancer", "psutil", "google.protobuf", "tensorstore", "pandas")


def _loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + f"\nimport sys, json; print(json.dumps("
                          f"[m for m in {HEAVY!r} if m in sys.modules]))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_package():
    assert _loaded("from dvidetl.cli import build_parser; build_parser()") == []


def test_the_check_sees_a_heavy_import():
    """Not vacuous: modules that need them at import load them (the run's dashboard page is
    a Dask routes module; the Flight client and the Parquet sink are what they say)."""
    assert "distributed" in _loaded("import dvidetl.export.dashboard")
    assert "pyarrow.flight" in _loaded("import dvidetl.flight.client")
    assert "pyarrow.parquet" in _loaded("import dvidetl.sinks.parquet")
