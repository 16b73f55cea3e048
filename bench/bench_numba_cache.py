"""The codec kernels loaded from numba's on-disk cache against the same kernels freshly
compiled, on real mCNS blocks.

Why: workers almost always load the kernels from the cache (``cache=True``). Until the
``_le8`` byte loop became one 8-byte load, the loaded ``repack_kernel`` and ``count_block``
ran ~4.5x slower on mCNS than in the process that compiled them, with the same machine code:
LLVM had vectorized the POPCNT loops into byte gathers (``vpinsrb``/``insertq``) behind a
runtime alias check, and which path ran depended on where the heap put the arrays. This row
guards against that coming back (ratio ~1.0). Each figure comes from its own subprocess with an empty ``NUMBA_CACHE_DIR`` (the
first compiles and fills it, the second loads it), interleaved over ``ROUNDS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("DVIDETL_BENCH_ROUNDS", "2"))

_PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from bench.bench_codec import _mcns_blocks
from dvidetl.codec import _kernels as K
from dvidetl.codec.block import _as_u8

raw = _mcns_blocks()[:300]
one = [_as_u8(b) for b in raw]
offs = np.concatenate([[0], np.cumsum([len(b) for b in raw])]).astype(np.int64)
buf = np.frombuffer(b"".join(raw), np.uint8).copy()
ok = np.ones(len(raw), np.bool_)
t0 = time.perf_counter()
K.count_block(one[0])
K.repack_kernel(buf.copy(), offs, ok)
first = time.perf_counter() - t0
best_r = best_c = float("inf")
for _ in range(3):
    b = buf.copy()
    t = time.perf_counter()
    K.repack_kernel(b, offs, ok)
    best_r = min(best_r, time.perf_counter() - t)
    t = time.perf_counter()
    for x in one:
        K.count_block(x)
    best_c = min(best_c, time.perf_counter() - t)
print(json.dumps({"first": first, "repack_us": best_r / len(raw) * 1e6,
                  "count_us": best_c / len(raw) * 1e6}))
"""


def _probe(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], env=env, check=True,
                         capture_output=True, text=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def run() -> list[dict]:
    fresh, cached = [], []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as d:
            fresh.append(_probe(d))  # compiles, fills the cache
            cached.append(_probe(d))  # loads it
    f_r = min(p["repack_us"] for p in fresh)
    c_r = min(p["repack_us"] for p in cached)
    f_c = min(p["count_us"] for p in fresh)
    c_c = min(p["count_us"] for p in cached)
    return [
        dict(name="repack_kernel loaded from cache, mCNS", value=c_r, unit="us/block",
             baseline="freshly compiled", baseline_value=f_r, ratio=c_r / f_r, target="~1.0"),
        dict(name="count_block loaded from cache, mCNS", value=c_c, unit="us/block",
             baseline="freshly compiled", baseline_value=f_c, ratio=c_c / f_c, target="~1.0"),
        dict(name="kernel compile time (first calls, no cache)", unit="s",
             value=min(p["first"] for p in fresh),
             baseline="cache load", baseline_value=min(p["first"] for p in cached)),
    ]
