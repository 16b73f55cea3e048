"""The one small protocol every source implements (synthetic, shards, dvid+http).

The Flight server is a thin adapter over this: tickets are validated there, so a source may
assume scale exists and ``0 <= lo < hi <= morton_end``. Everything is streamed as Arrow
record batches so no source ever needs a whole volume in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from dvidetl.errors import UserError
from dvidetl.geometry import KEY_END, VolumeInfo

#: Blocks as a source yields them, sorted by morton within one call.
BLOCKS_WIRE_SCHEMA = pa.schema(
    [
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("data", pa.binary()),  # the block exactly as stored (still wrapped, see VolumeInfo.codec)
    ]
)

MAPPING_SCHEMA = pa.schema([("supervoxel", pa.uint64()), ("body", pa.uint64())])

#: label = body label; data = the LabelIndex protobuf bytes, unwrapped (DVID stores them LZ4).
INDICES_SCHEMA = pa.schema([("label", pa.uint64()), ("data", pa.binary())])


#: What a source found in its input that is not as the writer of that input should have left
#: it — superseded copies, dangling index rows, cut records, … (``anomalies_table``): one
#: row each, ``seq`` numbering them from 0 (the key the planner cuts them on). Nothing a
#: source skips, drops or chooses between goes unreported: these rows are stored with the
#: export (table ``source_anomalies``).
ANOMALIES_SCHEMA = pa.schema(
    [
        ("seq", pa.uint64()),
        ("kind", pa.string()),
        ("scale", pa.uint8()),  # null: about the whole source
        ("file", pa.string()),  # where, relative to the source ("" for the whole source)
        ("x", pa.int32()),  # x, y, z, morton: the block, null when not about one block
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("blocks", pa.uint64()),  # block records the row stands for (copies, records of a file)
        ("lost", pa.bool_()),  # blocks the export should hold are missing because of it
        ("detail", pa.string()),
    ]
)

#: kinds of keyed tables a source counts with ``count_keys`` (``anomalies``: by ``seq``,
#: answered by the Flight server from ``Source.anomalies``)
KEY_KINDS = ("indices", "mapping", "anomalies")


def anomaly_summary(kinds: dict[str, int], lost: int = 0) -> str:
    """One line of anomaly counts (``anomaly_counts``), most frequent first, and how many of
    them lose blocks: what the run summary, verify, and inspect say."""
    what = ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{sum(kinds.values()):,} in the source ({what or 'none'})"
            + (f"; {lost:,} of them lose blocks" if lost else ""))


def anomaly_counts(table: pa.Table) -> dict[str, int]:
    """Rows per ``kind`` of an anomalies table (wire or stored), for summaries."""
    if table is None or table.num_rows == 0:
        return {}
    g = table.group_by("kind").aggregate([("kind", "count")])
    return dict(sorted(zip(g["kind"].to_pylist(), g["kind_count"].to_pylist(), strict=True)))


class KeyCounts(NamedTuple):
    """Answer of ``count_keys``: cells ascending and unique, keys and rows per cell."""

    cells: np.ndarray  # uint64, key >> cell_bits
    keys: np.ndarray  # uint64, labels / supervoxels in the cell
    rows: np.ndarray  # uint64, output rows of the cell (label_index rows, mapping pairs)
    exact: bool


def count_sorted(keys: np.ndarray, rows: np.ndarray | None, cell_bits: int, lo: int = 0,
                 hi: int = KEY_END, *, exact: bool = True) -> KeyCounts:
    """``count_keys`` over a sorted unique key array (a source's cached label or supervoxel
    list); ``rows`` per key (None: one row each). Vectorized: one searchsorted and one
    reduceat, whatever the number of keys."""
    keys = np.asarray(keys, dtype=np.uint64)
    sl = key_slice(keys, int(lo), int(hi))
    sub = keys[sl]
    r = np.ones(sub.size, np.uint64) if rows is None else np.asarray(rows, np.uint64)[sl]
    if sub.size == 0:
        z = np.zeros(0, np.uint64)
        return KeyCounts(z, z, z, exact)
    cells = sub >> np.uint64(cell_bits) if cell_bits < 64 else np.zeros(sub.size, np.uint64)
    starts = np.flatnonzero(np.concatenate([[True], cells[1:] != cells[:-1]]))
    nkeys = np.diff(np.append(starts, sub.size)).astype(np.uint64)
    return KeyCounts(cells[starts], nkeys, np.add.reduceat(r, starts).astype(np.uint64), exact)


def key_slice(keys: np.ndarray, lo: int, hi: int) -> slice:
    """The slice of sorted ``keys`` with ``lo <= key < hi`` (hi may be 2**64)."""
    a = int(np.searchsorted(keys, np.uint64(lo), "left")) if lo > 0 else 0
    b = keys.size if hi >= KEY_END else int(np.searchsorted(keys, np.uint64(hi), "left"))
    return slice(a, max(a, b))


def mapping_batches(sv: np.ndarray, body: np.ndarray, lo: int = 0, hi: int = KEY_END,
                    step: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """``read_mapping(lo, hi)`` over a source's cached pairs sorted by supervoxel."""
    sl = key_slice(sv, lo, hi)
    for i in range(sl.start, sl.stop, step):
        j = min(sl.stop, i + step)
        yield pa.RecordBatch.from_arrays([pa.array(sv[i:j]), pa.array(body[i:j])], schema=MAPPING_SCHEMA)


def drop_background(sv, body, where: str):
    """Drop mapping pairs of supervoxel 0 (background), logging how many and why.

    DVID never maps supervoxel 0 (it is not a segment); a pair for it in a mapping file is an
    error in whatever wrote it, and honouring it would paint every background voxel as a body.
    Returns the filtered ``(sv, body)`` arrays.
    """

    zero = np.asarray(sv) == 0
    if zero.any():
        bad = np.unique(np.asarray(body)[zero])
        logging.getLogger("dvidetl.mapping").warning(
            "%s: dropped %d mapping pair(s) for supervoxel 0 (background; DVID never maps it) "
            "to bodies %s", where, int(zero.sum()), [int(b) for b in bad[:10]],
        )
        return np.asarray(sv)[~zero], np.asarray(body)[~zero]
    return sv, body


def unique_pairs(sv: np.ndarray, body: np.ndarray, rank: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (supervoxel, body) pairs sorted by supervoxel: the one normalization of
    every source's mapping (``dedupe_pairs`` for a source whose input must agree with
    itself, the shards source where files written later win).

    ``rank``: where each pair came from, in write order (a shard file's number); each
    distinct pair keeps the highest rank it was seen with, and the pairs of one supervoxel
    are ordered by it — the newest body is the last of its run. Without ``rank`` the pairs of
    one supervoxel are ordered by body (ranks returned as zeros). Vectorized: two lexsorts
    and one reduceat, whatever the number of pairs."""
    sv = np.asarray(sv, np.uint64)
    body = np.asarray(body, np.uint64)
    rk = np.zeros(sv.size, np.int64) if rank is None else np.asarray(rank, np.int64)
    if not sv.size == body.size == rk.size:
        raise ValueError(f"mapping pairs: {sv.size} supervoxels, {body.size} bodies, {rk.size} ranks")
    if sv.size == 0:
        return sv, body, rk
    order = np.lexsort((body, sv))
    sv, body, rk = sv[order], body[order], rk[order]
    starts = np.flatnonzero(np.concatenate([[True], (sv[1:] != sv[:-1]) | (body[1:] != body[:-1])]))
    sv, body, rk = sv[starts], body[starts], np.maximum.reduceat(rk, starts)
    if rank is not None:
        order = np.lexsort((rk, sv))
        sv, body, rk = sv[order], body[order], rk[order]
    return sv, body, rk


def dedupe_pairs(sv: np.ndarray, body: np.ndarray, where, *, why: str = "",
                 error: type[Exception] = UserError) -> tuple[np.ndarray, np.ndarray]:
    """Unique (sv, body) pairs sorted by sv (``unique_pairs``) — a source's mapping as the
    planner and readers want it; a supervoxel with two bodies is an ``error`` naming
    ``where`` (and ``why``)."""
    sv, body, _ = unique_pairs(sv, body)
    clash = np.flatnonzero(sv[1:] == sv[:-1])
    if clash.size:
        i = int(clash[0])
        raise error(f"{where}: supervoxel {int(sv[i])} is mapped to two bodies "
                    f"({int(body[i])} and {int(body[i + 1])}){why}")
    return sv, body


@runtime_checkable
class Source(Protocol):
    """A labelmap at one UUID, readable by Morton range."""

    def info(self) -> VolumeInfo:
        """Volume description. ``info().uuid == "*"`` means "answers for any UUID"."""
        ...

    def count(self, scale: int, cell_bits: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Blocks per aligned Morton cell ``code >> cell_bits``: (cells uint64 ascending,
        counts uint64, exact). Only non-empty cells need be listed. ``exact=False`` means the
        counts are upper bounds (block slots inside the extents)."""
        ...

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored blocks with ``lo <= morton < hi``, ascending morton, as BLOCKS_WIRE_SCHEMA."""
        ...

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel (uint64, identity where unmapped)."""
        ...

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Non-identity (supervoxel, body) pairs with ``lo <= supervoxel < hi``, ascending
        supervoxel, as MAPPING_SCHEMA."""
        ...

    def count_keys(self, kind: str, cell_bits: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """What the planner needs to cut ``indices`` (body labels) or ``mapping``
        (supervoxels) into partitions: per aligned cell ``key >> cell_bits`` of keys in
        ``[lo, hi)``, the number of keys and of output rows (label_index rows, mapping pairs).
        Only non-empty cells need be listed. ``exact=False``: ``rows`` are estimates."""
        ...

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Label indices of body labels ``lo <= label < hi``, ascending, as INDICES_SCHEMA."""
        ...

    def close(self) -> None: ...

    # Optional: ``anomalies_table() -> pa.Table`` (ANOMALIES_SCHEMA, ``seq`` = 0, 1, ...):
    # what the source found wrong in its input and how it dealt with it. A source without
    # it reports none (the Flight server answers an empty table).
    # Optional: ``count_requests(kind, scale, lo, hi) -> np.ndarray``: the requests the source
    # sends its store to read each range ``[lo[i], hi[i])`` of ``kind`` (``blocks`` of
    # ``scale``, ``indices``, ``mapping``), so ``plan`` shows what a run will ask of a live
    # store before it starts (``dvid+http``: /blocks, /indices-compressed, /mappings). A source
    # without it answers nothing, and plan shows no count.
