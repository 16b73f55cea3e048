"""Block codec throughput on the 258 real mCNS blocks and on synthetic dense blocks.

Every figure is per core (single thread) and sits beside a baseline timed in the same run,
interleaved round by round (the machine is noisy: compare ratios, not absolute times).
Run with `make bench` or `python -m bench codec`.
"""

from __future__ import annotations

import gzip
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import zstandard

from dvidetl.codec import (
    GZIP_INFLATER,
    decode_block,
    encode_block,
    label_voxel_counts,
    repack,
    unwrap,
)

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT.parent / "shared" / "data" / "mcns-shard" / "30720_24576_28672.arrow"
ROUNDS = 7


def _mcns_blocks() -> list[bytes]:
    t = ipc.open_stream(str(SHARD)).read_all()
    return [unwrap(b, "zstd") for b in t.column("dvid_compressed_block").to_pylist()]


def synthetic_dense_blocks(n: int = 24, seed: int = 0) -> list[bytes]:
    """64³ blocks with >= 2,000 labels each, every sub-block using 65..512 of them (7-9 bits)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pool = rng.integers(1, 2**40, 4000, dtype=np.uint64)
        vol = np.empty((64, 64, 64), np.uint64)
        for z in range(0, 64, 8):
            for y in range(0, 64, 8):
                for x in range(0, 64, 8):
                    k = int(rng.integers(65, 400))
                    sub = pool[rng.choice(4000, k, replace=False)]
                    vol[z : z + 8, y : y + 8, x : x + 8] = sub[rng.integers(0, k, (8, 8, 8))]
        out.append(encode_block(vol))
    return out


class _Times(dict):
    """Median seconds per fn, plus the per-round times (for per-round ratios)."""

    rounds: dict[str, list[float]]

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of speed(a) / speed(b): load shifts between rounds cancel."""
        return statistics.median(tb / ta for ta, tb in zip(self.rounds[a], self.rounds[b], strict=True))


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> _Times:
    """Median seconds per call of each fn, timed round by round in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up (numba compile, caches)
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = _Times({k: statistics.median(v) for k, v in times.items()})
    out.rounds = times
    return out


def _row(name, value, unit, baseline=None, baseline_value=None, target=None, ratio=None, **extra) -> dict:
    r = {"name": name, "value": value, "unit": unit}
    if baseline is not None:
        r.update(
            baseline=baseline,
            baseline_value=baseline_value,
            ratio=value / baseline_value if ratio is None else ratio,
        )
    if target:
        r["target"] = target
    r.update(extra)
    return r


def _inflaters() -> dict[str, Callable[[bytes], bytes]]:
    out: dict[str, Callable[[bytes], bytes]] = {"zlib": lambda g: zlib.decompress(g, 31)}
    try:
        import deflate

        out["libdeflate"] = deflate.gzip_decompress
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        out["isal"] = lambda g: isal_zlib.decompress(g, 31)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        out["zlib-ng"] = lambda g: zlib_ng.decompress(g, 31)
    except ImportError:
        pass
    return out


def run() -> list[dict]:
    rows: list[dict] = []
    sets = {"mcns": _mcns_blocks(), "dense": synthetic_dense_blocks()}
    cctx = zstandard.ZstdCompressor(level=3)
    for label, blocks in sets.items():
        nb = len(blocks)
        raw_mb = sum(len(b) for b in blocks) / 1e6
        vols = [decode_block(b) for b in blocks]
        gz = [gzip.compress(b, compresslevel=6, mtime=0) for b in blocks]
        arr = pa.array(gz, pa.binary())

        # -- repack vs the plain baseline: zlib inflate + zstd-3 of the same bytes
        def baseline(gz=gz):
            for g in gz:
                cctx.compress(zlib.decompress(g, 31))

        t = _interleaved({"repack": lambda arr=arr: repack(arr, "gzip"), "base": baseline})
        r = repack(arr, "gzip")
        assert r.n_errors == 0
        out_size = sum(len(x) for x in r.payload.to_pylist()) + 8 * len(r.supervoxels.values)
        z3 = sum(len(cctx.compress(b)) for b in blocks)
        rows.append(
            _row(
                f"{label} repack gzip (blocks/s)", nb / t["repack"], "blocks/s",
                "zlib inflate + zstd-3", nb / t["base"], ">= 1.4x baseline",
                ratio=t.ratio("repack", "base"), mb_per_s=raw_mb / t["repack"], inflater=GZIP_INFLATER,
            )
        )
        rows.append(
            _row(
                f"{label} repack output (body+table) bytes", out_size, "bytes",
                "zstd-3 of whole blocks", z3, "<= 1.05x zstd-3",
            )
        )

        # -- gzip inflaters on the same bytes
        infl = _inflaters()
        t = _interleaved({k: (lambda f=f, gz=gz: [f(g) for g in gz]) for k, f in infl.items()})
        for k in infl:
            if k != "zlib":
                rows.append(
                    _row(
                        f"{label} gunzip {k}", nb / t[k], "blocks/s", "python zlib", nb / t["zlib"],
                        ratio=t.ratio(k, "zlib"),
                    )
                )

        # -- decode vs the memory floor (np.full of the same fresh 2 MiB output)
        def full(vols=vols):
            for v in vols:
                np.full(v.shape, 7, np.uint64)

        def dec(blocks=blocks):
            for b in blocks:
                decode_block(b)

        def cnt(blocks=blocks):
            for b in blocks:
                label_voxel_counts(b)

        def enc(vols=vols):
            for v in vols:
                encode_block(v)

        t = _interleaved({"full": full, "decode": dec, "count": cnt, "encode": enc})
        rows.append(
            _row(
                f"{label} decode_block", nb / t["decode"], "blocks/s", "np.full 2 MiB",
                nb / t["full"], ">= 0.45x np.full", ratio=t.ratio("decode", "full"),
                mb_per_s=raw_mb / t["decode"],
            )
        )
        rows.append(
            _row(
                f"{label} label_voxel_counts", nb / t["count"], "blocks/s", "decode_block",
                nb / t["decode"], ">= 10x decode_block", ratio=t.ratio("count", "decode"),
                mb_per_s=raw_mb / t["count"],
            )
        )
        rows.append(
            _row(
                f"{label} encode_block", nb / t["encode"], "blocks/s", "decode_block",
                nb / t["decode"], ">= 1,000 blocks/s (Go ~200)", ratio=t.ratio("encode", "decode"),
                mb_per_s=raw_mb / t["encode"],
            )
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
