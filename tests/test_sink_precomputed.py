"""The neuroglancer precomputed sink (``precomputed:///DIR``, issue 27): exported through the
real pipeline (Flight server, Dask, the partition task), read back by independent readers —
TensorStore and cloud-volume — voxel for voxel against ``decode_block`` + the server's
mapping on every chunk, planned one shard per partition, verified and tamper-tested.

The synthetic volume has partial edge chunks on every axis at every scale (300 x 250 x 200
voxels: 44, 58, 8 voxels past the last whole chunk at scale 0, and so on)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from dvidetl.codec import decode_block, join_block, split_block, unwrap
from dvidetl.codec.ngshard import Sharding, derive_info, read_shard
from dvidetl.export.api import export
from dvidetl.export.options import RunOptions
from dvidetl.read.verify import DIFF_COUNTERS, verify
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source

SRC = "synthetic://pc?size=300,250,200&scales=3&seed=5"
UUID = "pc"
#: small shards (2^(2+1) = 8 chunks) so scales 0 and 1 have several, some empty
SHARD = {"preshift_bits": 2, "minishard_bits": 1}


def expected_volume(source, scale: int, size, *, supervoxels: bool = False) -> np.ndarray:
    """The whole scale as [x, y, z] from the source's blocks: decode_block, each table entry
    replaced by its body (the server's mapping) unless ``supervoxels``, clipped to ``size``."""
    si = source.info().scale(scale)
    gx, gy, gz = si.grid
    vol = np.zeros((gz * 64, gy * 64, gx * 64), np.uint64)
    n = 0
    for b in source.read_blocks(scale, 0, si.morton_end):
        for r in b.select(["x", "y", "z", "data"]).to_pylist():
            raw = unwrap(r["data"], source.info().codec)
            table, body = split_block(raw)
            if not supervoxels:
                table = source.map_supervoxels(np.asarray(table, np.uint64))
            x, y, z = r["x"], r["y"], r["z"]
            vol[z * 64:(z + 1) * 64, y * 64:(y + 1) * 64, x * 64:(x + 1) * 64] = \
                decode_block(join_block(np.asarray(table, np.uint64), body))
            n += 1
    assert n > 0
    sx, sy, sz = size
    return vol[:sz, :sy, :sx].transpose(2, 1, 0)


@pytest.fixture(scope="module")
def source():
    s = open_source(SRC)
    yield s
    s.close()


@pytest.fixture(scope="module")
def spec(tmp_path_factory, source):
    """A spec with small shards (what a user passes as spec=): derived, then stripped of the
    members ``complete_info`` fills in, as DVID's own spec lacks them."""
    info = derive_info(source.info().scales, (8, 8, 8), **SHARD)
    for sc in info["scales"]:
        del sc["compressed_segmentation_block_size"]
        del sc["sharding"]["data_encoding"]
    f = tmp_path_factory.mktemp("spec") / "spec.json"
    f.write_text(json.dumps(info))
    return f


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cluster, spec):
    """The volume exported with the small-shard spec (bodies)."""
    d = tmp_path_factory.mktemp("pc") / "vol"
    url = f"precomputed://{d}?spec={spec}"
    res = export(SRC, url, RunOptions(), uuid=UUID, cluster=cluster.scheduler_address)
    assert res.ok and res.blocks > 0 and not res.failed
    return d, url, res


def test_info_from_the_spec_is_completed_with_documented_defaults(exported):
    from dvidetl.codec.ngshard import scale_grid, sharding_for_grid

    d, _, _ = exported
    info = json.loads((d / "info").read_text())
    assert [s["size"] for s in info["scales"]] == [[300, 250, 200], [150, 125, 100], [75, 63, 50]]
    for sc in info["scales"]:
        assert sc["compressed_segmentation_block_size"] == [8, 8, 8]
        assert sc["sharding"]["data_encoding"] == "gzip"
        assert sc["sharding"] == sharding_for_grid(scale_grid(sc), **SHARD).to_json()
    assert info["scales"][0]["sharding"]["preshift_bits"] == 2


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_tensorstore_reads_every_chunk_voxel_exact(exported, source, scale):
    import tensorstore as ts

    d, _, _ = exported
    size = json.loads((d / "info").read_text())["scales"][scale]["size"]
    vol = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{d}",
                   "scale_index": scale}).result()
    got = vol.read().result()[..., 0]
    want = expected_volume(source, scale, size)
    assert got.shape == want.shape == tuple(size)
    assert want.any() and np.array_equal(got, want)


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_cloudvolume_reads_every_chunk_voxel_exact(exported, source, scale):
    from cloudvolume import CloudVolume

    d, _, _ = exported
    size = json.loads((d / "info").read_text())["scales"][scale]["size"]
    cv = CloudVolume(f"file://{d}", mip=scale, progress=False, fill_missing=True)
    got = np.asarray(cv[:, :, :])[..., 0]
    assert np.array_equal(got, expected_volume(source, scale, size))


def test_one_partition_is_one_shard_and_empty_shards_are_not_planned(exported, source):
    d, url, _ = exported
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    assert {p.kind for p in run.partitions} == {"blocks"}  # no keyed tables (and no anomalies here)
    low = SHARD["preshift_bits"] + SHARD["minishard_bits"]
    for s, si in enumerate(source.info().scales):
        parts = [p for p in run.partitions if p.kind == "blocks" and p.scale == s]
        codes = np.concatenate([b.column("morton").to_numpy() for b in source.read_blocks(s, 0, si.morton_end)])
        shards = sorted(set((codes >> np.uint64(low)).tolist()))
        assert [p.lo >> low for p in parts] == shards  # one per non-empty shard, in order
        for p in parts:
            assert p.lo == (p.lo >> low) << low and p.hi <= ((p.lo >> low) + 1) << low
            assert p.blocks == int(((codes >= p.lo) & (codes < p.hi)).sum())
        led = {(r["lo"], r["hi"]): r for r in sink.ledger(run.run_id).to_pylist() if r["scale"] == s}
        for p in parts:  # each ledger row: the shard's chunks and its file's bytes
            f = sink.shard_path(run.run_id, p)
            nchunks = len(read_shard(f.read_bytes(), sink.sharding(s))) if f.exists() else 0
            assert (led[(p.lo, p.hi)]["rows"], led[(p.lo, p.hi)]["bytes_out"]) == \
                (nchunks, f.stat().st_size if f.exists() else 0)
        files = sorted((d / run_scale_key(d, s)).glob("*.shard"))
        sh = Sharding.from_json(json.loads((d / "info").read_text())["scales"][s]["sharding"])
        assert {f.name for f in files} <= {sh.shard_filename(k) for k in shards}
        assert len(shards) > 1 or s == 2


def run_scale_key(d: Path, s: int) -> str:
    return json.loads((d / "info").read_text())["scales"][s]["key"]


def test_verify_is_exact_and_says_what_was_not_exported(exported):
    _, url, res = exported
    rep = verify(SRC, url, uuid=UUID)
    assert rep.ok and rep.differences == 0
    assert rep.blocks_checked == rep.blocks_source == res.blocks
    text = rep.text()
    assert "label_index not exported" in text and "mapping     not exported" in text
    assert f"{res.blocks:,} exported and voxel-exact checked" in text


# -- verify against tampered shards: each tamper moves exactly its counter ------------------

@pytest.fixture
def copy(exported, tmp_path):
    """A copy of the exported volume to tamper with (the module's export stays clean)."""
    d, url, _ = exported
    c = tmp_path / "vol"
    shutil.copytree(d, c)
    return c, url.replace(str(d), str(c))


def _shards(d: Path, scale: int = 0) -> list[Path]:
    return sorted((d / run_scale_key(d, scale)).glob("*.shard"))


def _sharding(d: Path, scale: int = 0) -> Sharding:
    return Sharding.from_json(json.loads((d / "info").read_text())["scales"][scale]["sharding"])


def _part_of(url: str, shard: Path, scale: int = 0):
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    return next(p for p in run.partitions if p.kind == "blocks" and p.scale == scale
                and sink.shard_path(run.run_id, p) == shard)


def _only(rep, **counters):
    """The report differs from exact in exactly ``counters``."""
    got = {k: v for k, v in rep.counters().items() if k in DIFF_COUNTERS and v}
    assert got == counters, rep.text()


def test_a_flipped_chunk_byte_is_one_mismatched_block(copy):
    d, url = copy
    f = _shards(d)[0]
    data = bytearray(f.read_bytes())
    data[_sharding(d).index_size + 15] ^= 0x55  # inside the shard's first chunk
    f.write_bytes(bytes(data))
    rep = verify(SRC, url, uuid=UUID)
    _only(rep, mismatched=1)
    assert rep.bad_partitions == {_part_of(url, f).key}


def test_a_deleted_shard_is_one_unreadable_file(copy):
    d, url = copy
    f = _shards(d)[1]
    key = _part_of(url, f).key
    f.unlink()
    rep = verify(SRC, url, uuid=UUID)
    _only(rep, unreadable_files=1)
    assert rep.bad_partitions == {key} and any("missing: the ledger says" in p for p in rep.problems)


def test_a_truncated_shard_is_one_unreadable_file(copy):
    d, url = copy
    f = _shards(d)[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rep = verify(SRC, url, uuid=UUID)
    _only(rep, unreadable_files=1)
    assert rep.bad_partitions == {_part_of(url, f).key}


def test_a_foreign_shard_is_outside_rows_of_its_chunks(copy):
    d, url = copy
    sh = _sharding(d)
    used = {f.name for f in _shards(d)}
    free = next(k for k in range(1 << sh.shard_bits) if sh.shard_filename(k) not in used)
    src = _shards(d)[0]
    (d / run_scale_key(d, 0) / sh.shard_filename(free)).write_bytes(src.read_bytes())
    n = len(read_shard(src.read_bytes(), sh))
    rep = verify(SRC, url, uuid=UUID)
    _only(rep, outside_rows=n)
    assert n > 0 and len(rep.outside) == 1


def test_finish_removes_the_temporary_shards_of_killed_writers_and_says_so(copy):
    """A writer killed before its rename leaves a hidden temporary shard beside the final
    one (neuroglancer never reads it, but it holds disk): the run's finish — here redone,
    as ``run --resume`` of a finished run does — removes exactly it, keeps the record of it,
    and leaves every shard as it was; the export stays exact."""
    from dvidetl.sinks.parquet import temp_beside

    d, url = copy
    shards = _shards(d)
    before = {f: f.read_bytes() for f in shards}
    temp = temp_beside(shards[0])
    temp.write_bytes(shards[0].read_bytes()[:500])
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    run = sink.load_run(sink.latest_run())
    done = dict(run.record.get("removed_at_finish") or {})
    sink.finish(run)
    assert not temp.exists() and {f: f.read_bytes() for f in _shards(d)} == before
    rec = open_sink(url, uuid=UUID, instance="segmentation").load_run(run.run_id).record["removed_at_finish"]
    assert (rec["temp_files"] - done.get("temp_files", 0), rec["temp_bytes"] - done.get("temp_bytes", 0)) == (1, 500)
    assert verify(SRC, url, uuid=UUID).ok


def test_repair_redoes_exactly_the_tampered_shards_and_removes_the_foreign_one(copy, cluster):
    d, url = copy
    sh = _sharding(d)
    shards = _shards(d)
    flipped, gone = shards[0], shards[1]
    data = bytearray(flipped.read_bytes())
    data[sh.index_size + 15] ^= 0x55
    flipped.write_bytes(bytes(data))
    keys = {_part_of(url, flipped).key, _part_of(url, gone).key}
    gone.unlink()
    free = next(k for k in range(1 << sh.shard_bits) if sh.shard_filename(k) not in {f.name for f in shards})
    foreign = d / run_scale_key(d, 0) / sh.shard_filename(free)
    foreign.write_bytes(shards[2].read_bytes())
    before = {f: f.read_bytes() for f in shards[2:]}
    rep = verify(SRC, url, uuid=UUID, repair=True, cluster=cluster.scheduler_address)
    assert rep.ok, rep.text()
    assert set(rep.repaired["partitions"]) == keys and rep.repaired["rows_removed"] > 0
    assert not foreign.exists() and flipped.exists() and gone.exists()
    assert all(f.read_bytes() == b for f, b in before.items())  # the others untouched


# -- the real mCNS shard with the real spec ---------------------------------------------------

def test_the_real_mcns_shard_with_the_real_spec(tmp_path, shared_data, mcns_shard, cluster):
    """DVID's own export-shards file (scale 1, 258 libdvid-cpp blocks) exported with the male
    CNS spec DVID used (completed: it lacks the cseg block size and data_encoding): read back
    by TensorStore and cloud-volume, every block voxel-exact against decode_block mapped by
    the file's own ``labels`` lists (not the server's mapping), and verified."""
    import tensorstore as ts
    from cloudvolume import CloudVolume

    src_dir = tmp_path / "shards" / "s1"
    src_dir.mkdir(parents=True)
    for ext in (".arrow", "-newformat.csv"):
        os.symlink(shared_data / "mcns-shard" / f"30720_24576_28672{ext}",
                   src_dir / f"30720_24576_28672{ext.replace('-newformat', '')}")
    spec = shared_data / "dvid" / "mcns-ng-specs.json"
    source, d = f"shards://{tmp_path / 'shards'}?spec={spec}", tmp_path / "mcns"
    url = f"precomputed://{d}?spec={spec}"
    res = export(source, url, RunOptions(), uuid="mcns", cluster=cluster.scheduler_address)
    assert res.ok and res.blocks == 258
    info = json.loads((d / "info").read_text())
    assert len(info["scales"]) == 12 and info["scales"][1]["sharding"]["data_encoding"] == "gzip"
    assert len(list((d / "16x16x16").glob("*.shard"))) == 1  # one shard: the file's 2048³ box
    vol = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{d}", "scale_index": 1}).result()
    cv = CloudVolume(f"file://{d}", mip=1, progress=False, fill_missing=True)
    size = info["scales"][1]["size"]
    t = mcns_shard
    nonzero = 0
    for i, (x, y, z) in enumerate(zip(*(t.column(c).to_pylist() for c in ("chunk_x", "chunk_y", "chunk_z")),
                                      strict=True)):
        table, body = split_block(t.column("block")[i].as_py())
        labels = np.asarray(t.column("labels")[i].as_py(), np.uint64)
        assert np.array_equal(np.asarray(table, np.uint64), np.asarray(t.column("supervoxels")[i].as_py(), np.uint64))
        lo = (x * 64, y * 64, z * 64)
        hi = tuple(min(a + 64, s) for a, s in zip(lo, size, strict=True))
        want = decode_block(join_block(labels, body))[: hi[2] - lo[2], : hi[1] - lo[1], : hi[0] - lo[0]].transpose(2, 1, 0)
        got = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].read().result()[..., 0]
        assert np.array_equal(got, want), (x, y, z)
        if i % 16 == 0:  # cloud-volume is slower: every 16th block
            assert np.array_equal(np.asarray(cv[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])[..., 0], want), (x, y, z)
        nonzero += bool(want.any())
    assert nonzero > 200
    rep = verify(source, url, uuid="mcns")
    assert rep.ok and rep.blocks_checked == 258, rep.text()


# -- the command line: end to end, and bad URLs -------------------------------------------

def test_cli_run_then_verify_then_status(tmp_path, cluster):
    """``dvidetl run --sink precomputed:///DIR`` (derived info, supervoxel ids) and
    ``dvidetl verify`` through the real entry point: exit 0, the summary and verify say the
    tables were not exported, and TensorStore reads the supervoxel ids back."""
    import subprocess
    import sys

    import tensorstore as ts

    src = "synthetic://pcli?size=200,150,130&scales=2&seed=9"
    d = tmp_path / "vol"
    url = f"precomputed://{d}?supervoxels=true"
    common = ["--uuid", "pcli", "--source", src, "--sink", url]
    run = subprocess.run([sys.executable, "-m", "dvidetl", "run", *common, "--quiet", "--json",
                          "--cluster", cluster.scheduler_address],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["blocks"] > 0 and set(doc["not_exported"]) == {"indices", "mapping"}
    assert "label_index, mapping not exported" in run.stderr
    assert "label indices and the mapping are not exported" in run.stderr  # the warning at start
    ver = subprocess.run([sys.executable, "-m", "dvidetl", "verify", *common],
                         capture_output=True, text=True, timeout=300)
    assert ver.returncode == 0, ver.stderr + ver.stdout
    out = ver.stdout + ver.stderr
    assert "OK" in out and "label_index not exported" in out
    status = subprocess.run([sys.executable, "-m", "dvidetl", "status", "--sink", url],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "finished" in status.stdout, status.stderr
    assert "label_index, mapping not exported" in status.stdout
    for what, why in (("--label", "has no label_index (not exported: "), ("--block", "has no 'blocks' table")):
        ins = subprocess.run([sys.executable, "-m", "dvidetl", "inspect", "--sink", url, what, "1,1,1" if what == "--block" else "5"],
                             capture_output=True, text=True, timeout=120)
        assert ins.returncode == 2 and why in ins.stderr and len(ins.stderr.strip().splitlines()) == 1, ins.stderr
    info = json.loads((d / "info").read_text())
    assert info["scales"][0]["size"] == [200, 150, 130] and info["scales"][0]["resolution"] == [8, 8, 8]
    source = open_source(src)
    got = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{d}",
                   "scale_index": 0}).result().read().result()[..., 0]
    assert np.array_equal(got, expected_volume(source, 0, [200, 150, 130], supervoxels=True))


def _one_line(capsys, argv: list[str]) -> str:
    from dvidetl.cli import main as cli

    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("run ")]
    assert len(lines) == 1 and lines[0].startswith(f"dvidetl {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _spec_file(tmp_path, source, name: str, change) -> str:
    info = derive_info(source.info().scales, (8, 8, 8))
    change(info)
    f = tmp_path / name
    f.write_text(json.dumps(info))
    return str(f)


def _murmur(info):
    info["scales"][0]["sharding"]["hash"] = "murmurhash3_x86_128"


def _unsharded(info):
    del info["scales"][1]["sharding"]


def _small_grid(info):
    info["scales"][0]["size"] = [64, 64, 64]


def _few_bits(info):
    info["scales"][0]["sharding"]["shard_bits"] = 0
    info["scales"][0]["sharding"]["preshift_bits"] = 1
    info["scales"][0]["sharding"]["minishard_bits"] = 0


def _offset(info):
    info["scales"][0]["voxel_offset"] = [64, 0, 0]


def _one_scale(info):
    del info["scales"][1:]


def _chunk32(info):
    info["scales"][1]["chunk_sizes"] = [[32, 32, 32]]


def _bad_block_size(info):
    info["scales"][0]["compressed_segmentation_block_size"] = [4, 4, 4]


@pytest.mark.parametrize("query, msg", [
    ("?bogus=1", "unknown parameter(s) ['bogus']"),
    ("?supervoxels=maybe", "must be true or false"),
    ("?resolution=1,2", "must be 3 positive numbers"),
    ("?spec=/nonexistent/spec.json", "cannot read the spec"),
    ("?spec={murmur}", "scatters a shard's chunks over the volume"),
    ("?spec={unsharded}", "unsharded scales are not written"),
    ("?spec={small_grid}", "give different Morton codes"),
    ("?spec={few_bits}", "a shard would be several Morton ranges"),
    ("?spec={bad_block_size}", "compressed_segmentation_block_size must be [8, 8, 8]"),
    ("?spec={offset}", "voxel_offset [64, 0, 0] must be [0, 0, 0]"),
    ("?spec={one_scale}", "the info lists only 1 scales, the source has scale 1"),
    ("?spec={chunk32}", "chunk size [32, 32, 32] is not the source's block size"),
])
def test_bad_precomputed_urls_are_one_line(query, msg, tmp_path, capsys, source):
    specs = {k: _spec_file(tmp_path, source, f"{k}.json", fn) for k, fn in (
        ("murmur", _murmur), ("unsharded", _unsharded), ("small_grid", _small_grid),
        ("few_bits", _few_bits), ("bad_block_size", _bad_block_size), ("offset", _offset),
        ("one_scale", _one_scale), ("chunk32", _chunk32))}
    url = f"precomputed://{tmp_path}/vol" + query.format(**specs)
    line = _one_line(capsys, ["run", "--uuid", UUID, "--source", SRC, "--sink", url, "--dry-run"])
    assert msg in line
    assert not (tmp_path / "vol" / "info").exists()


def test_a_directory_holds_one_volume(exported, tmp_path, capsys):
    """Another export into a directory holding a volume is refused, naming it; so is a file."""
    d, url, _ = exported
    line = _one_line(capsys, ["run", "--uuid", "other", "--source", "synthetic://other?size=128,128,128",
                              "--sink", url, "--dry-run"])
    assert f"holds the volume of segmentation@{UUID}" in line
    (tmp_path / "f").write_text("x")
    assert "is a file" in _one_line(capsys, ["run", "--uuid", UUID, "--source", SRC, "--sink",
                                             f"precomputed://{tmp_path}/f", "--dry-run"])
    assert "names no directory" in _one_line(capsys, ["run", "--uuid", UUID, "--source", SRC,
                                                      "--sink", "precomputed://", "--dry-run"])


# -- exactly once across runs: resume, and --overwrite staged until it finishes ------------

SMALL = "synthetic://pcr?size=260,200,140&scales=2&seed={seed}"


def _small_url(tmp_path) -> str:
    """The volume's URL with a small-shard spec (several partitions per scale)."""
    f = tmp_path / "small-spec.json"
    f.write_text(json.dumps(derive_info(open_source(SMALL.format(seed=1)).info().scales, (8, 8, 8), **SHARD)))
    return f"precomputed://{tmp_path / 'vol'}?spec={f}"


def _partial_run(url: str, source: str, options: RunOptions, done: int):
    """A run planned and prepared as ``dvidetl run`` does, of which only the first ``done``
    partitions are committed (a run killed part way); returns (run, the sink)."""
    from dvidetl.export.api import ExportRun, endpoint
    from dvidetl.export.tasks import _SINKS, export_partition, task_context

    with endpoint(source, uuid="pcr") as ep:
        job = ExportRun(ep, url, options)
        run = job.new_run(job.plan())
        job.sink.prepare(run)
        ctx = task_context(run, ep, url)
        try:
            for p in [p for p in run.partitions if p.kind == "blocks"][:done]:
                assert not export_partition(ctx, p).skipped
        finally:
            _SINKS.clear()
    return run, job.sink


def test_a_killed_run_resumes_and_skips_its_committed_shards(tmp_path, cluster):
    url, src = _small_url(tmp_path), SMALL.format(seed=1)
    run, sink = _partial_run(url, src, RunOptions(), done=2)
    first = {sink.shard_path(run.run_id, p): sink.shard_path(run.run_id, p).stat().st_mtime_ns
             for p in run.partitions if p.kind == "blocks" and sink.is_done(run.run_id, p)}
    assert len(first) == 2 and len(run.partitions) > 2
    res = export(src, url, RunOptions(), uuid="pcr", cluster=cluster.scheduler_address, resume=run.run_id)
    assert res.ok and res.skipped == 2 and res.done == len(run.partitions) - 2
    assert all(f.stat().st_mtime_ns == t for f, t in first.items())  # never rewritten
    rep = verify(src, url, uuid="pcr")
    assert rep.ok and rep.blocks_checked == rep.blocks_source > 0, rep.text()


def test_overwrite_is_staged_until_it_finishes(tmp_path, cluster):
    """``--overwrite`` with another volume of the same shape: until the new run finishes the
    directory holds the old volume byte for byte (a viewer sees it whole); at the finish each
    scale directory is switched, and the new volume verifies against its source."""
    d = tmp_path / "vol"
    url, old_src, new_src = _small_url(tmp_path), SMALL.format(seed=1), SMALL.format(seed=2)
    assert export(old_src, url, RunOptions(), uuid="pcr", cluster=cluster.scheduler_address).ok
    old = {f: f.read_bytes() for f in d.rglob("*.shard") if BOOK_DIR not in f.parts}
    run, sink = _partial_run(url, new_src, RunOptions(overwrite=True), done=10**6)
    assert run.staged and all(sink.is_done(run.run_id, p) for p in run.partitions if p.kind == "blocks")
    assert {f: f.read_bytes() for f in d.rglob("*.shard") if BOOK_DIR not in f.parts} == old
    assert verify(old_src, url, uuid="pcr").ok  # readers still see the old run
    sink.finish(run)
    assert sink.latest_run() == run.run_id
    new = {f: f.read_bytes() for f in d.rglob("*.shard") if BOOK_DIR not in f.parts}
    assert new != old and new
    rep = verify(new_src, url, uuid="pcr")
    assert rep.ok, rep.text()
    assert not verify(old_src, url, uuid="pcr").ok


BOOK_DIR = ".dvidetl"


# -- what the volume cannot hold is said, never dropped ------------------------------------

def test_blocks_outside_the_spec_volume_go_to_export_errors(tmp_path, cluster, source):
    """A spec whose volume is smaller than the source's block grid (same Morton bits): the
    blocks past it cannot be chunks of the volume — each goes to export_errors with why, the
    run exits unclean (errors), and verify counts exactly them as export_errors."""
    info = derive_info(source.info().scales, (8, 8, 8), **SHARD)
    info["scales"][0]["size"] = [300, 250, 130]  # z: 3 chunks (2 bits, as the source's 4)
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(info))
    url = f"precomputed://{tmp_path / 'vol'}?spec={f}"
    res = export(SRC, url, RunOptions(scales=(0,)), uuid=UUID, cluster=cluster.scheduler_address)
    z = np.concatenate([b.column("z").to_numpy() for b in source.read_blocks(0, 0, source.info().scale(0).morton_end)])
    outside = int((z >= 3).sum())
    assert outside > 0 and res.errors == outside and not res.ok and not res.failed
    sink = open_sink(url, uuid=UUID, instance="segmentation")
    errs = sink.read("export_errors")
    assert errs.num_rows == outside and set(errs.column("stage").to_pylist()) == {"transcode"}
    assert all("outside the volume" in r for r in errs.column("reason").to_pylist())
    rep = verify(SRC, url, uuid=UUID)
    assert rep.export_errors == outside and rep.differences == outside, rep.text()
    assert rep.blocks_checked == rep.blocks_source - outside


def test_blocks_only_the_volume_refuses_count_in_its_ledger_alone(tmp_path, cluster, source):
    """The same spec beside a Parquet sink in one run: the blocks past the volume are the
    volume's errors (its export_errors and ledger); the Parquet sink stores them as blocks
    and its ledger counts no error it does not hold. The run's total counts them once."""
    info = derive_info(source.info().scales, (8, 8, 8), **SHARD)
    info["scales"][0]["size"] = [300, 250, 130]
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(info))
    vol, pq = f"precomputed://{tmp_path / 'vol'}?spec={f}", f"parquet://{tmp_path / 'pq'}"
    res = export(SRC, [vol, pq], RunOptions(scales=(0,)), uuid=UUID, cluster=cluster.scheduler_address)
    z = np.concatenate([b.column("z").to_numpy() for b in source.read_blocks(0, 0, source.info().scale(0).morton_end)])
    outside = int((z >= 3).sum())
    assert outside > 0 and res.errors == outside
    sv, sp = (open_sink(u, uuid=UUID, instance="segmentation") for u in (vol, pq))
    led_v, led_p = sv.ledger(res.run_id), sp.ledger(res.run_id)
    assert pa.compute.sum(led_v.column("errors")).as_py() == outside == sv.read("export_errors").num_rows
    assert pa.compute.sum(led_p.column("errors")).as_py() == 0 == sp.read("export_errors").num_rows
    assert sp.read("blocks", scale=0).num_rows == len(z)


def test_a_task_hands_keyed_partitions_only_to_sinks_that_take_them(tmp_path, source):
    """One task context with a tabular and a volume sink: blocks go to both (read once),
    the mapping only to the tabular one — the volume has no table for it and is never
    handed it (``Sink.takes``); writing it there directly is refused."""
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
    from dvidetl.export.planning import make_plan
    from dvidetl.export.tasks import _SINKS, export_partition, task_context
    from dvidetl.flight.server import start_server

    src = open_source(SMALL.format(seed=3))
    server = start_server(src)
    ep = FlightEndpoint(server.location, None, "pcr", None, server, src)
    try:
        pc_url, pq_url = f"precomputed://{tmp_path}/vol", f"parquet://{tmp_path}/pq"
        pc = open_sink(pc_url, uuid="pcr", instance=ep.instance)
        cells = pc.plan_cells(ep.info)
        parts = make_plan(ep.info, ep.client.count, None, None, indices=False, mapping=False,
                          anomalies=False, cells=cells) + [Partition("mapping", 0, 0, 2**64 - 1)]
        run = RunInfo("r1", "pcr", ep.instance, parts, volume=json.loads(ep.info.to_json()))
        pq = open_sink(pq_url, uuid="pcr", instance=ep.instance)
        for s in (pc, pq):
            s.prepare(run)
        ctx = task_context(run, ep, (pc_url, pq_url))
        for p in parts:
            assert not export_partition(ctx, p).skipped
        mp = parts[-1]
        assert pq.is_done("r1", mp) and pq.read("mapping").num_rows > 0
        assert not pc.is_done("r1", mp) and pc.done("r1") == {p.key for p in parts[:-1]}
        assert all(pq.is_done("r1", p) for p in parts)
        with pytest.raises(ValueError, match="does not take mapping partitions"):
            pc.write_partition("r1", mp, {"mapping": pq.read("mapping")}, PartitionStats(mp.key, mp.kind))
        assert export_partition(ctx, mp).skipped  # every sink that takes it has it
    finally:
        _SINKS.clear()
        ep.close()


# -- the real DVID server: the volume equals DVID's own decoding and mapping -----------------

@pytest.mark.parametrize("supervoxels", [False, True])
def test_a_real_dvid_exports_to_the_volume_dvid_itself_reads(dvid_mcns, cluster, tmp_path, supervoxels):
    """The 258 real mCNS blocks posted to the real DVID (which computed scales 1 and 2 and
    its label indices), exported from ``dvid+http://`` into a derived volume: every chunk
    TensorStore reads equals DVID's ``GET /raw`` of that block (DVID's own decoding and
    mapping; supervoxel ids with ``supervoxels=true``), at every scale, and verify is exact."""
    import urllib.parse

    import tensorstore as ts

    v = dvid_mcns
    q = urllib.parse.urlencode({"uuid": v.uuid, "instance": v.name, "backoff": 0.01}, safe=":~,/")
    src = f"dvid+http://{v.server.host}?{q}"
    d = tmp_path / "vol"
    url = f"precomputed://{d}" + ("?supervoxels=true" if supervoxels else "")
    # the fixture's node is read-only for tests but not locked (nothing edits it)
    res = export(src, url, RunOptions(allow_unlocked=True), uuid=v.uuid, cluster=cluster.scheduler_address)
    assert res.ok, res
    info = json.loads((d / "info").read_text())
    n = 0
    for scale in (0, 1, 2):
        vol = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{d}",
                       "scale_index": scale}).result()
        size = info["scales"][scale]["size"]
        blocks = v.server.blocks(v.uuid, v.name, scale, (0, 0, 0), (64, 64, 64))
        assert blocks
        for x, y, z in blocks:
            raw = v.server.get(v.server.node(v.uuid, v.name, f"raw/0_1_2/64_64_64/{x * 64}_{y * 64}_{z * 64}"),
                               scale=str(scale), **({"supervoxels": "true"} if supervoxels else {}))
            want = np.frombuffer(raw, "<u8").reshape(64, 64, 64).transpose(2, 1, 0)
            hi = [min(64, s - 64 * c) for s, c in zip(size, (x, y, z), strict=True)]
            got = vol[x * 64:x * 64 + hi[0], y * 64:y * 64 + hi[1], z * 64:z * 64 + hi[2]].read().result()[..., 0]
            assert np.array_equal(got, want[:hi[0], :hi[1], :hi[2]]), (scale, x, y, z)
            n += 1
    assert n == res.blocks
    rep = verify(src, url, uuid=v.uuid)
    assert rep.ok and rep.blocks_checked == res.blocks, rep.text()


def test_a_shard_is_streamed_in_memory_bounded_by_a_batch_and_its_index(tmp_path, source):
    """The sink holds one batch's chunks and the shard's index (24 bytes a chunk), never the
    shard: writing a partition of 24 batches allocates (tracemalloc: NumPy buffers and Python
    objects) about what writing its largest batch alone does — not the sum over batches,
    which holding the shard would — and the shard is whole."""
    import tracemalloc

    from dvidetl.export.batch import BlockData
    from dvidetl.export.kinds import Partition, PartitionStats, RunInfo
    from dvidetl.export.transform import transform_blocks

    info = source.info()
    si = info.scale(0)
    data, _ = transform_blocks(source.read_blocks(0, 0, si.morton_end), info.codec, source.map_supervoxels,
                               scale=0, grid=si.grid, lo=0, hi=si.morton_end, keep_raw=True)
    t = data.blocks
    assert t.num_rows >= 48
    step = max(1, t.num_rows // 24)
    batches = [t.slice(i, step) for i in range(0, t.num_rows, step)]
    url = f"precomputed://{tmp_path / 'vol'}"  # derived: one shard holds the whole scale
    part = Partition("blocks", 0, 0, si.morton_end, t.num_rows)
    run = RunInfo("r1", info.uuid, info.instance, [part], volume=json.loads(info.to_json()))
    sink = open_sink(url, uuid=info.uuid, instance=info.instance)
    sink.prepare(run)

    def peak(blocks) -> int:
        tracemalloc.start()
        try:
            sink.write_partition("r1", part, BlockData(blocks), PartitionStats(part.key, "blocks"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(batches[0])  # warm up (imports, compiled kernels)
    alone = [peak(b) for b in batches]
    # tracemalloc counts every thread's allocations: in the full suite other fixtures' threads
    # (servers, clients) add to one measurement now and then — noise only adds, so the least
    # of three writes of the whole partition is its own peak
    whole = min(peak(iter(batches)) for _ in range(3))
    chunks = read_shard(sink.shard_path("r1", part).read_bytes(), sink.sharding(0))
    assert 0.9 * t.num_rows <= len(chunks) <= t.num_rows  # whole (all-background chunks: none)
    assert whole < 1.25 * max(alone) + 64 * 1024, (whole, max(alone))
    assert sum(alone) > 4 * whole  # holding every batch would have shown


def test_dvidetl_view_serves_the_exported_volume(exported, source):
    """``dvidetl view``'s server over what this sink wrote: TensorStore reads it back over
    HTTP (Range requests on the shards), voxel for voxel, and the link opens it."""
    import tensorstore as ts

    from dvidetl.read.view import DATA_PREFIX, start_view

    d, _, _ = exported
    size = json.loads((d / "info").read_text())["scales"][1]["size"]
    with start_view(d) as v:
        st = ts.open({"driver": "neuroglancer_precomputed", "scale_index": 1,
                      "kvstore": {"driver": "http", "base_url": f"{v.server.url}{DATA_PREFIX}/"}},
                     context=ts.Context()).result()
        got = st[..., 0].read().result()
        assert "precomputed" in v.link
    assert np.array_equal(got, expected_volume(source, 1, size))
