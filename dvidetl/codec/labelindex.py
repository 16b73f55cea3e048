"""DVID LabelIndex protobufs and block-key encoding (dvid-formats §5.5). Pure functions, no I/O.

A LabelIndex lists, for one body label, every scale-0 block the body touches and the voxel
count of each of its supervoxels there. The export flattens them into rows of the
``label_index`` table: (label, supervoxel, x, y, z, voxels).

protoc is not available, so the message classes are built at import time from a
``FileDescriptorProto`` describing DVID's ``labelmap/labelidx.proto`` (package ``proto``).
Serialization is done by the installed ``protobuf`` runtime (upb), never by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "SVCount",
    "LabelIndex",
    "LabelIndices",
    "encode_block_key",
    "decode_block_key",
    "encode_label_index",
    "encode_label_indices",
    "decode_label_index",
    "label_index_rows",
    "label_index_table",
    "LABEL_INDEX_SCHEMA",
]

#: Columns of the flat label-index rows (the spine adds ``morton``).
LABEL_INDEX_SCHEMA = pa.schema(
    [
        ("label", pa.uint64()),
        ("supervoxel", pa.uint64()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("voxels", pa.uint32()),
    ]
)


def _build_file(name: str, syntax: str, maps: bool):
    """Describe labelidx.proto as a FileDescriptorProto and let protobuf make the classes.

    ``maps=True`` is DVID's real schema (map fields). ``maps=False`` is a wire-identical
    variant in which each map is an explicit ``repeated Entry {key = 1; value = 2}`` (that is
    how the protobuf spec defines map encoding); it is used internally because the runtime's
    map fields hash block keys badly (DVID keys differ mostly in the high bits, so a large
    index takes seconds), while repeated fields parse and build linearly.
    """
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=name, package="proto", syntax=syntax)

    def field(msg, fname, number, ftype, label=F.LABEL_OPTIONAL, type_name=None):
        f = msg.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        return f

    def entry(msg, entry_name, value_type, value_type_name=None):
        e = msg.nested_type.add(name=entry_name)
        if maps:
            e.options.map_entry = True
        field(e, "key", 1, F.TYPE_UINT64)
        field(e, "value", 2, value_type, type_name=value_type_name)
        return e

    sv = fdp.message_type.add(name="SVCount")
    entry(sv, "CountsEntry", F.TYPE_UINT32)
    field(sv, "counts", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".proto.SVCount.CountsEntry")
    field(sv, "surface_mutid", 2, F.TYPE_UINT64)

    li = fdp.message_type.add(name="LabelIndex")
    entry(li, "BlocksEntry", F.TYPE_MESSAGE, ".proto.SVCount")
    field(li, "blocks", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".proto.LabelIndex.BlocksEntry")
    field(li, "label", 2, F.TYPE_UINT64)
    field(li, "last_mutid", 3, F.TYPE_UINT64)
    field(li, "last_mod_time", 4, F.TYPE_STRING)
    field(li, "last_mod_user", 5, F.TYPE_STRING)
    field(li, "last_mod_app", 6, F.TYPE_STRING)

    lis = fdp.message_type.add(name="LabelIndices")
    field(lis, "indices", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".proto.LabelIndex")

    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return tuple(
        message_factory.GetMessageClass(fd.message_types_by_name[n])
        for n in ("SVCount", "LabelIndex", "LabelIndices")
    )


def _build_messages():
    return _build_file("dvidetl/labelidx.proto", "proto3", maps=True)


SVCount, LabelIndex, LabelIndices = _build_messages()
# proto2 so that entry keys/values equal to 0 are still written, exactly as map entries are.
_WSVCount, _WLabelIndex, _ = _build_file("dvidetl/labelidx_wire.proto", "proto2", maps=False)
_WCountsEntry = _WSVCount.CountsEntry
_WBlocksEntry = _WLabelIndex.BlocksEntry

_SIGN = np.uint64(0x100000)
_MAG = np.uint64(0xFFFFF)
_FIELD = np.uint64(0x1FFFFF)


def _field_enc(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.int64)
    mag = np.abs(v).astype(np.uint64) & _MAG
    return np.where(v < 0, mag | _SIGN, mag)


def _field_dec(f: np.ndarray) -> np.ndarray:
    mag = (f & _MAG).astype(np.int64)
    return np.where((f & _SIGN) != 0, -mag, mag).astype(np.int32)


def encode_block_key(x, y, z) -> np.ndarray | int:
    """DVID's LabelIndex block key: three sign-magnitude 21-bit fields, z highest.

    Vectorized over arrays (returns uint64 array); scalars give a Python int.
    Coordinates beyond +-1,048,575 are rejected rather than silently truncated as DVID does.
    """
    scalar = all(np.ndim(c) == 0 for c in (x, y, z))
    xs, ys, zs = (np.asarray(c, dtype=np.int64) for c in (x, y, z))
    for name, c in (("x", xs), ("y", ys), ("z", zs)):
        if c.size and np.abs(c).max() > 0xFFFFF:
            raise ValueError(f"block {name} coordinate out of the 21-bit key range (|v| > 1048575)")
    key = (_field_enc(zs) << np.uint64(42)) | (_field_enc(ys) << np.uint64(21)) | _field_enc(xs)
    return int(key) if scalar else key


def decode_block_key(keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_block_key`: (x, y, z) int32 arrays."""
    k = np.asarray(keys, dtype=np.uint64)
    return (
        _field_dec(k & _FIELD),
        _field_dec((k >> np.uint64(21)) & _FIELD),
        _field_dec((k >> np.uint64(42)) & _FIELD),
    )


def encode_label_index(
    label: int,
    block_coords: np.ndarray,
    svs: np.ndarray,
    counts: np.ndarray,
    *,
    last_mutid: int = 0,
    last_mod_time: str = "",
    last_mod_user: str = "",
    last_mod_app: str = "",
) -> bytes:
    """Serialize one LabelIndex from flat rows (block (n,3) x,y,z; supervoxel; voxel count).

    Rows may come in any order; a repeated (block, supervoxel) pair is summed. The bytes are
    deterministic (map entries sorted by key), so equal inputs give equal bytes.
    """
    bc = np.asarray(block_coords, dtype=np.int64).reshape(-1, 3)
    svs = np.asarray(svs, dtype=np.uint64).ravel()
    counts = np.asarray(counts, dtype=np.int64).ravel()
    if not (len(bc) == len(svs) == len(counts)):
        raise ValueError(
            f"label {label}: block_coords ({len(bc)}), svs ({len(svs)}) and counts "
            f"({len(counts)}) must have the same length"
        )
    if counts.size and (counts.min() < 0 or counts.max() > 0xFFFFFFFF):
        raise ValueError(f"label {label}: voxel counts must fit uint32")
    msg = _WLabelIndex()
    if label:
        msg.label = int(label)
    if last_mutid:
        msg.last_mutid = int(last_mutid)
    if last_mod_time:
        msg.last_mod_time = last_mod_time
    if last_mod_user:
        msg.last_mod_user = last_mod_user
    if last_mod_app:
        msg.last_mod_app = last_mod_app
    if len(svs):
        keys = np.asarray(encode_block_key(bc[:, 0], bc[:, 1], bc[:, 2]))
        order = np.lexsort((svs, keys))
        keys, svs_s, cnt = keys[order], svs[order], counts[order]
        # sum duplicate (key, sv) pairs
        new = np.ones(len(keys), dtype=bool)
        new[1:] = (keys[1:] != keys[:-1]) | (svs_s[1:] != svs_s[:-1])
        starts = np.flatnonzero(new)
        keys, svs_s = keys[starts], svs_s[starts]
        cnt = np.add.reduceat(cnt, starts)
        if cnt.max() > 0xFFFFFFFF:
            raise ValueError(f"label {label}: summed voxel count exceeds uint32")
        bstarts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        bends = np.r_[bstarts[1:], len(keys)]
        kl, sl, cl = keys.tolist(), svs_s.tolist(), cnt.tolist()
        CE, BE, SV = _WCountsEntry, _WBlocksEntry, _WSVCount
        msg.blocks.extend(
            [
                BE(
                    key=kl[b0],
                    value=SV(
                        counts=[
                            CE(key=k, value=v) for k, v in zip(sl[b0:b1], cl[b0:b1], strict=True)
                        ]
                    ),
                )
                for b0, b1 in zip(bstarts.tolist(), bends.tolist(), strict=True)
            ]
        )
    return msg.SerializeToString()


def encode_label_indices(
    labels: np.ndarray, block_coords: np.ndarray, svs: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, list[bytes]]:
    """Serialize many LabelIndex messages from flat rows in one go (bulk path for sources).

    Rows are grouped by label; within a label they are sorted by (block key, supervoxel) and
    (block, supervoxel) pairs must be unique. Returns (unique labels ascending, bytes each),
    byte-identical to `encode_label_index` per label.
    """
    labels = np.asarray(labels, dtype=np.uint64).ravel()
    bc = np.asarray(block_coords, dtype=np.int64).reshape(-1, 3)
    svs = np.asarray(svs, dtype=np.uint64).ravel()
    counts = np.asarray(counts, dtype=np.int64).ravel()
    if not (len(labels) == len(bc) == len(svs) == len(counts)):
        raise ValueError("labels, block_coords, svs and counts must have the same length")
    if not len(labels):
        return np.zeros(0, np.uint64), []
    if counts.min() < 0 or counts.max() > 0xFFFFFFFF:
        raise ValueError("voxel counts must fit uint32")
    keys = np.asarray(encode_block_key(bc[:, 0], bc[:, 1], bc[:, 2]))
    order = np.lexsort((svs, keys, labels))
    labels, keys, svs, counts = labels[order], keys[order], svs[order], counts[order]
    if len(labels) > 1:
        same = (labels[1:] == labels[:-1]) & (keys[1:] == keys[:-1]) & (svs[1:] == svs[:-1])
        if same.any():
            i = int(np.flatnonzero(same)[0])
            raise ValueError(
                f"label {int(labels[i])}: supervoxel {int(svs[i])} listed twice for one block"
            )
    lab_starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    blk_new = np.r_[True, (labels[1:] != labels[:-1]) | (keys[1:] != keys[:-1])]
    blk_starts = np.flatnonzero(blk_new)
    ll, kl, sl, cl = labels.tolist(), keys.tolist(), svs.tolist(), counts.tolist()
    bsl = blk_starts.tolist() + [len(ll)]
    lsl = lab_starts.tolist() + [len(ll)]
    CE, BE, SV, LI = _WCountsEntry, _WBlocksEntry, _WSVCount, _WLabelIndex
    out: list[bytes] = []
    bi = 0
    for li in range(len(lsl) - 1):
        end = lsl[li + 1]
        ents = []
        while bsl[bi] < end:
            b0, b1 = bsl[bi], bsl[bi + 1]
            if b1 - b0 == 1:
                cnts = [CE(key=sl[b0], value=cl[b0])]
            else:
                cnts = [CE(key=k, value=v) for k, v in zip(sl[b0:b1], cl[b0:b1], strict=True)]
            ents.append(BE(key=kl[b0], value=SV(counts=cnts)))
            bi += 1
        lab = ll[lsl[li]]
        msg = LI(blocks=ents, label=lab) if lab else LI(blocks=ents)
        out.append(msg.SerializeToString())
    return labels[lab_starts], out


def decode_label_index(data: bytes):
    """Parse LabelIndex protobuf bytes (unwrapped) into DVID's map-based message class.

    Convenient for small indices and tests; `label_index_rows` is the fast path.
    """
    msg = LabelIndex()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise ValueError(f"not a LabelIndex protobuf ({len(data)} bytes): {e}") from None
    return msg


def _parse_wire(data: bytes, label: int | None):
    msg = _WLabelIndex()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as e:
        raise ValueError(
            f"label {label}: not a LabelIndex protobuf ({len(data)} bytes): {e}"
        ) from None
    if label is not None and msg.label and msg.label != int(label):
        raise ValueError(f"LabelIndex for label {label} carries label field {msg.label}")
    return msg


def _rows_of(msg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, svs, counts) arrays of one parsed wire LabelIndex, sorted by (block key, sv).

    A block key repeated in the stream is merged like the map would (last entry wins).
    """
    keys_l: list[int] = []
    svs_l: list[int] = []
    cnt_l: list[int] = []
    for be in msg.blocks:
        k = be.key
        ents = be.value.counts
        for ce in ents:
            keys_l.append(k)
            svs_l.append(ce.key)
            cnt_l.append(ce.value)
    keys = np.array(keys_l, dtype=np.uint64)
    svs = np.array(svs_l, dtype=np.uint64)
    cnt = np.array(cnt_l, dtype=np.uint32)
    order = np.lexsort((svs, keys))
    keys, svs, cnt = keys[order], svs[order], cnt[order]
    if len(keys) > 1:
        dup = (keys[1:] == keys[:-1]) & (svs[1:] == svs[:-1])
        if dup.any():  # map semantics: a later entry for the same key replaces the earlier
            keep = np.r_[~dup, True]
            keys, svs, cnt = keys[keep], svs[keep], cnt[keep]
    return keys, svs, cnt


def label_index_rows(data: bytes, label: int | None = None) -> dict[str, np.ndarray]:
    """Flat rows of one LabelIndex: dict of arrays label, supervoxel, x, y, z, voxels.

    ``label`` defaults to the message's own label field; if given and the message carries a
    different non-zero label, that is an error (a mismatched index would be filed wrongly).
    Rows are sorted by (block key, supervoxel).
    """
    msg = _parse_wire(data, label)
    if label is None:
        label = msg.label
    keys, svs, cnt = _rows_of(msg)
    x, y, z = decode_block_key(keys)
    return {
        "label": np.full(len(keys), int(label), dtype=np.uint64),
        "supervoxel": svs,
        "x": x,
        "y": y,
        "z": z,
        "voxels": cnt,
    }


def label_index_table(labels, datas) -> pa.Table:
    """Flat rows of many LabelIndex protobufs (a batch from ``read_indices``) as one table.

    ``labels``: uint64 array-like (the body of each index); ``datas``: pa.BinaryArray (or a
    sequence of bytes) of unwrapped LabelIndex protobufs. Empty / null entries give no rows.
    Columns: label uint64, supervoxel uint64, x/y/z int32, voxels uint32.
    """
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = labels.to_numpy(zero_copy_only=False)
    labels = np.asarray(labels, dtype=np.uint64)
    if isinstance(datas, pa.ChunkedArray):
        datas = datas.combine_chunks()
    items: Sequence = datas.to_pylist() if isinstance(datas, pa.Array) else list(datas)
    if len(items) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(items)} index payloads")
    parts_l, parts_k, parts_s, parts_c = [], [], [], []
    for lab, data in zip(labels.tolist(), items, strict=True):
        if not data:
            continue
        k, s, c = _rows_of(_parse_wire(data, lab))
        parts_l.append(np.full(len(k), lab, dtype=np.uint64))
        parts_k.append(k)
        parts_s.append(s)
        parts_c.append(c)
    if parts_k:
        lab_a = np.concatenate(parts_l)
        keys = np.concatenate(parts_k)
        svs = np.concatenate(parts_s)
        cnt = np.concatenate(parts_c)
    else:
        lab_a = keys = svs = np.zeros(0, dtype=np.uint64)
        cnt = np.zeros(0, dtype=np.uint32)
    x, y, z = decode_block_key(keys)
    return pa.Table.from_arrays(
        [pa.array(lab_a), pa.array(svs), pa.array(x), pa.array(y), pa.array(z), pa.array(cnt)],
        schema=LABEL_INDEX_SCHEMA,
    )
