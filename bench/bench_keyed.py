"""Label indices and the mapping end to end: Flight loopback -> Dask workers -> Parquet, in
bounded partitions, beside the in-process ``label_index_table`` rate.

* rows/s of label_index and of mapping, with 1 and 2 workers, planned by ``plan_keys`` from
  the server's ``count_keys``; baseline = decoding the same LabelIndex protobufs in this
  process (``transform.label_index_tables``, single core), measured in the same run, times the
  number of workers (this machine has 2 cores; the Flight server needs CPU too).
* peak worker memory gained while exporting the largest indices partition (RSS sampled in
  the task), against the worker's RSS before it.
* the demo run (`make run`: `python -m dvidetl run --uuid demo`) wall time with the label
  index and the mapping as ONE partition each (the plan before issue 13) and as planned now,
  interleaved, plus the share of the run that passed before the last indices/mapping
  partition committed (1.0 = they are the long pole).

The source holds pre-encoded protobufs and sorted pairs in memory, so the timed runs measure
the export, not the synthetic generator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import local_client, measured_export, memory_endpoint

SOURCE = os.environ.get("DVIDETL_BENCH_KEYED_SOURCE", "synthetic://bk?size=2048,2048,512&scales=1&seed=5")
ROUNDS = int(os.environ.get("DVIDETL_BENCH_ROUNDS", "2"))
INDEX_ROWS = 20_000
MAPPING_ROWS = 8_000
ROOT = Path(__file__).resolve().parents[1]


class _KeyedMemorySource:
    """A real ``Source`` over a synthetic volume's label indices (LabelIndex protobufs, as a
    DVID serves them) and mapping, all held in memory."""

    def __init__(self, inner):
        import numpy as np
        import pyarrow as pa

        self.np, self.inner = np, inner
        batches = list(inner.read_indices(0, 1 << 64))
        self.idx = pa.Table.from_batches(batches).combine_chunks()
        self.labels = self.idx.column("label").to_numpy()
        lab, rows = inner._index_labels()
        assert np.array_equal(lab, self.labels)
        self.rows = rows
        self.sv, self.body = inner._mapping_arrays()

    def info(self):
        return self.inner.info()

    def count(self, scale, level):
        return self.inner.count(scale, level)

    def count_keys(self, kind, level, lo=0, hi=1 << 64):
        from dvidetl.sources.base import count_sorted

        if kind == "mapping":
            return count_sorted(self.sv, None, level, lo, hi)
        return count_sorted(self.labels, self.rows, level, lo, hi)

    def read_blocks(self, scale, lo, hi):
        return self.inner.read_blocks(scale, lo, hi)

    def map_supervoxels(self, svs):
        return self.inner.map_supervoxels(svs)

    def read_mapping(self, lo=0, hi=1 << 64):
        from dvidetl.sources.base import mapping_batches

        return mapping_batches(self.sv, self.body, lo, hi)

    def read_indices(self, lo, hi):
        from dvidetl.sources.base import key_slice

        sl = key_slice(self.labels, lo, hi)
        yield from self.idx.slice(sl.start, sl.stop - sl.start).to_batches(max_chunksize=2048)

    def close(self):
        self.inner.close()


def _decode_rate(ep, src) -> tuple[float, int]:
    from dvidetl.export.transform import label_index_tables

    grid0 = ep.info.scale(0).grid
    batches = src.idx.to_batches(max_chunksize=2048)
    t0 = time.perf_counter()
    n = sum(t.num_rows for t in label_index_tables(batches, grid0))
    return n / (time.perf_counter() - t0), n


def _keyed_run(client, ep, kind: str, target: int, outdir: str):
    """One export of ``kind``'s partitions alone, through the library API step by step
    (``ExportRun``: the sink checked, the run stored and finished as ``dvidetl.export`` does);
    only the plan is the bench's own — ``plan_keys`` for the one kind timed."""
    from dvidetl.export.api import ExportRun
    from dvidetl.export.options import RunOptions
    from dvidetl.export.planning import plan_keys

    job = ExportRun(ep, f"parquet://{outdir}", RunOptions(indices=kind == "indices", mapping=kind == "mapping"))
    parts = plan_keys(ep.client.count_keys, kind, target)
    res = job.execute(client, job.new_run(parts))
    if res.failed:
        raise RuntimeError(f"bench run failed: {res.failed[:3]}")
    rows = res.index_rows if kind == "indices" else res.mapping_rows
    return rows / res.seconds, rows, parts


def _demo(extra: list[str], outdir: str) -> tuple[float, float]:
    """Wall time of a demo run, and the share of it before the last keyed partition committed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "dvidetl", "run", "--uuid", "demo", "--quiet",
                    "--sink", f"parquet://{outdir}", *extra], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    led = pa.concat_tables([pq.read_table(f) for f in Path(outdir).rglob("export_ledger/*/*.parquet")])
    fin = led.column("finished_at").cast(pa.int64()).to_numpy() / 1e6
    keyed = pc.not_equal(led.column("kind"), "blocks").to_numpy(zero_copy_only=False)
    start = fin.min() - led.column("seconds").to_numpy()[fin.argmin()]
    share = (fin[keyed].max() - start) / (fin.max() - start)
    return wall, share


def run() -> list[dict]:
    from dvidetl.sources import open_source

    src = _KeyedMemorySource(open_source(SOURCE))
    ep = memory_endpoint(src, "bk")
    out: list[dict] = []
    try:
        _decode_rate(ep, src)  # warm
        with tempfile.TemporaryDirectory() as tmp:
            for nw in (2, 1):
                best = {"indices": 0.0, "mapping": 0.0}
                base = 0.0
                with local_client(nw) as client:
                    _keyed_run(client, ep, "mapping", MAPPING_ROWS, os.path.join(tmp, f"w{nw}"))
                    for r in range(ROUNDS):
                        base = max(base, _decode_rate(ep, src)[0])
                        for kind, target in (("indices", INDEX_ROWS), ("mapping", MAPPING_ROWS)):
                            rate, n, parts = _keyed_run(client, ep, kind, target,
                                                        os.path.join(tmp, f"{kind}{nw}-{r}"))
                            best[kind] = max(best[kind], rate)
                            if kind == "indices":
                                n_idx, p_idx = n, parts
                            else:
                                n_map, p_map = n, parts
                ideal = base * nw
                out.append(dict(
                    name=f"label_index e2e, {nw} worker(s), {n_idx:,} rows / {len(p_idx)} parts",
                    value=best["indices"], unit="rows/s", baseline=f"label_index_tables x {nw}",
                    baseline_value=ideal, ratio=best["indices"] / ideal if ideal else None,
                    target=">= 0.5" if nw == 2 else ""))
                out.append(dict(
                    name=f"mapping e2e, {nw} worker(s), {n_map:,} rows / {len(p_map)} parts",
                    value=best["mapping"], unit="rows/s"))
            out.append(dict(name="label_index_tables in process, 1 core", value=base, unit="rows/s"))
            # peak memory of the largest indices partition, on a fresh warmed worker
            with local_client(1) as client:
                from dvidetl.export.kinds import RunInfo
                from dvidetl.export.planning import new_run_id, plan_keys
                from dvidetl.export.tasks import task_context
                from dvidetl.sinks import open_sink

                _keyed_run(client, ep, "indices", INDEX_ROWS, os.path.join(tmp, "mwarm"))
                parts = plan_keys(ep.client.count_keys, "indices", INDEX_ROWS)
                part = max(parts, key=lambda p: p.rows)
                run_ = RunInfo(new_run_id(), ep.uuid, ep.instance, [part])
                url = f"parquet://{os.path.join(tmp, 'mem')}"
                open_sink(url, uuid=ep.uuid, instance=ep.instance).prepare(run_)
                gained, start = client.submit(measured_export, task_context(run_, ep, url), part,
                                              pure=False).result()
            out.append(dict(name=f"peak worker memory, indices partition of {part.rows:,} rows",
                            value=gained / 2**20, unit="MiB", baseline="worker RSS before the task",
                            baseline_value=start / 2**20, target="< 256 MiB"))
            # the demo, interleaved: one partition per keyed table (before) vs planned (now)
            one = ["--index-partition-rows", str(2**40), "--mapping-partition-rows", str(2**40)]
            walls = {"before": [], "now": []}
            shares = {"before": [], "now": []}
            _demo([], os.path.join(tmp, "demo-warm"))
            for r in range(ROUNDS):
                for name, extra in (("before", one), ("now", [])):
                    w, sh = _demo(extra, os.path.join(tmp, f"demo-{name}-{r}"))
                    walls[name].append(w)
                    shares[name].append(sh)
            b, n = min(walls["before"]), min(walls["now"])
            out.append(dict(name="demo run wall time, keyed tables planned", value=n, unit="s",
                            baseline="one partition per keyed table", baseline_value=b,
                            ratio=n / b, target="<= 1.0"))
            out.append(dict(name="demo: run share before last keyed commit", value=min(shares["now"]),
                            unit="fraction", baseline="one partition per keyed table",
                            baseline_value=min(shares["before"]),
                            ratio=min(shares["now"]) / min(shares["before"]), target="< 1 (not the long pole)"))
    finally:
        ep.close()
    return out


if __name__ == "__main__":
    for r in run():
        print(r)
