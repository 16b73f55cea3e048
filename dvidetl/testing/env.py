"""Environment variables set for a block: credentials for worker processes in tests and
benchmarks (set before the processes start, so they inherit them), restored afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Module-scoped fixtures and benchmarks need this: pytest's ``monkeypatch`` is per test."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
