"""A source slowed down on purpose, so a fault (or a look at the dashboard) lands while
partitions are in flight — or while the run is still planning."""

from __future__ import annotations

import time

from dvidetl.geometry import KEY_END


class SlowSource:
    """A real source whose ``read_blocks``, ``read_indices`` and ``read_mapping`` wait
    ``delay`` seconds first, so a run lasts long enough for a fault to land while
    partitions are in flight; ``plan_delay`` makes every ``count_keys`` wait that long too
    (a source that takes its time to count, as a generated volume building its label
    indices does). Everything else is the inner source's."""

    def __init__(self, inner, delay: float, plan_delay: float = 0.0):
        self.inner, self.delay, self.plan_delay = inner, delay, plan_delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_blocks(self, scale, lo, hi):
        time.sleep(self.delay)
        yield from self.inner.read_blocks(scale, lo, hi)

    def read_indices(self, lo, hi):
        time.sleep(self.delay)
        yield from self.inner.read_indices(lo, hi)

    def read_mapping(self, lo=0, hi=KEY_END):
        time.sleep(self.delay)
        yield from self.inner.read_mapping(lo, hi)

    def count_keys(self, kind, cell_bits, lo=0, hi=KEY_END):
        time.sleep(self.plan_delay)
        return self.inner.count_keys(kind, cell_bits, lo, hi)
