"""Parsing what DVID streams: ``/blocks`` record streams (a numba kernel that finds every
record and checks it against the box), ``/mappings`` in binary or text, stored index values;
every parser raises ``_StreamError`` (retried) on a body that does not parse."""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

from dvidetl.codec import unwrap
from dvidetl.codec._kernels import _u32  # the codec's little-endian reader, one for all
from dvidetl.codec.errors import BlockFormatError
from dvidetl.sources._dvid_transport import DvidHttpError, _StreamError


@numba.njit(cache=True)
def _i32(buf, p):
    v = _u32(buf, p)
    return v - (np.int64(1) << 32) if v >= (np.int64(1) << 31) else v


@numba.njit(cache=True)
def _scan_block_records(buf, box_lo, box_hi, want_gzip):
    """Walk a /blocks record stream: (n, x, y, z, start, length, err_offset, err_code).

    err_code: 0 ok, 1 truncated header, 2 block outside the requested box, 3 zero length,
    4 length runs past the body, 5 payload is not gzip.
    """
    size = buf.shape[0]
    cap = size // 17 + 1
    xs = np.empty(cap, np.int32)
    ys = np.empty(cap, np.int32)
    zs = np.empty(cap, np.int32)
    starts = np.empty(cap, np.int64)
    lens = np.empty(cap, np.int64)
    n = 0
    p = 0
    while p < size:
        if size - p < 16:
            return n, xs, ys, zs, starts, lens, p, 1
        x = _i32(buf, p)
        y = _i32(buf, p + 4)
        z = _i32(buf, p + 8)
        ln = _u32(buf, p + 12)
        if (
            x < box_lo[0]
            or y < box_lo[1]
            or z < box_lo[2]
            or x >= box_hi[0]
            or y >= box_hi[1]
            or z >= box_hi[2]
        ):
            return n, xs, ys, zs, starts, lens, p, 2
        if ln == 0:
            return n, xs, ys, zs, starts, lens, p, 3
        if p + 16 + ln > size:
            return n, xs, ys, zs, starts, lens, p, 4
        if want_gzip and (ln < 2 or buf[p + 16] != 0x1F or buf[p + 17] != 0x8B):
            return n, xs, ys, zs, starts, lens, p, 5
        xs[n] = x
        ys[n] = y
        zs[n] = z
        starts[n] = p + 16
        lens[n] = ln
        n += 1
        p += 16 + ln
    return n, xs, ys, zs, starts, lens, -1, 0


@numba.njit(cache=True)
def _gather(buf, starts, lens, order):
    """Concatenate payloads in ``order``: (data uint8, offsets int32 [n+1])."""
    n = order.shape[0]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for i in range(n):
        offsets[i + 1] = offsets[i] + lens[order[i]]
    out = np.empty(offsets[n], np.uint8)
    for i in range(n):
        k = order[i]
        out[offsets[i] : offsets[i + 1]] = buf[starts[k] : starts[k] + lens[k]]
    return out, offsets


_ERRS = {
    1: "truncated record header (trailing bytes)",
    2: "record header does not parse (block outside the requested box)",
    3: "record with zero length",
    4: "record length runs past the end of the body",
    5: "payload is not gzip",
}


def _merge_parts(parts: list[tuple]) -> tuple:
    """The blocks of one request group's boxes, merged into Morton order (one box: as is)."""
    parts = [p for p in parts if p[3].size]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return _EMPTY_PART
    codes = np.concatenate([p[3] for p in parts])
    order = np.argsort(codes, kind="stable")
    lens = np.concatenate([np.diff(p[5]) for p in parts])
    base = np.cumsum([0] + [int(p[5][-1]) for p in parts[:-1]])
    starts = np.concatenate([p[5][:-1] + b for p, b in zip(parts, base, strict=True)])
    data, offsets = _gather(np.concatenate([p[4] for p in parts]), starts, lens, order)
    xyz = [np.concatenate([p[d] for p in parts])[order] for d in range(3)]
    return xyz[0], xyz[1], xyz[2], codes[order], data, offsets


def _binary_array(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    n = offsets.shape[0] - 1
    if offsets[-1] < 2**31:
        return pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
        )
    return pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    ).cast(pa.binary())


_EMPTY_PART = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
               np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(1, np.int64))


_TEXT_BYTES = b"0123456789 \t\r\n"
_PRINTABLE = np.zeros(256, bool)
_PRINTABLE[0x20:0x7F] = True
_PRINTABLE[[9, 10, 13]] = True


def parse_mappings(body: bytes) -> np.ndarray:
    """(sv, body) pairs of a ``/mappings`` answer, whatever DVID sent: binary uint64 pairs
    (``format=binary``, DVID >= 0.9.0) or ``"sv body"`` text lines (older DVIDs, which ignore
    ``format``). DVID cannot change the status of a streamed 200, so a failure mid-stream
    appends an error text: in binary, a tail that is not whole pairs or a pair made only of
    printable characters (a real id would have to be >= 0x2020202020202020 in both halves);
    in text, anything but digits and whitespace. Either raises ``_StreamError`` (retried)."""
    if not body:
        return np.zeros((0, 2), np.uint64)
    if not body.translate(None, _TEXT_BYTES):  # only digits and whitespace: text lines
        vals = np.fromstring(body, dtype=np.uint64, sep=" ")
        if vals.size % 2:
            raise _StreamError(len(body), "text mapping has an odd number of ids", body)
        return vals.reshape(-1, 2)
    raw = np.frombuffer(body, np.uint8)
    istext = np.zeros(256, bool)
    istext[list(_TEXT_BYTES)] = True
    first_other = int(np.argmin(istext[raw]))
    if body[:1].isdigit() and b"\n" in body[:first_other]:
        # whole text lines, then something else: the error DVID appended
        raise _StreamError(first_other, "text mapping stream carries an appended error", body)
    whole = len(body) - len(body) % 16
    printable = _PRINTABLE[raw[:whole]].reshape(-1, 16).all(axis=1)
    if printable.any():
        i = int(np.argmax(printable)) * 16
        raise _StreamError(i, "mapping stream carries text (an appended DVID error)", body)
    if whole != len(body):
        raise _StreamError(whole, "mapping is not whole uint64 pairs", body)
    return np.frombuffer(body, dtype="<u8").reshape(-1, 2)


def _unwrap_index(v: bytes, url: str, label: int) -> bytes:
    """DVID's stored-value wrapper around a LabelIndex (normally 0x80 + uint32 size + LZ4),
    through the codec's ``dvid`` unwrapper (which also checks a stored CRC32)."""
    if not v:
        return b""

    try:
        return bytes(unwrap(v, "dvid"))
    except BlockFormatError as exc:
        raise DvidHttpError(f"{url}: label {label}: cannot unwrap the stored index ({exc})") from None
