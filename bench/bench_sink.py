"""Sink write rate: the same transformed partitions committed into the local VastDB server
(real SDK over HTTP, one transaction per partition) and into the Parquet sink.

The baseline is the Parquet sink (local files) writing exactly the same partitions in the
same run, interleaved round by round (this machine is noisy: compare the ratio). The VastDB
figure includes everything a worker pays per partition: the ledger check, the delete of an
earlier run's rows, one-RPC inserts, the ledger row and the commit — against vastsim in a
child process (its Python decode/persist costs are not VAST's, so the absolute figure says
more about the emulator than about a cluster; the client-CPU row is the sink's own cost:
SDK, Arrow IPC, SigV4 hashing, cell checks). Target (not asserted): the sink is not
the bottleneck, i.e. >= 0.25x Parquet here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from dvidetl.tables import schema as S

SOURCE = os.environ.get("DVIDETL_BENCH_SINK_SOURCE", "synthetic://sinkbench?size=768,768,512&scales=1&seed=4&dense=0.02")
ROUNDS = int(os.environ.get("DVIDETL_BENCH_ROUNDS", "2"))
PARTITION_BLOCKS = 64


def _stats(part, figures):
    """A partition's stats with the given ledger figures (what a task hands the sink)."""
    from dvidetl.export.kinds import PartitionStats

    return figures if isinstance(figures, PartitionStats) else PartitionStats(part.key, part.kind, **figures)



def _partitions():
    """The data of a few block partitions (built once, written by both sinks)."""
    from dvidetl.export.planning import make_plan
    from dvidetl.export.transform import transform_blocks
    from dvidetl.sources import open_source

    src = open_source(SOURCE)
    try:
        info = src.info()
        parts = make_plan(info, src.count, [0], PARTITION_BLOCKS, indices=False, mapping=False)
        parts = sorted(parts, key=lambda p: -p.blocks)[:8]
        grid = tuple(info.scale(0).grid)
        out = []
        for p in parts:
            data, st = transform_blocks(src.read_blocks(0, p.lo, p.hi), info.codec, src.map_supervoxels,
                                        scale=0, grid=grid, lo=p.lo, hi=p.hi)
            out.append((p, data, {"blocks": st.blocks, "bytes_out": st.bytes_out}))
        return info, out
    finally:
        src.close()


def _nbytes(data) -> tuple[int, int]:
    """Rows and Arrow bytes of the tables a tabular sink writes for a partition (it cuts
    them from the partition's blocks as it writes: that is part of the timed write)."""
    from dvidetl.tables.cells import cut_blocks

    tables = cut_blocks(data, "bench", S.DEFAULT_CELL_LIMIT)
    rows = sum(t.num_rows for t in tables.values())
    return rows, sum(t.nbytes for t in tables.values())


def _write_all(sink, run_id: str, parts) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: the client side of the write)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for p, tables, stats in parts:
        sink.write_partition(run_id, p, tables, _stats(p, stats))
    return time.perf_counter() - t0, time.process_time() - c0


def run() -> list[dict]:
    from dvidetl.export.kinds import RunInfo
    from dvidetl.sinks import open_sink
    from dvidetl.testing.vastsim import start_vastsim_process

    info, parts = _partitions()
    rows = sum(_nbytes(t)[0] for _, t, _ in parts)
    mb = sum(_nbytes(t)[1] for _, t, _ in parts) / 1e6
    tmp = tempfile.mkdtemp(prefix="bench-sink-")
    key = ("bench-access", "bench-secret-not-real")
    old_env = {k: os.environ.get(k) for k in ("VASTDB_ACCESS_KEY", "VASTDB_SECRET_KEY")}
    os.environ["VASTDB_ACCESS_KEY"], os.environ["VASTDB_SECRET_KEY"] = key
    t_vast, t_pq = [], []
    try:
        with start_vastsim_process(os.path.join(tmp, "vast"), access_key=key[0], secret_key=key[1]) as sim:
            vurl = f"vastdb://127.0.0.1:{sim.port}/bucket/bench"
            for r in range(ROUNDS):
                run_id = f"r{r}"  # a new run each round: every write also deletes the last round's rows
                plan = [p for p, _, _ in parts]
                v = open_sink(vurl, uuid=info.uuid, instance=info.instance)
                v.prepare(RunInfo(run_id, info.uuid, info.instance, plan, options={}))
                t_vast.append(_write_all(v, run_id, parts))
                q = open_sink(f"parquet://{tmp}/pq", uuid=info.uuid, instance=info.instance)
                q.prepare(RunInfo(run_id, info.uuid, info.instance, plan, options={}))
                t_pq.append(_write_all(q, run_id, parts))
            got = v.read("blocks", columns=["morton"]).num_rows
            want = sum(t["blocks"].num_rows for _, t, _ in parts)
            assert got == want, f"vastdb holds {got} blocks rows, wrote {want}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for k, val in old_env.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    tv, tq = min(w for w, _ in t_vast), min(w for w, _ in t_pq)
    cv = min(c for _, c in t_vast)
    nparts = len(parts)
    return [
        {"name": f"vastdb sink rows/s ({nparts} partitions)", "value": rows / tv, "unit": "rows/s",
         "baseline": "parquet sink", "baseline_value": rows / tq, "ratio": tq / tv, "target": ">= 0.25x parquet"},
        {"name": "vastdb sink MB/s (Arrow bytes)", "value": mb / tv, "unit": "MB/s",
         "baseline": "parquet sink", "baseline_value": mb / tq, "ratio": tq / tv, "target": ">= 0.25x parquet"},
        {"name": "vastdb sink client CPU MB/s (no server)", "value": mb / cv, "unit": "MB/s",
         "baseline": "parquet sink wall", "baseline_value": mb / tq, "ratio": tq / cv},
        {"name": "vastdb sink seconds per partition", "value": tv / nparts, "unit": "s",
         "baseline": "parquet sink", "baseline_value": tq / nparts, "ratio": tv / tq},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
