"""Cutting payloads into cells of at most ``cell_limit`` bytes, and putting them back
together — vectorized over whole Arrow arrays.

Why: VastDB limits a cell to about 126 KiB, while coarse-scale block bodies reach 1.5 MB and
label tables 119,000 entries (``dvidetl.tables.schema`` describes the tables the cells go into).
Cutting is lossless; ``reassemble`` gives back each block's whole row.

The tabular sinks cut the blocks a partition hands them (``export.batch``: one row per block,
whole payload and lists) with ``cut_blocks`` / ``block_cells``, for the run's cell limit —
the one knob (``RunOptions.cell_limit``, ``--cell-limit``), checked once by
``check_cell_limit``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.errors import UserError
from dvidetl.tables import schema as S
from dvidetl.tables.schema import LIST_COLUMNS, PAYLOAD_CELLS, PAYLOAD_COLUMNS, empty

#: the smallest cell limit an export may use: below it a coarse block's payload would need
#: more than ``blocks_tables``' 255 cells, and nothing real is that small
MIN_CELL_LIMIT = 1024


def check_cell_limit(n: int, *, most: int | None = None, what: str = "--cell-limit") -> int:
    """``n`` if it is a usable cell limit (at least ``MIN_CELL_LIMIT`` and at most ``most``,
    a store's own limit), else a ``UserError`` saying which bound it passes."""
    if type(n) is not int and not isinstance(n, np.integer):
        raise UserError(f"{what} must be a whole number of bytes (got {n!r})")
    if n < MIN_CELL_LIMIT:
        raise UserError(f"{what} must be at least {MIN_CELL_LIMIT} bytes (got {n})")
    if most is not None and n > most:
        raise UserError(f"{what} {n:,} is above the store's cell limit {most:,}: use {most} or less")
    return int(n)


def nparts_of(sizes: np.ndarray, cell_limit: int) -> np.ndarray:
    """Number of cells a payload of each size takes (0 for an empty payload)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return (sizes + (cell_limit - 1)) // cell_limit


def cut_cells(data: pa.Array, part: int, cell_limit: int) -> pa.Array:
    """Part ``part`` (bytes ``[part*L, (part+1)*L)``) of every value, null where the value is
    shorter than that (or null). One C kernel over the whole array."""
    sliced = pc.binary_slice(data, part * cell_limit, (part + 1) * cell_limit)
    lengths = pc.binary_length(data).to_numpy(zero_copy_only=False)
    lengths = np.nan_to_num(lengths.astype(np.float64), nan=0.0).astype(np.int64)
    valid = lengths > part * cell_limit  # null values count as length 0
    return pc.if_else(pa.array(valid), sliced, pa.scalar(None, pa.binary()))


def binary_buffers(data: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 of length n+1, values uint8) of a binary array, zero copy where possible.
    Offsets index into the returned values (which may start before the first value)."""
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    if data.type == pa.binary() or data.type == pa.string():
        odt = np.int32
    elif data.type == pa.large_binary() or data.type == pa.large_string():
        odt = np.int64
    else:
        data = data.cast(pa.large_binary())
        odt = np.int64
    bufs = data.buffers()
    n = len(data)
    offsets = np.frombuffer(bufs[1], dtype=odt)[data.offset : data.offset + n + 1].astype(np.int64)
    if len(offsets) == 0:
        offsets = np.zeros(1, np.int64)
    raw = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, raw


def list_as_binary(arr: pa.Array) -> pa.BinaryArray:
    """The little-endian values of each list as one binary value (zero copy of the values)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type))
    itemsize = arr.type.value_type.byte_width
    offsets = np.asarray(arr.offsets).astype(np.int64)  # respects a slice offset
    vals = np.ascontiguousarray(arr.values.to_numpy(zero_copy_only=False))
    validity = None
    if arr.null_count:
        validity = pa.array(np.asarray(pc.is_valid(arr)), pa.bool_()).buffers()[1]
    out = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(arr),
        [validity, pa.py_buffer(offsets * itemsize), pa.py_buffer(vals.view(np.uint8))],
        null_count=arr.null_count,
    )
    return out.cast(pa.binary())


def binary_as_list(data: pa.Array, value_type: pa.DataType) -> pa.ListArray:
    """Inverse of ``list_as_binary``: each binary value read as little-endian ``value_type``."""
    itemsize = value_type.byte_width
    offsets, raw = binary_buffers(data)
    raw = raw[offsets[0] : offsets[-1]]
    if np.any((offsets[1:] - offsets[:-1]) % itemsize):
        raise ValueError(f"binary values are not whole {value_type} arrays")
    vals = raw.view(np.dtype(value_type.to_pandas_dtype()).newbyteorder("<")) if len(raw) else np.zeros(0, value_type.to_pandas_dtype())
    loff = ((offsets - offsets[0]) // itemsize).astype(np.int32)
    mask = pc.is_null(data) if data.null_count else None
    return pa.ListArray.from_arrays(pa.array(loff, pa.int32()), pa.array(vals, value_type), mask=mask)


def join_payload_cells(blocks: pa.Table) -> pa.Array:
    """The zstd payload cells of ``blocks`` rows joined back (``payload0 || payload1 || ...``), without
    overflow parts: ``binary_join_element_wise`` with nulls skipped, one C kernel."""
    if blocks.num_rows == 0:
        return pa.array([], pa.binary())
    cols = [blocks.column(c).combine_chunks().cast(pa.binary()) for c in PAYLOAD_COLUMNS]
    # pyarrow 23 drops rows whose every input is null under null_handling="skip" (the output
    # comes out shorter); payload0 is null only for an empty payload, so make it b"" first.
    cols[0] = pc.fill_null(cols[0], pa.scalar(b"", pa.binary()))
    joined = pc.binary_join_element_wise(*cols, b"", null_handling="skip")
    if len(joined) != blocks.num_rows:
        raise AssertionError("binary_join_element_wise changed the row count")
    return joined


def _group_join(keys: np.ndarray, data: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Concatenate consecutive values with equal keys (keys sorted): (unique keys, joined)."""
    if len(keys) == 0:
        return keys, pa.array([], pa.large_binary())
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    offs, raw = binary_buffers(data)
    raw = np.ascontiguousarray(raw[offs[0] : offs[-1]])
    lengths = offs[1:] - offs[:-1]
    cum = np.concatenate([[0], np.cumsum(lengths)])
    goff = cum[np.concatenate([starts, [len(keys)]])].astype(np.int64)
    joined = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(goff), pa.py_buffer(raw)]
    )
    return keys[starts], joined


def reassemble(blocks: pa.Table, overflow: pa.Table | None) -> pa.Table:
    """``blocks`` rows with their full payloads: ``payload`` (the whole zstd payload, replacing
    ``payload0..3``) and the list columns filled from ``block_overflow`` where they overflowed.
    Rows keep their order.

    ``overflow`` may hold rows of other blocks (e.g. a whole scale); only matching
    (scale, morton) are used. A block whose overflow rows are missing raises ``ValueError``
    naming it: an incomplete export must never reassemble silently."""
    payload = join_payload_cells(blocks)
    out = blocks.drop_columns(list(PAYLOAD_COLUMNS)).append_column("payload", payload)
    n = blocks.num_rows
    flag = np.asarray(blocks.column("overflow").to_numpy(zero_copy_only=False), dtype=bool) if n else np.zeros(0, bool)
    if flag.any():
        if overflow is None:
            overflow = empty("block_overflow")
        scales = blocks.column("scale").to_numpy()
        mortons = blocks.column("morton").to_numpy()
        nparts = blocks.column("nparts").to_numpy().astype(np.int64)
        ov_scale = overflow.column("scale").to_numpy()
        replaced: dict[str, tuple[list[np.ndarray], list[pa.Array]]] = {
            c: ([], []) for c in ("payload", *LIST_COLUMNS)
        }
        for s in np.unique(scales[flag]):
            rows = np.flatnonzero(flag & (scales == s))
            km = mortons[rows]
            ov = overflow.filter(pa.array(ov_scale == s))
            ov = ov.filter(pa.array(np.isin(ov.column("morton").to_numpy(), km)))
            ov = ov.sort_by([("morton", "ascending"), ("column", "ascending"), ("part", "ascending")])
            ocol = np.asarray(ov.column("column").to_numpy(zero_copy_only=False))
            omorton = ov.column("morton").to_numpy()
            odata = ov.column("data").combine_chunks() if ov.num_rows else pa.array([], pa.binary())
            opart = ov.column("part").to_numpy().astype(np.int64)
            for colname in ("payload", *LIST_COLUMNS):
                m = ocol == colname
                k, pp = omorton[m], opart[m]
                first = PAYLOAD_CELLS if colname == "payload" else 0
                if len(k):
                    start = np.concatenate([[True], k[1:] != k[:-1]])
                    expect = np.where(start, first, np.concatenate([[0], pp[:-1] + 1]))
                    if np.any(pp != expect):
                        bad = k[pp != expect][:5].tolist()
                        raise ValueError(
                            f"scale {s}: block_overflow parts of column {colname!r} missing or "
                            f"repeated (morton {bad})"
                        )
                ukeys, joined = _group_join(k, odata.filter(pa.array(m)))
                if colname == "payload":
                    need = rows[nparts[rows] > PAYLOAD_CELLS]
                else:
                    cell = out.column(colname).combine_chunks()
                    need = rows[np.asarray(pc.is_null(cell.take(pa.array(rows))))]
                if len(need) == 0:
                    continue
                pos = np.searchsorted(ukeys, mortons[need]) if len(ukeys) else np.zeros(len(need), np.int64)
                pos = np.minimum(pos, max(len(ukeys) - 1, 0))
                ok = (ukeys[pos] == mortons[need]) if len(ukeys) else np.zeros(len(need), bool)
                if not ok.all():
                    bad = mortons[need][~ok][:5].tolist()
                    raise ValueError(
                        f"scale {s}: block_overflow rows for column {colname!r} missing "
                        f"(morton {bad})"
                    )
                replaced[colname][0].append(need)
                replaced[colname][1].append(joined.take(pa.array(pos)))
        for colname, (idxs, vals) in replaced.items():
            if not idxs:
                continue
            idx = np.concatenate(idxs)
            extra = pa.concat_arrays(vals)
            cur = out.column(colname).combine_chunks()
            if colname == "payload":
                head = pc.fill_null(cur.take(pa.array(idx)).cast(pa.large_binary()), b"")
                merged = pc.binary_join_element_wise(
                    head, extra, pa.scalar(b"", pa.large_binary()), null_handling="skip"
                )
                merged = merged.cast(cur.type)
            else:
                merged = binary_as_list(extra, LIST_COLUMNS[colname]).cast(cur.type)
            src = np.full(n, -1, dtype=np.int64)
            src[idx] = np.arange(len(idx))
            take = np.where(src >= 0, n + src, np.arange(n))
            combined = pa.concat_arrays([cur, merged]).take(pa.array(take))
            out = out.set_column(out.schema.get_field_index(colname), colname, combined)
    for colname in LIST_COLUMNS:
        col = out.column(colname)
        if col.null_count:
            bad = pc.filter(out.column("morton"), pc.is_null(col)).to_pylist()[:5]
            raise ValueError(f"column {colname!r} is null without overflow rows (morton {bad})")
    got = pc.binary_length(out.column("payload")).to_numpy(zero_copy_only=False)
    want = out.column("payload_size").to_numpy(zero_copy_only=False)
    if n and np.any(got != want):
        bad = pc.filter(out.column("morton"), pa.array(got != want)).to_pylist()[:5]
        raise ValueError(f"reassembled payload sizes differ from payload_size (morton {bad})")
    return out


# ---------------------------------------------------------------------------------------------
# cutting a partition's blocks into storage rows
# ---------------------------------------------------------------------------------------------


def _list_nbytes(arr: pa.Array) -> np.ndarray:
    """Payload bytes of each list cell (entries x item size)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    return lengths * arr.type.value_type.byte_width


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
    if cell_limit < 1:  # (an export's limit is checked once, by check_cell_limit)
        raise ValueError(f"cell limit {cell_limit} bytes: must be positive")
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


def block_cells(batch: pa.Table, cell_limit: int) -> tuple[pa.Table, pa.Table]:
    """The ``blocks`` and ``block_overflow`` rows of one ``export.batch.BLOCK_BATCH`` table
    (the blocks of one scale, as a partition hands them to its sinks)."""
    scale = int(batch.column("scale")[0].as_py()) if batch.num_rows else 0
    return blocks_tables(
        scale, batch.column("x").to_numpy(), batch.column("y").to_numpy(), batch.column("z").to_numpy(),
        batch.column("morton").to_numpy(), batch.column("supervoxels"), batch.column("labels"),
        batch.column("sv_voxels"), batch.column("raw_size").to_numpy(), batch.column("crc32").to_numpy(),
        batch.column("payload"), cell_limit=cell_limit)


def failed_cells(failed: pa.Table, run_id: str, cell_limit: int) -> pa.Table:
    """The ``export_errors`` rows of a partition's failed blocks (``export.batch.FAILED_BLOCKS``)."""
    if failed.num_rows == 0:
        return empty("export_errors")
    scale = int(failed.column("scale")[0].as_py())
    return errors_table(run_id, scale, failed.column("x").to_numpy(), failed.column("y").to_numpy(),
                        failed.column("z").to_numpy(), failed.column("morton").to_numpy(),
                        np.asarray(failed.column("stage").to_pylist(), dtype=object),
                        np.asarray(failed.column("reason").to_pylist(), dtype=object),
                        failed.column("data"), cell_limit=cell_limit)


def cut_blocks(data, run_id: str, cell_limit: int) -> dict[str, pa.Table]:
    """A blocks partition's data (``export.batch.BlockData``) as whole ``blocks``,
    ``block_overflow`` and ``export_errors`` tables (what the tabular sinks store; they cut
    batch by batch, this is for callers that want the tables in memory)."""
    b, o = [], []
    for batch in data.batches():
        bt, ot = block_cells(batch, cell_limit)
        b.append(bt)
        o.append(ot)
    return {"blocks": pa.concat_tables(b) if b else empty("blocks"),
            "block_overflow": pa.concat_tables(o) if o else empty("block_overflow"),
            "export_errors": failed_cells(data.failed, run_id, cell_limit)}
