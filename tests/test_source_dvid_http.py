"""dvid+http:// source against FakeDvid (a real HTTP server on 127.0.0.1) serving real DVID bytes
— only for what the real DVID server cannot be made to do or report.

Everything a real DVID can show is tested against it in ``test_dvid_real.py``. What stays
here: faults (an error text DVID appends to a streamed 200, a body cut mid-stream, a
response held back, ``/listlabels`` ending in DVID's 32-zero-byte error marker, a mapping
pair for supervoxel 0), older DVIDs (``/mappings`` as text, no ``/existing-labels``,
LabelIndex protobufs stored with label 0), a recorded real stream replayed byte for byte,
and what only a model can measure (requests in flight at the server, Badger range scans).
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np
import pyarrow as pa
import pytest
import zstandard

import dvidetl.sources.dvid_http as dh
from dvidetl.codec import block_labels, decode_block
from dvidetl.codec.labelindex import encode_label_index
from dvidetl.geometry import ScaleInfo, VolumeInfo, morton_encode
from dvidetl.sources import open_source
from dvidetl.sources._dvid_transport import DvidHttpError
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA, INDICES_SCHEMA, MAPPING_SCHEMA
from dvidetl.sources.dvid_http import DvidHttpSource
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
    from dvidetl.sources._dvid_parse import parse_mappings
    from dvidetl.sources._dvid_transport import _StreamError

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


def _index_requests(fake) -> int:
    return sum("indices-compressed" in r for r in fake.requests)


def test_an_older_dvid_without_existing_labels(fake, real_source, monkeypatch):
    """A DVID without ``/existing-labels`` (older than the endpoint; the real one has it):
    ``labels=auto`` falls back to paged ``/listlabels`` after one 400, listing once for every
    range and count, and reads exactly the source's indices, ``index_batch`` per request."""
    monkeypatch.setattr(dh, "LISTLABELS_PAGE", 37)
    fake.existing_labels = False
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
    pages = [r for r in listing if "listlabels" in r]
    assert len(pages) == math.ceil((len(labels) + 1) / 37)
    assert sum("existing-labels" in r for r in listing) == 1  # the one 400
    assert _index_requests(fake) == requests


def test_listlabels_error_is_detected(fake, monkeypatch):
    monkeypatch.setattr(dh, "LISTLABELS_PAGE", 37)
    fake.listlabels_error_first = -1
    c = _client(fake, labels="listlabels", retries=1)
    with pytest.raises(DvidHttpError, match="listlabels.*32 zero bytes"):
        list(c.read_indices(0, 2**64))


def test_indices_requests_in_flight(fake, real_source):
    """index_parallel=4 keeps four /indices-compressed requests at DVID at once (and the
    labels still arrive in order); index_parallel=1 one at a time. (Measured at the server,
    which only the model can report.)"""
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


def test_error_text_length_is_detectable():
    # the injected text must not happen to be whole 16-byte mapping pairs
    assert len(ERROR_TEXT) % 16


def test_row_boxes_halve_dvid_range_scans(fake, real_source):
    """DVID reads a /blocks box with one range scan per (y, z) row: ranges of many boxes
    fetched as whole X rows need fewer scans than Morton cubes, same blocks, same order.
    (The scans are counted by the model; both shapes are checked against the real DVID's
    blocks in test_dvid_real.py.)"""
    grid = real_source.info().scale(0).grid
    end = 1 << sum(int(math.ceil(math.log2(g))) for g in grid)
    got = {}
    for shape in ("cube", "rows"):
        fake.block_scans = 0
        c = _client(fake, box_bits=12, box_shape=shape)
        got[shape] = (_all(c, 0, 0, end), fake.block_scans)
    assert got["rows"][0].equals(got["cube"][0]) and got["rows"][0].equals(real_source.tables[0])
    assert got["rows"][1] * 2 <= got["cube"][1], (got["rows"][1], got["cube"][1])


