"""A look at a neuroglancer precomputed volume on disk: one local HTTP server serves the volume
(``dvidetl.httpfiles``: ranges, CORS) and neuroglancer's own client, and one link opens that
client with the volume as a layer, at its centre, in a cross-section.

Why the client from the ``neuroglancer`` package (the ``view`` extra): it bundles the built
client, so no CDN, no npm and no network are needed, and the page and the data share an
origin. That build is the one neuroglancer's Python integration serves: it finds its server
from a ``/v/<token>/`` path and keeps an ``EventSource`` open to ``/events/<token>`` (showing
"Disconnected from Python server" while it cannot). So the client is served under
``/v/dvidetl/`` and the event stream is answered, open and silent: the viewer state is in
the link's fragment (``#!{json}``, which that build reads when present) and never changes
server-side. ``/`` redirects to the link.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import tornado.web

from dvidetl.codec.ngshard import ShardFormatError, volume_bounds
from dvidetl.errors import UserError
from dvidetl.httpfiles import FileServer

__all__ = ["View", "volume_dir", "load_info", "client_dir", "viewer_state", "state_link", "view_link", "start_view"]

SCHEME = "precomputed://"
TOKEN = "dvidetl"
CLIENT_PREFIX = f"/v/{TOKEN}"
DATA_PREFIX = "/precomputed"
#: the cross-section's zoom: the volume's x/y extent spans about this many screen pixels
VIEW_PIXELS = 800
INSTALL_HINT = "pip install 'dvidetl[view]'"


def volume_dir(url: str) -> Path:
    """The directory of ``precomputed://DIR`` (``precomputed:///abs``, ``precomputed://./rel``).
    A query (the sink's options, such as ``spec=``) is ignored: what is served is what DIR's
    ``info`` says."""
    if not url.startswith(SCHEME):
        raise UserError(f"{url!r} is not a precomputed:// URL: use precomputed:///DIR")
    rest = url[len(SCHEME):].split("?", 1)[0]
    if not rest:
        raise UserError(f"{url!r} names no directory: use precomputed:///DIR")
    root = Path(rest)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (precomputed:///DIR names the volume's directory)")
    return root.resolve()


def load_info(root: Path) -> dict:
    """DIR's ``info``, checked enough to place the volume (``ngshard.volume_bounds``)."""
    path = root / "info"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file: {root} is not a precomputed volume") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    try:
        volume_bounds(info)
    except ShardFormatError as exc:
        raise UserError(f"{path}: {exc}") from None
    if info.get("type", "segmentation") not in ("segmentation", "image"):
        raise UserError(f"{path}: type must be 'segmentation' or 'image', got {info.get('type')!r}")
    return info


def client_dir() -> Path:
    """The built neuroglancer client inside the installed ``neuroglancer`` package (located
    without importing it: its import pulls in its whole Python server)."""
    spec = importlib.util.find_spec("neuroglancer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the neuroglancer viewer is not installed: {INSTALL_HINT}")
    for base in spec.submodule_search_locations:
        d = Path(base) / "static" / "client"
        if (d / "index.html").is_file():
            return d
    raise UserError(f"the installed neuroglancer package has no built client: {INSTALL_HINT}")


def viewer_state(info: dict, data_url: str, name: str) -> dict:
    """neuroglancer's state for the volume at ``data_url``: one layer (segmentation, or image
    for an image volume), the position at the centre of the volume, the cross-section zoomed
    so the x/y extent spans about ``VIEW_PIXELS`` pixels, an xy cross-section layout."""
    offset, size, res = volume_bounds(info)
    layer = "segmentation" if info.get("type", "segmentation") == "segmentation" else "image"
    return {
        "dimensions": {ax: [r * 1e-9, "m"] for ax, r in zip("xyz", res, strict=True)},  # nm
        "position": [o + s / 2 for o, s in zip(offset, size, strict=True)],
        "crossSectionScale": max(size[0], size[1]) / VIEW_PIXELS,
        "layers": [{"type": layer, "source": f"precomputed://{data_url}", "name": name}],
        "layout": "xy",
    }


def state_link(client_url: str, state: dict) -> str:
    """``client_url#!<state>``, the state percent-encoded as neuroglancer writes it (no
    quotes, braces or spaces left to break a terminal's link detection)."""
    return f"{client_url}#!" + quote(json.dumps(state, separators=(",", ":")), safe=":/")


def view_link(base: str, info: dict, name: str) -> str:
    """The link that opens the client served at ``base`` on the volume served there."""
    return state_link(f"{base}{CLIENT_PREFIX}/", viewer_state(info, f"{base}{DATA_PREFIX}", name))


class _EventStream(tornado.web.RequestHandler):
    """The client's server-state stream: answered and held open, nothing sent (see module)."""

    def prepare(self) -> None:
        self._closed = asyncio.Event()  # before anything can close the connection

    async def get(self, token: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.write(": dvidetl view: the state is in the link\n\n")
        await self.flush()
        await self._closed.wait()

    def on_connection_close(self) -> None:
        self._closed.set()


class _Home(tornado.web.RequestHandler):
    """``/``: the link, naming the host the browser used."""

    def initialize(self, info: dict, name: str) -> None:
        self.info, self.name = info, name

    def get(self) -> None:
        self.redirect(view_link(f"{self.request.protocol}://{self.request.host}", self.info, self.name))


@dataclass
class View:
    """A running view: ``link`` opens it; ``server.access`` is its access log."""

    root: Path
    info: dict
    server: FileServer
    link: str

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_view(root: Path, *, host: str = "127.0.0.1", port: int = 0) -> View:
    """Check the volume and the client, bind ``host:port`` (0: a free port) and serve; the
    link names ``host`` (this machine's name when ``host`` is a wildcard address:
    ``httpfiles.browser_url``)."""
    info = load_info(root)
    client = client_dir()
    name = root.name or "volume"
    server = FileServer(
        [(CLIENT_PREFIX, str(client)), (DATA_PREFIX, str(root))],
        host=host, port=port,
        handlers=[(r"/events/([^/]+)", _EventStream), (r"/", _Home, {"info": info, "name": name})],
    )
    server.start()
    link = view_link(server.url, info, name)
    return View(root=root, info=info, server=server, link=link)
