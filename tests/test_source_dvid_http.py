"""dvid+http:// source against FakeDvid (a real HTTP server on 127.0.0.1) serving real DVID bytes."""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import dvidetl.sources.dvid_http as dh
from dvidetl.codec import block_labels, decode_block
from dvidetl.codec.labelindex import encode_label_index
from dvidetl.errors import UserError
from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_encode
from dvidetl.sources import open_source
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA, INDICES_SCHEMA, MAPPING_SCHEMA, Source
from dvidetl.sources.dvid_http import DvidHttpError, DvidHttpSource
from dvidetl.sources.shards import ShardsSource
from dvidetl.testing.fake_dvid import ERROR_TEXT, FakeDvid

NAME = "30720_24576_28672"
SHIFT = (480, 384, 448)  # the sample shard's box origin at scale 1


class DictSource:
    """A tiny in-memory `Source` of real DVID blocks (stored gzip, as DVID stores them)."""

    def __init__(self, blocks, grids, mapping, indices, codec="gzip"):
        self.grids = grids
        self.codec = codec
        self.tables = {}
        for s, d in blocks.items():
            keys = sorted(d)
            x, y, z = (np.array([k[i] for k in keys], dtype=np.int32) for i in range(3))
            m = morton_encode(x, y, z, grids[s])
            o = np.argsort(m)
            self.tables[s] = pa.table(
                {
                    "x": x[o],
                    "y": y[o],
                    "z": z[o],
                    "morton": m[o],
                    "data": pa.array([d[keys[i]] for i in o.tolist()], pa.binary()),
                },
                schema=BLOCKS_WIRE_SCHEMA,
            )
        self.mapping = dict(sorted(mapping.items()))
        self.indices = dict(sorted(indices.items()))

    def info(self):
        scales = [ScaleInfo(s, (64, 64, 64), g) for s, g in sorted(self.grids.items())]
        return VolumeInfo("*", "segmentation", self.codec, scales, True, bool(self.indices))

    def count(self, scale, level):
        m = self.tables[scale]["morton"].to_numpy()
        c, n = np.unique(m >> np.uint64(level), return_counts=True)
        return c, n.astype(np.uint64), True

    def read_blocks(self, scale, lo, hi):
        t = self.tables[scale]
        m = t["morton"].to_numpy()
        a, b = np.searchsorted(m, np.uint64(lo)), np.searchsorted(m, np.uint64(min(hi, 2**64 - 1)))
        if b > a:
            yield from t.slice(a, b - a).to_batches()

    def map_supervoxels(self, svs):
        return np.array([self.mapping.get(int(v), int(v)) for v in svs], dtype=np.uint64)

    def read_mapping(self):
        yield pa.record_batch(
            [
                pa.array(list(self.mapping), pa.uint64()),
                pa.array(list(self.mapping.values()), pa.uint64()),
            ],
            schema=MAPPING_SCHEMA,
        )

    def read_indices(self, lo, hi):
        labs = [k for k in self.indices if lo <= k < hi]
        if labs:
            yield pa.record_batch(
                [
                    pa.array(labs, pa.uint64()),
                    pa.array([self.indices[k] for k in labs], pa.binary()),
                ],
                schema=INDICES_SCHEMA,
            )

    def close(self):
        pass


@pytest.fixture(scope="module")
def real_source(tmp_path_factory, shared_data) -> DictSource:
    """The 258 real blocks of the sample shard (re-gzipped, shifted to a 32^3 grid at scale 0),
    a scale 1 from its even blocks, the shard's mapping, and LabelIndex protobufs per body."""
    d = tmp_path_factory.mktemp("shards")
    (d / "s1").mkdir()
    os.symlink(shared_data / "mcns-shard" / f"{NAME}.arrow", d / "s1" / f"{NAME}.arrow")
    os.symlink(shared_data / "mcns-shard" / f"{NAME}-newformat.csv", d / "s1" / f"{NAME}.csv")
    shards = ShardsSource(d)
    t = pa.Table.from_batches(list(shards.read_blocks(1, 0, 1 << 64)))
    dz = zstandard.ZstdDecompressor()
    s0, s1 = {}, {}
    for x, y, z, data in zip(*(t[c].to_pylist() for c in ("x", "y", "z", "data")), strict=True):
        key = (x - SHIFT[0], y - SHIFT[1], z - SHIFT[2])
        s0[key] = gzip.compress(dz.decompress(data), compresslevel=1, mtime=0)
        if all(v % 2 == 0 for v in key):
            s1[tuple(v // 2 for v in key)] = s0[key]
    mt = pa.Table.from_batches(list(shards.read_mapping()))
    mapping = dict(zip(mt["supervoxel"].to_pylist(), mt["body"].to_pylist(), strict=True))
    import pyarrow.ipc as ipc

    with pa.memory_map(str(d / "s1" / f"{NAME}.arrow")) as mm:
        ft = ipc.open_stream(mm).read_all()
    rows: dict[int, list] = {}
    for x, y, z, svs, bodies in zip(
        *(ft[c].to_pylist() for c in ("chunk_x", "chunk_y", "chunk_z", "supervoxels", "labels")),
        strict=True,
    ):
        for sv, body in zip(svs, bodies, strict=True):
            if body:
                rows.setdefault(body, []).append((x, y, z, sv))
    indices = {}
    for body, r in rows.items():
        a = np.array(r, dtype=np.int64)
        indices[body] = encode_label_index(body, a[:, :3], a[:, 3], np.ones(len(a)) * 7)
    return DictSource({0: s0, 1: s1}, {0: (32, 32, 32), 1: (16, 16, 16)}, mapping, indices)


@pytest.fixture()
def fake(real_source):
    with FakeDvid(real_source, uuid="a1b2c3d4") as f:
        yield f


def _client(fake, **kw) -> DvidHttpSource:
    extra = "".join(f"&{k}={v}" for k, v in {"backoff": 0.01, **kw}.items())
    return open_source(fake.url + extra)


def _all(src, scale, lo, hi) -> pa.Table:
    batches = list(src.read_blocks(scale, lo, hi))
    for b in batches:
        assert b.schema.equals(BLOCKS_WIRE_SCHEMA)
    return pa.Table.from_batches(batches, schema=BLOCKS_WIRE_SCHEMA)


def test_replayed_real_stream(shared_data):
    """The real /blocks stream recorded from DVID, replayed byte for byte, parses to the block."""
    raw = (shared_data / "dvid" / "stream_1block.dat").read_bytes()
    x, y, z, n = struct.unpack_from("<iiiI", raw)
    assert (x, y, z, n + 16) == (0, 0, 0, len(raw))
    src = DictSource({0: {(0, 0, 0): raw[16:]}}, {0: (4, 4, 4)}, {}, {})
    with FakeDvid(src, replay=shared_data / "dvid" / "stream_1block.dat") as f:
        c = _client(f)
        t = _all(c, 0, 0, 64)
        assert any("blocks/" in p for p in f.requests)
    assert t.num_rows == 1 and (t["x"][0].as_py(), t["morton"][0].as_py()) == (0, 0)
    payload = t["data"][0].as_py()
    assert payload == raw[16:]
    block = gzip.decompress(payload)
    assert len(block) == 152_672
    gx, gy, gz, nlab = struct.unpack_from("<IIII", block)
    assert (gx, gy, gz, nlab) == (8, 8, 8, 10)
    vol = decode_block(block)
    assert vol.shape == (64, 64, 64) and vol.dtype == np.uint64
    assert len(np.unique(vol)) == 10
    assert sorted(block_labels(block).tolist()) == sorted(np.unique(vol).tolist())


def test_info(fake, real_source):
    c = _client(fake)
    assert isinstance(c, Source)
    info = c.info()
    assert info.uuid == "a1b2c3d4" and info.instance == "segmentation" and info.codec == "gzip"
    assert [s.scale for s in info.scales] == [0, 1]
    assert info.scale(0).grid == (32, 32, 32) and info.scale(1).grid == (16, 16, 16)
    assert info.has_indices and info.has_mapping
    # no uuid: the server's only leaf node is used
    c2 = open_source(f"dvid+http://127.0.0.1:{fake.port}")
    assert c2.info().uuid == "a1b2c3d4"


def test_whole_volume_equals_source(fake, real_source):
    c = _client(fake, box_bits=9)
    for scale in (0, 1):
        want = real_source.tables[scale]
        got = _all(c, scale, 0, 1 << 40)
        assert got.num_rows == want.num_rows > 0
        assert got.equals(want)


@pytest.fixture(scope="module")
def shared_fake(real_source):
    with FakeDvid(real_source, seed=7) as f:
        yield f


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1 << 15), st.integers(1, 1 << 13), st.sampled_from([4, 6, 12]))
def test_random_ranges(shared_fake, real_source, lo, n, box_bits):
    c = _client(shared_fake, box_bits=box_bits)
    want = real_source.tables[0]
    m = want["morton"].to_numpy()
    got = _all(c, 0, lo, lo + n)
    assert got.equals(want.filter(pa.array((m >= lo) & (m < lo + n))))
    assert _all(c, 0, 1 << 15, 1 << 16).num_rows == 0  # past the grid: empty
    c.close()


def test_retries_on_503(fake, real_source, caplog, monkeypatch):
    """503 is DVID's throttle: waited out with backoff+jitter, not counted as a failed attempt."""
    c = _client(fake, retries=2)
    fake.fail_first = 12  # far more 503s than retries: still no failure
    got = _all(c, 0, 0, 1 << 15)
    assert got.equals(real_source.tables[0])
    assert fake.fail_first == 0
    assert c.http.throttled == 12
    monkeypatch.setattr(c.http, "patience", 0.3)
    fake.fail_first = -1  # throttled forever: the server counts as down after the patience
    with pytest.raises(dh.DvidUnavailable, match=r"503 \(throttled\) for 0 s"):
        _all(c, 0, 0, 8)


def test_throttle_caps_inflight(fake, real_source):
    """throttle=true: DVID admits one throttled request per server by default; with
    parallel=4 we still send one at a time (inflight defaults to 1), so 503s stay rare (only
    the race between DVID freeing its slot and our next request) and none fails the read."""
    fake.throttle_slots = 1
    c = _client(fake, throttle="true", parallel=4, box_bits=3, retries=0)
    got = _all(c, 0, 0, 1 << 15)
    assert got.equals(real_source.tables[0])
    n = sum("/blocks/" in p for p in fake.requests)
    capped = fake.answered_503
    assert capped <= n // 10, (capped, n)
    fake.answered_503 = 0
    fake.requests.clear()
    c4 = _client(fake, throttle="true", parallel=4, box_bits=3, retries=0, inflight=4)
    assert _all(c4, 0, 0, 1 << 15).equals(real_source.tables[0])  # 503s waited out
    assert fake.answered_503 > capped, (fake.answered_503, capped)


def test_dvid_down_is_unavailable(fake):
    """A DVID that cannot be reached is a SourceUnavailable, which Flight answers UNAVAILABLE
    (workers retry) — not INVALID_ARGUMENT like a bad ticket."""
    import pyarrow.flight as flight

    from dvidetl.errors import SourceUnavailable
    from dvidetl.flight.server import _to_flight_error

    c = _client(fake, retries=1)
    fake.stop()
    with pytest.raises(SourceUnavailable) as ei:
        _all(c, 0, 0, 8)
    assert isinstance(ei.value, DvidHttpError)  # old callers still catch it
    mapped = _to_flight_error(ei.value, "read_blocks")
    assert isinstance(mapped, flight.FlightUnavailableError)
    assert not isinstance(_to_flight_error(UserError("bad"), "x"), flight.FlightUnavailableError)


def test_dvid_auth_token(fake, real_source, tmp_path, monkeypatch, caplog):
    """An auth-enabled DVID needs a bearer token on every request: from env or a file, never
    in the URL, never logged; a missing or refused token is said so."""
    monkeypatch.delenv(dh.DVID_TOKEN_ENV, raising=False)
    monkeypatch.delenv(dh.DVID_TOKEN_FILE_ENV, raising=False)
    fake.token = "s3cr3t-jwt"
    with pytest.raises(dh.DvidAuthError, match=dh.DVID_TOKEN_ENV):
        _client(fake)
    monkeypatch.setenv(dh.DVID_TOKEN_ENV, "wrong")
    with pytest.raises(dh.DvidAuthError, match="token was refused"):
        _client(fake)
    monkeypatch.setenv(dh.DVID_TOKEN_ENV, "s3cr3t-jwt")
    with caplog.at_level("DEBUG"):
        c = _client(fake)
        assert _all(c, 0, 0, 1 << 15).equals(real_source.tables[0])
    monkeypatch.delenv(dh.DVID_TOKEN_ENV)
    f = tmp_path / "tok"
    f.write_text("s3cr3t-jwt\n")
    c2 = _client(fake, token_file=str(f))
    assert c2.info().scales
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)
    assert all("s3cr3t" not in p for p in fake.requests)


def test_locked_state(fake, caplog):
    """Only a locked node exports deterministically: the source reports DVID's Locked flag
    and warns on an unlocked node."""
    fake.locked = False
    with caplog.at_level("WARNING", logger="dvidetl.sources.dvid_http"):
        c = _client(fake)
    assert c.locked is False
    assert any("not locked" in r.message for r in caplog.records)
    assert c.info().locked is False
    fake.locked = True
    assert _client(fake).locked is True and _client(fake).info().locked is True


@pytest.mark.parametrize("locked", [False, True])
def test_run_refuses_an_unlocked_node(fake, locked, tmp_path, capsys):
    """Through Flight, as a user runs it: plan reports the node's state; run refuses an
    unlocked node (exit 2, says how to fix it) unless --allow-unlocked, which warns."""
    from dvidetl.cli import main as cli
    from dvidetl.flight.server import start_server

    fake.locked = locked
    src = _client(fake)
    with start_server(src) as srv:
        base = ["--uuid", fake.uuid, "--flight", srv.location]
        assert cli(["plan", *base]) == 0
        err = capsys.readouterr().err
        assert ("NOT locked" in err) is (not locked) and ("locked" in err)
        run = ["run", *base, "--sink", f"parquet://{tmp_path}/out", "--dry-run"]
        rc = cli(run)
        err = capsys.readouterr().err
        if locked:
            assert rc == 0 and "not locked" not in err
        else:
            assert rc == 2 and "is not locked" in err and "--allow-unlocked" in err
            assert "/commit" in err and "Traceback" not in err
            assert cli([*run, "--allow-unlocked"]) == 0
            assert "warning" in capsys.readouterr().err
    src.close()


def test_supervoxel_zero_never_mapped(real_source, caplog):
    """DVID never maps supervoxel 0 (background): a pair for it is dropped with a warning, and
    map_supervoxels keeps 0 as 0."""
    bad = DictSource(
        {0: {}}, {0: (32, 32, 32)}, {0: 777, **real_source.mapping}, {}
    )
    with FakeDvid(bad, uuid="a1b2c3d4") as f, caplog.at_level("WARNING"):
        c = _client(f)
        assert c.map_supervoxels(np.array([0], np.uint64)).tolist() == [0]
        t = pa.Table.from_batches(list(c.read_mapping()))
        assert 0 not in t["supervoxel"].to_pylist()
        assert t.num_rows == len(real_source.mapping)
    assert any("supervoxel 0" in r.getMessage() and "777" in r.getMessage() for r in caplog.records)


def test_appended_error_text(fake, real_source):
    c = _client(fake, retries=1)
    fake.error_first = 1  # one bad stream: retried
    assert _all(c, 0, 0, 1 << 15).equals(real_source.tables[0])
    fake.error_first = -1
    with pytest.raises(DvidHttpError) as exc:
        _all(c, 0, 0, 1 << 15)
    msg = str(exc.value)
    assert "/blocks/" in msg and "127.0.0.1" in msg and "at byte" in msg
    assert "ERROR: fake DVID" in msg and "does not parse" in msg
    fake.error_first = -1  # also on /mappings
    with pytest.raises(DvidHttpError, match=r"mappings.*at byte \d+"):
        c.map_supervoxels(np.array([1], np.uint64))


def test_mappings_text_and_appended_errors(fake, real_source):
    """An old DVID answers /mappings as text: read all the same. An error text DVID appends
    to a 200 body is found whatever its length (a whole number of 16-byte pairs too)."""
    from dvidetl.sources.dvid_http import _StreamError, parse_mappings

    fake.mappings_text = True
    c = _client(fake)
    t = pa.Table.from_batches(list(c.read_mapping()))
    assert dict(zip(t["supervoxel"].to_pylist(), t["body"].to_pylist(), strict=True)) == real_source.mapping
    pairs = np.array([[5, 7], [9, 2**64 - 1], [2**40, 3]], np.uint64)
    assert parse_mappings(pairs.astype("<u8").tobytes()).tolist() == pairs.tolist()
    assert parse_mappings(b"5 7\n9 18446744073709551615\n").tolist() == [[5, 7], [9, 2**64 - 1]]
    binary = pairs.astype("<u8").tobytes()
    for tail in (b"ERROR: storage read failed, ctx!", b"E" * 16, b"x" * 40):  # 32, 16, 40 bytes
        with pytest.raises(_StreamError) as ei:
            parse_mappings(binary + tail)
        assert ei.value.offset == len(binary)
    with pytest.raises(_StreamError, match="appended error") as ei:
        parse_mappings(b"5 7\n9 10\nERROR: deadline exceeded\n")
    assert ei.value.offset == len(b"5 7\n9 10\n")
    with pytest.raises(_StreamError, match="odd"):
        parse_mappings(b"5 7\n9\n")


def test_truncated_and_slow_responses_are_retried(fake, real_source):
    c = _client(fake, timeout=0.5)
    fake.truncate_first = 2
    assert _all(c, 0, 0, 1 << 15).equals(real_source.tables[0])
    assert fake.truncate_first == 0
    fake.slow_first, fake.slow_seconds = 1, 1.5
    assert _all(c, 0, 0, 1 << 15).equals(real_source.tables[0])


def test_mapping(fake, real_source):
    c = _client(fake)
    mt = pa.Table.from_batches(list(c.read_mapping()), schema=MAPPING_SCHEMA)
    assert mt.num_rows == 890
    assert (
        dict(zip(mt["supervoxel"].to_pylist(), mt["body"].to_pylist(), strict=True))
        == real_source.mapping
    )
    svs = np.array(list(real_source.mapping) + [1, 2, 2**64 - 1], dtype=np.uint64)
    np.random.default_rng(1).shuffle(svs)
    assert np.array_equal(c.map_supervoxels(svs), real_source.map_supervoxels(svs))
    n = len(fake.requests)
    c.map_supervoxels(svs)  # cached: no second request
    assert len(fake.requests) == n


def _index_requests(fake) -> int:
    return sum("indices-compressed" in r for r in fake.requests)


@pytest.mark.parametrize("existing", [True, False], ids=["existing-labels", "listlabels"])
def test_indices(fake, real_source, monkeypatch, existing):
    """Every label range reads exactly the source's indices, listing the labels once (from
    /existing-labels, or paged /listlabels on an older DVID) for all ranges and counts."""
    monkeypatch.setattr(dh, "LISTLABELS_PAGE", 37)
    fake.existing_labels = existing
    c = _client(fake, index_batch=50)
    labels = list(real_source.indices)
    requests = 0
    for lo, hi in [
        (0, 2**64),
        (labels[10], labels[200]),
        (labels[5], labels[5] + 1),
        (1, labels[0]),
    ]:
        got = pa.Table.from_batches(list(c.read_indices(lo, hi)), schema=INDICES_SCHEMA)
        want = {k: v for k, v in real_source.indices.items() if lo <= k < hi}
        assert got["label"].to_pylist() == list(want)
        assert dict(zip(got["label"].to_pylist(), got["data"].to_pylist(), strict=True)) == want
        requests += math.ceil(len(want) / 50)  # index_batch labels per request, none if empty
    kc = c.count_keys("indices", 0)
    assert kc.cells.tolist() == labels and kc.exact is False
    assert kc.rows.tolist() == [dh.ROWS_PER_LABEL] * len(labels)
    listing = [r for r in fake.requests if "existing-labels" in r or "listlabels" in r]
    if existing:
        assert len(listing) == 1 and "existing-labels" in listing[0]
    else:  # the one 400 for /existing-labels, then the pages, once
        pages = [r for r in listing if "listlabels" in r]
        assert len(pages) == math.ceil((len(labels) + 1) / 37)
        assert sum("existing-labels" in r for r in listing) == 1
    assert _index_requests(fake) == requests


def test_listlabels_error_is_detected(fake, monkeypatch):
    monkeypatch.setattr(dh, "LISTLABELS_PAGE", 37)
    fake.listlabels_error_first = -1
    c = _client(fake, labels="listlabels", retries=1)
    with pytest.raises(DvidHttpError, match="listlabels.*32 zero bytes"):
        list(c.read_indices(0, 2**64))


def test_indices_requests_in_flight(fake, real_source):
    """index_parallel=4 keeps four /indices-compressed requests at DVID at once (and the
    labels still arrive in order); index_parallel=1 one at a time."""
    fake.indices_seconds = 0.05
    labels = list(real_source.indices)
    for par, want_max in ((4, 4), (1, 1)):
        fake.indices_max = 0
        c = _client(fake, index_batch=10, index_parallel=par)
        got = pa.Table.from_batches(list(c.read_indices(0, 2**64)), schema=INDICES_SCHEMA)
        assert got["label"].to_pylist() == labels
        assert fake.indices_max == want_max


def test_index_label_comes_from_the_record_header(fake, real_source):
    """Old DVIDs stored LabelIndex protobufs with label 0: the label is the record's."""
    from dvidetl.codec.labelindex import label_index_table

    fake.index_label_zero = True
    c = _client(fake)
    got = pa.Table.from_batches(list(c.read_indices(0, 2**64)), schema=INDICES_SCHEMA)
    assert got["label"].to_pylist() == list(real_source.indices)
    rows = label_index_table(got["label"], got["data"])
    want = label_index_table(list(real_source.indices), list(real_source.indices.values()))
    assert rows.num_rows == want.num_rows > 0 and rows.equals(want)
    assert 0 not in set(rows["label"].to_pylist())


def test_mapping_ranges_and_counts(fake, real_source):
    c = _client(fake)
    svs = sorted(real_source.mapping)
    lo, hi = svs[3], svs[-3]
    got = pa.Table.from_batches(list(c.read_mapping(lo, hi)), schema=MAPPING_SCHEMA)
    assert got["supervoxel"].to_pylist() == [v for v in svs if lo <= v < hi]
    assert got["body"].to_pylist() == [real_source.mapping[v] for v in svs if lo <= v < hi]
    kc = c.count_keys("mapping", 8)
    assert kc.exact and int(kc.keys.sum()) == int(kc.rows.sum()) == len(svs)
    assert kc.cells.tolist() == sorted({v >> 8 for v in svs})
    assert sum("mappings" in r for r in fake.requests) == 1  # one /mappings for all of it


def test_count_upper_bounds(fake, real_source):
    c = _client(fake)
    for scale in (0, 1):
        grid = c.info().scale(scale).grid
        for level in (0, 1, 3, 5, 7, 12, 20):
            cells, counts, exact = c.count(scale, level)
            assert exact is False
            assert np.all(cells[1:] > cells[:-1])
            assert int(counts.sum()) == grid[0] * grid[1] * grid[2]
            tc, tn, _ = real_source.count(scale, level)
            pos = np.searchsorted(cells, tc)
            assert np.all(cells[pos] == tc)
            assert np.all(counts[pos] >= tn)
            side = 1 << level
            assert counts.max() <= side


def test_count_is_arithmetic_on_a_huge_volume(fake):
    """A male-CNS-sized extent: counting never enumerates the billions of slots."""

    def info_json():
        d = FakeDvid.info_json(fake)
        d["Extents"]["MaxPoint"] = [94087, 78316, 134575]
        d["Extended"]["MaxDownresLevel"] = 9
        return d

    fake.info_json = info_json
    c = _client(fake)
    assert c.info().scale(0).grid == (1471, 1224, 2103)
    cells, counts, exact = c.count(0, 15)
    assert not exact and int(counts.sum()) == 1471 * 1224 * 2103
    assert counts.max() == 1 << 15
    with pytest.raises(UserError, match="coarser cells"):
        c.count(0, 0)
    # the boxes read_blocks requests for a range cover exactly the slots count() bounds
    cells, counts, _ = c.count(0, 27)
    for shape in ("rows", "cube"):
        c.box_shape = shape
        for cell in cells[[0, len(cells) // 2, -1]].tolist():
            lo, hi = cell << 27, (cell + 1) << 27
            groups = list(c._boxes(0, lo, hi))
            boxes = [b for g in groups for b in g[2]]
            vols = [math.prod(b[1][d] - b[0][d] for d in range(3)) for b in boxes]
            assert sum(vols) == int(counts[cells == cell][0])
            assert max(vols) <= 1 << c.box_bits
            assert all(lo <= g[0] < g[1] <= hi for g in groups)
            assert all(g1[1] <= g2[0] for g1, g2 in zip(groups, groups[1:], strict=False))
            # every box lies inside its group's Morton range
            for g in groups[:50]:
                for b_lo, b_hi in g[2]:
                    corners = morton_encode(*(np.array([b_lo[d], b_hi[d] - 1]) for d in range(3)),
                                            c.info().scale(0).grid)
                    assert g[0] <= int(corners.min()) and int(corners.max()) < g[1]


def test_errors(fake, real_source):
    with pytest.raises(DvidHttpError, match="HTTP 400.*no data instance 'nope'"):
        open_source(f"dvid+http://127.0.0.1:{fake.port}?uuid=a1b2&instance=nope")
    with pytest.raises(UserError, match="unknown parameter"):
        open_source(f"dvid+http://127.0.0.1:{fake.port}?uuid=a1&bogus=2")

    def neg():
        d = FakeDvid.info_json(fake)
        d["Extents"]["MinPoint"] = [-64, 0, 0]
        return d

    fake.info_json = neg
    with pytest.raises(DvidHttpError, match="negative coordinates"):
        _client(fake)
    port = fake.port
    fake.stop()
    with pytest.raises(DvidHttpError, match="failed after 2 attempts"):
        open_source(f"dvid+http://127.0.0.1:{port}?uuid=x&retries=1&backoff=0&timeout=2")


def test_error_text_length_is_detectable():
    # the injected text must not happen to be whole 16-byte mapping pairs
    assert len(ERROR_TEXT) % 16


def test_synthetic_through_fake_dvid():
    """The synthetic labelmap (gzip blocks, mapping, label indices) round-trips through DVID's
    HTTP formats: every call of the dvid+http source agrees with the source itself."""
    syn = open_source("synthetic://fd?size=384,256,192&scales=2&seed=3")
    with FakeDvid(syn, uuid="5y47") as f:
        c = _client(f, box_bits=6)
        info = c.info()
        assert [s.grid for s in info.scales] == [s.grid for s in syn.info().scales]
        for scale in (0, 1):
            want = pa.Table.from_batches(list(syn.read_blocks(scale, 0, 1 << 40)))
            assert want.num_rows > 0
            assert _all(c, scale, 0, 1 << 40).equals(want)
            m = want["morton"].to_numpy()
            lo, hi = int(m[len(m) // 3]), int(m[2 * len(m) // 3]) + 1
            part = _all(c, scale, lo, hi)
            assert part.equals(want.filter(pa.array((m >= lo) & (m < hi))))
            for level in (0, 2, 5):
                cells, bounds, exact = c.count(scale, level)
                tc, tn, _ = syn.count(scale, level)
                pos = np.searchsorted(cells, tc)
                assert not exact and np.all(cells[pos] == tc) and np.all(bounds[pos] >= tn)
        m1 = pa.Table.from_batches(list(syn.read_mapping()))
        m2 = pa.Table.from_batches(list(c.read_mapping()))
        assert m1.num_rows == m2.num_rows > 0
        assert dict(zip(m1[0].to_pylist(), m1[1].to_pylist(), strict=True)) == dict(
            zip(m2[0].to_pylist(), m2[1].to_pylist(), strict=True)
        )
        svs = m1[0].to_numpy()[:500]
        assert np.array_equal(c.map_supervoxels(svs), syn.map_supervoxels(svs))
        i1 = pa.Table.from_batches(list(syn.read_indices(0, 2**64)))
        i2 = pa.Table.from_batches(list(c.read_indices(0, 2**64)))
        assert i1.num_rows > 0 and i2.equals(i1.cast(i2.schema))


def test_extents_override_and_throttle(fake, real_source):
    """Stale extents (DVID's are hints) can be overridden; blocks outside them are not read."""
    c = _client(fake, maxpoint="1023,1023,1023", throttle="true")
    assert c.info().scale(0).grid == (16, 16, 16)
    want = real_source.tables[0]
    inside = (want["x"].to_numpy() < 16) & (want["y"].to_numpy() < 16) & (want["z"].to_numpy() < 16)
    got = _all(c, 0, 0, 1 << 12)
    assert got.select(["x", "y", "z", "data"]).equals(
        want.filter(pa.array(inside)).select(["x", "y", "z", "data"])
    )
    assert any("throttle=true" in p for p in fake.requests)
    c2 = _client(fake, minpoint="64,0,0", maxpoint="2047,2047,2047")
    assert c2.info().scale(0).grid == (32, 32, 32)
    assert int(c2.count(0, 30)[1].sum()) == 31 * 32 * 32
    assert _all(c2, 0, 0, 1 << 15).equals(want.filter(pa.array(want["x"].to_numpy() >= 1)))
    with pytest.raises(UserError, match="maxpoint"):
        _client(fake, maxpoint="1,2")


def test_real_shard_through_fake_dvid(tmp_path, shared_data):
    """The real export-shards file (zstd) served as DVID would (gzip): same blocks, same mapping."""
    (tmp_path / "s1").mkdir()
    os.symlink(shared_data / "mcns-shard" / f"{NAME}.arrow", tmp_path / "s1" / f"{NAME}.arrow")
    os.symlink(
        shared_data / "mcns-shard" / f"{NAME}-newformat.csv", tmp_path / "s1" / f"{NAME}.csv"
    )
    spec = shared_data / "dvid" / "mcns-ng-specs.json"
    shards = open_source(f"shards://{tmp_path}?spec={spec}")
    with FakeDvid(shards, uuid="mcns") as f:
        c = _client(f)
        assert c.info().scale(1).grid == shards.info().scale(1).grid == (736, 612, 1052)
        lo, hi = 0x7F4F7C7 >> 15 << 15, ((0x7F4F7C7 >> 15) + 1) << 15  # the shard's Morton cell
        want = _all(shards, 1, lo, hi)
        got = _all(c, 1, lo, hi)
        assert want.num_rows == got.num_rows == 258
        assert got.select(["x", "y", "z", "morton"]).equals(want.select(["x", "y", "z", "morton"]))
        dz = zstandard.ZstdDecompressor()
        for a, b in zip(got["data"].to_pylist(), want["data"].to_pylist(), strict=True):
            assert gzip.decompress(a) == dz.decompress(b)
        assert np.array_equal(
            c.map_supervoxels(np.arange(0, 10**6, dtype=np.uint64) * 1_000_003),
            shards.map_supervoxels(np.arange(0, 10**6, dtype=np.uint64) * 1_000_003),
        )
        mt = pa.Table.from_batches(list(c.read_mapping()))
        assert mt.num_rows == 890
        assert np.array_equal(
            c.map_supervoxels(mt["supervoxel"].to_numpy()),
            shards.map_supervoxels(mt["supervoxel"].to_numpy()),
        )
        n = len(f.requests)
        assert not c.info().has_indices and list(c.read_indices(0, 2**64)) == []
        assert len(f.requests) == n  # IndexedLabels false: no /listlabels request at all
        cells, bounds, exact = c.count(1, 15)
        assert not exact and int(bounds[np.searchsorted(cells, lo >> 15)]) == 1 << 15


def test_row_boxes_halve_dvid_range_scans(fake, real_source):
    """DVID reads a /blocks box with one range scan per (y, z) row: ranges of many boxes
    fetched as whole X rows need fewer scans than Morton cubes, same blocks, same order."""
    grid = real_source.info().scale(0).grid
    end = 1 << sum(int(math.ceil(math.log2(g))) for g in grid)
    got = {}
    for shape in ("cube", "rows"):
        fake.block_scans = 0
        c = _client(fake, box_bits=12, box_shape=shape)
        got[shape] = (_all(c, 0, 0, end), fake.block_scans)
    assert got["rows"][0].equals(got["cube"][0]) and got["rows"][0].equals(real_source.tables[0])
    assert got["rows"][1] * 2 <= got["cube"][1], (got["rows"][1], got["cube"][1])


def test_spec_gives_the_shards_grid(fake, real_source, tmp_path, caplog):
    """spec= plans on the neuroglancer spec's grid (what export-shards uses), not DVID's
    extents: the Morton codes then follow that grid, and the source says which it used."""
    import json as _json

    spec = tmp_path / "spec.json"
    spec.write_text(_json.dumps({"scales": [
        {"size": [2100, 2048, 2048], "chunk_sizes": [[64, 64, 64]]},
        {"size": [1050, 1024, 1024], "chunk_sizes": [[64, 64, 64]]}]}))
    plain = _client(fake)
    with caplog.at_level("INFO", logger="dvidetl.sources.dvid_http"):
        c = _client(fake, spec=str(spec))
    assert "neuroglancer spec" in caplog.text
    assert plain.info().scale(0).grid == (32, 32, 32)
    assert c.info().scale(0).grid == (33, 32, 32) and c.info().scale(1).grid == (17, 16, 16)
    end = c.info().scale(0).morton_end
    t = _all(c, 0, 0, end)
    ref = _all(plain, 0, 0, plain.info().scale(0).morton_end)
    assert t.num_rows == ref.num_rows
    want = morton_encode(t["x"].to_numpy(), t["y"].to_numpy(), t["z"].to_numpy(), (33, 32, 32))
    assert np.array_equal(t["morton"].to_numpy(), want)
    # the spec's grid needs one more x bit: its code space (and its plan's cells) doubles
    assert c.info().scale(0).morton_end == 2 * plain.info().scale(0).morton_end
