"""`dvidetl view`: a precomputed volume written here with the codec modules (cseg chunks in
sharded scales, partial edge chunks on every axis, an all-background chunk not written) is
served by the real tornado server; checked as HTTP (ranges, HEAD, CORS, content types, 404,
traversal), read voxel for voxel by tensorstore through the server over HTTP, rendered by
neuroglancer's own client in headless Chromium (software WebGL: SwiftShader) with every
sampled voxel's colour checked on screen, and run as the command (one link, one-line errors,
Ctrl-C)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import tensorstore as ts
from test_codec_ngshard import write_scale

from dvidetl.cli import main as cli
from dvidetl.codec import encode_block
from dvidetl.codec.ngshard import derive_info, scale_grid
from dvidetl.geometry import ScaleInfo
from dvidetl.httpfiles import browser_url, url_host
from dvidetl.read.view import CLIENT_PREFIX, DATA_PREFIX, client_dir, start_view, view_link

SIZE = (150, 100, 70)  # x, y, z voxels: 64³ chunks partial on every axis
RES = (8, 8, 16)
SQUARE = 16  # label squares of 16x16 voxels in every xy plane
SECRET = b"outside the volume directory"


def labels_zyx(shape_zyx) -> np.ndarray:
    """1 + x//16 + 10 (y//16) + 100 (z//16); in every 16-plane band zb a 32x32 background
    hole at y 16..48, x 16 (zb + 1)..16 (zb + 3) (so each band's planes look different), and
    the chunk at x >= 128, y >= 64, z >= 64 all background (so it is not written)."""
    z, y, x = np.indices(shape_zyx, dtype=np.uint64)
    out = 1 + x // SQUARE + 10 * (y // SQUARE) + 100 * (z // SQUARE)
    for zb in range(-(-shape_zyx[0] // SQUARE)):
        out[SQUARE * zb: SQUARE * (zb + 1), 16:48, SQUARE * (zb + 1): SQUARE * (zb + 3)] = 0
    out[64:, 64:, 128:] = 0
    return out


def write_volume(root: Path) -> list[np.ndarray]:
    """Two sharded scales (scale 1: every other voxel) → the expected (z, y, x) arrays."""
    full = labels_zyx((128, 128, 192))
    want0 = full[: SIZE[2], : SIZE[1], : SIZE[0]]
    want1 = want0[::2, ::2, ::2]
    vols = [want0, want1]
    vinfo = [ScaleInfo(scale=i, block_size=(64, 64, 64), grid=tuple(-(-s // 64) for s in v.shape[::-1]),
                       voxel_max=v.shape[::-1]) for i, v in enumerate(vols)]
    info = derive_info(vinfo, RES, preshift_bits=1, minishard_bits=1)
    root.mkdir()
    (root / "info").write_text(json.dumps(info))
    for sc, want in zip(info["scales"], vols, strict=True):
        gx, gy, gz = scale_grid(sc)
        padded = np.full((gz * 64, gy * 64, gx * 64), 999_999, np.uint64)  # labels past the volume
        padded[: want.shape[0], : want.shape[1], : want.shape[2]] = want
        padded[: want.shape[0], : want.shape[1], : want.shape[2]][want == 0] = 0
        blocks, coords = [], []
        for z in range(gz):
            for y in range(gy):
                for x in range(gx):
                    blocks.append(encode_block(padded[64 * z: 64 * z + 64, 64 * y: 64 * y + 64, 64 * x: 64 * x + 64]))
                    coords.append((x, y, z))
        written = write_scale(root, sc, blocks, np.array(coords), None)
        assert sum(written.values()) <= len(blocks)
    return vols


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    base = tmp_path_factory.mktemp("view")
    (base / "secret.txt").write_bytes(SECRET)
    root = base / "vol"
    wants = write_volume(root)
    os.symlink(base / "secret.txt", root / "link-out")  # a symlink leading out of DIR
    return root, wants


@pytest.fixture(scope="module")
def view(volume):
    with start_view(volume[0]) as v:
        yield v


def _request(view, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One raw request (the path as given: no client-side normalisation of '..')."""
    c = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.shard"))


# ------------------------------------------------------------------------------- HTTP ---


def test_ranges_head_and_content(view, volume):
    root = volume[0]
    shard = max(_shards(root), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    n = len(data)
    url = f"{DATA_PREFIX}/{shard.parent.name}/{shard.name}"

    st, h, body = _request(view, "GET", f"{DATA_PREFIX}/info")
    assert (st, h["content-type"], body) == (200, "application/json", (root / "info").read_bytes())
    assert h["accept-ranges"] == "bytes" and h["access-control-allow-origin"] == "*"

    st, h, body = _request(view, "GET", url, {"Range": "bytes=0-15"})
    assert (st, h["content-range"], body) == (206, f"bytes 0-15/{n}", data[:16])
    assert h["content-type"] == "application/octet-stream" and h["content-length"] == "16"
    st, h, body = _request(view, "GET", url, {"Range": f"bytes={n - 100}-"})
    assert (st, h["content-range"], body) == (206, f"bytes {n - 100}-{n - 1}/{n}", data[-100:])
    st, h, body = _request(view, "GET", url, {"Range": "bytes=-7"})
    assert (st, h["content-range"], body) == (206, f"bytes {n - 7}-{n - 1}/{n}", data[-7:])
    st, h, body = _request(view, "GET", url, {"Range": f"bytes=40-{n + 500}"})  # end past EOF: clipped
    assert (st, h["content-range"], body) == (206, f"bytes 40-{n - 1}/{n}", data[40:])
    for whole in ("bytes=0-", "bytes=0-3,8-11"):  # the whole file, or several ranges: a plain 200
        st, h, body = _request(view, "GET", url, {"Range": whole})
        assert (st, body) == (200, data), whole
    for bad in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
        st, h, body = _request(view, "GET", url, {"Range": bad})
        assert (st, h["content-range"]) == (416, f"bytes */{n}"), bad
        assert h["access-control-allow-origin"] == "*"  # errors carry CORS too

    st, h, body = _request(view, "HEAD", url)
    assert (st, h["content-length"], body) == (200, str(n), b"")
    st, h, body = _request(view, "HEAD", url, {"Range": "bytes=10-19"})
    assert (st, h["content-range"], h["content-length"], body) == (206, f"bytes 10-19/{n}", "10", b"")
    # conditional reads (tensorstore revalidates with the ETag)
    st, h, _ = _request(view, "GET", url)
    st2, _, body = _request(view, "GET", url, {"If-None-Match": h["etag"]})
    assert (st, st2, body) == (200, 304, b"")

    st, h, body = _request(view, "GET", f"{CLIENT_PREFIX}/")
    assert st == 200 and h["content-type"].startswith("text/html") and b"<script" in body
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".wasm": "application/wasm", ".map": "application/json"}
    for ext, want in types.items():  # the client's files (a .wasm served otherwise is not compiled)
        name = next(p.name for p in client_dir().iterdir() if p.suffix == ext)
        st, h, body = _request(view, "GET", f"{CLIENT_PREFIX}/{name}")
        assert (st, h["content-type"], body) == (200, want, (client_dir() / name).read_bytes())


def test_cors_preflight_and_methods(view):
    st, h, body = _request(view, "OPTIONS", f"{DATA_PREFIX}/info", {
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range"})
    assert (st, body) == (204, b"")
    assert h["access-control-allow-origin"] == "*"
    assert "range" in h["access-control-allow-headers"].lower()
    assert set(h["access-control-allow-methods"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}
    assert "content-range" in h["access-control-expose-headers"].lower()
    for method in ("POST", "PUT", "DELETE"):
        assert _request(view, method, f"{DATA_PREFIX}/info")[0] == 405, method


def test_not_found_and_no_way_out_of_the_directory(view, volume):
    assert _request(view, "GET", f"{DATA_PREFIX}/nothing/here")[0] == 404
    assert _request(view, "GET", "/nothing")[0] == 404
    assert _request(view, "GET", f"{CLIENT_PREFIX}/no-such.js")[0] == 404
    outside = [
        f"{DATA_PREFIX}/../secret.txt", f"{DATA_PREFIX}/../../secret.txt",
        f"{DATA_PREFIX}/%2e%2e/secret.txt", f"{DATA_PREFIX}/..%2fsecret.txt",
        f"{DATA_PREFIX}/%2E%2E%2Fsecret.txt", f"{DATA_PREFIX}//{volume[0].parent}/secret.txt",
        f"{DATA_PREFIX}/{volume[0].parent}/secret.txt", f"{DATA_PREFIX}/link-out",
        f"{CLIENT_PREFIX}/../../../../../../{volume[0].parent}/secret.txt",
    ]
    for path in outside:
        st, _, body = _request(view, "GET", path)
        assert st in (403, 404) and SECRET not in body, (path, st)
    assert (volume[0] / "link-out").read_bytes() == SECRET  # the symlink itself works
    # hidden names (an export's .dvidetl bookkeeping, a writer's temporary shard) are not served
    scale = _shards(volume[0])[0].parent.name
    (volume[0] / ".dvidetl").mkdir(exist_ok=True)
    (volume[0] / ".dvidetl" / "run.json").write_bytes(SECRET)
    (volume[0] / scale / ".0.shard.tmp-1-ab").write_bytes(SECRET)
    for path in (f"{DATA_PREFIX}/.dvidetl/run.json", f"{DATA_PREFIX}/%2Edvidetl/run.json",
                 f"{DATA_PREFIX}/{scale}/.0.shard.tmp-1-ab", f"{DATA_PREFIX}/.dvidetl/"):
        st, _, body = _request(view, "GET", path)
        assert st == 404 and SECRET not in body, (path, st)
    assert _request(view, "GET", f"{DATA_PREFIX}/{scale}/{_shards(volume[0])[0].name}")[0] == 200


def test_home_redirects_to_the_link_and_events_stream_stays_open(view):
    st, h, _ = _request(view, "GET", "/")
    assert st == 302 and h["location"] == view.link
    c = http.client.HTTPConnection("127.0.0.1", view.server.port, timeout=10)
    try:
        c.request("GET", "/events/dvidetl?c=1")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        assert r.read1(200).startswith(b":")  # a comment, then nothing: the state is the link's
    finally:
        c.close()


def test_links_name_what_a_browser_can_reach():
    assert browser_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/"
    assert browser_url("::1", 8080, "/v/x/") == "http://[::1]:8080/v/x/"
    for wildcard in ("0.0.0.0", "::", ""):
        assert browser_url(wildcard, 1) == f"http://{url_host(socket.getfqdn())}:1/"


def test_link_opens_the_volume_at_its_centre(view, volume):
    base, _, frag = view.link.partition(f"{CLIENT_PREFIX}/#!")
    assert base == view.server.url
    state = json.loads(unquote(frag))
    assert not set(frag) & set(' "{}[]<>')  # nothing a terminal would cut the link at
    assert state["layers"] == [{"type": "segmentation", "source": f"precomputed://{base}{DATA_PREFIX}",
                                "name": volume[0].name}]
    assert state["position"] == [s / 2 for s in SIZE]
    assert state["dimensions"] == {ax: [r * 1e-9, "m"] for ax, r in zip("xyz", RES, strict=True)}
    assert state["layout"] == "xy" and state["crossSectionScale"] == max(SIZE[:2]) / 800


# ---------------------------------------------------------------- tensorstore over HTTP ---


def test_tensorstore_reads_the_volume_through_the_server(view, volume):
    """Whole scales (tensorstore then fetches whole shards) and sub-boxes across chunk and
    shard borders (then byte ranges: shard index, minishard index, chunk), each with a fresh
    cache, voxel for voxel."""
    def open_scale(i):
        return ts.open({"driver": "neuroglancer_precomputed", "scale_index": i,
                        "kvstore": {"driver": "http", "base_url": f"{view.server.url}{DATA_PREFIX}/"}},
                       context=ts.Context()).result()

    before = len(view.server.access)
    for i, want in enumerate(volume[1]):
        st = open_scale(i)
        assert st.domain.shape == (*want.shape[::-1], 1)
        got = np.asarray(st[..., 0].read().result()).T
        assert got.dtype == np.uint64 and np.array_equal(got, want), f"scale {i}"
    assert view.server.idle()
    whole = list(view.server.access)[before:]
    before = len(view.server.access)
    for i, want in enumerate(volume[1]):
        zyx = [slice(s // 3, s - s // 4) for s in want.shape]  # crosses chunk (and shard) borders
        got = np.asarray(open_scale(i)[zyx[2], zyx[1], zyx[0], 0].read().result()).T
        assert np.array_equal(got, want[tuple(zyx)]), f"scale {i} box"
    ranged = list(view.server.access)[before:]

    shards = {f"{DATA_PREFIX}/{p.parent.name}/{p.name}" for p in _shards(volume[0])}
    assert {a.path for a in whole if a.path.endswith(".shard")} == shards, whole  # all of them
    sizes = {f"{DATA_PREFIX}/{p.parent.name}/{p.name}": p.stat().st_size for p in _shards(volume[0])}
    parts = [a for a in ranged if a.status == 206]
    assert parts and {a.path for a in parts} <= shards, ranged
    for a in parts:  # each answer is exactly the range asked for
        lo, hi = (int(v) for v in a.range.removeprefix("bytes=").split("-"))
        assert a.bytes == hi - lo + 1 and hi < sizes[a.path], a
    for a in ranged:  # else a whole (small) shard
        assert a.status == 206 or a.bytes == sizes.get(a.path, a.bytes), a
    assert all(a.status in (200, 206, 304) for a in whole + ranged), whole + ranged


# ------------------------------------------------------------------- headless Chromium ---


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for this test: apt-get install chromium (.ci/run does)"
    return exe


class _Browser:
    """Headless Chromium driven over the DevTools protocol (tornado's websocket client):
    navigate, evaluate, screenshot. Not --virtual-time-budget as in test_dashboard: the
    neuroglancer client holds an event stream open, and virtual time never runs out while a
    request is pending."""

    FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
             "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1")

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([_chromium(), *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.profile, self.n, self.ws, self.console = profile, 0, None, []

    async def connect(self) -> None:
        from tornado.websocket import websocket_connect

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.time() < deadline, "Chromium did not start"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 28)
        await self.call("Runtime.enable")

    async def call(self, method: str, **params):
        self.n += 1
        i = self.n
        self.ws.write_message(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.read_message(), 60)
            assert msg is not None, "Chromium closed the DevTools connection"
            m = json.loads(msg)
            if m.get("id") == i:
                assert "error" not in m, m
                return m["result"]
            if m.get("method") == "Runtime.exceptionThrown":
                self.console.append(m["params"]["exceptionDetails"].get("text", ""))

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")

    async def screenshot(self) -> np.ndarray:
        from PIL import Image

        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def test_browser_renders_the_segmentation_from_the_link(view, volume, tmp_path):
    """Chromium opens the link; neuroglancer fetches the info and the shards' byte ranges
    from the server, reports its display ready, and the screen shows, at the centre of
    every label square of the plane at the link's position, the background colour where
    the data is 0 and one distinct colour per label where it is not."""
    want = volume[1][0]
    z = int(SIZE[2] / 2)
    before = len(view.server.access)

    async def run():
        b = _Browser(tmp_path / "profile")
        try:
            await b.connect()
            await b.call("Page.navigate", url=view.link)
            deadline = time.time() + 120
            while True:  # neuroglancer's own signal: every visible panel has its chunks drawn
                ready = await b.js("!!(window.viewer && viewer.layerManager.managedLayers.length"
                                   " && viewer.display.isReady())")
                if ready:
                    break
                assert time.time() < deadline, f"neuroglancer never got ready: {b.console}"
                await asyncio.sleep(0.25)
            rect = await b.js("(() => { const r = document.querySelector("
                              "'.neuroglancer-rendered-data-panel').getBoundingClientRect();"
                              " return [r.left, r.top, r.width, r.height]; })()")
            shot = await b.screenshot()
            from PIL import Image

            Image.fromarray(shot.astype(np.uint8)).save(tmp_path / "view.png")  # to look at
            return rect, shot, list(b.console)
        finally:
            b.close()

    rect, shot, errors = asyncio.run(run())
    assert view.server.idle()
    log = list(view.server.access)[before:]
    paths = {a.path for a in log if a.status in (200, 206, 304)}
    assert f"{DATA_PREFIX}/info" in paths
    fetched = [a for a in log if a.path.endswith(".shard") and a.status == 206]
    assert fetched and sum(a.bytes for a in fetched) > 1000, log  # chunk data, not just indices
    assert not [a for a in log if a.status >= 400 and a.path.startswith(DATA_PREFIX)], log

    left, top, width, height = rect
    cx, cy = left + width / 2, top + height / 2  # the link's position is the panel's centre
    k = 800 / max(SIZE[:2])  # screen pixels per voxel (crossSectionScale)
    bg = shot[int(cy), int(left + 20)]  # outside the volume: the panel's background
    colours: dict[int, set] = {}
    zeros = 0
    for y0 in range(0, SIZE[1], SQUARE):
        for x0 in range(0, SIZE[0], SQUARE):  # four voxels of each square, edge squares clipped
            label = int(want[z, y0, x0])
            for y in {y0 + 3, min(y0 + 12, SIZE[1] - 1)}:  # clear of the cross-hair lines
                for x in {x0 + 3, min(x0 + 12, SIZE[0] - 1)}:
                    assert want[z, y, x] == label
                    px = shot[int(cy + (y + 0.5 - SIZE[1] / 2) * k), int(cx + (x + 0.5 - SIZE[0] / 2) * k)]
                    if label == 0:
                        assert np.abs(px - bg).max() <= 8, ((x, y), px, bg)
                    else:
                        assert np.abs(px - bg).max() > 30, ((x, y, label), px, bg)
                        colours.setdefault(label, set()).add(tuple(px))
            zeros += label == 0
    assert zeros == 4 and len(colours) == 10 * 7 - 4  # every square of the plane
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per label
    assert len({next(iter(c)) for c in colours.values()}) > 0.9 * len(colours)  # labels differ
    assert not errors, errors


# ---------------------------------------------------------------------------- the command ---


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_command_refuses_what_it_cannot_show(tmp_path, capsys):
    (tmp_path / "noinfo").mkdir()
    for name, text in [("badjson", "{not json"), ("noscales", '{"type": "segmentation"}'),
                       ("badsize", '{"scales": [{"size": [0, 1, 1], "resolution": [8, 8, 8]}]}'),
                       ("notvol", '{"@type": "neuroglancer_skeletons", "scales": []}'),
                       ("mesh", '{"type": "mesh", "scales": [{"size": [1, 1, 1], "resolution": [1, 1, 1]}]}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "info").write_text(text)
    cases = [
        (f"precomputed://{tmp_path}/missing", "no such directory"),
        (f"precomputed://{tmp_path}/noinfo", "not a precomputed volume"),
        (f"precomputed://{tmp_path}/badjson", "not valid JSON"),
        (f"precomputed://{tmp_path}/noscales", "'scales' must be a non-empty list"),
        (f"precomputed://{tmp_path}/badsize", "scales[0].size must be 3 positive integers"),
        (f"precomputed://{tmp_path}/notvol", "'@type' must be 'neuroglancer_multiscale_volume'"),
        (f"precomputed://{tmp_path}/mesh", "type must be 'segmentation' or 'image'"),
        (f"parquet://{tmp_path}", "not a precomputed:// URL"),
        ("precomputed://", "names no directory"),
    ]
    for url, words in cases:
        assert cli(["view", url]) == 2, url
        line = _one_error_line(capsys)
        assert line.startswith("dvidetl view: error: ") and words in line, (url, line)


def test_command_refuses_a_bad_or_busy_port(volume, capsys):
    url = f"precomputed://{volume[0]}"
    assert cli(["view", url, "--port", "70000"]) == 2
    assert "not a TCP port" in _one_error_line(capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert cli(["view", url, "--port", str(s.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in _one_error_line(capsys)


def test_command_without_neuroglancer_says_what_to_install(volume, tmp_path, monkeypatch, capsys):
    """A Python where ``neuroglancer`` is a plain module, or a package without its built
    client, gets the install line (import machinery as is: the stand-ins shadow the real
    package on sys.path)."""
    monkeypatch.delitem(sys.modules, "neuroglancer", raising=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "neuroglancer.py").write_text("")
    empty = tmp_path / "empty"
    (empty / "neuroglancer").mkdir(parents=True)
    (empty / "neuroglancer" / "__init__.py").write_text("")
    for where, words in ((plain, "the neuroglancer viewer is not installed"), (empty, "has no built client")):
        with monkeypatch.context() as m:
            m.syspath_prepend(str(where))
            assert cli(["view", f"precomputed://{volume[0]}"]) == 2
            line = _one_error_line(capsys)
            assert words in line and "pip install 'dvidetl[view]'" in line, line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_command_prints_the_link_serves_and_stops_on_ctrl_c(volume, sig):
    root = volume[0]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "dvidetl", "view", f"precomputed://{root}", "-v"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(60)
        assert out and out[0].startswith("http://127.0.0.1:"), (out, p.poll())
        link = out[0].strip()
        base = link.split(CLIENT_PREFIX)[0]
        port = urlsplit(base).port
        assert port and link == view_link(base, json.loads((root / "info").read_text()), root.name)
        with urllib.request.urlopen(f"{base}{DATA_PREFIX}/info", timeout=10) as r:
            assert r.read() == (root / "info").read_bytes()
        # a page's event stream is open when Ctrl-C comes
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/events/dvidetl")
        assert c.getresponse().status == 200
        p.send_signal(sig)
        rc = p.wait(15)
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    rest, err = p.stdout.read(), p.stderr.read()
    assert rc == 0, err
    assert rest == "" and "Ctrl-C to stop" in err and "Traceback" not in err, (rest, err)
    assert f"GET {DATA_PREFIX}/info 200" in err  # -v: the access log
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}{DATA_PREFIX}/info", timeout=5)

