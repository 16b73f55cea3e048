"""`dvid+http://host:port[?uuid=U&instance=I]` — a live, unmodified DVID through its HTTP API.

DVID has no Flight endpoint yet, so this source speaks the documented labelmap HTTP API
(dvid-formats §5) and presents it as a `Source`:

* ``/info`` gives block size, ``MaxDownresLevel`` and the scale-0 extents (MaxPoint inclusive);
  the scale-s grid is ``ceil((max + 1) / 2^s / block)``. Negative coordinates are refused.
* ``read_blocks(scale, lo, hi)`` covers the Morton range by aligned boxes (an aligned Morton
  range is an aligned box of blocks), each at most ``2^box_bits`` block slots, clipped to the
  extents, fetches each with ``/blocks/<size>/<offset>?compression=blocks&supervoxels=true``
  (a few requests in flight at once), parses the record stream with a numba kernel, sorts by
  Morton and serves the stored gzip of each block unchanged (``codec == "gzip"``).
* DVID cannot count blocks cheaply, so ``count`` answers flagged upper bounds (``exact=False``):
  block slots inside the extents per Morton cell, computed arithmetically per axis.
* ``/mappings?format=binary`` is fetched once and cached as sorted arrays.
* The labels with an index are listed once (``/existing-labels``, keys only; else paged
  ``/listlabels``) and cached: ``count_keys`` plans from them, ``read_indices`` fetches their
  ``/indices-compressed`` in requests of ``index_batch`` labels (default 2,000),
  ``index_parallel`` in flight (default ``parallel``), and unwraps DVID's LZ4 wrapper to the
  LabelIndex protobuf.

Robustness: explicit timeouts; retries with exponential backoff on connection errors, 5xx and
503 throttling; and because DVID cannot change the status of a streamed 200 response, an error
text appended to the stream (a record header that does not parse, a length running past the
body, trailing bytes, a payload that is not gzip) is detected and reported with the URL and
byte offset — after retrying, since such failures are usually transient on the server side.

URL parameters besides ``uuid``/``instance``: ``timeout`` (s, default 60), ``retries``
(default 6), ``backoff`` (first delay in s, default 0.2), ``box_bits`` (default 12 = 16^3
blocks per request), ``parallel`` (requests in flight, default 4), ``throttle=true`` (ask DVID
to throttle /blocks; its 503s are retried), ``minpoint``/``maxpoint`` (``X,Y,Z`` scale-0 voxels,
inclusive: override DVID's extents, which are only hints and can be stale — e.g. after
``ingest-supervoxels`` without ``POST /extents``; blocks outside the extents are never read),
``spec=PATH`` (the neuroglancer multiscale spec export-shards used: every scale's grid is
then ``ceil(size / block)``, so both sources plan the same Morton codes; default: DVID's
extents), ``box_shape=rows|cube`` (ranges of many boxes fetched as whole X rows, default, or as Morton
cubes), ``index_parallel``, ``index_batch``, ``rows_per_label`` (planning estimate of label_index rows
per label, default 64), ``labels=auto|existing|listlabels`` (how labels are listed).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import random
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import numba
import numpy as np
import pyarrow as pa

from dvidetl.codec._kernels import _u32  # the codec's little-endian reader, one for all
from dvidetl.errors import SourceUnavailable, UserError
from dvidetl.geometry import (
    ScaleInfo,
    VolumeInfo,
    _bit_plan,
    axis_bits,
    morton_decode,
    morton_encode,
)
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    KEY_END,
    KeyCounts,
    count_sorted,
    drop_background,
    key_slice,
    mapping_batches,
)
from dvidetl.urlquery import Query

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_BLOCKS = 8192
#: labels per /indices-compressed request: DVID serves each with one Get, so a request of
#: 2,000 labels is a few seconds of its time (far from its 600 s response cut) and several
#: such requests keep DVID's Badger busy in parallel
INDICES_PER_REQUEST = 2_000
#: a range of many boxes is fetched in groups of 2^GROUP_BITS boxes' worth of slots, each
#: group as boxes of whole X rows (``box_shape=rows``)
GROUP_BITS = 4
_EMPTY_PART = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
               np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(1, np.int64))
#: label_index rows assumed per body label when planning (DVID cannot count them cheaply;
#: the mCNS has ~5-7e9 rows over its labels); ``rows_per_label=`` overrides it
ROWS_PER_LABEL = 64
LISTLABELS_PAGE = 100_000
#: cells a count() may return before asking for a coarser level
MAX_COUNT_CELLS = 1 << 26
_RETRY_STATUS = {429, 500, 502, 503, 504}


class DvidHttpError(UserError):
    """DVID answered with an error, or could not be reached after retries (message names the URL)."""


class DvidUnavailable(SourceUnavailable, DvidHttpError):
    """DVID could not be reached, or kept failing (5xx, cut or broken bodies) after retries.

    A `SourceUnavailable` first, so the Flight server answers UNAVAILABLE and workers retry;
    still a `DvidHttpError` so callers catching that keep working.
    """


class DvidAuthError(DvidHttpError):
    """DVID refused the request's credentials (or wants some): fix the DVID token."""


#: environment variables naming the DVID token (JWT or DSG token) and a file holding it
DVID_TOKEN_ENV = "DVIDETL_DVID_TOKEN"
DVID_TOKEN_FILE_ENV = "DVIDETL_DVID_TOKEN_FILE"
#: longest wait for one throttled (503) request before it counts as the server being down
THROTTLE_PATIENCE = 1800.0


def dvid_token(token_file: str | None = None) -> str | None:
    """The DVID bearer token: from ``token_file`` (URL ``token_file=``), else the file named by
    ``DVIDETL_DVID_TOKEN_FILE``, else ``DVIDETL_DVID_TOKEN``; never from the URL itself (URLs
    reach argv and logs)."""
    import os

    path = token_file or os.environ.get(DVID_TOKEN_FILE_ENV)
    if path:
        try:
            tok = open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise UserError(f"cannot read DVID token file {path!r}: {exc.strerror or exc}") from None
        if not tok or any(c.isspace() for c in tok):
            raise UserError(f"DVID token file {path!r} is empty or holds whitespace inside the token")
        return tok
    return os.environ.get(DVID_TOKEN_ENV, "").strip() or None


class _StreamError(Exception):
    """A 200 body that does not parse: probably an error text appended by the server."""

    def __init__(self, offset: int, why: str, body: bytes):
        self.offset = offset
        tail = body[offset : offset + 160]
        text = tail.decode("utf-8", "replace").strip()
        super().__init__(f"{why} at byte {offset} of {len(body)}" + (f": {text!r}" if text else ""))


# ---------------------------------------------------------------------------- HTTP transport
class _Http:
    """Keep-alive HTTP(S) connections (one per thread) with timeouts and retries."""

    def __init__(
        self, scheme: str, host: str, port: int | None, timeout: float, retries: int, backoff: float,
        *, inflight: int = 64, token: str | None = None,
    ) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        # DVID answers requests beyond its throttle slots 503 at once: never send more than it
        # admits (``inflight``), so throttling costs waiting, not failed attempts
        self._slots = threading.BoundedSemaphore(max(1, inflight))
        self._token = token  # never logged: messages below name the URL only
        self.throttled = 0  # 503 answers seen (reported by benchmarks and tests)
        self._local = threading.local()
        netloc = host if port is None else f"{host}:{port}"
        self.base = f"{scheme}://{netloc}"

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def get(self, path: str, parse: Callable[[bytes], T], body: bytes | None = None) -> T:
        """GET ``path`` (optionally with a body, as DVID's /indices wants) and parse the 200 body.

        Retries connection errors, timeouts, 429/5xx and unparsable 200 bodies with exponential
        backoff; any other status is an immediate `DvidHttpError` quoting DVID's message.
        """
        url = self.base + path
        last = ""
        attempt = 0  # failed attempts; 503 (throttled) answers do not count
        throttled_since: float | None = None
        n503 = 0
        while attempt <= self.retries:
            if throttled_since is not None:  # throttled: full jitter spreads the workers out
                time.sleep(random.uniform(0, min(max(self.backoff, 0.02) * 2 ** min(n503, 9), 10.0)))
            elif attempt:
                log.warning("retrying GET %s (attempt %d): %s", url, attempt + 1, last)
                delay = min(self.backoff * (2 ** (attempt - 1)), 30.0)
                time.sleep(delay * (0.75 + 0.5 * random.random()))
            headers = {"Accept-Encoding": "identity"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            try:
                with self._slots:
                    conn = self._conn()
                    conn.request("GET", path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                status = resp.status
                retry_after = resp.getheader("Retry-After")
                if resp.will_close:
                    self._drop()
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                attempt += 1
                self._drop()
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if status == 200:
                try:
                    return parse(data)
                except _StreamError as exc:
                    attempt += 1
                    last = f"bad response body: {exc}"
                    continue
            text = data[:300].decode("utf-8", "replace").strip()
            if status == 503:  # DVID's throttle: wait and retry, not a failure
                self.throttled += 1
                n503 += 1
                now = time.monotonic()
                if throttled_since is None:
                    throttled_since = now
                if now - throttled_since < THROTTLE_PATIENCE:
                    last = f"HTTP 503: {text}"
                    if retry_after and retry_after.isdigit():
                        time.sleep(min(float(retry_after), 30.0))
                    continue
                raise DvidUnavailable(
                    f"GET {url}: DVID answered 503 (throttled) for {THROTTLE_PATIENCE:.0f} s; "
                    "raise its throttle (POST /api/server/settings) or lower parallel="
                )
            throttled_since, n503 = None, 0
            if status in _RETRY_STATUS:
                attempt += 1
                last = f"HTTP {status}: {text}"
                if retry_after and retry_after.isdigit():
                    time.sleep(min(float(retry_after), 30.0))
                continue
            if status in (401, 403) or (
                status == 400 and ("auth" in text.lower() or "token" in text.lower())
            ):
                how = "the DVID token was refused" if self._token else (
                    f"DVID wants a token: set {DVID_TOKEN_ENV} or {DVID_TOKEN_FILE_ENV} "
                    "(or token_file= in the URL)"
                )
                raise DvidAuthError(f"GET {url}: HTTP {status}: {how}: {text}")
            raise DvidHttpError(f"DVID error for GET {url}: HTTP {status}: {text}")
        raise DvidUnavailable(f"GET {url} failed after {self.retries + 1} attempts: {last}")

    def close(self) -> None:
        self._drop()


# ---------------------------------------------------------------------------- stream parsing
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


# ---------------------------------------------------------------------------- the source
def open_url(url: str) -> DvidHttpSource:
    """Open ``dvid+http(s)://host:port[?uuid=&instance=&timeout=&retries=&...]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("dvid+http", "dvid+https"):
        raise UserError(f"not a dvid+http(s):// URL: {url!r}")
    if not parts.hostname:
        raise UserError(f"no host in {url!r} (use dvid+http://host:port?uuid=...)")
    q = Query(url, KNOWN_PARAMS)
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"bad port in {url!r}") from None
    return DvidHttpSource(
        host=parts.hostname,
        port=port,
        https=parts.scheme == "dvid+https",
        uuid=q.str("uuid"),
        instance=q.str("instance", "segmentation"),
        timeout=q.float("timeout", 60.0, 0.01, 3600),
        retries=q.int("retries", 6, 0, 100),
        backoff=q.float("backoff", 0.2, 0.0, 60),
        box_bits=q.int("box_bits", 12, 0, 30),
        parallel=q.int("parallel", 4, 1, 64),
        throttle=q.bool("throttle"),
        minpoint=_point(q, "minpoint", url),
        maxpoint=_point(q, "maxpoint", url),
        inflight=q.int("inflight", None, 1, 256),
        token_file=q.str("token_file"),
        index_parallel=q.int("index_parallel", None, 1, 64),
        index_batch=q.int("index_batch", INDICES_PER_REQUEST, 1, 1_000_000),
        rows_per_label=q.int("rows_per_label", ROWS_PER_LABEL, 1, 1 << 40),
        labels=q.choice("labels", ("auto", "existing", "listlabels")),
        box_shape=q.choice("box_shape", ("rows", "cube")),
        spec=q.str("spec"),
    )


#: the options of a dvid+http URL (module docstring)
KNOWN_PARAMS = ("uuid", "instance", "timeout", "retries", "backoff", "box_bits", "parallel",
                "throttle", "minpoint", "maxpoint", "inflight", "token_file", "index_parallel",
                "index_batch", "rows_per_label", "labels", "box_shape", "spec")


def _point(q: Query, key: str, url: str) -> tuple[int, int, int] | None:
    if key not in q:
        return None
    try:
        p = tuple(int(v) for v in q.str(key).split(","))
    except ValueError:
        p = ()
    if len(p) != 3 or min(p) < 0:
        raise UserError(f"parameter {key}={q.str(key)!r} in {url!r} must be X,Y,Z (>= 0 voxels)")
    return p  # type: ignore[return-value]


class DvidHttpSource:
    """A DVID labelmap instance at one UUID, read over HTTP (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        https: bool = False,
        uuid: str | None = None,
        instance: str = "segmentation",
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.2,
        box_bits: int = 12,
        parallel: int = 4,
        throttle: bool = False,
        minpoint: tuple[int, int, int] | None = None,
        maxpoint: tuple[int, int, int] | None = None,
        inflight: int | None = None,
        token_file: str | None = None,
        index_parallel: int | None = None,
        index_batch: int = INDICES_PER_REQUEST,
        rows_per_label: int = ROWS_PER_LABEL,
        labels: str = "auto",
        box_shape: str = "rows",
        spec: str | None = None,
    ) -> None:
        # throttle=true: DVID admits 1 throttled request per server by default (more after
        # POST /api/server/settings {"throttle": N}; say so with inflight=N)
        if inflight is None:
            inflight = 1 if throttle else parallel
        self.http = _Http(
            "https" if https else "http", host, port, timeout, retries, backoff,
            inflight=inflight, token=dvid_token(token_file),
        )
        self.instance = instance
        self.box_bits = box_bits
        self.parallel = parallel
        self.index_parallel = parallel if index_parallel is None else index_parallel
        self.index_batch = index_batch
        self.rows_per_label = rows_per_label
        self.labels_from = labels
        self.box_shape = box_shape
        self.spec_path = spec
        if spec:
            from dvidetl.sources.shards import _load_spec

            self._spec = _load_spec(spec)
        else:
            self._spec = None
        self._labels: np.ndarray | None = None
        self.throttle = throttle
        self._minpoint, self._maxpoint = minpoint, maxpoint
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._mapping: tuple[np.ndarray, np.ndarray] | None = None
        self.uuid = uuid if uuid else self._discover_uuid()
        self._info = self._load_info()
        self.locked = self._node_locked()
        self._info = dataclasses.replace(self._info, locked=self.locked)
        if self.locked is False:
            log.warning(
                "DVID node %s is not locked: its range reads are not one snapshot, so an export "
                "of it is not reproducible (lock the node, or export a locked one)", self.uuid,
            )

    def _node_locked(self) -> bool | None:
        """The node's ``Locked`` flag from its repo's DAG (None when DVID does not say).

        Why: DVID's range reads are not single-snapshot, so only a locked node exports
        deterministically; ``info`` reports this and ``run`` refuses an unlocked node unless
        ``--allow-unlocked``."""
        try:
            repo = self._json(f"/api/repo/{quote(self.uuid, safe=':')}/info")
        except DvidHttpError:
            try:
                repo = next(iter((self._json("/api/repos/info") or {}).values()), None)
            except DvidHttpError:
                return None
        nodes = ((repo or {}).get("DAG") or {}).get("Nodes") or {}
        for key, node in nodes.items():
            full = str((node or {}).get("UUID") or key)
            if full.startswith(self.uuid.split(":")[0]) and "Locked" in (node or {}):
                return bool(node["Locked"])
        return None

    # -------------------------------------------------------------- info
    def _node(self, endpoint: str) -> str:
        return f"/api/node/{quote(self.uuid, safe=':')}/{quote(self.instance)}/{endpoint}"

    def _json(self, path: str) -> Any:
        def parse(body: bytes) -> Any:
            try:
                return json.loads(body)
            except ValueError:
                raise _StreamError(0, "response is not JSON", body) from None

        return self.http.get(path, parse)

    def _discover_uuid(self) -> str:
        """No uuid given: use the single leaf node of the server's only repo, else ask."""
        repos = self._json("/api/repos/info")
        leaves = []
        if isinstance(repos, dict):
            for repo in repos.values():
                nodes = ((repo or {}).get("DAG") or {}).get("Nodes") or {}
                for key, node in nodes.items():
                    if not (node or {}).get("Children"):
                        leaves.append(str((node or {}).get("UUID") or key))
        if len(repos or {}) != 1 or len(leaves) != 1:
            raise UserError(
                f"{self.http.base} holds {len(repos or {})} repo(s) with leaf nodes {leaves[:10]}: "
                "name the version with ?uuid=..."
            )
        return leaves[0]

    def _load_info(self) -> VolumeInfo:
        url = self.http.base + self._node("info")
        d = self._json(self._node("info"))
        try:
            base, ext = d["Base"], d["Extended"]
        except (KeyError, TypeError):
            raise DvidHttpError(
                f"{url}: not a DVID data instance info (no Base/Extended)"
            ) from None
        type_name = base.get("TypeName")
        if type_name not in (None, "labelmap"):
            raise DvidHttpError(
                f"{url}: instance {self.instance!r} is a {type_name}, not a labelmap"
            )
        comp = str(base.get("Compression") or "gzip").lower()
        if comp.startswith("gzip"):
            codec = "gzip"
        elif comp.startswith("no compression") or comp.startswith("none"):
            codec = "none"
        else:
            raise DvidHttpError(
                f"{url}: blocks are stored with {base.get('Compression')!r}; DVID serves /blocks "
                "correctly only for gzip (or uncompressed) storage"
            )
        bs = tuple(int(v) for v in (ext.get("BlockSize") or (64, 64, 64)))
        extents = d.get("Extents") or {}
        pmin = self._minpoint or extents.get("MinPoint") or ext.get("MinPoint")
        pmax = self._maxpoint or extents.get("MaxPoint") or ext.get("MaxPoint")
        if pmin is None and pmax is not None and self._maxpoint is not None:
            pmin = (0, 0, 0)
        if pmin is None or pmax is None:
            raise DvidHttpError(
                f"{url}: DVID reports no extents for {self.instance!r} (POST /extents first)"
            )
        pmin = tuple(int(v) for v in pmin)
        pmax = tuple(int(v) for v in pmax)
        if min(pmin) < 0 or min(pmax) < 0:
            raise DvidHttpError(
                f"{url}: extents {pmin}..{pmax} include negative coordinates, which dvidetl does "
                "not support (Morton codes need non-negative block coordinates)"
            )
        if any(pmin[d] > pmax[d] for d in range(3)):
            raise DvidHttpError(
                f"{url}: empty extents MinPoint {pmin} > MaxPoint {pmax} (no blocks written yet?)"
            )
        max_level = int(ext.get("MaxDownresLevel") or 0)
        if self._spec is not None:
            if len(self._spec) < max_level + 1:
                log.warning("spec %s has %d scales, DVID %d: exporting the first %d", self.spec_path,
                            len(self._spec), max_level + 1, len(self._spec))
                max_level = len(self._spec) - 1
            log.info("grid of every scale from the neuroglancer spec %s (ceil(size / %s)), as "
                     "export-shards uses it: Morton codes equal the shards'", self.spec_path, bs)
        else:
            log.info("grid of every scale from DVID's extents (MaxPoint %s): pass spec= to plan "
                     "on the neuroglancer spec's grid instead", pmax)
        scales = []
        for s in range(max_level + 1):
            f = 1 << s
            if self._spec is not None:
                size = [int(v) for v in self._spec[s]["size"]]
                grid = tuple(max(1, math.ceil(size[d] / bs[d])) for d in range(3))
                scales.append(ScaleInfo(scale=s, block_size=bs, grid=grid,
                                        voxel_min=tuple(pmin[d] // f for d in range(3)),
                                        voxel_max=tuple(size)))
                continue
            grid = tuple(max(1, math.ceil((pmax[d] + 1) / f / bs[d])) for d in range(3))
            scales.append(
                ScaleInfo(
                    scale=s,
                    block_size=bs,
                    grid=grid,
                    voxel_min=tuple(pmin[d] // f for d in range(3)),
                    voxel_max=tuple(math.ceil((pmax[d] + 1) / f) for d in range(3)),
                )
            )
        self._min_block = {
            sc.scale: tuple(min(sc.voxel_min[d] // bs[d], sc.grid[d] - 1) for d in range(3))
            for sc in scales
        }
        return VolumeInfo(
            uuid=self.uuid,
            instance=self.instance,
            codec=codec,
            scales=scales,
            has_mapping=True,
            has_indices=bool(ext.get("IndexedLabels", True)),
        )

    def info(self) -> VolumeInfo:
        return self._info

    def _scale(self, scale: int) -> ScaleInfo:
        try:
            return self._info.scale(scale)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None

    # -------------------------------------------------------------- count
    def count(self, scale: int, level: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Upper bounds: block slots inside the extents per Morton cell (``exact=False``).

        A cell ``code >> level`` is an aligned box whose side along each axis is 2^(bits of
        that axis among the low ``level`` code bits); its count is the product of the per-axis
        overlaps with the extents, so nothing is enumerated per block slot.
        """
        sc = self._scale(scale)
        if level < 0:
            raise UserError(f"count level must be >= 0, got {level}")
        grid = sc.grid
        k = [0, 0, 0]
        for d, _i, j in _bit_plan(grid):
            if j < level:
                k[d] += 1
        lo_b = self._min_block[scale]
        c_lo = [lo_b[d] >> k[d] for d in range(3)]
        c_hi = [((grid[d] - 1) >> k[d]) + 1 for d in range(3)]
        ncells = math.prod(c_hi[d] - c_lo[d] for d in range(3))
        if ncells > MAX_COUNT_CELLS:
            raise UserError(
                f"count at level {level} of scale {scale} would list {ncells:,} cells "
                f"(more than {MAX_COUNT_CELLS:,}): ask for a coarser level"
            )
        per_axis = []
        origins = []
        for d in range(3):
            c = np.arange(c_lo[d], c_hi[d], dtype=np.int64)
            a = np.maximum(c << k[d], lo_b[d])
            b = np.minimum((c + 1) << k[d], grid[d])
            per_axis.append(np.maximum(b - a, 0).astype(np.uint64))
            origins.append((c << k[d]).astype(np.uint64))
        ox, oy, oz = np.meshgrid(*origins, indexing="ij")
        nx, ny, nz = np.meshgrid(*per_axis, indexing="ij")
        counts = (nx * ny * nz).ravel()
        shift = np.uint64(min(level, 63))
        cells = morton_encode(ox.ravel(), oy.ravel(), oz.ravel(), grid)
        cells = cells >> shift if level < 64 else np.zeros_like(cells)
        order = np.argsort(cells, kind="stable")
        cells, counts = cells[order], counts[order]
        keep = counts > 0
        return cells[keep], counts[keep], False

    # -------------------------------------------------------------- blocks
    def _boxes(self, scale: int, lo: int, hi: int) -> Iterator[tuple[int, int, list]]:
        """Requests covering ``[lo, hi)`` in ascending Morton ranges: (code_lo, code_hi,
        [(box_lo, box_hi), ...]) clipped to the extents, at most ``2^box_bits`` slots a box:
        an aligned cube per range (``box_shape=cube``) or, for ranges bigger than one box,
        boxes of whole X rows (``rows``, the default: fewer DVID range scans)."""
        sc = self._scale(scale)
        grid = sc.grid
        plan = _bit_plan(grid)
        total = sum(axis_bits(grid))
        ext_lo = np.array(self._min_block[scale], dtype=np.int64)
        ext_hi = np.array(grid, dtype=np.int64)

        def side_bits(kbits: int) -> np.ndarray:
            kk = np.zeros(3, dtype=np.int64)
            for d, _i, j in plan:
                if j < kbits:
                    kk[d] += 1
            return kk

        hi = min(hi, 1 << total)
        m = min(self.box_bits, total)
        while lo < hi:
            k = (lo & -lo).bit_length() - 1 if lo else total
            while lo + (1 << k) > hi:
                k -= 1
            kb = min(k, m)
            if self.box_shape == "rows" and k > kb:
                yield from self._row_groups(lo, k, kb, grid, side_bits, ext_lo, ext_hi)
                lo += 1 << k
                continue
            side = np.int64(1) << side_bits(kb)
            n_sub = 1 << (k - kb)  # a big aligned range: its 2^kb sub-boxes, vectorized
            for c in range(0, n_sub, 1 << 20):
                idx = np.arange(c, min(n_sub, c + (1 << 20)), dtype=np.uint64)
                starts = np.uint64(lo) + (idx << np.uint64(kb))
                ox, oy, oz = morton_decode(starts, grid)
                org = np.stack([ox, oy, oz], axis=1).astype(np.int64)
                b_lo = np.maximum(org, ext_lo)
                b_hi = np.minimum(org + side, ext_hi)
                ok = np.all(b_hi > b_lo, axis=1)
                for i in np.flatnonzero(ok).tolist():
                    c0 = int(starts[i])
                    yield c0, c0 + (1 << kb), [(tuple(b_lo[i].tolist()), tuple(b_hi[i].tolist()))]
            lo += 1 << k

    def _row_groups(self, lo: int, k: int, kb: int, grid, side_bits, ext_lo, ext_hi):
        """An aligned range of 2^k slots (k > kb) as groups of 2^(kb+4) slots, each fetched as
        boxes holding whole X rows of the group (DVID reads a box with one Badger range scan
        per (y, z) row: rows of a 16^3 cube are 16 keys long, a group's up to 4x longer), at
        most 2^kb slots per request. A group's blocks are one Morton range: they are merged
        and sorted before they are served, so the stream stays in Morton order."""
        g = min(k - kb, GROUP_BITS)
        span = kb + g
        side = np.int64(1) << side_bits(span)
        n_groups = 1 << (k - span)
        for c in range(0, n_groups, 1 << 16):
            idx = np.arange(c, min(n_groups, c + (1 << 16)), dtype=np.uint64)
            starts = np.uint64(lo) + (idx << np.uint64(span))
            ox, oy, oz = morton_decode(starts, grid)
            org = np.stack([ox, oy, oz], axis=1).astype(np.int64)
            g_lo = np.maximum(org, ext_lo)
            g_hi = np.minimum(org + side, ext_hi)
            for i in np.flatnonzero(np.all(g_hi > g_lo, axis=1)).tolist():
                (x0, y0, z0), (x1, y1, z1) = g_lo[i].tolist(), g_hi[i].tolist()
                ny = max(1, min(y1 - y0, (1 << kb) // (x1 - x0)))
                nz = max(1, min(z1 - z0, (1 << kb) // ((x1 - x0) * ny)))
                boxes = [((x0, y, z), (x1, min(y + ny, y1), min(z + nz, z1)))
                         for z in range(z0, z1, nz) for y in range(y0, y1, ny)]
                c0 = int(starts[i])
                yield c0, c0 + (1 << span), boxes

    def _fetch_box(self, scale: int, box_lo: tuple, box_hi: tuple) -> tuple:
        """One /blocks request: (x, y, z, morton, data, offsets) sorted by Morton."""
        sc = self._info.scale(scale)
        bs = sc.block_size
        size = "_".join(str((box_hi[d] - box_lo[d]) * bs[d]) for d in range(3))
        off = "_".join(str(box_lo[d] * bs[d]) for d in range(3))
        path = self._node(f"blocks/{size}/{off}?compression=blocks&supervoxels=true&scale={scale}")
        if self.throttle:
            path += "&throttle=true"
        want_gzip = self._info.codec == "gzip"
        blo = np.array(box_lo, dtype=np.int64)
        bhi = np.array(box_hi, dtype=np.int64)
        grid = sc.grid

        def parse(body: bytes) -> tuple:
            buf = np.frombuffer(body, dtype=np.uint8)
            n, xs, ys, zs, starts, lens, err_off, err = _scan_block_records(
                buf, blo, bhi, want_gzip
            )
            if err:
                raise _StreamError(int(err_off), _ERRS[int(err)], body)
            xs, ys, zs = xs[:n], ys[:n], zs[:n]
            codes = morton_encode(xs, ys, zs, grid)
            order = np.argsort(codes, kind="stable")
            codes = codes[order]
            if n > 1 and np.any(codes[1:] == codes[:-1]):
                i = int(np.flatnonzero(codes[1:] == codes[:-1])[0])
                raise _StreamError(int(starts[order[i + 1]]) - 16, "block sent twice", body)
            data, offsets = _gather(buf, starts[:n], lens[:n], order)
            return xs[order], ys[order], zs[order], codes, data, offsets

        return self.http.get(path, parse)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(self.parallel, self.index_parallel),
                                                thread_name_prefix="dvid-http")
            return self._pool

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored blocks with ``lo <= morton < hi``, ascending, as gzip payloads."""
        self._scale(scale)
        lo, hi = max(int(lo), 0), int(hi)
        pool = self._executor()
        groups = self._boxes(scale, lo, hi)
        # every box is its own request (several in flight); a group's parts merge in order
        window: deque[list[Future]] = deque()
        pending: list[tuple] = []
        pending_bytes = 0
        try:
            while True:
                while sum(len(w) for w in window) < 2 * self.parallel:
                    nxt = next(groups, None)
                    if nxt is None:
                        break
                    window.append([pool.submit(self._fetch_box, scale, b_lo, b_hi)
                                   for b_lo, b_hi in nxt[2]])
                if not window:
                    break
                part = _merge_parts([f.result() for f in window.popleft()])
                if part[3].size == 0:
                    continue
                pending.append(part)
                pending_bytes += int(part[5][-1])
                nblocks = sum(p[3].size for p in pending)
                if pending_bytes >= MAX_BATCH_BYTES or nblocks >= MAX_BATCH_BLOCKS:
                    yield from self._emit(pending)
                    pending, pending_bytes = [], 0
            if pending:
                yield from self._emit(pending)
        finally:
            for fs in window:
                for f in fs:
                    f.cancel()

    @staticmethod
    def _emit(parts: list[tuple]) -> Iterator[pa.RecordBatch]:
        """Batches of <= MAX_BATCH_BYTES payload (at least one block each) from sorted parts."""
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        z = np.concatenate([p[2] for p in parts])
        codes = np.concatenate([p[3] for p in parts])
        lens = np.concatenate([np.diff(p[5]) for p in parts])
        data = np.concatenate([p[4] for p in parts]) if len(parts) > 1 else parts[0][4]
        offsets = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        a = 0
        n = codes.size
        while a < n:
            b = int(np.searchsorted(offsets, offsets[a] + MAX_BATCH_BYTES, side="right")) - 1
            b = min(max(b, a + 1), n, a + MAX_BATCH_BLOCKS)
            sub_off = offsets[a : b + 1] - offsets[a]
            arr = _binary_array(data[offsets[a] : offsets[b]], sub_off)
            yield pa.RecordBatch.from_arrays(
                [pa.array(x[a:b]), pa.array(y[a:b]), pa.array(z[a:b]), pa.array(codes[a:b]), arr],
                schema=BLOCKS_WIRE_SCHEMA,
            )
            a = b

    # -------------------------------------------------------------- mapping
    def _mapping_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._mapping is not None:
                return self._mapping
        url = self.http.base + self._node("mappings?format=binary")

        def parse(body: bytes) -> np.ndarray:
            return parse_mappings(body)

        pairs = self.http.get(self._node("mappings?format=binary"), parse)
        sv, body = drop_background(pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64), url)
        order = np.lexsort((body, sv))
        sv, body = sv[order], body[order]
        keep = np.ones(sv.size, dtype=bool)
        keep[1:] = (sv[1:] != sv[:-1]) | (body[1:] != body[:-1])
        sv, body = sv[keep], body[keep]
        clash = np.flatnonzero(sv[1:] == sv[:-1])
        if clash.size:
            i = int(clash[0])
            raise DvidHttpError(
                f"{url}: supervoxel {int(sv[i])} is mapped to two bodies "
                f"({int(body[i])} and {int(body[i + 1])})"
            )
        with self._lock:
            if self._mapping is None:
                self._mapping = (sv, body)
            return self._mapping

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel (identity where unmapped), from the cached /mappings."""
        keys, vals = self._mapping_arrays()
        svs = np.asarray(svs, dtype=np.uint64)
        out = svs.copy()
        if keys.size and svs.size:
            pos = np.minimum(np.searchsorted(keys, svs), keys.size - 1)
            hit = keys[pos] == svs
            out[hit] = vals[pos[hit]]
        out[svs == 0] = 0  # background is never mapped
        return out

    def read_mapping(self, lo: int = 0, hi: int = KEY_END) -> Iterator[pa.RecordBatch]:
        """Pairs with ``lo <= supervoxel < hi`` from the cached sorted /mappings arrays."""
        return mapping_batches(*self._mapping_arrays(), lo, hi)

    def count_keys(self, kind: str, level: int, lo: int = 0, hi: int = KEY_END) -> KeyCounts:
        """Mapping: exact, from the cached /mappings. Indices: the labels exactly (from the
        cached label list, see ``label_list``), their rows estimated at ``rows_per_label``
        each (DVID would have to read every index to count them)."""
        if kind == "mapping":
            return count_sorted(self._mapping_arrays()[0], None, level, lo, hi)
        if not self._info.has_indices:
            return count_sorted(np.zeros(0, np.uint64), None, level, lo, hi)
        kc = count_sorted(self.label_list(), None, level, lo, hi, exact=False)
        return kc._replace(rows=kc.keys * np.uint64(self.rows_per_label))

    # -------------------------------------------------------------- indices
    def label_list(self) -> np.ndarray:
        """Every body label with an index, ascending; fetched once and cached, so planning
        and every indices partition share one listing. ``/existing-labels`` walks only the
        keys of DVID's label-index space (no values read); DVIDs without it get paged
        ``/listlabels``, which reads every index value (a second full pass besides the
        export's own /indices-compressed)."""
        with self._lock:
            if self._labels is not None:
                return self._labels
        labels = None
        if self.labels_from in ("auto", "existing"):
            try:
                labels = self._existing_labels()
            except DvidHttpError as exc:
                if self.labels_from == "existing" or isinstance(exc, (DvidUnavailable, DvidAuthError)):
                    raise
                log.info("DVID has no /existing-labels (%s); listing labels with /listlabels",
                         str(exc).splitlines()[0][:200])
        if labels is None:
            labels = self.list_labels(0, KEY_END)
        with self._lock:
            if self._labels is None:
                self._labels = labels
            return self._labels

    def _existing_labels(self) -> np.ndarray:
        path = self._node("existing-labels")

        def parse(body: bytes) -> np.ndarray:
            text = body.strip()
            if not text.startswith(b"[") or not text.endswith(b"]"):
                raise _StreamError(0, "/existing-labels did not answer one JSON array", body)
            try:
                vals = json.loads(text)
            except ValueError as exc:
                raise _StreamError(0, f"/existing-labels is not JSON ({exc})", body) from None
            arr = np.array(vals, dtype=np.uint64) if vals else np.zeros(0, np.uint64)
            arr = np.unique(arr)
            return arr[arr != 0]

        return self.http.get(path, parse)

    def list_labels(self, lo: int, hi: int) -> np.ndarray:
        """Body labels with an index, ``lo <= label < hi``, ascending (paged /listlabels)."""
        out: list[np.ndarray] = []
        start = max(int(lo), 0)
        while start < hi:

            def parse(body: bytes, start=start) -> np.ndarray:
                if len(body) >= 32 and body[-32:] == bytes(32):
                    raise _StreamError(
                        len(body) - 32, "DVID signalled an error (32 zero bytes)", body
                    )
                if len(body) % 8:
                    raise _StreamError(len(body) - len(body) % 8, "not whole uint64 labels", body)
                labels = np.frombuffer(body, dtype="<u8").astype(np.uint64)
                if labels.size and (
                    labels[0] < np.uint64(start) or np.any(labels[1:] <= labels[:-1])
                ):
                    raise _StreamError(0, "labels not ascending from start", body)
                return labels

            page = self.http.get(
                self._node(f"listlabels?start={start}&number={LISTLABELS_PAGE}"), parse
            )
            if page.size == 0:
                break
            out.append(page[page < np.uint64(min(hi, 2**64 - 1))] if hi < 2**64 else page)
            last = int(page[-1])
            if page.size < LISTLABELS_PAGE or last >= hi - 1 or last >= 2**64 - 1:
                break
            start = last + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)

    def _fetch_indices(self, chunk: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """One /indices-compressed request: (labels, unwrapped protobufs) of ``chunk``, the
        label of each record taken from its header (old stored protobufs carry label 0)."""
        url = self.http.base + self._node("indices-compressed")
        want = set(chunk.tolist())
        body = json.dumps(chunk.tolist()).encode()

        def parse(data: bytes) -> tuple[list[int], list[bytes]]:
            got_l: list[int] = []
            got_d: list[bytes] = []
            p = 0
            while p < len(data):
                if len(data) - p < 16:
                    raise _StreamError(p, "truncated index record header", data)
                n, label = struct.unpack_from("<QQ", data, p)
                if n == 0 and label == 0:
                    raise _StreamError(p, "DVID signalled an error (record n=0, label=0)", data)
                if label not in want:
                    raise _StreamError(p, f"unrequested label {label}", data)
                if p + 16 + n > len(data):
                    raise _StreamError(p, "index record runs past the end of the body", data)
                if n:
                    got_l.append(label)
                    got_d.append(_unwrap_index(data[p + 16 : p + 16 + n], url, label))
                p += 16 + n
            return got_l, got_d

        got_l, got_d = self.http.get(self._node("indices-compressed"), parse, body=body)
        arr = np.array(got_l, dtype=np.uint64)
        order = np.argsort(arr, kind="stable")
        return arr[order], [got_d[i] for i in order.tolist()]

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """LabelIndex protobufs (unwrapped) of the labels in ``[lo, hi)``, ascending: the
        labels from the cached list, fetched ``index_batch`` per /indices-compressed request
        with ``index_parallel`` requests in flight, delivered in label order.

        Nothing for an instance with ``IndexedLabels: false`` (DVID keeps no indices then)."""
        if not self._info.has_indices:
            return
        labels = self.label_list()
        labels = labels[key_slice(labels, int(lo), int(hi))]
        pool = self._executor()
        chunks = (labels[a : a + self.index_batch] for a in range(0, labels.size, self.index_batch))
        window: deque[Future] = deque()
        try:
            while True:
                while len(window) < self.index_parallel:
                    nxt = next(chunks, None)
                    if nxt is None:
                        break
                    window.append(pool.submit(self._fetch_indices, nxt))
                if not window:
                    break
                got_l, got_d = window.popleft().result()
                if got_l.size:
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(got_l), pa.array(got_d, pa.binary())], schema=INDICES_SCHEMA
                    )
        finally:
            for f in window:
                f.cancel()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            self._mapping = None
        self.http.close()


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
    from dvidetl.codec import unwrap
    from dvidetl.codec.errors import BlockFormatError

    try:
        return bytes(unwrap(v, "dvid"))
    except BlockFormatError as exc:
        raise DvidHttpError(f"{url}: label {label}: cannot unwrap the stored index ({exc})") from None


__all__ = [
    "DvidAuthError", "DvidHttpError", "DvidHttpSource", "DvidUnavailable", "dvid_token", "open_url",
]
