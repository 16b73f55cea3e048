"""The real DVID server (``../shared/dvid/bin/dvid``) for tests, and a loader that fills it the
way DVID users do.

Why a real server: every ``dvid+http://`` behaviour we claim (locking, branch resolution,
auth answers, throttling, what ``/mappings`` and ``/index`` return after edits, the exact
bytes of ``/blocks``, DVID's own ``export-shards`` files) must hold against DVID itself, not
against ``fake_dvid``, which is our own model of it. The server runs from the shared binary
in place, with every file (config, Badger store, mutation log, log file) under a temporary
directory, on free loopback ports; it is stopped by its own pid.

What goes in is DVID's doing too: blocks through ``POST /blocks?downres=true`` (DVID computes
the coarser scales and, asynchronously, the label indices), raw volumes through
``POST /raw``, and edits through DVID's own operations (``/merge``, ``/renumber``,
``/cleave``, ``/split-supervoxel``), so the mapping and the indices are DVID's, not ours.

DVID has no HTTP call that says "indexing is finished"; :meth:`DvidServer.wait_indexed`
waits on what the indices must add up to (the voxels posted), and
:meth:`DvidServer.wait_mutation` on a label index recording the edit's mutation id — both
conditions DVID's own answers have to meet, never a fixed sleep.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

# Imports inside functions load numba (dvidetl.codec), the plugin registry's entry points,
# NumPy/Arrow, the compression libraries only where used: importing this module must not (CLI
# start-up, processes that never call them).

#: the real server, beside the project (``../shared`` from the repository root)
DVID_BINARY = Path(__file__).resolve().parents[3] / "shared" / "dvid" / "bin" / "dvid"
#: the environment variable that may point at another binary
DVID_BINARY_ENV = "DVIDETL_DVID_BINARY"


class DvidRequestError(RuntimeError):
    """DVID answered a request with an error status (status and DVID's own text kept)."""

    def __init__(self, method: str, path: str, status: int, text: str):
        super().__init__(f"{method} {path}: {status} {text.strip()}")
        self.status = status
        self.text = text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hs256_jwt(claims: dict, secret: str) -> str:
    """A JWT signed HS256 — what DVID's legacy ``token`` auth mode checks (server/auth.go)."""

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


class DvidServer:
    """One real DVID server process with all its state under ``root``.

    ``auth=True`` starts it with ``[auth] enforce = "token"``: node requests then need
    ``Authorization: Bearer <JWT>`` signed with :attr:`jwt_secret` (:meth:`token` makes one).
    Admin calls (creating repos, server settings) use ``?admintoken=`` :attr:`admin_token`.
    """

    def __init__(self, root: Path, *, auth: bool = False, binary: Path | None = None):
        self.root = Path(root)
        self.auth = auth
        self.binary = Path(binary or os.environ.get(DVID_BINARY_ENV) or DVID_BINARY)
        self.admin_token = "admin-" + os.urandom(8).hex()
        self.jwt_secret = "jwt-" + os.urandom(16).hex() if auth else None
        self.http_port = 0
        self.rpc_port = 0
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def host(self) -> str:
        """``host:port`` as a ``dvid+http://`` source URL wants it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def rpc(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "dvid.log"

    def _config(self) -> str:
        r = self.root
        text = f"""
[server]
httpAddress = "127.0.0.1:{self.http_port}"
rpcAddress = "127.0.0.1:{self.rpc_port}"
[logging]
logfile = "{r / 'dvid.log'}"
[store]
    [store.mutable]
    engine = "badger"
    path = "{r / 'badger'}"
    [store.mutationlog]
    engine = "filelog"
    path = "{r / 'mutlog'}"
[backend]
    [backend.default]
    store = "mutable"
    log = "mutationlog"
"""
        if self.auth:
            text += '[auth]\nenforce = "token"\n'
        return text

    def start(self, timeout: float = 30.0) -> DvidServer:
        if not self.binary.is_file():
            raise FileNotFoundError(f"the real DVID server is not at {self.binary}")
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DVID_ADMIN_TOKEN=self.admin_token)
        if self.jwt_secret:
            env["DVID_JWT_SECRET_KEY"] = self.jwt_secret
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            self.http_port, self.rpc_port = free_port(), free_port()
            cfg = self.root / "dvid.toml"
            cfg.write_text(self._config())
            out = open(self.root / "dvid.out", "ab")  # noqa: SIM115 (kept by the process)
            self.proc = subprocess.Popen(
                [str(self.binary), "serve", str(cfg)], cwd=self.root, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            out.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.get_json("/api/server/info")
                    return self
                except (OSError, DvidRequestError):
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"DVID did not come up; see {self.root / 'dvid.out'} and {self.log_path}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crashed or killed server ends (for killed-export tests)."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    def __enter__(self) -> DvidServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP ---------------------------------------------------------------------------

    def token(self, user: str = "dvidetl-test") -> str:
        """A JWT this server accepts (auth servers only)."""
        if not self.jwt_secret:
            raise ValueError("this DVID server was started without auth")
        return hs256_jwt({"user": user}, self.jwt_secret)

    def request(self, method: str, path: str, body: bytes | None = None, *,
                params: dict | None = None, token: str | None = None, admin: bool = False,
                timeout: float = 120.0) -> bytes:
        """One request; DVID's error answers raise :class:`DvidRequestError`."""
        q = dict(params or {})
        if admin:
            q["admintoken"] = self.admin_token
        url = self.url + path + ("?" + urllib.parse.urlencode(q) if q else "")
        headers = {}
        if token is None and self.jwt_secret and path.startswith(("/api/node", "/api/repo")):
            token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise DvidRequestError(method, path, e.code, e.read().decode(errors="replace")) from None

    def get(self, path: str, **params) -> bytes:
        return self.request("GET", path, params=params)

    def get_json(self, path: str, **params):
        return json.loads(self.request("GET", path, params=params))

    def post(self, path: str, body: bytes | str | dict | list = b"", *, admin: bool = False,
             **params) -> bytes:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        return self.request("POST", path, body, params=params, admin=admin)

    def node(self, uuid: str, name: str, rest: str) -> str:
        return f"/api/node/{uuid}/{name}/{rest.lstrip('/')}"

    # ---- repos, versions, instances -----------------------------------------------------

    def new_repo(self, alias: str = "dvidetl-test") -> str:
        out = json.loads(self.post("/api/repos", {"alias": alias, "description": alias},
                                   admin=True))
        return out["root"]

    def new_labelmap(self, uuid: str, name: str = "segmentation", *, max_downres: int = 2,
                     **options) -> None:
        spec = {"typename": "labelmap", "dataname": name, "MaxDownresLevel": str(max_downres)}
        spec.update({k: str(v) for k, v in options.items()})
        self.post(f"/api/repo/{uuid}/instance", spec)

    def commit(self, uuid: str, note: str = "locked by dvidetl tests") -> None:
        self.post(f"/api/node/{uuid}/commit", {"note": note})

    def branch(self, uuid: str, branch: str, note: str = "") -> str:
        return json.loads(self.post(f"/api/node/{uuid}/branch",
                                    {"branch": branch, "note": note}))["child"]

    def newversion(self, uuid: str, note: str = "") -> str:
        return json.loads(self.post(f"/api/node/{uuid}/newversion", {"note": note}))["child"]

    def locked(self, uuid: str) -> bool:
        return bool(self.get_json(f"/api/node/{uuid}/commit")["Locked"])

    def set_throttle(self, ops: int) -> None:
        """DVID's throttle (max concurrent throttled calls); an admin-only setting."""
        self.post("/api/server/settings", {"throttle": str(int(ops))}, admin=True)  # DVID wants a string

    # ---- data in ------------------------------------------------------------------------

    def post_blocks(self, uuid: str, name: str, coords: np.ndarray, blocks: Sequence[bytes], *,
                    downres: bool = True, scale: int = 0, noindexing: bool = False) -> None:
        """``POST /blocks``: records of int32 x, y, z, length, then the gzip of each (raw,
        uncompressed) DVID block, as DVID's own clients send them. ``downres=True`` makes DVID
        compute every coarser scale up to the instance's ``MaxDownresLevel`` before it answers;
        the label indices follow asynchronously (:meth:`wait_indexed`)."""
        buf = bytearray()
        for (x, y, z), raw in zip(np.asarray(coords).tolist(), blocks, strict=True):
            g = gzip.compress(bytes(raw), compresslevel=1)
            buf += struct.pack("<4i", x, y, z, len(g)) + g
        params: dict[str, Any] = {}
        if downres:
            params["downres"] = "true"
        if scale:
            params["scale"] = str(scale)
        if noindexing:
            params["noindexing"] = "true"
        self.post(self.node(uuid, name, "blocks"), bytes(buf), **params)

    def post_raw(self, uuid: str, name: str, volume: np.ndarray, offset=(0, 0, 0), *,
                 downres: bool = True) -> None:
        """``POST /raw/0_1_2``: a little-endian uint64 volume indexed [z, y, x], at a
        block-aligned voxel ``offset`` (x, y, z)."""
        v = np.ascontiguousarray(volume, dtype="<u8")
        sz, sy, sx = v.shape
        ox, oy, oz = offset
        path = self.node(uuid, name, f"raw/0_1_2/{sx}_{sy}_{sz}/{ox}_{oy}_{oz}")
        params: dict[str, Any] = {"downres": "true"} if downres else {}
        self.post(path, v.tobytes(), **params)

    def post_mappings(self, uuid: str, name: str, bodies: dict[int, Iterable[int]]) -> None:
        """``POST /mappings``: store supervoxel -> body maps directly (body -> its supervoxels),
        as agglomeration pipelines load them — a protobuf ``MappingOps`` of ``MappingOp
        {mutid, mapped, original}``. DVID changes no label index for it: supervoxels mapped
        before their blocks arrive get no index (DVID then disagrees with itself)."""
        ops = b""
        for i, (body, svs) in enumerate(bodies.items(), 1):
            packed = b"".join(_varint(int(v)) for v in svs)
            op = (b"\x08" + _varint(i) + b"\x10" + _varint(int(body)) + b"\x1a"
                  + _varint(len(packed)) + packed)
            ops += b"\x0a" + _varint(len(op)) + op
        self.post(self.node(uuid, name, "mappings"), ops)

    def wait_indexed(self, uuid: str, name: str, voxels: int, timeout: float = 120.0) -> None:
        """Wait until the label indices account for ``voxels`` non-zero scale-0 voxels (the sum
        of ``/listlabels?sizes=true``), twice in a row: DVID indexes after ``/blocks`` returns."""
        deadline, last, same = time.monotonic() + timeout, None, 0
        while True:
            sizes = self.label_sizes(uuid, name)
            total = int(sizes[:, 1].sum()) if len(sizes) else 0
            same = same + 1 if total == voxels and total == last else 0
            if same >= 1:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"DVID indexed {total} of {voxels} voxels in {timeout} s")
            last = total
            time.sleep(0.2)

    def wait_mutation(self, uuid: str, name: str, label: int, mutid: int,
                      timeout: float = 60.0) -> None:
        """Wait until ``label``'s index records mutation ``mutid`` (or a later one)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                meta = self.get_json(self.node(uuid, name, f"index/{label}"),
                                     **{"metadata-only": "true"})
                if int(meta.get("last_mutid", 0)) >= mutid:
                    return
            except DvidRequestError as e:
                if e.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"label {label}'s index did not reach mutation {mutid}")
            time.sleep(0.1)

    # ---- edits (DVID's own operations) --------------------------------------------------

    def merge(self, uuid: str, name: str, target: int, others: Iterable[int]) -> int:
        out = json.loads(self.post(self.node(uuid, name, "merge"),
                                   [int(target), *map(int, others)]))
        self.wait_mutation(uuid, name, target, out["MutationID"])
        return out["MutationID"]

    def renumber(self, uuid: str, name: str, pairs: dict[int, int]) -> None:
        """``pairs``: old body → new body."""
        body = [int(v) for old, new in pairs.items() for v in (new, old)]
        self.post(self.node(uuid, name, "renumber"), body)
        for new in pairs.values():
            self._wait_exists(uuid, name, new)

    def cleave(self, uuid: str, name: str, label: int, supervoxels: Iterable[int]) -> int:
        out = json.loads(self.post(self.node(uuid, name, f"cleave/{label}"),
                                   [int(s) for s in supervoxels]))
        self.wait_mutation(uuid, name, out["CleavedLabel"], out["MutationID"])
        return out["CleavedLabel"]

    def split_supervoxel(self, uuid: str, name: str, supervoxel: int,
                         runs: np.ndarray) -> tuple[int, int]:
        """Split off the voxels of ``runs`` (rows x, y, z, length along x) from
        ``supervoxel``; returns (split, remain) supervoxel ids."""
        out = json.loads(self.post(self.node(uuid, name, f"split-supervoxel/{supervoxel}"),
                                   sparsevol_rle(runs)))
        body = int(self.get_json(self.node(uuid, name, f"label/{int(runs[0][0])}_"
                                            f"{int(runs[0][1])}_{int(runs[0][2])}"))["Label"])
        self.wait_mutation(uuid, name, body, out["MutationID"])
        return int(out["SplitSupervoxel"]), int(out["RemainSupervoxel"])

    def _wait_exists(self, uuid: str, name: str, label: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get(self.node(uuid, name, f"index/{label}"), **{"metadata-only": "true"})
                return
            except DvidRequestError as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    # ---- answers (DVID's side of a comparison) ------------------------------------------

    def label_sizes(self, uuid: str, name: str) -> np.ndarray:
        """(label, voxels) rows of ``/listlabels?sizes=true``."""
        raw = self.get(self.node(uuid, name, "listlabels"), sizes="true")
        return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)

    def blocks(self, uuid: str, name: str, scale: int, lo=(0, 0, 0),
               hi=(64, 64, 64)) -> dict[tuple[int, int, int], bytes]:
        """DVID's ``GET /blocks`` of the block box [lo, hi) at ``scale``: raw DVID block bytes
        by (x, y, z), read with a plain Python loop — a reference independent of dvidetl's
        numba stream parser."""
        size = "_".join(str((b - a) * 64) for a, b in zip(lo, hi, strict=True))
        off = "_".join(str(a * 64) for a in lo)
        raw = self.get(self.node(uuid, name, f"blocks/{size}/{off}"), compression="blocks",
                       supervoxels="true", scale=str(scale))
        out, p = {}, 0
        while p < len(raw):
            x, y, z, n = struct.unpack_from("<4i", raw, p)
            out[(x, y, z)] = gzip.decompress(raw[p + 16:p + 16 + n])
            p += 16 + n
        return out

    def mappings(self, uuid: str, name: str) -> np.ndarray:
        """(supervoxel, body) rows of ``/mappings?format=binary``."""
        raw = self.get(self.node(uuid, name, "mappings"), format="binary")
        return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)

    # ---- DVID's own exporter ------------------------------------------------------------

    def export_shards(self, uuid: str, name: str, spec: dict, dest: Path, num_scales: int,
                      *, wait: bool = True, timeout: float = 300.0) -> Path:
        """Run DVID's ``export-shards`` RPC command into ``dest`` (a rerun into the same
        directory appends to each ``.arrow`` and truncates each ``.csv``, as DVID does).
        With ``wait``, returns once DVID has written ``dest/export.log`` (its end-of-export
        report)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        spec_path = dest.parent / f"{dest.name}-spec.json"
        spec_path.write_text(json.dumps(spec))
        report = dest / "export.log"
        report.unlink(missing_ok=True)
        subprocess.run([str(self.binary), f"-rpc={self.rpc}", "node", uuid, name,
                        "export-shards", str(spec_path), str(dest), str(num_scales)],
                       check=True, capture_output=True, timeout=60)
        if wait:
            deadline = time.monotonic() + timeout
            while not (report.exists() and "--- Totals ---" in report.read_text()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DVID's export-shards into {dest} did not finish")
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError("DVID exited during export-shards")
                time.sleep(0.1)
        return dest


def shard_spec(sizes: Sequence[Sequence[int]]) -> dict:
    """A neuroglancer multiscale volume spec as DVID's ``export-shards`` takes it: one scale
    of 64^3 chunks per voxel ``size`` (x, y, z), identity-hash sharding (9 shard bits)."""
    sharding = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
                "minishard_bits": 3, "preshift_bits": 3, "shard_bits": 9,
                "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
    return {"@type": "neuroglancer_multiscale_volume", "type": "segmentation",
            "data_type": "uint64", "num_channels": 1,
            "scales": [{"chunk_sizes": [[64, 64, 64]], "encoding": "compressed_segmentation",
                        "key": f"s{s}", "resolution": [8 << s] * 3, "size": list(size),
                        "voxel_offset": [0, 0, 0], "sharding": sharding}
                       for s, size in enumerate(sizes)]}


def _varint(n: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sparsevol_rle(runs: np.ndarray) -> bytes:
    """DVID's binary sparse volume (the ``/sparsevol`` format ``/split-supervoxel`` takes):
    header, then int32 x, y, z, length per run along x."""
    r = np.asarray(runs, dtype="<i4").reshape(-1, 4)
    return struct.pack("<BBBBII", 0, 3, 0, 0, 0, len(r)) + r.tobytes()


def mcns_blocks(shared_data: Path, origin=(480, 384, 448)) -> tuple[np.ndarray, list[bytes]]:
    """The 258 real male-CNS blocks of ``mcns-shard`` (raw DVID block bytes, unwrapped from
    the shard's zstd) with block coordinates moved by ``-origin`` so they sit near the grid
    origin of a small volume (x 19..31, y 29..31, z 21..31 by default)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import zstandard

    path = Path(shared_data) / "mcns-shard" / "30720_24576_28672.arrow"
    with pa.memory_map(str(path)) as mm:
        t = ipc.open_stream(mm).read_all()
    coords = np.stack([t[c].to_numpy() for c in ("chunk_x", "chunk_y", "chunk_z")], axis=1)
    coords = (coords - np.asarray(origin)).astype(np.int32)
    dz = zstandard.ZstdDecompressor()
    blocks = [dz.decompress(b) for b in t["dvid_compressed_block"].to_pylist()]
    return coords, blocks


def nonzero_voxels(blocks: Iterable[bytes]) -> int:
    """Non-zero voxels in raw DVID blocks: what DVID's label indices must add up to."""
    from dvidetl.codec import decode_block

    return int(sum(int(np.count_nonzero(decode_block(b))) for b in blocks))


# ---- a repo with history, as DVID users grow one ------------------------------------------


def versions_volume() -> np.ndarray:
    """A 256 x 128 x 128 (x, y, z) volume of 16 supervoxels, indexed [z, y, x]: x slabs of
    32 voxels labelled 11..18 in the lower half (y < 64) and 111..118 in the upper half —
    16 scale-0 blocks (4 x 2 x 2), 2 at scale 1."""
    v = np.zeros((128, 128, 256), np.uint64)
    for i in range(8):
        v[:, :64, 32 * i:32 * (i + 1)] = 11 + i
        v[:, 64:, 32 * i:32 * (i + 1)] = 111 + i
    return v


def load_versions(server: DvidServer, name: str = "seg", alias: str = "versions"):
    """A repo with a version history made by DVID's own operations:

    * ``root`` (locked): :func:`versions_volume` posted with ``POST /raw?downres=true``, then
      ``/merge`` 12, 13 into 11 and 112 into 111;
    * ``master`` = ``newversion(root)`` (unlocked, the leaf of branch master): ``/merge`` 15
      into 14 — so ``ROOT:master`` names an *unlocked child* of the locked ``ROOT``;
    * ``dev`` = ``branch(root, "dev")`` (locked): ``/cleave`` 13 off body 11 (a new body
      ``cleaved``), ``/renumber`` 111 -> 1111, ``/split-supervoxel`` of a corner of 16
      (``split``, ``remain``);
    * ``dev_leaf`` = ``newversion(dev)`` (unlocked, the leaf of branch dev): ``/merge`` 18
      into 17.

    Returns a namespace with those UUIDs, ``name``, the ``volume`` and its non-zero voxels."""

    v = versions_volume()
    root = server.new_repo(alias)
    server.new_labelmap(root, name, max_downres=1)
    server.post_raw(root, name, v)
    voxels = int(np.count_nonzero(v))
    server.wait_indexed(root, name, voxels)
    server.merge(root, name, 11, [12, 13])
    server.merge(root, name, 111, [112])
    server.commit(root, "root: raw volume and two merges")
    master = server.newversion(root, "master: one more merge")
    server.merge(master, name, 14, [15])
    dev = server.branch(root, "dev", "dev: cleave, renumber, split-supervoxel")
    cleaved = server.cleave(dev, name, 11, [13])
    server.renumber(dev, name, {111: 1111})
    runs = np.array([[160, y, z, 8] for z in range(4) for y in range(4)])
    split, remain = server.split_supervoxel(dev, name, 16, runs)
    server.commit(dev, "dev: edited")
    dev_leaf = server.newversion(dev, "dev leaf: one more merge")
    server.merge(dev_leaf, name, 17, [18])
    return SimpleNamespace(server=server, name=name, root=root, master=master, dev=dev,
                           dev_leaf=dev_leaf, cleaved=cleaved, split=split, remain=remain,
                           volume=v, voxels=voxels)
