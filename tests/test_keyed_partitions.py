"""Label indices and the mapping in many bounded partitions: planning from count_keys,
export and verify per partition, resume, and servers that cannot count keys."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dvidetl.cli import main as cli
from dvidetl.export.planning import make_plan, plan_keys
from dvidetl.flight.client import FlightClient
from dvidetl.flight.server import start_server
from dvidetl.geometry import KEY_END
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.sources.base import KeyCounts, count_sorted

VOLUME = "synthetic://kp?size=512,512,256&scales=2&seed=9"


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def source():
    src = open_source(VOLUME)
    yield src
    src.close()


@pytest.fixture(scope="module")
def server(source):
    with start_server(source) as srv:
        yield srv


def _contiguous(parts) -> bool:
    return (parts[0].lo == 0 and parts[-1].hi == KEY_END - 1
            and all(a.hi == b.lo for a, b in zip(parts, parts[1:], strict=False)))


@pytest.mark.parametrize("kind", ["indices", "mapping"])
def test_plan_keys_is_exact_and_bounded(server, source, kind):
    """Through Flight: the partitions cover every key once, their planned rows are the
    source's rows exactly, and none exceeds the target unless it holds a single label."""
    target = 300 if kind == "indices" else 100
    with FlightClient(server.location) as c:
        parts = plan_keys(c.count_keys, kind, target)
    if kind == "indices":
        keys, rows = source._index_labels()
    else:
        keys, rows = source._mapping_arrays()[0], np.ones(source._mapping_arrays()[0].size, np.uint64)
    assert len(parts) > 10 and _contiguous(parts)
    assert sum(p.rows for p in parts) == int(rows.sum())
    for p in parts:
        sel = (keys >= np.uint64(p.lo)) & (keys < np.uint64(p.hi))
        assert p.rows == int(rows[sel].sum())
        # cells are cut to <= target / 8 rows unless one key holds more: a partition closes
        # once it reaches the target, so it is over it by less than one cell
        assert p.rows < target + max(target // 8, int(rows[sel].max(initial=0))) + 1


def test_plan_over_ten_million_labels_in_bounded_memory():
    """count_keys answered arithmetically (labels 1..10^7, 3 rows each): no label list exists
    anywhere, and the planner's own memory stays far below one (80 MB for 10^7 uint64)."""
    n, per = 10_000_000, 3
    calls = []

    def count_keys(kind, level, lo, hi):
        calls.append((level, lo, hi))
        a, b = max(lo, 1), min(hi, n + 1)
        if a >= b:
            z = np.zeros(0, np.uint64)
            return KeyCounts(z, z, z, True)
        first, last = a >> level, (b - 1) >> level
        cells = np.arange(first, last + 1, dtype=np.uint64)
        lo_c = np.maximum(cells << np.uint64(level), np.uint64(a)) if level < 64 else np.array([a], np.uint64)
        hi_c = np.minimum((cells + np.uint64(1)) << np.uint64(level), np.uint64(b)) if level < 64 else np.array([b], np.uint64)
        keys = (hi_c - lo_c).astype(np.uint64)
        return KeyCounts(cells, keys, keys * np.uint64(per), True)

    tracemalloc.start()
    try:
        parts = plan_keys(count_keys, "indices", 2_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _contiguous(parts)
    assert sum(p.rows for p in parts) == n * per
    assert len(parts) == pytest.approx(n * per / 2_000_000, abs=2)
    assert max(p.rows for p in parts) <= 2_000_000 * 1.125 + per
    assert peak < 16 << 20, f"planner peak {peak / 1e6:.1f} MB"
    assert len(calls) < 200  # top-down: a few requests per partition, not one per label


def test_server_without_count_keys_gives_one_partition_each(caplog):
    """A Flight server whose source cannot count keys: the plan falls back to one indices and
    one mapping partition (as before count_keys existed) and says why."""
    class NoCountKeys:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "count_keys":
                raise AttributeError(name)
            return getattr(self.inner, name)

    src = NoCountKeys(open_source("synthetic://nk?size=256,256,128&scales=1"))
    with start_server(src) as srv, FlightClient(srv.location) as c:
        parts = make_plan(c.info(), c.count, None, None, count_keys=c.count_keys)
    keyed = [(p.kind, p.scale, p.lo, p.hi) for p in parts if p.kind != "blocks"]
    assert keyed == [("indices", 0, 0, KEY_END - 1), ("mapping", 0, 0, KEY_END - 1)]
    assert "cannot count" in caplog.text


def _ledger(out: Path) -> pa.Table:
    files = sorted(out.glob("*/kp/export_ledger/*/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_many_partitions_export_verify_and_resume(tmp_path, server, source, cluster, capsys):
    out = tmp_path / "out"
    sink = f"parquet://{out}"
    base = ["--uuid", "kp", "--flight", server.location, "--sink", sink, "--cluster", cluster]
    rc = cli(["run", *base, "--quiet", "--index-partition-rows", "400",
              "--mapping-partition-rows", "200"])
    err = capsys.readouterr().err
    assert rc == 0, err
    led = _ledger(out)
    kinds = led.column("kind").to_pylist()
    n_idx, n_map = kinds.count("indices"), kinds.count("mapping")
    assert n_idx > 5 and n_map > 5
    s = open_sink(sink, uuid="kp", instance="segmentation")
    idx = s.read("label_index")
    rows = source.index_rows()
    assert idx.num_rows == len(rows["body"])
    assert len(np.unique(idx.column("label").to_numpy())) == len(np.unique(rows["body"]))
    mp = s.read("mapping")
    assert mp.num_rows == source._mapping_arrays()[0].size
    assert f"{idx.num_rows:,} label_index" in err
    # verify on the cluster, per partition
    assert cli(["verify", *base]) == 0, capsys.readouterr().out
    assert f"label_index {idx.num_rows:,} rows, 0 differences" in capsys.readouterr().out

    # change one voxel count in one label_index file: verify names that label range
    run_id = led.column("run_id")[0].as_py()
    files = sorted((out / "segmentation" / "kp" / "label_index").rglob("*.parquet"))
    victim = files[len(files) // 2]
    t = pq.read_table(victim)
    vox = t.column("voxels").to_numpy().copy()
    vox[0] += 1
    pq.write_table(t.set_column(t.schema.get_field_index("voxels"), "voxels", pa.array(vox, pa.uint32())), victim)
    assert cli(["verify", *base]) == 1
    rep = capsys.readouterr().out
    lab = t.column("label")[0].as_py()
    assert "index says" in rep or "source's index says" in rep
    assert f"label {lab} " in rep
    assert "do not match" in rep  # the cross-check against the exported blocks agrees
    pq.write_table(t, victim)

    # resume: one indices and one mapping partition lost their ledger rows -> only they rerun
    ledger_dir = next((out / "segmentation" / "kp" / "export_ledger").iterdir())
    lost = [sorted(ledger_dir.glob("indices-*.parquet"))[2], sorted(ledger_dir.glob("mapping-*.parquet"))[1]]
    for f in lost:
        f.unlink()
    assert cli(["run", *base, "--resume", run_id]) == 0
    err = capsys.readouterr().err
    assert "2 written now" in err, err
    assert {f.name for f in ledger_dir.iterdir()} >= {f.name for f in lost}
    assert cli(["verify", *base, "--in-process"]) == 0, capsys.readouterr().out
    capsys.readouterr()


def test_plan_prints_keyed_partitions_with_rows(server, source, capsys):
    assert cli(["plan", "--uuid", "kp", "--flight", server.location,
                "--index-partition-rows", "400", "--partitions"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.split()[1:2] == ["indices"]]
    assert len(lines) > 5
    assert sum(int(ln[-1].replace(",", "")) for ln in lines) == len(source.index_rows()["body"])


@pytest.mark.parametrize("opt", ["--index-partition-rows", "--mapping-partition-rows"])
def test_bad_partition_rows_fail_fast(opt, capsys):
    assert cli(["plan", "--uuid", "demo", opt, "0"]) == 2
    assert f"{opt} must be at least 1" in capsys.readouterr().err


def test_count_sorted_cells():
    keys = np.array([1, 2, 3, 17, 18, 300], np.uint64)
    rows = np.array([1, 1, 5, 2, 2, 9], np.uint64)
    kc = count_sorted(keys, rows, 4)
    assert kc.cells.tolist() == [0, 1, 18] and kc.keys.tolist() == [3, 2, 1]
    assert kc.rows.tolist() == [7, 4, 9]
    kc = count_sorted(keys, rows, 0, 3, 18)
    assert kc.cells.tolist() == [3, 17] and kc.rows.tolist() == [5, 2]
    kc = count_sorted(keys, None, 64)
    assert kc.cells.tolist() == [0] and kc.rows.tolist() == [6]
