"""The ``dvid+http://`` source against the real DVID server (``../shared/dvid/bin/dvid``).

Everything here is compared with DVID's own answers — ``GET /blocks`` read by a plain Python
loop, ``/mappings``, ``/index/LABEL``, ``/listlabels?sizes=true``, ``/existing-labels``,
DVID's resolution of ``PREFIX:BRANCH`` and its lock flags — never only with dvidetl's own
decoder. The data went in the way DVID users load it (``dvid_server.py``): real mCNS blocks
with ``POST /blocks?downres=true``, a raw volume with ``POST /raw``, edits with ``/merge``,
``/cleave``, ``/renumber``, ``/split-supervoxel``, versions with commit/branch/newversion.
What a real server cannot be made to do (a cut stream, appended error text, an old DVID's
formats) stays in ``test_source_dvid_http.py`` against ``fake_dvid``.
"""

from __future__ import annotations

import gzip
import json
import math
import urllib.parse

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dvidetl.sources._dvid_transport as dt
import dvidetl.sources.dvid_http as dh
from dvidetl.codec.labelindex import decode_label_index
from dvidetl.errors import UserError
from dvidetl.geometry import morton_encode
from dvidetl.sources import open_source
from dvidetl.sources.base import BLOCKS_WIRE_SCHEMA, INDICES_SCHEMA, MAPPING_SCHEMA
from dvidetl.testing.dvid_server import DvidRequestError, hs256_jwt, shard_spec

SPEC = "dvid/mcns-ng-specs.json"


def url(server, uuid: str, name: str, **kw) -> str:
    q = urllib.parse.urlencode({"uuid": uuid, "instance": name, "backoff": 0.01, **kw}, safe=":~,/")
    return f"dvid+http://{server.host}?{q}"


def source(ns, uuid: str | None = None, **kw):
    return open_source(url(ns.server, uuid or ns.uuid, ns.name, **kw))


def read_all(src, scale: int, lo: int = 0, hi: int | None = None) -> pa.Table:
    hi = src.info().scale(scale).morton_end if hi is None else hi
    batches = list(src.read_blocks(scale, lo, hi))
    assert all(b.schema.equals(BLOCKS_WIRE_SCHEMA) for b in batches)
    return pa.Table.from_batches(batches, schema=BLOCKS_WIRE_SCHEMA)


def dvid_blocks(server, uuid: str, name: str, scale: int) -> dict:
    """DVID's GET /blocks of everything at ``scale`` (the fixture's plain Python reader)."""
    return server.blocks(uuid, name, scale, (0, 0, 0), (64, 64, 64))


def as_dict(t: pa.Table) -> dict:
    """Exported / served blocks as {(x, y, z): raw DVID block bytes}."""
    return {(x, y, z): gzip.decompress(d) for x, y, z, d in zip(
        *(t[c].to_pylist() for c in ("x", "y", "z", "data")), strict=True)}


def dvid_index_rows(server, uuid: str, name: str, label: int) -> set:
    """DVID's ``GET /index/LABEL`` as {(supervoxel, x, y, z, voxels)}: the protobuf parsed with
    the protobuf library's map message, block keys decoded here (DVID packs x, y, z in 21
    bits each, z highest)."""
    msg = decode_label_index(server.get(server.node(uuid, name, f"index/{label}")))
    out = set()
    for key, svc in msg.blocks.items():
        x, y, z = (((key >> s) & 0x1FFFFF) for s in (0, 21, 42))
        x, y, z = (v - (1 << 21) if v >= 1 << 20 else v for v in (x, y, z))
        out |= {(sv, x, y, z, n) for sv, n in svc.counts.items()}
    return out


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("shape", ["rows", "cube"])
def test_blocks_equal_dvids(dvid_mcns, shape):
    """Every scale DVID holds (scales 1, 2 computed by DVID itself), through both box shapes
    and many small requests: the same blocks, byte for byte, as DVID's GET /blocks."""
    src = source(dvid_mcns, box_bits=3, box_shape=shape)
    assert [s.scale for s in src.info().scales] == [0, 1, 2]
    for scale in (0, 1, 2):
        t = read_all(src, scale)
        want = dvid_blocks(dvid_mcns.server, dvid_mcns.uuid, dvid_mcns.name, scale)
        assert t.num_rows == len(want) > 0
        assert as_dict(t) == want
        m = t["morton"].to_numpy()
        assert np.all(m[1:] > m[:-1])  # Morton order, each block once
        assert np.array_equal(m, morton_encode(t["x"].to_numpy(), t["y"].to_numpy(),
                                               t["z"].to_numpy(), src.info().scale(scale).grid))
    src.close()


@pytest.fixture(scope="module")
def mcns_s0(dvid_mcns):
    src = source(dvid_mcns)
    yield src, read_all(src, 0)
    src.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 1 << 15), st.integers(1, 1 << 13), st.sampled_from([0, 4, 12]))
def test_random_ranges(dvid_mcns, mcns_s0, lo, n, box_bits):
    """Any Morton range reads exactly DVID's blocks of that range (requests clipped to the
    extents, merged back into Morton order)."""
    _, whole = mcns_s0
    src = source(dvid_mcns, box_bits=box_bits)
    m = whole["morton"].to_numpy()
    got = read_all(src, 0, lo, lo + n)
    assert got.equals(whole.filter(pa.array((m >= lo) & (m < lo + n))))
    src.close()


def test_counts_bound_dvids_blocks(dvid_mcns, mcns_s0):
    """count() answers upper bounds (DVID cannot count): every cell holding blocks is listed
    with at least its blocks, and the bounds add up to the block slots of DVID's extents."""
    src, whole = mcns_s0
    info = dvid_mcns.server.get_json(
        dvid_mcns.server.node(dvid_mcns.uuid, dvid_mcns.name, "info"))["Extents"]
    lo_b = [v // 64 for v in info["MinPoint"]]
    hi_b = [v // 64 + 1 for v in info["MaxPoint"]]
    slots = math.prod(h - lo for lo, h in zip(lo_b, hi_b, strict=True))
    m = whole["morton"].to_numpy()
    for bits in (0, 3, 7, 12, 30):
        cells, counts, exact = src.count(0, bits)
        assert exact is False and int(counts.sum()) == slots
        tc, tn = np.unique(m >> np.uint64(bits), return_counts=True)
        pos = np.searchsorted(cells, tc)
        assert np.all(cells[pos] == tc) and np.all(counts[pos] >= tn)


def test_extents_override(dvid_mcns, mcns_s0):
    """minpoint=/maxpoint= (DVID's extents are hints) narrow what is read: exactly DVID's
    blocks inside them."""
    _, whole = mcns_s0
    x, y = whole["x"].to_numpy(), whole["y"].to_numpy()
    src = source(dvid_mcns, minpoint="1536,0,0", maxpoint="1791,1983,2047")  # x 24..27, y < 31
    assert int(src.count(0, 40)[1].sum()) == 4 * 31 * 32  # the override, not DVID's extents
    got = read_all(src, 0)
    want = whole.filter(pa.array((x >= 24) & (x < 28) & (y < 31)))
    assert want.num_rows > 0
    assert as_dict(got) == as_dict(want)
    with pytest.raises(UserError, match="maxpoint"):
        source(dvid_mcns, maxpoint="1,2")


def test_negative_extents_are_refused(dvid_server):
    """DVID takes blocks at negative coordinates; Morton codes cannot: refused, with why."""
    u = dvid_server.new_repo("negative")
    dvid_server.new_labelmap(u, "seg", max_downres=0)
    block = np.full((64, 64, 64), 7, np.uint64)
    dvid_server.post_raw(u, "seg", block, offset=(-64, 0, 0), downres=False)
    with pytest.raises(dt.DvidHttpError, match="negative coordinates"):
        open_source(url(dvid_server, u, "seg"))


# --------------------------------------------------------------------------- mapping, indices
def vsource(v, uuid: str, **kw):
    return open_source(url(v.server, uuid, v.name, **kw))


@pytest.mark.parametrize("node", ["root", "dev"])
def test_mapping_equals_dvids(dvid_versions, node):
    """The mapping of a node, after DVID's own edits, is DVID's ``/mappings`` pair for pair —
    including the ``BODY 0`` rows /cleave, /renumber and /split-supervoxel leave (an id
    retired or reserved as a body: docs/dvid-source.md)."""
    v = dvid_versions
    uuid = getattr(v, node)
    src = vsource(v, uuid)
    got = pa.Table.from_batches(list(src.read_mapping()), schema=MAPPING_SCHEMA)
    want = {int(a): int(b) for a, b in v.server.mappings(uuid, v.name).tolist()}
    assert dict(zip(got["supervoxel"].to_pylist(), got["body"].to_pylist(), strict=True)) == want
    assert got["supervoxel"].to_pylist() == sorted(want)
    if node == "dev":  # what DVID's edits made of it
        assert want[13] == v.cleaved and want[v.cleaved] == 0 and want[111] == 1111
        assert want[1111] == 0 and want[v.split] == want[v.remain] == 16 and want[16] == 0
    svs = np.array(sorted(want) + [1, 17, 2**63], np.uint64)
    assert src.map_supervoxels(svs).tolist() == [want.get(int(s), int(s)) for s in svs]
    src.close()


@pytest.mark.parametrize("labels", ["existing", "listlabels"])
@pytest.mark.parametrize("node", ["root", "dev"])
def test_indices_equal_dvids(dvid_versions, node, labels, monkeypatch):
    """Every label index, listed either way (``/existing-labels`` keys only, or paged
    ``/listlabels``), equals DVID's ``GET /index/LABEL``, and adds up to DVID's
    ``/listlabels?sizes=true``."""
    monkeypatch.setattr(dh, "LISTLABELS_PAGE", 3)  # several pages
    from dvidetl.codec.labelindex import label_index_table

    v = dvid_versions
    uuid = getattr(v, node)
    src = vsource(v, uuid, labels=labels, index_batch=4)
    existing = json.loads(v.server.get(v.server.node(uuid, v.name, "existing-labels")))
    sizes = dict(map(tuple, v.server.label_sizes(uuid, v.name).tolist()))
    sent = src.http.sent
    assert src.label_list().tolist() == sorted(existing) == sorted(sizes)
    pages = 1 if labels == "existing" else math.ceil((len(existing) + 1) / 3)
    assert src.http.sent - sent == pages  # listed once, for every range and count after
    sent = src.http.sent
    got = pa.Table.from_batches(list(src.read_indices(0, 2**64)), schema=INDICES_SCHEMA)
    assert got["label"].to_pylist() == sorted(existing)
    assert src.http.sent - sent == math.ceil(len(existing) / 4) == int(src.count_requests(
        "indices", 0, np.array([0]), np.array([2**64 - 1]))[0])
    rows = label_index_table(got["label"], got["data"])
    for lab in existing:
        mine = rows.filter(pa.compute.equal(rows["label"], lab))
        mine_set = set(zip(*(mine[c].to_pylist() for c in ("supervoxel", "x", "y", "z", "voxels")),
                           strict=True))
        assert mine_set == dvid_index_rows(v.server, uuid, v.name, lab), lab
        assert sum(mine["voxels"].to_pylist()) == sizes[lab], lab
    kc = src.count_keys("indices", 0)
    assert kc.cells.tolist() == sorted(existing) and kc.exact is False
    src.close()


# --------------------------------------------------------------------------- versions (items 1, 2)
def test_uuid_names_resolve_to_dvids_node(dvid_versions):
    """A prefix, ``PREFIX:BRANCH`` and ``PREFIX:BRANCH~N`` are resolved once, to the node DVID
    itself resolves them to (issue 23 items 1-2): ``R:master`` is the unlocked master leaf,
    not the locked ``R``; the lock reported is that node's (DVID's own flag for the name)."""
    v = dvid_versions
    r = v.root[:6]
    cases = {r: v.root, v.root: v.root, f"{r}:master": v.master, f"{r}:dev": v.dev_leaf,
             f"{r}:dev~1": v.dev, f"{r}:master~1": v.root, f"{v.dev[:7]}": v.dev}
    for name, want in cases.items():
        src = vsource(v, name)
        assert src.uuid == want, name
        assert src.locked is v.server.locked(want) is v.server.locked(name), name
        info = src.info()
        assert (info.uuid, info.locked, info.requested_uuid) == (want, src.locked, name)
        # the data is that node's: DVID's /mappings for the name DVID resolves itself
        got = pa.Table.from_batches(list(src.read_mapping()), schema=MAPPING_SCHEMA)
        assert dict(zip(got["supervoxel"].to_pylist(), got["body"].to_pylist(), strict=True)) \
            == {int(a): int(b) for a, b in v.server.mappings(name, v.name).tolist()}, name
        src.close()


@pytest.mark.parametrize("name, why", [
    ("zzzz9", "could not find UUID"),
    ("{r}:nope", "branch .nope. not found"),
    (":master", "more than one repo"),
    ("{r}:dev~9", "out of range"),
    ("{r}:dev~x", "parse parent|number of parents"),
    ("{r}:a:b", "one ':'"),
])
def test_bad_uuid_names(dvid_versions, dvid_mcns, name, why):
    """Names DVID (or its DAG) cannot resolve fail at once, one line naming uuid= and why
    (``:master`` needs a server with one repo; this one has two)."""
    with pytest.raises(UserError, match=why) as e:
        vsource(dvid_versions, name.format(r=dvid_versions.root[:6]))
    assert "uuid=" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- plan, run, verify
def cli(argv: list[str]) -> int:
    from dvidetl.cli import main

    return main(argv)


def export_equals_dvid(sink: str, v, uuid: str) -> None:
    """The export of ``uuid`` holds exactly DVID's answers at that node: every block of every
    scale byte for byte (GET /blocks) and voxel for voxel, as supervoxels and as bodies (GET
    /raw, DVID's own decoding and mapping), the mapping (GET /mappings), every label's index
    rows (GET /index/LABEL) — and nothing else."""
    from dvidetl.read import open_export

    ex = open_export(sink, uuid=uuid, instance=v.name)
    for scale in (0, 1):
        want = dvid_blocks(v.server, uuid, v.name, scale)
        rows = ex.read("blocks", scale=scale, columns=["x", "y", "z"])
        have = set(zip(*(rows[c].to_pylist() for c in ("x", "y", "z")), strict=True))
        assert have == set(want) and len(want) == rows.num_rows > 0
        for (x, y, z), raw in want.items():
            assert ex.raw_block(scale, x, y, z) == raw, (scale, x, y, z)
            # voxels as DVID itself decodes and maps them (GET /raw), supervoxels and bodies
            for svs in (True, False):
                vox = v.server.get(v.server.node(uuid, v.name, f"raw/0_1_2/64_64_64/"
                                                 f"{x * 64}_{y * 64}_{z * 64}"), scale=str(scale),
                                   **({"supervoxels": "true"} if svs else {}))
                dvid_vox = np.frombuffer(vox, "<u8").reshape(64, 64, 64)
                assert np.array_equal(ex.block(scale, x, y, z, bodies=not svs), dvid_vox), \
                    (scale, x, y, z, svs)
    m = ex.read("mapping")
    assert dict(zip(m["supervoxel"].to_pylist(), m["body"].to_pylist(), strict=True)) == {
        int(a): int(b) for a, b in v.server.mappings(uuid, v.name).tolist()}
    li = ex.read("label_index")
    existing = json.loads(v.server.get(v.server.node(uuid, v.name, "existing-labels")))
    assert sorted(set(li["label"].to_pylist())) == sorted(existing)
    for lab in existing:
        mine = li.filter(pa.compute.equal(li["label"], lab))
        assert set(zip(*(mine[c].to_pylist() for c in ("supervoxel", "x", "y", "z", "voxels")),
                       strict=True)) == dvid_index_rows(v.server, uuid, v.name, lab), lab


def run_json(sink_dir, instance: str, uuid: str) -> dict:
    runs = sorted((sink_dir / instance / uuid / "runs").glob("*/run.json"))
    assert len(runs) == 1, runs
    return json.loads(runs[0].read_text())


def test_branch_leaf_lock_is_checked_on_the_leaf(dvid_versions, cluster, tmp_path, capsys):
    """Issue 23 item 1: ``ROOT:master`` is the unlocked master leaf, so ``run`` refuses it
    (exit 2, naming that node and how to fix it) although ``ROOT`` is locked; with
    ``--allow-unlocked`` it exports the leaf's data, named by the leaf's full UUID, with
    what was asked for recorded beside it."""
    v = dvid_versions
    name = f"{v.root[:6]}:master"
    base = ["--uuid", name, "--source", url(v.server, name, v.name)]
    assert cli(["plan", *base]) == 0
    err = capsys.readouterr().err
    assert f"source: {v.name}@{v.master} (asked for as {name}), NOT locked" in err
    sink = f"parquet://{tmp_path}/out"
    rc = cli(["run", *base, "--sink", sink, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"DVID node {v.master} is not locked" in err and "--allow-unlocked" in err
    assert "Traceback" not in err
    assert cli(["run", *base, "--sink", sink, "--allow-unlocked", "--quiet",
                "--cluster", cluster.scheduler_address]) == 0
    export_equals_dvid(sink, v, v.master)  # the leaf's data: 15 merged into 14
    rec = run_json(tmp_path / "out", v.name, v.master)
    assert (rec["uuid"], rec["uuid_resolved"], rec["uuid_requested"]) == (v.master, v.master, name)
    assert rec["volume"]["requested_uuid"] == name and rec["volume"]["locked"] is False


def test_prefix_and_full_uuid_name_one_export(dvid_versions, cluster, tmp_path, capsys):
    """Issue 23 item 2: an export made with a UUID prefix is named by the full UUID, so the
    full UUID finds it (verify exit 0), and the run records both names."""
    v = dvid_versions
    prefix = v.root[:5]
    sink = f"parquet://{tmp_path}/out"
    sched = ["--cluster", cluster.scheduler_address]
    assert cli(["run", "--uuid", prefix, "--source", url(v.server, prefix, v.name), "--sink", sink,
                "--quiet", *sched]) == 0
    assert [p.name for p in (tmp_path / "out" / v.name).iterdir()] == [v.root]
    rec = run_json(tmp_path / "out", v.name, v.root)
    assert (rec["uuid"], rec["uuid_resolved"], rec["uuid_requested"]) == (v.root, v.root, prefix)
    capsys.readouterr()
    assert cli(["verify", "--uuid", v.root, "--source", url(v.server, v.root, v.name),
                "--sink", sink, *sched]) == 0
    assert cli(["verify", "--uuid", v.root[:8], "--source", url(v.server, prefix, v.name),
                "--sink", sink, "--in-process"]) == 0
    # a --uuid naming another node than the source serves is refused, naming both
    rc = cli(["plan", "--uuid", v.dev[:6], "--source", url(v.server, prefix, v.name)])
    err = capsys.readouterr().err
    assert rc == 2 and f"serving '{v.root}', asked for as '{prefix}'" in err


def test_serve_flight_run_verify_versions(dvid_versions, cluster, tmp_path, capsys):
    """serve + --flight, as operators run it, for two locked versions with DVID's edits
    between them (the root, and the dev node after /cleave, /renumber, /split-supervoxel):
    plan, run and verify, and each export equals DVID's answers at its node."""
    import subprocess
    import sys

    v = dvid_versions
    sink = f"parquet://{tmp_path}/out"
    for node in (v.root, v.dev):
        p = subprocess.Popen([sys.executable, "-m", "dvidetl", "serve", "--port", "0", "--source",
                              url(v.server, node[:8], v.name)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            loc = p.stdout.readline().strip()
            assert loc.startswith("grpc://"), p.stderr.read() if p.poll() is not None else loc
            base = ["--uuid", node[:8], "--flight", loc]
            assert cli(["plan", *base]) == 0
            out = capsys.readouterr()
            assert f"@{node} (asked for as {node[:8]}), locked" in out.err
            assert "requests to the source" in out.out + out.err  # across Flight: the exchange
            assert cli(["run", *base, "--sink", sink, "--quiet", "--partition-blocks", "4",
                        "--cluster", cluster.scheduler_address]) == 0
            assert cli(["verify", *base, "--sink", sink, "--cluster",
                        cluster.scheduler_address]) == 0
        finally:
            p.terminate()
            p.wait(30)
        export_equals_dvid(sink, v, node)
    # the two versions differ where DVID's edits say, and both exports are kept
    from dvidetl.read import open_export

    root = open_export(sink, uuid=v.root, instance=v.name)
    dev = open_export(sink, uuid=v.dev, instance=v.name)
    assert root.bodies_of([13, 111]).tolist() == [11, 111]
    assert dev.bodies_of([13, 111]).tolist() == [v.cleaved, 1111]


# --------------------------------------------------------------------------- auth (item 3)
@pytest.fixture()
def no_token(monkeypatch):
    monkeypatch.delenv(dt.DVID_TOKEN_ENV, raising=False)
    monkeypatch.delenv(dt.DVID_TOKEN_FILE_ENV, raising=False)
    return monkeypatch


def test_auth_token_good_missing_wrong(dvid_auth, no_token, tmp_path, caplog):
    """A DVID enforcing tokens: a good one (env or file) reads DVID's data; none, or one DVID
    refuses (its answer, 400 "error parsing JWT: signature is invalid", says neither "auth"
    nor "token"), is a `DvidAuthError` saying which and how to fix it; the token is in no
    message, log or URL."""
    v = dvid_auth
    good = v.server.token()
    bad = hs256_jwt({"user": "someone"}, "not-this-servers-secret")
    with pytest.raises(dt.DvidAuthError, match="DVID requires a token") as e:
        vsource(v, v.root)
    assert dt.DVID_TOKEN_ENV in str(e.value) and dt.DVID_TOKEN_FILE_ENV in str(e.value)
    no_token.setenv(dt.DVID_TOKEN_ENV, bad)
    with pytest.raises(dt.DvidAuthError, match=f"DVID refused the token from {dt.DVID_TOKEN_ENV}") \
            as e:
        vsource(v, v.root)
    assert "signature is invalid" in str(e.value) and bad not in str(e.value)
    no_token.setenv(dt.DVID_TOKEN_ENV, good)
    with caplog.at_level("DEBUG"):
        src = vsource(v, v.root, box_bits=2)
        assert as_dict(read_all(src, 0)) == dvid_blocks(v.server, v.root, v.name, 0)
        src.close()
    no_token.delenv(dt.DVID_TOKEN_ENV)
    f = tmp_path / "tok"
    f.write_text(bad + "\n")
    with pytest.raises(dt.DvidAuthError, match=f"refused the token from token_file={f}"):
        vsource(v, v.root, token_file=str(f))
    f.write_text(good + "\n")
    src = vsource(v, v.root, token_file=str(f))
    assert src.label_list().size > 0
    src.close()
    assert all(good not in r.getMessage() and bad not in r.getMessage() for r in caplog.records)


def test_branch_of_the_only_repo_and_auth_through_the_cli(dvid_auth, no_token, capsys):
    """``:master`` (the branch of the server's only repo) is a version name the whole way
    through — source, Flight tickets, plan (it failed as "not a version UUID") — and a
    refused token is one line saying so (exit 2)."""
    v = dvid_auth
    no_token.setenv(dt.DVID_TOKEN_ENV, v.server.token())
    base = ["--uuid", ":master", "--source", url(v.server, ":master", v.name)]
    assert cli(["plan", *base]) == 0
    captured = capsys.readouterr()
    assert f"@{v.master} (asked for as :master), NOT locked" in captured.err
    assert "total:" in captured.out
    assert cli(["plan", "--uuid", ":dev~1", "--source", url(v.server, ":dev~1", v.name)]) == 0
    assert f"@{v.dev} (asked for as :dev~1), locked" in capsys.readouterr().err
    no_token.setenv(dt.DVID_TOKEN_ENV, hs256_jwt({"user": "x"}, "wrong"))
    assert cli(["plan", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DVID refused the token" in err[0] and "Traceback" not in err[0]


# --------------------------------------------------------------------------- throttle (item 4)
def test_throttle_set_through_the_admin_api(dvid_mcns, mcns_s0):
    """``throttle=true`` against DVID's real throttle, set as the docs say (the admin API, which
    refuses the setting without ``?admintoken=``): one request in flight by default, exact;
    more in flight than DVID admits gets real 503s, waited out without spending a retry
    (``retries=0``); DVID counting as down after ``patience`` says how to admit more."""
    d = dvid_mcns.server
    _, whole = mcns_s0
    with pytest.raises(DvidRequestError) as e:
        d.post("/api/server/settings", {"throttle": "4"})
    assert e.value.status == 400 and "admin" in e.value.text

    def throttled(**kw):
        return source(dvid_mcns, throttle="true", parallel=4, box_bits=3, retries=0, **kw)

    try:
        d.set_throttle(1)  # DVID's default, set explicitly
        src = throttled()  # inflight=1: what DVID admits, so 503s only from races, rare
        assert read_all(src, 0).equals(whole)
        assert src.http.throttled <= src.http.sent // 10, (src.http.throttled, src.http.sent)
        src.close()
        seen = 0
        for _ in range(30):  # until DVID has answered 503 at least once
            src = throttled(inflight=4)
            assert read_all(src, 0).equals(whole)
            seen = src.http.throttled
            src.close()
            if seen:
                break
        assert seen > 0
        msg = ""
        for _ in range(30):
            src = throttled(inflight=4)
            src.http.patience = 0.0  # the first 503 is one too many
            try:
                read_all(src, 0)
            except dt.DvidUnavailable as exc:
                msg = str(exc)
                break
            finally:
                src.close()
        assert "503 (throttled)" in msg and "admintoken" in msg and "inflight=" in msg
        d.set_throttle(4)
        src = throttled(inflight=4)
        assert read_all(src, 0).equals(whole)
        src.close()
    finally:
        d.set_throttle(1)


# --------------------------------------------------------------------------- index_batch (item 5)
def test_index_batch_is_capped_at_dvids_limit(dvid_versions):
    """DVID answers at most 50,000 labels per /indices-compressed (400 above, not retried):
    ``index_batch`` above that is refused when the URL is opened (it was accepted, then every
    indices partition failed), and requests of exactly 50,000 labels are what DVID serves."""
    v = dvid_versions
    path = v.server.node(v.root, v.name, "indices-compressed")
    with pytest.raises(DvidRequestError) as e:
        v.server.request("GET", path, json.dumps(list(range(1, 50_002))).encode())
    assert e.value.status == 400 and "50,000" in e.value.text
    with pytest.raises(UserError, match="at most 50,000") as e:
        vsource(v, v.root, index_batch=50_001)
    assert "index_batch=50000" in str(e.value)
    with pytest.raises(UserError, match="50,000"):
        dh.DvidHttpSource(v.server.url.split("//")[1].split(":")[0], v.server.http_port,
                          uuid=v.root, instance=v.name, index_batch=60_000)
    src = vsource(v, v.root, index_batch=50_000)
    real = src.label_list()
    # 50,001 labels to read: the real ones among ids DVID has no index for -> 2 requests
    src._labels = np.union1d(real, np.arange(50_001 - real.size, dtype=np.uint64) * 7 + 10**6)
    assert src._labels.size == 50_001
    got = pa.Table.from_batches(list(src.read_indices(0, 2**64)), schema=INDICES_SCHEMA)
    assert got["label"].to_pylist() == real.tolist()
    for lab, data in zip(got["label"].to_pylist(), got["data"].to_pylist(), strict=True):
        assert decode_label_index(data) == decode_label_index(
            v.server.get(v.server.node(v.root, v.name, f"index/{lab}")))
    src.close()


# --------------------------------------------------------------------------- spec= (item 7)
def extent_slots(server, uuid: str, name: str, scales: int) -> list[int]:
    """Block slots DVID's extents cover at each scale (what may be read, at most)."""
    ext = server.get_json(server.node(uuid, name, "info"))["Extents"]
    out = []
    for s in range(scales):
        lo = [v // (64 << s) for v in ext["MinPoint"]]
        hi = [v // (64 << s) + 1 for v in ext["MaxPoint"]]
        out.append(math.prod(h - a for a, h in zip(lo, hi, strict=True)))
    return out


def test_spec_plans_only_where_dvid_has_data(dvid_mcns, shared_data, capsys):
    """Issue 23 item 7: with the mCNS spec (a 1471 x 1224 x 2103 grid at scale 0) the plan
    covers DVID's extents only — a few hundred block slots, not ~1.5e9 — on the spec's Morton
    codes; ``plan`` shows the requests a run will send, and reading the plan sends exactly
    those (none over empty space) and gets DVID's blocks."""
    from dvidetl.export.planning import make_plan

    d = dvid_mcns
    spec = str(shared_data / SPEC)
    src = source(d, spec=spec, box_bits=4)
    info = src.info()
    assert info.scale(0).grid == (1471, 1224, 2103) and info.scale(2).grid == (368, 306, 526)
    slots = extent_slots(d.server, d.uuid, d.name, 3)
    assert [int(src.count(s, 40)[1].sum()) for s in range(3)] == slots
    parts = make_plan(info, src.count, None, 32, indices=False, mapping=False)
    assert sum(p.blocks for p in parts) == sum(slots) < 600
    planned = {s: src.count_requests("blocks", s, np.array([p.lo for p in parts if p.scale == s]),
                                     np.array([p.hi for p in parts if p.scale == s]))
               for s in range(3)}
    before = src.http.sent
    for s in range(3):
        got = pa.concat_tables([read_all(src, s, p.lo, p.hi) for p in parts if p.scale == s])
        want = dvid_blocks(d.server, d.uuid, d.name, s)
        assert as_dict(got) == want and got.num_rows == len(want)
        assert np.array_equal(got["morton"].to_numpy(), morton_encode(
            got["x"].to_numpy(), got["y"].to_numpy(), got["z"].to_numpy(), info.scale(s).grid))
    assert src.http.sent - before == sum(int(r.sum()) for r in planned.values()) < 200
    src.close()
    # the plan command shows it, as the run would send it
    u = url(d.server, d.uuid, d.name, spec=spec, box_bits=4)
    assert cli(["plan", "--uuid", d.uuid, "--source", u, "--partition-blocks", "32"]) == 0
    out = capsys.readouterr()
    total = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("total:")][0]
    n = int(total.split(" requests to the source")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert cli(["plan", "--uuid", d.uuid, "--source", u, "--partition-blocks", "32", "--json",
                "--partitions"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["requests"] == n == sum(g["requests"] for g in doc["plan"]["groups"])
    # the /blocks part is what reading the same plan sent above; then the indices requests
    groups = doc["plan"]["groups"]
    assert sum(g["requests"] for g in groups if g["kind"] == "blocks") == sum(
        int(r.sum()) for r in planned.values())
    labels = np.array(json.loads(d.server.get(d.server.node(d.uuid, d.name, "existing-labels"))))
    assert [g["requests"] for g in groups if g["kind"] == "indices"] == [sum(
        math.ceil(int(((labels >= p["lo"]) & (labels < p["hi"])).sum()) / dh.INDICES_PER_REQUEST)
        for p in doc["plan"]["list"] if p["kind"] == "indices")]
    assert not [g for g in groups if g["kind"] == "mapping"]  # DVID's mapping is empty here
    # maxpoint= narrows the spec's box too (it was ignored with spec=)
    src = source(d, spec=spec, maxpoint="1791,2047,2047")  # x < 28
    assert int(src.count(0, 40)[1].sum()) == (28 - 19) * 3 * 11
    src.close()


@pytest.mark.parametrize("shape", ["rows", "cube"])
@pytest.mark.parametrize("box_bits", [0, 3, 7, 12])
def test_request_count_is_what_read_blocks_sends(dvid_mcns, shared_data, shape, box_bits):
    """The vectorized request count equals the boxes ``read_blocks`` requests, for any
    ranges (aligned or not, inside or outside the extents), on DVID's grid and the spec's."""
    rng = np.random.default_rng(box_bits)
    for kw in ({}, {"spec": str(shared_data / SPEC)}):
        src = source(dvid_mcns, box_shape=shape, box_bits=box_bits, **kw)
        for s in (0, 1):
            end = src.info().scale(s).morton_end
            lo = rng.integers(0, end, 60, dtype=np.uint64)
            longest = 1 << min(16, box_bits + 9)  # the reference enumerates every box
            n = np.minimum(rng.integers(1, longest, 60, dtype=np.uint64), np.uint64(end) - lo)
            cells = src.count(s, 12)[0] << np.uint64(12)  # ranges where the data is, too
            lo = np.concatenate([lo, cells, cells + np.uint64(5)])
            hi = lo + np.concatenate([n, np.full(cells.size, 1 << 12, np.uint64),
                                      np.full(cells.size, 3000, np.uint64)])
            got = src.count_requests("blocks", s, lo, hi)
            want = [sum(len(g[2]) for g in src._boxes(s, int(a), int(b)))
                    for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
            assert got.tolist() == want
        src.close()


# --------------------------------------------------------------------------- more of DVID's answers
def test_info_and_errors(dvid_mcns, dvid_auth, no_token, caplog):
    """What DVID's /info says becomes the volume; DVID's own error answers (an unknown
    instance, a server with several leaves and no uuid=) are one-line errors; an unlocked
    node is warned about."""
    d = dvid_mcns
    with caplog.at_level("WARNING", logger="dvidetl.sources.dvid_http"):
        src = source(d)
    info = src.info()
    assert (info.uuid, info.instance, info.codec) == (d.uuid, d.name, "gzip")
    assert [s.grid for s in info.scales] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert info.has_indices and info.has_mapping and info.locked is False is src.locked
    assert any("is not locked" in r.getMessage() and d.uuid in r.getMessage()
               for r in caplog.records)
    with pytest.raises(dt.DvidHttpError, match="nope") as e:
        source(d, instance="nope")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown parameter"):
        source(d, bogus=2)
    no_token.setenv(dt.DVID_TOKEN_ENV, dvid_auth.server.token())
    with pytest.raises(UserError, match="name the version with") as e:  # no uuid=: which leaf?
        open_source(f"dvid+http://{dvid_auth.server.host}?instance={dvid_auth.name}")
    assert dvid_auth.master in str(e.value) and dvid_auth.dev_leaf in str(e.value)


def test_dvid_down_is_unavailable(dvid_mcns):
    """Nothing listening (DVID down) is a SourceUnavailable after the retries, which Flight
    answers UNAVAILABLE (workers retry) — not INVALID_ARGUMENT like a bad ticket."""
    import pyarrow.flight as flight

    from dvidetl.errors import SourceUnavailable
    from dvidetl.flight.server import _to_flight_error
    from dvidetl.testing.dvid_server import free_port

    port = free_port()
    with pytest.raises(SourceUnavailable, match="failed after 2 attempts") as e:
        open_source(f"dvid+http://127.0.0.1:{port}?uuid=abc&retries=1&backoff=0&timeout=2")
    assert isinstance(e.value, dt.DvidHttpError)
    assert isinstance(_to_flight_error(e.value, "info"), flight.FlightUnavailableError)
    assert not isinstance(_to_flight_error(UserError("bad"), "x"), flight.FlightUnavailableError)


def test_mapping_ranges_counts_and_one_request(dvid_versions):
    """Mapping ranges and counts come from the one ``/mappings`` request (cached)."""
    v = dvid_versions
    src = vsource(v, v.dev)
    want = {int(a): int(b) for a, b in v.server.mappings(v.dev, v.name).tolist()}
    svs = sorted(want)
    before = src.http.sent
    lo, hi = svs[2], svs[-2]
    got = pa.Table.from_batches(list(src.read_mapping(lo, hi)), schema=MAPPING_SCHEMA)
    assert got["supervoxel"].to_pylist() == [s for s in svs if lo <= s < hi]
    assert got["body"].to_pylist() == [want[s] for s in svs if lo <= s < hi]
    kc = src.count_keys("mapping", 4)
    assert kc.exact and int(kc.keys.sum()) == int(kc.rows.sum()) == len(svs)
    assert kc.cells.tolist() == sorted({s >> 4 for s in svs})
    src.map_supervoxels(np.array(svs, np.uint64))
    assert src.http.sent - before == 1
    assert src.count_requests("mapping", 0, np.array([5, 0]), np.array([9, 5])).tolist() == [0, 1]
    src.close()


def test_count_is_arithmetic_on_a_huge_volume(dvid_mcns):
    """A male-CNS-sized extent (maxpoint=): counting never enumerates the billions of slots,
    and the boxes read_blocks requests cover exactly the slots count() bounds."""
    src = source(dvid_mcns, maxpoint="94087,78316,134575", minpoint="0,0,0")
    grid = src.info().scale(0).grid
    assert grid == (1471, 1224, 2103)
    cells, counts, exact = src.count(0, 15)
    assert not exact and int(counts.sum()) == math.prod(grid) and counts.max() == 1 << 15
    with pytest.raises(UserError, match="coarser cells"):
        src.count(0, 0)
    cells, counts, _ = src.count(0, 27)
    for shape in ("rows", "cube"):
        src.box_shape = shape
        for cell in cells[[0, len(cells) // 2, -1]].tolist():
            lo, hi = cell << 27, (cell + 1) << 27
            groups = list(src._boxes(0, lo, hi))
            boxes = [b for g in groups for b in g[2]]
            vols = [math.prod(b[1][d] - b[0][d] for d in range(3)) for b in boxes]
            assert sum(vols) == int(counts[cells == cell][0])
            assert max(vols) <= 1 << src.box_bits
            assert all(lo <= g[0] < g[1] <= hi for g in groups)
            assert all(g1[1] <= g2[0] for g1, g2 in zip(groups, groups[1:], strict=False))
            assert src.count_requests("blocks", 0, np.array([lo]), np.array([hi]))[0] == len(boxes)
    src.close()


def test_spec_grid_equals_dvids_export_shards(dvid_mcns, tmp_path):
    """With ``spec=`` the source plans on export-shards' grid: DVID's own ``export-shards``
    files of the node (read here with pyarrow) hold the same blocks, and the ``shards://``
    source over them plans on the same grid, so both sources give the same Morton codes."""
    import pyarrow.ipc as ipc
    import zstandard

    d = dvid_mcns
    spec = shard_spec([(2100 >> s, 2048 >> s, 2048 >> s) for s in range(3)])
    out = d.server.export_shards(d.uuid, d.name, spec, tmp_path / "shards", 3)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    src = source(d, spec=str(tmp_path / "spec.json"))
    shards = open_source(f"shards://{out}?spec={tmp_path / 'spec.json'}")
    dz = zstandard.ZstdDecompressor()
    for s in range(3):
        grid = src.info().scale(s).grid
        assert grid == shards.info().scale(s).grid == tuple(-(-v // 64) for v in
                                                            spec["scales"][s]["size"])
        files = {}
        for f in sorted((out / f"s{s}").glob("*.arrow")):
            with pa.memory_map(str(f)) as mm:
                t = ipc.open_stream(mm).read_all()
            for x, y, z, b in zip(*(t[c].to_pylist() for c in ("chunk_x", "chunk_y", "chunk_z",
                                                              "dvid_compressed_block")), strict=True):
                files[(x, y, z)] = dz.decompress(b)
        got = read_all(src, s)
        assert as_dict(got) == files and len(files) > 0
        keys = np.array(sorted(files, key=lambda k: int(morton_encode(*k, grid))))
        assert np.array_equal(got["morton"].to_numpy(), np.sort(morton_encode(*keys.T, grid)))
    src.close()
    shards.close()


# --------------------------------------------------------------------------- verify (item 6)
def test_verify_tells_export_vs_source_from_source_vs_itself(dvid_server, cluster, tmp_path,
                                                              capsys):
    """Issue 23 item 6: DVID disagreeing with itself — supervoxels mapped by ``POST /mappings``
    before ``POST /raw`` brought their voxels get no label index, so DVID's /index and its
    blocks + mapping differ — is reported as "source vs itself" with exit 0 when the export
    equals DVID's answers (it exited 1, blaming the export). A real export difference in the
    same export (one label_index row dropped) is still "export vs source", exit 1."""
    import pyarrow.parquet as pq

    from dvidetl.read import open_export

    d = dvid_server
    u = d.new_repo("inconsistent")
    d.new_labelmap(u, "seg", max_downres=0)
    d.post_mappings(u, "seg", {20: [21, 22]})
    v = np.zeros((64, 64, 192), np.uint64)
    v[:, :, :40], v[:, :, 40:64], v[:, :, 64:128], v[:, :, 128:] = 21, 22, 23, 24
    d.post_raw(u, "seg", v, downres=False)
    d.wait_indexed(u, "seg", 2 * 64**3)  # 23 and 24 only: DVID never indexes 21, 22 (body 20)
    d.commit(u)
    assert json.loads(d.get(d.node(u, "seg", "existing-labels"))) == [23, 24]
    assert d.get_json(d.node(u, "seg", "label/10_10_10"))["Label"] == 20  # yet voxels say 20
    base = ["--uuid", u, "--source", url(d, u, "seg")]
    sink = f"parquet://{tmp_path}/out"
    sched = ["--cluster", cluster.scheduler_address]
    assert cli(["run", *base, "--sink", sink, "--quiet", *sched]) == 0
    ex = open_export(sink, uuid=u, instance="seg")
    li = ex.read("label_index")
    for lab in (23, 24):  # the export is DVID's /index, row for row
        mine = li.filter(pa.compute.equal(li["label"], lab))
        assert set(zip(*(mine[c].to_pylist() for c in ("supervoxel", "x", "y", "z", "voxels")),
                       strict=True)) == dvid_index_rows(d, u, "seg", lab)
    assert set(li["label"].to_pylist()) == {23, 24}
    capsys.readouterr()
    assert cli(["verify", *base, "--sink", sink, "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "OK (the export equals the source; the source disagrees with itself" in out
    assert "export vs source (0 differences)" in out and "source vs itself: in 1 label range" in out
    # the checker still blames the export for what the export got wrong
    files = sorted((tmp_path / "out" / "seg" / u / "label_index").rglob("*.parquet"))
    t = pq.read_table(files[0])
    pq.write_table(t.slice(1), files[0])
    assert cli(["verify", *base, "--sink", sink, "--in-process"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENCES FOUND" in out and "export vs source (2 differences)" in out
    assert "source vs itself" not in out
