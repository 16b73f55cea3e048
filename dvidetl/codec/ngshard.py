"""neuroglancer precomputed volumes: the ``info``, chunk ids, and sharded chunk storage
(``neuroglancer_uint64_sharded_v1``) as pure functions; the caller does all I/O.

Why here: a precomputed export writes each shard once, whole, from one partition, and
verification reads it back; both need the same exact layout rules (google/neuroglancer
``src/datasource/precomputed/volume.md`` and ``sharded.md``), so they live in one place with
no file or network access of their own (``ShardWriter`` writes to a file object it is given).

Layout facts this module relies on:

* chunk id = the compressed Morton code of the chunk's grid position, the same code
  ``dvidetl.geometry`` plans partitions by (grid = ceil(size / chunk_size) per axis);
* ``hashed = hash(chunk_id >> preshift_bits)``; minishard = its low ``minishard_bits``,
  shard = the next ``shard_bits``. With ``identity`` a shard is an aligned Morton range of
  2^(preshift+minishard) chunks (an aligned box: a natural export partition). With
  ``murmurhash3_x86_128`` (implemented here, checked against tensorstore) a shard's chunks are
  scattered over the volume, so it cannot be one Morton-range partition;
* a shard file = shard index (2^minishard_bits × [start, end) uint64le, relative to the end
  of the index) + chunk data + minishard indices ([3, n] uint64le: chunk ids, offsets,
  sizes, the first two delta-encoded), each index and chunk optionally gzip'ed.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from isal import isal_zlib

from dvidetl.codec.errors import BlockFormatError
from dvidetl.codec.wrapper import gunzip, wrap
from dvidetl.geometry import ScaleInfo, morton_bits, morton_encode, vec3

__all__ = [
    "HASHES",
    "ENCODINGS",
    "Sharding",
    "ShardWriter",
    "ShardFormatError",
    "murmurhash3_x86_128",
    "shard_bytes",
    "read_shard",
    "decode_chunk_data",
    "complete_info",
    "derive_info",
    "sharding_for_grid",
    "scale_grid",
    "chunk_ids",
    "chunk_shapes",
    "chunk_filename",
    "volume_bounds",
]

HASHES = ("identity", "murmurhash3_x86_128")
ENCODINGS = ("raw", "gzip")

#: what ``complete_info`` fills in when a spec leaves it out (neuroglancer's own default for
#: both encodings is "raw"; gzip is what DVID's and TensorStore's exports write, and cseg
#: chunks shrink ~3-4x under it)
DEFAULT_DATA_ENCODING = "gzip"
DEFAULT_MINISHARD_INDEX_ENCODING = "gzip"
DEFAULT_CSEG_BLOCK = (8, 8, 8)
DEFAULT_CHUNK = (64, 64, 64)
#: ``derive_info``'s shard: 2^(9+6) = 32,768 chunks, a 32³-chunk (2048³ voxels at 64³) box,
#: as in the male CNS spec; its index is 1 KiB + 24 bytes a chunk
DEFAULT_PRESHIFT_BITS = 9
DEFAULT_MINISHARD_BITS = 6


class ShardFormatError(ValueError):
    """A sharding spec, info or shard file that does not follow the format; the message says
    what and where."""


# ------------------------------------------------------------------------------ hashing ---

_C1, _C2, _C3 = np.uint32(0x239B961B), np.uint32(0xAB0E9789), np.uint32(0x38B34AE5)


def _rotl32(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _fmix32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def murmurhash3_x86_128(keys) -> np.ndarray:
    """Low 64 bits of MurmurHash3_x86_128 (seed 0) of each key's 8 little-endian bytes, as
    neuroglancer sharding defines the hash (vectorized; uint64 in, uint64 out).

    An 8-byte key is all tail (no 16-byte body block), so only h1/h2 get key material; h3 and
    h4 still enter the finalization, which is why all four lanes are kept."""
    k = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    shape = np.shape(keys)
    with np.errstate(over="ignore"):
        lo = (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hi = (k >> np.uint64(32)).astype(np.uint32)
        h1 = _rotl32(lo * _C1, 15) * _C2  # k1 (bytes 0..3), mixed into h1 = seed 0
        h2 = _rotl32(hi * _C2, 16) * _C3  # k2 (bytes 4..7), mixed into h2 = seed 0
        h3 = np.zeros_like(h1)
        h4 = np.zeros_like(h1)
        n = np.uint32(8)
        h1 ^= n
        h2 ^= n
        h3 ^= n
        h4 ^= n
        h1 += h2
        h1 += h3
        h1 += h4
        h2 += h1
        h3 += h1
        h4 += h1
        h1, h2, h3, h4 = _fmix32(h1), _fmix32(h2), _fmix32(h3), _fmix32(h4)
        h1 += h2
        h1 += h3
        h1 += h4
        h2 += h1
    out = h1.astype(np.uint64) | (h2.astype(np.uint64) << np.uint64(32))
    return out.reshape(shape)


# ----------------------------------------------------------------------------- sharding ---


def _int_field(d: Mapping, name: str, lo: int, hi: int) -> int:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ShardFormatError(f"sharding: {name!r} must be an integer in {lo}..{hi}, got {v!r}")
    return v


@dataclass(frozen=True)
class Sharding:
    """A ``neuroglancer_uint64_sharded_v1`` spec, validated."""

    preshift_bits: int
    minishard_bits: int
    shard_bits: int
    hash: str = "identity"
    minishard_index_encoding: str = "raw"
    data_encoding: str = "raw"

    def __post_init__(self) -> None:
        if self.hash not in HASHES:
            raise ShardFormatError(
                f"sharding: hash {self.hash!r} is not supported (expected one of {', '.join(HASHES)})"
            )
        for name in ("minishard_index_encoding", "data_encoding"):
            if getattr(self, name) not in ENCODINGS:
                raise ShardFormatError(
                    f"sharding: {name} {getattr(self, name)!r} is not supported "
                    f"(expected one of {', '.join(ENCODINGS)})"
                )
        for name in ("preshift_bits", "minishard_bits", "shard_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
                raise ShardFormatError(f"sharding: {name!r} must be an integer in 0..64, got {v!r}")
        if self.minishard_bits + self.shard_bits > 64:
            raise ShardFormatError(
                f"sharding: minishard_bits + shard_bits = {self.minishard_bits + self.shard_bits} > 64"
            )
        if self.minishard_bits > 32:
            raise ShardFormatError(
                f"sharding: minishard_bits {self.minishard_bits} > 32 (a shard index of "
                f"2^{self.minishard_bits} x 16 bytes)"
            )

    @classmethod
    def from_json(cls, d: Mapping) -> Sharding:
        """From an info's ``sharding`` member (absent encodings are "raw", as the format says)."""
        if not isinstance(d, Mapping):
            raise ShardFormatError(f"sharding: expected a JSON object, got {type(d).__name__}")
        if d.get("@type") != "neuroglancer_uint64_sharded_v1":
            raise ShardFormatError(
                f"sharding: '@type' must be 'neuroglancer_uint64_sharded_v1', got {d.get('@type')!r}"
            )
        return cls(
            preshift_bits=_int_field(d, "preshift_bits", 0, 64),
            minishard_bits=_int_field(d, "minishard_bits", 0, 32),
            shard_bits=_int_field(d, "shard_bits", 0, 64),
            hash=d["hash"] if "hash" in d else _missing("hash"),
            minishard_index_encoding=d.get("minishard_index_encoding", "raw"),
            data_encoding=d.get("data_encoding", "raw"),
        )

    def to_json(self) -> dict:
        return {
            "@type": "neuroglancer_uint64_sharded_v1",
            "preshift_bits": self.preshift_bits,
            "hash": self.hash,
            "minishard_bits": self.minishard_bits,
            "shard_bits": self.shard_bits,
            "minishard_index_encoding": self.minishard_index_encoding,
            "data_encoding": self.data_encoding,
        }

    @property
    def index_size(self) -> int:
        """Bytes of the shard index at the start of every shard file."""
        return 16 << self.minishard_bits

    def hashed(self, ids) -> np.ndarray:
        pre = np.asarray(ids, dtype=np.uint64) >> np.uint64(self.preshift_bits)
        return pre if self.hash == "identity" else murmurhash3_x86_128(pre)

    def minishard_of(self, ids) -> np.ndarray:
        return self.hashed(ids) & np.uint64((1 << self.minishard_bits) - 1)

    def shard_of(self, ids) -> np.ndarray:
        mask = np.uint64((1 << self.shard_bits) - 1)
        return (self.hashed(ids) >> np.uint64(self.minishard_bits)) & mask

    def shard_filename(self, shard: int) -> str:
        """``<shard>.shard``: lowercase hex, zero-padded to ceil(shard_bits / 4) digits."""
        return f"{int(shard):0{math.ceil(self.shard_bits / 4)}x}.shard"

    def shard_ranges(self, shard: int, grid: Sequence[int]) -> list[tuple[int, int]]:
        """The Morton ranges [lo, hi) of the chunk ids of ``shard`` in a chunk grid (identity
        hash only): one range when preshift + minishard + shard bits cover the grid's code;
        several when fewer bits alias far chunks onto the same shard."""
        if self.hash != "identity":
            raise ShardFormatError(
                f"sharding: with hash {self.hash!r} a shard's chunks are scattered over the "
                "volume, not a Morton range; use hash 'identity' for shard-aligned partitions"
            )
        if not 0 <= shard < (1 << self.shard_bits):
            raise ShardFormatError(f"sharding: shard {shard} outside 0..{(1 << self.shard_bits) - 1}")
        low = self.preshift_bits + self.minishard_bits
        step = 1 << (low + self.shard_bits)
        end = 1 << morton_bits(vec3(grid))
        out = []
        base = 0
        while base < end:
            lo = base + (shard << low)
            if lo < end:
                out.append((lo, min(lo + (1 << low), end)))
            base += step
        return out


def _missing(name: str):
    raise ShardFormatError(f"sharding: {name!r} is required")


# ------------------------------------------------------------------------ shard writing ---


#: gzip of a shard's chunks (``data_encoding`` gzip): ISA-L (``isal``) at level 1. (The
#: minishard indices, 24 bytes a chunk, stay libdeflate level 6: their time is nothing, and
#: ISA-L's level buffer, ~270 KB a call, would be most of a small shard writer's memory.) Measured on the bench volume's cseg chunks (24.5 KB each; ``python -m bench
#: precomputed`` prints the sweep), per chunk: isal 1 92 us, 6.44 KB; libdeflate 1 187 us,
#: 6.05 KB; libdeflate 6 416 us, 5.48 KB (libdeflate 2-5: 5.5-5.8 KB at 1.3-2x level 1's
#: time; isal 0: 59 us but 7.54 KB, isal 3: slower and larger than 1). The gzip of every
#: chunk is the largest cost of a precomputed partition after the transform, so the chunks
#: are ~17% larger than at libdeflate 6 for ~4.5x less time (the volume is still ~0.65 of the
#: same blocks in Parquet). Any level is plain gzip to every reader (TensorStore,
#: cloud-volume, neuroglancer).
GZIP_LEVEL = 1


def _gzip(data) -> bytes:
    """A chunk's gzip ``data_encoding``."""
    return isal_zlib.compress(data, GZIP_LEVEL, wbits=31)  # wbits 31: a gzip stream


class ShardWriter:
    """Stream one shard file into a seekable binary file object, in memory bounded by the
    index (24 bytes a chunk), never by the data.

    The shard index comes first in the file but depends on where the minishard indices land
    after the data, so its 2^minishard_bits × 16 bytes are reserved with zeros, chunk data is
    written as it arrives, the minishard indices follow, and ``finish`` seeks back to fill the
    index (for a non-seekable target write to a temporary file and rename, which an
    exactly-once sink does anyway). Nothing of the file is valid before ``finish``.

    Chunks must arrive in increasing chunk-id (Morton) order unless ``any_order``: then every
    minishard index is sorted by id and its offsets have non-negative deltas — the canonical
    form every reader handles. With ``any_order=True`` entries are still sorted by id, but an
    offset delta may be negative (stored as two's complement, decoded by the wrapping 64-bit
    adds of tensorstore, cloud-volume and neuroglancer). A chunk id may occur only once;
    with ``shard`` given every chunk must belong to that shard.
    """

    def __init__(self, f, sharding: Sharding, *, shard: int | None = None, any_order: bool = False):
        if not (hasattr(f, "seekable") and f.seekable()):
            raise ValueError(
                "ShardWriter needs a seekable file: the shard index precedes the data "
                "(write to a temporary file, then rename)"
            )
        self._f = f
        self.sharding = sharding
        self.shard = shard
        self.any_order = any_order
        self._start = f.tell()
        self._pos = 0  # bytes written after the shard index
        self._ids = np.empty(1024, np.uint64)
        self._offs = np.empty(1024, np.uint64)
        self._sizes = np.empty(1024, np.uint64)
        self._n = 0
        self._last: int | None = None
        self._done = False
        f.write(bytes(sharding.index_size))

    @property
    def n_chunks(self) -> int:
        return self._n

    def _reserve(self, k: int) -> None:
        need = self._n + k
        if need > self._ids.shape[0]:
            cap = max(need, 2 * self._ids.shape[0])
            self._ids = np.resize(self._ids, cap)
            self._offs = np.resize(self._offs, cap)
            self._sizes = np.resize(self._sizes, cap)

    def _check_ids(self, ids: np.ndarray) -> None:
        if self._done:
            raise ValueError("ShardWriter: finish() was already called")
        if ids.size == 0:
            return
        if self.shard is not None:
            sh = self.sharding.shard_of(ids)
            bad = np.flatnonzero(sh != np.uint64(self.shard))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"ShardWriter: chunk {int(ids[i])} belongs to shard {int(sh[i])}, "
                    f"not {self.shard}"
                )
        if not self.any_order:
            inc = ids[1:] > ids[:-1]
            first_ok = self._last is None or int(ids[0]) > self._last
            if not (first_ok and inc.all()):
                i = 0 if not first_ok else int(np.flatnonzero(~inc)[0]) + 1
                before = self._last if i == 0 else int(ids[i - 1])
                raise ValueError(
                    f"ShardWriter: chunk {int(ids[i])} after chunk {before}: chunks must "
                    "arrive in increasing chunk-id (Morton) order, each once "
                    "(or pass any_order=True)"
                )

    def add(self, chunk_id: int, payload) -> None:
        """Write one chunk (its encoded bytes before ``data_encoding``)."""
        self.add_many(np.array([chunk_id], np.uint64), [payload])

    def add_many(self, ids, payloads, offsets=None) -> None:
        """Write a batch: ``payloads`` is a sequence of bytes-likes, or one contiguous buffer
        with ``offsets`` (R + 1; row r = payloads[offsets[r]:offsets[r+1]], e.g.
        ``CsegChunks.data``/``.offsets``). With raw data encoding and contiguous rows the
        batch is one write."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.uint64))
        self._check_ids(ids)
        n = ids.shape[0]
        if offsets is None:
            parts: list[memoryview | bytes] = [memoryview(p).cast("B") for p in payloads]
            if len(parts) != n:
                raise ValueError(f"ShardWriter: {len(parts)} payloads for {n} chunk ids")
        else:
            offsets = np.asarray(offsets, dtype=np.int64)
            if offsets.shape != (n + 1,):
                raise ValueError(f"ShardWriter: offsets must have {n + 1} entries, got {offsets.shape}")
            buf = memoryview(payloads).cast("B")
            contiguous = n == 0 or bool((offsets[1:] >= offsets[:-1]).all())
            if self.sharding.data_encoding == "raw" and contiguous:
                sizes = np.diff(offsets)
                self._record(ids, sizes)
                self._f.write(buf[int(offsets[0]) : int(offsets[-1])] if n else b"")
                return
            ol = offsets.tolist()
            parts = [buf[ol[r] : ol[r + 1]] for r in range(n)]
        if self.sharding.data_encoding == "gzip":
            parts = [_gzip(p) for p in parts]
        self._record(ids, np.array([len(p) for p in parts], np.int64))
        for p in parts:
            self._f.write(p)

    def _record(self, ids: np.ndarray, sizes: np.ndarray) -> None:
        n = ids.shape[0]
        if n == 0:
            return
        self._reserve(n)
        starts = self._pos + np.concatenate(([0], np.cumsum(sizes[:-1])))
        k = self._n
        self._ids[k : k + n] = ids
        self._offs[k : k + n] = starts.astype(np.uint64)
        self._sizes[k : k + n] = sizes.astype(np.uint64)
        self._n += n
        self._pos += int(sizes.sum())
        self._last = int(ids[-1])  # checked against only when chunks come in order

    def finish(self) -> int:
        """Write the minishard indices and the shard index; returns the shard file's size.
        Refuses a chunk id that occurs twice (readers reject such shards)."""
        if self._done:
            raise ValueError("ShardWriter: finish() was already called")
        self._done = True
        sh = self.sharding
        n = self._n
        ids, offs, sizes = self._ids[:n], self._offs[:n], self._sizes[:n]
        ms = sh.minishard_of(ids)
        order = np.lexsort((ids, ms))
        ids, offs, sizes, ms = ids[order], offs[order], sizes[order], ms[order]
        if n > 1:
            dup = np.flatnonzero(ids[1:] == ids[:-1])  # sorted by (minishard, id): adjacent
            if dup.size:
                raise ValueError(f"ShardWriter: chunk {int(ids[dup[0]])} was written twice")
        index = np.zeros((1 << sh.minishard_bits, 2), np.uint64)
        bounds = np.searchsorted(ms, np.arange((1 << sh.minishard_bits) + 1, dtype=np.uint64))
        with np.errstate(over="ignore"):
            for m in np.flatnonzero(np.diff(bounds)).tolist():
                a, b = int(bounds[m]), int(bounds[m + 1])
                i, o, s = ids[a:b], offs[a:b], sizes[a:b]
                table = np.empty((3, b - a), np.uint64)
                table[0, 0] = i[0]
                table[0, 1:] = i[1:] - i[:-1]
                table[1, 0] = o[0]
                table[1, 1:] = o[1:] - (o[:-1] + s[:-1])  # wraps when data came out of order
                table[2] = s
                raw = table.astype("<u8").tobytes()
                enc = wrap(raw, "gzip") if sh.minishard_index_encoding == "gzip" else raw
                index[m] = (self._pos, self._pos + len(enc))
                self._f.write(enc)
                self._pos += len(enc)
        end = self._f.tell()
        self._f.seek(self._start)
        self._f.write(index.astype("<u8").tobytes())
        self._f.seek(end)
        return sh.index_size + self._pos


def shard_bytes(ids, payloads, sharding: Sharding) -> bytes:
    """A whole shard file in memory from chunk ids and their encoded payloads (any order:
    they are written sorted by id, the canonical form)."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1)
    payloads = list(payloads)
    if len(payloads) != ids.shape[0]:
        raise ValueError(f"shard_bytes: {len(payloads)} payloads for {ids.shape[0]} chunk ids")
    order = np.argsort(ids, kind="stable")
    bio = io.BytesIO()
    w = ShardWriter(bio, sharding)
    w.add_many(ids[order], [payloads[i] for i in order.tolist()])
    w.finish()
    return bio.getvalue()


# ------------------------------------------------------------------------ shard reading ---


def _range(data_len: int, lo: int, hi: int, what: str) -> tuple[int, int]:
    if not 0 <= lo <= hi <= data_len:
        raise ShardFormatError(f"shard: {what} byte range [{lo}, {hi}) outside the file ({data_len} bytes)")
    return lo, hi


def _decode(data, encoding: str, what: str) -> bytes:
    if encoding == "raw":
        return bytes(data)
    try:
        return bytes(gunzip(data))
    except BlockFormatError as exc:
        raise ShardFormatError(f"shard: {what}: {exc}") from None


def read_shard(data, sharding: Sharding, *, decode: bool = True) -> dict[int, bytes]:
    """Every chunk of a shard file: {chunk id: payload after data decoding}. Checks what a
    reader relies on (index and chunk ranges inside the file, whole minishard entries, each
    id once, each chunk in the minishard its id hashes to) and raises ``ShardFormatError``
    saying what is wrong — the verifier's view of a shard, and the tests' tamper oracle.
    ``decode=False``: the chunks as stored (before ``data_encoding`` is undone, see
    ``decode_chunk_data``), so a damaged chunk can be told apart from a damaged shard."""
    mv = memoryview(data).cast("B")
    size = len(mv)
    isz = sharding.index_size
    if size < isz:
        raise ShardFormatError(f"shard: {size} bytes, shorter than its {isz}-byte shard index")
    index = np.frombuffer(mv[:isz], "<u8").reshape(-1, 2)
    out: dict[int, bytes] = {}
    for m in range(index.shape[0]):
        lo, hi = int(index[m, 0]), int(index[m, 1])
        if lo == hi:
            continue
        a, b = _range(size, isz + lo, isz + hi, f"minishard {m} index")
        raw = _decode(mv[a:b], sharding.minishard_index_encoding, f"minishard {m} index")
        if len(raw) % 24:
            raise ShardFormatError(f"shard: minishard {m} index is {len(raw)} bytes, not a multiple of 24")
        t = np.frombuffer(raw, "<u8").reshape(3, -1)
        with np.errstate(over="ignore"):
            ids = np.cumsum(t[0], dtype=np.uint64)
            ends = np.cumsum(t[1] + t[2], dtype=np.uint64)
        starts = ends - t[2]
        wrong = np.flatnonzero(sharding.minishard_of(ids) != np.uint64(m))
        if wrong.size:
            raise ShardFormatError(
                f"shard: chunk {int(ids[wrong[0]])} is listed in minishard {m}, but hashes to "
                f"minishard {int(sharding.minishard_of(ids[wrong[0]]))}"
            )
        for cid, s, e in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
            if cid in out:
                raise ShardFormatError(f"shard: chunk {cid} occurs more than once")
            c0, c1 = _range(size, isz + s, isz + e, f"chunk {cid}")
            out[cid] = (_decode(mv[c0:c1], sharding.data_encoding, f"chunk {cid}") if decode
                        else bytes(mv[c0:c1]))
    return out


def decode_chunk_data(data, sharding: Sharding, chunk_id: int = -1) -> bytes:
    """One chunk as ``read_shard(decode=False)`` gives it, its ``data_encoding`` undone;
    ``ShardFormatError`` when it cannot be (a damaged gzip member)."""
    return _decode(data, sharding.data_encoding, f"chunk {chunk_id}")


# ------------------------------------------------------------------------- volume / info ---


def _vec3(v, what: str, *, positive: bool = False, number: bool = False) -> list:
    ok = isinstance(v, (list, tuple)) and len(v) == 3
    if ok:
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float) if number else int):
                ok = False
            elif positive and not x > 0:
                ok = False
    if not ok:
        kind = "positive " if positive else ""
        raise ShardFormatError(f"info: {what} must be 3 {kind}{'numbers' if number else 'integers'}, got {v!r}")
    return list(v)


def scale_grid(scale: Mapping) -> tuple[int, int, int]:
    """Chunks per axis of a (completed) info scale: ceil(size / chunk_size)."""
    size = scale["size"]
    chunk = scale["chunk_sizes"][0]
    return tuple(-(-int(s) // int(c)) for s, c in zip(size, chunk, strict=True))  # type: ignore[return-value]


def volume_bounds(info: Mapping) -> tuple[list[int], list[int], list[float]]:
    """``(voxel_offset, size, resolution)`` of an ``info``'s first (finest) scale, checked:
    what a viewer needs to place any precomputed volume (not only one this exporter writes;
    the reader checks the rest). A malformed info is a ``ShardFormatError`` naming the field."""
    if not isinstance(info, Mapping):
        raise ShardFormatError(f"info: expected a JSON object, got {type(info).__name__}")
    if info.get("@type", "neuroglancer_multiscale_volume") != "neuroglancer_multiscale_volume":
        raise ShardFormatError(f"info: '@type' must be 'neuroglancer_multiscale_volume', got {info['@type']!r}")
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales or not isinstance(scales[0], Mapping):
        raise ShardFormatError("info: 'scales' must be a non-empty list of JSON objects")
    sc = scales[0]
    return (
        _vec3(sc.get("voxel_offset", [0, 0, 0]), "scales[0].voxel_offset"),
        _vec3(sc.get("size"), "scales[0].size", positive=True),
        _vec3(sc.get("resolution"), "scales[0].resolution", positive=True, number=True),
    )


def chunk_ids(x, y, z, scale: Mapping) -> np.ndarray:
    """Chunk ids (compressed Morton codes, uint64) of chunk grid positions of a scale. A DVID
    block's coordinates are its chunk's position when ``voxel_offset`` is 0 (else subtract
    voxel_offset // chunk_size, which ``complete_info`` requires to be exact)."""
    return morton_encode(x, y, z, scale_grid(scale))


def chunk_shapes(x, y, z, scale: Mapping) -> np.ndarray:
    """In-volume extent (x, y, z voxels; int64 (R, 3)) of each chunk: the chunk size, clipped
    at the volume's upper bound — the shape ``cseg.encode_chunks`` must encode. A chunk
    outside the volume gets an extent <= 0 on some axis (the encoder refuses it)."""
    size = np.asarray(scale["size"], np.int64)
    chunk = np.asarray(scale["chunk_sizes"][0], np.int64)
    pos = np.stack([np.atleast_1d(np.asarray(c, np.int64)) for c in (x, y, z)], axis=-1)
    return np.minimum(chunk, size - pos * chunk)


def chunk_filename(x: int, y: int, z: int, scale: Mapping) -> str:
    """The file name of a chunk of an unsharded scale: ``x0-x1_y0-y1_z0-z1`` in voxels,
    offset by ``voxel_offset`` and clipped at the volume's upper bound."""
    off = scale.get("voxel_offset", [0, 0, 0])
    parts = []
    for p, c, o, s in zip((x, y, z), scale["chunk_sizes"][0], off, scale["size"], strict=True):
        lo = int(o) + int(p) * int(c)
        parts.append(f"{lo}-{min(lo + int(c), int(o) + int(s))}")
    return "_".join(parts)


def complete_info(spec: Mapping) -> dict:
    """A valid precomputed segmentation ``info`` from a neuroglancer volume spec such as the
    male CNS one DVID's export-shards takes (which lacks ``compressed_segmentation_block_size``
    and ``data_encoding``, so TensorStore refuses it as is).

    Filled in when absent: ``@type``, ``type`` segmentation, ``data_type`` uint64,
    ``num_channels`` 1; per scale ``encoding`` compressed_segmentation,
    ``compressed_segmentation_block_size`` [8, 8, 8], ``voxel_offset`` [0, 0, 0],
    ``chunk_sizes`` [[64, 64, 64]], and in ``sharding`` ``data_encoding`` and
    ``minishard_index_encoding`` gzip (``DEFAULT_*``). Everything given is kept; what this
    exporter cannot write (another data type, encoding or cseg block size, several chunk
    sizes, a ``voxel_offset`` not on the chunk grid) is refused with a ``ShardFormatError``
    that says which scale and field. Unknown members (e.g. DVID's ``batch_size``) are dropped:
    they are not part of the format."""
    if not isinstance(spec, Mapping):
        raise ShardFormatError(f"info: expected a JSON object, got {type(spec).__name__}")
    spec = copy.deepcopy(dict(spec))
    top = {
        "@type": "neuroglancer_multiscale_volume",
        "type": spec.get("type", "segmentation"),
        "data_type": spec.get("data_type", "uint64"),
        "num_channels": spec.get("num_channels", 1),
    }
    for k in ("mesh", "skeletons", "segment_properties"):  # format members we keep
        if k in spec:
            top[k] = spec[k]
    if spec.get("@type", top["@type"]) != top["@type"]:
        raise ShardFormatError(f"info: '@type' must be 'neuroglancer_multiscale_volume', got {spec['@type']!r}")
    for k, want in (("type", "segmentation"), ("data_type", "uint64"), ("num_channels", 1)):
        if top[k] != want:
            raise ShardFormatError(f"info: {k} must be {want!r} for a DVID labelmap export, got {top[k]!r}")
    scales = spec.get("scales")
    if not isinstance(scales, list) or not scales:
        raise ShardFormatError("info: 'scales' must be a non-empty list")
    out_scales = []
    keys = set()
    for i, sc in enumerate(scales):
        if not isinstance(sc, Mapping):
            raise ShardFormatError(f"info: scales[{i}] must be a JSON object")
        where = f"scales[{i}]"
        res = _vec3(sc.get("resolution"), f"{where}.resolution", positive=True, number=True)
        size = _vec3(sc.get("size"), f"{where}.size", positive=True)
        key = sc.get("key", "x".join(f"{r:g}" for r in res))
        if not isinstance(key, str) or not key or key in keys:
            raise ShardFormatError(f"info: {where}.key must be a unique non-empty string, got {key!r}")
        keys.add(key)
        chunks = sc.get("chunk_sizes", [list(DEFAULT_CHUNK)])
        if not isinstance(chunks, list) or len(chunks) != 1:
            raise ShardFormatError(f"info: {where}.chunk_sizes must hold exactly one chunk size, got {chunks!r}")
        chunk = _vec3(chunks[0], f"{where}.chunk_sizes[0]", positive=True)
        if any(c % 8 for c in chunk):
            raise ShardFormatError(f"info: {where}.chunk_sizes[0] {chunk} must be multiples of 8 (DVID sub-blocks)")
        enc = sc.get("encoding", "compressed_segmentation")
        if enc != "compressed_segmentation":
            raise ShardFormatError(f"info: {where}.encoding must be 'compressed_segmentation', got {enc!r}")
        cbs = _vec3(
            sc.get("compressed_segmentation_block_size", list(DEFAULT_CSEG_BLOCK)),
            f"{where}.compressed_segmentation_block_size", positive=True,
        )
        if cbs != list(DEFAULT_CSEG_BLOCK):
            raise ShardFormatError(
                f"info: {where}.compressed_segmentation_block_size must be [8, 8, 8] "
                f"(DVID's sub-block, what blocks transcode to), got {cbs}"
            )
        off = _vec3(sc.get("voxel_offset", [0, 0, 0]), f"{where}.voxel_offset")
        if any(o % c for o, c in zip(off, chunk, strict=True)):
            raise ShardFormatError(f"info: {where}.voxel_offset {off} must be a multiple of the chunk size {chunk}")
        out: dict[str, Any] = {
            "key": key,
            "size": size,
            "resolution": res,
            "voxel_offset": off,
            "chunk_sizes": [chunk],
            "encoding": "compressed_segmentation",
            "compressed_segmentation_block_size": cbs,
        }
        if "sharding" in sc:
            shd = dict(sc["sharding"]) if isinstance(sc["sharding"], Mapping) else sc["sharding"]
            if isinstance(shd, dict):
                shd.setdefault("data_encoding", DEFAULT_DATA_ENCODING)
                shd.setdefault("minishard_index_encoding", DEFAULT_MINISHARD_INDEX_ENCODING)
            try:
                out["sharding"] = Sharding.from_json(shd).to_json()
            except ShardFormatError as exc:
                raise ShardFormatError(f"info: {where}.{exc}") from None
        out_scales.append(out)
    top["scales"] = out_scales
    return top


def sharding_for_grid(
    grid: Sequence[int],
    *,
    preshift_bits: int = DEFAULT_PRESHIFT_BITS,
    minishard_bits: int = DEFAULT_MINISHARD_BITS,
    hash: str = "identity",
    data_encoding: str = DEFAULT_DATA_ENCODING,
    minishard_index_encoding: str = DEFAULT_MINISHARD_INDEX_ENCODING,
) -> Sharding:
    """Sharding for a chunk grid whose shard is one aligned box of up to
    2^(preshift+minishard) chunks and whose bits cover the grid's Morton code exactly: a
    small scale gets fewer preshift, then minishard bits, and one shard (this reproduces the
    male CNS spec's sharding at every one of its 12 scales)."""
    total = morton_bits(vec3(grid))
    pre = min(preshift_bits, total)
    mini = min(minishard_bits, total - pre)
    return Sharding(
        preshift_bits=pre,
        minishard_bits=mini,
        shard_bits=total - pre - mini,
        hash=hash,
        minishard_index_encoding=minishard_index_encoding,
        data_encoding=data_encoding,
    )


def derive_info(
    scales: Iterable[ScaleInfo],
    resolution: Sequence[float],
    **sharding: object,
) -> dict:
    """A complete sharded precomputed ``info`` for a volume's scales (``VolumeInfo.scales``):
    chunk size = the DVID block size (so blocks transcode), size = the scale's voxel extent
    (``voxel_max``, else the whole block grid), voxel_offset 0 (DVID block coordinates are
    chunk positions), resolution ``resolution`` × 2^scale, key "RxRxR", and per scale
    ``sharding_for_grid(grid, **sharding)``."""
    res0 = _vec3(list(resolution), "resolution", positive=True, number=True)
    out = []
    for sc in sorted(scales, key=lambda s: s.scale):
        chunk = [int(b) for b in sc.block_size]
        size = [int(v) for v in sc.voxel_max] if any(sc.voxel_max) else [
            int(g) * c for g, c in zip(sc.grid, chunk, strict=True)
        ]
        res = [r * (1 << sc.scale) for r in res0]
        grid = [-(-s // c) for s, c in zip(size, chunk, strict=True)]
        out.append(
            {
                "key": "x".join(f"{r:g}" for r in res),
                "size": size,
                "resolution": res,
                "voxel_offset": [0, 0, 0],
                "chunk_sizes": [chunk],
                "encoding": "compressed_segmentation",
                "compressed_segmentation_block_size": list(DEFAULT_CSEG_BLOCK),
                "sharding": sharding_for_grid(grid, **sharding).to_json(),  # type: ignore[arg-type]
            }
        )
    if not out:
        raise ShardFormatError("info: a volume without scales")
    return complete_info({"scales": out})
