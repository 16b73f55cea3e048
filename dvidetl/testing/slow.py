"""A source slowed down on purpose, so a fault (or a look at the dashboard) lands while
partitions are in flight."""

from __future__ import annotations

import time


class SlowSource:
    """A real source whose ``read_blocks``, ``read_indices`` and ``read_mapping`` wait
    ``delay`` seconds first, so a run lasts long enough for a fault to land while
    partitions are in flight. Everything else is the inner source's."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_blocks(self, scale, lo, hi):
        time.sleep(self.delay)
        yield from self.inner.read_blocks(scale, lo, hi)

    def read_indices(self, lo, hi):
        time.sleep(self.delay)
        yield from self.inner.read_indices(lo, hi)

    def read_mapping(self, lo=0, hi=1 << 64):
        time.sleep(self.delay)
        yield from self.inner.read_mapping(lo, hi)
