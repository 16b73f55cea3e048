"""Bad input: a corpus of corrupt stored blocks (dvidetl.testing.corrupt) mixed into a real
synthetic volume served over Flight, stored as gzip (DVID's default), lz4 and zstd. Each bad
block lands in export_errors with its coordinates, stage and reason; every good block is
exported byte-exact; the summary and the exit code report the count; ``--max-errors N``
stops the run early."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.testing.corrupt import KINDS, CorruptSource, corrupt

from ._support import verify_and_record
from .conftest import VOLUME

#: what the reason of each kind starts with (block errors vs storage-wrapper errors)
WRAPPER_KINDS = {"bad_wrapper", "bad_stream", "random"}


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_corpus_values_fail_as_documented(codec, shared_data):
    """Every kind from a real DVID block (FIB-19 sample, Go's encoder) and a synthetic one."""
    from dvidetl.codec import BlockFormatError, decode_block, unwrap, wrap

    real = unwrap((shared_data / "dvid" / "fib19-64x64x64-sample1-block.dat.gz").read_bytes(),
                  "gzip")
    for raw in (real,):
        good = wrap(raw, codec)
        for kind in KINDS:
            for seed in range(3):
                bad = corrupt(good, kind, codec, seed)
                assert bad != good
                with pytest.raises(BlockFormatError):
                    decode_block(unwrap(bad, codec))


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_corrupt_blocks_land_in_export_errors(codec, cluster, tmp_path, nodeid, capsys):
    src = CorruptSource(open_source(f"synthetic://cb?{VOLUME}"), rate=0.08, seed=11, codec=codec)
    sink = f"parquet://{tmp_path}/out"
    with start_server(src) as srv:
        common = ["--uuid", "cb", "--flight", srv.location, "--sink", sink,
                  "--cluster", cluster.scheduler_address, "--partition-blocks", "8", "--quiet"]
        rc = cli(["run", *common])
        err = capsys.readouterr().err
        bad = dict(src.corrupted)
        assert len(bad) >= 8 and set(bad.values()) == set(KINDS), bad
        assert rc == 1
        assert re.search(rf"errors\s+{len(bad)} blocks in export_errors", err), err
        assert f"{len(bad)} blocks could not be exported" in err
        e = open_sink(sink, uuid="cb", instance="segmentation").read("export_errors")
        e = e.filter(e.column("part").to_numpy() == 0)
        got = {(r["scale"], r["morton"]): r for r in e.to_pylist()}
        assert set(got) == set(bad)
        info = src.info()
        from dvidetl.geometry import morton_decode

        for (scale, m), kind in bad.items():
            r = got[(scale, m)]
            x, y, z = morton_decode(np.array([m], np.uint64), info.scale(scale).grid)
            assert (r["x"], r["y"], r["z"]) == (int(x[0]), int(y[0]), int(z[0]))
            assert r["stage"] == "repack" and r["reason"]
            if kind not in WRAPPER_KINDS:
                assert r["reason"].startswith("block:"), (kind, r["reason"])
            elif kind == "bad_wrapper":
                assert r["reason"].startswith(f"{codec}:"), (kind, r["reason"])
        o = verify_and_record(nodeid, f"corrupt blocks ({codec}, {len(KINDS)} kinds, 8 %)",
                              location=srv.location, uuid="cb", sink_url=sink, runs=1,
                              expect_errors=len(bad))
        assert o.exact, o.report.text()
        if codec == "gzip":
            # --max-errors: the run stops submitting once the count is passed
            rc = cli(["run", *common[:5], f"parquet://{tmp_path}/capped", *common[6:],
                      "--max-errors", "2"])
            err = capsys.readouterr().err
            assert rc == 1 and "aborted: more than 2 block errors" in err
            s = open_sink(f"parquet://{tmp_path}/capped", uuid="cb", instance="segmentation")
            run_id = s.latest_run()
            assert len(s.done(run_id)) < len(s.load_run(run_id).partitions)
    src.close()
