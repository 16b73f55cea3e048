"""DVID range scans per 10^4 blocks: /blocks requests as Morton cubes (before) vs whole X rows
(``box_shape=rows``, now), against the fake DVID, for every partition of a default plan.

DVID serves ``/blocks`` with one Badger range scan per (y, z) row of the requested box; the
fake counts those scans (rows of each box, clipped to the grid). Also the wall time of
reading the plan's partitions through the source, same run, interleaved.
"""

from __future__ import annotations

import os
import time

SOURCE = os.environ.get("DVIDETL_BENCH_DVID_SOURCE", "synthetic://bd?size=2048,2048,1024&scales=1&seed=4")
ROUNDS = int(os.environ.get("DVIDETL_BENCH_ROUNDS", "2"))


def _read_plan(fake, shape: str, parts) -> tuple[int, int, float]:
    from dvidetl.sources import open_source

    src = open_source(f"dvid+http://127.0.0.1:{fake.port}?uuid={fake.uuid}&box_shape={shape}")
    fake.block_scans = fake.blocks_served = 0
    t0 = time.perf_counter()
    n = 0
    for p in parts:
        n += sum(b.num_rows for b in src.read_blocks(p.scale, p.lo, p.hi))
    dt = time.perf_counter() - t0
    src.close()
    assert n == fake.blocks_served
    return fake.block_scans, n, dt


def run() -> list[dict]:
    from dvidetl.export.planning import make_plan
    from dvidetl.sources import open_source
    from dvidetl.testing.fake_dvid import FakeDvid

    syn = open_source(SOURCE)
    rows: list[dict] = []
    with FakeDvid(syn) as fake:
        fake.locked = True
        src = open_source(f"dvid+http://127.0.0.1:{fake.port}?uuid={fake.uuid}")
        # partitions of 2^12 slots are one 16^3 cube whatever the shape; rows pay off once a
        # partition spans more slots than one request (sparse regions, bigger partitions)
        for pb in (4096, 32768, 262144):
            parts = make_plan(src.info(), src.count, [0], pb, indices=False, mapping=False)
            _read_plan(fake, "rows", parts[:1])  # warm the generator's caches a little
            best = {"cube": (0, 1, float("inf")), "rows": (0, 1, float("inf"))}
            for _ in range(ROUNDS):
                for shape in ("cube", "rows"):
                    scans, n, dt = _read_plan(fake, shape, parts)
                    if dt < best[shape][2]:
                        best[shape] = (scans, n, dt)
            per = {k: 1e4 * v[0] / max(v[1], 1) for k, v in best.items()}
            rows.append(dict(
                name=f"DVID scans/1e4 blocks, {pb}-slot partitions ({len(parts)})",
                value=per["rows"], unit="scans", baseline="Morton cubes (box_shape=cube)",
                baseline_value=per["cube"], ratio=per["rows"] / per["cube"],
                target="<= 0.5" if pb > 4096 else "= 1 (one cube either way)"))
        src.close()
    syn.close()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
