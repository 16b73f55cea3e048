"""The precomputed sink end to end (issue 27 item 7): Flight loopback -> 2 Dask workers ->
``precomputed://`` (one neuroglancer shard per partition), against the same export into
Parquet measured in the same run, interleaved round by round (this machine is noisy:
compare the ratios).

* end to end blocks/s into precomputed vs into Parquet (target >= 0.8: transcoding to
  compressed_segmentation and writing shards costs no more than cutting cells and writing
  Parquet); and both sinks in one run (``--sink`` twice: the source read once) against the
  two runs one after the other;
* output bytes of the volume (the shard files: gzip'd cseg chunks plus their indices)
  beside the Parquet blocks files of the same export;
* per block, single core: the transform as a Parquet partition runs it (with the zstd
  payload) and as a precomputed-only one does (without: ``Sink.needs``), the cseg transcode,
  the chunks' gzip, and libdeflate's levels 1..6 and ISA-L's 0..3 on the same chunks (time
  and KB a chunk: what chose ``codec.ngshard.GZIP_LEVEL``);
* peak worker memory while one task writes one shard (RSS sampled inside the task, fresh
  warmed worker), per shard size, beside the same blocks into Parquet.

The transcoder alone per core, against ``decode_block`` + ``compressed_segmentation.compress``
(what a TensorStore writer does), and its output against that baseline's gzip, are
``bench_cseg`` (real mCNS blocks). ``python -m bench precomputed``;
``DVIDETL_BENCH_PC_SOURCE`` picks another volume.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bench._common import local_client, measured_export, memory_endpoint
from bench.bench_pipeline import _MemorySource

WORKERS = 2
SOURCE = os.environ.get("DVIDETL_BENCH_PC_SOURCE", "synthetic://pcbench?size=1024,1024,1024&scales=1&seed=3")
ROUNDS = int(os.environ.get("DVIDETL_BENCH_ROUNDS", "2"))
#: shards of 2^(preshift + minishard) chunks: 512 (8x8x8 blocks) for the rate, and 64 / 512 for memory
RATE_BITS = tuple(int(b) for b in os.environ.get("DVIDETL_BENCH_PC_SHARD_BITS", "6,3").split(","))
MEMORY_BITS = ((3, 3), (6, 3))


def _spec(tmp: str, ep, preshift: int, minishard: int) -> str:
    """A neuroglancer info for the volume with shards of 2^(preshift+minishard) chunks."""
    from dvidetl.codec.ngshard import derive_info

    info = derive_info(ep.info.scales, (8, 8, 8), preshift_bits=preshift, minishard_bits=minishard)
    f = Path(tmp) / f"spec-{preshift}-{minishard}.json"
    f.write_text(json.dumps(info))
    return str(f)


def _export(client, ep, sinks, partition_blocks: int):
    import dvidetl
    from dvidetl import RunOptions

    res = dvidetl.export(ep, sinks, RunOptions(scales=(0,), partition_blocks=partition_blocks,
                                               indices=False, mapping=False), cluster=client)
    if not res.ok:
        raise RuntimeError(f"bench run failed: {res.failed[:3]} errors={res.errors}")
    return res


def _bytes(d: str, pattern: str, under: tuple[str, ...] = ()) -> int:
    """Bytes of the files matching ``pattern`` under ``d`` (only inside directories named
    ``under``, when given)."""
    return sum(f.stat().st_size for f in Path(d).rglob(pattern)
               if f.is_file() and (not under or set(under) & set(f.relative_to(d).parts)))


def _measured(client, ep, url: str, parts_of) -> tuple[int, int, int]:
    """(RSS gained, RSS before, blocks) of one task exporting the largest partition planned
    for ``url`` (``parts_of(sink)``: the plan), on ``client``'s one worker."""
    from dvidetl.export.kinds import RunInfo
    from dvidetl.export.planning import new_run_id
    from dvidetl.export.tasks import task_context
    from dvidetl.sinks import open_sink

    sink = open_sink(url, uuid=ep.uuid, instance=ep.instance)
    part = max(parts_of(sink), key=lambda p: p.blocks)
    run = RunInfo(new_run_id(), ep.uuid, ep.instance, [part], volume=json.loads(ep.info.to_json()))
    sink.prepare(run)
    gained, start = client.submit(measured_export, task_context(run, ep, url), part, pure=False).result()
    return gained, start, part.blocks


def _stages(ep, bits: tuple[int, int]) -> list[dict]:
    """Where a partition's time goes, in this process, single core, per block of one shard:
    the transform as a Parquet partition runs it (repack, map, zstd payload) and as a
    precomputed-only partition does (no payload: ``Sink.needs``; the unwrapped blocks kept),
    then the precomputed sink's own cseg transcode and gzip of the chunks (``data_encoding``
    gzip: ISA-L at ``codec.ngshard.GZIP_LEVEL``); and libdeflate 1..6 / ISA-L 0..3 on the same
    chunks, time and bytes, which chose that encoder and level."""
    import numpy as np
    import pyarrow as pa
    from isal import isal_zlib

    from bench.bench_codec import _interleaved, _row
    from dvidetl.codec.cseg import encode_chunks
    from dvidetl.codec.ngshard import GZIP_LEVEL, _gzip, chunk_shapes, derive_info
    from dvidetl.codec.wrapper import wrap
    from dvidetl.export.transform import transform_blocks

    si = ep.info.scale(0)
    cells, counts, _ = ep.client.count(0, sum(bits))
    k = int(np.asarray(cells)[int(np.argmax(np.asarray(counts)))])  # the fullest shard
    lo, hi = k << sum(bits), (k + 1) << sum(bits)
    batches = list(ep.client.read_blocks(0, lo, hi))
    sc = derive_info(ep.info.scales, (8, 8, 8), preshift_bits=bits[0], minishard_bits=bits[1])["scales"][0]

    def transform(payload: bool, raw: bool):
        data, _ = transform_blocks(iter(batches), ep.info.codec, ep.client.map_supervoxels, scale=0,
                                   grid=tuple(si.grid), lo=lo, hi=hi, keep_raw=raw, keep_payload=payload)
        return pa.concat_tables(list(data.batches()))

    t = transform(False, True)
    n = t.num_rows
    shapes = chunk_shapes(*(t.column(c).to_numpy() for c in "xyz"), sc)
    enc = encode_chunks(t.column("raw"), t.column("labels"), shapes)
    chunks = [enc[r] for r in range(len(enc)) if enc.ok[r] and not enc.background[r]]
    # the shard's own encoder (isal at GZIP_LEVEL), then libdeflate 1..6 and isal 0..3
    enc_of = {"shard": _gzip,
              **{f"libdeflate {lv}": (lambda c, lv=lv: wrap(c, "gzip", level=lv)) for lv in range(1, 7)},
              **{f"isal {lv}": (lambda c, lv=lv: isal_zlib.compress(c, lv, wbits=31)) for lv in range(4)}}
    fns = {
        "transform (parquet: payload)": lambda: transform(True, False),
        "transform (precomputed: raw, no payload)": lambda: transform(False, True),
        "cseg": lambda: encode_chunks(t.column("raw"), t.column("labels"), shapes),
        **{f"gzip {k}": (lambda f=f: [f(c) for c in chunks]) for k, f in enc_of.items()},
    }
    times = _interleaved(fns, rounds=3)
    per = {k: 1e6 * v / n for k, v in times.items()}
    tab = per["transform (parquet: payload)"]
    rows = [_row(f"stage per block, {n}-block shard: transform (parquet: payload)", tab, "us/block")]
    for k in ("transform (precomputed: raw, no payload)", "cseg", "gzip shard"):
        name = k if not k.startswith("gzip") else f"gzip (isal {GZIP_LEVEL})"
        rows.append(_row(f"stage per block: {name}", per[k], "us/block",
                         "transform (parquet: payload)", tab, ratio=per[k] / tab))
    pc_total = sum(per[k] for k in ("transform (precomputed: raw, no payload)", "cseg", "gzip shard"))
    rows.append(_row("stages per block: precomputed, all", pc_total, "us/block",
                     "transform (parquet: payload)", tab, ratio=pc_total / tab))
    raw_bytes = sum(len(c) for c in chunks)
    for k, f in enc_of.items():
        if k == "shard":
            continue
        nbytes = sum(len(f(c)) for c in chunks)
        us = 1e6 * times[f"gzip {k}"] / len(chunks)
        rows.append(_row(f"gzip {k}: {nbytes / len(chunks) / 1e3:.2f} KB/chunk", us, "us/chunk",
                         "libdeflate 6", 1e6 * times["gzip libdeflate 6"] / len(chunks),
                         bytes=nbytes, cseg_bytes=raw_bytes, chosen=k == f"isal {GZIP_LEVEL}"))
    return rows


def run() -> list[dict]:
    from dvidetl.export.planning import make_plan
    from dvidetl.sources import open_source

    ep = memory_endpoint(_MemorySource(open_source(SOURCE)), "pcbench")
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = _spec(tmp, ep, *RATE_BITS)
            cell = 1 << sum(RATE_BITS)
            best = {"parquet": 0.0, "precomputed": 0.0, "both": 0.0}
            sizes: dict[str, int] = {}
            with local_client(WORKERS) as client:
                # warm-up: numba kernels loaded (compiled the first time) in every worker
                _export(client, ep, [f"parquet://{tmp}/warm-pq", f"precomputed://{tmp}/warm-pc?spec={spec}"], cell)
                for r in range(ROUNDS):
                    pq, pc = f"{tmp}/pq{r}", f"{tmp}/pc{r}"
                    runs = {"parquet": [f"parquet://{pq}"], "precomputed": [f"precomputed://{pc}?spec={spec}"],
                            "both": [f"parquet://{tmp}/bq{r}", f"precomputed://{tmp}/bc{r}?spec={spec}"]}
                    for name, sinks in runs.items():
                        res = _export(client, ep, sinks, cell)
                        best[name] = max(best[name], res.blocks / res.seconds)
                        nblocks = res.blocks
                    sizes = {"parquet": _bytes(pq, "*.parquet", ("blocks", "block_overflow")),
                             "precomputed": _bytes(pc, "*.shard")}
            rows.append(dict(
                name=f"e2e into precomputed, {WORKERS} workers, {nblocks} blocks, {cell}-chunk shards",
                value=best["precomputed"], unit="blocks/s", baseline="the same into parquet",
                baseline_value=best["parquet"], ratio=best["precomputed"] / best["parquet"],
                target=">= 0.8"))
            two = 1 / (1 / best["parquet"] + 1 / best["precomputed"])
            rows.append(dict(
                name="e2e into parquet + precomputed in one run", value=best["both"], unit="blocks/s",
                baseline="the two runs one after the other", baseline_value=two,
                ratio=best["both"] / two, target="> 1 (the source read once)"))
            rows.append(dict(
                name="output bytes: precomputed shards", value=sizes["precomputed"], unit="bytes",
                baseline="parquet blocks tables", baseline_value=sizes["parquet"],
                ratio=sizes["precomputed"] / sizes["parquet"]))
            rows += _stages(ep, RATE_BITS)
            # peak worker memory per shard, against the same blocks into Parquet
            for bits in MEMORY_BITS:
                spec_m = _spec(tmp, ep, *bits)
                n = 1 << sum(bits)
                with local_client(1) as client:
                    _export(client, ep, [f"parquet://{tmp}/mw{n}", f"precomputed://{tmp}/mwc{n}?spec={spec_m}"], n)

                    def plan(sink, n=n, bits=bits):
                        cells = sink.plan_cells(ep.info) if sink.url.startswith("precomputed") else {0: sum(bits)}
                        return make_plan(ep.info, ep.client.count, [0], n, indices=False, mapping=False,
                                         anomalies=False, cells=cells)

                    got_pc, start, nb = _measured(client, ep, f"precomputed://{tmp}/m{n}?spec={spec_m}", plan)
                    got_pq, _, nb_pq = _measured(client, ep, f"parquet://{tmp}/mq{n}", plan)
                assert nb == nb_pq, (nb, nb_pq)
                rows.append(dict(
                    name=f"peak worker memory, one shard of {nb} chunks", value=got_pc / 2**20, unit="MiB",
                    baseline="the same blocks into parquet", baseline_value=got_pq / 2**20,
                    ratio=got_pc / got_pq if got_pq else None, worker_rss_before_mib=start / 2**20))
    finally:
        ep.close()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
