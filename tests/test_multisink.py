"""Several sinks in one run (issue 27 item 4): ``--sink`` repeated. The source is read once
per partition and every sink commits it with its own ledger and keeps its own record of the
run; a partition one sink holds and another lacks is written only where it is missing; a
failing sink does not hold back the others; ``verify`` and ``status`` take every sink.

Real parts: an in-process Flight server over a synthetic source (its ``read_blocks`` counted,
to see the source read once), real Dask workers, the real Parquet sink, the VastDB sink
through the real ``vastdb`` SDK against the local wire-compatible server (as
``tests/test_sink_vastdb.py``), and ``flaky+parquet://`` (the fault-injecting Parquet sink of
``dvidetl.testing.faulty_sink``) for the sink that fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections import Counter
from html.parser import HTMLParser

import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.geometry import KEY_END
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.testing.env import environ
from dvidetl.testing.vastsim import start_vastsim

ACCESS, SECRET = "AKIDMULTISINK", "multi-sink-secret-5d0c"  # noqa: S105 — test keys
UUID = "ms"
SRC = f"synthetic://{UUID}?size=256,256,128&scales=2&seed=4"


class Counted:
    """The synthetic source served as it is, with each ``read_blocks(scale, lo, hi)`` call
    counted (the server calls it once per blocks partition a worker reads)."""

    def __init__(self, src):
        self.src, self.calls, self._lock = src, Counter(), threading.Lock()
        real = src.read_blocks

        def read_blocks(scale, lo, hi):
            with self._lock:
                self.calls[(int(scale), int(lo), int(hi))] += 1
            return real(scale, lo, hi)

        src.read_blocks = read_blocks  # the instance's method: what the server calls

    def take(self) -> Counter:
        with self._lock:
            got, self.calls = self.calls, Counter()
        return got


@pytest.fixture(scope="module")
def creds():
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        yield


@pytest.fixture(scope="module")
def sim(creds):
    with start_vastsim(None, access_key=ACCESS, secret_key=SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def source():
    src = open_source(SRC)
    # what the source holds, read directly (before the counting starts)
    expected = {"blocks": {s.scale: sum(b.num_rows for b in src.read_blocks(s.scale, 0, KEY_END))
                           for s in src.info().scales},
                "mapping": sum(b.num_rows for b in src.read_mapping(0, KEY_END))}
    counted = Counted(src)
    with start_server(src) as srv:
        yield srv, counted, expected
    src.close()


def _run(server, cluster, *sinks, extra=(), capsys=None):
    args = ["run", "--uuid", UUID, "--flight", server.location, "--cluster", cluster.scheduler_address,
            "--partition-blocks", "8", "--quiet", "--json", *extra]
    for s in sinks:
        args += ["--sink", s]
    rc = cli(args)
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if cap.out.strip() else None), cap.err


def _verify(server, *sinks, capsys):
    args = ["verify", "--uuid", UUID, "--flight", server.location, "--in-process", "--quiet", "--json"]
    for s in sinks:
        args += ["--sink", s]
    rc = cli(args)
    cap = capsys.readouterr()
    return rc, json.loads(cap.out), cap.err


def _dom(url: str) -> str:
    """The page as headless Chromium renders it (its script run)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for this test: apt-get install chromium (.ci/run does)"
    p = subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=5000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _sink_rows(dom: str) -> list[dict]:
    """The rendered per-sink rows of the run's page (their data attributes)."""
    rows: list[dict] = []

    class Rows(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and a.get("class") == "sink":
                rows.append({k: v for k, v in a.items() if k in ("data-sink", "data-parts-done",
                                                                  "data-parts-failed")})

    Rows().feed(dom)
    return rows


def _sink(url):
    return open_sink(url, uuid=UUID, instance="segmentation")


def _rows(sink, run_id):
    """Rows the sink holds per table (blocks per scale), as a reader sees them."""
    return {"blocks": {s: sink.read("blocks", scale=s, run_id=run_id).num_rows for s in (0, 1)},
            "mapping": sink.read("mapping", run_id=run_id).num_rows,
            "label_index": sink.read("label_index", run_id=run_id).num_rows}


def _block_reads(calls: Counter, run) -> Counter:
    """How often each blocks partition of ``run`` was read from the source."""
    return Counter({p.key: calls[(p.scale, p.lo, p.hi)] for p in run.partitions if p.kind == "blocks"})


def test_vastdb_and_parquet_in_one_run(source, sim, cluster, tmp_path, capsys):
    """One run, two sinks: the source read once per partition, each sink exact and whole
    (its own ledger, its own record naming both), verify per sink — and a sink tampered
    with is the one verify names, with exit 1."""
    server, counted, expected = source
    vast = f"vastdb://127.0.0.1:{sim.port}/bucket/multi"
    pq = f"parquet://{tmp_path}/out"
    counted.take()
    rc, doc, err = _run(server, cluster, vast, pq, capsys=capsys)
    assert rc == 0, err
    run_id = doc["run_id"]
    run = _sink(pq).load_run(run_id)
    nparts = len(run.partitions)
    # the source was read once per blocks partition, for both sinks together
    reads = _block_reads(counted.take(), run)
    assert set(reads.values()) == {1} and len(reads) == sum(p.kind == "blocks" for p in run.partitions)

    rows = {}
    for url in (vast, pq):
        s = _sink(url)
        assert s.runs() == [run_id]
        rec = s.load_run(run_id)
        assert rec.partitions == run.partitions
        assert rec.state == "finished" and rec.record["sinks"] == [vast, pq]
        assert rec.record["result"]["sink"] == url and rec.record["result"]["complete"] is True
        assert s.ledger(run_id).num_rows == nparts == len(s.done(run_id))
        rows[url] = _rows(s, run_id)
        assert rows[url]["blocks"] == expected["blocks"] and rows[url]["mapping"] == expected["mapping"]
    assert rows[vast] == rows[pq] and rows[pq]["label_index"] > 0
    # --json: each sink's figures
    assert [d["sink"] for d in doc["sinks"]] == [vast, pq]
    for d in doc["sinks"]:
        assert d["complete"] and d["partitions"] == {"planned": nparts, "written": nparts,
                                                     "already_done": 0, "failed": 0}
        assert d["blocks"] == sum(expected["blocks"].values())
        assert d["rows"] == {"label_index": rows[pq]["label_index"], "mapping": expected["mapping"]}
    assert "2, each with its own ledger" in err and err.count("; complete") == 2

    counted.take()
    rc, rep, _ = _verify(server, vast, pq, capsys=capsys)
    assert rc == 0 and rep["ok"] and [d["sink"] for d in rep["sinks"]] == [vast, pq]
    assert all(d["ok"] and d["blocks"]["checked"] == sum(expected["blocks"].values()) for d in rep["sinks"])
    # one pass for both sinks: each blocks partition read from the source exactly once
    calls = counted.take()
    reads = _block_reads(calls, run)
    assert set(reads.values()) == {1} and sum(calls.values()) == len(reads)

    # status: both sinks, each with its record of the run
    assert cli(["status", "--sink", vast, "--sink", pq, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [d["sink"] for d in st["sinks"]] == [vast, pq]
    assert all(d["runs"][0]["state"] == "finished" and d["runs"][0]["partitions_done"] == nparts
               and d["runs"][0]["sinks"] == [vast, pq] for d in st["sinks"])

    # one Parquet block file deleted: verify names that sink (exit 1), the other stays exact
    victim = sorted((tmp_path / "out" / "segmentation" / UUID / "blocks" / "scale-0").glob("*.parquet"))[0]
    import pyarrow.parquet as pq_

    lost = pq_.read_metadata(victim).num_rows
    victim.unlink()
    rc, rep, err = _verify(server, vast, pq, capsys=capsys)
    assert rc == 1 and not rep["ok"]
    ok_vast, bad_pq = rep["sinks"]
    assert ok_vast["ok"] and ok_vast["exit_code"] == 0
    # the deleted file is the one difference of the blocks (and the scale-0 cross-check of the
    # label index against the blocks, which now lack its blocks); the rest was checked exact
    assert not bad_pq["ok"] and bad_pq["counters"]["unreadable_files"] == 1
    assert bad_pq["blocks"]["checked"] == sum(expected["blocks"].values()) - lost
    assert bad_pq["counters"]["index_vs_blocks"] == 1
    assert sum(bad_pq["counters"][k] for k in ("missing", "extra", "duplicated", "mismatched",
                                               "index_diffs", "mapping_diffs", "outside_rows")) == 0
    assert victim.name in bad_pq["problems"][0]
    assert "1 of 2 sinks exact; differing: " + pq in err

    # verify --repair over both sinks: only the differing sink's partition is re-exported
    # (the source read once for it), the exact sink's ledger is untouched, then both verify
    led_vast = _sink(vast).ledger(run_id).sort_by("lo").to_pylist()
    led_pq = {(r["kind"], r["scale"], r["lo"]): r["finished_at"] for r in _sink(pq).ledger(run_id).to_pylist()}
    counted.take()
    rc = cli(["verify", "--uuid", UUID, "--flight", server.location, "--cluster", cluster.scheduler_address,
              "--quiet", "--json", "--repair", "--sink", vast, "--sink", pq])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # verify reads each blocks partition once for both sinks; the repaired one is read once
    # more to re-export it and once more to check it again (only what was redone is re-checked)
    calls = counted.take()
    reads = _block_reads(calls, run)
    redone = [k for k, n in reads.items() if n != 1]
    assert len(redone) == 1 and reads[redone[0]] == 3 and sum(calls.values()) == len(reads) + 2
    assert _sink(vast).ledger(run_id).sort_by("lo").to_pylist() == led_vast
    after = {(r["kind"], r["scale"], r["lo"]): r["finished_at"] for r in _sink(pq).ledger(run_id).to_pylist()}
    # re-exported: the blocks partition of the deleted file, and the label-index partition
    # whose cross-check against the blocks failed (index_vs_blocks) — nothing else
    changed = sorted(k for k in after if after[k] != led_pq[k])
    assert after.keys() == led_pq.keys() and [k for k in changed if k[0] == "blocks"] == [
        (p.kind, p.scale, p.lo) for p in run.partitions if p.key == redone[0]]
    assert len([k for k in changed if k[0] == "indices"]) == bad_pq["counters"]["index_vs_blocks"]
    assert len(changed) == 1 + bad_pq["counters"]["index_vs_blocks"]
    assert _rows(_sink(pq), run_id) == rows[vast]
    rc, rep, _ = _verify(server, vast, pq, capsys=capsys)
    assert rc == 0 and all(d["ok"] for d in rep["sinks"])


def test_failing_sink_does_not_hold_back_the_other_and_resume_writes_only_what_it_lacks(
        source, cluster, tmp_path, capsys):
    """A partition whose write keeps failing in one sink: the other sink finishes (exact,
    record ``finished``), the failing one lacks exactly that partition (record ``failed``),
    exit 1 with each sink's line; ``--resume`` once the fault is gone reads that one
    partition again and writes it only where it is missing."""
    server, counted, expected = source
    first = next(open_source(SRC).read_blocks(0, 0, KEY_END))
    m = int(first.column("morton")[0].as_py())
    a, b = tmp_path / "a", tmp_path / "b"
    flaky = f"flaky+parquet://{a}?poison=0:{m}&mode=before"
    good = f"parquet://{b}"
    counted.take()
    rc, doc, err = _run(server, cluster, flaky, good, extra=("--retries", "1"), capsys=capsys)
    assert rc == 1, err
    run_id = doc["run_id"]
    run = _sink(good).load_run(run_id)
    nparts = len(run.partitions)
    bad = next(p for p in run.partitions if p.kind == "blocks" and p.scale == 0 and p.lo <= m < p.hi)
    # read once per partition; the failing one once per task attempt (2: --retries 1)
    reads = _block_reads(counted.take(), run)
    assert reads.pop(bad.key) == 2 and set(reads.values()) == {1}

    sa, sb = _sink(f"parquet://{a}"), _sink(good)
    assert sb.load_run(run_id).state == "finished" and sb.done(run_id) == {p.key for p in run.partitions}
    assert _rows(sb, run_id)["blocks"] == expected["blocks"]
    assert sa.load_run(run_id).state == "failed"
    assert sa.done(run_id) == {p.key for p in run.partitions} - {bad.key}
    assert sa.load_run(run_id).record["result"]["failed_partitions"][0]["partition"] == bad.key
    assert doc["partitions"]["failed"] == 1 and doc["failed"][0]["partition"] == bad.key
    assert "write failed in 1 of 2 sinks" in doc["failed"][0]["reason"]
    assert "injected poisoned partition" in doc["failed"][0]["reason"] and str(a) in doc["failed"][0]["reason"]
    fa, fb = doc["sinks"]
    assert not fa["complete"] and fa["partitions"] == {"planned": nparts, "written": nparts - 1,
                                                       "already_done": 0, "failed": 1}
    assert fb["complete"] and fb["partitions"] == {"planned": nparts, "written": nparts,
                                                   "already_done": 0, "failed": 0}
    assert "INCOMPLETE: 1 partitions failed there" in err and "; complete" in err
    assert f"resume with --resume {run_id}" in err
    # the run's page: one row per sink, as a browser renders it
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + "/dvidetl/state.json", timeout=10) as r:
        state = json.loads(r.read())
    assert state["run_id"] == run_id and state["finished"]
    assert [(d["sink"], d["parts_written"], d["parts_failed"], d["parts_total"]) for d in state["sinks"]] == \
        [(flaky, nparts - 1, 1, nparts), (good, nparts, 0, nparts)]
    rows = _sink_rows(_dom(base + "/dvidetl"))
    assert rows == [{"data-sink": flaky, "data-parts-done": str(nparts - 1), "data-parts-failed": "1"},
                    {"data-sink": good, "data-parts-done": str(nparts), "data-parts-failed": "0"}]
    rc, rep, _ = _verify(server, f"parquet://{a}", good, capsys=capsys)
    assert rc == 1 and not rep["sinks"][0]["ok"] and rep["sinks"][1]["ok"]
    assert rep["sinks"][0]["partitions_unfinished"] == 1

    # the fault gone: resume both — the missing partition is read once, written only to a
    counted.take()
    rc, doc, err = _run(server, cluster, f"parquet://{a}", good, extra=("--resume", run_id), capsys=capsys)
    assert rc == 0, err
    assert _block_reads(counted.take(), run) == Counter({p.key: int(p.key == bad.key)
                                                        for p in run.partitions if p.kind == "blocks"})
    ra, rb = doc["sinks"]
    assert ra["complete"] and ra["partitions"] == {"planned": nparts, "written": 1,
                                                   "already_done": nparts - 1, "failed": 0}
    assert rb["complete"] and rb["partitions"] == {"planned": nparts, "written": 0,
                                                   "already_done": nparts, "failed": 0}
    assert doc["partitions"] == {"planned": nparts, "written": 1, "already_done": nparts - 1, "failed": 0}
    assert _sink(f"parquet://{a}").load_run(run_id).state == "finished"
    for s in (_sink(f"parquet://{a}"), sb):
        assert _rows(s, run_id)["blocks"] == expected["blocks"]
        assert s.ledger(run_id).num_rows == nparts
    rc, rep, _ = _verify(server, f"parquet://{a}", good, capsys=capsys)
    assert rc == 0 and all(d["ok"] for d in rep["sinks"])


def test_sinks_that_disagree_are_refused_then_resume_adds_a_sink_and_overwrite_stages_per_sink(
        source, cluster, tmp_path, capsys):
    """One sink holds a finished export, the other none: a plain run refuses, naming
    ``--resume RUN`` and ``--overwrite``; ``--resume RUN`` with the new sink writes every
    partition there and none into the sink that has them; ``--overwrite`` stages the new run
    only where an export exists."""
    server, counted, expected = source
    b, c = f"parquet://{tmp_path}/b", f"parquet://{tmp_path}/c"
    rc, doc, err = _run(server, cluster, b, capsys=capsys)
    assert rc == 0, err
    run_id = doc["run_id"]
    assert doc["sinks"][0]["sink"] == b and doc["sinks"][0]["complete"]

    rc, doc, err = _run(server, cluster, b, c, capsys=capsys)
    assert rc == 2 and doc is None
    assert f"{b} holds a finished export of segmentation@{UUID} (run {run_id}), {c} does not" in err
    assert f"--resume {run_id}" in err and "--overwrite" in err
    assert _sink(c).runs() == []  # refused before anything was stored

    counted.take()
    rc, doc, err = _run(server, cluster, b, c, extra=("--resume", run_id), capsys=capsys)
    assert rc == 0, err
    run = _sink(b).load_run(run_id)
    nparts = len(run.partitions)
    reads = _block_reads(counted.take(), run)
    assert set(reads.values()) == {1}  # read once, for c only
    rb, rc_ = doc["sinks"]
    assert rb["partitions"]["written"] == 0 and rb["partitions"]["already_done"] == nparts
    assert rc_["partitions"]["written"] == nparts and rc_["partitions"]["already_done"] == 0
    assert _sink(c).load_run(run_id).state == "finished" and _rows(_sink(c), run_id) == _rows(_sink(b), run_id)
    assert _rows(_sink(c), run_id)["blocks"] == expected["blocks"]

    # c finished too now; a fresh d beside it: --overwrite stages in c only
    d = f"parquet://{tmp_path}/d"
    rc, doc, err = _run(server, cluster, c, d, extra=("--overwrite",), capsys=capsys)
    assert rc == 0, err
    new = doc["run_id"]
    assert _sink(c).load_run(new).staged and not _sink(d).load_run(new).staged
    assert _sink(c).load_run(run_id).state == "superseded" and _sink(c).latest_run() == new
    assert _sink(d).runs() == [new]
    rc, rep, _ = _verify(server, b, c, d, capsys=capsys)
    assert rc == 0 and [x["run_id"] for x in rep["sinks"]] == [run_id, new, new]


def test_library_api_takes_one_sink_or_several(source, cluster, tmp_path):
    """``dvidetl.export(source, sinks, ...)``: a list writes each sink in the same pass (each
    sink's own figures in ``.sinks``); one URL, positional or as ``sink=``, works as before."""
    from distributed import Client

    import dvidetl
    from dvidetl import RunOptions
    from dvidetl.errors import UserError

    server, counted, expected = source
    opts = RunOptions(partition_blocks=8, indices=False, mapping=False)
    p1, p2, p3 = (f"parquet://{tmp_path}/{n}" for n in ("one", "two", "three"))
    with Client(cluster.scheduler_address) as client:
        counted.take()
        res = dvidetl.export(server.location, [p1, p2], opts, uuid=UUID, cluster=client)
        reads = counted.take()
        single = dvidetl.export(server.location, p3, opts, uuid=UUID, cluster=client)
        with pytest.raises(UserError, match="already holds a finished export"):
            dvidetl.export(server.location, sink=p3, options=opts, uuid=UUID, cluster=client)
    total = sum(expected["blocks"].values())
    assert res.ok and res.blocks == total and [r.sink for r in res.sinks] == [p1, p2]
    assert all(r.complete and r.blocks == total and r.done == r.partitions for r in res.sinks)
    run = _sink(p1).load_run(res.run_id)
    assert set(_block_reads(reads, run).values()) == {1}
    assert single.ok and single.blocks == total and [r.sink for r in single.sinks] == [p3]
    for url in (p1, p2, p3):
        rep = dvidetl.verify(server.location, url, uuid=UUID)
        assert rep.ok and rep.blocks_checked == total
    # a list: one report per sink, in order, from one pass over the source — p3 holds another
    # run cut the same way, so its partitions' source reads are shared as well
    counted.take()
    reps = dvidetl.verify(server.location, [p1, p2, p3], uuid=UUID)
    calls = counted.take()
    assert [r.run_id for r in reps] == [res.run_id, res.run_id, single.run_id] != [res.run_id] * 3
    assert all(r.ok and r.blocks_checked == total for r in reps)
    assert set(_block_reads(calls, run).values()) == {1} and sum(calls.values()) == len(_block_reads(calls, run))


def test_precomputed_and_parquet_in_one_run(source, cluster, tmp_path, capsys):
    """The issue's pairing: the viewer-ready volume and the tables in the same pass. The
    plan is cut one shard per blocks partition (the precomputed sink's cells) and the source
    read once per partition for both; the volume sink stores blocks (and the anomalies) but
    no label_index / mapping partitions, and is whole without them; the Parquet sink has
    everything; both verify exact, and the volume TensorStore reads equals what the Parquet
    export's blocks decode to, voxel for voxel."""
    import numpy as np
    import tensorstore as ts

    from dvidetl.read import open_export

    server, counted, expected = source
    vol, pq = f"precomputed://{tmp_path}/vol", f"parquet://{tmp_path}/tables"
    counted.take()
    rc, doc, err = _run(server, cluster, vol, pq, capsys=capsys)
    assert rc == 0, err
    run_id = doc["run_id"]
    run = _sink(pq).load_run(run_id)
    assert set(_block_reads(counted.take(), run).values()) == {1}
    assert doc["not_exported"] == {}  # the Parquet sink stores the tables
    takes = [p for p in run.partitions if p.kind in ("blocks", "anomalies")]
    assert any(p.kind in ("indices", "mapping") for p in run.partitions)
    dv, dp = doc["sinks"]
    assert dv["complete"] and dv["partitions"] == {"planned": len(takes), "written": len(takes),
                                                   "already_done": 0, "failed": 0}
    assert dv["rows"] == {"label_index": 0, "mapping": 0} and dv["blocks"] == sum(expected["blocks"].values())
    assert dp["complete"] and dp["partitions"]["planned"] == len(run.partitions)
    # each sink's bytes written are its own: the volume's are its shard files
    shards = sum(f.stat().st_size for f in (tmp_path / "vol").rglob("*.shard"))
    assert dv["bytes_written"] == shards > 0 and dp["bytes_written"] != shards
    sv = _sink(vol)
    assert sv.load_run(run_id).state == "finished"
    assert sv.done(run_id) == {p.key for p in takes}
    assert _rows(_sink(pq), run_id)["blocks"] == expected["blocks"]

    # status: each sink's own plan share, all of it done
    assert cli(["status", "--sink", vol, "--sink", pq, "--json"]) == 0
    sv_st, sp_st = (d["runs"][0] for d in json.loads(capsys.readouterr().out)["sinks"])
    assert (sv_st["partitions_planned"], sv_st["partitions_done"]) == (len(takes), len(takes))
    assert (sp_st["partitions_planned"], sp_st["partitions_done"]) == (len(run.partitions),) * 2
    assert sv_st["state"] == sp_st["state"] == "finished"

    rc, rep, out = _verify(server, vol, pq, capsys=capsys)
    assert rc == 0, out
    rv, rp = rep["sinks"]
    assert rv["ok"] and rv["partitions_unfinished"] == 0 and rv["label_index"]["rows"] == 0
    assert rv["blocks"]["checked"] == rp["blocks"]["checked"] == sum(expected["blocks"].values())
    assert rp["label_index"]["rows"] > 0 and rp["mapping"]["rows"] == expected["mapping"]
    assert "not in this sink" in out

    # the same voxels in both sinks (bodies), at every scale
    ex = open_export(pq, uuid=UUID, instance="segmentation")
    info = json.loads((tmp_path / "vol" / "info").read_text())
    for s, sc in enumerate(info["scales"]):
        size = sc["size"]
        got = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/vol",
                       "scale_index": s}).result().read().result()[..., 0]
        want = ex.subvolume(s, ((0, 0, 0), tuple(size))).compute().transpose(2, 1, 0)
        assert got.shape == want.shape == tuple(size)
        assert want.any() and np.array_equal(got, want), s
