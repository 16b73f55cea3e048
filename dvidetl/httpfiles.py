"""Serve directories read-only over HTTP the way browser viewers and tensorstore read them:
byte ``Range`` requests, CORS, exact content types, nothing outside the directories.

Why one home: a neuroglancer precomputed volume is read as files over HTTP — a sharded scale
only through byte ranges of its shard files (index, minishard index, chunk) — by a page that
is usually served from another origin, so ``Range`` must answer 206 with ``Content-Range``
(416 when unsatisfiable) and CORS must allow and expose it. tornado's ``StaticFileHandler``
(tornado comes with distributed and bokeh) already does ranges, HEAD, conditional requests and
streaming in 64 KiB pieces; this module adds CORS and preflight, content types by name (an
extension-less ``info`` is JSON; ``.wasm`` must be ``application/wasm`` for the browser to
compile it), an ETag from size and mtime (tornado's default hashes the whole file, and a shard
can be gigabytes), a symlink check that does not depend on the tornado version, and an access
log. The server runs on its own thread with its own event loop, so a command (or a test) keeps
its main thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tornado.httpserver
import tornado.netutil
import tornado.web

from dvidetl.errors import UserError

__all__ = ["Access", "FileServer", "FilesHandler", "WILDCARDS", "browser_url", "url_host"]

log = logging.getLogger(__name__)

#: content types by file name suffix; anything else is application/octet-stream (chunk and
#: shard files). ``info`` (a precomputed volume's metadata) has no suffix.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
NAMED_TYPES = {"info": "application/json"}

#: the request headers a cross-origin page may send, and the response headers it may read
CORS_ALLOW_HEADERS = "Range, If-None-Match, If-Modified-Since, Cache-Control, Content-Type"
CORS_EXPOSE_HEADERS = "Content-Range, Content-Length, Accept-Ranges, ETag, Last-Modified"


@dataclass(frozen=True)
class Access:
    """One served request, for the access log."""

    method: str
    path: str
    status: int
    range: str | None
    bytes: int


def content_type(path: str) -> str:
    name = os.path.basename(path)
    if name in NAMED_TYPES:
        return NAMED_TYPES[name]
    return CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")


class CorsMixin:
    """CORS on every answer (errors too: tornado calls ``set_default_headers`` on clear),
    and a 204 answer to the preflight a Range request from another origin triggers."""

    def set_default_headers(self) -> None:
        self.set_header("Access-Control-Allow-Origin", "*")  # type: ignore[attr-defined]
        self.set_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")  # type: ignore[attr-defined]
        self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)  # type: ignore[attr-defined]
        self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)  # type: ignore[attr-defined]
        self.set_header("Access-Control-Max-Age", "600")  # type: ignore[attr-defined]

    def options(self, *args) -> None:
        self.set_status(204)  # type: ignore[attr-defined]
        self.finish()  # type: ignore[attr-defined]


class FilesHandler(CorsMixin, tornado.web.StaticFileHandler):
    """One directory, read-only. ``no_cache``: browsers revalidate every read (an export
    that is still being written or is re-run changes under the viewer); else the files are
    immutable (a built client whose names carry content hashes)."""

    def initialize(self, path: str, no_cache: bool = False,  # type: ignore[override]
                   default_filename: str | None = "index.html") -> None:
        super().initialize(path, default_filename)
        self.no_cache = no_cache

    def prepare(self) -> None:
        self.settings["httpfiles"]._begin()

    def on_finish(self) -> None:  # after the access log line
        self.settings["httpfiles"]._end()

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        # tornado refuses "..", absolute and encoded escapes by the path as written; a
        # symlink in the directory must not lead out of it either, whatever tornado's version
        real = os.path.realpath(absolute_path)
        top = os.path.realpath(root)
        if real != top and not real.startswith(top + os.sep):
            raise tornado.web.HTTPError(403, "%s is outside the served directory", self.path)
        # hidden names are not served: an export's bookkeeping (.dvidetl: run records, the
        # ledger) and a writer's temporary files (.NAME.tmp-...) are not the volume
        rel = os.path.relpath(absolute_path, root)
        if rel != os.curdir and any(part.startswith(".") for part in rel.split(os.sep)):
            raise tornado.web.HTTPError(404)
        return super().validate_absolute_path(root, absolute_path)

    def compute_etag(self) -> str | None:
        st = os.stat(self.absolute_path)  # type: ignore[arg-type]
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'

    def get_content_type(self) -> str:
        return content_type(self.absolute_path or "")

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache" if self.no_cache else "public, max-age=86400")


#: bind addresses that mean "every interface": a link then names this machine
WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def browser_url(host: str, port: int, path: str = "") -> str:
    """The URL a browser uses for what is bound at ``host:port``: the bound host itself, or
    this machine's name for a wildcard bind."""
    shown = socket.getfqdn() if host in WILDCARDS else host
    return f"http://{url_host(shown)}:{port}/{path.lstrip('/')}"


class FileServer:
    """An HTTP server on ``host:port`` (port 0: a free one, see ``port``) serving each
    ``(url prefix, directory)`` with ``FilesHandler``, plus any extra tornado ``handlers``
    (``(pattern, handler class[, kwargs])``); the rest is 404. ``start()`` binds (a bind
    failure is a ``UserError``) and serves on a daemon thread; ``stop()`` (or leaving the
    ``with`` block) closes open connections and ends the thread within seconds.
    ``access`` holds the last ``log_size`` requests."""

    def __init__(
        self,
        dirs: Sequence[tuple[str, str]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handlers: Sequence[tuple] = (),
        no_cache: bool = True,
        log_size: int = 10_000,
        on_access: Callable[[Access], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        routes: list[tuple] = list(handlers)
        for prefix, directory in dirs:
            prefix = "/" + prefix.strip("/")
            routes.append((rf"{prefix.rstrip('/')}/(.*)", FilesHandler,
                           {"path": os.fspath(directory), "no_cache": no_cache}))
        self.app = tornado.web.Application(routes, log_function=self._log, httpfiles=self)
        self.access: deque[Access] = deque(maxlen=log_size)
        self._busy = 0  # file requests begun and not yet logged
        self._idle = threading.Condition()
        self._on_access = on_access
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _log(self, handler: tornado.web.RequestHandler) -> None:
        req = handler.request
        length = handler._headers.get("Content-Length")  # what was (or would be) sent
        a = Access(req.method or "", req.path, handler.get_status(), req.headers.get("Range"),
                   int(length) if length and req.method != "HEAD" else 0)
        self.access.append(a)
        log.info("%s %s %s%s %d", a.method, a.path, a.status, f" ({a.range})" if a.range else "", a.bytes)
        if self._on_access is not None:
            self._on_access(a)

    def _begin(self) -> None:
        with self._idle:
            self._busy += 1

    def _end(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until every file request begun so far is answered and in ``access`` (a
        client can have the whole answer before the server has logged it)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    @property
    def url(self) -> str:
        """The server's base URL as a browser uses it (no trailing slash)."""
        return browser_url(self.host, self.port).rstrip("/")

    def start(self) -> FileServer:
        try:
            sockets = tornado.netutil.bind_sockets(self.port, address=self.host)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot listen on {url_host(self.host)}:{self.port}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        self.port = sockets[0].getsockname()[1]
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._server = tornado.httpserver.HTTPServer(self.app)
            self._server.add_sockets(sockets)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"httpfiles:{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return

        async def shut() -> None:
            server.stop()  # no new connections
            try:  # open ones, e.g. a page's event stream, end now
                await asyncio.wait_for(server.close_all_connections(), timeout)
            finally:
                loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shut()))
        thread.join(timeout + 1)
        self._loop = self._server = self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
