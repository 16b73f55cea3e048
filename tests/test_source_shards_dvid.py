"""shards:// against DVID's own ``export-shards``, run at test time on the real server.

The directories are written by DVID (``../shared/dvid/bin/dvid``), the way its users make
them: a first export, reruns into the same directory after merges, after a supervoxel
split and with a different block set (DVID appends a whole new stream to each shard and
truncates the sidecars), an export whose shard shape is not a cube (several writers append
to one file), and exports killed mid-way (SIGKILL of the server). Each is read through
``shards://`` and every block and mapping pair compared with what DVID itself serves over
HTTP for the same node at that moment (``DvidServer.blocks`` / ``.mappings``): the current
export exactly, never a superseded copy, and everything else reported.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from dvidetl.codec import decode_block, encode_block
from dvidetl.sources.shards import ShardsSource
from dvidetl.testing.dvid_server import DvidServer, mcns_blocks

NAME = "seg"
#: a 2048^3 volume: scale 0 grid 32^3, scale 1 16^3; shards of 4^3 chunks (preshift 3 +
#: minishard 3 bits: a cube); the 258 real mCNS blocks fall into 12 shards at scale 0
SIZE = 2048


def spec(scales: int = 2, preshift: int = 3, minishard: int = 3) -> dict:
    sharding = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
                "preshift_bits": preshift, "minishard_bits": minishard, "shard_bits": 9,
                "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
    return {"@type": "neuroglancer_multiscale_volume", "type": "segmentation",
            "data_type": "uint64", "num_channels": 1,
            "scales": [{"chunk_sizes": [[64, 64, 64]], "encoding": "compressed_segmentation",
                        "key": f"s{s}", "resolution": [8 << s] * 3, "size": [SIZE >> s] * 3,
                        "voxel_offset": [0, 0, 0], "sharding": sharding} for s in range(scales)]}


@dataclass
class Stage:
    """A snapshot of the export directory after one DVID export, with DVID's own answers
    for the node at that moment."""

    dir: Path
    spec: Path
    blocks: dict  # scale -> {(x, y, z): raw DVID block} of the non-zero blocks DVID serves
    mapping: dict  # supervoxel -> body, DVID's /mappings


def _table(block: bytes) -> np.ndarray:
    """The label table of a raw DVID block (what DVID's exporter maps to bodies)."""
    return np.frombuffer(block[16:16 + 8 * int.from_bytes(block[12:16], "little")], "<u8")


def _dvid_answers(d: DvidServer, uuid: str, scales: int = 2) -> tuple[dict, dict]:
    mapping = dict(map(tuple, d.mappings(uuid, NAME).tolist()))
    blocks = {}
    for s in range(scales):
        got = d.blocks(uuid, NAME, s, (0, 0, 0), (SIZE // 64 >> s,) * 3)
        # DVID serves every stored block; its exporter skips those whose labels all map to
        # 0 (all-zero blocks, and blocks of supervoxels a split retired)
        blocks[s] = {k: v for k, v in got.items() if any(mapping.get(sv, sv) for sv in _table(v).tolist())}
    return blocks, mapping


def _snapshot(work: Path, to: Path, d: DvidServer, uuid: str, scales: int = 2) -> Stage:
    shutil.copytree(work, to)  # copy2: the files keep their times (export.log is judged by them)
    sp = to.parent / f"{to.name}-spec.json"
    shutil.copy2(work.parent / f"{work.name}-spec.json", sp)
    return Stage(to, sp, *_dvid_answers(d, uuid, scales))


def _supervoxels(blocks) -> tuple[np.ndarray, np.ndarray]:
    """Each supervoxel of the label tables, with the number of blocks it is in."""
    svs = np.concatenate([np.unique(_table(b)) for b in blocks])
    u, c = np.unique(svs[svs != 0], return_counts=True)
    return u, c


def _runs(vol: np.ndarray, sv: int, origin) -> np.ndarray:
    """(x, y, z, length) runs along x of ``sv``'s voxels in a block at voxel ``origin``."""
    out = []
    for z, y in zip(*np.nonzero((vol == sv).any(axis=2)), strict=True):
        row = np.concatenate([[0], (vol[z, y] == sv).astype(np.int8), [0]])
        starts = np.flatnonzero(np.diff(row) == 1)
        ends = np.flatnonzero(np.diff(row) == -1)
        out += [(origin[0] + a, origin[1] + y, origin[2] + z, b - a) for a, b in zip(starts, ends, strict=True)]
    return np.asarray(out, np.int64)


@pytest.fixture(scope="module")
def stages(dvid_server, dvid_mcns, tmp_path_factory) -> dict[str, Stage]:
    """DVID exports a node of its own, edits it and exports again into the same directory,
    four times; a snapshot after each (and one non-cubic export beside them)."""
    d = dvid_server
    tmp = tmp_path_factory.mktemp("shards-dvid")
    uuid = d.new_repo("shards-reruns")
    d.new_labelmap(uuid, NAME, max_downres=1)
    d.post_blocks(uuid, NAME, dvid_mcns.coords, dvid_mcns.blocks)
    d.wait_indexed(uuid, NAME, dvid_mcns.voxels)
    svs, nblocks = _supervoxels(dvid_mcns.blocks)
    common = svs[np.argsort(-nblocks, kind="stable")]  # the supervoxels in most blocks first
    work = tmp / "export"
    out = {}

    d.merge(uuid, NAME, int(common[0]), [int(v) for v in common[1:4]])
    d.export_shards(uuid, NAME, spec(), work, 2)
    out["first"] = _snapshot(work, tmp / "first", d, uuid)
    d.export_shards(uuid, NAME, spec(preshift=3, minishard=2), tmp / "noncubic", 2)
    out["noncubic"] = _snapshot(tmp / "noncubic", tmp / "noncubic-snap", d, uuid)

    d.merge(uuid, NAME, int(common[4]), [int(v) for v in common[5:9]])
    d.export_shards(uuid, NAME, spec(), work, 2)
    out["merged"] = _snapshot(work, tmp / "merged", d, uuid)

    # split a supervoxel: its voxels in one block become a new supervoxel
    sv = int(common[10])
    k = next(i for i, b in enumerate(dvid_mcns.blocks) if (decode_block(b) == sv).sum() > 100)
    origin = [int(v) * 64 for v in dvid_mcns.coords[k]]
    d.split_supervoxel(uuid, NAME, sv, _runs(decode_block(dvid_mcns.blocks[k]), sv, origin))
    d.export_shards(uuid, NAME, spec(), work, 2)
    out["split"] = _snapshot(work, tmp / "split", d, uuid)

    # a different block set: the blocks of one shard become zero (DVID's exporter skips
    # them, so that shard's file is not rewritten) and blocks appear where there were none
    c = dvid_mcns.coords
    gone = c[(c[:, 0] // 4 == 5) & (c[:, 1] // 4 == 7) & (c[:, 2] // 4 == 7)]
    assert len(gone) > 1
    zero = encode_block(np.zeros((64, 64, 64), np.uint64))
    d.post_blocks(uuid, NAME, gone, [zero] * len(gone))
    new = [i for i, b in enumerate(dvid_mcns.blocks) if sv not in _table(b)][:24]
    d.post_blocks(uuid, NAME, c[new] - np.array([16, 0, 0], np.int32), [dvid_mcns.blocks[i] for i in new])
    d.export_shards(uuid, NAME, spec(), work, 2)
    out["blockset"] = _snapshot(work, tmp / "blockset", d, uuid)
    out["blockset"].gone = gone
    return out


def _served(src: ShardsSource, scale: int) -> dict:
    t = pa.Table.from_batches(list(src.read_blocks(scale, 0, 1 << 64)))
    dz = zstandard.ZstdDecompressor()
    return {k: dz.decompress(v) for k, v in zip(
        zip(t["x"].to_pylist(), t["y"].to_pylist(), t["z"].to_pylist(), strict=True),
        t["data"].to_pylist(), strict=True)}


def _check_against_dvid(src: ShardsSource, st: Stage, scales=(0, 1)) -> None:
    """Every block and mapping pair the source serves is DVID's for the node, and nothing
    DVID serves is missing."""
    for s in scales:
        got = _served(src, s)
        assert set(got) == set(st.blocks[s]), f"scale {s}: blocks differ from DVID's"
        assert all(got[k] == st.blocks[s][k] for k in got), f"scale {s}: bytes differ from DVID's"
    mt = pa.Table.from_batches(list(src.read_mapping()))
    pairs = dict(zip(mt["supervoxel"].to_pylist(), mt["body"].to_pylist(), strict=True))
    present = set()
    for b in st.blocks[0].values():
        present |= set(_table(b).tolist())
    want = {sv: body for sv, body in st.mapping.items() if sv in present and sv != body}
    assert pairs == want
    assert want, "the node has merges: its mapping must not be empty"


def _records(path: Path) -> int:
    """Records of the first stream of a file (the test's own count, by pyarrow)."""
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as mm:
        return ipc.open_stream(mm).read_all().num_rows


def test_first_export_is_dvids(stages):
    st = stages["first"]
    src = ShardsSource(st.dir, spec=str(st.spec))
    assert src.anomalies == []  # a finished export, as DVID wrote it: nothing to report
    files = sorted(st.dir.glob("s*/*.arrow"))
    assert len(list(st.dir.glob("s0/*.arrow"))) >= 6 and len(list(st.dir.glob("s1/*.arrow"))) >= 2
    assert sum(_records(f) for f in files) == len(st.blocks[0]) + len(st.blocks[1])
    _check_against_dvid(src, st)


def test_rerun_after_merges_exports_the_new_labels(stages):
    """DVID appended a second stream to every shard and rewrote the sidecars: the second
    stream is exported (same blocks, new labels), the first counted as superseded."""
    st, first = stages["merged"], stages["first"]
    src = ShardsSource(st.dir, spec=str(st.spec))
    files = sorted(st.dir.glob("s*/*.arrow"))
    assert {a["kind"] for a in src.anomalies} == {"superseded"}
    sup = [a for a in src.anomalies if a["kind"] == "superseded"]
    assert sorted(a["file"] for a in sup) == sorted(str(f.relative_to(st.dir)) for f in files)
    assert sum(a["blocks"] for a in sup) == len(first.blocks[0]) + len(first.blocks[1])
    assert not any(a["lost"] for a in sup)
    assert st.mapping != first.mapping  # the merge changed DVID's answer ...
    _check_against_dvid(src, st)  # ... and the export has the new one


def test_rerun_after_a_split_exports_the_new_blocks(stages):
    st = stages["split"]
    src = ShardsSource(st.dir, spec=str(st.spec))
    assert {a["kind"] for a in src.anomalies} == {"superseded"}
    files = sorted(st.dir.glob("s*/*.arrow"))
    assert len(src.anomalies) == 2 * len(files)  # two earlier runs in every file
    changed = {k for k, v in st.blocks[0].items() if v != stages["merged"].blocks[0].get(k)}
    assert changed  # the split rewrote blocks ...
    _check_against_dvid(src, st)  # ... and the export holds DVID's new bytes


def test_rerun_with_a_different_block_set(stages):
    """The shard whose blocks all became zero is not rewritten by the rerun: export.log
    tells its file is left over from an earlier run, so its blocks are not exported."""
    st = stages["blockset"]
    src = ShardsSource(st.dir, spec=str(st.spec))
    stale = [a for a in src.anomalies if a["kind"] == "stale_file"]
    assert [a["file"] for a in stale] == ["s0/1280_1792_1792.arrow"]
    assert stale[0]["blocks"] == len(st.gone) and not stale[0]["lost"]
    assert {a["kind"] for a in src.anomalies} == {"superseded", "stale_file"}
    new = {str(f.relative_to(st.dir)) for f in st.dir.glob("s0/*.arrow")} - {
        str(f.relative_to(stages["split"].dir)) for f in stages["split"].dir.glob("s0/*.arrow")}
    assert new and not {a["file"] for a in src.anomalies} & new  # new shards: one stream each
    _check_against_dvid(src, st)
    # without export.log the leftover file cannot be told apart: it is exported, and that said
    os.unlink(st.dir / "export.log")
    src = ShardsSource(st.dir, spec=str(st.spec))
    assert {a["kind"] for a in src.anomalies} == {"superseded", "no_export_log"}
    assert len(_served(src, 0)) == len(st.blocks[0]) + len(st.gone)


def test_noncubic_shards_interleave_writers(stages):
    """A shard shape that is not a cube (preshift + minishard bits not a multiple of 3) makes
    DVID give several shards one file name: their writers append to the file in turns or at
    once, and each rewrites the sidecar. Their streams are read as one run (every block of
    a whole stream is served, as DVID serves it); where two writers tore each other's
    messages apart the rest of the file is unreadable (or a torn header claims bytes past
    its end), and reported as lost blocks."""
    st = stages["noncubic"]
    src = ShardsSource(st.dir, spec=str(st.spec))
    kinds = {a["kind"] for a in src.anomalies}
    assert "interleaved" in kinds
    # a record torn by another writer's bytes may still parse but not decode: bad_record
    assert kinds <= {"interleaved", "dangling_row", "unlisted", "bad_sidecar", "unreadable",
                     "bad_record",
                     "truncated", "unterminated", "export_log_mismatch"}, src.anomalies
    assert "superseded" not in kinds  # one run: no stream of it is taken for an older one
    lost = {a["file"] for a in src.anomalies if a["lost"] and a["file"] != "export.log"}
    # export.log's count disagrees exactly when messages were torn
    assert ("export_log_mismatch" in kinds) == bool(lost)
    for s in (0, 1):
        got, ref = _served(src, s), st.blocks[s]
        assert set(got) <= set(ref) and all(got[k] == ref[k] for k in got)
        # a block DVID serves but the export lacks is in a file reported as losing blocks:
        # the file DVID named by the shard origin (its shard side here is 4 chunks = 256 voxels)
        for x, y, z in set(ref) - set(got):
            assert f"s{s}/{x // 4 * 256}_{y // 4 * 256}_{z // 4 * 256}.arrow" in lost
    mt = pa.Table.from_batches(list(src.read_mapping()))
    pairs = dict(zip(mt["supervoxel"].to_pylist(), mt["body"].to_pylist(), strict=True))
    assert pairs and all(st.mapping[sv] == body for sv, body in pairs.items())


# --------------------------------------------------------------------- killed exports
def _has_eos(path: Path) -> bool:
    return path.read_bytes()[-8:] == b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _killed_before_the_end(where: Path, nfiles: int) -> None:
    """The test's precondition, checked loudly: the kill landed before DVID finished."""
    if (where / "export.log").exists():
        pytest.fail(f"the kill landed after DVID finished the export into {where}: nothing "
                    "killed to test (make the volume bigger)")
    files = list((where / "s0").glob("*.arrow"))
    if len([f for f in files if f.stat().st_size and _has_eos(f)]) == nfiles:
        pytest.fail(f"every shard in {where} is finished: the kill landed after the last one")


def _kill_when(d: DvidServer, ready, timeout: float = 60.0) -> None:
    """SIGKILL the server as soon as ``ready()`` holds (polled, not slept)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail("export-shards never reached the state to kill it in")
        time.sleep(0.001)
    d.kill()


@pytest.fixture(scope="module")
def killed(tmp_path_factory, shared_data):
    """A server of its own (it is killed twice): 1,032 real blocks (the mCNS blocks four
    times over), exported once whole, then killed mid-way into a fresh directory and mid-way
    through a rerun into the whole export's directory."""
    tmp = tmp_path_factory.mktemp("killed")
    coords, blocks = mcns_blocks(shared_data)
    coords = np.concatenate([coords - np.array([0, dy, 0], np.int32) for dy in (0, 3, 6, 9)])
    blocks = blocks * 4
    d = DvidServer(tmp / "dvid").start()
    try:
        uuid = d.new_repo("killed")
        d.new_labelmap(uuid, NAME, max_downres=0)
        d.post_blocks(uuid, NAME, coords, blocks, downres=False, noindexing=True)
        ref, _ = _dvid_answers(d, uuid, scales=1)
        assert len(ref[0]) == len(coords)
        whole = tmp / "whole"
        d.export_shards(uuid, NAME, spec(scales=1), whole, 1)
        nfiles = len(list((whole / "s0").glob("*.arrow")))
        log = (whole / "export.log").read_bytes()
        log_time = (whole / "export.log").stat().st_mtime
        sizes = {f: f.stat().st_size for f in (whole / "s0").glob("*.arrow")}

        fresh = tmp / "fresh"
        d.export_shards(uuid, NAME, spec(scales=1), fresh, 1, wait=False)
        _kill_when(d, lambda: (fresh / "s0").is_dir() and len(
            [f for f in (fresh / "s0").glob("*.arrow") if f.stat().st_size]) >= nfiles // 3)
        _killed_before_the_end(fresh, nfiles)
        d.start()
        d.export_shards(uuid, NAME, spec(scales=1), whole, 1, wait=False)  # a rerun ...
        _kill_when(d, lambda: sum(f.stat().st_size > n for f, n in sizes.items()) >= nfiles // 3)
        _killed_before_the_end(whole, nfiles)
        # ... killed: DVID had not rewritten export.log yet (the fixture removed it to wait
        # for the new one; DVID itself leaves the last export's log in place until the end)
        (whole / "export.log").write_bytes(log)
        os.utime(whole / "export.log", (log_time, log_time))
    finally:
        d.stop()
    return {"ref": ref[0], "fresh": fresh, "rerun": whole, "spec": spec(scales=1), "nfiles": nfiles,
            "sizes": sizes}


def _spec_file(tmp_path: Path, sp: dict) -> str:
    import json

    p = tmp_path / "spec.json"
    p.write_text(json.dumps(sp))
    return str(p)


def test_killed_export_is_exported_as_far_as_written(killed, tmp_path):
    """A first export killed mid-way: the shards it finished, and every record it wrote
    whole in the shards it was writing, are served byte for byte as DVID serves them; a cut
    record, a stream without its end marker, an empty shard or sidecar are reported as lost
    blocks; nothing is refused."""
    src = ShardsSource(killed["fresh"], spec=_spec_file(tmp_path, killed["spec"]))
    kinds = {a["kind"] for a in src.anomalies}
    assert "no_export_log" in kinds
    assert kinds & {"unterminated", "truncated", "empty_file"}, src.anomalies
    assert kinds <= {"no_export_log", "unterminated", "truncated", "empty_file", "empty_sidecar",
                     "bad_sidecar", "unlisted"}, src.anomalies
    got = _served(src, 0)
    ref = killed["ref"]
    assert got and set(got) < set(ref)
    assert all(got[k] == ref[k] for k in got)
    # every record wholly written is served: the count is what pyarrow reads of each stream
    n = 0
    for f in (killed["fresh"] / "s0").glob("*.arrow"):
        import pyarrow.ipc as ipc

        try:
            for b in ipc.open_stream(pa.BufferReader(f.read_bytes())):
                n += b.num_rows
        except (OSError, pa.ArrowInvalid, StopIteration):
            pass  # a cut record, or an empty file
    assert len(got) == n
    for a in src.anomalies:
        if a["kind"] == "truncated" and a["block"] is not None:
            assert a["block"] in ref and a["block"] not in got and a["lost"]
    assert all(a["lost"] for a in src.anomalies if a["kind"] in ("unterminated", "truncated", "empty_file"))


def test_killed_rerun_exports_only_current_streams(killed, tmp_path):
    """A rerun killed mid-way over a finished export (its export.log older than the shards
    the rerun touched): no superseded copy is exported — a shard the rerun had begun serves
    only what the rerun wrote — and the unfinished run is reported."""
    src = ShardsSource(killed["rerun"], spec=_spec_file(tmp_path, killed["spec"]))
    kinds = {a["kind"] for a in src.anomalies}
    assert "unfinished_export" in kinds and "superseded" in kinds
    assert all(a["lost"] for a in src.anomalies if a["kind"] == "unfinished_export")
    got = _served(src, 0)
    ref = killed["ref"]
    assert all(got[k] == ref[k] for k in got)
    import pyarrow.ipc as ipc

    for f, n in killed["sizes"].items():
        data = f.read_bytes()
        if len(data) == n:  # not touched by the rerun: its one stream is exported whole
            continue
        tail = pa.BufferReader(data[n:])
        rerun = set()
        try:
            for b in ipc.open_stream(tail):
                rerun |= set(zip(b["chunk_x"].to_pylist(), b["chunk_y"].to_pylist(), b["chunk_z"].to_pylist(),
                                 strict=True))
        except (OSError, pa.ArrowInvalid):
            pass
        first = set()
        for b in ipc.open_stream(pa.BufferReader(data[:n])):
            first |= set(zip(b["chunk_x"].to_pylist(), b["chunk_y"].to_pylist(), b["chunk_z"].to_pylist(),
                             strict=True))
        # of this shard, exactly the blocks the rerun wrote whole are served
        assert {k for k in got if k in first | rerun} == rerun, f.name


# --------------------------------------------------------------------- stored with the export
def _run(src_url: str, uuid: str, sink: str, cluster, *more: str) -> int:
    from dvidetl.cli import main as cli

    return cli(["run", "--uuid", uuid, "--source", src_url, "--sink", sink, "--cluster",
                cluster.scheduler_address, "--quiet", *more])


def test_run_stores_the_anomalies_and_verify_checks_them(stages, cluster, tmp_path, capsys):
    """A rerun directory exported through the whole pipeline: the blocks are DVID's, the
    superseded copies are rows of source_anomalies equal to what the source reports, the
    run is OK (nothing lost), and verify checks the stored rows — a deleted row is exactly
    one difference."""
    import pyarrow.parquet as pq

    from dvidetl.cli import main as cli
    from dvidetl.read import open_export
    from dvidetl.sinks import open_sink

    st = stages["merged"]
    url = f"shards://{st.dir}?spec={st.spec}"
    sink = f"parquet://{tmp_path}/out"
    assert _run(url, "merged", sink, cluster) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    files = len(list(st.dir.glob("s*/*.arrow")))
    assert f"anomalies   {files} in the source (superseded {files})" in err
    s = open_sink(sink, uuid="merged", instance="segmentation")
    stored = s.read("source_anomalies")
    want = ShardsSource(st.dir, spec=str(st.spec)).anomalies_table()
    assert set(stored["run_id"].to_pylist()) == {s.latest_run()}
    assert stored.drop_columns(["run_id"]).sort_by("seq").equals(want)
    ex = open_export(sink, uuid="merged")
    for scale in (0, 1):  # the exported blocks are DVID's current ones
        t = ex.read("blocks", scale=scale, columns=["x", "y", "z", "crc32"])
        assert len(t) == len(st.blocks[scale])
    assert cli(["verify", "--uuid", "merged", "--source", url, "--sink", sink, "--in-process"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"anomalies   {files} in the source (superseded {files}), stored in source_anomalies; 0 differences" in out
    assert cli(["inspect", "--sink", sink, "--anomalies"]) == 0
    out = capsys.readouterr().out
    assert f"source anomalies: {files} in the source (superseded {files})" in out and "stream 1 of 2" in out
    # tamper: one stored anomaly row gone
    (f,) = sorted((tmp_path / "out").rglob("source_anomalies/**/*.parquet"))
    t = pq.read_table(f)
    pq.write_table(t.slice(1), f)
    assert cli(["verify", "--uuid", "merged", "--source", url, "--sink", sink, "--in-process"]) == 1
    out = capsys.readouterr().out
    assert "; 1 differences" in out and "source_anomalies seq 0: stored None" in out
    # the same run as a dvidetl before source_anomalies stored it: no anomalies partition in
    # its plan, no rows. Readers see none; verify says the source reports what it lacks
    import json

    run_id = s.latest_run()
    root = tmp_path / "out" / "segmentation" / "merged"
    plan = json.loads((root / "runs" / run_id / "run.json").read_text())
    (key,) = [f"anomalies-s0-{p['lo']:016x}-{p['hi']:016x}" for p in plan["partitions"] if p["kind"] == "anomalies"]
    plan["partitions"] = [p for p in plan["partitions"] if p["kind"] != "anomalies"]
    (root / "runs" / run_id / "run.json").write_text(json.dumps(plan))
    (root / "export_ledger" / run_id / f"{key}.parquet").unlink()
    f.unlink()
    assert cli(["inspect", "--sink", sink, "--anomalies"]) == 0
    assert "none stored with this run" in capsys.readouterr().out
    assert cli(["verify", "--uuid", "merged", "--source", url, "--sink", sink, "--in-process"]) == 1
    out = capsys.readouterr().out
    assert f"the source reports {files} anomalies that run {run_id} did not store" in out


def test_killed_export_run_says_blocks_are_lost(killed, cluster, tmp_path, capsys):
    """A killed export through the pipeline: every block it holds is exported, the run ends
    with exit 1 saying the source lacks blocks, inspect lists the lost ones first (with the
    block of a cut record), verify finds the export equal to the source (the anomalies are
    reported, not differences), and the dashboard page shows them per kind."""
    from test_dashboard import _browse, _Rows, _state

    from dvidetl.cli import main as cli
    from dvidetl.sinks import open_sink

    url = f"shards://{killed['fresh']}?spec={_spec_file(tmp_path, killed['spec'])}"
    src = ShardsSource(killed["fresh"], spec=_spec_file(tmp_path, killed["spec"]))
    lost = sum(a["lost"] for a in src.anomalies)
    sink = f"parquet://{tmp_path}/out"
    assert _run(url, "killed", sink, cluster) == 1
    err = capsys.readouterr().err
    assert f"{lost} of them lose blocks" in err and "the source lacks blocks it should hold" in err
    s = open_sink(sink, uuid="killed", instance="segmentation")
    assert s.read("blocks", scale=0).num_rows == len(_served(src, 0))
    assert cli(["inspect", "--sink", sink, "--anomalies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split(":")[0].endswith("[LOST BLOCKS]")
    cut = [a for a in src.anomalies if a["kind"] == "truncated" and a["block"]]
    if cut:  # the kill cut a record whose coordinates were written: inspect names it
        x, y, z = cut[0]["block"]
        assert cli(["inspect", "--sink", sink, "--block", f"{x},{y},{z}"]) == 1
        assert "source anomaly: truncated [LOST BLOCKS]" in capsys.readouterr().out
    assert cli(["verify", "--uuid", "killed", "--source", url, "--sink", sink, "--in-process"]) == 0
    assert f"{lost} of them lose blocks, stored in source_anomalies; 0 differences" in capsys.readouterr().out
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    state = _state(base)
    assert state["anomalies"] == src.anomaly_counts() and state["anomalies_lost"] == lost
    page = _Rows()
    page.feed(_browse(base + "/dvidetl", "--dump-dom"))
    text = " ".join(page.text)
    assert f"({lost} lose blocks: see source_anomalies)" in text
    assert all(k in text for k in src.anomaly_counts())
