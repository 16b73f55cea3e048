"""`dvidetl demo-codec`: the block codec on real DVID bytes — decode, encode, repack — with
sizes and speeds, so a fresh checkout can show the codec is exact and fast in seconds."""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

from dvidetl.commands._options import command_parser
from dvidetl.errors import UserError

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (numba (dvidetl.codec), the plugin registry's entry points, NumPy/Arrow, the
# compression libraries) loads when it runs.

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def add_parser(subparsers) -> None:
    p = command_parser(
        subparsers, "demo-codec",
        help="decode/encode/repack the real fib19 and mCNS blocks; print sizes and speeds",
        description=__doc__,
        example=("dvidetl demo-codec                        # the data in ../shared/data",
                 "dvidetl demo-codec --data /path/to/shared/data --rounds 5"))
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"the shared test data directory (default {DEFAULT_DATA})",
    )
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (best is shown)")


def _best(f, rounds: int) -> float:
    best = float("inf")
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from dvidetl.codec import (
        GZIP_INFLATER,
        block_labels,
        decode_block,
        encode_block,
        label_voxel_counts,
        repack,
        restore_block,
        unwrap,
        wrap,
    )

    data: Path = args.data
    fib_block = data / "dvid" / "fib19-64x64x64-sample1-block.dat.gz"
    fib_raw = data / "dvid" / "fib19-64x64x64-sample1.dat.gz"
    shard = data / "mcns-shard" / "30720_24576_28672.arrow"
    for f in (fib_block, fib_raw, shard):
        if not f.is_file():
            raise UserError(f"missing test data file {f} (use --data DIR)")

    blk = gzip.decompress(fib_block.read_bytes())
    vol = np.frombuffer(gzip.decompress(fib_raw.read_bytes()), "<u8").reshape(64, 64, 64)
    dec = decode_block(blk)
    enc = encode_block(vol)
    print(f"fib19: Go block {len(blk):,} bytes, {len(block_labels(blk))} labels")
    print(f"  decode_block == raw volume: {bool(np.array_equal(dec, vol))}")
    print(f"  encode_block == Go bytes:   {enc == blk}")

    try:
        table = ipc.open_stream(str(shard)).read_all()
        blocks = [unwrap(b, "zstd") for b in table.column("dvid_compressed_block").to_pylist()]
    except Exception as exc:  # noqa: BLE001 - a broken data file is a user-facing problem
        raise UserError(f"cannot read {shard}: {exc}") from None
    n = len(blocks)
    raw_mb = sum(len(b) for b in blocks) / 1e6
    vols = [decode_block(b) for b in blocks]
    wrapped = pa.array([wrap(b, "gzip") for b in blocks], pa.binary())
    rep = repack(wrapped, "gzip")
    assert rep.payload is not None  # repack(payload=True), the default
    exact = all(
        restore_block(rep.supervoxels[i].values.to_numpy(), rep.payload[i].as_py()) == blocks[i]
        for i in range(n)
    )
    print(f"mCNS shard: {n} blocks, {raw_mb:.2f} MB raw, {sum(map(len, wrapped.to_pylist())) / 1e6:.2f} MB gzip")
    print(f"  repack errors: {rep.n_errors}, restore_block exact: {exact}")
    payload_mb = sum(len(x) for x in rep.payload.to_pylist()) / 1e6
    print(f"  repacked payloads (zstd-3): {payload_mb:.2f} MB + tables {8 * len(rep.supervoxels.values) / 1e6:.2f} MB")

    def each(f, items):
        def run():
            for x in items:
                f(x)  # results dropped at once: measure the codec, not page faults

        return run

    timings = {
        "decode_block": _best(each(decode_block, blocks), args.rounds),
        "encode_block": _best(each(encode_block, vols), args.rounds),
        "label_voxel_counts": _best(each(label_voxel_counts, blocks), args.rounds),
        f"repack gzip ({GZIP_INFLATER})": _best(lambda: repack(wrapped, "gzip"), args.rounds),
    }
    print("speeds (one core):")
    for name, t in timings.items():
        print(f"  {name:28} {n / t:10,.0f} blocks/s {raw_mb / t:8,.0f} MB/s")
    return 0 if exact and enc == blk and rep.n_errors == 0 else 1
