"""The partition transform (hot path): Flight block batches -> the Arrow tables of one partition.

Per partition, never per block in Python:

1. ``dvidetl.codec.repack`` per record batch (unwrap, validate, split the label table off,
   count voxels per entry, zstd the rest: the payload) — numba + C over whole buffers;
2. one vectorized supervoxel -> body lookup for the whole partition (``mapper`` is the Flight
   client's ``DoExchange("map")`` on the partition's unique supervoxels);
3. cut payloads into ``<= cell_limit`` cells ``payload0..payload3`` (+ ``block_overflow`` parts 4..)
   and move list cells that would pass the limit to ``block_overflow`` — Arrow C kernels;
4. blocks that fail (corrupt bytes, wrong coordinates) become ``export_errors`` rows with
   their original bytes; their neighbours are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.export.spill import SPILL_BYTES, SpillBudget, SpilledTable
from dvidetl.geometry import Vec3, morton_encode
from dvidetl.tables import schema as S
from dvidetl.tables.cells import cut_cells, list_as_binary, nparts_of


@dataclass
class TransformStats:
    """What a partition transform saw, for the ledger and the progress line."""

    blocks: int = 0  # blocks exported into ``blocks``
    errors: int = 0  # blocks sent to ``export_errors``
    bytes_in: int = 0  # wrapped bytes received
    bytes_out: int = 0  # zstd payload + list bytes written
    raw_bytes: int = 0  # unwrapped DVID block bytes of the exported blocks
    overflow_blocks: int = 0


def _list_nbytes(arr: pa.Array) -> np.ndarray:
    """Payload bytes of each list cell (entries x item size)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    return lengths * arr.type.value_type.byte_width


def payload_size_sum(blocks: pa.Table) -> int:
    return int(pc.sum(blocks.column("payload_size").cast(pa.uint64())).as_py() or 0)


def blocks_tables(
    scale: int,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    morton: np.ndarray,
    supervoxels: pa.Array,
    labels: pa.Array,
    sv_voxels: pa.Array,
    raw_size: np.ndarray,
    crc32: np.ndarray,
    payload: pa.Array,
    *,
    cell_limit: int = S.DEFAULT_CELL_LIMIT,
) -> tuple[pa.Table, pa.Table]:
    """The ``blocks`` and ``block_overflow`` rows of already repacked blocks.

    Payloads (zstd, see ``dvidetl.codec.repack``) are cut into cells of at most ``cell_limit``
    bytes: parts 0..3 in ``payload0..3``, parts 4.. in ``block_overflow`` (column ``payload``); a list cell whose payload would pass
    the limit is null in ``blocks`` and stored as its little-endian values, cut into parts,
    in ``block_overflow`` under the column's name. Codec-independent (tests use it directly).
    """
    if cell_limit < 64:
        raise ValueError(f"cell limit {cell_limit} bytes is too small (minimum 64)")
    n = len(morton)
    payload = payload.combine_chunks() if isinstance(payload, pa.ChunkedArray) else payload
    payload_size = pc.fill_null(pc.binary_length(payload), 0).to_numpy().astype(np.int64)
    nparts = nparts_of(payload_size, cell_limit)
    if n and nparts.max() > 255:
        raise ValueError(f"a block payload of {payload_size.max()} bytes needs more than 255 cells")
    ov_scale, ov_morton, ov_col, ov_part, ov_data = [], [], [], [], []
    overflow = nparts > S.PAYLOAD_CELLS
    mortons = np.asarray(morton, dtype=np.uint64)

    def add_overflow(rows: np.ndarray, colname: str, data: pa.Array, first_part: int) -> None:
        sizes = pc.binary_length(data).to_numpy().astype(np.int64)
        k = first_part
        while True:
            have = sizes > k * cell_limit
            if not have.any():
                break
            part = cut_cells(data, k, cell_limit).filter(pa.array(have))
            cnt = int(have.sum())
            ov_scale.append(np.full(cnt, scale, np.uint8))
            ov_morton.append(mortons[rows][have])
            ov_col.append(np.full(cnt, colname, dtype=object))
            ov_part.append(np.full(cnt, k, np.uint16))
            ov_data.append(part)
            k += 1

    if overflow.any():
        rows = np.flatnonzero(overflow)
        add_overflow(rows, S.OVERFLOW_PAYLOAD[S.FORMAT], payload.take(pa.array(rows)), S.PAYLOAD_CELLS)
    cols: dict[str, pa.Array] = {}
    for colname, arr in (("supervoxels", supervoxels), ("labels", labels), ("sv_voxels", sv_voxels)):
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        arr = arr.cast(pa.list_(S.LIST_COLUMNS[colname]))
        big = _list_nbytes(arr) > cell_limit
        if big.any():
            rows = np.flatnonzero(big)
            add_overflow(rows, colname, list_as_binary(arr.take(pa.array(rows))), 0)
            validity = pa.array(~big & np.asarray(pc.is_valid(arr)), pa.bool_())
            arr = pc.if_else(validity, arr, pa.scalar(None, arr.type))
            overflow |= big
        cols[colname] = arr
    blocks = pa.table(
        {
            "scale": pa.array(np.full(n, scale, np.uint8)),
            "x": pa.array(np.asarray(x, np.int32)),
            "y": pa.array(np.asarray(y, np.int32)),
            "z": pa.array(np.asarray(z, np.int32)),
            "morton": pa.array(mortons),
            **cols,
            "raw_size": pa.array(np.asarray(raw_size, np.uint32)),
            "crc32": pa.array(np.asarray(crc32, np.uint32)),
            "payload_size": pa.array(payload_size.astype(np.uint32)),
            "nparts": pa.array(nparts.astype(np.uint8)),
            **{c: cut_cells(payload, i, cell_limit) for i, c in enumerate(S.PAYLOAD_COLUMNS)},
            "overflow": pa.array(overflow),
        },
        schema=S.BLOCKS,
    )
    if ov_data:
        ovt = pa.table(
            {
                "scale": pa.array(np.concatenate(ov_scale)),
                "morton": pa.array(np.concatenate(ov_morton)),
                "column": pa.array(np.concatenate(ov_col), pa.string()),
                "part": pa.array(np.concatenate(ov_part)),
                "data": pa.concat_arrays([d.cast(pa.binary()) for d in ov_data]),
            },
            schema=S.BLOCK_OVERFLOW,
        ).sort_by([("morton", "ascending"), ("column", "ascending"), ("part", "ascending")])
    else:
        ovt = S.empty("block_overflow")
    return blocks, ovt


def errors_table(
    run_id: str,
    scale: int,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    morton: np.ndarray,
    stage: str | np.ndarray,
    reason: np.ndarray | list,
    data: pa.Array,
    *,
    cell_limit: int = S.DEFAULT_CELL_LIMIT,
) -> pa.Table:
    """``export_errors`` rows: one per cell-limit part of each failed block's original bytes
    (at least one row per block, with empty data if the block had no bytes)."""
    n = len(morton)
    if n == 0:
        return S.empty("export_errors")
    data = data.combine_chunks() if isinstance(data, pa.ChunkedArray) else data
    data = pc.fill_null(data.cast(pa.binary()), b"")
    sizes = pc.binary_length(data).to_numpy().astype(np.int64)
    nparts = np.maximum(nparts_of(sizes, cell_limit), 1)
    stage_arr = np.broadcast_to(np.asarray(stage, dtype=object), (n,))
    reason_arr = np.asarray(reason, dtype=object)
    pieces = []
    for k in range(int(nparts.max())):
        have = nparts > k
        part = pc.binary_slice(data, k * cell_limit, (k + 1) * cell_limit).filter(pa.array(have))
        pieces.append(
            pa.table(
                {
                    "run_id": pa.array([run_id] * int(have.sum()), pa.string()),
                    "scale": pa.array(np.full(int(have.sum()), scale, np.uint8)),
                    "x": pa.array(np.asarray(x, np.int32)[have]),
                    "y": pa.array(np.asarray(y, np.int32)[have]),
                    "z": pa.array(np.asarray(z, np.int32)[have]),
                    "morton": pa.array(np.asarray(morton, np.uint64)[have]),
                    "stage": pa.array(stage_arr[have].tolist(), pa.string()),
                    "reason": pa.array(reason_arr[have].tolist(), pa.string()),
                    "part": pa.array(np.full(int(have.sum()), k, np.uint16)),
                    "nparts": pa.array(nparts[have].astype(np.uint16)),
                    "data": part.cast(pa.binary()),
                },
                schema=S.EXPORT_ERRORS,
            )
        )
    return pa.concat_tables(pieces).sort_by([("morton", "ascending"), ("part", "ascending")])


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


#: repacked bytes (payloads + lists) a partition transform gathers before it maps supervoxels
#: and cuts cells for that group: bounds the transform's working set (a dense block's
#: intermediates are ~4x its output) while keeping ``mapper`` round trips few (one per group)
GROUP_BYTES = 8 << 20


def _concat_parts(parts: list[dict]) -> dict:
    """One group's repacked columns, concatenated (the parts are dropped by the caller)."""
    return dict(
        x=np.concatenate([p["x"] for p in parts]),
        y=np.concatenate([p["y"] for p in parts]),
        z=np.concatenate([p["z"] for p in parts]),
        morton=np.concatenate([p["morton"] for p in parts]),
        supervoxels=pa.concat_arrays([p["supervoxels"].cast(pa.list_(pa.uint64())) for p in parts]),
        sv_voxels=pa.concat_arrays([p["sv_voxels"].cast(pa.list_(pa.uint32())) for p in parts]),
        raw_size=np.concatenate([p["raw_size"] for p in parts]),
        crc32=np.concatenate([p["crc32"] for p in parts]),
        payload=pa.concat_arrays([p["payload"].cast(pa.binary()) for p in parts]),
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
    # the original bytes are not kept past repack; report the zstd payload instead
    err_parts.append(
        dict(x=g["x"][dup], y=g["y"][dup], z=g["z"][dup], morton=m[dup],
             stage=np.full(n, "duplicate", dtype=object),
             reason=np.full(n, "block served twice in one partition", dtype=object),
             data=g["payload"].filter(pa.array(dup)))
    )
    keep_np = ~dup
    keep = pa.array(np.flatnonzero(keep_np))
    return {k: (v[keep_np] if isinstance(v, np.ndarray) else v.take(keep)) for k, v in g.items()}


def _sort_overflow(overflow: pa.Table | SpilledTable, spill_dir: str | None) -> pa.Table | SpilledTable:
    """Overflow rows in (morton, column, part) order when the groups did not arrive in Morton
    order (each group's rows are sorted; the Flight server streams in order, so normally no
    copy is made). A spilled table is read back, sorted and spilled again."""
    keys = [("morton", "ascending"), ("column", "ascending"), ("part", "ascending")]
    if not isinstance(overflow, SpilledTable):
        return overflow.sort_by(keys)
    t = overflow.read_all().sort_by(keys)
    overflow.close()
    out = SpillBudget(0).table("block_overflow", S.BLOCK_OVERFLOW, spill_dir)
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
    run_id: str,
    cell_limit: int = S.DEFAULT_CELL_LIMIT,
    zstd_level: int = 3,
    group_bytes: int = GROUP_BYTES,
    spill_dir: str | None = None,
    spill_bytes: int = SPILL_BYTES,
) -> tuple[dict[str, pa.Table | SpilledTable], TransformStats]:
    """Everything one block partition writes: ``{"blocks", "block_overflow", "export_errors"}``.

    A block is rejected (to ``export_errors``) when ``repack`` reports an error (stage
    ``repack``), when its Morton code does not match its coordinates or lies outside
    ``[lo, hi)`` (stage ``validate``), or when it repeats a Morton code of the partition
    (stage ``duplicate``). Everything else is exported.

    Batches are gathered into groups of about ``group_bytes`` repacked bytes; each group is
    mapped and cut into rows on its own and only its output is kept (tables of several
    chunks), so the working set is the partition's output plus one group — not four copies
    of the whole partition, which OOM-killed low-memory workers on dense blocks.

    With ``spill_dir``, once the ``blocks`` and ``block_overflow`` rows pass ``spill_bytes``
    they go to files there (``dvidetl.export.spill``) and come back as ``SpilledTable`` (the caller
    removes them with ``spill.close_tables``), so the working set is one group whatever the
    partition's size.
    """
    from dvidetl.codec import repack

    stats = TransformStats()
    parts: list[dict] = []
    part_bytes = 0
    err_parts: list[dict] = []
    budget = SpillBudget(spill_bytes)
    out_blocks = budget.table("blocks", S.BLOCKS, spill_dir)
    out_overflow = budget.table("block_overflow", S.BLOCK_OVERFLOW, spill_dir)
    last_overflow = -1  # Morton code of the last overflow row kept
    unordered = False  # groups came out of Morton order (only a direct caller can do that)
    seen: list[np.ndarray] = []

    def flush() -> None:
        nonlocal parts, part_bytes, last_overflow, unordered
        g = _concat_parts(parts)
        parts, part_bytes = [], 0
        g = _drop_duplicates(g, np.concatenate(seen) if seen else np.zeros(0, np.uint64), err_parts)
        if len(g["morton"]) == 0:
            return
        seen.append(g["morton"])
        labels = map_lists(g["supervoxels"], mapper)
        b, o = blocks_tables(
            scale, g["x"], g["y"], g["z"], g["morton"], g["supervoxels"], labels, g["sv_voxels"],
            g["raw_size"], g["crc32"], g["payload"], cell_limit=cell_limit,
        )
        stats.raw_bytes += int(g["raw_size"].astype(np.int64).sum())
        stats.bytes_out += (
            int(payload_size_sum(b)) + 2 * int(_list_nbytes(g["supervoxels"]).sum())
            + int(_list_nbytes(g["sv_voxels"]).sum())
        )
        stats.blocks += b.num_rows
        stats.overflow_blocks += int(pc.sum(pc.cast(b.column("overflow"), pa.int64())).as_py() or 0)
        if o.num_rows:
            unordered |= o.column("morton")[0].as_py() <= last_overflow
            last_overflow = o.column("morton")[-1].as_py()
        out_blocks.append(b)
        out_overflow.append(o)

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
            rp = repack(data, codec, zstd_level=zstd_level)
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
            part = dict(
                x=x[ok], y=y[ok], z=z[ok], morton=m[ok],
                supervoxels=rp.supervoxels.take(keep), sv_voxels=rp.sv_voxels.take(keep),
                raw_size=rp.raw_size.to_numpy(zero_copy_only=False)[ok].astype(np.uint32),
                crc32=rp.crc32.to_numpy(zero_copy_only=False)[ok].astype(np.uint32),
                payload=rp.payload.take(keep),
            )
            del rp, data, batch
            parts.append(part)
            part_bytes += sum(part[k].nbytes for k in ("supervoxels", "sv_voxels", "payload"))
            if part_bytes >= group_bytes:
                flush()
        if parts:
            flush()
        if err_parts:
            errors = errors_table(
                run_id, scale,
                np.concatenate([e["x"] for e in err_parts]),
                np.concatenate([e["y"] for e in err_parts]),
                np.concatenate([e["z"] for e in err_parts]),
                np.concatenate([e["morton"] for e in err_parts]),
                np.concatenate([np.asarray(e["stage"], dtype=object) for e in err_parts]),
                np.concatenate([np.asarray(e["reason"], dtype=object) for e in err_parts]),
                pa.concat_arrays([e["data"].cast(pa.binary()) for e in err_parts]),
                cell_limit=cell_limit,
            )
            stats.errors = int(sum(len(e["morton"]) for e in err_parts))
        else:
            errors = S.empty("export_errors")
        blocks = out_blocks.result()
        overflow = out_overflow.result()
        if unordered:
            overflow = _sort_overflow(overflow, spill_dir)
    except BaseException:
        out_blocks.discard()
        out_overflow.discard()
        raise
    return {"blocks": blocks, "block_overflow": overflow, "export_errors": errors}, stats


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

