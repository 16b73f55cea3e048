"""Reading DVID ``export-shards`` files as DVID writes them, without loading them.

What DVID's exporter (``datatype/labelmap/export.go`` at 3400c2cb, checked against runs of
the real server) leaves in a shard directory, and so what this module expects:

* a shard writer opens ``s<scale>/<x>_<y>_<z>.arrow`` with ``O_APPEND`` and writes one Arrow
  IPC *stream* through a byte counter that starts at 0. A rerun into the same directory
  therefore appends a whole second stream (schema, record batches, end marker) to the first:
  the **last stream is the current export**, the others are superseded copies;
* Go writes each record batch first, *then* buffers its sidecar row
  (``x,y,z,offset,size,batch_idx``; offsets count from the start of the writer's own stream)
  in a 1 MiB buffer that is flushed when the shard is finished. The sidecar is opened with
  ``O_TRUNC``, so a rerun replaces it (its offsets then point into the appended stream), and
  an export killed mid-shard leaves it empty, or cut at a 1 MiB boundary;
* the schema message goes out lazily with the first batch, so the sidecar says
  ``# schema_size=0`` and the first row's byte range holds the schema *and* the batch;
* a stream's end-of-stream marker is written when its shard is finished: a killed export
  leaves a stream without it, possibly ending inside a message;
* ``export.log`` is written once, when the whole export has finished, with the number of
  shard files and chunks written per scale.

So the stream is the truth and the sidecar an index to check it against: :func:`walk` finds
every message of a file with a numba kernel that reads only message headers (bodies stay
unmapped), :func:`scan_file` splits the messages into streams and reads the current stream's
block coordinates, and :func:`match_sidecar` says which sidecar rows point at their block's
record. Whatever is not as DVID would have written it is described, never refused: the
source decides what to export and reports the rest (``sources.shards``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

from dvidetl.codec._kernels import _le8, _u16, _u32
from dvidetl.errors import UserError
from dvidetl.geometry import ScaleInfo

BLOCK = 64
_REQUIRED_FIELDS = (
    "chunk_x",
    "chunk_y",
    "chunk_z",
    "supervoxels",
    "labels",
    "dvid_compressed_block",
)
_ARROW_FILE_MAGIC = b"ARROW1"

# ---------------------------------------------------------------------------------------------
# the message walker (numba): Arrow IPC framing and the few flatbuffer fields it needs
# ---------------------------------------------------------------------------------------------

#: columns of the walker's message table
M_OFF, M_BODY, M_BLEN, M_TYPE, M_ROWS, M_BVEC, M_BCNT, M_NVEC, M_NCNT, M_COMP = range(10)
M_COLS = 10
#: message types (the flatbuffer MessageHeader union), and the end-of-stream marker
T_EOS, T_SCHEMA, T_DICT, T_BATCH = -1, 1, 2, 3
#: why the walk stopped
W_END, W_CUT, W_BAD, W_FILE_END = 0, 1, 2, 3
#: a message's metadata is at most this long (a header, not data)
_MAX_META = 1 << 28


@nb.njit(cache=True, inline="always")
def _i32(buf, p):
    v = _u32(buf, p)
    return v - (1 << 32) if v >= (1 << 31) else v


@nb.njit(cache=True, inline="always")
def _i64(buf, p):
    return np.int64(_le8(buf, p))


@nb.njit(cache=True, inline="always")
def _vtable(buf, t, lo, hi):
    """(vtable position, vtable size) of the flatbuffer table at ``t`` inside [lo, hi), or
    (-1, 0) when it does not fit."""
    if t < lo or t + 4 > hi:
        return -1, 0
    vt = t - _i32(buf, t)
    if vt < lo or vt + 4 > hi:
        return -1, 0
    size = _u16(buf, vt)
    if size < 4 or vt + size > hi:
        return -1, 0
    return vt, size


@nb.njit(cache=True, inline="always")
def _table(buf, p, lo, hi):
    """The flatbuffer table an offset at ``p`` refers to: (table, vtable, vtable size);
    vtable -1 when it does not fit in [lo, hi)."""
    t = p + _u32(buf, p)
    vt, size = _vtable(buf, t, lo, hi)
    return t, vt, size


@nb.njit(cache=True, inline="always")
def _field(buf, t, vt, vsize, i, width, hi):
    """Position of field ``i`` of a table (-1 absent, -2 out of bounds)."""
    o = 4 + 2 * i
    if o + 2 > vsize:
        return -1
    fo = _u16(buf, vt + o)
    if fo == 0:
        return -1
    p = t + fo
    if p + width > hi:
        return -2
    return p


@nb.njit(cache=True, inline="always")
def _vector(buf, p, elem, lo, hi):
    """(position of the first element, count) of the vector referenced at ``p``; (-2, 0)
    when it does not fit."""
    v = p + _u32(buf, p)
    if v < lo or v + 4 > hi:
        return -2, 0
    n = _u32(buf, v)
    if v + 4 + n * elem > hi:
        return -2, 0
    return v + 4, n


@nb.njit(cache=True, nogil=True)
def walk(buf, start, stop_at_eos):
    """Every message of an Arrow IPC stream (or of an IPC file's message section, from byte
    8 with ``stop_at_eos``) in ``buf``, by their headers alone.

    Returns ``(msgs, reason, pos)``: one ``M_*`` row per message (an end-of-stream marker is a
    ``T_EOS`` row; a record batch whose body runs past the end of ``buf`` is the last row), why
    the walk stopped (``W_END`` at the end of the buffer, ``W_CUT`` inside a message, ``W_BAD``
    at bytes that are no message, ``W_FILE_END`` at an IPC file's end marker) and where."""
    n = buf.shape[0]
    cap = 256
    msgs = np.zeros((cap, M_COLS), np.int64)
    k = 0
    pos = start
    reason = W_END
    while True:
        if pos == n:
            reason = W_END
            break
        if k == cap:
            cap *= 2
            grown = np.zeros((cap, M_COLS), np.int64)
            grown[:k] = msgs[:k]
            msgs = grown
        if pos + 4 > n:
            reason = W_CUT
            break
        pre = 8
        if _u32(buf, pos) == 0xFFFFFFFF:
            if pos + 8 > n:
                reason = W_CUT
                break
            meta = _i32(buf, pos + 4)
        else:  # the framing before Arrow 0.15: no continuation marker
            pre = 4
            meta = _i32(buf, pos)
        if meta == 0:  # end-of-stream marker (a rerun may append another stream after it)
            msgs[k, M_OFF] = pos
            msgs[k, M_BODY] = pos + pre
            msgs[k, M_TYPE] = T_EOS
            msgs[k, M_BVEC] = -1
            msgs[k, M_NVEC] = -1
            k += 1
            pos += pre
            if stop_at_eos:
                reason = W_FILE_END
                break
            continue
        if meta < 8 or meta > _MAX_META:
            reason = W_BAD
            break
        m = pos + pre
        mend = m + meta
        if mend > n:
            reason = W_CUT
            break
        root, vt, vsize = _table(buf, m, m, mend)
        if vt < 0:
            reason = W_BAD
            break
        p_type = _field(buf, root, vt, vsize, 1, 1, mend)
        p_head = _field(buf, root, vt, vsize, 2, 4, mend)
        p_blen = _field(buf, root, vt, vsize, 3, 8, mend)
        if p_type == -2 or p_head == -2 or p_blen == -2 or p_type < 0:
            reason = W_BAD
            break
        htype = np.int64(buf[p_type])
        blen = _i64(buf, p_blen) if p_blen >= 0 else np.int64(0)
        if blen < 0 or htype < 1 or htype > 5:
            reason = W_BAD
            break
        msgs[k, M_OFF] = pos
        msgs[k, M_BODY] = mend
        msgs[k, M_BLEN] = blen
        msgs[k, M_TYPE] = htype
        msgs[k, M_BVEC] = -1
        msgs[k, M_NVEC] = -1
        if htype == T_BATCH:
            if p_head < 0:
                reason = W_BAD
                break
            h, hvt, hvsize = _table(buf, p_head, m, mend)
            if hvt < 0:
                reason = W_BAD
                break
            p_len = _field(buf, h, hvt, hvsize, 0, 8, mend)
            p_nodes = _field(buf, h, hvt, hvsize, 1, 4, mend)
            p_bufs = _field(buf, h, hvt, hvsize, 2, 4, mend)
            p_comp = _field(buf, h, hvt, hvsize, 3, 4, mend)
            if p_len == -2 or p_nodes == -2 or p_bufs == -2 or p_comp == -2:
                reason = W_BAD
                break
            rows = _i64(buf, p_len) if p_len >= 0 else np.int64(0)
            if rows < 0:
                reason = W_BAD
                break
            msgs[k, M_ROWS] = rows
            if p_nodes >= 0:
                v, c = _vector(buf, p_nodes, 16, m, mend)
                if v < 0:
                    reason = W_BAD
                    break
                msgs[k, M_NVEC] = v
                msgs[k, M_NCNT] = c
            if p_bufs >= 0:
                v, c = _vector(buf, p_bufs, 16, m, mend)
                if v < 0:
                    reason = W_BAD
                    break
                msgs[k, M_BVEC] = v
                msgs[k, M_BCNT] = c
            msgs[k, M_COMP] = 1 if p_comp >= 0 else 0
        k += 1
        if mend + blen > n:  # the body runs past the end: the buffer ends inside this message
            reason = W_CUT
            break
        pos = mend + blen
    return msgs[:k], reason, pos


@nb.njit(cache=True, inline="always")
def _int32_value(buf, n, msg, node, b, r):
    """Row ``r`` of the int32 column with field node ``node`` and data buffer ``b`` of record
    batch ``msg`` (a row of the walker's table): (value, readable)."""
    if b >= msg[M_BCNT] or node >= msg[M_NCNT] or msg[M_COMP] != 0:
        return 0, False
    np_ = msg[M_NVEC] + 16 * node
    if _i64(buf, np_ + 8) != 0:  # null_count
        return 0, False
    bp = msg[M_BVEC] + 16 * b
    boff = _i64(buf, bp)
    blen = _i64(buf, bp + 8)
    if boff < 0 or 4 * (r + 1) > blen or boff + blen > msg[M_BLEN]:
        return 0, False
    p = msg[M_BODY] + boff + 4 * r
    if p + 4 > n:  # not written yet (a cut record)
        return 0, False
    return _i32(buf, p), True


@nb.njit(cache=True, nogil=True)
def coords(buf, msgs, sel, first, nodes, bufs):
    """Block coordinates of every row of the record batches ``msgs[sel]``: row ``j`` of
    message ``sel[i]`` goes to ``first[i] + j``. ``nodes``/``bufs``: field node and data
    buffer of chunk_x, chunk_y, chunk_z. Returns (xyz int64 (n, 3), readable bool (n))."""
    n = buf.shape[0]
    total = 0
    for i in range(sel.shape[0]):
        total += msgs[sel[i], M_ROWS]
    xyz = np.zeros((total, 3), np.int64)
    ok = np.zeros(total, np.bool_)
    for i in range(sel.shape[0]):
        msg = msgs[sel[i]]
        for r in range(msg[M_ROWS]):
            j = first[i] + r
            good = True
            for a in range(3):
                v, g = _int32_value(buf, n, msg, nodes[a], bufs[a], r)
                xyz[j, a] = v
                good = good and g
            ok[j] = good
    return xyz, ok


def coord_layout(schema: pa.Schema) -> tuple[np.ndarray, np.ndarray] | None:
    """(field nodes, data buffers) of chunk_x/y/z in a record batch of ``schema`` (IPC
    numbers them depth first), or None when a column's type is not one the walker can step
    over or the coordinates are not int32 (the caller then decodes with pyarrow)."""
    node = buf = 0
    found: dict[str, tuple[int, int]] = {}

    def visit(f: pa.Field) -> bool:
        nonlocal node, buf
        t = f.type
        my_node, my_buf = node, buf
        node += 1
        if pa.types.is_null(t):
            pass
        elif (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
              or pa.types.is_temporal(t) or pa.types.is_decimal(t)
              or pa.types.is_fixed_size_binary(t)):
            buf += 2
        elif pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) \
                or pa.types.is_large_string(t):
            buf += 3
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            buf += 2
            if not visit(t.value_field):
                return False
        elif pa.types.is_struct(t):
            buf += 1
            if not all(visit(t.field(i)) for i in range(t.num_fields)):
                return False
        else:
            return False
        if f.name in ("chunk_x", "chunk_y", "chunk_z") and t == pa.int32():
            found[f.name] = (my_node, my_buf + 1)
        return True

    if not all(visit(f) for f in schema):
        return None
    if len(found) != 3:
        return None
    return (np.array([found[c][0] for c in ("chunk_x", "chunk_y", "chunk_z")], np.int64),
            np.array([found[c][1] for c in ("chunk_x", "chunk_y", "chunk_z")], np.int64))


# ---------------------------------------------------------------------------------------------
# one shard file: its streams, the current stream's records
# ---------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """The messages one export-shards run wrote to a shard file: one Arrow IPC stream (a
    rerun appends another), or — when DVID gave several shards the same file name, which
    its exporter does for a non-cubic shard shape — the interleaved streams of that run's
    writers (``writers`` > 1), told apart from a rerun by overlapping: a run's writers are
    all open before the last of them ends its stream."""

    start: int  # byte offset of its (first) schema message
    schema_end: int  # end of that schema message
    schema: pa.Schema | None
    batches: np.ndarray  # rows of the walker's table: its record batches, in file order
    eos: bool  # every writer ended its stream (the run finished this file)
    writers: int = 1
    records: int = 0  # rows of its complete record batches
    problem: str = ""  # why its records cannot be read ("" when they can)


@dataclass
class FileScan:
    """What :func:`scan_file` found in one shard file."""

    path: Path
    size: int
    mtime: float
    file_format: bool  # an Arrow IPC *file* (magic, messages, footer), not a stream
    msgs: np.ndarray
    streams: list[Stream]
    reason: int  # W_*: why the walk stopped
    stop: int  # ... and where
    orphans: int = 0  # record batches outside any stream
    #: the current (last) stream's block records, in file order
    rec_msg: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # walker row
    rec_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row in batch
    xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    readable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    #: records of a batch cut by the end of the file: (xyz or None, message offset)
    cut: list = field(default_factory=list)

    @property
    def current(self) -> Stream | None:
        return self.streams[-1] if self.streams else None

    def msg_end(self, rows: np.ndarray) -> np.ndarray:
        m = self.msgs[rows]
        return m[:, M_BODY] + m[:, M_BLEN]

    def complete(self) -> np.ndarray:
        """The current stream's record batches that end inside the file."""
        cur = self.current
        if cur is None:
            return np.zeros(0, np.int64)
        return cur.batches[self.msg_end(cur.batches) <= self.size]


def _schema_of(mm: pa.Buffer, start: int, end: int) -> tuple[pa.Schema | None, str]:
    try:
        schema = ipc.read_schema(ipc.read_message(pa.BufferReader(mm.slice(start, end - start))))
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        return None, f"unreadable schema message ({exc})"
    missing = [n for n in _REQUIRED_FIELDS if n not in schema.names]
    if missing:
        return schema, f"not a DVID export-shards stream (no column {', '.join(missing)})"
    return schema, ""


def _streams(mm: pa.Buffer, msgs: np.ndarray) -> tuple[list[Stream], int]:
    """The runs of a file's messages (see ``Stream``) and the record batches outside any.
    A Python step per schema or end marker only (two per run), never per record."""
    types = msgs[:, M_TYPE]
    out: list[Stream] = []
    opened = 0
    first = writers = 0
    for i in np.flatnonzero((types == T_SCHEMA) | (types == T_EOS)).tolist() + [len(msgs)]:
        if i < len(msgs) and types[i] == T_SCHEMA:
            if opened == 0:
                first, writers = i, 0
            opened += 1
            writers += 1
            continue
        if opened == 0:
            continue  # an end marker outside any stream: nothing to read
        if i < len(msgs):
            opened -= 1
            if opened:
                continue
        end = int(msgs[first, M_BODY] + msgs[first, M_BLEN])
        schema, problem = _schema_of(mm, int(msgs[first, M_OFF]), end)
        inner = np.arange(first + 1, i)
        kinds = types[inner]
        if ((kinds != T_BATCH) & (kinds != T_SCHEMA) & (kinds != T_EOS)).any():
            problem = problem or "dictionary or tensor messages (DVID writes record batches only)"
        if writers > 1 and not problem:
            for j in inner[kinds == T_SCHEMA].tolist():
                other, _ = _schema_of(mm, int(msgs[j, M_OFF]), int(msgs[j, M_BODY] + msgs[j, M_BLEN]))
                if other is None or not other.equals(schema):
                    problem = "its writers wrote different schemas"
        out.append(Stream(int(msgs[first, M_OFF]), end, schema, inner[kinds == T_BATCH].astype(np.int64),
                          eos=i < len(msgs), writers=writers, problem=problem))
        opened = 0
    in_streams = sum(len(s.batches) for s in out)
    return out, int((types == T_BATCH).sum()) - in_streams


def _stream_coords(buf: np.ndarray, mm: pa.Buffer, msgs: np.ndarray, st: Stream
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(complete batches, rows of each, block coordinates and readable flags of their
    records) of one stream: the numba kernel where it can read the layout, pyarrow otherwise."""
    complete = st.batches[msgs[st.batches, M_BODY] + msgs[st.batches, M_BLEN] <= buf.shape[0]]
    rows = msgs[complete, M_ROWS]
    n = int(rows.sum())
    if st.problem or st.schema is None:
        return complete, rows, np.zeros((n, 3), np.int64), np.zeros(n, bool)
    layout = coord_layout(st.schema)
    if layout is not None and not msgs[st.batches, M_COMP].any():
        first = (np.cumsum(rows) - rows).astype(np.int64)  # each batch's first record (none: empty)
        xyz, ok = coords(buf, msgs, complete, first, *layout)
    else:  # a layout the kernel does not read (other tools): decode each batch with pyarrow
        xyz, ok = _coords_pyarrow(mm, msgs, complete, st.schema)
    return complete, rows, xyz, ok


def _keys(xyz: np.ndarray) -> np.ndarray:
    """Sorted unique block keys (for set operations on coordinates): one int64 each when
    the coordinates fit 21 bits (every neuroglancer grid DVID exports), rows otherwise."""
    xyz = np.ascontiguousarray(xyz, dtype=np.int64)
    if xyz.size == 0 or (xyz.min() >= 0 and xyz.max() < 1 << 21):
        return np.unique((xyz[:, 0] << 42) | (xyz[:, 1] << 21) | xyz[:, 2])
    return np.unique(xyz.view([("", np.int64)] * 3))


def scan_file(path: Path, mm: pa.Buffer) -> FileScan:
    """Streams and current records of one shard file, whose bytes are ``mm`` (a memory map:
    only message headers and the coordinate buffers are touched).

    The current export is the last run's stream. One run can have written several streams
    to a file (DVID's non-cubic shard shapes give several shards one file name, and their
    writers may take turns): finished streams just before the last one whose blocks are
    disjoint from it belong to its run, since a rerun writes a shard's blocks again."""
    buf = np.frombuffer(mm, dtype=np.uint8)
    size = buf.shape[0]
    file_format = size >= 8 and bytes(buf[:6]) == _ARROW_FILE_MAGIC
    msgs, reason, stop = walk(buf, 8 if file_format else 0, file_format)
    if reason == W_BAD and len(msgs) and msgs[-1, M_TYPE] != T_EOS:
        # the message before bytes that are no message is not trusted either: its body is
        # where the foreign bytes began (two writers tearing each other's messages apart)
        stop = msgs[-1, M_OFF]
        msgs = msgs[:-1]
    scan = FileScan(path, size, path.stat().st_mtime, file_format, msgs, [], int(reason), int(stop))
    streams, scan.orphans = _streams(mm, msgs)
    if not streams:
        return scan
    parts = [_stream_coords(buf, mm, msgs, streams[-1])]
    k = len(streams) - 1
    seen = _keys(parts[0][2][parts[0][3]])
    while k > 0 and streams[k - 1].eos and not streams[k - 1].problem:
        prev = _stream_coords(buf, mm, msgs, streams[k - 1])
        keys = _keys(prev[2][prev[3]])
        if not prev[3].all() or len(np.intersect1d(keys, seen)) or (
                streams[k - 1].schema != streams[k].schema):
            break
        parts.insert(0, prev)
        seen = np.union1d(seen, keys)
        k -= 1
    if k < len(streams) - 1:  # one run, several writers: one current stream
        run = streams[k:]
        streams = streams[:k] + [Stream(run[0].start, run[0].schema_end, run[0].schema,
                                        np.concatenate([s.batches for s in run]),
                                        eos=all(s.eos for s in run),
                                        writers=sum(s.writers for s in run))]
    scan.streams = streams
    cur = streams[-1]
    complete = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    cur.records = int(rows.sum())
    first = (np.cumsum(rows) - rows).astype(np.int64)  # each batch's first record (none: empty)
    scan.rec_msg = np.repeat(complete, rows)
    scan.rec_row = np.arange(cur.records, dtype=np.int64) - np.repeat(first, rows)
    scan.xyz = np.concatenate([p[2] for p in parts])
    scan.readable = np.concatenate([p[3] for p in parts])
    cut = cur.batches[scan.msg_end(cur.batches) > size]
    if len(cut):
        layout = coord_layout(cur.schema) if cur.schema is not None and not cur.problem else None
        if layout is not None and not msgs[cut[0], M_COMP]:
            cxyz, cok = coords(buf, msgs, cut[:1], np.zeros(1, np.int64), *layout)
            scan.cut = [(tuple(int(v) for v in cxyz[j]) if cok[j] else None, int(msgs[cut[0], M_OFF]))
                        for j in range(len(cxyz))]
        if not scan.cut:
            scan.cut = [(None, int(msgs[cut[0], M_OFF]))]
    return scan


def _decode(mm: pa.Buffer, msgs: np.ndarray, i: int, schema: pa.Schema) -> pa.RecordBatch:
    off, end = int(msgs[i, M_OFF]), int(msgs[i, M_BODY] + msgs[i, M_BLEN])
    return ipc.read_record_batch(ipc.read_message(pa.BufferReader(mm.slice(off, end - off))), schema)


def _coords_pyarrow(mm: pa.Buffer, msgs: np.ndarray, sel: np.ndarray, schema: pa.Schema):
    """``coords`` for layouts the kernel does not read (a Python step per record batch: only
    for files other tools wrote)."""
    xyz, ok = [], []
    for i in sel.tolist():
        n = int(msgs[i, M_ROWS])
        try:
            b = _decode(mm, msgs, i, schema)
            cols = [b.column(c) for c in ("chunk_x", "chunk_y", "chunk_z")]
            xyz.append(np.stack([c.to_numpy(zero_copy_only=False).astype(np.int64) for c in cols], 1))
            ok.append(np.full(n, all(c.null_count == 0 for c in cols)))
        except (pa.ArrowInvalid, OSError, ValueError):
            xyz.append(np.zeros((n, 3), np.int64))
            ok.append(np.zeros(n, bool))
    if not xyz:
        return np.zeros((0, 3), np.int64), np.zeros(0, bool)
    return np.concatenate(xyz), np.concatenate(ok)


def record_lists(mm: pa.Buffer, scan: FileScan) -> tuple[pa.Table | None, np.ndarray]:
    """The ``supervoxels`` and ``labels`` (and coordinate) columns of the current stream's
    records, in record order, and which records decoded. One zero-copy read of the stream's
    bytes when its batches follow its schema without anything between them (a DVID stream);
    a record batch at a time otherwise, so one bad batch costs only its own records."""
    cur = scan.current
    complete = scan.complete()
    n = len(scan.rec_msg)
    cols = ["chunk_x", "chunk_y", "chunk_z", "supervoxels", "labels"]
    if cur is None or cur.schema is None or cur.problem or n == 0:
        return None, np.zeros(n, bool)
    end = int(scan.msg_end(complete[-1:])[0])
    if cur.writers == 1 and (len(complete) == 0 or scan.msgs[complete[0], M_OFF] == cur.schema_end) \
            and np.array_equal(scan.msgs[complete[1:], M_OFF], scan.msg_end(complete[:-1])):
        try:
            t = ipc.open_stream(pa.BufferReader(mm.slice(cur.start, end - cur.start))).read_all()
            if t.num_rows == n:
                return t.select(cols), np.ones(n, bool)
        except (pa.ArrowInvalid, OSError):
            pass  # find the bad batch below
    schema = pa.schema([cur.schema.field(c).with_nullable(True) for c in cols])
    parts, ok = [], np.zeros(n, bool)
    rows = scan.msgs[complete, M_ROWS]
    first = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    for k, i in enumerate(complete.tolist()):
        try:
            b = _decode(mm, scan.msgs, i, cur.schema)
            if b.num_rows != rows[k]:
                raise ValueError(f"{b.num_rows} rows, the header says {rows[k]}")
            parts.append(b.select(cols).cast(schema))
            ok[first[k]:first[k + 1]] = True
        except (pa.ArrowInvalid, OSError, ValueError):
            parts.append(pa.RecordBatch.from_arrays([pa.nulls(int(rows[k]), f.type) for f in schema],
                                                    schema=schema))
    return pa.Table.from_batches(parts, schema=schema), ok


def message_offsets(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, size, rows) of the record batches of a file's current stream (tests and the
    tools that write sidecars for files of other writers)."""
    with pa.memory_map(str(path)) as f:
        scan = scan_file(path, f.read_buffer())
    cur = scan.current
    if cur is None:
        z = np.zeros(0, np.int64)
        return z, z, z
    b = cur.batches[scan.msg_end(cur.batches) <= scan.size]
    return scan.msgs[b, M_OFF], scan.msg_end(b) - scan.msgs[b, M_OFF], scan.msgs[b, M_ROWS]


# ---------------------------------------------------------------------------------------------
# the sidecar: read, then checked against the stream
# ---------------------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """The rows of one ``.csv`` sidecar as far as they could be read."""

    path: Path
    size: int
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    offset: np.ndarray | None  # with size (and batch_idx): x,y,z,offset,size[,batch_idx]
    nbytes: np.ndarray | None
    batch_idx: np.ndarray | None
    rec: np.ndarray | None  # x,y,z,rec: the record's row number in the stream
    schema_size: int | None
    problems: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def rows(self) -> int:
        return len(self.x)


_INT_COLS = ("x", "y", "z", "rec", "offset", "size", "batch_idx")


def read_sidecar(path: Path) -> Sidecar:
    """The sidecar's rows. Nothing here is fatal: a line cut by a killed export, a repeated
    header, an unknown header or an unparseable file are ``problems`` (the stream is then
    indexed without the rows that could not be read).

    DVID's layout (one ``# schema_size=N`` comment, the header, the rows) is parsed by
    pyarrow's CSV reader in one pass; only a sidecar with comments or headers further down
    (no DVID run writes one) is split into lines in Python first."""
    z = np.zeros(0, np.int64)
    try:
        text = path.read_bytes()
    except OSError as exc:
        return Sidecar(path, 0, z, z, z, None, None, None, None, None, [f"unreadable ({exc})"])
    out = Sidecar(path, len(text), z, z, z, None, None, None, None, None)
    end = len(text)
    if text and not text.endswith(b"\n"):
        end = text.rfind(b"\n") + 1
        out.problems.append(f"ends inside a line ({text[end:end + 40]!r}): the export was killed "
                            "while DVID flushed it")
    start = comments = 0
    while start < end and text.startswith((b"#", b"\n", b"\r\n"), start):
        nl = text.find(b"\n", start, end)
        m = re.match(rb"#\s*schema_size\s*=\s*(\d+)", text[start:nl])
        if m and out.schema_size is None:
            out.schema_size = int(m.group(1))
        comments += text.startswith(b"#", start)
        start = nl + 1
    if start >= end:
        return out
    nl = text.find(b"\n", start, end)
    header = text[start:nl + 1]
    data = pa.py_buffer(text).slice(start, end - start)
    if text.find(b"#", nl, end) >= 0 or text.find(header, nl, end) >= 0:
        lines = [ln for ln in text[nl + 1:end].splitlines(keepends=True) if ln.strip()]
        body = [ln for ln in lines if not ln.startswith(b"#") and ln != header]
        comments += sum(ln.startswith(b"#") for ln in lines)
        if len(lines) - len(body) > comments:
            out.problems.append(f"{len(lines) - len(body) - comments} repeated header line(s)")
        data = pa.py_buffer(header + b"".join(body))
    if comments > 1 or (comments and out.schema_size is None):
        out.problems.append(f"{comments} comment line(s) where DVID writes one '# schema_size=N'")
    skipped = []

    def skip(row) -> str:
        skipped.append(row.number)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(use_threads=data.size > (4 << 20)),
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in _INT_COLS}),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        out.problems.append(f"not a CSV of integers ({str(exc).splitlines()[0]})")
        return out
    if skipped:
        out.problems.append(f"{len(skipped)} line(s) with the wrong number of fields")
    cols = table.column_names
    if cols[:3] != ["x", "y", "z"] or not ({"offset", "size"} <= set(cols) or "rec" in cols):
        out.problems.append(f"unknown header {cols} (DVID writes x,y,z,offset,size,batch_idx)")
        return out
    ints = [c for c in cols if c in _INT_COLS]
    if any(table.column(c).null_count for c in ints):
        out.problems.append("empty fields")
        valid = table.column(ints[0]).is_valid()
        for c in ints[1:]:
            valid = pa.compute.and_(valid, table.column(c).is_valid())
        table = table.filter(valid)
    col = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ints}
    out.x, out.y, out.z = col["x"], col["y"], col["z"]
    out.offset, out.nbytes = col.get("offset"), col.get("size")
    out.batch_idx, out.rec = col.get("batch_idx"), col.get("rec")
    return out


#: why a sidecar row does not point at its record (``match_sidecar``)
R_OK, R_PAST_END, R_NO_RECORD, R_OTHER_BLOCK, R_BAD_VALUES, R_NO_STREAM, R_CUT = range(7)


def match_sidecar(sc: Sidecar, scan: FileScan) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each sidecar row checked against the current stream: (status ``R_*`` per row, the
    record it names — an index into the scan's records, -1 if none — and a sentence for each
    row that failed, in row order).

    Offsets count from the start of the current stream (DVID's byte counter restarts in a
    rerun); the first row of a DVID stream covers the schema message too (``schema_size=0``).
    An IPC *file*'s offsets count from the start of the file. Vectorized: one searchsorted."""
    n = sc.rows
    status = np.full(n, R_OK, np.int8)
    rec = np.full(n, -1, np.int64)
    if n == 0:
        return status, rec, []
    cur = scan.current
    named = np.full(n, -1, np.int64)  # the record a row's range and batch_idx name
    if cur is None or cur.problem:
        status[:] = R_NO_STREAM
    elif sc.offset is not None and sc.nbytes is not None:  # x,y,z,offset,size[,batch_idx]
        off = (0 if scan.file_format else cur.start) + sc.offset
        size = sc.nbytes
        # DVID writes the schema with the first batch: that row's range starts at the schema
        schema_len = cur.schema_end - cur.start
        first = (off == cur.start) & (size > schema_len)
        off = np.where(first, off + schema_len, off)
        size = np.where(first, size - schema_len, size)
        b_off = scan.msgs[cur.batches, M_OFF]
        b_end = scan.msg_end(cur.batches)
        b_rows = scan.msgs[cur.batches, M_ROWS]
        first_rec = np.full(len(cur.batches), -1, np.int64)  # first record of each batch
        if len(scan.rec_msg):
            starts = np.flatnonzero(np.concatenate([[True], scan.rec_msg[1:] != scan.rec_msg[:-1]]))
            first_rec[np.searchsorted(cur.batches, scan.rec_msg[starts])] = starts
        if len(b_off):
            k = np.minimum(np.searchsorted(b_off, off), len(b_off) - 1)
            hit = (b_off[k] == off) & (b_end[k] - b_off[k] == size)
            if sc.batch_idx is not None:
                bidx = sc.batch_idx
            elif sc.rec is not None:  # x,y,z,rec,offset,size: rec numbers the stream's rows
                bidx = sc.rec - np.maximum(first_rec[k], 0)
            else:
                bidx = np.zeros(n, np.int64)
            cut = hit & (b_end[k] > scan.size)
            ok = hit & ~cut & (first_rec[k] >= 0) & (bidx >= 0) & (bidx < b_rows[k])
            named = np.where(ok, first_rec[k] + bidx, -1)
        else:
            cut = ok = np.zeros(n, bool)
        status[~ok] = R_NO_RECORD
        status[~ok & (off + size > scan.size)] = R_PAST_END
        status[cut] = R_CUT
    else:  # x,y,z,rec: rec numbers the rows of the stream
        assert sc.rec is not None  # read_sidecar: no offset and size, so rec (or no rows)
        ok = (sc.rec >= 0) & (sc.rec < len(scan.rec_msg))
        named = np.where(ok, sc.rec, -1)
        status[~ok] = R_NO_RECORD
    found = np.flatnonzero(named >= 0)
    r = named[found]
    same = scan.readable[r] & np.all(scan.xyz[r] == np.stack([sc.x, sc.y, sc.z], 1)[found], axis=1)
    rec[found[same]] = r[same]
    status[found[~same]] = R_OTHER_BLOCK
    bad_values = (sc.x < 0) | (sc.y < 0) | (sc.z < 0) | (sc.x >= 2**31) | (sc.y >= 2**31) | (sc.z >= 2**31)
    status[bad_values] = R_BAD_VALUES
    rec[bad_values] = -1
    why = []
    for i in np.flatnonzero(status != R_OK).tolist():
        s = int(status[i])
        where = (f"bytes {int(sc.offset[i])}+{int(sc.nbytes[i])} of the current stream"
                 if sc.offset is not None and sc.nbytes is not None
                 else f"row {int(sc.rec[i])} of the current stream" if sc.rec is not None else f"row {i}")
        other = named[i]
        why.append({
            R_PAST_END: f"{where} lie past the end of the {scan.size}-byte file",
            R_CUT: f"{where}: the file ends inside that record",
            R_NO_RECORD: f"{where}: no record starts there",
            R_OTHER_BLOCK: (f"{where} hold the record of block {tuple(int(v) for v in scan.xyz[other])}"
                            if other >= 0 and scan.readable[other] else f"{where}: unreadable record"),
            R_BAD_VALUES: "negative or out-of-range block coordinates",
            R_NO_STREAM: "the file holds no readable DVID stream",
        }[s])
    return status, rec, why


# ---------------------------------------------------------------------------------------------
# export.log: what DVID's last finished export wrote
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportLog:
    """DVID's ``export.log`` (written once, when an export has finished)."""

    path: Path
    mtime: float
    uuid: str
    finished: bool  # the report is complete ("--- Totals ---")
    #: per scale: (shard files, chunks) the export wrote
    scales: dict[int, tuple[int, int]]


def read_export_log(root: Path) -> ExportLog | None:
    p = root / "export.log"
    try:
        text = p.read_text(errors="replace")
        mtime = p.stat().st_mtime
    except OSError:
        return None
    scales: dict[int, tuple[int, int]] = {}
    scale = None
    chunks = files = None
    uuid = ""
    for line in text.splitlines():
        if m := re.match(r"UUID:\s*(\S+)", line):
            uuid = m.group(1)
        elif m := re.match(r"--- Scale (\d+) ---", line):
            scale, chunks, files = int(m.group(1)), None, None
        elif line.startswith("--- Totals"):
            scale = None
        elif scale is not None and (m := re.match(r"\s*Chunks exported:\s*([\d,]+)", line)):
            chunks = int(m.group(1).replace(",", ""))
        elif scale is not None and (m := re.match(r"\s*Shard files:\s*([\d,]+)", line)):
            files = int(m.group(1).replace(",", ""))
        if scale is not None and chunks is not None and files is not None:
            scales[scale] = (files, chunks)
    return ExportLog(p, mtime, uuid, "--- Totals ---" in text, scales)


# ---------------------------------------------------------------------------------------------
# the neuroglancer spec, the per-scale index
# ---------------------------------------------------------------------------------------------


@dataclass
class _ShardFile:
    path: Path
    schema: pa.Schema
    size: int
    #: an Arrow IPC *file* (magic, messages, footer) rather than a stream
    file_format: bool = False
    #: the current stream's schema message, to read a run of its record batches as a stream
    schema_msg: bytes = b""
    #: the current stream's record-batch messages: offsets (sorted), ends
    msg_off: np.ndarray | None = None
    msg_end: np.ndarray | None = None


@dataclass
class _ScaleIndex:
    """All exported blocks of one scale, sorted by Morton code."""

    info: ScaleInfo
    files: list[_ShardFile]
    morton: np.ndarray  # uint64
    x: np.ndarray  # int32
    y: np.ndarray
    z: np.ndarray
    file_id: np.ndarray  # int32
    offset: np.ndarray  # int64, byte offset of the IPC message
    size: np.ndarray  # int64, byte length of the IPC message
    row: np.ndarray  # int32, row inside the record batch


def _load_spec(spec_path: str) -> list[dict]:
    p = Path(spec_path).expanduser()
    try:
        spec = json.loads(p.read_text())
    except OSError as exc:
        raise UserError(f"cannot read neuroglancer spec {spec_path!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"neuroglancer spec {spec_path!r} is not JSON: {exc}") from None
    scales = spec.get("scales") if isinstance(spec, dict) else None
    if not isinstance(scales, list) or not scales:
        raise UserError(f"neuroglancer spec {spec_path!r} has no 'scales' list")
    for k, s in enumerate(scales):
        size = s.get("size") if isinstance(s, dict) else None
        if not (
            isinstance(size, list)
            and len(size) == 3
            and all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise UserError(
                f"neuroglancer spec {spec_path!r}: scales[{k}].size must be 3 positive ints"
            )
        chunks = s.get("chunk_sizes", [[BLOCK] * 3])
        if not chunks or [int(v) for v in chunks[0]] != [BLOCK] * 3:
            raise UserError(
                f"neuroglancer spec {spec_path!r}: scales[{k}].chunk_sizes must be 64^3 "
                f"(DVID export-shards only writes 64^3 chunks), got {chunks}"
            )
    return scales
