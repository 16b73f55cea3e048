"""Test helpers that are real servers, not mocks.

`vastsim` is a local, wire-compatible subset of the VAST DataBase tabular HTTP API, driven by
the unmodified `vastdb` SDK (see docs/vastsim.md); `conformance` runs VAST's own SDK
integration tests against it. Also: `dvid_server` (the real DVID server, started from
``../shared/dvid/bin/dvid``, and loaders that fill it as DVID users do), `fake_dvid` (a DVID
HTTP model over any source, only for faults the real server cannot show),
`corrupt` (the corrupt-block corpus), `faulty_sink` (`flaky+parquet://`), `blocks` (DVID
blocks packed by plain numpy), `env` (environment variables for a block).
"""

from __future__ import annotations

# Those in try/if/with blocks are optional or conditional.

__all__ = ["start_vastsim", "VastSim"]


def __getattr__(name: str):  # lazy: importing dvidetl.testing must not pull in pyarrow/vastdb
    if name in __all__:
        from dvidetl.testing import vastsim

        return getattr(vastsim, name)
    raise AttributeError(name)
