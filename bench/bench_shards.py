"""Opening a ``shards://`` directory: the whole index — every message header walked, the
block coordinates read from the buffers, the sidecars checked, the label lists of the
exported records read for the mapping — against the least any reader of the same files
must do to build the mapping: pyarrow reading every stream whole and flattening its
``supervoxels`` / ``labels`` lists (what the source did before it checked anything).

Sets: the real mCNS shard (258 blocks) once per scale directory, 8 times (2,064 records),
with DVID's sidecar; and the same files after a rerun (each file twice: the first stream a
superseded copy the index counts and skips, the baseline reads both). Records per second,
single-threaded, timed round by round against the baseline (compare ratios). ``python -m
bench shards``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from bench.bench_codec import _interleaved, _row
from dvidetl.sources.shards import ShardsSource

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT.parent / "shared" / "data" / "mcns-shard"
NAME = "30720_24576_28672"
SCALES = 8


def _directory(where: Path, rerun: bool) -> Path:
    for s in range(SCALES):
        d = where / f"s{s}"
        d.mkdir(parents=True)
        if rerun:  # a rerun appends a second stream; the sidecar indexes the second one
            data = (SHARD / f"{NAME}.arrow").read_bytes()
            (d / f"{NAME}.arrow").write_bytes(data + data)
        else:
            os.symlink(SHARD / f"{NAME}.arrow", d / f"{NAME}.arrow")
        shutil.copy(SHARD / f"{NAME}-newformat.csv", d / f"{NAME}.csv")
    return where


def _baseline(where: Path) -> int:
    """pyarrow: every stream of every file read whole, its label lists flattened."""
    n = 0
    for f in sorted(where.glob("s*/*.arrow")):
        with pa.memory_map(str(f)) as mm:
            while mm.tell() < mm.size():
                t = ipc.open_stream(mm).read_all()
                n += len(pc.list_flatten(t.column("supervoxels"))) + len(pc.list_flatten(t.column("labels")))
    return n


def run() -> list[dict]:
    rows = []
    for rerun in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            d = _directory(Path(tmp), rerun)
            src = ShardsSource(d)
            records = sum(len(i.morton) for i in src._scales.values())
            assert records == SCALES * 258
            kinds = src.anomaly_counts()
            assert kinds.get("superseded", 0) == (SCALES if rerun else 0)
            t = _interleaved({"open": lambda d=d: ShardsSource(d), "base": lambda d=d: _baseline(d)}, rounds=5)
            what = "a rerun directory (2 streams per file)" if rerun else "a directory of 8 shards"
            rows.append(_row(f"shards open, {what} (records/s)", records / t["open"], "records/s",
                             "pyarrow read_all + list_flatten", records / t["base"], ">= 0.5x baseline",
                             ratio=t.ratio("open", "base")))
    return rows
