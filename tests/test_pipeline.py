"""End to end: real Flight servers on loopback, real Dask clusters, Parquet sink, verify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.tables import schema as S

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def cluster():
    """One small cluster for the in-process runs (reached as --cluster tcp://...)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c.scheduler_address


def _tables(sink_url, uuid, instance):
    sink = open_sink(sink_url, uuid=uuid, instance=instance)
    out = {}
    for t, keys in S.KEYS.items():
        if t == "export_ledger":
            continue
        tab = sink.read(t)
        if t == "export_errors":
            tab = tab.drop_columns(["run_id"])
        out[t] = tab.sort_by([(k, "ascending") for k in keys if k != "run_id"])
    return out


def _instance(sink_dir, uuid):
    return next(p.name for p in Path(sink_dir).iterdir() if (p / uuid).is_dir())


def test_demo_run_and_verify(tmp_path, capsys):
    """The embedded default, exactly as `make run` does it (own LocalCluster, 2 workers)."""
    sink = f"parquet://{tmp_path}/out"
    rc = cli(["run", "--uuid", "demo", "--sink", sink, "--workers", "2", "--dashboard-address", "127.0.0.1:0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "blocks/s" in out.err and "smaller than the raw DVID bytes" in out.err
    assert cli(["verify", "--uuid", "demo", "--sink", sink]) == 0, capsys.readouterr().out
    rep = capsys.readouterr().out
    assert "OK" in rep
    from dvidetl.read import connect, reassemble_block

    con = connect(f"{tmp_path}/out")
    n = con.execute("select count(*) from blocks").fetchone()[0]
    led = con.execute("select sum(blocks) from export_ledger where kind = 'blocks'").fetchone()[0]
    assert n == led > 1000
    assert con.execute("select count(*) from label_index").fetchone()[0] > 0
    assert con.execute("select count(*) from mapping").fetchone()[0] > 0
    # one block byte-exact through the reader helper vs the source
    x, y, z = con.execute("select x, y, z from blocks where scale = 0 limit 1").fetchone()
    src = open_source("synthetic://demo")
    try:
        assert reassemble_block(con, 0, x, y, z) == src.block_bytes(0, x, y, z)
    finally:
        src.close()
    # inspect finds it
    assert cli(["inspect", "--sink", sink, "--block", f"{x},{y},{z}"]) == 0
    assert "label-table entries" in capsys.readouterr().out
    label, nblk = con.execute(
        "select label, count(*) from label_index group by label order by 2 desc limit 1"
    ).fetchone()
    assert cli(["inspect", "--sink", sink, "--label", str(label)]) == 0
    assert f"{nblk:,} block entries" in capsys.readouterr().out


def test_multiscale_overflow_run_and_verify(tmp_path, cluster, capsys):
    """Dense blocks at several scales with a small cell limit: overflow rows, still exact."""
    src = "synthetic://ovf?size=256,256,128&scales=3&seed=5&dense=0.2"
    sink = f"parquet://{tmp_path}/out"
    common = ["--uuid", "ovf", "--source", src, "--sink", sink]
    rc = cli(["run", *common, "--cluster", cluster, "--partition-blocks", "8", "--cell-limit", "4096", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    t = _tables(sink, "ovf", _instance(f"{tmp_path}/out", "ovf"))
    assert t["block_overflow"].num_rows > 0
    assert set(t["block_overflow"].column("column").to_pylist()) >= {"payload", "supervoxels"}
    assert sorted(set(t["blocks"].column("scale").to_pylist())) == [0, 1, 2]
    assert cli(["verify", *common[:4], "--sink", sink]) == 0, capsys.readouterr().out


def test_real_mcns_shard_run_and_verify(tmp_path, shared_data, cluster, capsys):
    d = tmp_path / "shards" / "s1"
    d.mkdir(parents=True)
    os.symlink(shared_data / "mcns-shard" / "30720_24576_28672.arrow", d / "30720_24576_28672.arrow")
    os.symlink(shared_data / "mcns-shard" / "30720_24576_28672-newformat.csv", d / "30720_24576_28672.csv")
    spec = shared_data / "dvid" / "mcns-ng-specs.json"
    source = open_source(f"shards://{tmp_path}/shards?spec={spec}")
    with start_server(source) as srv:
        sink = f"parquet://{tmp_path}/out"
        common = ["--uuid", "mcns", "--flight", srv.location, "--sink", sink]
        rc = cli(["run", *common, "--cluster", cluster, "--partition-blocks", "64", "--quiet"])
        assert rc == 0, capsys.readouterr().err
        assert cli(["verify", *common]) == 0, capsys.readouterr().out
        inst = source.info().instance
    source.close()
    t = _tables(sink, "mcns", inst)
    assert t["blocks"].num_rows == 258
    assert t["mapping"].num_rows == 890
    # the shard's own aligned labels column equals what we exported
    import pyarrow.ipc as ipc

    with open(shared_data / "mcns-shard" / "30720_24576_28672.arrow", "rb") as f:
        orig = ipc.open_stream(f).read_all()
    o = orig.sort_by([("chunk_z", "ascending"), ("chunk_y", "ascending"), ("chunk_x", "ascending")])
    e = t["blocks"].sort_by([("z", "ascending"), ("y", "ascending"), ("x", "ascending")])
    assert e.column("labels").to_pylist() == o.column("labels").to_pylist()
    assert e.column("supervoxels").to_pylist() == o.column("supervoxels").to_pylist()


class CorruptingSource:
    """A real source (synthetic) whose stored bytes are damaged for every 5th block, as a
    bad disk or a buggy writer would leave them."""

    def __init__(self, url):
        self.inner = open_source(url)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_blocks(self, scale, lo, hi):
        for b in self.inner.read_blocks(scale, lo, hi):
            data = b.column("data").to_pylist()
            m = b.column("morton").to_numpy()
            data = [d[: len(d) // 2] if int(mm) % 5 == 0 else d for d, mm in zip(data, m, strict=True)]
            yield b.set_column(4, "data", pa.array(data, pa.binary()))


def test_corrupt_blocks_go_to_export_errors(tmp_path, cluster, capsys):
    source = CorruptingSource("synthetic://bad?size=256,256,128&scales=1&seed=2")
    with start_server(source) as srv:
        sink = f"parquet://{tmp_path}/out"
        common = ["--uuid", "bad", "--flight", srv.location, "--sink", sink]
        rc = cli(["run", *common, "--cluster", cluster, "--partition-blocks", "32", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 1 and "export_errors" in err
        inst = source.info().instance
        t = _tables(sink, "bad", inst)
        e = t["export_errors"]
        assert e.num_rows > 0 and set(e.column("stage").to_pylist()) == {"repack"}
        assert np.all(e.column("morton").to_numpy() % 5 == 0)
        assert np.all(t["blocks"].column("morton").to_numpy() % 5 != 0)
        assert cli(["verify", *common]) == 1
        assert "in export_errors" in capsys.readouterr().out
        # --max-errors stops early with a clear reason
        rc = cli(["run", *common, "--cluster", cluster, "--partition-blocks", "8", "--max-errors", "0", "--quiet",
                  "--overwrite"])
        assert rc == 1 and "aborted" in capsys.readouterr().err.lower()
    source.close()


def _run_cmd(sink, *extra):
    return [PY, "-m", "dvidetl", "run", "--uuid", "eo", "--source",
            "synthetic://eo?size=512,512,256&scales=2&seed=9", "--sink", sink, "--workers", "2",
            "--dashboard-address", ":0", "--partition-blocks", "16", *extra]


def test_killed_driver_then_resume_is_exactly_once(tmp_path, cluster):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    a, b = f"{tmp_path}/a", f"{tmp_path}/b"
    # uninterrupted reference (in-process, shared cluster)
    ref = _run_cmd(f"parquet://{b}")[3:]
    ref[ref.index("--workers"):ref.index("--workers") + 4] = ["--cluster", cluster]
    assert cli(ref + ["--quiet"]) == 0
    # killed run: SIGKILL the driver once some partitions are committed
    log = open(tmp_path / "killed.log", "wb")  # a file, not a pipe: a full pipe would stall the run
    t0 = time.time()
    p = subprocess.Popen(_run_cmd(f"parquet://{a}", "--quiet"), cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ledger = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            ledgers = list(Path(a).glob("*/eo/export_ledger/*"))
            if ledgers and len(list(ledgers[0].glob("*.parquet"))) >= 5:
                ledger = ledgers[0]
                break
            assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
        assert ledger is not None, "the run never committed a partition"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        print(f"killed after {time.time() - t0:.1f} s")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the killed driver's own worker processes
        except ProcessLookupError:
            pass
    run_id = ledger.name
    inst = ledger.parents[1].parent.name
    sink = open_sink(f"parquet://{a}", uuid="eo", instance=inst)
    plan = sink.load_run(run_id).partitions
    assert len(sink.done(run_id)) < len(plan), "killed too late: nothing left to resume"
    t0 = time.time()
    res = subprocess.run(_run_cmd(f"parquet://{a}", "--resume", run_id, "--quiet"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    print(f"resumed in {time.time() - t0:.1f} s")
    assert "already done" in res.stderr
    ta, tb = _tables(f"parquet://{a}", "eo", inst), _tables(f"parquet://{b}", "eo", inst)
    for name in ta:
        assert ta[name].equals(tb[name]), f"table {name} differs after kill + resume"
    m = ta["blocks"].column("morton").to_numpy().astype(np.uint64)
    s = ta["blocks"].column("scale").to_numpy().astype(np.uint64)
    assert len(np.unique(m + (s << np.uint64(56)))) == len(m), "a block is duplicated"
    assert sum(x.blocks for x in plan) == ta["blocks"].num_rows
