"""The partition transform (hot path): Flight block batches -> what one partition hands its sinks.

Per partition, never per block in Python:

1. ``dvidetl.codec.repack`` per record batch (unwrap, validate, split the label table off,
   count voxels per entry; with ``keep_payload`` zstd the rest: the payload, for the tabular
   sinks; with ``keep_raw`` also the unwrapped block bytes, for a sink that transcodes
   blocks) — numba + C over whole buffers. Only what the partition's sinks need is made
   (``Sink.needs``): the payload is about half the transform's cost and a volume sink never
   reads it;
2. one vectorized supervoxel -> body lookup per group of about ``GROUP_BYTES`` (``mapper``
   is the Flight client's ``DoExchange("map")`` on the group's unique supervoxels: one round
   trip per 8 MiB of repacked blocks, so a partition asks the mapping a few times at most);
3. blocks that fail (corrupt bytes, wrong coordinates, repeated) become failed-block rows with
   their original bytes; their neighbours are unaffected.

The result is typed partition data (``export.batch.BlockData``), not storage rows: each sink
stores it its own way (the tabular sinks cut cells, ``tables.cells``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.export.batch import FAILED_BLOCKS, BlockData, block_schema
from dvidetl.export.spill import SPILL_BYTES, SpillBudget, SpilledTable
from dvidetl.geometry import Vec3, morton_encode
from dvidetl.tables import schema as S

# Imports inside functions load numba (dvidetl.codec), protobuf, the plugin registry's entry
# points, the compression libraries only where used: importing this module must not (CLI start-up,
# processes that never call them).


@dataclass
class TransformStats:
    """What a partition transform saw, for the ledger and the progress line."""

    blocks: int = 0  # blocks exported
    errors: int = 0  # blocks that failed
    bytes_in: int = 0  # wrapped bytes received
    bytes_out: int = 0  # zstd payload (when made) + list bytes handed to the sinks
    raw_bytes: int = 0  # unwrapped DVID block bytes of the exported blocks


def _list_nbytes(arr: pa.Array) -> np.ndarray:
    """Payload bytes of each list cell (entries x item size)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    return lengths * arr.type.value_type.byte_width


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique values by sort + mask: numpy 2's hash-based ``np.unique`` is ~10x slower
    on the million-entry uint64 arrays of dense partitions."""
    if len(a) == 0:
        return a.copy()
    s = np.sort(a)
    keep = np.empty(len(s), bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def map_lists(supervoxels: pa.Array, mapper: Callable[[np.ndarray], np.ndarray]) -> pa.Array:
    """``labels``: the body of every supervoxel entry, aligned with ``supervoxels`` (same
    offsets), from ONE ``mapper`` call on the unique supervoxels of the whole array."""
    supervoxels = supervoxels.combine_chunks() if isinstance(supervoxels, pa.ChunkedArray) else supervoxels
    flat = supervoxels.values.to_numpy(zero_copy_only=False) if len(supervoxels) else np.zeros(0, np.uint64)
    offsets = np.asarray(supervoxels.offsets)
    used = flat[offsets[0] : offsets[-1]] if len(offsets) else flat[:0]
    uniq = _sorted_unique(used)
    bodies = np.asarray(mapper(uniq), dtype=np.uint64) if len(uniq) else np.zeros(0, np.uint64)
    if bodies.shape != uniq.shape:
        raise ValueError(f"supervoxel mapping returned {bodies.shape} bodies for {uniq.shape} supervoxels")
    mapped = np.zeros(len(flat), np.uint64)
    mapped[offsets[0] : offsets[-1]] = bodies[np.searchsorted(uniq, used)]
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(mapped),
        mask=pc.is_null(supervoxels) if supervoxels.null_count else None,
    )


#: repacked bytes (payloads + lists) a partition transform gathers before it maps the group's
#: supervoxels: bounds the transform's working set (a dense block's intermediates are ~4x
#: its output) while keeping ``mapper`` round trips few (one per group)
GROUP_BYTES = 8 << 20


def _cat(arrays: list[pa.Array], typ: pa.DataType) -> pa.Array:
    """The arrays as one of ``typ``; a single one as it is (a group is often one batch: its
    unwrapped blocks, megabytes, are not copied again)."""
    if len(arrays) == 1:
        return arrays[0] if arrays[0].type == typ else arrays[0].cast(typ)
    return pa.concat_arrays([a.cast(typ) for a in arrays])


def _concat_parts(parts: list[dict]) -> dict:
    """One group's repacked columns, concatenated (the parts are dropped by the caller)."""
    return dict(
        x=np.concatenate([p["x"] for p in parts]),
        y=np.concatenate([p["y"] for p in parts]),
        z=np.concatenate([p["z"] for p in parts]),
        morton=np.concatenate([p["morton"] for p in parts]),
        supervoxels=_cat([p["supervoxels"] for p in parts], pa.list_(pa.uint64())),
        sv_voxels=_cat([p["sv_voxels"] for p in parts], pa.list_(pa.uint32())),
        raw_size=np.concatenate([p["raw_size"] for p in parts]),
        crc32=np.concatenate([p["crc32"] for p in parts]),
        **({"payload": _cat([p["payload"] for p in parts], pa.binary())} if "payload" in parts[0] else {}),
        **({"raw": _cat([p["raw"] for p in parts], pa.binary())} if "raw" in parts[0] else {}),
    )


def _drop_duplicates(g: dict, seen: np.ndarray, err_parts: list[dict]) -> dict:
    """Rows of ``g`` whose Morton code repeats (inside the group or in an earlier group of
    the partition) go to ``err_parts``; a source must never serve a block twice."""
    m = g["morton"]
    if len(m) == 0:
        return g
    order = np.argsort(m, kind="stable")
    ms = m[order]
    dup_sorted = np.concatenate([[False], ms[1:] == ms[:-1]])
    dup = np.zeros(len(m), bool)
    dup[order[dup_sorted]] = True
    if len(seen):
        dup |= np.isin(m, seen)
    if not dup.any():
        return g
    n = int(dup.sum())
    # the original bytes are not kept past repack; report the zstd payload (or the unwrapped
    # block, when no sink asked for payloads) instead
    kept = g["payload"] if "payload" in g else g.get("raw")
    data = kept.filter(pa.array(dup)) if kept is not None else pa.nulls(n, pa.binary())
    err_parts.append(
        dict(x=g["x"][dup], y=g["y"][dup], z=g["z"][dup], morton=m[dup],
             stage=np.full(n, "duplicate", dtype=object),
             reason=np.full(n, "block served twice in one partition", dtype=object),
             data=data)
    )
    keep_np = ~dup
    keep = pa.array(np.flatnonzero(keep_np))
    return {k: (v[keep_np] if isinstance(v, np.ndarray) else v.take(keep)) for k, v in g.items()}


def _in_morton_order(blocks: pa.Table | SpilledTable, spill_dir: str | None) -> pa.Table | SpilledTable:
    """The exported blocks sorted by Morton code, for groups that did not arrive in Morton
    order (the Flight server streams in order, so normally no copy is made; only a direct
    caller can do that). A spilled table is read back, sorted and spilled again."""
    if not isinstance(blocks, SpilledTable):
        return blocks.sort_by("morton")
    t = blocks.read_all().sort_by("morton")
    blocks.close()
    out = SpillBudget(0).table("blocks", t.schema, spill_dir)
    try:
        out.append(t)
        return out.result()
    except BaseException:
        out.discard()  # a failed re-spill (disk full) leaves no file behind
        raise


def transform_blocks(
    batches: Iterable[pa.RecordBatch],
    codec: str,
    mapper: Callable[[np.ndarray], np.ndarray],
    *,
    scale: int,
    grid: Vec3,
    lo: int,
    hi: int,
    zstd_level: int = 3,
    keep_raw: bool = False,
    keep_payload: bool = True,
    group_bytes: int = GROUP_BYTES,
    spill_dir: str | None = None,
    spill_bytes: int = SPILL_BYTES,
) -> tuple[BlockData, TransformStats]:
    """Everything one block partition hands its sinks (``export.batch.BlockData``).

    A block fails when ``repack`` reports an error (stage ``repack``), when its Morton code
    does not match its coordinates or lies outside ``[lo, hi)`` (stage ``validate``), or when
    it repeats a Morton code of the partition (stage ``duplicate``). Everything else is
    exported, in Morton order. ``keep_payload``: the exported blocks carry the zstd
    ``payload`` (the tabular sinks store it); ``keep_raw``: their unwrapped DVID bytes
    (``raw``), for a sink that transcodes blocks. A column not asked for is absent
    (``export.batch.block_schema``).

    Batches are gathered into groups of about ``group_bytes`` repacked bytes; each group is
    mapped on its own and only its output is kept (one table chunk per group), so the working
    set is the partition's output plus one group — not four copies of the whole partition,
    which OOM-killed low-memory workers on dense blocks.

    With ``spill_dir``, once the exported blocks pass ``spill_bytes`` they go to a file there
    (``export.spill``) and come back as a ``SpilledTable`` (the caller removes it with
    ``spill.close_tables``), so the working set is one group whatever the partition's size.
    """
    from dvidetl.codec import repack

    stats = TransformStats()
    parts: list[dict] = []
    part_bytes = 0
    err_parts: list[dict] = []
    schema = block_schema({n for n, on in (("payload", keep_payload), ("raw", keep_raw)) if on})
    out = SpillBudget(spill_bytes).table("blocks", schema, spill_dir)
    last = -1  # Morton code of the last block kept
    unordered = False  # groups came out of Morton order (only a direct caller can do that)
    seen: list[np.ndarray] = []

    def flush() -> None:
        nonlocal parts, part_bytes, last, unordered
        g = _concat_parts(parts)
        parts, part_bytes = [], 0
        g = _drop_duplicates(g, np.concatenate(seen) if seen else np.zeros(0, np.uint64), err_parts)
        n = len(g["morton"])
        if n == 0:
            return
        seen.append(g["morton"])
        labels = map_lists(g["supervoxels"], mapper)
        stats.raw_bytes += int(g["raw_size"].astype(np.int64).sum())
        stats.bytes_out += (
            (int(pc.sum(pc.binary_length(g["payload"])).as_py() or 0) if keep_payload else 0)
            + 2 * int(_list_nbytes(g["supervoxels"]).sum()) + int(_list_nbytes(g["sv_voxels"]).sum())
        )
        stats.blocks += n
        m = g["morton"]
        unordered |= bool(m[0] <= last) or bool(np.any(m[1:] < m[:-1]))
        last = int(m[-1])
        cols = {
            "scale": pa.array(np.full(n, scale, np.uint8)),
            "x": pa.array(g["x"]), "y": pa.array(g["y"]), "z": pa.array(g["z"]),
            "morton": pa.array(np.asarray(m, np.uint64)),
            "supervoxels": g["supervoxels"], "labels": labels, "sv_voxels": g["sv_voxels"],
            "raw_size": pa.array(g["raw_size"]), "crc32": pa.array(g["crc32"]),
        }
        if keep_payload:
            cols["payload"] = g["payload"]
        if keep_raw:
            cols["raw"] = g["raw"]
        out.append(pa.table(cols, schema=schema))

    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            data = batch.column("data")
            stats.bytes_in += int(pc.sum(pc.binary_length(data)).as_py() or 0)
            x = batch.column("x").to_numpy().astype(np.int32)
            y = batch.column("y").to_numpy().astype(np.int32)
            z = batch.column("z").to_numpy().astype(np.int32)
            m = batch.column("morton").to_numpy().astype(np.uint64)
            rp = repack(data, codec, zstd_level=zstd_level, keep_raw=keep_raw, payload=keep_payload)
            errs = rp.errors
            bad = np.asarray(pc.is_valid(errs)) if errs.null_count != len(errs) else np.zeros(len(m), bool)
            reasons = np.asarray(errs.to_numpy(zero_copy_only=False), dtype=object)
            stages = np.where(bad, "repack", "").astype(object)
            expect = morton_encode(x, y, z, grid)
            inval = ~bad & ((expect != m) | (m < np.uint64(lo)) | (m >= np.uint64(hi)))
            if inval.any():
                why = np.where(
                    expect != m,
                    "morton code does not match block coordinates",
                    f"morton code outside the partition [{lo}, {hi})",
                )
                reasons = np.where(inval, why.astype(object), reasons)
                stages = np.where(inval, "validate", stages)
                bad |= inval
            if bad.any():
                idx = pa.array(np.flatnonzero(bad))
                err_parts.append(
                    dict(x=x[bad], y=y[bad], z=z[bad], morton=m[bad], stage=stages[bad],
                         reason=reasons[bad], data=data.take(idx))
                )
            ok = ~bad
            keep = pa.array(np.flatnonzero(ok))

            def rows(a: pa.Array, keep: pa.Array = keep, every: bool = not bad.any()) -> pa.Array:
                return a if every else a.take(keep)  # (no copy of a batch without errors)

            part = dict(
                x=x[ok], y=y[ok], z=z[ok], morton=m[ok],
                supervoxels=rows(rp.supervoxels), sv_voxels=rows(rp.sv_voxels),
                raw_size=rp.raw_size.to_numpy(zero_copy_only=False)[ok].astype(np.uint32),
                crc32=rp.crc32.to_numpy(zero_copy_only=False)[ok].astype(np.uint32),
            )
            if keep_payload:
                assert rp.payload is not None  # repack(payload=True) returns it
                part["payload"] = rows(rp.payload)
            if keep_raw:
                assert rp.raw is not None  # repack(keep_raw=True) returns it
                part["raw"] = rows(rp.raw)
            del rp, data, batch
            parts.append(part)
            # the group's size: its lists and payloads (the unwrapped blocks when there are none)
            part_bytes += sum(part[k].nbytes for k in ("supervoxels", "sv_voxels",
                                                       "payload" if keep_payload else "raw") if k in part)
            if part_bytes >= group_bytes:
                flush()
        if parts:
            flush()
        failed = _failed_table(scale, err_parts)
        stats.errors = failed.num_rows
        blocks = out.result()
        if unordered:
            blocks = _in_morton_order(blocks, spill_dir)
    except BaseException:
        out.discard()
        raise
    return BlockData(blocks, failed, stats.blocks), stats


def _failed_table(scale: int, err_parts: list[dict]) -> pa.Table:
    """The failed blocks (``export.batch.FAILED_BLOCKS``) in Morton order."""
    if not err_parts:
        return FAILED_BLOCKS.empty_table()
    n = sum(len(e["morton"]) for e in err_parts)
    t = pa.table({
        "scale": pa.array(np.full(n, scale, np.uint8)),
        "x": pa.array(np.concatenate([e["x"] for e in err_parts]).astype(np.int32)),
        "y": pa.array(np.concatenate([e["y"] for e in err_parts]).astype(np.int32)),
        "z": pa.array(np.concatenate([e["z"] for e in err_parts]).astype(np.int32)),
        "morton": pa.array(np.concatenate([e["morton"] for e in err_parts]).astype(np.uint64)),
        "stage": pa.array(np.concatenate([np.asarray(e["stage"], dtype=object) for e in err_parts]).tolist(),
                          pa.string()),
        "reason": pa.array(np.concatenate([np.asarray(e["reason"], dtype=object) for e in err_parts]).tolist(),
                           pa.string()),
        "data": pa.concat_arrays([e["data"].cast(pa.binary()) for e in err_parts]),
    }, schema=FAILED_BLOCKS)
    return t.sort_by("morton")


def label_index_tables(batches: Iterable[pa.RecordBatch], grid0: Vec3) -> Iterable[pa.Table]:
    """``label_index`` tables from the server's ``read_indices`` batches (label, LabelIndex
    protobuf bytes), one table per batch, with the scale-0 Morton code of each block.
    (``codec.labelindex.label_index_table`` decodes the protobufs; its ``label_index_rows``
    decodes one.)"""
    from dvidetl.codec.labelindex import label_index_table

    for batch in batches:
        if batch.num_rows == 0:
            continue
        t = label_index_table(batch.column("label"), batch.column("data"))
        if t.num_rows == 0:
            continue
        x = t.column("x").to_numpy().astype(np.int64)
        y = t.column("y").to_numpy().astype(np.int64)
        z = t.column("z").to_numpy().astype(np.int64)
        t = t.append_column("morton", pa.array(morton_encode(x, y, z, grid0)))
        yield S.conform("label_index", t)

