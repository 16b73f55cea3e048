"""A small local HTTP server speaking DVID's labelmap API from any `Source` — only for what the
real DVID server cannot be made to do.

The real server (``testing/dvid_server.py``, ``../shared/dvid/bin/dvid``) is what the
``dvid+http`` behaviour is tested against: versions, locks, auth, throttling, edits, every
answer. This model stays for faults a real DVID cannot be made to show on demand — an error
text appended to a streamed 200, a body cut mid-stream (as DVID's 600 s write timeout cuts
it), a response held back, ``/listlabels``'s 32-zero-byte error marker, a mapping pair for
supervoxel 0 —, for older DVIDs (``/mappings`` as text, no ``/existing-labels``, indices
stored with label 0), and for what only a model can report (requests in flight, Badger range
scans per ``/blocks`` box, for the benchmarks). It enforces DVID's real limits (50,000 labels
per ``/indices-compressed``, block-aligned boxes, ``compression=blocks&supervoxels=true``).

`FakeDvid(source)` serves, on 127.0.0.1 (port 0 = any free port), the endpoints the
``dvid+http`` source uses, in DVID's exact wire formats (dvid-formats §5):

* ``GET /api/repos/info`` (one repo, one node), ``GET /api/node/<uuid>/<inst>/info``;
* ``GET .../blocks/<size>/<offset>?compression=blocks&supervoxels=true&scale=N`` — records
  ``int32 x, y, z, uint32 n`` + the gzip of the DVID block, **in random order**, only existing
  blocks, chunked like DVID's streaming writer;
* ``GET .../mappings[?format=binary]`` — uint64 LE (sv, body) pairs (or text lines), random order;
* ``GET .../indices-compressed`` with a JSON body of labels — ``uint64 n, uint64 label`` +
  the stored value (``0x80`` + uint32 size + LZ4 block of the LabelIndex protobuf);
* ``GET .../listlabels?start=&number=`` — ascending uint64 labels; ``GET .../existing-labels``
  — the same labels as one JSON array (``existing_labels = False``: an older DVID without it).

Concurrency of ``/indices-compressed`` is recorded (``indices_active``, ``indices_max``;
``indices_seconds`` delays each request, as DVID's one Get per label does);
``index_label_zero`` stores protobufs with label 0 inside (as old DVIDs did).

``replay=path`` serves the bytes of a recorded real stream (``stream_1block.dat``) verbatim
for any scale-0 ``/blocks`` request whose box contains block (0,0,0).

Fault knobs (counters, decremented per affected request; thread-safe):
``fail_first`` (answer 503 "throttled"), ``slow_first`` + ``slow_seconds`` (sleep before the
headers), ``error_first`` (append a DVID-style error text to a 200 /blocks or /mappings
stream), ``truncate_first`` (drop the connection in the middle of a /blocks body),
``listlabels_error_first`` (end /listlabels with 32 zero bytes). ``requests`` logs every path.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import lz4.block
import numpy as np

from dvidetl.geometry import KEY_END, morton_encode
from dvidetl.sources.base import Source

# Imports inside functions load numba (dvidetl.codec), protobuf, the compression libraries only
# where used: importing this module must not (CLI start-up, processes that never call them).

ERROR_TEXT = b"ERROR: fake DVID: storage read failed for block (3,4,5): context deadline exceeded\n"


def to_dvid_gzip(data: bytes, codec: str) -> bytes:
    """The gzip payload DVID sends for ``compression=blocks``, from a source's stored bytes
    (DVID passes its stored gzip through; other storage forms are unwrapped and re-gzipped)."""
    if codec == "gzip":
        return data
    if codec == "dvid" and data[:1] == b"\x40":  # DVID's gzip wrapper: strip the format byte
        return data[1:]
    from dvidetl.codec import unwrap

    return gzip.compress(unwrap(data, codec), compresslevel=1, mtime=0)


class FakeDvid:
    """A ThreadingHTTPServer on 127.0.0.1 serving a `Source` through DVID's HTTP API."""

    def __init__(
        self,
        source: Source,
        uuid: str = "f00dfeed",
        instance: str = "segmentation",
        *,
        replay: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.uuid = uuid
        self.instance = instance
        self.replay = Path(replay).read_bytes() if replay else None
        self.fail_first = 0
        self.slow_first = 0
        self.slow_seconds = 0.0
        self.error_first = 0
        self.truncate_first = 0
        self.listlabels_error_first = 0
        self.requests: list[str] = []
        #: like DVID's throttle: at most this many throttle=true requests at once, the rest 503
        self.throttle_slots = 0  # 0 = no throttling emulated
        self.throttled_active = 0
        self.throttled_max = 0  # most throttle=true requests seen in progress at once
        self.answered_503 = 0
        #: a DVID with auth on: every request must carry "Authorization: Bearer <token>"
        self.token: str | None = None
        self.locked = False
        #: an older DVID: no /existing-labels endpoint (the client must page /listlabels)
        self.existing_labels = True
        #: /indices-compressed requests in progress now / at most at once, and a delay per
        #: request (DVID reads each label's index with one Get: requests take a while)
        self.indices_active = 0
        self.indices_max = 0
        self.indices_seconds = 0.0
        #: store indices with label 0 inside the protobuf (what old DVIDs wrote)
        self.index_label_zero = False
        #: a DVID before v0.9.0: /mappings answers text lines whatever format= says
        self.mappings_text = False
        #: what DVID's Badger would do for the /blocks requests: one range scan per (y, z)
        #: row of each requested box (clipped to the grid), and the block slots those scan
        self.block_scans = 0
        self.blocks_served = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._indices: dict[int, bytes] | None = None
        self._labels: np.ndarray | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> FakeDvid:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeDvid:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeDvid not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"dvid+http://127.0.0.1:{self.port}?uuid={self.uuid}&instance={self.instance}"

    def take(self, knob: str) -> bool:
        """Consume one unit of a fault counter (negative = forever)."""
        with self._lock:
            left = getattr(self, knob)
            if left == 0:
                return False
            if left > 0:
                setattr(self, knob, left - 1)
            return True

    def shuffled(self, items: list) -> list:
        with self._lock:
            self._rng.shuffle(items)
        return items

    # -------------------------------------------------------------- content
    def info_json(self) -> dict:
        info = self.source.info()
        s0 = min(info.scales, key=lambda s: s.scale)
        f = 1 << s0.scale
        pmax = [s0.grid[d] * s0.block_size[d] * f - 1 for d in range(3)]
        return {
            "Base": {
                "TypeName": "labelmap",
                "TypeURL": "github.com/janelia-flyem/dvid/datatype/labelmap",
                "TypeVersion": "0.1",
                "Name": self.instance,
                "RepoUUID": self.uuid,
                "Compression": "gzip compression, level -1",
                "Checksum": "No checksum",
                "Versioned": True,
            },
            "Extended": {
                "Values": [{"DataType": "uint64", "Label": self.instance}],
                "BlockSize": list(s0.block_size),
                "VoxelSize": [8, 8, 8],
                "VoxelUnits": ["nanometers"] * 3,
                "MinPoint": [0, 0, 0],
                "MaxPoint": pmax,
                "IndexedLabels": bool(info.has_indices),
                "MaxDownresLevel": max(s.scale for s in info.scales),
            },
            "Extents": {"MinPoint": [0, 0, 0], "MaxPoint": pmax},
        }

    def blocks_records(self, scale: int, box_lo: list[int], box_hi: list[int]) -> list[bytes]:
        info = self.source.info()
        try:
            sc = info.scale(scale)
        except KeyError:
            return []
        lo = [max(0, v) for v in box_lo]
        hi = [min(box_hi[d], sc.grid[d]) for d in range(3)]
        if any(hi[d] <= lo[d] for d in range(3)):
            return []
        with self._lock:
            self.block_scans += (hi[1] - lo[1]) * (hi[2] - lo[2])
        # Morton codes grow with every coordinate, so the box lies in [code(lo), code(hi-1)]
        c0 = int(morton_encode(lo[0], lo[1], lo[2], sc.grid))
        c1 = int(morton_encode(hi[0] - 1, hi[1] - 1, hi[2] - 1, sc.grid)) + 1
        out = []
        for batch in self.source.read_blocks(scale, c0, c1):
            x, y, z = (batch.column(i).to_numpy() for i in range(3))
            keep = (
                (x >= lo[0]) & (x < hi[0]) & (y >= lo[1]) & (y < hi[1]) & (z >= lo[2]) & (z < hi[2])
            )
            data = batch.column("data")
            for i in np.flatnonzero(keep).tolist():
                payload = to_dvid_gzip(data[i].as_py(), info.codec)
                out.append(
                    struct.pack("<iiiI", int(x[i]), int(y[i]), int(z[i]), len(payload)) + payload
                )
        with self._lock:
            self.blocks_served += len(out)
        return self.shuffled(out)

    def mapping_pairs(self) -> np.ndarray:
        parts = [
            np.stack([b.column(0).to_numpy(), b.column(1).to_numpy()], axis=1)
            for b in self.source.read_mapping()
        ]
        pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
        perm = np.array(self.shuffled(list(range(len(pairs)))), dtype=np.int64)
        return pairs[perm].astype("<u8") if len(pairs) else pairs.astype("<u8")

    def _load_indices(self) -> tuple[np.ndarray, dict[int, bytes]]:
        with self._lock:
            if self._indices is None:
                d: dict[int, bytes] = {}
                if self.source.info().has_indices:
                    for b in self.source.read_indices(1, KEY_END - 1):
                        for lab, pb in zip(
                            b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True
                        ):
                            d[int(lab)] = pb
                self._indices = d
                self._labels = np.array(sorted(d), dtype=np.uint64)
            return self._labels, self._indices  # type: ignore[return-value]


class _Handler(BaseHTTPRequestHandler):
    owner: FakeDvid
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out as separate writes: without this, Nagle + delayed ACK
        # would add ~40 ms to every response
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    # -------------------------------------------------------------- helpers
    def _send(self, status: int, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, text: str) -> None:
        self._send(status, text.encode() + b"\n", "text/plain")

    def _stream(self, chunks: list[bytes], tail: bytes = b"", truncate: bool = False) -> None:
        """Chunked 200 response, like DVID's streaming handlers."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        body = b"".join(chunks) + tail
        if truncate:
            cut = max(1, len(body) // 2)
            self.wfile.write(b"%x\r\n" % len(body) + body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        step = 1 << 16
        for a in range(0, len(body), step):
            part = body[a : a + step]
            self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    # -------------------------------------------------------------- routing
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        fake = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        req_body = self.rfile.read(length) if length else b""
        with fake._lock:
            fake.requests.append(self.path)
        if fake.take("slow_first"):
            time.sleep(fake.slow_seconds)
        if fake.take("fail_first"):
            self._error(503, "Server is too busy, try again later (throttled)")
            return
        if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._error(400, "bad or missing authorization token")  # what DVID answers
            return
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        slot = fake.throttle_slots > 0 and q.get("throttle") == "true"
        if slot:
            with fake._lock:
                if fake.throttled_active >= fake.throttle_slots:
                    fake.answered_503 += 1
                    busy = True
                else:
                    busy = False
                    fake.throttled_active += 1
                    fake.throttled_max = max(fake.throttled_max, fake.throttled_active)
            if busy:
                self._error(503, "Server already running maximum of throttled operations")
                return
            try:
                time.sleep(0.005)  # hold the slot long enough for requests to overlap
                self._route(parts, q, req_body)
            finally:
                with fake._lock:
                    fake.throttled_active -= 1
            return
        self._route(parts, q, req_body)

    def _route(self, parts, q: dict, req_body: bytes) -> None:
        fake = self.owner
        path = unquote(parts.path)
        try:
            node = {"UUID": fake.uuid, "VersionID": 1, "Branch": "", "Children": [],
                    "Parents": [], "Locked": fake.locked}
            repo = {"Root": fake.uuid, "DAG": {"Root": fake.uuid, "Nodes": {fake.uuid: node}}}
            if path == "/api/repos/info":
                self._send(200, json.dumps({fake.uuid: repo}).encode(), "application/json")
                return
            m = re.match(r"^/api/repo/([^/]+)/info$", path)
            if m:  # one repo of one node: any prefix of it, or :master, names it
                if not fake.uuid.startswith(m.group(1).split(":")[0]):
                    self._error(400, f"could not find UUID with partial match to {m.group(1)}")
                    return
                self._send(200, json.dumps(repo).encode(), "application/json")
                return
            m = re.match(r"^/api/node/([^/]+)/([^/]+)/(.*)$", path)
            if not m:
                self._error(400, f"unknown endpoint {path}")
                return
            uuid, inst, rest = m.groups()
            if not fake.uuid.startswith(uuid.split(":")[0]) or not uuid:
                self._error(400, f"no node with UUID {uuid!r}")
                return
            if inst != fake.instance:
                self._error(400, f"no data instance {inst!r} at node {uuid}")
                return
            if rest == "info":
                self._send(200, json.dumps(fake.info_json()).encode(), "application/json")
            elif rest.startswith("blocks/"):
                self._blocks(rest, q)
            elif rest == "mappings":
                self._mappings(q)
            elif rest == "listlabels":
                self._listlabels(q)
            elif rest == "existing-labels" and fake.existing_labels:
                labels, _ = fake._load_indices()
                self._stream([json.dumps([int(v) for v in labels.tolist()]).encode()])
            elif rest == "indices-compressed":
                self._indices(req_body)
            else:
                self._error(400, f"labelmap: unknown endpoint {rest!r}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _blocks(self, rest: str, q: dict) -> None:
        fake = self.owner
        m = re.match(r"^blocks/(\d+)_(\d+)_(\d+)/(-?\d+)_(-?\d+)_(-?\d+)$", rest)
        if not m:
            self._error(400, f"bad /blocks request {rest!r}")
            return
        size = [int(v) for v in m.groups()[:3]]
        off = [int(v) for v in m.groups()[3:]]
        if q.get("compression") != "blocks" or q.get("supervoxels") != "true":
            self._error(400, "fake DVID serves only compression=blocks&supervoxels=true")
            return
        scale = int(q.get("scale", 0))
        bs = fake.info_json()["Extended"]["BlockSize"]
        if any(size[d] % bs[d] or off[d] % bs[d] for d in range(3)):
            self._error(400, f"size {size} and offset {off} must be block-aligned")
            return
        lo = [off[d] // bs[d] for d in range(3)]
        hi = [lo[d] + size[d] // bs[d] for d in range(3)]
        if fake.replay is not None and scale == 0 and all(lo[d] <= 0 < hi[d] for d in range(3)):
            records = [fake.replay]
        else:
            records = fake.blocks_records(scale, lo, hi)
        tail = ERROR_TEXT if fake.take("error_first") else b""
        self._stream(records, tail, truncate=bool(records) and fake.take("truncate_first"))

    def _mappings(self, q: dict) -> None:
        fake = self.owner
        pairs = fake.mapping_pairs()
        if q.get("format") == "binary" and not fake.mappings_text:
            body = pairs.tobytes()
        else:
            body = "".join(f"{int(a)} {int(b)}\n" for a, b in pairs.tolist()).encode()
        tail = ERROR_TEXT if fake.take("error_first") else b""
        self._stream([body], tail)

    def _listlabels(self, q: dict) -> None:
        fake = self.owner
        if q.get("sizes") == "true":
            self._error(400, "fake DVID: sizes=true not supported")
            return
        labels, _ = fake._load_indices()
        start = int(q.get("start", 0))
        number = min(int(q.get("number", 10_000_000)), 10_000_000)
        a = int(np.searchsorted(labels, np.uint64(start)))
        body = labels[a : a + number].astype("<u8").tobytes()
        tail = bytes(32) if fake.take("listlabels_error_first") else b""
        self._stream([body], tail)

    def _indices(self, req_body: bytes) -> None:
        fake = self.owner
        try:
            wanted = json.loads(req_body or b"null")
            if not isinstance(wanted, list) or not all(
                isinstance(v, int) and v >= 0 for v in wanted
            ):
                raise ValueError
        except ValueError:
            self._error(400, "expected a JSON list of labels in the request body")
            return
        if len(wanted) > 50_000:
            self._error(400, f"too many labels ({len(wanted)} > 50000)")
            return
        _, index = fake._load_indices()
        with fake._lock:
            fake.indices_active += 1
            fake.indices_max = max(fake.indices_max, fake.indices_active)
        try:
            if fake.indices_seconds:
                time.sleep(fake.indices_seconds)
            self._stream(self._index_records(wanted, index))
        finally:
            with fake._lock:
                fake.indices_active -= 1

    def _index_records(self, wanted: list, index: dict) -> list[bytes]:
        fake = self.owner
        out = []
        for lab in wanted:
            if lab == 0:
                out.append(struct.pack("<QQ", 0, 0))  # DVID's error marker: the stream stops
                break
            pb = index.get(lab)
            if pb is None:
                out.append(struct.pack("<QQ", 0, lab))
                continue
            if fake.index_label_zero:
                pb = _without_label(pb)
            stored = b"\x80" + lz4.block.compress(pb, store_size=True)
            out.append(struct.pack("<QQ", len(stored), lab) + stored)
        return out


def _without_label(pb: bytes) -> bytes:
    """The LabelIndex with its label field cleared (as old DVIDs stored some indices)."""
    from dvidetl.codec.labelindex import _WLabelIndex

    msg = _WLabelIndex()
    msg.ParseFromString(pb)
    msg.label = 0
    return msg.SerializeToString()


__all__ = ["FakeDvid", "ERROR_TEXT", "to_dvid_gzip"]
