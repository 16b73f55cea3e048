"""DVID's storage forms of a block value: gzip, LZ4 (size-prefixed block), zstd, none, and
the ``dvid`` serialization wrapper (format byte + optional CRC32, as DVID's dvid/serialize.go writes it).

Every failure is a ``BlockFormatError`` whose message starts with the codec name
("gzip: invalid stored block lengths") so a per-row error column stays readable.

gzip inflate is the export's hottest C call, so the fastest available inflater is used
(libdeflate via PyPI ``deflate``, else ISA-L, else zlib-ng, else zlib — see
bench/bench_codec.py). libdeflate's binding silently ignores trailing bytes and reads only
the first member, so its result is accepted only when it provably is the whole stream
(ISIZE and CRC32 of the last 8 bytes match the output); anything else is re-done with zlib,
which also gives the exact error message.
"""

from __future__ import annotations

import gzip
import struct
import threading
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import lz4.block
import zstandard

from dvidetl.codec.errors import BlockFormatError

# Those in try/if/with blocks are optional or conditional.

__all__ = ["wrap", "unwrap", "unwrap_crc", "gunzip", "crc32", "GZIP_INFLATER", "MAX_RAW", "CODECS"]

#: the largest unwrapped value we accept (a 64³ block is at most 3,441,680 bytes).
MAX_RAW = 1 << 28

CODECS = ("gzip", "lz4", "zstd", "none", "dvid")

_GZ_MAGIC = b"\x1f\x8b"

#: the fastest gzip inflater installed (None: zlib's), its CRC-32, and libdeflate if present
_fast_gunzip: Callable[[memoryview, int], Any] | None
_fast_crc: Callable[..., int]
_deflate: ModuleType | None

try:  # libdeflate
    import deflate as _libdeflate

    def _gunzip_deflate(mv: memoryview, isize: int) -> Any:
        return _libdeflate.gzip_decompress(mv, isize)

    _deflate = _libdeflate
    _fast_gunzip = _gunzip_deflate
    _fast_crc = _libdeflate.crc32
    GZIP_INFLATER = "libdeflate"
except ImportError:  # pragma: no cover - depends on the environment
    _deflate = None
    _fast_crc = zlib.crc32
    try:
        from isal import igzip as _igzip

        def _gunzip_isal(mv: memoryview, isize: int) -> Any:
            return _igzip.decompress(mv)

        _fast_gunzip = _gunzip_isal
        GZIP_INFLATER = "isal"
    except ImportError:
        try:
            from zlib_ng import gzip_ng as _gzip_ng

            def _gunzip_zlib_ng(mv: memoryview, isize: int) -> Any:
                return _gzip_ng.decompress(mv)

            _fast_gunzip = _gunzip_zlib_ng
            GZIP_INFLATER = "zlib-ng"
        except ImportError:
            _fast_gunzip = None
            GZIP_INFLATER = "zlib"


def _mv(data) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _zlib_msg(exc: Exception) -> str:
    msg = str(exc)
    # "Error -3 while decompressing data: invalid stored block lengths"
    return msg.split(": ", 1)[1] if ": " in msg else msg


def _gunzip_zlib(mv: memoryview) -> bytes:
    """Reference gunzip (multi-member, zero padding allowed, anything else after is an error)."""
    parts = []
    pos = 0
    total = 0
    n = len(mv)
    while True:
        d = zlib.decompressobj(31)
        try:
            parts.append(d.decompress(mv[pos:], MAX_RAW + 1 - total))
        except zlib.error as exc:
            raise BlockFormatError(f"gzip: {_zlib_msg(exc)} (member at byte {pos})", pos) from None
        total += len(parts[-1])
        if d.unconsumed_tail:
            raise BlockFormatError(f"gzip: output larger than {MAX_RAW} bytes", pos)
        if not d.eof:
            raise BlockFormatError(f"gzip: truncated stream ({n} bytes)", n)
        rest = d.unused_data
        if not rest:
            break
        at = n - len(rest)
        if rest[:2] == _GZ_MAGIC:
            pos = at
            continue
        if not any(rest):
            break  # zero padding, as gzip(1) and Python's gzip accept
        raise BlockFormatError(f"gzip: {len(rest)} trailing bytes after the stream at byte {at}", at)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def gunzip(data) -> bytes | bytearray:
    """Inflate a gzip stream with the fastest available inflater, exactly (see module doc)."""
    return gunzip_crc(_mv(data))[0]


def gunzip_crc(mv: memoryview) -> tuple[bytes | bytearray, int | None]:
    """(inflated, its CRC32 when already known from a verified trailer, else None)."""
    n = len(mv)
    if n < 18:
        if n >= 2 and mv[:2] != _GZ_MAGIC:
            raise BlockFormatError(f"gzip: bad magic {bytes(mv[:2]).hex()} at byte 0", 0)
        raise BlockFormatError(f"gzip: truncated stream ({n} bytes)", n)
    if mv[:2] != _GZ_MAGIC:
        raise BlockFormatError(f"gzip: bad magic {bytes(mv[:2]).hex()} at byte 0", 0)
    if _fast_gunzip is not None:
        crc, isize = struct.unpack_from("<II", mv, n - 8)
        # identical concatenated members would pass the trailer check below: exclude them
        if 0 < isize <= MAX_RAW and not (
            n % 2 == 0 and mv[n // 2 : n // 2 + 2] == _GZ_MAGIC and mv[: n // 2] == mv[n // 2 :]
        ):
            try:
                out = _fast_gunzip(mv, isize)
            except Exception:  # noqa: BLE001 - any failure: redo with zlib for the message
                out = None
            if out is not None and len(out) == isize and _fast_crc(out) == crc:
                return out, crc
    return _gunzip_zlib(mv), None


def _gzip(mv: memoryview, level: int) -> bytes:
    if _deflate is not None:
        return bytes(_deflate.gzip_compress(mv, level))

    return gzip.compress(bytes(mv), compresslevel=min(max(level, 1), 9), mtime=0)


def _lz4_unwrap(mv: memoryview) -> bytes:
    n = len(mv)
    if n < 4:
        raise BlockFormatError(f"lz4: truncated size prefix ({n} bytes)", n)
    size = int.from_bytes(mv[:4], "little")
    if size == 0:  # legacy: stored uncompressed after a zero size
        return bytes(mv[4:])
    if size > MAX_RAW:
        raise BlockFormatError(f"lz4: size prefix {size} > {MAX_RAW} at byte 0", 0)
    try:
        return lz4.block.decompress(mv)
    except lz4.block.LZ4BlockError as exc:
        raise BlockFormatError(f"lz4: {exc} (size prefix {size})", 4) from None


def _lz4_wrap(mv: memoryview) -> bytes:
    if len(mv) == 0:
        return b"\0\0\0\0"
    return lz4.block.compress(mv, store_size=True)


#: zstandard (de)compressor objects are not thread safe: one per thread
_TLS = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_TLS, "dctx", None)
    if d is None:
        d = _TLS.dctx = zstandard.ZstdDecompressor()
    return d


def _zstd_unwrap(mv: memoryview) -> bytes:
    n = len(mv)
    try:
        size = zstandard.frame_content_size(mv)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"zstd: {exc}", 0) from None
    if size > MAX_RAW:
        raise BlockFormatError(f"zstd: frame content size {size} > {MAX_RAW} at byte 0", 0)
    d = _dctx().decompressobj()
    try:
        out = d.decompress(mv)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"zstd: {exc}", 0) from None
    if not d.eof:
        raise BlockFormatError(f"zstd: truncated frame ({n} bytes)", n)
    if d.unused_data:
        at = n - len(d.unused_data)
        raise BlockFormatError(f"zstd: {len(d.unused_data)} trailing bytes after the frame at byte {at}", at)
    if len(out) > MAX_RAW:
        raise BlockFormatError(f"zstd: output larger than {MAX_RAW} bytes", 0)
    return out


def _zstd_wrap(mv: memoryview, level: int) -> bytes:
    cache = _TLS.__dict__.setdefault("cctx", {})
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c.compress(mv)


# DVID format byte: (compression << 5) | (checksum << 3)
_COMP_NONE, _COMP_SNAPPY, _COMP_GZIP, _COMP_LZ4, _COMP_JPEG = 0, 1, 2, 4, 5


def _dvid_unwrap(mv: memoryview) -> bytes:
    n = len(mv)
    if n == 0:
        raise BlockFormatError("dvid: empty value (no format byte)", 0)
    fb = mv[0]
    comp, ck = fb >> 5, (fb >> 3) & 3
    if fb & 7 or ck > 1 or comp not in (_COMP_NONE, _COMP_SNAPPY, _COMP_GZIP, _COMP_LZ4):
        raise BlockFormatError(f"dvid: unknown format byte 0x{fb:02x} at byte 0", 0)
    p = 1
    if ck == 1:
        if n < 5:
            raise BlockFormatError(f"dvid: truncated CRC32 ({n} bytes)", n)
        want = int.from_bytes(mv[1:5], "little")
        got = zlib.crc32(mv[5:])
        if want != got:
            raise BlockFormatError(
                f"dvid: CRC32 mismatch: stored 0x{want:08x}, payload has 0x{got:08x} (at byte 1)", 1
            )
        p = 5
    payload = mv[p:]
    try:
        if comp == _COMP_NONE:
            return bytes(payload)
        if comp == _COMP_GZIP:
            out = gunzip(payload)
            return out if isinstance(out, bytes) else bytes(out)
        if comp == _COMP_LZ4:
            return _lz4_unwrap(payload)
        return _snappy(payload)
    except BlockFormatError as exc:
        off = exc.offset + p if exc.offset is not None else None
        raise BlockFormatError(f"dvid 0x{fb:02x}: {exc}", off) from None


def _snappy(mv: memoryview) -> bytes:
    try:
        import snappy
    except ImportError:
        try:
            import cramjam
        except ImportError:
            raise BlockFormatError(
                "snappy: value is snappy-compressed (0x20) but no snappy library is installed", 0
            ) from None
        try:
            return bytes(cramjam.snappy.decompress_raw(bytes(mv)))
        except Exception as exc:  # noqa: BLE001
            raise BlockFormatError(f"snappy: {exc}", 0) from None
    try:
        return snappy.uncompress(bytes(mv))
    except Exception as exc:  # noqa: BLE001
        raise BlockFormatError(f"snappy: {exc}", 0) from None


def crc32(data) -> int:
    """zlib.crc32 with the fastest implementation available (libdeflate's is ~10x zlib's)."""
    return _fast_crc(data)


def unwrap_crc(mv: memoryview, codec: str) -> tuple[bytes | bytearray | memoryview, int | None]:
    """``unwrap`` for the hot path: may return the input memoryview itself (codec none) and
    the CRC32 of the result when a verified gzip trailer already gave it (else None)."""
    mv = _mv(mv)
    if codec == "gzip":
        return gunzip_crc(mv)
    if codec == "none":
        return mv, None
    if codec == "dvid" or codec.startswith("dvid-"):
        if len(mv) > 0 and mv[0] == 0x40:
            try:
                return gunzip_crc(mv[1:])
            except BlockFormatError as exc:
                off = exc.offset + 1 if exc.offset is not None else None
                raise BlockFormatError(f"dvid 0x40: {exc}", off) from None
        return _dvid_unwrap(mv), None
    return unwrap(mv, codec), None


def unwrap(data, codec: str) -> bytes:
    """The raw block inside a stored value. codec: gzip | lz4 | zstd | none | dvid (format
    byte auto-detected; "dvid-*" names are accepted too)."""
    mv = _mv(data)
    if codec == "gzip":
        out = gunzip(mv)
        return out if isinstance(out, bytes) else bytes(out)
    if codec == "lz4":
        return _lz4_unwrap(mv)
    if codec == "zstd":
        return _zstd_unwrap(mv)
    if codec == "none":
        return bytes(mv)
    if codec == "dvid" or codec.startswith("dvid-"):
        return _dvid_unwrap(mv)
    raise ValueError(f"unknown codec {codec!r} (expected one of {', '.join(CODECS)})")


def wrap(data, codec: str, *, level: int | None = None) -> bytes:
    """Store a raw block as DVID would. ``dvid`` = DVID's default (0x40 + standard gzip);
    ``dvid-gzip``, ``dvid-lz4`` (0x80), ``dvid-lz4-crc`` (0x88), ``dvid-none`` (0x00),
    ``dvid-none-crc`` (0x08) pick another stored form. ``level`` is the gzip/zstd level."""
    mv = _mv(data)
    if codec == "gzip":
        return _gzip(mv, 6 if level is None else level)
    if codec == "lz4":
        return _lz4_wrap(mv)
    if codec == "zstd":
        return _zstd_wrap(mv, 3 if level is None else level)
    if codec == "none":
        return bytes(mv)
    if codec in ("dvid", "dvid-gzip"):
        return b"\x40" + _gzip(mv, 6 if level is None else level)
    if codec in ("dvid-lz4", "dvid-lz4-crc", "dvid-none", "dvid-none-crc"):
        payload = _lz4_wrap(mv) if "lz4" in codec else bytes(mv)
        fb = (_COMP_LZ4 if "lz4" in codec else _COMP_NONE) << 5
        if codec.endswith("-crc"):
            return bytes([fb | 8]) + struct.pack("<I", zlib.crc32(payload)) + payload
        return bytes([fb]) + payload
    raise ValueError(
        f"unknown codec {codec!r} (expected gzip, lz4, zstd, none, dvid, dvid-gzip, dvid-lz4, "
        "dvid-lz4-crc, dvid-none, dvid-none-crc)"
    )
