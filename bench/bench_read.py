"""Reading an export back: one block from a ~100,000-block export, and a 512^3 subvolume.

The export is built once per run, cheaply: 64 real synthetic blocks are repacked once and
their rows repeated (new coordinates, Morton order) through ``transform.blocks_tables`` into
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


def build(outdir: str) -> tuple[str, float, int]:
    """Write the export; returns (url, seconds, bytes on disk)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dvidetl.codec import repack
    from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_decode
    from dvidetl.sinks import open_sink
    from dvidetl.sinks.base import Partition, RunInfo
    from dvidetl.sources import open_source
    from dvidetl.transform import blocks_tables

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
    parts = [Partition("blocks", 0, lo, min(lo + PART, N_BLOCKS), min(PART, N_BLOCKS - lo))
             for lo in range(0, N_BLOCKS, PART)]
    run = RunInfo("bench-read", info.uuid, info.instance, parts, options={"scales": [0]},
                  volume=__import__("json").loads(info.to_json()))
    url = f"parquet://{outdir}"
    sink = open_sink(url, uuid=info.uuid, instance=info.instance)
    sink.prepare(run)
    for p in parts:
        m = np.arange(p.lo, p.hi, dtype=np.uint64)
        x, y, z = morton_decode(m, GRID)
        take = pa.array(m % len(picks))
        b, o = blocks_tables(
            0, x, y, z, m, rp.supervoxels.take(take), labels.take(take), rp.sv_voxels.take(take),
            rp.raw_size.to_numpy().astype(np.uint32)[m % len(picks)],
            rp.crc32.to_numpy().astype(np.uint32)[m % len(picks)], rp.body.take(take),
        )
        sink.write_partition(run.run_id, p, {"blocks": b, "block_overflow": o},
                             {"blocks": b.num_rows, "bytes_out": int(pc.sum(b.column("body_size")).as_py())})
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(outdir).rglob("*.parquet"))
    return url, time.perf_counter() - t0, size


def _ms(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def run() -> list[dict]:
    import pyarrow.compute as pc

    from dvidetl.geometry import morton_decode
    from dvidetl.read import connect, open_export, reassemble_body

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dvidetl-bench-read-") as d:
        url, secs, size = build(d + "/out")
        rows.append({"name": f"build {N_BLOCKS:,}-block export", "value": secs, "unit": "s",
                     "target": f"cheap ({size / 1e6:,.0f} MB of Parquet)"})
        ex = open_export(url)
        rng = random.Random(5)
        xs, ys, zs = morton_decode(np.array(rng.sample(range(N_BLOCKS), POINTS), np.uint64), GRID)
        coords = list(zip(xs.tolist(), ys.tolist(), zs.tolist(), strict=True))
        ex.block(0, *coords[0])  # warm imports / numba

        def scan(c):
            t = ex.read("blocks", scale=0)
            return t.filter(pc.and_(pc.and_(pc.equal(t.column("x"), c[0]), pc.equal(t.column("y"), c[1])),
                                    pc.equal(t.column("z"), c[2])))

        it = iter(coords * 4)
        it2 = iter(coords * 4)
        it3 = iter(coords * 4)
        con = connect(d + "/out")
        point, raw, duck, base = [], [], [], []
        for _ in range(3):  # interleaved rounds
            point.append(_ms(lambda: ex.block(0, *next(it)), POINTS // 3 or 1))
            raw.append(_ms(lambda: ex.raw_block(0, *next(it2)), POINTS // 3 or 1))
            duck.append(_ms(lambda: reassemble_body(con, 0, *next(it3)), 3))
            base.append(_ms(lambda: scan(coords[0]), 1))
        assert scan(coords[1]).num_rows == 1
        p, b = statistics.median(point), statistics.median(base)
        rows.append({"name": "one block (Export.block, bodies)", "value": p, "unit": "ms",
                     "baseline": "full scan + filter", "baseline_value": b, "ratio": p / b,
                     "target": "milliseconds; ratio <= 0.01"})
        r = statistics.median(raw)
        rows.append({"name": "one raw block (Export.raw_block)", "value": r, "unit": "ms",
                     "baseline": "full scan + filter", "baseline_value": b, "ratio": r / b})
        dd = statistics.median(duck)
        rows.append({"name": "one raw block (DuckDB views, x/y/z)", "value": dd, "unit": "ms",
                     "baseline": "Export.raw_block", "baseline_value": r, "ratio": dd / r})
        # 512^3 subvolume: 8x8x8 blocks in the middle of the volume
        box = ((1024, 1024, 512), (1536, 1536, 1024))
        a = ex.subvolume(0, box)
        t0 = time.perf_counter()
        v = a.compute()
        sub = time.perf_counter() - t0
        assert v.shape == (512, 512, 512) and v.any()
        t0 = time.perf_counter()
        for bz in range(8, 16):
            for by in range(16, 24):
                for bx in range(16, 24):
                    ex.block(0, bx, by, bz)
        one_by_one = time.perf_counter() - t0
        del v
        # the same blocks reduced per chunk: the read + decode rate without the 1 GiB result
        t0 = time.perf_counter()
        n = int((a != 0).sum().compute())
        red = time.perf_counter() - t0
        assert n > 0
        rows.append({"name": "subvolume 512^3 (512 blocks, compute)", "value": sub, "unit": "s",
                     "baseline": "Export.block x 512, serial", "baseline_value": one_by_one,
                     "ratio": sub / one_by_one,
                     "target": f"{512 / sub:,.0f} blocks/s incl. the 1 GiB uint64 result"})
        rows.append({"name": "subvolume 512^3 reduced per chunk", "value": red, "unit": "s",
                     "baseline": "Export.block x 512, serial", "baseline_value": one_by_one,
                     "ratio": red / one_by_one, "target": f"{512 / red:,.0f} blocks/s"})
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
