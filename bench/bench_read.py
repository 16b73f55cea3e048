"""Reading an export back: one block from a ~100,000-block export, and a 512^3 subvolume.

The export is built once per run, cheaply: 64 real synthetic blocks are repacked once and
their rows repeated (new coordinates, Morton order) through ``tables.cells.blocks_tables`` into
the Parquet sink, in 4,096-block partitions with ledger rows — the same files a real run
writes, without generating 100,000 blocks.

Figures (same run, interleaved; compare ratios, this machine is noisy):

* ``one block``: ``Export.block`` (pushed-down scale + Morton range, decode, body mapping)
  vs the full-scan baseline (read every ``blocks`` row of the scale and filter in Python —
  what a reader without predicate pushdown does). Target: milliseconds, >= 100x the scan.
* ``one raw block``: ``Export.raw_block``, and the DuckDB views of ``connect`` (x/y/z
  predicate, no Morton pruning) for comparison.
* ``subvolume 512^3``: ``Export.subvolume(...).compute()`` (512 blocks, grouped ranged
  reads, threads; the 1 GiB uint64 result dominates) and the same array reduced per chunk
  (read + decode rate), vs ``Export.block`` called once per block, one after the other.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import numpy as np

N_BLOCKS = int(os.environ.get("DVIDETL_BENCH_READ_BLOCKS", "100000"))
GRID = (64, 64, 32)  # 131,072 slots
PART = 4096
POINTS = int(os.environ.get("DVIDETL_BENCH_READ_POINTS", "40"))
#: blocks of the VastDB export (the local server holds it in memory)
N_VAST = int(os.environ.get("DVIDETL_BENCH_READ_VAST_BLOCKS", "20000"))

def _stats(part, figures):
    """A partition's stats with the given ledger figures (what a task hands the sink)."""
    from dvidetl.export.kinds import PartitionStats

    return figures if isinstance(figures, PartitionStats) else PartitionStats(part.key, part.kind, **figures)



def build(url: str, n_blocks: int = N_BLOCKS) -> tuple[str, float, int]:
    """Write the export of ``n_blocks`` blocks to the sink at ``url``; returns (url, seconds,
    payload bytes written)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dvidetl.codec import repack
    from dvidetl.export.kinds import Partition, RunInfo
    from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_decode
    from dvidetl.sinks import open_sink
    from dvidetl.sources import open_source
    from dvidetl.tables.cells import blocks_tables

    t0 = time.perf_counter()
    src = open_source("synthetic://readbench?size=512,512,256&scales=1&seed=11&mask=full")
    xs, ys, zs, _ = src.present_blocks(0)
    picks = list(zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True))[:64]
    stored = pa.array([src.block_stored(0, *p) for p in picks], pa.binary())
    rp = repack(stored, "gzip")
    labels = pa.array(
        [src.map_supervoxels(np.asarray(s, np.uint64)).tolist() for s in rp.supervoxels.to_pylist()],
        pa.list_(pa.uint64()),
    )
    src.close()
    info = VolumeInfo("readbench", "segmentation", "gzip", [ScaleInfo(0, (64, 64, 64), GRID)])
    parts = [Partition("blocks", 0, lo, min(lo + PART, n_blocks), min(PART, n_blocks - lo))
             for lo in range(0, n_blocks, PART)]
    run = RunInfo("bench-read", info.uuid, info.instance, parts, options={"scales": [0]},
                  volume=__import__("json").loads(info.to_json()))
    sink = open_sink(url, uuid=info.uuid, instance=info.instance)
    size = 0
    sink.prepare(run)
    for p in parts:
        m = np.arange(p.lo, p.hi, dtype=np.uint64)
        x, y, z = morton_decode(m, GRID)
        take = pa.array(m % len(picks))
        b, o = blocks_tables(
            0, x, y, z, m, rp.supervoxels.take(take), labels.take(take), rp.sv_voxels.take(take),
            rp.raw_size.to_numpy().astype(np.uint32)[m % len(picks)],
            rp.crc32.to_numpy().astype(np.uint32)[m % len(picks)], rp.payload.take(take),
        )
        nbytes = int(pc.sum(b.column("payload_size")).as_py())
        sink.write_partition(run.run_id, p, {"blocks": b, "block_overflow": o},
                            _stats(p, {"blocks": b.num_rows, "bytes_out": nbytes}))
        size += nbytes
    return url, time.perf_counter() - t0, size


def _ms(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _points(ex, n_blocks: int, tag: str, con=None) -> list[dict]:
    """One-block latency (Export.block / raw_block, optionally DuckDB views) vs a full scan,
    interleaved rounds."""
    import pyarrow.compute as pc

    from dvidetl.geometry import morton_decode
    from dvidetl.read import reassemble_block

    rng = random.Random(5)
    xs, ys, zs = morton_decode(np.array(rng.sample(range(n_blocks), POINTS), np.uint64), GRID)
    coords = list(zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True))
    ex.block(0, *coords[0])  # warm imports / numba / sessions

    def scan(c):
        t = ex.read("blocks", scale=0)
        return t.filter(pc.and_(pc.and_(pc.equal(t.column("x"), c[0]), pc.equal(t.column("y"), c[1])),
                                pc.equal(t.column("z"), c[2])))

    it, it2, it3 = iter(coords * 4), iter(coords * 4), iter(coords * 4)
    point, raw, duck, base = [], [], [], []
    for _ in range(3):  # interleaved rounds
        point.append(_ms(lambda: ex.block(0, *next(it)), POINTS // 3 or 1))
        raw.append(_ms(lambda: ex.raw_block(0, *next(it2)), POINTS // 3 or 1))
        if con is not None:
            duck.append(_ms(lambda: reassemble_block(con, 0, *next(it3)), 3))
        base.append(_ms(lambda: scan(coords[0]), 1))
    assert scan(coords[1]).num_rows == 1
    p, b, r = statistics.median(point), statistics.median(base), statistics.median(raw)
    rows = [
        {"name": f"{tag}: one block (Export.block)", "value": p, "unit": "ms",
         "baseline": "full scan + filter", "baseline_value": b, "ratio": p / b,
         "target": "milliseconds; ratio <= 0.01"},
        {"name": f"{tag}: one raw block (raw_block)", "value": r, "unit": "ms",
         "baseline": "full scan + filter", "baseline_value": b, "ratio": r / b},
    ]
    if duck:
        dd = statistics.median(duck)
        rows.append({"name": f"{tag}: one raw block (DuckDB x/y/z)", "value": dd, "unit": "ms",
                     "baseline": "Export.raw_block", "baseline_value": r, "ratio": dd / r})
    return rows


def _subvolume(ex, tag: str) -> list[dict]:
    """512^3 in the middle of the volume (blocks 16..23 x 16..23 x 8..15, all present)."""
    box = ((1024, 1024, 512), (1536, 1536, 1024))
    a = ex.subvolume(0, box)
    t0 = time.perf_counter()
    v = a.compute()
    sub = time.perf_counter() - t0
    assert v.shape == (512, 512, 512) and v.any()
    del v
    # the same blocks reduced per chunk: the read + decode rate without the 1 GiB result
    t0 = time.perf_counter()
    n = int((a != 0).sum().compute())
    red = time.perf_counter() - t0
    assert n > 0
    t0 = time.perf_counter()
    for bz in range(8, 16):
        for by in range(16, 24):
            for bx in range(16, 24):
                ex.block(0, bx, by, bz)
    serial = time.perf_counter() - t0
    return [
        {"name": f"{tag}: subvolume 512^3 compute", "value": sub, "unit": "s",
         "baseline": "Export.block x 512, serial", "baseline_value": serial, "ratio": sub / serial,
         "target": f"{512 / sub:,.0f} blocks/s incl. the 1 GiB uint64 result"},
        {"name": f"{tag}: subvolume 512^3 reduced per chunk", "value": red, "unit": "s",
         "baseline": "Export.block x 512, serial", "baseline_value": serial, "ratio": red / serial,
         "target": f"{512 / red:,.0f} blocks/s"},
    ]


def run() -> list[dict]:
    from dvidetl.read import connect, open_export
    from dvidetl.testing.env import environ
    from dvidetl.testing.vastsim import start_vastsim

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dvidetl-bench-read-") as d:
        url, secs, size = build(f"parquet://{d}/out")
        rows.append({"name": f"parquet: build {N_BLOCKS:,}-block export", "value": secs, "unit": "s",
                     "target": f"cheap ({size / 1e6:,.0f} MB of block bodies)"})
        ex = open_export(url)
        rows += _points(ex, N_BLOCKS, "parquet", con=connect(f"{d}/out"))
        rows += _subvolume(ex, "parquet")
    # VastDB: the real SDK against the local server (in memory, this process)
    keys = {"VASTDB_ACCESS_KEY": "AKIDBENCHREAD", "VASTDB_SECRET_KEY": "bench-read-only-local"}
    with environ(**keys), start_vastsim(None, access_key=keys["VASTDB_ACCESS_KEY"],
                                        secret_key=keys["VASTDB_SECRET_KEY"]) as sim:
        url, secs, size = build(f"vastdb://127.0.0.1:{sim.port}/bucket/bench", N_VAST)
        rows.append({"name": f"vastdb: build {N_VAST:,}-block export", "value": secs, "unit": "s",
                     "target": f"{size / 1e6:,.0f} MB of block bodies"})
        ex = open_export(url)
        rows += _points(ex, N_VAST, "vastdb")
        rows += _subvolume(ex, "vastdb")
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
