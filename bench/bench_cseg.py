"""DVID block → neuroglancer compressed_segmentation transcoding, per core, against what a
TensorStore writer does with the same blocks: ``decode_block`` to 2 MiB of voxels, then
``compressed_segmentation.compress`` (the C++ encoder neuroglancer's tools use).

Sets: the 258 real mCNS blocks mapped to bodies through their ``labels`` lists (the export's
case; the baseline decodes blocks whose tables already hold the bodies, so its mapping costs
nothing), the same blocks clipped to edge-chunk shapes, and synthetic dense blocks (65-400
labels in every sub-block: 7-9 bit values, our worst case). Output size: our chunks are
byte-identical to the baseline's, so gzip of either is the same; the figure beside it is
the stored DVID gzip of the same blocks. Shard writing (gzip data + minishard indices)
against gzip alone of the same chunks.

Every figure is single-threaded and timed round by round against its baseline (compare
ratios: the machine is shared and noisy). ``python -m bench cseg``.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import compressed_segmentation as cs
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from bench.bench_codec import _interleaved, _row, synthetic_dense_blocks
from dvidetl.codec import decode_block, join_block, split_block, unwrap, wrap
from dvidetl.codec.cseg import encode_chunks
from dvidetl.codec.ngshard import Sharding, ShardWriter

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT.parent / "shared" / "data" / "mcns-shard" / "30720_24576_28672.arrow"


def _mcns() -> tuple[pa.Array, pa.Array]:
    t = ipc.open_stream(str(SHARD)).read_all()
    blocks = pa.array([unwrap(b, "zstd") for b in t.column("dvid_compressed_block").to_pylist()], pa.binary())
    return blocks, t.column("labels").combine_chunks()


def _mapped(blocks: pa.Array, labels: pa.Array | None) -> list[bytes]:
    """The blocks with their tables replaced by the labels (the baseline's input)."""
    if labels is None:
        return blocks.to_pylist()
    out = []
    for r in range(len(blocks)):
        _sv, body = split_block(blocks[r].as_py())
        out.append(join_block(labels[r].values.to_numpy(), body))
    return out


def _baseline(mapped: list[bytes], shapes: np.ndarray) -> list[bytes]:
    out = []
    for b, (x, y, z) in zip(mapped, shapes.tolist(), strict=True):
        v = decode_block(b)[:z, :y, :x]
        out.append(cs.compress(np.asfortranarray(v.T), order="F"))
    return out


def run() -> list[dict]:
    rows: list[dict] = []
    blocks, labels = _mcns()
    dense = pa.array(synthetic_dense_blocks(), pa.binary())
    n = len(blocks)
    full = np.full((n, 3), 64, np.int64)
    rng = np.random.default_rng(0)
    edge = np.stack([rng.choice([9, 22, 36, 63], n) for _ in range(3)], axis=1)
    sets = {
        "mcns bodies": (blocks, labels, full),
        "mcns bodies, edge shapes": (blocks, labels, edge),
        "dense 7-9 bit": (dense, None, np.full((len(dense), 3), 64, np.int64)),
    }
    for name, (blk, lab, shp) in sets.items():
        nb = len(blk)
        mapped = _mapped(blk, lab)
        ours = encode_chunks(blk, lab, shp)
        base = _baseline(mapped, shp)
        assert ours.n_errors == 0
        assert [ours[r] for r in range(nb)] == base, "transcoder and baseline disagree"
        t = _interleaved(
            {
                "ours": lambda blk=blk, lab=lab, shp=shp: encode_chunks(blk, lab, shp),
                "base": lambda mapped=mapped, shp=shp: _baseline(mapped, shp),
            },
            rounds=5,
        )
        rows.append(
            _row(
                f"{name}: transcode (blocks/s)", nb / t["ours"], "blocks/s",
                "decode_block + cseg.compress", nb / t["base"], ">= 5x baseline",
                ratio=t.ratio("ours", "base"), us_per_block=1e6 * t["ours"] / nb,
            )
        )
        if name == "mcns bodies":
            gz_ours = sum(len(gzip.compress(ours[r], 6, mtime=0)) for r in range(nb))
            gz_base = sum(len(gzip.compress(b, 6, mtime=0)) for b in base)
            stored = sum(len(wrap(b, "gzip")) for b in blk.to_pylist())
            rows.append(
                _row(
                    f"{name}: cseg+gzip bytes", gz_ours, "bytes", "baseline cseg+gzip", gz_base,
                    "== baseline (byte-identical chunks)", raw_cseg_bytes=int(ours.offsets[-1]),
                    dvid_gzip_bytes=stored, vs_dvid_gzip=gz_ours / stored,
                )
            )
            chunks = [ours[r] for r in range(nb)]
            ids = np.arange(nb, dtype=np.uint64)
            sh = Sharding(9, 6, 0, "identity", "gzip", "gzip")

            def shard(chunks=chunks, ids=ids, sh=sh):
                w = ShardWriter(io.BytesIO(), sh)
                w.add_many(ids, chunks)
                w.finish()

            def gz(chunks=chunks):
                for c in chunks:
                    wrap(c, "gzip")

            buf = io.BytesIO()
            w = ShardWriter(buf, sh)
            w.add_many(ids, chunks)
            w.finish()
            rows.append(
                _row(
                    f"{name}: shard file bytes", len(buf.getvalue()), "bytes",
                    "baseline cseg+gzip (chunks alone)", gz_base,
                    "~1 (+ the shard and minishard indices)", dvid_gzip_bytes=stored,
                )
            )
            t = _interleaved({"shard": shard, "gzip": gz}, rounds=5)
            rows.append(
                _row(
                    f"{name}: shard write, gzip (chunks/s)", nb / t["shard"], "chunks/s",
                    "gzip of the chunks alone", nb / t["gzip"], ">= 0.9x (gzip dominates)",
                    ratio=t.ratio("shard", "gzip"),
                )
            )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
