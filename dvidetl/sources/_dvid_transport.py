"""HTTP to DVID: keep-alive connections per thread, timeouts, retries with backoff, DVID's
throttle (503) waited out within an in-flight cap, the bearer token, and the errors a DVID
answer becomes (``DvidHttpError`` a user can fix, ``DvidUnavailable`` a worker retries)."""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from dvidetl.errors import SourceUnavailable, UserError
from dvidetl.redact import register_secret
from dvidetl.retry import Backoff

T = TypeVar("T")
log = logging.getLogger("dvidetl.sources.dvid_http")

_RETRY_STATUS = {429, 500, 502, 503, 504}
#: words of DVID's answers refusing credentials, which come as 400 in its "token" and
#: "authfile" modes (server/auth.go: "JWT required via Authorization in request header",
#: "error parsing JWT: signature is invalid", "user X is not authorized", "failed
#: authorization"); DSG mode answers 401/403
_AUTH_TEXT = re.compile(r"\bjwt\b|authoriz|\btoken\b|\bauth\b", re.IGNORECASE)


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

    path = token_file or os.environ.get(DVID_TOKEN_FILE_ENV)
    if path:
        try:
            tok = open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise UserError(f"cannot read DVID token file {path!r}: {exc.strerror or exc}") from None
        if not tok or any(c.isspace() for c in tok):
            raise UserError(f"DVID token file {path!r} is empty or holds whitespace inside the token")
        register_secret(tok)
        return tok
    tok = os.environ.get(DVID_TOKEN_ENV, "").strip()
    register_secret(tok)
    return tok or None


def token_origin(token_file: str | None = None) -> str:
    """Where ``dvid_token`` takes the token from, for messages (never the token itself)."""
    if token_file:
        return f"token_file={token_file}"
    if os.environ.get(DVID_TOKEN_FILE_ENV):
        return f"the file named by {DVID_TOKEN_FILE_ENV} ({os.environ[DVID_TOKEN_FILE_ENV]})"
    return DVID_TOKEN_ENV


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
        *, inflight: int = 64, token: str | None = None, token_from: str = DVID_TOKEN_ENV,
    ) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        #: failed attempts (errors, timeouts, 429/5xx other than 503) spend this budget
        self._failing = Backoff(tries=retries + 1, base=backoff, cap=30.0, jitter=0.25)
        #: 503 (throttled) answers do not count as tries — ``patience`` bounds them in time —
        #: and wait with full jitter, uniform(0, 2 * min(backoff * 2**n, 5 s)), spreading workers
        self._throttle = Backoff(tries=1, base=max(backoff, 0.02), cap=5.0, jitter=1.0)
        # DVID answers requests beyond its throttle slots 503 at once: never send more than it
        # admits (``inflight``), so throttling costs waiting, not failed attempts
        self._slots = threading.BoundedSemaphore(max(1, inflight))
        self._token = token  # never logged: messages below name the URL only
        self._token_from = token_from  # where it came from (an env name or a file), for messages
        #: seconds of nothing but 503s after which DVID counts as down
        self.patience = THROTTLE_PATIENCE
        self.throttled = 0  # 503 answers seen (reported by benchmarks and tests)
        self.sent = 0  # requests sent, retries included (what DVID was asked; tests compare it)
        self._local = threading.local()
        self._count_lock = threading.Lock()
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
        while attempt < self._failing.tries:
            if throttled_since is not None:
                self._throttle.pause(min(n503, 9))
            elif attempt:
                log.warning("retrying GET %s (attempt %d): %s", url, attempt + 1, last)
                self._failing.pause(attempt)
            headers = {"Accept-Encoding": "identity"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            try:
                with self._slots:
                    with self._count_lock:
                        self.sent += 1
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
                if now - throttled_since < self.patience:
                    last = f"HTTP 503: {text}"
                    if retry_after and retry_after.isdigit():
                        time.sleep(min(float(retry_after), 30.0))
                    continue
                raise DvidUnavailable(
                    f"GET {url}: DVID answered 503 (throttled) for {self.patience:.0f} s; "
                    "lower inflight= / parallel=, or let DVID admit more throttled requests: "
                    "POST /api/server/settings?admintoken=ADMIN_TOKEN {\"throttle\": \"N\"} "
                    "(an admin setting: without DVID's admin token it answers 400), then "
                    "inflight=N"
                )
            throttled_since, n503 = None, 0
            if status in _RETRY_STATUS:
                attempt += 1
                last = f"HTTP {status}: {text}"
                if retry_after and retry_after.isdigit():
                    time.sleep(min(float(retry_after), 30.0))
                continue
            if status in (401, 403) or (status == 400 and _AUTH_TEXT.search(text)):
                raise DvidAuthError(self._auth_message(url, status, text))
            raise DvidHttpError(f"DVID error for GET {url}: HTTP {status}: {text}")
        raise DvidUnavailable(f"GET {url} failed after {self._failing.tries} attempts: {last}")

    def _auth_message(self, url: str, status: int, text: str) -> str:
        """DVID refused the credentials: say whose fault and what to do (the token is never
        shown, only where it came from)."""
        fix = (f"put a token this DVID accepts in {DVID_TOKEN_ENV}, or in a file named by "
               f"{DVID_TOKEN_FILE_ENV} or by token_file= in the URL")
        if self._token:
            return (f"DVID refused the token from {self._token_from} (GET {url}: HTTP {status}: "
                    f"{text}): it is wrong, expired, or made for another DVID server; {fix} "
                    "(ask the DVID's admin for one)")
        return f"DVID requires a token (GET {url}: HTTP {status}: {text}): {fix}"

    def close(self) -> None:
        self._drop()
