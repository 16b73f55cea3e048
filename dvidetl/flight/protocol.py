"""The dvidetl Flight contract: tickets, descriptors, action bodies and wire schemas.

Everything that crosses the wire between a Flight server (the dvidetl reference server, or
DVID's Go server later) and the dvidetl workers is defined here, and written down for DVID's
developers in ``docs/flight-protocol.md``. Tickets are small JSON documents with a version
field so the contract can evolve; the server validates every field against the volume it
serves before touching the source, so a source may assume a scale exists and
``0 <= lo < hi <= morton_end``.

Validation happens in two steps, because the first needs no volume and the second does:

* :func:`parse_ticket` / :func:`parse_json_body` — structure: size, JSON, version, kind, types;
* :meth:`BlocksTicket.validate` etc. — meaning: uuid, instance, scale, range clipped to grid.

Every failure is a :class:`TicketError` (a `UserError`) whose message names the field; the
server returns it as gRPC ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from dvidetl.errors import UserError
from dvidetl.geometry import KEY_END, VolumeInfo
from dvidetl.sources.base import (
    ANOMALIES_SCHEMA,
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    KEY_KINDS,
    MAPPING_SCHEMA,
    KeyCounts,
)

#: Version of the ticket / descriptor / action-body JSON. Bumped on incompatible changes.
PROTOCOL_VERSION = 1
#: Largest ticket, descriptor command or action body accepted, in bytes.
MAX_TICKET_BYTES = 4096
#: Default bound on the bytes of one streamed record batch (a larger single block goes alone).
MAX_BATCH_BYTES = 8 << 20
#: Largest number of supervoxels in one DoExchange("map") request batch.
MAX_MAP_BATCH_ROWS = 1 << 22
#: Largest accepted uuid / instance string.
MAX_UUID_CHARS = 64
MAX_INSTANCE_CHARS = 256

#: Starts the message of an INTERNAL error a server raises deliberately (a server bug, a
#: source breaking its contract): clients do **not** retry those, unlike transport-level
#: INTERNAL errors (see docs/flight-protocol.md, "Errors").
SERVER_ERROR_PREFIX = "dvidetl server error in"

#: Ticket kinds for DoGet (``anomalies``: added in protocol 1 without a version change — a
#: server that predates it answers INVALID_ARGUMENT, which clients take as "none reported").
KINDS = ("blocks", "mapping", "indices", "anomalies")
#: DoAction types.
ACTION_INFO = "info"
ACTION_COUNT = "count"
ACTION_COUNT_KEYS = "count_keys"
ACTIONS = {
    ACTION_INFO: "Volume description (VolumeInfo JSON). Body: {} or {v, uuid, instance}.",
    ACTION_COUNT: "Blocks per aligned Morton cell (code >> level). Body: {v, uuid, instance, "
    "scale, level}. Answer: Arrow IPC stream(s) of (cell uint64, count uint64), "
    "schema metadata exact=true|false.",
    ACTION_COUNT_KEYS: "Body labels (kind indices), supervoxels (kind mapping) or anomaly "
    "numbers (kind anomalies) per aligned cell (key >> level) of [lo, hi). Body: {v, uuid, instance, kind, level, lo?, hi?}. Answer: "
    "Arrow IPC stream(s) of (cell uint64, count uint64, rows uint64), metadata exact=true|false.",
}
#: the count bodies' key for ``cell_bits`` (the low Morton / key bits a cell spans): named
#: ``level`` in protocol v1, kept so v1 servers and clients of other makers still agree
WIRE_CELL_BITS = "level"
#: DoExchange command kinds.
EXCHANGE_MAP = "map"
#: the requests a source sends its store to read each partition (``plan`` shows them)
EXCHANGE_REQUESTS = "requests"
EXCHANGES = (EXCHANGE_MAP, EXCHANGE_REQUESTS)

#: Schemas of the answers that are not defined by the sources.
MAP_REQUEST_SCHEMA = pa.schema([("supervoxel", pa.uint64())])
MAP_RESPONSE_SCHEMA = pa.schema([("body", pa.uint64())])
COUNT_SCHEMA = pa.schema([("cell", pa.uint64()), ("count", pa.uint64())])
KEY_COUNT_SCHEMA = pa.schema([("cell", pa.uint64()), ("count", pa.uint64()), ("rows", pa.uint64())])
#: DoExchange("requests"): partitions in, the source's requests to read each one out
REQUESTS_REQUEST_SCHEMA = pa.schema(
    [("kind", pa.string()), ("scale", pa.uint8()), ("lo", pa.uint64()), ("hi", pa.uint64())])
REQUESTS_RESPONSE_SCHEMA = pa.schema([("requests", pa.uint64())])

__all__ = [
    "PROTOCOL_VERSION",
    "SERVER_ERROR_PREFIX",
    "MAX_TICKET_BYTES",
    "MAX_BATCH_BYTES",
    "KINDS",
    "TicketError",
    "BlocksTicket",
    "MappingTicket",
    "IndicesTicket",
    "AnomaliesTicket",
    "Ticket",
    "VolumeRef",
    "CountRequest",
    "CountKeysRequest",
    "parse_count_keys_request",
    "parse_exchange_command",
    "parse_requests_batch",
    "requests_command",
    "REQUESTS_REQUEST_SCHEMA",
    "REQUESTS_RESPONSE_SCHEMA",
    "KEY_COUNT_SCHEMA",
    "key_count_to_ipc",
    "key_count_from_ipc",
    "parse_ticket",
    "parse_json_body",
    "parse_volume_ref",
    "parse_count_request",
    "parse_descriptor",
    "blocks_schema",
    "mapping_schema",
    "indices_schema",
    "anomalies_schema",
    "ANOMALIES_SCHEMA",
    "BLOCKS_WIRE_SCHEMA",
    "MAPPING_SCHEMA",
    "INDICES_SCHEMA",
    "MAP_REQUEST_SCHEMA",
    "MAP_RESPONSE_SCHEMA",
    "COUNT_SCHEMA",
    "count_to_ipc",
    "count_from_ipc",
]


class TicketError(UserError):
    """A ticket, descriptor or action body is malformed or asks for something not served.

    The message always names the offending field (``field 'lo': ...``); the server sends it
    back as Flight ``INVALID_ARGUMENT``.
    """

    def __init__(self, field: str, why: str):
        self.field = field
        self.why = why
        super().__init__(f"invalid ticket: field {field!r}: {why}")


# ---------------------------------------------------------------------------------------
# field checks
# ---------------------------------------------------------------------------------------

#: a version: a UUID or any name a source resolves (DVID: a prefix, ``PREFIX:BRANCH``,
#: ``:BRANCH``, ``PREFIX:BRANCH~N``)
_UUID_RE = re.compile(r"^[A-Za-z0-9:][A-Za-z0-9_.:~-]*$")


def _int(d: dict, name: str, lo: int, hi: int) -> int:
    """An integer field in ``[lo, hi]`` (booleans and floats are not integers)."""
    if name not in d:
        raise TicketError(name, "missing")
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TicketError(name, f"must be an integer, got {type(v).__name__} {v!r:.40}")
    if v < lo or v > hi:
        raise TicketError(name, f"{v} out of range [{lo}, {hi}]")
    return v


def _str(d: dict, name: str, max_chars: int) -> str:
    if name not in d:
        raise TicketError(name, "missing")
    v = d[name]
    if not isinstance(v, str):
        raise TicketError(name, f"must be a string, got {type(v).__name__}")
    if not v:
        raise TicketError(name, "empty")
    if len(v) > max_chars:
        raise TicketError(name, f"longer than {max_chars} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise TicketError(name, "contains control characters")
    return v


def _uuid(d: dict) -> str:
    v = _str(d, "uuid", MAX_UUID_CHARS)
    if v != "*" and not _UUID_RE.match(v):
        raise TicketError("uuid", f"{v!r} is not a version UUID (letters, digits, _ . : ~ -)")
    return v


def _check_keys(d: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise TicketError(
            extra[0], f"unknown field in {what} (allowed: {', '.join(sorted(allowed))})"
        )


def parse_json_body(raw: bytes | str, what: str = "ticket") -> dict[str, Any]:
    """Decode a JSON object of at most MAX_TICKET_BYTES with a supported version field."""
    if isinstance(raw, str):
        raw = raw.encode()
    raw = bytes(raw)
    if len(raw) > MAX_TICKET_BYTES:
        raise TicketError(what, f"{len(raw)} bytes, more than the limit of {MAX_TICKET_BYTES}")
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TicketError(what, f"not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise TicketError(what, "JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise TicketError(what, f"must be a JSON object, got {type(d).__name__}")
    _version(d)
    return d


def _version(d: dict) -> int:
    if "v" not in d:
        raise TicketError("v", f"missing (protocol version, use {PROTOCOL_VERSION})")
    v = d["v"]
    if isinstance(v, bool) or not isinstance(v, int) or v != PROTOCOL_VERSION:
        raise TicketError(
            "v", f"unsupported protocol version {v!r} (this server speaks {PROTOCOL_VERSION})"
        )
    return v


def _check_volume(uuid: str, instance: str, info: VolumeInfo) -> None:
    if info.uuid != "*" and uuid != info.uuid:
        asked = f", asked for as {info.requested_uuid!r}" if info.requested_uuid not in (
            None, info.uuid) else ""
        raise TicketError("uuid", f"{uuid!r} is not served here (serving {info.uuid!r}{asked})")
    if instance != info.instance:
        raise TicketError(
            "instance", f"{instance!r} is not served here (serving {info.instance!r})"
        )


def _check_scale(scale: int, info: VolumeInfo):
    try:
        return info.scale(scale)
    except KeyError:
        have = sorted(s.scale for s in info.scales)
        raise TicketError("scale", f"scale {scale} does not exist (scales {have})") from None


# ---------------------------------------------------------------------------------------
# tickets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeRef:
    """Names one labelmap instance at one version: the common part of every request."""

    uuid: str
    instance: str

    def validate(self, info: VolumeInfo) -> VolumeRef:
        """The served volume, named by its full uuid or any name it answers to (a DVID UUID
        prefix or branch the source was asked for): the answer carries the full uuid, which
        every ticket after it uses."""
        if info.uuid != "*" and info.answers_to(self.uuid):
            _check_volume(info.uuid, self.instance, info)
        else:
            _check_volume(self.uuid, self.instance, info)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "uuid": self.uuid, "instance": self.instance}

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())


def _dumps(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Versioned:
    """``to_dict`` / ``to_json`` of a ticket: its fields and the protocol version."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["v"] = PROTOCOL_VERSION
        return d

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())


@dataclass(frozen=True)
class BlocksTicket(_Versioned):
    """Stored blocks of one scale with ``lo <= morton < hi``."""

    uuid: str
    instance: str
    scale: int
    lo: int
    hi: int
    kind: str = "blocks"

    def validate(self, info: VolumeInfo) -> BlocksTicket:
        """Check against the served volume; returns the ticket with ``hi`` clipped to the grid."""
        _check_volume(self.uuid, self.instance, info)
        sc = _check_scale(self.scale, info)
        if self.lo >= self.hi:
            raise TicketError("hi", f"empty range: lo={self.lo} >= hi={self.hi}")
        end = sc.morton_end
        if self.lo >= end:
            raise TicketError(
                "lo", f"{self.lo} is past the last Morton code of scale {self.scale} (end {end})"
            )
        return replace(self, hi=min(self.hi, end))


@dataclass(frozen=True)
class MappingTicket:
    """Non-identity supervoxel -> body pairs of supervoxels ``lo <= sv < hi`` (default all;
    ``lo``/``hi`` are sent only when they narrow the range, so a whole-mapping ticket reads
    the same as before ranges existed)."""

    uuid: str
    instance: str
    kind: str = "mapping"
    lo: int = 0
    hi: int = KEY_END

    def validate(self, info: VolumeInfo) -> MappingTicket:
        _check_volume(self.uuid, self.instance, info)
        if not info.has_mapping:
            raise TicketError("kind", "this volume serves no mapping")
        if self.lo >= self.hi:
            raise TicketError("hi", f"empty supervoxel range: lo={self.lo} >= hi={self.hi}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.lo == 0:
            del d["lo"]
        if self.hi >= KEY_END - 1:
            del d["hi"]
        d["v"] = PROTOCOL_VERSION
        return d

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())


@dataclass(frozen=True)
class IndicesTicket(_Versioned):
    """Label indices of body labels ``lo <= label < hi`` (hi may be 2**64)."""

    uuid: str
    instance: str
    lo: int
    hi: int
    kind: str = "indices"

    def validate(self, info: VolumeInfo) -> IndicesTicket:
        _check_volume(self.uuid, self.instance, info)
        if not info.has_indices:
            raise TicketError("kind", "this volume serves no label indices")
        if self.lo >= self.hi:
            raise TicketError("hi", f"empty label range: lo={self.lo} >= hi={self.hi}")
        return self


@dataclass(frozen=True)
class AnomaliesTicket(_Versioned):
    """The source's anomalies numbered ``lo <= seq < hi`` (see ``ANOMALIES_SCHEMA``): what
    it found wrong in its input, stored with the export. Every volume answers (a source
    without anomalies answers none)."""

    uuid: str
    instance: str
    lo: int = 0
    hi: int = KEY_END
    kind: str = "anomalies"

    def validate(self, info: VolumeInfo) -> AnomaliesTicket:
        _check_volume(self.uuid, self.instance, info)
        if self.lo >= self.hi:
            raise TicketError("hi", f"empty anomaly range: lo={self.lo} >= hi={self.hi}")
        return self


Ticket = BlocksTicket | MappingTicket | IndicesTicket | AnomaliesTicket


def parse_ticket(raw: bytes | str) -> Ticket:
    """Structure of a DoGet ticket (size, JSON, version, kind, field types and ranges)."""
    d = parse_json_body(raw, "ticket")
    kind = d.get("kind")
    if kind not in KINDS:
        raise TicketError("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    uuid = _uuid(d)
    instance = _str(d, "instance", MAX_INSTANCE_CHARS)
    common = {"v", "kind", "uuid", "instance"}
    if kind == "blocks":
        _check_keys(d, common | {"scale", "lo", "hi"}, "blocks ticket")
        scale = _int(d, "scale", 0, 63)
        lo = _int(d, "lo", 0, KEY_END - 1)
        hi = _int(d, "hi", 0, KEY_END)
        if lo >= hi:
            raise TicketError("hi", f"empty range: lo={lo} >= hi={hi}")
        return BlocksTicket(uuid, instance, scale, lo, hi)
    if kind == "mapping":
        _check_keys(d, common | {"lo", "hi"}, "mapping ticket")
        lo = _int(d, "lo", 0, KEY_END - 1) if "lo" in d else 0
        hi = _int(d, "hi", 0, KEY_END) if "hi" in d else KEY_END
        if lo >= hi:
            raise TicketError("hi", f"empty supervoxel range: lo={lo} >= hi={hi}")
        return MappingTicket(uuid, instance, lo=lo, hi=hi)
    _check_keys(d, common | {"lo", "hi"}, f"{kind} ticket")
    lo = _int(d, "lo", 0, KEY_END - 1)
    hi = _int(d, "hi", 0, KEY_END)
    if lo >= hi:
        raise TicketError("hi", f"empty {'label' if kind == 'indices' else 'anomaly'} range: "
                                f"lo={lo} >= hi={hi}")
    return (IndicesTicket if kind == "indices" else AnomaliesTicket)(uuid, instance, lo, hi)


# ---------------------------------------------------------------------------------------
# descriptors and action bodies
# ---------------------------------------------------------------------------------------


def parse_volume_ref(raw: bytes | str | None, what: str = "body") -> VolumeRef | None:
    """``{v, uuid, instance}``; an empty body means "whatever is served" (returns None)."""
    if raw is None or len(raw) == 0:
        return None
    d = parse_json_body(raw, what)
    _check_keys(d, {"v", "uuid", "instance", "kind"}, what)
    return VolumeRef(_uuid(d), _str(d, "instance", MAX_INSTANCE_CHARS))


@dataclass(frozen=True)
class CountRequest:
    """Body of DoAction("count"): blocks per ``morton >> cell_bits`` cell of one scale
    (``cell_bits`` travels as ``"level"``, its name in protocol v1)."""

    uuid: str
    instance: str
    scale: int
    cell_bits: int

    def validate(self, info: VolumeInfo) -> CountRequest:
        _check_volume(self.uuid, self.instance, info)
        _check_scale(self.scale, info)
        return self

    def to_json(self) -> bytes:
        return _count_json(self)


def parse_count_request(raw: bytes | str) -> CountRequest:
    d = parse_json_body(raw, "count body")
    _check_keys(d, {"v", "uuid", "instance", "scale", WIRE_CELL_BITS}, "count body")
    return CountRequest(
        _uuid(d),
        _str(d, "instance", MAX_INSTANCE_CHARS),
        _int(d, "scale", 0, 63),
        _int(d, WIRE_CELL_BITS, 0, 64),
    )


@dataclass(frozen=True)
class CountKeysRequest:
    """Body of DoAction("count_keys"): body labels (``indices``), supervoxels (``mapping``)
    or anomaly numbers (``anomalies``) per ``key >> cell_bits`` cell of ``[lo, hi)``, with
    the output rows of each cell (``cell_bits`` travels as ``"level"``)."""

    uuid: str
    instance: str
    kind: str
    cell_bits: int
    lo: int = 0
    hi: int = KEY_END

    def validate(self, info: VolumeInfo) -> CountKeysRequest:
        _check_volume(self.uuid, self.instance, info)
        if self.kind == "indices" and not info.has_indices:
            raise TicketError("kind", "this volume serves no label indices")
        if self.kind == "mapping" and not info.has_mapping:
            raise TicketError("kind", "this volume serves no mapping")
        return self

    def to_json(self) -> bytes:
        return _count_json(self)


def _count_json(req: CountRequest | CountKeysRequest) -> bytes:
    d = asdict(req)
    d[WIRE_CELL_BITS] = d.pop("cell_bits")
    d["v"] = PROTOCOL_VERSION
    return _dumps(d)


def parse_count_keys_request(raw: bytes | str) -> CountKeysRequest:
    d = parse_json_body(raw, "count_keys body")
    _check_keys(d, {"v", "uuid", "instance", "kind", WIRE_CELL_BITS, "lo", "hi"}, "count_keys body")
    kind = d.get("kind")
    if kind not in KEY_KINDS:
        raise TicketError("kind", f"{kind!r} is not one of {', '.join(KEY_KINDS)}")
    lo = _int(d, "lo", 0, KEY_END - 1) if "lo" in d else 0
    hi = _int(d, "hi", 0, KEY_END) if "hi" in d else KEY_END
    if lo >= hi:
        raise TicketError("hi", f"empty key range: lo={lo} >= hi={hi}")
    return CountKeysRequest(
        _uuid(d), _str(d, "instance", MAX_INSTANCE_CHARS), kind, _int(d, WIRE_CELL_BITS, 0, 64), lo, hi
    )


def parse_descriptor(
    cmd: bytes | None, path: list[bytes | str] | None, what: str
) -> VolumeRef | None:
    """A FlightDescriptor naming a volume: command ``{v, uuid, instance}`` JSON, or the path
    ``[uuid, instance]``. An empty command means whatever the server serves."""
    if path:
        parts = [p.decode() if isinstance(p, bytes) else p for p in path]
        if len(parts) != 2:
            raise TicketError(
                "path", f"descriptor path must be [uuid, instance], got {len(parts)} parts"
            )
        d = {"uuid": parts[0], "instance": parts[1]}
        return VolumeRef(_uuid(d), _str(d, "instance", MAX_INSTANCE_CHARS))
    if cmd is not None and len(cmd) and bytes(cmd).strip() in (b"map",):
        return None
    ref = parse_volume_ref(cmd, what)
    return ref


def parse_exchange_command(cmd: bytes | None) -> tuple[str, VolumeRef | None]:
    """DoExchange descriptor: ``{v, kind, uuid, instance}`` with kind ``map`` or
    ``requests`` (or the bare word ``map``, meaning the served volume): (kind, volume)."""
    if cmd is None or len(cmd) == 0:
        raise TicketError("command", 'DoExchange needs a command descriptor {"kind": "map", ...}')
    if bytes(cmd).strip() == b"map":
        return EXCHANGE_MAP, None
    d = parse_json_body(cmd, "command")
    kind = d.get("kind")
    if kind not in EXCHANGES:
        raise TicketError("kind", f"DoExchange supports kinds {', '.join(EXCHANGES)}, got {kind!r}")
    _check_keys(d, {"v", "kind", "uuid", "instance"}, f"{kind} command")
    return kind, VolumeRef(_uuid(d), _str(d, "instance", MAX_INSTANCE_CHARS))


def parse_map_command(cmd: bytes | None) -> VolumeRef | None:
    """DoExchange descriptor of a ``map`` exchange (see ``parse_exchange_command``)."""
    kind, ref = parse_exchange_command(cmd)
    if kind != EXCHANGE_MAP:
        raise TicketError("kind", f"DoExchange supports kind 'map' only, got {kind!r}")
    return ref


def map_command(uuid: str, instance: str) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "kind": EXCHANGE_MAP, "uuid": uuid, "instance": instance})


def requests_command(uuid: str, instance: str) -> bytes:
    return _dumps({"v": PROTOCOL_VERSION, "kind": EXCHANGE_REQUESTS, "uuid": uuid,
                   "instance": instance})


def parse_requests_batch(batch: pa.RecordBatch, info: VolumeInfo) -> tuple[list, np.ndarray,
                                                                             np.ndarray, np.ndarray]:
    """One batch of a ``requests`` exchange, checked like tickets are: (kinds, scales, lo, hi);
    kinds are ticket kinds, block scales exist, every range is non-empty."""
    if batch.num_rows > MAX_MAP_BATCH_ROWS:
        raise TicketError("lo", f"{batch.num_rows} rows in one batch (limit {MAX_MAP_BATCH_ROWS})")
    if any(batch.column(i).null_count for i in range(batch.num_columns)):
        raise TicketError("lo", "null values in a requests batch")
    kinds = batch.column(0).to_pylist()
    scales, lo, hi = (batch.column(i).to_numpy() for i in (1, 2, 3))
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise TicketError("kind", f"{bad[0]!r} is not one of {', '.join(KINDS)}")
    for s in sorted({int(sc) for k, sc in zip(kinds, scales.tolist(), strict=True) if k == "blocks"}):
        _check_scale(s, info)
    if bool(np.any(lo >= hi)):
        i = int(np.argmax(lo >= hi))
        raise TicketError("hi", f"empty range: lo={int(lo[i])} >= hi={int(hi[i])}")
    return kinds, scales, lo, hi


# ---------------------------------------------------------------------------------------
# schemas with metadata
# ---------------------------------------------------------------------------------------


def _meta(info: VolumeInfo, uuid: str, kind: str, **extra: Any) -> dict[bytes, bytes]:
    m = {
        "dvidetl.protocol": str(PROTOCOL_VERSION),
        "kind": kind,
        "uuid": uuid,
        "instance": info.instance,
    }
    m.update({k: str(v) for k, v in extra.items()})
    return {k.encode(): v.encode() for k, v in m.items()}


def blocks_schema(info: VolumeInfo, uuid: str, scale: int, lo: int, hi: int) -> pa.Schema:
    """BLOCKS_WIRE_SCHEMA with the storage codec, uuid, instance, scale and range attached."""
    return BLOCKS_WIRE_SCHEMA.with_metadata(
        _meta(info, uuid, "blocks", codec=info.codec, scale=scale, lo=lo, hi=hi)
    )


def mapping_schema(info: VolumeInfo, uuid: str, lo: int = 0, hi: int = KEY_END) -> pa.Schema:
    return MAPPING_SCHEMA.with_metadata(_meta(info, uuid, "mapping", lo=lo, hi=hi))


def indices_schema(info: VolumeInfo, uuid: str, lo: int, hi: int) -> pa.Schema:
    return INDICES_SCHEMA.with_metadata(_meta(info, uuid, "indices", lo=lo, hi=hi))


def anomalies_schema(info: VolumeInfo, uuid: str, lo: int, hi: int) -> pa.Schema:
    return ANOMALIES_SCHEMA.with_metadata(_meta(info, uuid, "anomalies", lo=lo, hi=hi))


# ---------------------------------------------------------------------------------------
# count answers
# ---------------------------------------------------------------------------------------


def _columns_to_ipc(schema: pa.Schema, columns: list, exact: bool, max_rows: int) -> list[bytes]:
    """uint64 columns as Arrow IPC streams of at most ``max_rows`` rows each."""
    cols = [np.ascontiguousarray(c, dtype=np.uint64) for c in columns]
    schema = schema.with_metadata({b"exact": b"true" if exact else b"false"})
    out = []
    for start in range(0, max(len(cols[0]), 1), max_rows):
        batch = pa.record_batch([pa.array(c[start : start + max_rows]) for c in cols], schema=schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(batch)
        out.append(sink.getvalue().to_pybytes())
    return out


def _columns_from_ipc(parts: list[bytes], names: list[str]) -> tuple[list[np.ndarray], bool]:
    cols: list[list[np.ndarray]] = [[] for _ in names]
    exact = True
    for p in parts:
        t = pa.ipc.open_stream(pa.py_buffer(p)).read_all()
        meta = t.schema.metadata or {}
        exact = exact and meta.get(b"exact", b"true") == b"true"
        for acc, name in zip(cols, names, strict=True):
            acc.append(t.column(name).to_numpy().astype(np.uint64, copy=False))
    return [np.concatenate(c) if c else np.zeros(0, np.uint64) for c in cols], exact


def count_to_ipc(
    cells: np.ndarray, counts: np.ndarray, exact: bool, max_rows: int = 1 << 19
) -> list[bytes]:
    """The count answer as Arrow IPC streams of at most ``max_rows`` rows each (8 MiB)."""
    return _columns_to_ipc(COUNT_SCHEMA, [cells, counts], exact, max_rows)


def count_from_ipc(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Inverse of :func:`count_to_ipc` (concatenates the parts in order)."""
    (cells, counts), exact = _columns_from_ipc(parts, ["cell", "count"])
    return cells, counts, exact


def key_count_to_ipc(cells, counts, rows, exact: bool, max_rows: int = 1 << 18) -> list[bytes]:
    """The count_keys answer as Arrow IPC streams (6 MiB each at most)."""
    return _columns_to_ipc(KEY_COUNT_SCHEMA, [cells, counts, rows], exact, max_rows)


def key_count_from_ipc(parts: list[bytes]) -> KeyCounts:
    """Inverse of :func:`key_count_to_ipc`."""
    (cells, counts, rows), exact = _columns_from_ipc(parts, ["cell", "count", "rows"])
    return KeyCounts(cells, counts, rows, exact)
