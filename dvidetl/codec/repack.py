"""``repack``: the export's hot path over a whole Arrow array of stored blocks at once.

Per row: unwrap (gzip/lz4/zstd/none/dvid), validate the block completely, cut out its label
table, count voxels per table entry, and zstd the body (block minus table) into the block's
*payload*. The only
per-row Python is the loop around the C library calls (inflate, zstd); parsing, validation,
counting and the table/body copies are one numba pass over the concatenated buffer. A
corrupt row gets a reason in ``errors`` and NULL elsewhere; its neighbours are unaffected.

With ``payload=False`` the zstd step is skipped (``Repacked.payload`` is None): it is about half
of the cost, and a caller that only transcodes the unwrapped blocks (``keep_raw``) never reads
it.

``restore_block(supervoxels, payload)`` inverts it exactly: the original unwrapped block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zstandard

from dvidetl.codec import _kernels as K
from dvidetl.codec.block import describe_error, join_block
from dvidetl.codec.errors import BlockFormatError
from dvidetl.codec.wrapper import CODECS, MAX_RAW, crc32, unwrap_crc

__all__ = ["Repacked", "repack", "restore_block"]


@dataclass(frozen=True)
class Repacked:
    """Arrow arrays, all as long as the input. Error rows: ``errors`` set, NULL elsewhere."""

    supervoxels: pa.ListArray  # list<uint64>: the block's label table, stored order
    sv_voxels: pa.ListArray  # list<uint32>: voxels per table entry
    payload: pa.BinaryArray | None  # zstd frame of the body, data[:16] + data[16 + 8N:] (None: not asked)
    raw_size: pa.UInt32Array  # length of the unwrapped block
    crc32: pa.UInt32Array  # zlib.crc32 of the unwrapped block
    errors: pa.StringArray  # null = ok, else the reason
    raw: pa.BinaryArray | None = None  # the unwrapped blocks (``keep_raw``; null for errors)

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def n_errors(self) -> int:
        return len(self.errors) - self.errors.null_count


#: zstandard (de)compressor objects are not thread safe (a shared one corrupts frames when
#: dask runs tasks in threads): one per thread
_TLS = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = _TLS.__dict__.setdefault("cctx", {})
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_TLS, "dctx", None)
    if d is None:
        d = _TLS.dctx = zstandard.ZstdDecompressor()
    return d


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, memoryview, np.ndarray]:
    """(offsets int64 rebased to 0, data memoryview, valid bool) without copying data."""
    n = len(arr)
    bufs = arr.buffers()
    otype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offs = np.frombuffer(bufs[1], otype, n + 1, arr.offset * np.dtype(otype).itemsize)
    offs = offs.astype(np.int64)
    base = int(offs[0]) if n else 0
    data = memoryview(bufs[2]).cast("B") if bufs[2] is not None else memoryview(b"")
    data = data[base : int(offs[-1]) if n else 0]
    offs -= base
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    else:
        valid = np.ones(n, dtype=bool)
    return offs, data, valid


_SCRATCH = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread reusable byte buffer of at least n bytes: its pages stay mapped between
    calls, so the unwrapped batch is written into warm memory instead of page-faulting
    megabytes of fresh allocations every call (the kernel also edits it in place)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = np.empty(max(n, 1 << 20, 0 if buf is None else buf.shape[0] * 3 // 2), np.uint8)
        _SCRATCH.buf = buf
    return buf


def repack(
    wrapped: pa.BinaryArray | pa.LargeBinaryArray | pa.ChunkedArray,
    codec: str,
    *,
    zstd_level: int = 3,
    keep_raw: bool = False,
    payload: bool = True,
) -> Repacked:
    """Unwrap, validate, split, count and zstd every block of ``wrapped`` (see module doc).
    ``keep_raw``: also return the unwrapped blocks (``Repacked.raw``), for callers that
    transcode whole blocks (one copy of the unwrapped batch; not made otherwise).
    ``payload=False``: no zstd payloads (``Repacked.payload`` is None); the blocks are still
    validated completely."""
    if isinstance(wrapped, pa.ChunkedArray):
        wrapped = wrapped.combine_chunks()
    if not (pa.types.is_binary(wrapped.type) or pa.types.is_large_binary(wrapped.type)):
        raise TypeError(f"repack: expected a binary or large_binary array, got {wrapped.type}")
    base_codec = codec.split("-", 1)[0] if codec.startswith("dvid") else codec
    if base_codec not in CODECS:
        raise ValueError(f"repack: unknown codec {codec!r} (expected one of {', '.join(CODECS)})")
    n = len(wrapped)
    offs_in, data, valid = _binary_parts(wrapped)
    errors: list[str | None] = [None] * n
    ok = valid.copy()
    # plain Python lists in the per-row loops: numpy scalar indexing costs ~100 ns a touch
    oin = offs_in.tolist()
    okl = ok.tolist()
    crcl = [0] * n

    if codec == "none":
        # the input already is the concatenation of the raw blocks: one copy into scratch
        total = oin[-1]
        buf = _scratch(total)
        smv = buf.data  # (the array's memoryview)
        smv[:total] = data
        offs = offs_in.copy()
        for r in range(n):
            if okl[r]:
                crcl[r] = crc32(smv[oin[r] : oin[r + 1]])
    else:
        parts: list = []
        sizes = [0] * n
        for r in range(n):
            if not okl[r]:
                continue
            try:
                raw, crc = unwrap_crc(data[oin[r] : oin[r + 1]], codec)
            except BlockFormatError as exc:
                errors[r] = str(exc)
                okl[r] = False
                continue
            parts.append(raw)
            sizes[r] = len(raw)
            crcl[r] = crc32(raw) if crc is None else crc
        ok = np.array(okl, dtype=bool)
        offs = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=offs[1:])
        buf = _scratch(int(offs[-1]))
        smv = buf.data  # (the array's memoryview)
        o = 0
        for raw in parts:
            k = len(raw)
            smv[o : o + k] = raw
            o += k
        del parts
    crcs = np.array(crcl, dtype=np.int64)

    for r in np.flatnonzero(~valid).tolist():
        errors[r] = "null value"
    raw_copy = buf[: int(offs[-1])].copy() if keep_raw else None  # (the kernel edits buf)
    info, sv_offs, sv, counts, body_start = K.repack_kernel(buf, offs, ok)
    good = ok & (info[:, K.I_ERR] == K.E_OK)
    for r in np.flatnonzero(ok & ~good).tolist():
        errors[r] = describe_error(info[r])

    raw_size = (offs[1:] - offs[:-1]).astype(np.uint32)
    if sv_offs[-1] > np.iinfo(np.int32).max:
        raise ValueError("repack: batch too large for 32-bit Arrow offsets; split it")
    if payload:
        compress = _cctx(zstd_level).compress
        zparts: list[bytes] = []
        zsizes = [0] * n
        bsl = body_start.tolist()
        ol = offs.tolist()
        for r in np.flatnonzero(good).tolist():
            z = compress(smv[bsl[r] : ol[r + 1]])
            zparts.append(z)
            zsizes[r] = len(z)
        zoffs = np.zeros(n + 1, np.int64)
        np.cumsum(zsizes, out=zoffs[1:])
        zdata = b"".join(zparts)
        if zoffs[-1] > np.iinfo(np.int32).max:
            raise ValueError("repack: batch too large for 32-bit Arrow offsets; split it")

    bad = ~good
    n_bad = int(bad.sum())
    validity = pa.py_buffer(np.packbits(good, bitorder="little")) if n_bad else None
    sv_offsets = pa.array(sv_offs.astype(np.int32))
    mask = pa.array(bad) if n_bad else None
    supervoxels = pa.ListArray.from_arrays(sv_offsets, pa.array(sv, pa.uint64()), mask=mask)
    sv_voxels = pa.ListArray.from_arrays(sv_offsets, pa.array(counts, pa.uint32()), mask=mask)
    payload_arr = pa.Array.from_buffers(
        pa.binary(),
        n,
        [validity, pa.py_buffer(zoffs.astype(np.int32)), pa.py_buffer(zdata)],
        null_count=n_bad,
    ) if payload else None
    raw_blocks: pa.BinaryArray | None = None
    if raw_copy is not None:
        if offs[-1] > np.iinfo(np.int32).max:
            raise ValueError("repack: batch too large for 32-bit Arrow offsets; split it")
        raw_blocks = pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offs.astype(np.int32)),
                                                            pa.py_buffer(raw_copy)], null_count=n_bad)
    return Repacked(
        raw=raw_blocks,
        supervoxels=supervoxels,
        sv_voxels=sv_voxels,
        payload=payload_arr,
        raw_size=pa.array(raw_size, pa.uint32(), mask=bad if n_bad else None),
        crc32=pa.array(crcs.astype(np.uint32), pa.uint32(), mask=bad if n_bad else None),
        errors=pa.array(errors, pa.string()),
    )


def restore_block(supervoxels, payload) -> bytes:
    """The exact original (unwrapped) DVID block from a repacked row: zstd-decompress the
    body and put the label table back (``join_block``)."""
    d = _dctx().decompressobj()
    try:
        body = d.decompress(payload)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"zstd: {exc}", 0) from None
    if not d.eof:
        raise BlockFormatError(f"zstd: truncated payload frame ({len(payload)} bytes)", len(payload))
    if d.unused_data:
        raise BlockFormatError(f"zstd: {len(d.unused_data)} trailing bytes after the payload frame")
    if len(body) > MAX_RAW:
        raise BlockFormatError(f"zstd: body larger than {MAX_RAW} bytes")
    return join_block(supervoxels, body)
