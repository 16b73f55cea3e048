"""Reading DVID ``export-shards`` files without loading them: the neuroglancer spec, the
Arrow IPC schema of a stream or file, the byte offsets of its record-batch messages (from
the CSV sidecar, or by walking message headers), with DVID's sidecar quirks (reruns
appended, rows without a record) dropped and noted rather than refused."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

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


@dataclass
class _ShardFile:
    path: Path
    schema: pa.Schema
    size: int
    #: an Arrow IPC *file* (magic, messages, footer) rather than a stream
    file_format: bool = False
    #: the schema as an IPC message, to read a run of record-batch messages as one stream
    schema_msg: bytes = b""
    #: every record-batch message of the file known from the index: offsets (sorted), ends
    msg_off: np.ndarray | None = None
    msg_end: np.ndarray | None = None


@dataclass
class _ScaleIndex:
    """All blocks of one scale, sorted by Morton code."""

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


def _is_ipc_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == _ARROW_FILE_MAGIC


def _read_schema(path: Path) -> pa.Schema:
    """The schema of a shard written as an Arrow IPC stream (DVID) or file (other tools)."""
    try:
        if _is_ipc_file(path):
            schema = ipc.open_file(str(path)).schema
        else:
            with pa.OSFile(str(path)) as f:
                schema = ipc.open_stream(f).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not an Arrow IPC stream or file ({exc})") from None
    missing = [n for n in _REQUIRED_FIELDS if n not in schema.names]
    if missing:
        raise UserError(f"{path}: not a DVID export-shards file, missing column(s) {missing}")
    return schema


def _scan_messages(path: Path, schema: pa.Schema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, size, rows) of every record-batch message, by walking headers via a mmap.

    Bodies are mapped, not read: only used for sidecars without byte offsets. An IPC file
    is the same messages after its 8-byte magic (then an end marker and the footer).
    """
    offs, sizes, rows = [], [], []
    with pa.memory_map(str(path)) as mm:
        if _is_ipc_file(path):
            mm.seek(8)
        reader = ipc.MessageReader.open_stream(mm)
        while True:
            start = mm.tell()
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            if msg.type == "record batch":
                batch = ipc.read_record_batch(msg, schema)
                offs.append(start)
                sizes.append(mm.tell() - start)
                rows.append(batch.num_rows)
    return (
        np.asarray(offs, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        np.asarray(rows, dtype=np.int64),
    )


def _read_sidecar(csv_path: Path, arrow: _ShardFile, note) -> dict[str, np.ndarray]:
    """x, y, z, offset, size, row arrays of one shard from its CSV (any known header).

    DVID opens sidecars with O_APPEND, so a rerun into the same directory appends a second
    comment + header + rows: the repeated lines are dropped (``note``d). A row whose byte
    range, row or coordinates cannot be right (DVID writes the row before the record: a
    failed write leaves a dangling row) is dropped and noted, never the whole shard."""
    schema_size = None
    try:
        text = csv_path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read sidecar {csv_path}: {exc}") from None
    lines = text.splitlines(keepends=True)
    first = lines[0] if lines else b""
    skip = 0
    if first.startswith(b"#"):
        m = re.match(rb"#\s*schema_size\s*=\s*(\d+)", first)
        if not m:
            raise UserError(f"{csv_path}: unrecognized comment line {first[:80]!r}")
        schema_size = int(m.group(1))
        skip = 1
    header = lines[skip] if len(lines) > skip else b""
    body = [ln for ln in lines[skip + 1:] if not ln.startswith(b"#") and ln != header]
    if len(body) != len(lines) - skip - 1:
        note("sidecar_rerun", csv_path, None,
             f"{len(lines) - skip - 1 - len(body)} repeated comment/header lines (the export ran "
             "again into this directory: its sidecar and shard were appended to)")
    try:
        table = pacsv.read_csv(
            io.BytesIO(header + b"".join(body)),
            read_options=pacsv.ReadOptions(),
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "x": pa.int64(),
                    "y": pa.int64(),
                    "z": pa.int64(),
                    "rec": pa.int64(),
                    "offset": pa.int64(),
                    "size": pa.int64(),
                    "batch_idx": pa.int64(),
                }
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{csv_path}: bad sidecar CSV ({exc})") from None
    cols = table.column_names
    col = {n: table.column(n).to_numpy() for n in cols}
    n = table.num_rows
    if cols[:3] != ["x", "y", "z"]:
        raise UserError(f"{csv_path}: sidecar header must start with x,y,z, got {cols}")
    if "offset" in col and "size" in col:
        off, size = col["offset"], col["size"]
        row = col.get("batch_idx", np.zeros(n, dtype=np.int64))
    elif "rec" in col:
        # x,y,z,rec: rec is the global row number in the stream; find messages by walking them
        moff, msize, mrows = _scan_messages(arrow.path, arrow.schema)
        first_row = np.concatenate([[0], np.cumsum(mrows)])
        rec = col["rec"]
        if n and (rec.min() < 0 or rec.max() >= first_row[-1]):
            raise UserError(
                f"{csv_path}: rec values outside the {first_row[-1]} rows of {arrow.path}"
            )
        msg = np.searchsorted(first_row, rec, side="right") - 1
        off, size, row = moff[msg], msize[msg], rec - first_row[msg]
    else:
        raise UserError(
            f"{csv_path}: unknown sidecar header {cols} "
            "(expected x,y,z,offset,size,batch_idx or x,y,z,rec[,offset,size])"
        )
    if schema_size is not None and n and off.min() < schema_size:
        raise UserError(f"{csv_path}: a block offset lies inside the {schema_size}-byte schema")
    dangling = (off + size > arrow.size) & (off >= 0) & (size > 8)
    bad = (off < 0) | (size <= 8) | (row < 0)
    bad |= (col["x"] < 0) | (col["y"] < 0) | (col["z"] < 0)
    bad |= (col["x"] >= 2**31) | (col["y"] >= 2**31) | (col["z"] >= 2**31)
    for mask, kind, why in ((dangling, "dangling_row", f"the sidecar row points past the end of "
                             f"the {arrow.size}-byte {arrow.path.name}: no record was written for it"),
                            (bad & ~dangling, "bad_row", "the sidecar row has a bad byte range, "
                             "row or coordinate")):
        for i in np.flatnonzero(mask).tolist():
            note(kind, csv_path, (int(col["x"][i]), int(col["y"][i]), int(col["z"][i])),
                 f"data row {i + 1}: {why}; block not exported")
    keep = ~(bad | dangling)
    d = {"x": col["x"], "y": col["y"], "z": col["z"], "offset": off, "size": size, "row": row}
    return {k: v[keep] for k, v in d.items()} if not keep.all() else d
