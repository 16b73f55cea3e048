"""One DVID compressed label Block at a time: decode, encode, labels, counts, split/join.

Pure functions, no I/O. The byte layout is DVID's (datatype/common/labels/compressed.go); the heavy lifting is
in the numba kernels of ``_kernels.py``. Decoders accept every valid block (any table and
palette order, duplicates, unused entries, Ns == 0 sub-blocks, solid blocks, grids other
than 8³) and reject everything else with ``BlockFormatError`` — including trailing bytes,
which Go ignores but which in an export mean the block is not what we think it is.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from dvidetl.codec import _kernels as K
from dvidetl.codec.errors import BlockFormatError

__all__ = [
    "decode_block",
    "encode_block",
    "block_labels",
    "label_voxel_counts",
    "split_block",
    "join_block",
    "block_header",
    "validate_block",
    "validate_blocks",
    "describe_error",
    "MAX_VOXELS",
]


def _as_u8(data) -> np.ndarray:
    """A zero-copy uint8 view of any bytes-like (bytes, bytearray, memoryview, numpy)."""
    if type(data) is bytes:
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def describe_error(info: np.ndarray) -> str:
    """A one-line reason for a kernel ``info`` row (what is wrong and at which byte)."""
    err, pos, a, b, n, nsb, _s, c = (int(x) for x in info[: K.INFO_LEN])
    if err == K.E_HDR:
        return f"block: truncated header, {a} bytes < 16 (at byte {pos})"
    if err == K.E_GRID:
        return f"block: bad sub-block grid {a}x{b}x{c} (each must be 1..{K.MAX_GRID}) at byte 0"
    if err == K.E_N0:
        return "block: label table length N=0 at byte 12"
    if err == K.E_TABLE:
        return f"block: truncated label table (N={n}): needs {a} bytes, has {b} (at byte {pos})"
    if err == K.E_SOLID:
        return f"block: solid block (N=1) must be 24 bytes, has {a} (trailing bytes at byte 24)"
    if err == K.E_NS_TRUNC:
        return f"block: truncated palette sizes: needs {a} bytes, has {b} (at byte {pos})"
    if err == K.E_NS_BIG:
        return f"block: palette size {b} > 512 in sub-block {a} at byte {pos}"
    if err == K.E_PAL_TRUNC:
        return f"block: truncated palettes: needs {a} bytes, has {b} (at byte {pos})"
    if err == K.E_PAL_IDX:
        return f"block: palette index {a} >= N={n} in sub-block {b} at byte {pos}"
    if err == K.E_VAL_TRUNC:
        return f"block: truncated values: needs {a} bytes, has {b} (at byte {pos})"
    if err == K.E_TRAIL:
        return f"block: {b - a} trailing bytes after the values (block ends at byte {pos})"
    if err == K.E_LOCAL:
        return f"block: value {a} >= palette size {c} in sub-block {b} at byte {pos}"
    return f"block: error code {err} at byte {pos}"


def _scan(buf: np.ndarray) -> np.ndarray:
    info = np.zeros(K.INFO_LEN, np.int64)
    if K.scan(buf, 0, buf.shape[0], info) != K.E_OK:
        raise BlockFormatError(describe_error(info), int(info[K.I_POS]))
    return info


def block_header(data) -> tuple[int, int, int, int]:
    """(gx, gy, gz, N) after checking the header and that the label table fits."""
    buf = _as_u8(data)
    if buf.shape[0] < 16:
        raise BlockFormatError(
            f"block: truncated header, {buf.shape[0]} bytes < 16 (at byte {buf.shape[0]})",
            buf.shape[0],
        )
    gx, gy, gz, n = (int(v) for v in buf[:16].view("<u4"))
    if not all(1 <= g <= K.MAX_GRID for g in (gx, gy, gz)):
        raise BlockFormatError(
            f"block: bad sub-block grid {gx}x{gy}x{gz} (each must be 1..{K.MAX_GRID}) at byte 0", 0
        )
    if n == 0:
        raise BlockFormatError("block: label table length N=0 at byte 12", 12)
    if 16 + 8 * n > buf.shape[0]:
        raise BlockFormatError(
            f"block: truncated label table (N={n}): needs {16 + 8 * n} bytes, "
            f"has {buf.shape[0]} (at byte {buf.shape[0]})",
            buf.shape[0],
        )
    return gx, gy, gz, n


def validate_block(data) -> None:
    """Full validation (structure and every packed value); raises BlockFormatError."""
    label_voxel_counts(data)


#: decode/encode refuse volumes above this many voxels (1 GiB of uint64): a 24-byte solid
#: block may legally claim a 1024³ grid, which must not turn into an 8 GiB allocation.
MAX_VOXELS = 1 << 27


def validate_blocks(blocks) -> list[str | None]:
    """Fully validate many raw (unwrapped) blocks in one numba pass over their concatenated
    bytes: per block None (valid) or the reason, as ``BlockFormatError`` would say it.
    ``blocks``: a pyarrow binary/large_binary array (nulls give "null block") or a sequence
    of bytes-likes."""

    if isinstance(blocks, pa.ChunkedArray):
        blocks = blocks.combine_chunks()
    if isinstance(blocks, pa.Array):
        if not (pa.types.is_binary(blocks.type) or pa.types.is_large_binary(blocks.type)):
            raise TypeError(f"validate_blocks: expected binary data, got {blocks.type}")
        n = len(blocks)
        otype = np.int64 if pa.types.is_large_binary(blocks.type) else np.int32
        bufs = blocks.buffers()
        offs = np.frombuffer(bufs[1], otype, n + 1, blocks.offset * np.dtype(otype).itemsize)
        offs = offs.astype(np.int64)
        data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        nulls = blocks.is_null().to_numpy(zero_copy_only=False) if blocks.null_count else None
    else:
        parts = [bytes(memoryview(b).cast("B")) for b in blocks]
        n = len(parts)
        offs = np.zeros(n + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offs[1:])
        data = np.frombuffer(b"".join(parts), np.uint8) if n else np.zeros(0, np.uint8)
        nulls = None
    info = K.check_many(data, offs)
    out: list[str | None] = [
        None if info[r, K.I_ERR] == K.E_OK else describe_error(info[r]) for r in range(n)
    ]
    if nulls is not None:
        for r in np.flatnonzero(nulls):
            out[r] = "null block"
    return out


def decode_block(data) -> np.ndarray:
    """Voxels of a DVID block as uint64 (nz, ny, nx), [z, y, x] order (a fresh array)."""
    buf = _as_u8(data)
    info = _scan(buf)
    gx, gy, gz = (int(v) for v in buf[:12].view("<u4"))
    if 512 * gx * gy * gz > MAX_VOXELS:
        raise BlockFormatError(
            f"block: grid {gx}x{gy}x{gz} is too large to decode "
            f"({512 * gx * gy * gz} voxels > {MAX_VOXELS}) (at byte 0)",
            0,
        )
    out = np.empty((8 * gz, 8 * gy, 8 * gx), np.uint64)
    if K.decode_into(buf, 0, buf.shape[0], info, out) != K.E_OK:
        raise BlockFormatError(describe_error(info), int(info[K.I_POS]))
    return out


def encode_block(volume: np.ndarray, label_order=None) -> bytes:
    """DVID's compressed Block for a uint64 volume (nz, ny, nx), sides multiples of 8.

    Without ``label_order`` the table is in first-occurrence order (sub-blocks in order, new
    labels of a sub-block in local-index order) — always one of the orders Go's MakeBlock can
    produce, and Go's exact bytes whenever no sub-block introduces two new labels. With
    ``label_order`` the table is exactly that sequence (duplicates allowed: the first wins;
    unused entries allowed), so any Go output can be reproduced byte for byte.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"encode_block: volume must be 3-d (nz, ny, nx), got shape {vol.shape}")
    if any(s % 8 or s < 8 or s > 8 * K.MAX_GRID for s in vol.shape):
        raise ValueError(
            f"encode_block: volume sides must be multiples of 8 in 8..{8 * K.MAX_GRID}, "
            f"got {vol.shape}"
        )
    if vol.size > MAX_VOXELS:
        raise ValueError(f"encode_block: {vol.size} voxels > {MAX_VOXELS}")
    if vol.dtype != np.uint64:
        if vol.dtype.kind not in "iub":
            raise ValueError(f"encode_block: labels must be integers, got {vol.dtype}")
        if vol.dtype.kind == "i" and vol.size and vol.min() < 0:
            raise ValueError("encode_block: negative labels")
        vol = vol.astype(np.uint64)
    vol = np.ascontiguousarray(vol)
    if label_order is None:
        order = np.zeros(0, np.uint64)
        use = False
    else:
        order = np.array(label_order, dtype=np.uint64).reshape(-1)  # writable copy
        if order.shape[0] == 0:
            raise ValueError("encode_block: label_order is empty")
        use = True
    vals, dist, out = _encode_scratch(vol.size // 512, order.shape[0])
    size, err, bad = K.encode(vol, order, use, vals, dist, out)
    if err:
        raise ValueError(f"encode_block: label {int(bad)} occurs in the volume but not in label_order")
    return out[:size].tobytes()


_TLS = threading.local()


def _encode_scratch(nsb: int, n_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread reusable encoder buffers, grown to the worst case for this size: their
    pages stay mapped, so encoding does not page-fault megabytes on every call."""
    nd = 512 * nsb
    need = (576 * nsb, nd, 16 + 8 * max(nd, n_order) + 2 * nsb + 4 * nd + 576 * nsb)
    have = getattr(_TLS, "enc", None)
    if have is None or any(h.shape[0] < n for h, n in zip(have, need, strict=True)):
        old = have or (None, None, None)
        have = tuple(
            np.empty(max(n, 0 if o is None else o.shape[0]), dt)
            for n, o, dt in zip(need, old, (np.uint8, np.uint64, np.uint8), strict=True)
        )
        _TLS.enc = have
    return have


def block_labels(data) -> np.ndarray:
    """The block's label table L (uint64, stored order, duplicates kept) — a view, no copy."""
    _gx, _gy, _gz, n = block_header(data)
    return np.frombuffer(data, dtype="<u8", count=n, offset=16)


def label_voxel_counts(data) -> np.ndarray:
    """Voxels per label-table entry (uint32, aligned with ``block_labels``), from the palettes
    and packed values without materializing voxels. Sub-blocks with Ns == 0 (label 0 by
    convention, no table entry) are not counted; duplicate entries are counted separately."""
    info, counts = K.count_block(_as_u8(data))
    if info[K.I_ERR] != K.E_OK:
        raise BlockFormatError(describe_error(info), int(info[K.I_POS]))
    return counts


def split_block(data) -> tuple[np.ndarray, bytes]:
    """Cut the label table out: (labels view, body = data[:16] + data[16 + 8N:]).

    The body keeps the 16-byte header so it still says its grid and N; this layout is part of
    the export format. Only the header is validated (``join_block(*split_block(b)) == b``)."""
    _gx, _gy, _gz, n = block_header(data)
    mv = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else _as_u8(data).data
    labels = np.frombuffer(data, dtype="<u8", count=n, offset=16)
    body = bytes(mv[:16]) + bytes(mv[16 + 8 * n :])
    return labels, body


def join_block(labels, body) -> bytes:
    """Put a label table back into a body from ``split_block`` (N must match the header)."""
    lab = np.ascontiguousarray(np.asarray(labels), dtype="<u8").reshape(-1)
    mv = memoryview(body).cast("B") if not isinstance(body, np.ndarray) else _as_u8(body).data
    if len(mv) < 16:
        raise BlockFormatError(f"block body: truncated header, {len(mv)} bytes < 16", len(mv))
    n = int.from_bytes(mv[12:16], "little")
    if n != lab.shape[0]:
        raise BlockFormatError(
            f"block body: header says N={n} but {lab.shape[0]} labels were given (at byte 12)", 12
        )
    return b"".join((mv[:16], lab.tobytes(), mv[16:]))
