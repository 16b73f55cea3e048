"""Cutting payloads into cells of at most ``cell_limit`` bytes, and putting them back
together — vectorized over whole Arrow arrays.

Why: VastDB limits a cell to about 126 KiB, while coarse-scale block bodies reach 1.5 MB and
label tables 119,000 entries (``dvidetl.tables.schema`` describes the tables the cells go into).
Cutting is lossless; ``reassemble`` gives back each block's whole row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.tables.schema import LIST_COLUMNS, PAYLOAD_CELLS, PAYLOAD_COLUMNS, empty


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

