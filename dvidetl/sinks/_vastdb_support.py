"""The VastDB sink's plumbing, apart from the sink itself: credentials (environment or a
file, never the URL), the ``vastdb://`` URL and its endpoints, which SDK errors are
transient, and cutting rows for VastDB's cell and request limits (pure functions)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvidetl.batching import spans
from dvidetl.errors import UserError
from dvidetl.redact import register_secret
from dvidetl.tables import schema as S
from dvidetl.tables.cells import check_cell_limit
from dvidetl.urlquery import Query

# Imports inside functions load vastdb, vastdb's HTTP client only where used: importing this
# module must not (CLI start-up, processes that never call them).

log = logging.getLogger("dvidetl.sinks.vastdb")

#: serialized bytes per insert RPC we aim below (the SDK splits above ~4.9 MiB)
INSERT_BUDGET = 4 * 1024 * 1024
#: rows per insert RPC (the response carries a 16-byte row id per row on sorted tables)
INSERT_MAX_ROWS = 200_000
#: (connect, read) seconds per request
DEFAULT_TIMEOUT = (10.0, 120.0)
DEFAULT_TRIES = 8
CRED_FILE_ENV = "VASTDB_CREDENTIALS_FILE"


class _Creds:
    """An access/secret key pair that never prints."""

    __slots__ = ("access", "secret", "source")

    def __init__(self, access: str, secret: str, source: str):
        self.access, self.secret, self.source = access, secret, source
        register_secret(access)
        register_secret(secret)

    def __repr__(self) -> str:
        return f"_Creds(from {self.source}, ***)"

    __str__ = __repr__


def _read_cred_file(path: str) -> tuple[str | None, str | None]:
    """``key = value`` lines (``[section]`` lines and ``#`` comments ignored); keys
    ``access_key``/``secret_key`` or the AWS names ``aws_access_key_id``/``aws_secret_access_key``."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise UserError(f"{CRED_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
    vals: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or ("=" not in line and ":" not in line):
            continue
        sep = "=" if "=" in line else ":"
        k, v = line.split(sep, 1)
        vals[k.strip().lower()] = v.strip().strip("'\"")
    access = vals.get("access_key") or vals.get("aws_access_key_id") or vals.get("vastdb_access_key")
    secret = vals.get("secret_key") or vals.get("aws_secret_access_key") or vals.get("vastdb_secret_key")
    return access, secret


def load_credentials(env: Mapping[str, str] | None = None) -> _Creds:
    """The key pair, from the environment or the credentials file; a ``UserError`` saying
    what to set when there is none."""
    env = os.environ if env is None else env
    for a, s in (("VASTDB_ACCESS_KEY", "VASTDB_SECRET_KEY"), ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        if env.get(a) and env.get(s):
            return _Creds(env[a], env[s], f"${a}")
        if env.get(a) or env.get(s):
            raise UserError(f"VastDB credentials: set both {a} and {s} (only one is set)")
    path = env.get(CRED_FILE_ENV)
    if path:
        access, secret = _read_cred_file(path)
        if not access or not secret:
            raise UserError(f"{CRED_FILE_ENV}={path}: needs access_key = ... and secret_key = ... lines")
        return _Creds(access, secret, f"${CRED_FILE_ENV}")
    raise UserError(
        "no VastDB credentials: set VASTDB_ACCESS_KEY and VASTDB_SECRET_KEY (or AWS_ACCESS_KEY_ID and "
        f"AWS_SECRET_ACCESS_KEY), or {CRED_FILE_ENV} to a file with access_key/secret_key lines"
    )


def _endpoint(hostport: str, what: str) -> str:
    hp = hostport.strip()
    if hp.startswith(("http://", "https://")):
        scheme, hp = hp.split("://", 1)
    else:
        scheme = "http"
    hp = hp.rstrip("/")
    if not hp or "/" in hp or "@" in hp:
        raise UserError(f"{what} {hostport!r}: expected HOST[:PORT]")
    if ":" in hp:
        port = hp.rsplit(":", 1)[1]
        if not port.isdigit():
            raise UserError(f"{what} {hostport!r}: the port must be a number")
    return f"{scheme}://{hp}"


def with_endpoints(url: str, endpoints: str | None) -> str:
    """``url`` with ``--vast-endpoints`` (comma-separated HOST:PORT) added as ``?endpoints=``,
    so every worker opening the sink from its URL spreads over the same endpoints."""
    if not endpoints:
        return url
    if not url.startswith("vastdb://"):
        raise UserError("--vast-endpoints only applies to a vastdb:// sink")
    eps = [e.strip() for e in endpoints.split(",") if e.strip()]
    for e in eps:
        _endpoint(e, "--vast-endpoints entry")
    return url + ("&" if "?" in url else "?") + "endpoints=" + ",".join(eps)


@dataclass(frozen=True)
class VastUrl:
    endpoints: tuple[str, ...]
    bucket: str
    schema: str
    cell_limit: int = S.DEFAULT_CELL_LIMIT
    timeout: float = DEFAULT_TIMEOUT[1]
    tries: int = DEFAULT_TRIES


def parse_url(url: str) -> VastUrl:
    """``vastdb://HOST[:PORT]/BUCKET/SCHEMA[?endpoints=..&cell_limit=..&timeout=..&tries=..]``."""
    u = urlsplit(url)
    if u.scheme != "vastdb" or not u.netloc:
        raise UserError(f"sink URL {url!r}: expected vastdb://HOST[:PORT]/BUCKET/SCHEMA")
    if "@" in u.netloc:
        raise UserError(f"sink URL {url!r}: credentials do not go in the URL; set VASTDB_ACCESS_KEY "
                        "and VASTDB_SECRET_KEY instead")
    parts = [p for p in u.path.split("/") if p]
    if len(parts) < 2:
        raise UserError(f"sink URL {url!r} names no BUCKET/SCHEMA: use vastdb://HOST[:PORT]/BUCKET/SCHEMA")
    q = Query(url, ("endpoints", "cell_limit", "timeout", "tries"), multi=("endpoints",))
    eps = [_endpoint(u.netloc, "sink URL host")]
    for v in q.all("endpoints"):
        eps += [_endpoint(e, "endpoints entry") for e in v.split(",") if e.strip()]
    out = VastUrl(tuple(dict.fromkeys(eps)), parts[0], "/".join(parts[1:]),
                  q.int("cell_limit", S.DEFAULT_CELL_LIMIT), q.float("timeout", DEFAULT_TIMEOUT[1]),
                  q.int("tries", DEFAULT_TRIES))
    check_cell_limit(out.cell_limit, most=S.DEFAULT_CELL_LIMIT, what=f"sink URL {url!r}: cell_limit")
    if out.tries < 1 or out.timeout <= 0:
        raise UserError(f"sink URL {url!r}: tries must be >= 1 and timeout > 0")
    return out





def _retryable(exc: BaseException) -> bool:
    """Transient: 503 / SlowDown, 409 (transaction rolled back), 408, dropped connections,
    timeouts, an unknown transaction (server restarted), and the proxy statuses the SDK
    cannot map (429/502/504 surface as ``ValueError: N is not a valid HttpStatus``)."""
    import requests
    from vastdb import errors as E

    if isinstance(exc, (E.ServiceUnavailable, E.Conflict, E.RequestTimeout, E.ConnectionError,
                        E.MissingTransaction, E.UnexpectedError, requests.exceptions.RequestException,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, E.NotFound) and "transaction" in str(getattr(exc, "message", "") or "").lower():
        return True
    if isinstance(exc, ValueError) and "HttpStatus" in str(exc):
        return True
    cause = exc.__cause__
    return cause is not None and _retryable_cause(cause)


def _retryable_cause(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    if status is not None:
        return f"{type(exc).__name__} {status}{' ' + code if code else ''}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class _QuietRollback(logging.Filter):
    """The SDK logs every rolled-back transaction with a full traceback; the sink retries
    or reports those errors itself (one line), so the traceback is only noise — and for a
    user error (schema mismatch) it must not be shown at all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("rolling back txid")


def _install_log_filter() -> None:
    lg = logging.getLogger("vastdb.transaction")
    if not any(isinstance(f, _QuietRollback) for f in lg.filters):
        lg.addFilter(_QuietRollback())





def cell_sizes(arr: pa.Array) -> np.ndarray | None:
    """Bytes per cell of a variable-size column (binary/string: length; list: values x item
    size), or None for fixed-size columns."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t):
        n = pc.binary_length(arr)
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        n = pc.multiply(pc.list_value_length(arr).cast(pa.int64()), t.value_type.byte_width)
    else:
        return None
    return np.nan_to_num(n.to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0).astype(np.int64)


def check_cells(table: str, batch: pa.Table | pa.RecordBatch, cell_limit: int) -> None:
    """``ValueError`` naming the column and row key when a cell passes the limit: VAST would
    reject it and roll back the whole partition, so it is a bug to catch before sending."""
    for name in batch.schema.names:
        sizes = cell_sizes(batch.column(name))
        if sizes is None or len(sizes) == 0:
            continue
        over = np.flatnonzero(sizes > cell_limit)
        if len(over):
            i = int(over[0])
            key = {k: batch.column(k)[i].as_py() for k in S.KEYS.get(table, ()) if k in batch.schema.names}
            raise ValueError(f"{table}.{name}: a {int(sizes[i]):,}-byte cell passes the VastDB cell "
                             f"limit of {cell_limit:,} bytes (row {key})")


def row_bytes(batch: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Estimated serialized bytes per row (values + offsets + validity), for cutting."""
    n = batch.num_rows
    out = np.zeros(n, np.int64)
    for name in batch.schema.names:
        col = batch.column(name)
        sizes = cell_sizes(col)
        if sizes is None:
            w = col.type.byte_width if col.type.bit_width >= 8 else 1
            out += w + 1
        else:
            out += sizes + 9
    return out


def cut_rows(batch: pa.Table, budget: int = INSERT_BUDGET, max_rows: int = INSERT_MAX_ROWS) -> list[pa.RecordBatch]:
    """``batch`` as record batches each below ``budget`` serialized bytes and ``max_rows``."""
    if batch.num_rows == 0:
        return []
    out: list[pa.RecordBatch] = []
    for a, b in spans(row_bytes(batch), budget, max_rows):
        start = a
        while start < b:
            end = b
            rb = _one_batch(batch.slice(start, end - start))
            while rb.num_rows > 1 and pa.ipc.get_record_batch_size(rb) > budget:
                end = start + rb.num_rows // 2  # estimate was off: halve until it fits
                rb = _one_batch(batch.slice(start, end - start))
            out.append(rb)
            start = end
    return out


def _one_batch(t: pa.Table) -> pa.RecordBatch:
    """One record batch (what ``insert`` sends as one RPC) from a table slice."""
    bs = t.combine_chunks().to_batches()
    return bs[0] if len(bs) == 1 else pa.concat_batches(bs) if bs else t.schema.empty_table().to_batches()[0]


def chunk_json(text: bytes, limit: int) -> list[bytes]:
    return [text[i:i + limit] for i in range(0, len(text), limit)] or [b""]
