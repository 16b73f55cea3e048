"""The Flight client the export workers use (stable API): one labelmap at one UUID.

Why it looks like this:

* **A stream is retried from its start.** A partition (one ticket) is the unit of retry: when a
  stream breaks, the client reconnects, re-sends the same ticket and skips the rows it already
  delivered (streams are deterministic for a given source state), so the caller sees every row
  exactly once and never has to restart its own work. After ``retries`` failed attempts (with
  exponential backoff) it raises :class:`FlightUnavailable` naming the server and the call.
* **Cheap on Dask workers.** The client pickles to ``(location, token, options)`` and
  reconnects lazily on first use, so it can be shipped in a task graph.
* **Errors are actionable.** A bad request comes back as :class:`FlightRequestError` (a
  `UserError`, message from the server naming the field), a bad token as
  :class:`FlightAuthError`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from dvidetl.errors import UserError
from dvidetl.flight import protocol as P
from dvidetl.geometry import KEY_END, VolumeInfo
from dvidetl.redact import register_secret
from dvidetl.retry import Backoff, retry
from dvidetl.sources.base import KeyCounts

log = logging.getLogger(__name__)

TOKEN_ENV = "DVIDETL_FLIGHT_TOKEN"

__all__ = [
    "FlightClient",
    "FlightUnavailable",
    "FlightAuthError",
    "FlightRequestError",
    "load_token",
    "TOKEN_ENV",
]


class FlightUnavailable(ConnectionError):
    """The server could not be reached / the stream kept failing after all retries."""


class FlightAuthError(UserError):
    """The server rejected the bearer token (or wanted one and got none)."""


class FlightRequestError(P.TicketError):
    """The server rejected a request as invalid (Flight INVALID_ARGUMENT)."""

    def __init__(self, message: str):
        m = re.search(r"field '([^']*)'", message)
        self.field = m.group(1) if m else "?"
        self.why = message
        UserError.__init__(self, message)


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: from ``token_file`` if given, else env ``DVIDETL_FLIGHT_TOKEN``, else None.

    Tokens never come from argv (visible in ``ps``); surrounding whitespace is stripped.
    """
    if token_file:
        p = Path(token_file)
        try:
            tok = p.read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read token file {str(p)!r}: {exc.strerror or exc}") from None
        if not tok:
            raise UserError(f"token file {str(p)!r} is empty")
        if any(c.isspace() for c in tok):
            raise UserError(f"token file {str(p)!r} holds whitespace inside the token")
        register_secret(tok)
        return tok
    tok = os.environ.get(TOKEN_ENV, "").strip()
    register_secret(tok)
    return tok or None


def _clean(exc: BaseException) -> str:
    """The server's message without gRPC debug context / Python tracebacks."""
    msg = str(exc)
    for cut in (". Detail:", "\ngRPC client debug context", ". gRPC client debug context"):
        i = msg.find(cut)
        if i >= 0:
            msg = msg[:i]
    return msg.strip()


#: errors worth reconnecting for; everything else is raised at once
_RETRYABLE = (
    flight.FlightUnavailableError,
    flight.FlightTimedOutError,
    flight.FlightInternalError,
    flight.FlightCancelledError,
    pa.ArrowIOError,
    ConnectionError,
)


def _rebuild(location: str, token: str | None, kwargs: dict) -> FlightClient:
    return FlightClient(location, token, **kwargs)


class FlightClient:
    """Client of one labelmap instance at one UUID served over the dvidetl Flight contract.

    ``uuid``/``instance`` default to what the server serves. ``timeout`` bounds unary calls
    (info, count, each map exchange); ``stream_timeout`` bounds a whole DoGet stream.
    """

    def __init__(
        self,
        location: str,
        token: str | None = None,
        *,
        uuid: str | None = None,
        instance: str | None = None,
        timeout: float = 60.0,
        stream_timeout: float | None = 3600.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        map_batch: int = 1 << 20,
        tls_root_certs: bytes | None = None,
        retry_log_level: int = logging.WARNING,
    ):
        if not isinstance(location, str) or "://" not in location:
            raise UserError(f"Flight location must look like grpc://host:port, got {location!r}")
        self.location = location
        self._token = token
        self.uuid = uuid
        self.instance = instance
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.map_batch = int(map_batch)
        self.tls_root_certs = tls_root_certs
        #: the driver's own client logs retries at INFO: its caller reports the outcome in
        #: one line (a worker's retries stay warnings in the worker's log)
        self.retry_log_level = retry_log_level
        self._conn: flight.FlightClient | None = None
        self._info: VolumeInfo | None = None
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            uuid=self.uuid,
            instance=self.instance,
            timeout=self.timeout,
            stream_timeout=self.stream_timeout,
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            map_batch=self.map_batch,
            tls_root_certs=self.tls_root_certs,
        )

    def __reduce__(self):
        # reconnect lazily on the worker; the resolved uuid/instance travel with it
        kw = self._kwargs()
        if self._info is not None:
            kw["uuid"], kw["instance"] = self._info.uuid, self._info.instance
        return (_rebuild, (self.location, self._token, kw))

    def __repr__(self) -> str:
        return f"FlightClient({self.location!r}, uuid={self.uuid!r}, instance={self.instance!r})"

    def _client(self) -> flight.FlightClient:
        with self._lock:
            if self._conn is None:
                kw = {}
                if self.tls_root_certs is not None:
                    kw["tls_root_certs"] = self.tls_root_certs
                self._conn = flight.FlightClient(self.location, **kw)
            return self._conn

    def _reset(self, broken: flight.FlightClient | None = None) -> None:
        """Forget a broken connection so the next call reconnects. It is not closed here:
        other threads may still be streaming on it (their frames keep it alive; it closes
        when the last one lets go)."""
        with self._lock:
            if broken is None or self._conn is broken:
                self._conn = None

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a dead connection may fail; it is dropped anyway
                pass

    def __enter__(self) -> FlightClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _options(self, stream: bool = False, timeout: float | None = None) -> flight.FlightCallOptions:
        headers = []
        if self._token:
            headers.append((b"authorization", f"Bearer {self._token}".encode()))
        if timeout is None:
            timeout = self.stream_timeout if stream else self.timeout
        return flight.FlightCallOptions(timeout=timeout, headers=headers)

    def _raise_final(self, exc: BaseException, call: str) -> None:
        """Turn non-retryable Flight errors into dvidetl errors."""
        if isinstance(exc, flight.FlightUnauthenticatedError):
            raise FlightAuthError(
                f"Flight server {self.location} rejected the request {call}: {_clean(exc)} "
                f"(set the token with --token-file or ${TOKEN_ENV})"
            ) from None
        if isinstance(exc, flight.FlightUnauthorizedError):
            raise FlightAuthError(
                f"Flight server {self.location} refused {call}: {_clean(exc)}"
            ) from None
        if isinstance(exc, pa.ArrowInvalid):
            raise FlightRequestError(
                f"Flight server {self.location} rejected {call}: {_clean(exc)}"
            ) from None

    def _policy(self) -> Backoff:
        # exact waits: a Flight client per worker, and the server is one process that recovers
        return Backoff(tries=self.retries + 1, base=self.backoff, cap=self.max_backoff, jitter=0.0)

    def _unavailable(self, call: str, attempts: int, exc: BaseException) -> FlightUnavailable:
        return FlightUnavailable(
            f"Flight server {self.location} unavailable for {call} after {attempts} attempt(s): "
            f"{type(exc).__name__}: {_clean(exc)}"
        )

    def _transient(self, exc: BaseException, call: str) -> bool:
        """Worth another attempt? Final Flight errors are raised as dvidetl errors instead."""
        if isinstance(exc, (flight.FlightError, pa.ArrowInvalid)):
            self._raise_final(exc, call)
        if not isinstance(exc, _RETRYABLE):
            return False
        # the server told us when it is a bug / broken source, not the network
        return not (isinstance(exc, flight.FlightInternalError) and P.SERVER_ERROR_PREFIX in str(exc))

    def _with_retries(self, call: str, fn: Callable[[flight.FlightClient], Any]) -> Any:
        """Run a complete call ``fn(connection)``, reconnecting and retrying on transport errors."""

        def once() -> Any:
            conn = self._client()
            try:
                return fn(conn)
            except _RETRYABLE:
                self._reset(conn)
                raise

        return retry(once, self._policy(), retryable=lambda exc: self._transient(exc, call),
                     what=f"{call} on {self.location}", describe=_clean,
                     exhausted=lambda n, exc: self._unavailable(call, n, exc),
                     logger=log, level=self.retry_log_level)

    def _stream(self, call: str, ticket: bytes, key: str | None = None) -> Iterator[pa.RecordBatch]:
        """DoGet ``ticket``; on failure re-send it from the start and skip delivered rows.

        ``key``: a column whose value at the resume point must be the one last delivered
        (streams are deterministic; this catches a source that changed between attempts)."""
        policy = self._policy()
        delivered = 0
        attempt = 0  # retries since the last delivered batch
        last_key = None  # key of the last row handed out
        while True:
            reader = conn = None
            try:
                conn = self._client()
                reader = conn.do_get(flight.Ticket(ticket), options=self._options(stream=True))
                seen = 0
                resuming = delivered > 0
                skip_key = None
                while True:
                    try:
                        chunk = reader.read_chunk()
                    except StopIteration:
                        break
                    batch = chunk.data
                    if batch is None or batch.num_rows == 0:
                        continue
                    n = batch.num_rows
                    if seen + n <= delivered:  # already handed out before the retry
                        if key is not None:
                            skip_key = batch.column(key)[n - 1].as_py()
                        seen += n
                        continue
                    if seen < delivered:
                        k = delivered - seen
                        if key is not None:
                            skip_key = batch.column(key)[k - 1].as_py()
                        batch = batch.slice(k)
                    if resuming:
                        resuming = False
                        if key is not None and skip_key != last_key:
                            raise RuntimeError(
                                f"{call}: the retried stream from {self.location} differs from "
                                f"the first attempt at row {delivered} ({key} {skip_key} != "
                                f"{last_key}): did the source change?"
                            )
                    seen += n
                    delivered = seen
                    if key is not None:
                        last_key = batch.column(key)[batch.num_rows - 1].as_py()
                    attempt = 0  # progress resets the retry budget
                    yield batch
                if seen < delivered:
                    raise RuntimeError(
                        f"{call}: the retried stream from {self.location} ended after {seen} rows, "
                        f"but {delivered} were delivered before the failure (source changed?)"
                    )
                return
            except Exception as exc:  # noqa: BLE001 — classified by _transient
                if not self._transient(exc, call):
                    raise
                attempt += 1
                if attempt > self.retries:
                    raise self._unavailable(call, attempt, exc) from exc
                log.log(self.retry_log_level,
                        "%s on %s broke after %d rows (%s); restarting the stream, retry %d/%d",
                            call, self.location, delivered, _clean(exc), attempt, self.retries)
                self._reset(conn)
                policy.pause(attempt)
            finally:
                if reader is not None:
                    try:
                        reader.cancel()
                    except Exception:
                        pass

    def _action(self, call: str, kind: str, body: bytes, timeout: float | None = None) -> list[bytes]:
        def go(conn: flight.FlightClient) -> list[bytes]:
            results = conn.do_action(flight.Action(kind, body), options=self._options(timeout=timeout))
            return [r.body.to_pybytes() for r in results]

        return self._with_retries(call, go)

    # -- volume --------------------------------------------------------------------------

    def info(self) -> VolumeInfo:
        """The served volume (cached after the first call); fills in a default uuid/instance."""
        if self._info is not None:
            return self._info
        if self.uuid is not None and self.instance is not None:
            body = P.VolumeRef(self.uuid, self.instance).to_json()
            info = VolumeInfo.from_json(self._action("info()", P.ACTION_INFO, body)[0])
        else:
            served = VolumeInfo.from_json(self._action("info()", P.ACTION_INFO, b"")[0])
            uuid = self.uuid if self.uuid is not None else served.uuid
            instance = self.instance if self.instance is not None else served.instance
            if (uuid, instance) != (served.uuid, served.instance):
                body = P.VolumeRef(uuid, instance).to_json()
                info = VolumeInfo.from_json(self._action("info()", P.ACTION_INFO, body)[0])
            else:
                info = served
        self._info = info
        return info

    def _ref(self) -> tuple[str, str]:
        info = self.info()
        return info.uuid, info.instance

    def count(self, scale: int, cell_bits: int, *, timeout: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Blocks per aligned Morton cell ``code >> cell_bits`` of one scale: (cells, counts, exact).

        ``exact=False``: the counts are upper bounds (the source cannot count cheaply).
        ``timeout``: this call's deadline (default the client's), for counts whose cost grows
        with the volume."""
        uuid, instance = self._ref()
        body = P.CountRequest(uuid, instance, int(scale), int(cell_bits)).to_json()
        parts = self._action(f"count(scale={scale}, cell_bits={cell_bits})", P.ACTION_COUNT, body,
                             timeout=timeout)
        return P.count_from_ipc(parts)

    # -- streams -------------------------------------------------------------------------

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored blocks with ``lo <= morton < hi`` (hi clipped to the grid), ascending morton,
        as batches of ``x, y, z, morton, data`` with the codec in the schema metadata."""
        lo, hi, scale = int(lo), int(hi), int(scale)
        if lo >= hi:
            raise P.TicketError("hi", f"empty range: lo={lo} >= hi={hi}")
        uuid, instance = self._ref()
        ticket = P.BlocksTicket(uuid, instance, scale, lo, hi).to_json()
        return self._stream(f"read_blocks(scale={scale}, lo={lo}, hi={hi})", ticket, "morton")

    def read_blocks_table(self, scale: int, lo: int, hi: int) -> pa.Table:
        """All of :meth:`read_blocks` as one table (empty table with the schema if no blocks)."""
        batches = list(self.read_blocks(scale, lo, hi))
        if batches:
            return pa.Table.from_batches(batches)
        info = self.info()
        sc = info.scale(scale) if any(s.scale == scale for s in info.scales) else None
        end = sc.morton_end if sc else hi
        return P.blocks_schema(info, info.uuid, scale, lo, min(hi, end)).empty_table()

    def count_keys(self, kind: str, cell_bits: int, lo: int = 0, hi: int = KEY_END, *,
                   timeout: float | None = None) -> KeyCounts:
        """Body labels (``kind="indices"``), supervoxels (``"mapping"``) or anomaly numbers
        (``"anomalies"``) per aligned cell ``key >> cell_bits`` of ``[lo, hi)``, with the
        output rows of each cell. The first such call may make the source read every label
        index (a generated volume builds them): ``timeout`` gives it a deadline that grows
        with the volume."""
        uuid, instance = self._ref()
        body = P.CountKeysRequest(uuid, instance, kind, int(cell_bits), int(lo), int(hi)).to_json()
        parts = self._action(f"count_keys({kind}, cell_bits={cell_bits}, lo={lo}, hi={hi})",
                             P.ACTION_COUNT_KEYS, body, timeout=timeout)
        return P.key_count_from_ipc(parts)

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Non-identity (supervoxel, body) pairs of supervoxels ``lo <= sv < hi`` (default all)."""
        lo, hi = int(lo), int(hi)
        if lo >= hi:
            raise P.TicketError("hi", f"empty supervoxel range: lo={lo} >= hi={hi}")
        uuid, instance = self._ref()
        return self._stream(
            f"read_mapping(lo={lo}, hi={hi})", P.MappingTicket(uuid, instance, lo=lo, hi=hi).to_json(),
            "supervoxel",
        )

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Label indices (label, LabelIndex protobuf bytes) of labels ``lo <= label < hi``."""
        lo, hi = int(lo), int(hi)
        if lo >= hi:
            raise P.TicketError("hi", f"empty label range: lo={lo} >= hi={hi}")
        uuid, instance = self._ref()
        return self._stream(
            f"read_indices(lo={lo}, hi={hi})",
            P.IndicesTicket(uuid, instance, lo, hi).to_json(),
            "label",
        )

    def count_requests(self, parts) -> np.ndarray | None:
        """The requests the server's source sends its store to read each partition (a
        sequence with ``kind``, ``scale``, ``lo``, ``hi``), aligned; None when the source
        cannot say (``Source.count_requests`` is optional)."""
        uuid, instance = self._ref()
        cmd = P.requests_command(uuid, instance)
        kinds = [p.kind for p in parts]
        scales = np.array([p.scale for p in parts], np.uint8)
        lo = np.array([p.lo for p in parts], np.uint64)
        hi = np.array([min(int(p.hi), KEY_END - 1) for p in parts], np.uint64)
        step = P.MAX_MAP_BATCH_ROWS

        def go(conn: flight.FlightClient) -> np.ndarray:
            out = np.zeros(len(kinds), np.uint64)
            writer, reader = conn.do_exchange(flight.FlightDescriptor.for_command(cmd),
                                              options=self._options(stream=True))
            try:
                writer.begin(P.REQUESTS_REQUEST_SCHEMA)
                for a in range(0, len(kinds), step):
                    b = min(len(kinds), a + step)
                    writer.write_batch(pa.record_batch(
                        [pa.array(kinds[a:b], pa.string()), pa.array(scales[a:b]),
                         pa.array(lo[a:b]), pa.array(hi[a:b])], schema=P.REQUESTS_REQUEST_SCHEMA))
                    got = reader.read_chunk().data
                    if got is None or got.num_rows != b - a:
                        raise flight.FlightInternalError(
                            f"requests answer has {None if got is None else got.num_rows} rows "
                            f"for {b - a} partitions")
                    out[a:b] = got.column(0).to_numpy()
                writer.done_writing()
            finally:
                writer.close()
            return out

        if not kinds:
            return np.zeros(0, np.uint64)
        try:
            return self._with_retries(f"count_requests({len(kinds)} partitions)", go)
        except P.TicketError as exc:
            if "cannot count its requests" in str(exc) or "supports kind" in str(exc):
                return None  # the source cannot say, or a server predating the exchange
            raise

    def read_anomalies(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """The source's anomalies numbered ``lo <= seq < hi`` (``ANOMALIES_SCHEMA``): what it
        found wrong in its input, to be stored with the export."""
        lo, hi = int(lo), int(hi)
        if lo >= hi:
            raise P.TicketError("hi", f"empty anomaly range: lo={lo} >= hi={hi}")
        uuid, instance = self._ref()
        return self._stream(
            f"read_anomalies(lo={lo}, hi={hi})", P.AnomaliesTicket(uuid, instance, lo, hi).to_json(), "seq",
        )

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of every supervoxel in ``svs`` (any shape; identity where unmapped), aligned.

        Only the unique ids travel, in DoExchange batches of ``map_batch``."""
        arr = np.asarray(svs)
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.uint64)
        if arr.dtype.kind not in "iu":
            raise UserError(f"supervoxel ids must be integers, got dtype {arr.dtype}")
        if arr.dtype.kind == "i" and bool((arr < 0).any()):
            raise UserError("supervoxel ids must not be negative")
        uniq, inverse = np.unique(arr.astype(np.uint64, copy=False).ravel(), return_inverse=True)
        uuid, instance = self._ref()
        cmd = P.map_command(uuid, instance)
        step = self.map_batch

        def go(conn: flight.FlightClient) -> np.ndarray:
            out = np.empty(len(uniq), dtype=np.uint64)
            writer, reader = conn.do_exchange(
                flight.FlightDescriptor.for_command(cmd), options=self._options(stream=True)
            )
            try:
                writer.begin(P.MAP_REQUEST_SCHEMA)
                for start in range(0, len(uniq), step):
                    part = uniq[start : start + step]
                    writer.write_batch(
                        pa.record_batch([pa.array(part)], schema=P.MAP_REQUEST_SCHEMA)
                    )
                    got = reader.read_chunk().data
                    if got is None or got.num_rows != len(part):
                        raise flight.FlightInternalError(
                            f"map answer has {None if got is None else got.num_rows} rows for {len(part)} supervoxels"
                        )
                    out[start : start + len(part)] = got.column(0).to_numpy()
                writer.done_writing()
            finally:
                writer.close()
            return out

        bodies = self._with_retries(f"map_supervoxels({len(uniq)} unique ids)", go)
        return bodies[inverse.ravel()].reshape(arr.shape)
