"""The reference Arrow Flight server: a thin, strict adapter from the Flight contract to a Source.

DVID's Go server does not speak Flight yet, so dvidetl ships this one (``python -m dvidetl
serve``) and the export pipeline embeds it in-process (`start_server`) for its default run.
The server validates every ticket against the served volume before the source sees it,
re-cuts the source's batches to a bounded size (so a gRPC message never grows without
bound), checks the source keeps its promises (ascending codes inside the range), and maps
errors to Flight status codes a client can act on:

* bad ticket / body / descriptor -> ``INVALID_ARGUMENT`` (message names the field);
* missing or wrong bearer token   -> ``UNAUTHENTICATED`` (on every call);
* source I/O trouble (OSError)    -> ``UNAVAILABLE`` (the client retries);
* anything else                   -> ``INTERNAL``.

The contract itself is in ``docs/flight-protocol.md`` and `dvidetl.flight.protocol`.
"""

from __future__ import annotations

import functools
import hmac
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from dvidetl.batching import cut_points
from dvidetl.errors import SourceUnavailable, UserError
from dvidetl.flight import protocol as P
from dvidetl.geometry import KEY_END, VolumeInfo, in_grid, morton_encode
from dvidetl.sources.base import Source, count_sorted

log = logging.getLogger(__name__)

SERVER_ERROR_PREFIX = P.SERVER_ERROR_PREFIX

__all__ = ["DvidFlightServer", "RunningServer", "start_server", "bounded_batches", "prefetched"]


# ---------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------


class _BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Rejects every call (including ListActions and Handshake) without the bearer token.

    The comparison is constant-time; the token is never logged nor put in an error message.
    """

    def __init__(self, token: str):
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def __repr__(self) -> str:
        return "<_BearerAuthFactory token=***>"

    def start_call(self, info, headers):
        values = headers.get("authorization") or headers.get("Authorization") or []
        ok = False
        for v in values:
            got = v.encode() if isinstance(v, str) else bytes(v)
            # compare_digest is constant-time for equal lengths; length itself is not secret
            ok |= hmac.compare_digest(got, self._expected)
        if not ok:
            raise flight.FlightUnauthenticatedError(
                "missing or wrong bearer token (send header 'authorization: Bearer <token>')"
            )
        return None


# ---------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------

#: fixed per-row overhead of a blocks row on the wire (x, y, z int32, morton uint64, offset)
_BLOCK_ROW_FIXED = 24


def _fixed_width(t: pa.DataType) -> int:
    try:
        return max(t.bit_width // 8, 1)
    except ValueError:  # variable width
        return 0


def _row_bytes(batch: pa.RecordBatch, data_col: str | None) -> np.ndarray:
    """Approximate wire bytes per row: fixed columns + the binary payload (from offsets)."""
    n = batch.num_rows
    fixed = sum(_fixed_width(f.type) for f in batch.schema)
    if data_col is None:
        return np.full(n, fixed, dtype=np.int64)
    arr = batch.column(data_col)
    off_dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_dtype, count=arr.offset + n + 1)[
        arr.offset :
    ]
    return np.diff(offsets).astype(np.int64) + (fixed + 4)


def bounded_batches(
    batches: Iterable[pa.RecordBatch],
    max_bytes: int = P.MAX_BATCH_BYTES,
    data_col: str | None = "data",
) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of batches so each is at most ``max_bytes`` (a single larger row goes
    alone), coalescing small neighbours so a source yielding tiny batches still streams well.

    Cut points come from `dvidetl.batching.cut_points` (no per-row Python).
    """
    pending: list[pa.RecordBatch] = []
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        out = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
        pending, pending_bytes = [], 0
        return out

    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        sizes = _row_bytes(batch, data_col)
        cuts = cut_points(sizes, max_bytes)
        piece_bytes = np.add.reduceat(sizes, cuts[:-1]).tolist()
        c = cuts.tolist()
        for start, end, nbytes in zip(c[:-1], c[1:], piece_bytes, strict=True):
            piece = batch.slice(start, end - start) if (start, end) != (0, n) else batch
            if pending and pending_bytes + nbytes > max_bytes:
                yield flush()
            pending.append(piece)
            pending_bytes += nbytes
            if pending_bytes >= max_bytes // 2:
                yield flush()
    if pending:
        yield flush()


# ---------------------------------------------------------------------------------------
# error mapping
# ---------------------------------------------------------------------------------------


def _flight_errors(fn: Callable) -> Callable:
    """Translate exceptions raised while *starting* a call into Flight statuses."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            raise _to_flight_error(exc, fn.__name__) from None

    return wrapper


def _to_flight_error(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, (flight.FlightError, pa.ArrowInvalid)):
        return exc
    if isinstance(exc, SourceUnavailable):  # before UserError: DvidUnavailable is both
        log.warning("%s: source unavailable: %s", where, exc)
        return flight.FlightUnavailableError(f"source unavailable: {exc}")
    if isinstance(exc, UserError):  # incl. TicketError
        log.info("%s: rejected: %s", where, exc)
        return pa.ArrowInvalid(str(exc))
    if isinstance(exc, (OSError, TimeoutError)):
        log.warning("%s: source unavailable: %s", where, exc)
        return flight.FlightUnavailableError(f"source unavailable: {type(exc).__name__}: {exc}")
    log.exception("%s: internal error", where)
    return flight.FlightInternalError(f"{SERVER_ERROR_PREFIX} {where}: {type(exc).__name__}: {exc}")


def _guarded(
    gen: Iterator[pa.RecordBatch], where: str, stopping: threading.Event | None = None
) -> Iterator[pa.RecordBatch]:
    """Errors raised mid-stream (inside the source) get the same status mapping; a stream
    still running when the server stops ends with UNAVAILABLE (clients retry elsewhere)."""
    try:
        for batch in gen:
            if stopping is not None and stopping.is_set():
                raise flight.FlightUnavailableError("the Flight server is shutting down")
            yield batch
    except GeneratorExit:
        raise
    except Exception as exc:
        raise _to_flight_error(exc, where) from None


_END = object()


def prefetched(
    gen: Iterator[pa.RecordBatch], depth: int = 2, name: str = "prefetch"
) -> Iterator[pa.RecordBatch]:
    """Run ``gen`` in a helper thread, up to ``depth`` batches ahead of the consumer.

    Why: gRPC writes a batch in the thread that produced it, so without this the source's
    work (reading, building batches) and the network never overlap. Exceptions travel to the
    consumer; when the consumer stops early (client cancelled), the helper is told to stop and
    the source generator is closed in the helper thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in gen:
                if not put(batch):
                    break
            else:
                put(_END)
        except BaseException as exc:  # forwarded to the consumer, re-raised there
            put(exc)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break


# ---------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------


class DvidFlightServer(flight.FlightServerBase):
    """Serves one Source (one labelmap instance at one UUID, or any UUID) over Arrow Flight.

    ``token``: require ``authorization: Bearer <token>`` on every call.
    ``max_batch_bytes``: bound on a streamed batch (a single larger block goes alone).
    ``check_source``: verify the source's blocks (ascending codes in range, x/y/z match).
    ``prefetch``: batches a helper thread prepares ahead of the network (0 = none): lets an
    I/O-bound source (dvid+http) overlap its reads with sending, on a host with idle cores.
    ``tls_certificates``: list of ``(cert_pem, key_pem)`` pairs (or ``flight.CertKeyPair``);
    the location scheme then becomes ``grpc+tls``.
    """

    def __init__(
        self,
        source: Source,
        location: str = "grpc://127.0.0.1:0",
        token: str | None = None,
        tls_certificates: list | None = None,
        *,
        max_batch_bytes: int = P.MAX_BATCH_BYTES,
        check_source: bool = True,
        prefetch: int = 0,
        **kwargs: Any,
    ):
        certs = None
        if tls_certificates:
            certs = [
                c if isinstance(c, flight.CertKeyPair) else flight.CertKeyPair(cert=c[0], key=c[1])
                for c in tls_certificates
            ]
            if location.startswith("grpc://") or location.startswith("grpc+tcp://"):
                location = "grpc+tls://" + location.split("://", 1)[1]
        middleware = dict(kwargs.pop("middleware", None) or {})
        if token is not None:
            if not token:
                raise UserError("the Flight token is empty")
            middleware["auth"] = _BearerAuthFactory(token)
        self._source = source
        try:
            self._info: VolumeInfo = source.info()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"cannot read the source's volume info: {type(exc).__name__}: {exc}"
            ) from exc
        self._max_batch_bytes = int(max_batch_bytes)
        self._check_source = check_source
        self._prefetch = int(prefetch)
        self._warned_zero = False
        #: set when the server is stopping: running streams end at their next batch
        self.stopping = threading.Event()
        self._scheme = location.split("://", 1)[0]
        self._host = location.split("://", 1)[1].rsplit(":", 1)[0]
        super().__init__(location, tls_certificates=certs, middleware=middleware or None, **kwargs)
        log.info(
            "serving %s/%s at %s (auth %s)",
            self._info.uuid,
            self._info.instance,
            self.location,
            "bearer token" if token else "none",
        )

    @property
    def location(self) -> str:
        """Where clients connect, e.g. ``grpc://127.0.0.1:40123`` (the real port if 0 was asked)."""
        return f"{self._scheme}://{self._host}:{self.port}"

    @property
    def volume_info(self) -> VolumeInfo:
        return self._info

    # -- helpers -------------------------------------------------------------------------

    def _info_for(self, ref: P.VolumeRef | None) -> VolumeInfo:
        """The served VolumeInfo as seen for ``ref`` (uuid filled in when the source is '*')."""
        if ref is None:
            return self._info
        ref.validate(self._info)
        if self._info.uuid == "*":
            return replace(self._info, uuid=ref.uuid)
        return self._info

    def _flight_info(
        self, ref: P.VolumeRef | None, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        info = self._info_for(ref)
        s0 = info.scales[0] if info.scales else None
        endpoints = [
            flight.FlightEndpoint(
                P.BlocksTicket(info.uuid, info.instance, sc.scale, 0, sc.morton_end).to_json(), []
            )
            for sc in info.scales
        ]
        schema = (
            P.blocks_schema(info, info.uuid, s0.scale, 0, s0.morton_end)
            if s0
            else P.BLOCKS_WIRE_SCHEMA
        )
        return flight.FlightInfo(
            schema,
            descriptor,
            endpoints,
            total_records=-1,
            total_bytes=-1,
            ordered=True,
            app_metadata=info.to_json().encode(),
        )

    # -- Flight methods ------------------------------------------------------------------

    @_flight_errors
    def get_flight_info(self, context, descriptor):
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            ref = P.parse_descriptor(None, descriptor.path, "descriptor")
        else:
            ref = P.parse_descriptor(descriptor.command, None, "descriptor")
        return self._flight_info(ref, descriptor)

    @_flight_errors
    def get_schema(self, context, descriptor):
        return flight.SchemaResult(self.get_flight_info(context, descriptor).schema)

    @_flight_errors
    def list_flights(self, context, criteria):
        info = self._info
        desc = flight.FlightDescriptor.for_path(info.uuid, info.instance)
        return iter([self._flight_info(None, desc)])

    @_flight_errors
    def list_actions(self, context):
        return list(P.ACTIONS.items())

    @_flight_errors
    def do_action(self, context, action):
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind == P.ACTION_INFO:
            ref = P.parse_volume_ref(body, "info body")
            return iter([flight.Result(self._info_for(ref).to_json().encode())])
        if kind == P.ACTION_COUNT:
            req = P.parse_count_request(body).validate(self._info)
            cells, counts, exact = self._source.count(req.scale, req.cell_bits)
            cells = np.asarray(cells, dtype=np.uint64)
            counts = np.asarray(counts, dtype=np.uint64)
            if cells.shape != counts.shape or cells.ndim != 1:
                raise RuntimeError(
                    f"source count() returned {cells.shape} cells but {counts.shape} counts"
                )
            if len(cells) > 1 and not bool(np.all(cells[1:] > cells[:-1])):
                raise RuntimeError(
                    "source count() broke its contract: cells must be ascending, unique"
                )
            return iter([flight.Result(p) for p in P.count_to_ipc(cells, counts, bool(exact))])
        if kind == P.ACTION_COUNT_KEYS:
            req = P.parse_count_keys_request(body).validate(self._info)
            if req.kind == "anomalies":  # counted here: sources only list them
                seq = self._anomalies_table().column("seq").to_numpy()
                kc = count_sorted(seq, None, req.cell_bits, req.lo, req.hi)
                return iter([flight.Result(p) for p in P.key_count_to_ipc(*kc)])
            count_keys = getattr(self._source, "count_keys", None)
            if count_keys is None:
                raise P.TicketError("action", f"source {type(self._source).__name__} cannot count keys")
            kc = count_keys(req.kind, req.cell_bits, req.lo, req.hi)
            cells, keys, rows = (np.asarray(a, dtype=np.uint64) for a in kc[:3])
            if not (cells.shape == keys.shape == rows.shape) or cells.ndim != 1:
                raise RuntimeError(f"source count_keys() returned arrays of shapes "
                                   f"{cells.shape}, {keys.shape}, {rows.shape}")
            if len(cells) > 1 and not bool(np.all(cells[1:] > cells[:-1])):
                raise RuntimeError("source count_keys() broke its contract: cells must be ascending, unique")
            return iter([flight.Result(p) for p in P.key_count_to_ipc(cells, keys, rows, bool(kc[3]))])
        raise P.TicketError("action", f"unknown action {kind!r} (known: {', '.join(P.ACTIONS)})")

    @_flight_errors
    def do_get(self, context, ticket):
        t = P.parse_ticket(ticket.ticket).validate(self._info)
        info = self._info_for(P.VolumeRef(t.uuid, t.instance))
        if isinstance(t, P.BlocksTicket):
            schema = P.blocks_schema(info, t.uuid, t.scale, t.lo, t.hi)
            gen = self._blocks(schema, t)
        elif isinstance(t, P.MappingTicket):
            schema = P.mapping_schema(info, t.uuid, t.lo, t.hi)
            gen = self._mapping(schema, t)
        elif isinstance(t, P.AnomaliesTicket):
            schema = P.anomalies_schema(info, t.uuid, t.lo, t.hi)
            gen = self._anomalies(schema, t)
        else:
            schema = P.indices_schema(info, t.uuid, t.lo, t.hi)
            gen = self._indices(schema, t)
        if self._prefetch:
            gen = prefetched(gen, self._prefetch, f"do_get-{t.kind}")
        return flight.GeneratorStream(schema, _guarded(gen, f"do_get {t.kind}", self.stopping))

    @_flight_errors
    def do_exchange(self, context, descriptor, reader, writer):
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise P.TicketError(
                "descriptor", 'DoExchange needs a command descriptor {"kind": "map", ...}'
            )
        kind, ref = P.parse_exchange_command(descriptor.command)
        info = self._info_for(ref)
        if kind == P.EXCHANGE_REQUESTS:
            return self._requests(info, reader, writer)
        if reader.schema is None or not reader.schema.remove_metadata().equals(
            P.MAP_REQUEST_SCHEMA
        ):
            raise P.TicketError(
                "schema",
                f"map request batches must have schema {P.MAP_REQUEST_SCHEMA} (got {reader.schema})",
            )
        out_schema = P.MAP_RESPONSE_SCHEMA.with_metadata(
            {b"dvidetl.protocol": str(P.PROTOCOL_VERSION).encode(), b"uuid": info.uuid.encode()}
        )
        writer.begin(out_schema)
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            batch = chunk.data
            if batch is None:
                continue
            if batch.num_rows > P.MAX_MAP_BATCH_ROWS:
                raise P.TicketError(
                    "supervoxel",
                    f"{batch.num_rows} rows in one batch (limit {P.MAX_MAP_BATCH_ROWS})",
                )
            col = batch.column(0)
            if col.null_count:
                raise P.TicketError("supervoxel", "null supervoxel ids")
            svs = col.to_numpy(zero_copy_only=False)
            bodies = np.asarray(self._source.map_supervoxels(svs), dtype=np.uint64)
            if bodies.shape != svs.shape:
                raise RuntimeError(f"source mapped {len(svs)} supervoxels to {bodies.shape} bodies")
            zero = svs == 0
            if zero.any() and bodies[zero].any():  # background is never a body, whatever the source says
                bodies = bodies.copy()
                if not self._warned_zero:
                    self._warned_zero = True
                    log.warning("source %s maps supervoxel 0 (background) to body %d: answered 0 "
                                "(DVID never maps it)", type(self._source).__name__,
                                int(bodies[zero][0]))
                bodies[zero] = 0
            writer.write_batch(pa.record_batch([pa.array(bodies)], schema=out_schema))

    def _requests(self, info: VolumeInfo, reader, writer) -> None:
        """DoExchange("requests"): for each batch of partitions, the requests the source
        sends its store to read each one (``Source.count_requests``), one batch back."""
        count = getattr(self._source, "count_requests", None)
        if count is None:
            raise P.TicketError("kind", f"source {type(self._source).__name__} cannot count "
                                "its requests")
        if reader.schema is None or not reader.schema.remove_metadata().equals(
                P.REQUESTS_REQUEST_SCHEMA):
            raise P.TicketError("schema", f"requests batches must have schema "
                                f"{P.REQUESTS_REQUEST_SCHEMA} (got {reader.schema})")
        writer.begin(P.REQUESTS_RESPONSE_SCHEMA)
        while True:
            try:
                batch = reader.read_chunk().data
            except StopIteration:
                break
            if batch is None:
                continue
            kinds, scales, lo, hi = P.parse_requests_batch(batch, info)
            out = np.zeros(len(kinds), np.uint64)
            for kind in set(kinds):
                sel = np.array([k == kind for k in kinds])
                for sc in np.unique(scales[sel]).tolist() if kind == "blocks" else [0]:
                    m = sel & (scales == sc) if kind == "blocks" else sel
                    got = np.asarray(count(kind, int(sc), lo[m], hi[m]), np.uint64)
                    if got.shape != (int(m.sum()),):
                        raise RuntimeError(f"source count_requests() answered {got.shape} for "
                                           f"{int(m.sum())} ranges")
                    out[m] = got
            writer.write_batch(pa.record_batch([pa.array(out)], schema=P.REQUESTS_RESPONSE_SCHEMA))

    # -- streams -------------------------------------------------------------------------

    def _conform(self, batch: pa.RecordBatch, schema: pa.Schema, what: str) -> pa.RecordBatch:
        bare = schema.remove_metadata()
        if not batch.schema.remove_metadata().equals(bare):
            if batch.schema.names != bare.names:
                raise RuntimeError(
                    f"source {what} yielded columns {batch.schema.names}, want {bare.names}"
                )
            batch = batch.cast(bare)
        if any(col.null_count for col in batch.columns):
            raise RuntimeError(f"source {what} yielded nulls (columns {batch.schema.names})")
        return batch.replace_schema_metadata(schema.metadata)

    def _simple(self, schema, batches, data_col, what) -> Iterator[pa.RecordBatch]:
        conformed = (self._conform(b, schema, what) for b in batches)
        yield from bounded_batches(conformed, self._max_batch_bytes, data_col)

    def _keys_check(self, keys: np.ndarray, lo: int, hi: int, last: int, what: str) -> int:
        """The source promised ascending keys inside [lo, hi): check it (vectorized)."""
        if len(keys) == 0:
            return last
        if (
            int(keys[0]) < lo
            or int(keys[-1]) >= hi
            or int(keys[0]) <= last
            or (len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])))
        ):
            raise RuntimeError(
                f"source {what} broke its contract: keys must be ascending, unique and in "
                f"[{lo}, {hi}) (got {int(keys[0])}..{int(keys[-1])} after {last})"
            )
        return int(keys[-1])

    def _blocks(self, schema: pa.Schema, t: P.BlocksTicket) -> Iterator[pa.RecordBatch]:
        last = -1
        grid = self._info.scale(t.scale).grid
        for batch in bounded_batches(
            (
                self._conform(b, schema, "read_blocks")
                for b in self._source.read_blocks(t.scale, t.lo, t.hi)
            ),
            self._max_batch_bytes,
            "data",
        ):
            if self._check_source:
                codes = batch.column("morton").to_numpy()
                last = self._keys_check(codes, t.lo, t.hi, last, "read_blocks")
                xyz = [batch.column(c).to_numpy() for c in ("x", "y", "z")]
                if not np.array_equal(morton_encode(xyz[0], xyz[1], xyz[2], grid), codes) or not bool(
                    np.all(in_grid(xyz[0], xyz[1], xyz[2], grid))
                ):
                    raise RuntimeError(
                        f"source read_blocks broke its contract: x, y, z do not match the "
                        f"morton codes of grid {grid} at scale {t.scale}"
                    )
            yield batch

    def _mapping(self, schema: pa.Schema, t: P.MappingTicket) -> Iterator[pa.RecordBatch]:
        whole = t.lo == 0 and t.hi >= KEY_END - 1
        # a source written before ranges existed still serves the whole mapping
        src = self._source.read_mapping() if whole else self._source.read_mapping(t.lo, t.hi)
        last = -1
        for batch in self._simple(schema, src, None, "read_mapping"):
            sv = batch.column("supervoxel").to_numpy()
            if (sv == 0).any():  # never a pair for background, whatever the source says
                keep = sv != 0
                log.warning("source %s lists a mapping pair for supervoxel 0 (background): "
                            "dropped (DVID never maps it)", type(self._source).__name__)
                batch = batch.filter(pa.array(keep))
                if batch.num_rows == 0:
                    continue
            if self._check_source and not whole:
                last = self._keys_check(batch.column("supervoxel").to_numpy(), t.lo, t.hi, last,
                                        "read_mapping")
            yield batch

    def _anomalies_table(self) -> pa.Table:
        """The source's anomalies (``Source.anomalies_table``, optional: none without it),
        checked against the contract: the schema, and ``seq`` numbering the rows from 0."""
        get = getattr(self._source, "anomalies_table", None)
        t = get() if get is not None else None
        if t is None:
            return P.ANOMALIES_SCHEMA.empty_table()
        if not t.schema.remove_metadata().equals(P.ANOMALIES_SCHEMA):
            raise RuntimeError(f"source anomalies_table() has schema {t.schema}, want {P.ANOMALIES_SCHEMA}")
        if not np.array_equal(t.column("seq").to_numpy(), np.arange(t.num_rows, dtype=np.uint64)):
            raise RuntimeError("source anomalies_table() broke its contract: seq must be 0, 1, ...")
        return t

    def _anomalies(self, schema: pa.Schema, t: P.AnomaliesTicket) -> Iterator[pa.RecordBatch]:
        """Rows ``lo <= seq < hi`` (nulls allowed: an anomaly need not be about one block)."""
        table = self._anomalies_table()
        lo, hi = min(t.lo, table.num_rows), min(t.hi, table.num_rows)
        for b in table.slice(lo, hi - lo).to_batches(max_chunksize=1 << 16):
            yield b.replace_schema_metadata(schema.metadata)

    def _indices(self, schema: pa.Schema, t: P.IndicesTicket) -> Iterator[pa.RecordBatch]:
        last = -1
        for batch in bounded_batches(
            (
                self._conform(b, schema, "read_indices")
                for b in self._source.read_indices(t.lo, t.hi)
            ),
            self._max_batch_bytes,
            "data",
        ):
            if self._check_source:
                last = self._keys_check(
                    batch.column("label").to_numpy(), t.lo, t.hi, last, "read_indices"
                )
            yield batch


# ---------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------


class RunningServer:
    """A DvidFlightServer serving in a background thread; ``stop()`` or use as a context manager."""

    def __init__(self, server: DvidFlightServer):
        self.server = server
        self._thread = threading.Thread(
            target=server.serve, name=f"flight-{server.port}", daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def location(self) -> str:
        return self.server.location

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; never hangs.

        New calls are refused at once; running streams end (UNAVAILABLE) at their next batch.
        gRPC's shutdown waits for every open call, and a client that holds a stream open
        without reading blocks it forever (pyarrow exposes no shutdown deadline), so after
        ``timeout`` seconds the rest of the shutdown is left to a background thread.
        """
        if self._stopped:
            return
        self._stopped = True
        self.server.stopping.set()
        closer = threading.Thread(
            target=self.server.shutdown, name=f"flight-stop-{self.port}", daemon=True
        )
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning(
                "Flight server %s: calls still open %.0f s after stop(); finishing in the background",
                self.location,
                timeout,
            )
            return
        self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RunningServer {self.location}{' stopped' if self._stopped else ''}>"


def _host_for_url(host: str) -> str:
    """IPv6 literals need brackets in a URI (``grpc://[::1]:8815``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def start_server(
    source: Source,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls_certificates: list | None = None,
    **kwargs: Any,
) -> RunningServer:
    """Serve ``source`` on ``host:port`` (0 = any free port) in a background thread.

    The export pipeline uses this for its embedded default; ``.location`` is what clients
    connect to. The caller still owns (and closes) the source.
    """
    scheme = "grpc+tls" if tls_certificates else "grpc"
    server = DvidFlightServer(
        source,
        f"{scheme}://{_host_for_url(host)}:{int(port)}",
        token=token,
        tls_certificates=tls_certificates,
        **kwargs,
    )
    return RunningServer(server)
