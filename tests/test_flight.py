"""The reference Flight server and client over real loopback servers (port 0).

A small in-memory `DictSource` (the Source protocol over a dict of blocks) keeps these tests
independent of the generated sources; blocks are real DVID bytes (gzip block, /blocks stream)
mixed with random payloads of varied sizes, so the batch cutting is exercised.

Run as a script (``python tests/test_flight.py PORT``) it serves a slow DictSource: the
killed-mid-stream test runs it in a subprocess it can SIGKILL and restart on the same port.
"""

from __future__ import annotations

import gzip
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvidetl.flight import protocol as P
from dvidetl.flight.client import (
    FlightAuthError,
    FlightClient,
    FlightRequestError,
    FlightUnavailable,
)
from dvidetl.flight.server import bounded_batches, start_server
from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_encode
from dvidetl.sources.base import (
    BLOCKS_WIRE_SCHEMA,
    INDICES_SCHEMA,
    MAPPING_SCHEMA,
    Source,
    count_sorted,
)
from dvidetl.testing.tickets import raw_ticket

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKEN = "s3cr3t-t0ken"
MAX_BATCH = 64 << 10  # small bound so a few hundred KB of blocks make many batches


class DictSource:
    """The Source protocol over in-memory tables; ``batch_rows`` small so the server re-cuts."""

    def __init__(
        self,
        blocks: dict[int, dict[tuple[int, int, int], bytes]],
        grids: dict[int, tuple[int, int, int]],
        uuid: str = "abc123",
        instance: str = "segmentation",
        codec: str = "gzip",
        mapping: dict[int, int] | None = None,
        indices: dict[int, bytes] | None = None,
        batch_rows: int = 5,
        delay: float = 0.0,
    ):
        self._info = VolumeInfo(
            uuid,
            instance,
            codec,
            [
                ScaleInfo(s, (64, 64, 64), tuple(g), (0, 0, 0), tuple(64 * v for v in g))
                for s, g in sorted(grids.items())
            ],
        )
        self.tables: dict[int, pa.Table] = {}
        for s, g in grids.items():
            items = blocks.get(s, {})
            xyz = np.array(list(items), dtype=np.int32).reshape(-1, 3)
            m = morton_encode(xyz[:, 0], xyz[:, 1], xyz[:, 2], tuple(g))
            t = pa.table(
                [
                    pa.array(xyz[:, 0]),
                    pa.array(xyz[:, 1]),
                    pa.array(xyz[:, 2]),
                    pa.array(m, pa.uint64()),
                    pa.array(list(items.values()), pa.binary()),
                ],
                schema=BLOCKS_WIRE_SCHEMA,
            )
            self.tables[s] = t.take(np.argsort(m, kind="stable"))
        mp = mapping or {}
        self.sv = np.array(sorted(mp), np.uint64)
        self.body = np.array([mp[k] for k in sorted(mp)], np.uint64)
        ix = indices or {}
        self.idx = pa.table(
            [pa.array(sorted(ix), pa.uint64()), pa.array([ix[k] for k in sorted(ix)], pa.binary())],
            schema=INDICES_SCHEMA,
        )
        self.batch_rows = batch_rows
        self.delay = delay

    def info(self) -> VolumeInfo:
        return self._info

    def count(self, scale, level):
        m = self.tables[scale].column("morton").to_numpy()
        cells, counts = np.unique(m >> np.uint64(level), return_counts=True)
        return cells.astype(np.uint64), counts.astype(np.uint64), True

    def _range(self, keys: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
        i0 = int(np.searchsorted(keys, np.uint64(lo)))
        i1 = len(keys) if hi >= 2**64 else int(np.searchsorted(keys, np.uint64(hi)))
        return i0, i1

    def _yield(self, t: pa.Table):
        for b in t.to_batches(max_chunksize=self.batch_rows):
            if self.delay:
                time.sleep(self.delay)
            yield b

    def read_blocks(self, scale, lo, hi):
        t = self.tables[scale]
        i0, i1 = self._range(t.column("morton").to_numpy(), lo, hi)
        yield from self._yield(t.slice(i0, i1 - i0))

    def map_supervoxels(self, svs):
        svs = np.asarray(svs, np.uint64)
        if len(self.sv) == 0:
            return svs.copy()
        i = np.clip(np.searchsorted(self.sv, svs), 0, len(self.sv) - 1)
        return np.where(self.sv[i] == svs, self.body[i], svs)

    def read_mapping(self, lo=0, hi=2**64):
        i0, i1 = self._range(self.sv, lo, hi)
        yield from self._yield(
            pa.table([pa.array(self.sv[i0:i1]), pa.array(self.body[i0:i1])], schema=MAPPING_SCHEMA)
        )

    def count_keys(self, kind, level, lo=0, hi=2**64):
        keys = self.sv if kind == "mapping" else self.idx.column("label").to_numpy()
        return count_sorted(keys, None, level, lo, hi)

    def read_indices(self, lo, hi):
        i0, i1 = self._range(self.idx.column("label").to_numpy(), lo, hi)
        yield from self._yield(self.idx.slice(i0, i1 - i0))

    def close(self):
        pass

    # the source's own enumeration, for checking what the server sent
    def expected(self, scale: int, lo: int, hi: int) -> pa.Table:
        t = self.tables[scale]
        i0, i1 = self._range(t.column("morton").to_numpy(), lo, hi)
        return t.slice(i0, i1 - i0)


def real_blocks() -> list[bytes]:
    """Real DVID bytes: the gzip of Go's compressed block, and the /blocks stream payload."""
    out = [(SHARED_DATA / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes()]
    stream = (SHARED_DATA / "dvid" / "stream_1block.dat").read_bytes()
    n = int(np.frombuffer(stream[12:16], "<i4")[0])
    block = stream[16 : 16 + n]
    assert len(gzip.decompress(block)) > 0  # it really is a gzip-wrapped DVID block
    out.append(block)
    return out


def make_source(seed: int = 0, **kw) -> DictSource:
    rng = np.random.default_rng(seed)
    real = real_blocks()
    grid0, grid1 = (5, 3, 7), (3, 2, 4)
    b0 = {}
    for x in range(grid0[0]):
        for y in range(grid0[1]):
            for z in range(grid0[2]):
                if rng.random() < 0.6:
                    r = rng.random()
                    b0[(x, y, z)] = (
                        real[int(r * 10) % 2] if r < 0.2 else rng.bytes(int(rng.integers(1, 9000)))
                    )
    b0[(4, 2, 6)] = rng.bytes(MAX_BATCH * 2)  # a single block larger than a batch
    b1 = {
        (x, y, z): rng.bytes(int(rng.integers(1, 300)))
        for x in range(3)
        for y in range(2)
        for z in range(4)
        if (x + y + z) % 2
    }
    mapping = {int(s): int(s) // 10 + 1_000_000 for s in rng.choice(10**6, 500, replace=False) + 1}
    indices = {
        int(lab): rng.bytes(int(rng.integers(1, 2000)))
        for lab in rng.choice(10**6, 300, replace=False)
    }
    return DictSource({0: b0, 1: b1}, {0: grid0, 1: grid1}, mapping=mapping, indices=indices, **kw)


@pytest.fixture(scope="module")
def source() -> DictSource:
    return make_source()


@pytest.fixture(scope="module")
def server(source):
    with start_server(source, token=TOKEN, max_batch_bytes=MAX_BATCH) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> FlightClient:
    c = FlightClient(server.location, TOKEN, retries=1, backoff=0.05)
    yield c
    c.close()


def auth_opts(token: str | None = TOKEN) -> fl.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return fl.FlightCallOptions(headers=headers, timeout=20)


def table_of(batches) -> pa.Table:
    batches = list(batches)
    return pa.Table.from_batches(batches) if batches else BLOCKS_WIRE_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------
# every call
# ---------------------------------------------------------------------------------------


def test_info_and_flight_info(server, client, source):
    assert isinstance(source, Source)
    info = client.info()
    assert info == source.info()
    assert server.location.startswith("grpc://127.0.0.1:") and server.port > 0
    raw = fl.FlightClient(server.location)
    for desc in (
        fl.FlightDescriptor.for_path("abc123", "segmentation"),
        fl.FlightDescriptor.for_command(P.VolumeRef("abc123", "segmentation").to_json()),
    ):
        fi = raw.get_flight_info(desc, auth_opts())
        assert VolumeInfo.from_json(fi.app_metadata) == source.info()
        assert fi.schema.metadata[b"codec"] == b"gzip"
        # one endpoint per scale, each a whole-scale blocks ticket a plain Flight client can use
        tickets = [P.parse_ticket(e.ticket.ticket) for e in fi.endpoints]
        assert [(t.scale, t.lo, t.hi) for t in tickets] == [(0, 0, 256), (1, 0, 32)]
        got = raw.do_get(fi.endpoints[1].ticket, auth_opts()).read_all()
        assert got.num_rows == source.tables[1].num_rows
    flights = list(raw.list_flights(options=auth_opts()))
    assert len(flights) == 1 and VolumeInfo.from_json(flights[0].app_metadata).uuid == "abc123"
    assert {a.type for a in raw.list_actions(auth_opts())} == {"info", "count", "count_keys"}
    assert (
        raw.get_schema(
            fl.FlightDescriptor.for_path("abc123", "segmentation"), auth_opts()
        ).schema.names
        == BLOCKS_WIRE_SCHEMA.names
    )
    raw.close()


@pytest.mark.parametrize("scale, level", [(0, 0), (0, 3), (0, 8), (0, 64), (1, 2)])
def test_count(client, source, scale, level):
    cells, counts, exact = client.count(scale, level)
    want = source.count(scale, level)
    np.testing.assert_array_equal(cells, want[0])
    np.testing.assert_array_equal(counts, want[1])
    assert exact is True and cells.dtype == np.uint64 and counts.dtype == np.uint64
    assert int(counts.sum()) == source.tables[scale].num_rows


def test_read_blocks_whole_volume_bounded_batches(client, source):
    batches = list(client.read_blocks(0, 0, 2**64))
    assert len(batches) > 5
    for b in batches:
        data_bytes = b.column("data").nbytes
        assert b.num_rows == 1 or data_bytes <= MAX_BATCH, (b.num_rows, data_bytes)
        md = b.schema.metadata
        assert md[b"codec"] == b"gzip" and md[b"uuid"] == b"abc123"
        assert md[b"instance"] == b"segmentation" and md[b"scale"] == b"0"
        assert md[b"hi"] == b"256"  # clipped to the grid
    assert any(b.num_rows == 1 and b.column("data").nbytes > MAX_BATCH for b in batches)
    got = table_of(batches)
    assert got.equals(source.tables[0])
    m = got.column("morton").to_numpy()
    assert np.all(m[1:] > m[:-1])


def test_read_blocks_empty_tiny_and_clipped(client, source):
    present = source.tables[0].column("morton").to_numpy()
    absent = next(c for c in range(256) if c not in set(present.tolist()))
    assert list(client.read_blocks(0, absent, absent + 1)) == []  # empty
    assert client.read_blocks_table(0, absent, absent + 1).num_rows == 0
    assert client.read_blocks_table(0, absent, absent + 1).schema.metadata[b"codec"] == b"gzip"
    one = int(present[3])
    t = client.read_blocks_table(0, one, one + 1)  # tiny
    assert t.num_rows == 1 and t.column("morton")[0].as_py() == one
    assert t.column("data")[0].as_py() == source.expected(0, one, one + 1).column("data")[0].as_py()
    t = client.read_blocks_table(0, 200, 10**12)  # past the grid: clipped
    assert t.equals(source.expected(0, 200, 256))
    assert client.read_blocks_table(1, 0, 32).equals(source.tables[1])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 1), st.integers(0, 2**64 - 2), st.integers(1, 300))
def test_random_ranges_are_exactly_the_sources_blocks(client, source, scale, lo, width):
    end = source.info().scale(scale).morton_end
    lo = lo % end
    hi = lo + width
    got = client.read_blocks_table(scale, lo, hi)
    assert got.equals(source.expected(scale, lo, min(hi, end)))


def test_map_supervoxels(server, source):
    c = FlightClient(server.location, TOKEN, map_batch=100)  # several exchange batches
    mapped = np.array(sorted(int(s) for s in source.sv), dtype=np.uint64)
    svs = np.concatenate([mapped, mapped[::3], np.arange(2_000_000, 2_000_401, dtype=np.uint64)])
    np.random.default_rng(1).shuffle(svs)
    svs = svs.reshape(-1, 4)
    bodies = c.map_supervoxels(svs)
    assert bodies.shape == svs.shape and bodies.dtype == np.uint64
    np.testing.assert_array_equal(bodies, source.map_supervoxels(svs.ravel()).reshape(svs.shape))
    assert np.all(bodies[svs >= 2_000_000] == svs[svs >= 2_000_000])  # identity where unmapped
    assert np.all(bodies[svs < 2_000_000] != svs[svs < 2_000_000])
    assert c.map_supervoxels(np.zeros(0, np.uint64)).shape == (0,)
    with pytest.raises(Exception, match="negative"):
        c.map_supervoxels(np.array([-1, 2]))
    c.close()


def test_map_exchange_raw_bare_command(server, source):
    raw = fl.FlightClient(server.location)
    writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(b"map"), auth_opts())
    writer.begin(P.MAP_REQUEST_SCHEMA)
    svs = np.array([int(source.sv[0]), 5, int(source.sv[7])], np.uint64)
    writer.write_batch(pa.record_batch([pa.array(svs)], schema=P.MAP_REQUEST_SCHEMA))
    got = reader.read_chunk().data.column("body").to_numpy()
    writer.done_writing()
    writer.close()
    np.testing.assert_array_equal(got, [source.body[0], 5, source.body[7]])
    raw.close()


def test_read_mapping_and_indices(client, source):
    m = pa.Table.from_batches(list(client.read_mapping()))
    assert m.num_rows == 500
    np.testing.assert_array_equal(m.column("supervoxel").to_numpy(), source.sv)
    np.testing.assert_array_equal(m.column("body").to_numpy(), source.body)
    labels = source.idx.column("label").to_numpy()
    for lo, hi in [
        (0, 2**64),
        (int(labels[10]), int(labels[10]) + 1),
        (int(labels[5]), int(labels[200])),
    ]:
        got = pa.Table.from_batches(list(client.read_indices(lo, hi)))
        i0, i1 = source._range(labels, lo, hi)
        assert got.equals(source.idx.slice(i0, i1 - i0))
    assert list(client.read_indices(10**7, 10**7 + 5)) == []


def test_client_pickles_and_reconnects_lazily(client, source):
    client.info()
    c2 = pickle.loads(pickle.dumps(client))
    assert c2._conn is None and c2.uuid == "abc123" and c2.instance == "segmentation"
    assert c2.read_blocks_table(1, 0, 32).num_rows == source.tables[1].num_rows
    assert TOKEN not in repr(c2)
    c2.close()


def test_one_client_many_threads(client, source):
    """Dask workers share one client between task threads."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = [(0, lo, lo + 37) for lo in range(0, 256, 37)] * 3
    with ThreadPoolExecutor(6) as pool:
        tables = list(pool.map(lambda r: client.read_blocks_table(*r), ranges))
        bodies = list(pool.map(client.map_supervoxels, [source.sv[i::5] for i in range(10)]))
    for (scale, lo, hi), t in zip(ranges, tables, strict=True):
        assert t.equals(source.expected(scale, lo, min(hi, 256)))
    for i, b in enumerate(bodies):
        np.testing.assert_array_equal(b, source.body[i::5])


class _WatchedSource(DictSource):
    """Records how many batches the server pulled from ``read_blocks`` and whether the
    generator was closed (the server's side of a cancelled stream)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pulled = 0
        self.closed = threading.Event()

    def read_blocks(self, scale, lo, hi):
        try:
            for b in super().read_blocks(scale, lo, hi):
                self.pulled += 1
                yield b
        finally:
            self.closed.set()


def test_early_stop_releases_the_stream():
    # 4,096 blocks of 8 KiB, one per source batch, 2 ms each: ~8 s to read them all
    grid = (16, 16, 16)
    blocks = {(x, y, z): bytes([x, y, z]) * 2731 for x in range(16) for y in range(16) for z in range(16)}
    src = _WatchedSource({0: blocks}, {0: grid}, batch_rows=1, delay=0.002)
    total = src.tables[0].num_rows
    with start_server(src) as srv:
        c = FlightClient(srv.location)
        it = c.read_blocks(0, 0, total)
        first = next(it)
        it.close()  # consumer stops: the stream must be cancelled on the server
        assert first.num_rows > 0
        # the server closed the source generator long before it ran out of blocks
        assert src.closed.wait(10), "server kept reading the source after the client cancelled"
        assert src.pulled < total // 4, (src.pulled, total)
        # and the client stays usable
        assert c.read_blocks_table(0, 0, 64).num_rows == 64
        c.close()


def test_any_uuid_source():
    src = make_source(seed=3, uuid="*")
    with start_server(src) as srv:
        anyc = FlightClient(srv.location)
        assert anyc.info().uuid == "*"
        c = FlightClient(srv.location, uuid="cafe01")
        assert c.info().uuid == "cafe01"
        assert c.read_blocks_table(0, 0, 256).num_rows == src.tables[0].num_rows
        bad = FlightClient(srv.location, uuid="cafe01", instance="grayscale")
        with pytest.raises(FlightRequestError, match="instance"):
            bad.info()


# ---------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------


def _all_calls(raw: fl.FlightClient, opts: fl.FlightCallOptions):
    """Every RPC of the contract, each a thunk that completes the call."""
    bt = P.BlocksTicket("abc123", "segmentation", 0, 0, 256).to_json()

    def exchange():
        writer, reader = raw.do_exchange(
            fl.FlightDescriptor.for_command(P.map_command("abc123", "segmentation")), opts
        )
        writer.begin(P.MAP_REQUEST_SCHEMA)
        writer.write_batch(
            pa.record_batch([pa.array(np.array([1], np.uint64))], schema=P.MAP_REQUEST_SCHEMA)
        )
        reader.read_chunk()
        writer.close()

    return {
        "GetFlightInfo": lambda: raw.get_flight_info(
            fl.FlightDescriptor.for_path("abc123", "segmentation"), opts
        ),
        "GetSchema": lambda: raw.get_schema(
            fl.FlightDescriptor.for_path("abc123", "segmentation"), opts
        ),
        "ListFlights": lambda: list(raw.list_flights(options=opts)),
        "ListActions": lambda: list(raw.list_actions(opts)),
        "DoAction info": lambda: list(raw.do_action(fl.Action("info", b""), opts)),
        "DoAction count": lambda: list(
            raw.do_action(
                fl.Action("count", P.CountRequest("abc123", "segmentation", 0, 2).to_json()), opts
            )
        ),
        "DoGet blocks": lambda: raw.do_get(fl.Ticket(bt), opts).read_all(),
        "DoGet mapping": lambda: raw.do_get(
            fl.Ticket(P.MappingTicket("abc123", "segmentation").to_json()), opts
        ).read_all(),
        "DoGet indices": lambda: raw.do_get(
            fl.Ticket(P.IndicesTicket("abc123", "segmentation", 0, 2**64).to_json()), opts
        ).read_all(),
        "DoExchange map": exchange,
        "Handshake": lambda: raw.authenticate_basic_token("user", "pw", opts),
    }


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1]])
def test_every_call_unauthenticated_without_the_token(server, token):
    raw = fl.FlightClient(server.location)
    calls = _all_calls(raw, auth_opts(token))
    for name, call in calls.items():
        # pyarrow's client raises a plain OSError for GetSchema; the status is the same
        with pytest.raises(OSError if name == "GetSchema" else fl.FlightUnauthenticatedError) as ei:
            call()
        assert "Unauthenticated" in str(ei.value), name
        assert TOKEN not in str(ei.value), name
    raw.close()


def test_every_call_works_with_the_token(server):
    raw = fl.FlightClient(server.location)
    for name, call in _all_calls(raw, auth_opts()).items():
        if name == "Handshake":  # no handshake auth scheme: the bearer header is the scheme
            with pytest.raises(pa.ArrowNotImplementedError, match="authentication"):
                call()
        else:
            call()
    raw.close()


def test_client_auth_error_is_clear(server):
    for tok in (None, "nope"):
        c = FlightClient(server.location, tok, retries=0)
        with pytest.raises(FlightAuthError, match="token") as ei:
            c.info()
        assert server.location in str(ei.value)
        with pytest.raises(FlightAuthError):
            list(
                FlightClient(
                    server.location, tok, uuid="abc123", instance="segmentation"
                ).read_blocks(0, 0, 10)
            )


def test_commands_take_the_token_from_env_or_file(tmp_path, monkeypatch, capsys):
    """What every command does with a token-protected server (here `plan`): the token from
    DVIDETL_FLIGHT_TOKEN or --token-file is sent; none, a wrong one, an empty or missing file
    give one-line errors that say what to fix."""
    from dvidetl.cli import main as cli
    from dvidetl.sources import open_source

    with start_server(open_source("synthetic://tok?size=128,128,64&scales=1"), token=TOKEN) as srv:
        base = ["plan", "--uuid", "tok", "--flight", srv.location]
        monkeypatch.delenv("DVIDETL_FLIGHT_TOKEN", raising=False)
        assert cli(base) == 2
        assert "token" in capsys.readouterr().err.lower()
        monkeypatch.setenv("DVIDETL_FLIGHT_TOKEN", f" {TOKEN}\n")
        assert cli(base) == 0
        assert "partitions" in capsys.readouterr().out
        monkeypatch.setenv("DVIDETL_FLIGHT_TOKEN", "tok-q8z-not-it")
        assert cli(base) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "tok-q8z" not in err  # never echoes a token
        f = tmp_path / "tok"
        f.write_text(TOKEN + "\n")
        assert cli([*base, "--token-file", str(f)]) == 0  # the file wins over the env
        capsys.readouterr()
        (tmp_path / "empty").write_text("\n")
        for name, msg in (("empty", "is empty"), ("missing", "cannot read")):
            assert cli([*base, "--token-file", str(tmp_path / name)]) == 2
            assert msg in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# invalid tickets over the wire
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ticket, field",
    [
        (b"{not json", "ticket"),
        (raw_ticket(v=...), "v"),
        (raw_ticket(v=99), "v"),
        (raw_ticket(kind="voxels"), "kind"),
        (raw_ticket(uuid="0000ff"), "uuid"),
        (raw_ticket(instance="grayscale"), "instance"),
        (raw_ticket(scale=2), "scale"),
        (raw_ticket(scale=-1), "scale"),
        (raw_ticket(lo=10, hi=10), "hi"),
        (raw_ticket(lo=11, hi=10), "hi"),
        (raw_ticket(lo=-5), "lo"),
        (raw_ticket(lo=256, hi=1000), "lo"),
        (raw_ticket(lo=1.5), "lo"),
        (raw_ticket(pad="x" * 5000), "ticket"),
        (
            json.dumps(
                {
                    "v": 1,
                    "kind": "indices",
                    "uuid": "abc123",
                    "instance": "segmentation",
                    "lo": 5,
                    "hi": 2,
                }
            ).encode(),
            "hi",
        ),
    ],
)
def test_invalid_tickets_are_invalid_argument(server, ticket, field):
    raw = fl.FlightClient(server.location)
    with pytest.raises(pa.ArrowInvalid) as ei:
        raw.do_get(fl.Ticket(ticket), auth_opts()).read_all()
    msg = str(ei.value)
    assert f"field {field!r}" in msg
    assert "grpc_status:3" in msg  # INVALID_ARGUMENT on the wire
    raw.close()


@pytest.mark.parametrize(
    "action, body, field",
    [
        ("count", b"", "count body"),
        ("count", P.CountRequest("abc123", "segmentation", 5, 0).to_json(), "scale"),
        (
            "count",
            b'{"v":1,"uuid":"abc123","instance":"segmentation","scale":0,"level":-1}',
            "level",
        ),
        ("info", b'{"v":1,"uuid":"nope","instance":"segmentation"}', "uuid"),
        ("frobnicate", b"", "action"),
    ],
)
def test_invalid_action_bodies(server, action, body, field):
    raw = fl.FlightClient(server.location)
    with pytest.raises(pa.ArrowInvalid, match=f"field '{field}'"):
        list(raw.do_action(fl.Action(action, body), auth_opts()))
    raw.close()


def test_invalid_descriptors_and_exchange(server):
    raw = fl.FlightClient(server.location)
    with pytest.raises(pa.ArrowInvalid, match="field 'path'"):
        raw.get_flight_info(fl.FlightDescriptor.for_path("abc123"), auth_opts())
    with pytest.raises(pa.ArrowInvalid, match="field 'instance'"):
        raw.get_flight_info(fl.FlightDescriptor.for_path("abc123", "other"), auth_opts())
    with pytest.raises(pa.ArrowInvalid, match="field 'kind'"):
        writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(raw_ticket()), auth_opts())
        writer.begin(P.MAP_REQUEST_SCHEMA)
        reader.read_chunk()
    bad_schema = pa.schema([("supervoxel", pa.int64())])
    with pytest.raises(pa.ArrowInvalid, match="field 'schema'"):
        writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(b"map"), auth_opts())
        writer.begin(bad_schema)
        writer.write_batch(pa.record_batch([pa.array([1], pa.int64())], schema=bad_schema))
        reader.read_chunk()
    raw.close()


def test_client_side_errors(client):
    with pytest.raises(FlightRequestError, match="field 'scale'") as ei:
        list(client.read_blocks(9, 0, 10))
    assert ei.value.field == "scale"
    with pytest.raises(P.TicketError, match="field 'hi'"):
        client.read_blocks(0, 5, 5)
    with pytest.raises(P.TicketError, match="field 'hi'"):
        client.read_indices(7, 3)
    with pytest.raises(FlightRequestError, match="field 'level'"):
        client.count(0, 65)


# ---------------------------------------------------------------------------------------
# failures: source errors, server killed mid-stream, server gone
# ---------------------------------------------------------------------------------------


class BrokenSource(DictSource):
    def __init__(self, exc: Exception, after: int, **kw):
        super().__init__(
            {0: {(x, 0, 0): bytes([x]) * 100 for x in range(8)}}, {0: (8, 1, 1)}, batch_rows=1, **kw
        )
        self.exc, self.after, self.calls = exc, after, 0

    def read_blocks(self, scale, lo, hi):
        self.calls += 1
        for i, b in enumerate(super().read_blocks(scale, lo, hi)):
            if i == self.after and self.calls == 1:
                raise self.exc
            yield b


def test_source_io_error_mid_stream_is_retried_from_the_start():
    src = BrokenSource(OSError("upstream DVID reset the connection"), after=3)
    with start_server(src, max_batch_bytes=150) as srv:  # one block per batch
        c = FlightClient(srv.location, retries=2, backoff=0.01)
        got = table_of(c.read_blocks(0, 0, 8))
        assert src.calls == 2  # the whole ticket was asked again
        assert got.equals(src.tables[0])  # nothing lost, nothing twice


def test_source_changed_between_attempts_is_detected():
    class Changing(BrokenSource):
        def read_blocks(self, scale, lo, hi):
            self.calls += 1
            t = self.tables[scale]
            if self.calls == 1:
                yield from t.slice(0, 3).to_batches(max_chunksize=1)
                raise OSError("connection reset")
            yield from t.slice(1, 7).to_batches(max_chunksize=1)  # block 0 vanished

    src = Changing(OSError(), after=-1)
    with start_server(src, max_batch_bytes=150) as srv:
        c = FlightClient(srv.location, retries=2, backoff=0.01)
        with pytest.raises(RuntimeError, match="differs from the first attempt"):
            list(c.read_blocks(0, 0, 8))
        assert src.calls == 2


def test_source_bug_is_internal_and_not_retried():
    src = BrokenSource(ValueError("bug in source"), after=0)
    with start_server(src) as srv:
        c = FlightClient(srv.location, retries=3, backoff=0.01)
        with pytest.raises(fl.FlightInternalError, match="bug in source"):
            list(c.read_blocks(0, 0, 8))
        assert src.calls == 1


def test_broken_source_contract_is_caught():
    class Unsorted(DictSource):
        def read_blocks(self, scale, lo, hi):
            t = self.tables[scale]
            yield t.take(np.arange(t.num_rows)[::-1]).to_batches()[0]

    src = Unsorted({0: {(x, 0, 0): b"x" for x in range(4)}}, {0: (4, 1, 1)})
    with start_server(src) as srv:
        with pytest.raises(fl.FlightInternalError, match="ascending"):
            list(FlightClient(srv.location, retries=0).read_blocks(0, 0, 4))


def test_source_with_unsorted_counts_is_caught():
    class BadCount(DictSource):
        def count(self, scale, level):
            return np.array([3, 1], np.uint64), np.array([1, 1], np.uint64), True

    src = BadCount({0: {(x, 0, 0): b"x" for x in range(4)}}, {0: (4, 1, 1)})
    with start_server(src) as srv:
        with pytest.raises(fl.FlightInternalError, match="ascending"):
            FlightClient(srv.location, retries=3).count(0, 0)


def test_source_with_wrong_coordinates_is_caught():
    class Shifted(DictSource):
        def read_blocks(self, scale, lo, hi):
            for b in super().read_blocks(scale, lo, hi):
                yield b.set_column(0, "x", pa.array(b.column("x").to_numpy() + 1))

    src = Shifted({0: {(x, 0, 0): b"x" for x in range(4)}}, {0: (4, 1, 1)})
    with start_server(src) as srv:
        with pytest.raises(fl.FlightInternalError, match="do not match"):
            list(FlightClient(srv.location, retries=0).read_blocks(0, 0, 4))


def test_source_yielding_nulls_is_caught():
    class Nulls(DictSource):
        def read_mapping(self):
            yield pa.record_batch(
                [pa.array([1, None], pa.uint64()), pa.array([2, 3], pa.uint64())],
                schema=MAPPING_SCHEMA,
            )

    src = Nulls({0: {}}, {0: (4, 1, 1)})
    with start_server(src) as srv:
        with pytest.raises(fl.FlightInternalError, match="nulls"):
            list(FlightClient(srv.location, retries=0).read_mapping())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(port: int) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, __file__, str(port)], stdout=subprocess.PIPE, text=True, cwd=str(ROOT)
    )
    line = p.stdout.readline().strip()
    assert line == f"grpc://127.0.0.1:{port}", line
    return p


def test_server_killed_mid_stream():
    port = free_port()
    proc = spawn(port)
    expected = make_source(seed=7).expected(0, 0, 256)
    try:
        # 1. killed and not coming back: a clear error naming the server and the call
        c = FlightClient(f"grpc://127.0.0.1:{port}", retries=2, backoff=0.05)
        it = c.read_blocks(0, 0, 256)
        first = next(it)
        proc.kill()
        proc.wait()
        with pytest.raises(FlightUnavailable) as ei:
            for _ in it:
                pass
        msg = str(ei.value)
        assert f"grpc://127.0.0.1:{port}" in msg and "read_blocks(scale=0, lo=0, hi=256)" in msg
        assert "after 3 attempt(s)" in msg

        # 2. killed and restarted on the same port while the client retries: the stream is
        # re-read from its start and the caller gets every block exactly once
        proc = spawn(port)
        c = FlightClient(f"grpc://127.0.0.1:{port}", retries=15, backoff=0.2, max_backoff=1.5)
        it = c.read_blocks(0, 0, 256)
        got = [next(it), next(it)]
        proc.kill()
        proc.wait()
        holder = {}
        restarter = threading.Thread(target=lambda: holder.setdefault("p", spawn(port)))
        restarter.start()
        got.extend(it)
        restarter.join()
        proc = holder["p"]
        assert first.num_rows > 0
        assert table_of(got).equals(expected)
    finally:
        proc.kill()
        proc.wait()


def test_no_server_at_all():
    c = FlightClient(f"grpc://127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=5)
    with pytest.raises(FlightUnavailable, match="unavailable for info"):
        c.info()


def test_stop_never_hangs_on_open_streams():
    rng = np.random.default_rng(5)
    blocks = {(x, y, 0): rng.bytes(200_000) for x in range(8) for y in range(8)}
    src = DictSource({0: blocks}, {0: (8, 8, 1)}, batch_rows=1, delay=0.05)  # a 3 s stream
    srv = start_server(src, max_batch_bytes=1 << 18)  # one block per batch
    raw = fl.FlightClient(srv.location)
    held = raw.do_get(fl.Ticket(P.BlocksTicket("abc123", "segmentation", 0, 0, 64).to_json()))
    held.read_chunk()  # a client holding a stream open without reading on
    c = FlightClient(srv.location, retries=1, backoff=0.01)
    it = c.read_blocks(0, 0, 64)
    next(it)
    t0 = time.perf_counter()
    srv.stop(timeout=2)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(FlightUnavailable, match="read_blocks"):
        for _ in it:
            pass
    with pytest.raises(FlightUnavailable):
        FlightClient(srv.location, retries=0).info()  # no new calls
    raw.close()


def test_prefetched_unit():
    from dvidetl.flight.server import prefetched

    assert list(prefetched(iter(range(10)), 2)) == list(range(10))

    def boom():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for v in prefetched(boom(), 1):
            got.append(v)
    assert got == [1, 2]

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetched(endless(), 3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()  # consumer gone: the producer stops and closes the source generator
    assert closed.wait(5)


def test_prefetching_server_is_exact(source):
    with start_server(source, token=TOKEN, max_batch_bytes=MAX_BATCH, prefetch=3) as srv:
        c = FlightClient(srv.location, TOKEN)
        assert c.read_blocks_table(0, 0, 256).equals(source.tables[0])
        assert c.read_blocks_table(0, 17, 90).equals(source.expected(0, 17, 90))
        it = c.read_blocks(0, 0, 256)
        next(it)
        it.close()
        assert pa.Table.from_batches(list(c.read_mapping())).num_rows == 500
        c.close()
    src = BrokenSource(OSError("upstream reset"), after=3)
    with start_server(src, max_batch_bytes=150, prefetch=2) as srv:
        got = table_of(FlightClient(srv.location, retries=2, backoff=0.01).read_blocks(0, 0, 8))
        assert src.calls == 2 and got.equals(src.tables[0])


def test_bounded_batches_unit():
    data = [b"a" * n for n in (10, 10, 500, 10, 10, 10, 90, 1)]
    t = pa.table(
        {"k": pa.array(range(len(data)), pa.uint64()), "data": pa.array(data, pa.binary())}
    )
    batches = list(bounded_batches(t.to_batches(max_chunksize=3), max_bytes=120))
    assert pa.Table.from_batches(batches).equals(t)
    for b in batches:
        payload = sum(len(v) for v in b.column("data").to_pylist())
        assert b.num_rows == 1 or payload + b.num_rows * 12 <= 120  # 8 B key + 4 B offset per row
    assert [b.num_rows for b in batches if b.column("data").nbytes >= 500] == [1]


def _serve_forever(port: int) -> None:
    src = make_source(seed=7, batch_rows=2, delay=0.02)
    srv = start_server(src, port=port, max_batch_bytes=16 << 10)
    print(srv.location, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _serve_forever(int(sys.argv[1]))


def test_supervoxel_zero_is_never_mapped_whatever_the_source_says(caplog):
    """A source with a pair for supervoxel 0 (background): the server answers 0 for it in
    map exchanges and leaves it out of the mapping stream, and says so."""
    src = DictSource({0: {}}, {0: (4, 4, 4)}, mapping={0: 55, 3: 4, 9: 8}, batch_rows=1)
    with start_server(src) as srv, FlightClient(srv.location) as c:
        with caplog.at_level("WARNING", logger="dvidetl.flight.server"):
            assert c.map_supervoxels(np.array([0, 3, 5, 9], np.uint64)).tolist() == [0, 4, 5, 8]
            t = pa.Table.from_batches(list(c.read_mapping()))
            r = pa.Table.from_batches(list(c.read_mapping(1, 2**64)))
    assert t["supervoxel"].to_pylist() == [3, 9] and t["body"].to_pylist() == [4, 8]
    assert r.equals(t)
    assert "supervoxel 0" in caplog.text
