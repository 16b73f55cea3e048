"""Flight loopback throughput of ``read_blocks`` beside reading the same bytes in-process.

Rows (rounds interleaved so machine noise hits every variant; median round reported):

1. ``dvidetl serve`` (the real command, its own process) serving the synthetic source, read
   partition by partition with `FlightClient.read_blocks` — the path a worker takes — beside
   the same source read in-process with ``source.read_blocks`` over the same partitions.
   Both sides' block caches are warmed first (the source keeps generated block bytes), so
   block generation is not what is measured. MB/s and blocks/s; target >= 60% (issue 3).
2. The embedded server (`start_server`, a thread of the reading process: the export
   pipeline's default) against the same in-process baseline.
3. Context: a plain loopback TCP socket moving the same number of bytes — the most any
   network transport can deliver on this machine — and Flight against it. On a small shared
   box this ceiling is itself well below the in-process rate, which bounds row 1.
4. Server overhead: the dvidetl server and a bare pyarrow Flight server (no validation,
   re-batching or checks) each in their own process, streaming the same cached bytes.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dvidetl.flight.client import FlightClient
from dvidetl.flight.server import start_server
from dvidetl.geometry import VolumeInfo
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA

#: the volume measured: ~1,250 scale-0 blocks, ~27 MB stored (a few 1.7 MB dense blocks)
SYNTHETIC_URL = os.environ.get(
    "BENCH_FLIGHT_URL", "synthetic://bench?size=1024,1024,512&scales=1&seed=3&dense=0.02"
)
PARTITION_BLOCKS = 512
ROUNDS = 5


class CachedSource:
    """A Source over blocks held in memory: what is timed is the transport, not a generator."""

    def __init__(self, info: VolumeInfo, table: pa.Table, scale: int = 0):
        self._info = info
        self.scale = scale
        self.table = table.combine_chunks()
        self.codes = self.table.column("morton").to_numpy()

    def info(self) -> VolumeInfo:
        return self._info

    def read_blocks(self, scale, lo, hi):
        i0 = int(np.searchsorted(self.codes, np.uint64(lo)))
        i1 = len(self.codes) if hi >= 2**64 else int(np.searchsorted(self.codes, np.uint64(hi)))
        yield from self.table.slice(i0, i1 - i0).to_batches(max_chunksize=256)

    def count(self, scale, level):
        cells, counts = np.unique(self.codes >> np.uint64(level), return_counts=True)
        return cells.astype(np.uint64), counts.astype(np.uint64), True

    def map_supervoxels(self, svs):
        return np.asarray(svs, np.uint64).copy()

    def read_mapping(self):
        return iter(())

    def read_indices(self, lo, hi):
        return iter(())

    def close(self):
        pass


def _partitions(codes: np.ndarray, per: int) -> list[tuple[int, int]]:
    starts = codes[::per]
    ends = list(starts[1:]) + [int(codes[-1]) + 1]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _span(batch: pa.RecordBatch) -> tuple[int, int]:
    """Byte span of the batch's block payloads inside its data buffer."""
    data = batch.column("data")
    n = len(data)
    offsets = np.frombuffer(data.buffers()[1], dtype=np.int32, count=data.offset + n + 1)
    return int(offsets[data.offset]), int(offsets[data.offset + n])


def _read_flight(client: FlightClient, parts) -> tuple[int, int]:
    nbytes = nblocks = 0
    for lo, hi in parts:
        for b in client.read_blocks(0, lo, hi):
            start, end = _span(b)
            nbytes += end - start
            nblocks += b.num_rows
    return nbytes, nblocks


def _bare_server(table: pa.Table):
    """The floor: a plain pyarrow Flight server streaming the same table slices (no dvidetl)."""
    import pyarrow.flight as fl

    codes = table.column("morton").to_numpy()

    class Bare(fl.FlightServerBase):
        def do_get(self, context, ticket):
            d = json.loads(ticket.ticket)
            i0 = int(np.searchsorted(codes, np.uint64(d["lo"])))
            i1 = int(np.searchsorted(codes, np.uint64(d["hi"])))
            return fl.GeneratorStream(
                table.schema, iter(table.slice(i0, i1 - i0).to_batches(max_chunksize=256))
            )

    return Bare("grpc://127.0.0.1:0")


def _serve(path: str, mode: str) -> None:
    """Subprocess entry: serve the cached blocks from ``path`` (Arrow IPC file) and print the port."""
    with pa.memory_map(path) as f:
        table = pa.ipc.open_file(f).read_all()
    info = VolumeInfo.from_json(table.schema.metadata[b"volume"])
    table = table.replace_schema_metadata(None)
    if mode == "dvidetl":
        srv = start_server(CachedSource(info, table))
        port = srv.port
    else:
        bare = _bare_server(table)
        port = bare.port
    print(port, flush=True)
    threading.Event().wait()


def _spawn(path: str, mode: str) -> tuple[subprocess.Popen, str]:
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_flight", "--serve", path, mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(root),
    )
    line = p.stdout.readline().strip()
    if not line.isdigit():
        p.kill()
        raise RuntimeError(f"bench {mode} server did not start (said {line!r})")
    return p, f"grpc://127.0.0.1:{line}"


def _read_bare(location: str, info: VolumeInfo, parts) -> tuple[int, int]:
    import pyarrow.flight as fl

    client = fl.FlightClient(location)
    nbytes = nblocks = 0
    for lo, hi in parts:
        reader = client.do_get(fl.Ticket(json.dumps({"lo": lo, "hi": hi}).encode()))
        for chunk in reader:
            b = chunk.data
            start, end = _span(b)
            nbytes += end - start
            nblocks += b.num_rows
    client.close()
    return nbytes, nblocks


def _spawn_serve(url: str) -> tuple[subprocess.Popen, str]:
    """``python -m dvidetl serve --source URL --port 0`` — the real command, in its own process."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen(
        [sys.executable, "-m", "dvidetl", "serve", "--source", url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(root),
    )
    line = p.stdout.readline().strip()
    if not line.startswith("grpc://"):
        p.kill()
        raise RuntimeError(f"dvidetl serve did not start (said {line!r})")
    return p, line


def _tcp_ceiling(nbytes: int) -> tuple[int, int]:
    """Send ``nbytes`` over a plain loopback TCP socket (8 MiB writes, recv_into a reused
    buffer): the most any network transport could deliver on this machine right now."""
    chunk = os.urandom(8 << 20)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def send():
        conn, _ = srv.accept()
        with conn:
            left = nbytes
            while left > 0:
                n = min(left, len(chunk))
                conn.sendall(chunk[:n])
                left -= n

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = 0
    with socket.create_connection(("127.0.0.1", srv.getsockname()[1])) as c:
        view = memoryview(bytearray(8 << 20))
        while True:
            n = c.recv_into(view)
            if not n:
                break
            got += n
    t.join()
    srv.close()
    return got, 0


def run() -> list[dict]:
    from dvidetl.sources import open_source

    url = SYNTHETIC_URL + ("&" if "?" in SYNTHETIC_URL else "?") + "cache=2048"
    src = open_source(url)
    info = src.info()
    sc = info.scale(0)
    table = pa.Table.from_batches(
        list(src.read_blocks(0, 0, sc.morton_end)), schema=BLOCKS_WIRE_SCHEMA
    )
    n = table.num_rows
    if n == 0:
        raise RuntimeError("bench volume has no blocks")
    codes = table.column("morton").to_numpy()
    parts = _partitions(codes, PARTITION_BLOCKS)
    keys = ("serve", "inproc", "cached", "bare", "embedded", "tcp")
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    procs = []
    clients = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blocks.arrow")
        with pa.OSFile(path, "wb") as f:
            schema = table.schema.with_metadata({b"volume": info.to_json().encode()})
            with pa.ipc.new_file(f, schema) as w:
                w.write_table(table.replace_schema_metadata(schema.metadata))
        embedded = start_server(src)
        try:
            p0, serve_loc = _spawn_serve(url)
            procs.append(p0)
            p1, cached_loc = _spawn(path, "dvidetl")
            procs.append(p1)
            p2, bare_loc = _spawn(path, "bare")
            procs.append(p2)
            serve_c, cached_c, emb_c = (
                FlightClient(loc, timeout=600) for loc in (serve_loc, cached_loc, embedded.location)
            )
            clients += [serve_c, cached_c, emb_c]
            _read_flight(
                serve_c, parts
            )  # warm the served source's block cache (generation not timed)
            _read_flight(cached_c, parts[:1])
            _read_flight(emb_c, parts[:1])
            _read_bare(bare_loc, info, parts[:1])

            def _inproc():
                nbytes = nblocks = 0
                for lo, hi in parts:
                    for b in src.read_blocks(0, lo, hi):
                        start, end = _span(b)
                        nbytes += end - start
                        nblocks += b.num_rows
                return nbytes, nblocks

            fns = {
                "serve": lambda: _read_flight(serve_c, parts),
                "inproc": _inproc,
                "cached": lambda: _read_flight(cached_c, parts),
                "bare": lambda: _read_bare(bare_loc, info, parts),
                "embedded": lambda: _read_flight(emb_c, parts),
                "tcp": lambda: _tcp_ceiling(int(table.column("data").nbytes)),
            }
            for _ in range(ROUNDS):
                for key in keys:
                    t0 = time.perf_counter()
                    nb, nk = fns[key]()
                    dt = time.perf_counter() - t0
                    if key != "tcp" and nk != n:
                        raise RuntimeError(f"{key}: read {nk} blocks, want {n}")
                    rates[key].append((nb / dt / 1e6, nk / dt))
        finally:
            for c in clients:
                c.close()
            embedded.stop()
            for p in procs:
                p.kill()
                p.wait()
            src.close()

    med = {
        k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
        for k, v in rates.items()
    }
    mb = table.column("data").nbytes / 1e6
    note = f"{n} blocks, {mb:.0f} MB, {len(parts)} partitions of {PARTITION_BLOCKS}, median of {ROUNDS} rounds"

    def row(name, key, unit, i, base, base_name, target):
        return {
            "name": name,
            "value": med[key][i],
            "unit": unit,
            "baseline": base_name,
            "baseline_value": med[base][i],
            "ratio": med[key][i] / med[base][i],
            "target": target,
            "note": note,
        }

    inproc = "in-process source.read_blocks (warm)"
    return [
        row(
            "flight read_blocks MB/s (dvidetl serve)",
            "serve",
            "MB/s",
            0,
            "inproc",
            inproc,
            ">= 0.6",
        ),
        row(
            "flight read_blocks blocks/s (dvidetl serve)",
            "serve",
            "blocks/s",
            1,
            "inproc",
            inproc,
            ">= 0.6",
        ),
        row(
            "flight embedded server (in-thread) MB/s",
            "embedded",
            "MB/s",
            0,
            "inproc",
            inproc,
            ">= 0.6",
        ),
        row("loopback TCP ceiling (plain socket)", "tcp", "MB/s", 0, "inproc", inproc, "-"),
        row(
            "flight (dvidetl serve) vs TCP ceiling",
            "serve",
            "MB/s",
            0,
            "tcp",
            "plain loopback socket",
            "-",
        ),
        row(
            "flight server overhead vs bare pyarrow",
            "cached",
            "MB/s",
            0,
            "bare",
            "bare pyarrow Flight, same bytes",
            ">= 0.9",
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], sys.argv[3])
    else:
        for r in run():
            print(r)
