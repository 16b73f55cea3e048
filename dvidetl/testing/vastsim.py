"""vastsim: a local, wire-compatible subset of the VAST DataBase tabular HTTP API.

Why: there is no VAST cluster here, yet the VastDB sink must be tested with the *real*,
unmodified `vastdb` SDK. This server speaks the protocol described in
`shared/docs/vastdb-wire-subset.md` closely enough that the SDK runs against it unchanged:
version probe, transactions with isolation, bucket/schema/table DDL, columns, stats, sorting
keys, insert/update/delete by row id and `query_data` with server-side predicate evaluation,
multi-split/sub-split paging and the exact framed response. It enforces the real limits
(129,024-byte cells, 5 MiB request bodies, unsupported Arrow types), keeps committed state
in a directory (survives restarts) and has fault-injection knobs (503 SlowDown, dropped
connections, delays, 409 on commit) for reliability tests. See docs/vastsim.md.

Layout: this module is the HTTP face (faults, request handler, server, public API); the
data model and Arrow helpers are in ``_vastsim_model``, the catalog / data / transactions in
``_vastsim_state``, predicate evaluation and response paging in ``_vastsim_query``, and the
catalog calls' flatbuffer answers in ``_vastsim_fb``.

Run it:  python -m dvidetl.testing.vastsim --port 9090 --data-dir /tmp/vastsim
Python:  with start_vastsim(tmp_path) as sim: vastdb.connect(endpoint=sim.endpoint, ...)
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote
from xml.sax.saxutils import escape

import pyarrow as pa

from dvidetl.testing._vastsim_fb import (
    _columns_body,
    _list_schemas_body,
    _list_tables_body,
    _stats_body,
)
from dvidetl.testing._vastsim_model import (
    DEFAULT_BUCKETS,
    DEFAULT_VERSION,
    MAX_CELL_BYTES,
    MAX_REQUEST_BODY,
    SchemaMeta,
    SimError,
    _bad,
)
from dvidetl.testing._vastsim_query import (
    query_data,
)
from dvidetl.testing._vastsim_state import (
    SimState,
)

log = logging.getLogger("dvidetl.vastsim")

# --------------------------------------------------------------------------------------------
# faults


@dataclass
class Faults:
    """Fault-injection knobs (fractions are per request, 0..1)."""

    slowdown_rate: float = 0.0  # answer 503 <Code>SlowDown</Code> before doing anything
    drop_rate: float = 0.0  # drop the connection without applying the request
    drop_after_apply_rate: float = 0.0  # apply the request, then drop (lost response)
    commit_conflict_rate: float = 0.0  # answer a commit with 409 Conflict (tx rolled back)
    delay_s: float = 0.0  # delay every response by this much ...
    delay_jitter_s: float = 0.0  # ... plus uniform(0, jitter)
    # limit faults to these commands: "rows", "data", ... or "METHOD command" such as
    # "PUT transaction" (commit) or "POST rows" (insert)
    commands: tuple = ()
    # inject at most this many faults in all, then none (0: no limit): "lose one commit's
    # answer" is limit=1 with drop_after_apply_rate=1.0 on "PUT transaction"
    limit: int = 0
    # let the first N faults drawn pass unharmed ("lose the third commit's answer":
    # skip=2, limit=1, rate 1.0 on "PUT transaction")
    skip: int = 0
    seed: int | None = None

    @staticmethod
    def names() -> list[str]:
        return [f for f in Faults.__dataclass_fields__ if f != "seed"]


# --------------------------------------------------------------------------------------------
# HTTP


def _xml_error(code: str, message: str) -> bytes:
    return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error>").encode()


class _Dropped(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def version_string(self) -> str:
        return f"vast {self.server.sim_version}"

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    # ---- plumbing
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n <= self.server.max_body:
            return self.rfile.read(n) if n else b""
        left = n  # drain so the client can read our 400 instead of a broken pipe
        while left > 0:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                break
            left -= len(got)
        raise _bad(f"request body of {n} bytes exceeds the {self.server.max_body}-byte limit",
                   "EntityTooLarge")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _drop(self, partial: bytes = b"", total: int = 0) -> None:
        self.close_connection = True
        try:
            if total:
                self.send_response(200)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                self.wfile.write(partial)
                self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped()

    def _dispatch(self) -> None:
        srv = self.server
        srv.count("requests")
        self._pages: list[bytes] | None = None
        path, _, query = self.path.partition("?")
        parts = [p for p in query.split("&") if p]
        command = next((p for p in parts if "=" not in p), "")
        params = dict(parse_qsl("&".join(p for p in parts if "=" in p)))
        segs = [s for s in path.split("/") if s]
        srv.count(f"{self.command} {command}" if command else self.command)
        # which name of the server was asked (two names of one server stand for two CNode
        # VIPs: a client spreading its work over endpoints is seen here)
        srv.count(f"via {self.headers.get('Host', '')}")
        probe = command == "transaction" and \
            self.headers.get("tabular-get-vast-version", "").lower() == "true"
        try:
            try:
                body = self._read_body()
            except SimError as e:
                self._send(e.status, _xml_error(e.code, e.message))
                return
            self._auth(body)
            faults = srv.faults
            active = not probe and (not faults.commands or command in faults.commands
                                    or f"{self.command} {command}" in faults.commands)
            rnd = srv.rng
            if active and self.command != "HEAD" and faults.slowdown_rate and \
                    rnd.random() < faults.slowdown_rate and srv.spend(faults):
                srv.count("slowdown")
                self._send(503, _xml_error("SlowDown", "vastsim: injected slowdown"))
                return
            if active and faults.drop_rate and rnd.random() < faults.drop_rate and srv.spend(faults):
                srv.count("dropped")
                self._drop()
            drop_after = active and faults.drop_after_apply_rate and \
                rnd.random() < faults.drop_after_apply_rate and srv.spend(faults)
            if active and command == "transaction" and self.command == "PUT" and \
                    faults.commit_conflict_rate and rnd.random() < faults.commit_conflict_rate and \
                    srv.spend(faults):
                srv.count("conflict")
                txid = int(self.headers.get("tabular-txid", "0") or 0)
                try:
                    srv.state.rollback(txid)
                except SimError:
                    pass
                raise SimError(409, "Conflict", "vastsim: injected commit conflict")
            status, out, hdrs = self._route(command, params, segs, body)
            delay = faults.delay_s + (rnd.uniform(0, faults.delay_jitter_s)
                                      if faults.delay_jitter_s else 0.0)
            if active and delay > 0:
                time.sleep(delay)
            if drop_after:
                srv.count("dropped_after_apply")
                # a GET ?data is cut between two pages (after half of them), others before
                # any response byte
                pages = getattr(self, "_pages", None) or []
                self._drop(b"".join(pages[: len(pages) // 2]),
                           len(out) if command == "data" else 0)
            self._send(status, out, hdrs)
        except _Dropped:
            return
        except SimError as e:
            srv.count(f"error_{e.status}")
            self._send(e.status, _xml_error(e.code, e.message))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # never drop a connection on an internal error
            log.exception("vastsim: internal error on %s %s", self.command, self.path)
            srv.count("error_500")
            self._send(500, _xml_error("InternalError", f"{type(e).__name__}: {e}"))

    def _auth(self, body: bytes) -> None:
        """Check the access key and, when a secret is configured, the SigV4 signature."""
        want = self.server.access_key
        if want is None:
            return
        auth = self.headers.get("Authorization", "")
        parts = dict(p.strip().split("=", 1) for p in auth.partition(" ")[2].split(",")
                     if "=" in p)
        cred = parts.get("Credential", "").split("/")
        if not cred or cred[0] != want:
            raise SimError(403, "InvalidAccessKeyId", "the access key is not recognised")
        secret = self.server.secret_key
        if secret is None:
            return
        if len(cred) != 5 or "Signature" not in parts or "SignedHeaders" not in parts:
            raise SimError(403, "AccessDenied", "malformed AWS4-HMAC-SHA256 authorization")
        _, date, region, service, _ = cred
        path, _, query = self.path.partition("?")
        canon_q = "&".join(q if "=" in q else q + "="
                           for q in sorted(query.split("&")) if q.split("=", 1)[0])
        signed = parts["SignedHeaders"].split(";")
        canon_h = "".join(f"{h}:{self.headers.get(h, '')}\n" for h in signed)
        creq = "\n".join([self.command, quote(path or "/", safe="/-_.~"), canon_q, canon_h,
                          parts["SignedHeaders"], hashlib.sha256(body).hexdigest()])
        amzdate = self.headers.get("x-amz-date", "")
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amzdate, f"{date}/{region}/{service}/aws4_request",
                             hashlib.sha256(creq.encode()).hexdigest()])
        key = ("AWS4" + secret).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, parts["Signature"]):
            raise SimError(403, "SignatureDoesNotMatch", "the request signature does not match")

    def _txid(self) -> int:
        try:
            return int(self.headers.get("tabular-txid", "0"))
        except ValueError as e:
            raise _bad("tabular-txid must be a decimal integer") from e

    def _list_window(self, names: list) -> tuple[list, dict]:
        h = self.headers
        exact = h.get("tabular-name-exact-match")
        prefix = h.get("tabular-name-prefix", "")
        if exact is not None:
            names = [x for x in names if x[0] == exact]
        elif prefix:
            names = [x for x in names if x[0].startswith(prefix)]
        start = int(h.get("tabular-next-key", "0") or 0)
        max_keys = int(h.get("tabular-max-keys", "1000") or 1000)
        page = names[start:start + max_keys]
        truncated = start + max_keys < len(names)
        hdrs = {"tabular-next-key": start + len(page) if truncated else 0,
                "tabular-is-truncated": "true" if truncated else "false",
                "tabular-list-count": len(names)}
        if h.get("tabular-list-count-only", "False").lower() == "true":
            page = []
        return page, hdrs

    def _sorting_headers(self) -> list[int]:
        out = []
        i = 0
        while (v := self.headers.get(f"tabular-sorted-column-{i}")) is not None:
            try:
                out.append(int(v))
            except ValueError as e:
                raise _bad(f"bad sorting column index {v!r}") from e
            i += 1
        return out

    def _route(self, command: str, params: dict, segs: list[str], body: bytes):
        st: SimState = self.server.state
        m = self.command
        if command == "transaction":
            if segs:
                raise _bad("transactions are addressed at /")
            if m == "GET":
                if self.headers.get("tabular-get-vast-version", "").lower() == "true":
                    return 200, b"", {}
                with st.lock:
                    st.tx(self._txid())
                return 200, b"", {}
            if m == "POST":
                return 200, b"", {"tabular-txid": st.begin(self.client_address)}
            if m == "PUT":
                st.commit(self._txid())
                return 200, b"", {}
            if m == "DELETE":
                st.rollback(self._txid())
                return 200, b"", {}
        if not segs:
            raise SimError(405, "MethodNotAllowed", f"{m} {self.path} is not supported")
        bucket = segs[0]
        if m == "HEAD" and not command:
            st.check_bucket(bucket)
            return 200, b"", {}
        txid = self._txid()
        if command == "schema":
            path = "/".join(segs[1:])
            with st.lock:
                tx = st.tx(txid)
                if m == "GET":
                    st.check_bucket(bucket)
                    if path:
                        st.need_schema(tx, bucket, path)
                    props = {p: (st.get_schema(tx, bucket, p) or SchemaMeta("", "")).properties
                             for p in st.all_schemas(tx, bucket)}
                    names = [(n, props.get(f"{path}/{n}" if path else n, ""))
                             for n in st.child_schemas(tx, bucket, path)]
                    page, hdrs = self._list_window(names)
                    return 200, _list_schemas_body(bucket, page), hdrs
                if m == "POST":
                    st.create_schema(tx, bucket, path, "")
                    return 200, b"", {}
                if m == "DELETE":
                    st.drop_schema(tx, bucket, path)
                    return 200, b"", {}
                if m == "PUT":
                    new = params.get("tabular-new-schema-name")
                    if new:
                        st.rename_schema(tx, bucket, path, new)
                    return 200, b"", {}
        if command == "table" and m == "GET":
            schema = "/".join(segs[1:])
            with st.lock:
                tx = st.tx(txid)
                st.need_schema(tx, bucket, schema)
                metas = st.schema_tables(tx, bucket, schema)
                rows = []
                for t in metas:
                    rows.append((t.name, t))
                page, hdrs = self._list_window(rows)
                out = []
                for name, t in page:
                    nrows, size = st.counts(tx, t)
                    out.append({"name": name, "handle": t.handle, "num_rows": nrows,
                                "size": size, "sorting": t.sorted})
            return 200, _list_tables_body(bucket, schema, out), hdrs
        if len(segs) < 3:
            raise _bad(f"{command}: the path must be /bucket/schema/table")
        schema, table = "/".join(segs[1:-1]), segs[-1]
        if params.get("sub-table"):
            raise SimError(501, "NotImplemented", "sub-tables (imports table) are not supported")
        if command == "table":
            with st.lock:
                tx = st.tx(txid)
                if m == "POST":
                    try:
                        arrow_schema = pa.ipc.read_schema(pa.py_buffer(body))
                    except (pa.ArrowInvalid, OSError) as e:
                        raise _bad(f"create table: body is not an Arrow schema: {e}") from e
                    if any(k.startswith(b"VAST:table:partition-key")
                           for k in (arrow_schema.metadata or {})):
                        raise SimError(501, "NotImplemented", "partitioned tables")
                    if self.headers.get("tabular-vector-index-column"):
                        raise SimError(501, "NotImplemented", "vector indexes")
                    st.create_table(tx, bucket, schema, table, arrow_schema,
                                    self._sorting_headers())
                    return 200, b"", {}
                if m == "DELETE":
                    st.drop_table(tx, bucket, schema, table)
                    return 200, b"", {}
                if m == "PUT":
                    new = params.get("tabular-new-table-name", "")
                    st.alter_table(tx, bucket, schema, table, new.rpartition("/")[2] or None,
                                   self._sorting_headers())
                    return 200, b"", {}
        if command in ("column", "sorted-columns"):
            with st.lock:
                tx = st.tx(txid)
                meta = st.need_table(tx, bucket, schema, table)
                if m == "GET":
                    if command == "sorted-columns" and not meta.sorted:
                        raise _bad("Listing sorted columns without elysium enabled")
                    total = len(meta.sort_key) if command == "sorted-columns" \
                        else len(meta.fields)
                    start = int(self.headers.get("tabular-next-key", "0") or 0)
                    max_keys = max(1, int(self.headers.get("tabular-max-keys", "10000")
                                          or 10000))
                    truncated = start + max_keys < total
                    hdrs = {"tabular-next-key": start + max_keys if truncated else 0,
                            "tabular-is-truncated": "true" if truncated else "false",
                            "tabular-list-count": total}
                    body = _columns_body(meta, command == "sorted-columns", start, max_keys)
                    return 200, body, hdrs
                if command == "column" and m in ("POST", "DELETE"):
                    try:
                        cols = pa.ipc.read_schema(pa.py_buffer(body))
                    except (pa.ArrowInvalid, OSError) as e:
                        raise _bad(f"column: body is not an Arrow schema: {e}") from e
                    if m == "POST":
                        st.add_columns(tx, bucket, schema, table, cols)
                    else:
                        st.drop_columns(tx, bucket, schema, table, cols)
                    return 200, b"", {}
                if command == "column" and m == "PUT":
                    old = params.get("tabular-column-name", "")
                    st.rename_column(tx, bucket, schema, table, old,
                                     params.get("tabular-new-column-name", ""))
                    return 200, b"", {}
        if command == "stats" and m == "GET":
            with st.lock:
                tx = st.tx(txid)
                meta = st.need_table(tx, bucket, schema, table)
                nrows, size = st.counts(tx, meta)
                td = st._tdata(tx, meta.handle)
                ext = td.external_rowid or meta.handle in tx.external
            return 200, _stats_body(nrows, size, meta.sorted, ext), {}
        if command == "rows":
            if m == "POST":
                return 200, st.insert(txid, bucket, schema, table, body), {}
            if m in ("PUT", "DELETE"):
                st.update(txid, bucket, schema, table, body, delete=(m == "DELETE"))
                return 200, b"", {}
        if command == "data" and m == "GET":
            if params.get("name"):
                raise SimError(501, "NotImplemented", "semi-sorted projections")
            pages = query_data(st, txid, bucket, schema, table, body, self.headers)
            self._pages = pages
            return 200, b"".join(pages), {}
        raise SimError(501, "NotImplemented", f"{m} ?{command} is not supported by vastsim")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, state: SimState, *, access_key: str | None,
                 secret_key: str | None, version: str, faults: Faults, max_body: int):
        super().__init__(addr, _Handler)
        self.state = state
        self.access_key = access_key
        self.secret_key = secret_key if access_key is not None else None
        self.sim_version = version
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.max_body = max_body
        self.counters: dict[str, int] = {}
        self.injected = self.drawn = 0  # faults injected / drawn under the current knobs
        self._clock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("vastsim: client %s went away: %s", client_address, exc)
            return
        log.error("vastsim: error on connection from %s", client_address, exc_info=exc)

    def count(self, what: str) -> None:
        with self._clock:
            self.counters[what] = self.counters.get(what, 0) + 1

    def spend(self, faults: Faults) -> bool:
        """May a fault drawn be injected (``Faults.skip``, ``Faults.limit``)? Counts it."""
        with self._clock:
            self.drawn += 1
            if self.drawn <= faults.skip or (faults.limit and self.injected >= faults.limit):
                return False
            self.injected += 1
            return True


# --------------------------------------------------------------------------------------------
# public API


class VastSim:
    """A running in-process vastsim (background thread). Use as a context manager."""

    def __init__(self, data_dir: str | os.PathLike | None, port: int = 0, *,
                 host: str = "127.0.0.1", access_key: str | None = None,
                 secret_key: str | None = None, buckets=DEFAULT_BUCKETS,
                 version: str = DEFAULT_VERSION, max_cell_bytes: int = MAX_CELL_BYTES,
                 max_body: int = MAX_REQUEST_BODY, cell_error: tuple[int, str] = (400,
                                                                                   "TabularCellTooLarge"),
                 tx_timeout_s: float = 900.0, **faults: Any):
        unknown = set(faults) - set(Faults.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown vastsim options: {sorted(unknown)}")
        self.state = SimState(data_dir, buckets=buckets, max_cell_bytes=max_cell_bytes,
                              cell_error=cell_error, tx_timeout_s=tx_timeout_s)
        self._access = access_key
        self._secret = secret_key
        self._server = _Server((host, port), self.state, access_key=access_key,
                               secret_key=secret_key, version=version,
                               faults=Faults(**faults), max_body=max_body)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"vastsim:{self.port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def access_key(self) -> str:
        return self._access or "vastsim"

    @property
    def secret_key(self) -> str:
        return self._secret or "vastsim"

    @property
    def faults(self) -> Faults:
        return self._server.faults

    @property
    def counters(self) -> dict[str, int]:
        """Requests seen and faults injected (e.g. counters['slowdown'])."""
        with self._server._clock:
            return dict(self._server.counters)

    def set_faults(self, **faults: Any) -> None:
        """Change fault knobs at run time (unnamed knobs keep their values)."""
        cur = self._server.faults
        new = replace(cur, **faults)
        self._server.faults = new
        self._server.injected = self._server.drawn = 0
        if "seed" in faults:
            self._server.rng = random.Random(new.seed)

    def clear_faults(self) -> None:
        self._server.faults = Faults()
        self._server.injected = self._server.drawn = 0

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> VastSim:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vastsim(data_dir: str | os.PathLike | None, port: int = 0, **opts: Any) -> VastSim:
    """Start vastsim in a background thread; `opts` are VastSim options and fault knobs."""
    return VastSim(data_dir, port, **opts)


class VastSimProcess:
    """vastsim in a child process (`python -m dvidetl.testing.vastsim`), for crash tests."""

    def __init__(self, data_dir: str | os.PathLike, port: int = 0, *,
                 access_key: str | None = None, secret_key: str | None = None,
                 extra_args: list[str] | None = None, **faults: Any):
        args = [sys.executable, "-m", "dvidetl.testing.vastsim", "--port", str(port),
                "--data-dir", str(data_dir)]
        for k, v in faults.items():
            if k not in Faults.__dataclass_fields__:
                raise TypeError(f"unknown fault knob {k!r}")
            if k == "commands":
                v = ",".join(v)
            args += [f"--{k.replace('_', '-')}", str(v)]
        args += extra_args or []
        env = dict(os.environ)
        if access_key is not None:  # secrets go through the environment, never argv
            env["VASTSIM_ACCESS_KEY"] = access_key
            env["VASTSIM_SECRET_KEY"] = secret_key or ""
        self._access, self._secret = access_key, secret_key
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"vastsim process failed to start: {line!r}")
        self.endpoint = line.strip().rsplit(" ", 1)[1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    @property
    def access_key(self) -> str:
        return self._access or "vastsim"

    @property
    def secret_key(self) -> str:
        return self._secret or "vastsim"

    def kill(self) -> None:
        """SIGKILL: uncommitted transactions are lost, committed data stays on disk."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> VastSimProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vastsim_process(data_dir: str | os.PathLike, port: int = 0,
                          **opts: Any) -> VastSimProcess:
    return VastSimProcess(data_dir, port, **opts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dvidetl.testing.vastsim",
                                description="Local wire-compatible VAST DataBase server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090, help="0 picks a free port")
    p.add_argument("--data-dir", default=None,
                   help="directory for committed state (default: in memory only)")
    p.add_argument("--bucket", action="append", default=None,
                   help=f"bucket that exists (repeatable; default {', '.join(DEFAULT_BUCKETS)})")
    p.add_argument("--version", default=DEFAULT_VERSION, help="reported VAST version A.B.C.D")
    p.add_argument("--max-cell-bytes", type=int, default=MAX_CELL_BYTES)
    p.add_argument("--max-body", type=int, default=MAX_REQUEST_BODY)
    p.add_argument("--tx-timeout-s", type=float, default=900.0,
                   help="roll back transactions idle this long (abandoned by a dead client)")
    p.add_argument("--slowdown-rate", type=float, default=0.0)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--drop-after-apply-rate", type=float, default=0.0)
    p.add_argument("--commit-conflict-rate", type=float, default=0.0)
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--delay-jitter-s", type=float, default=0.0)
    p.add_argument("--commands", default="", help="comma list of commands faults apply to")
    p.add_argument("--limit", type=int, default=0, help="inject at most this many faults (0: no limit)")
    p.add_argument("--skip", type=int, default=0, help="let the first N faults drawn pass")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="wipe --data-dir first")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING)
    if a.fresh and a.data_dir and Path(a.data_dir).exists():
        shutil.rmtree(a.data_dir)
    access = os.environ.get("VASTSIM_ACCESS_KEY") or None
    secret = os.environ.get("VASTSIM_SECRET_KEY") or None
    sim = VastSim(a.data_dir, a.port, host=a.host, access_key=access, secret_key=secret,
                  buckets=tuple(a.bucket) if a.bucket else DEFAULT_BUCKETS, version=a.version,
                  max_cell_bytes=a.max_cell_bytes, max_body=a.max_body,
                  tx_timeout_s=a.tx_timeout_s,
                  slowdown_rate=a.slowdown_rate, drop_rate=a.drop_rate,
                  drop_after_apply_rate=a.drop_after_apply_rate,
                  commit_conflict_rate=a.commit_conflict_rate, delay_s=a.delay_s,
                  delay_jitter_s=a.delay_jitter_s,
                  commands=tuple(c for c in a.commands.split(",") if c), limit=a.limit,
                  skip=a.skip, seed=a.seed)
    print(f"vastsim listening on {sim.endpoint}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
