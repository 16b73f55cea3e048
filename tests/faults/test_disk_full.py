"""Disk full under the Parquet sink: a real size-limited tmpfs (we run as root; CI too). The
run reports the partitions that hit ENOSPC with a clear reason, leaves no partial file
(visible or hidden temp), and ``--resume`` completes once space is back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sources import open_source

from ._support import verify_and_record
from .conftest import VOLUME


def _mount(path: Path, size: str, remount: bool = False) -> str | None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exit {p.returncode}")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (the export needs ~2.6 MB): skipped only where mounting is impossible
    (not root / no CAP_SYS_ADMIN), with the reason."""
    d = tmp_path / "fs"
    d.mkdir()
    why = _mount(d, "1m")
    if why is not None:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({why}); needs root with "
                    "CAP_SYS_ADMIN")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_then_resume(small_fs, cluster, tmp_path, nodeid, capsys):
    src = open_source(f"synthetic://df?{VOLUME}")
    sink = f"parquet://{small_fs}/out"
    with start_server(src) as srv:
        common = ["--uuid", "df", "--flight", srv.location, "--sink", sink,
                  "--cluster", cluster.scheduler_address, "--quiet"]
        rc = cli(["run", *common, "--partition-blocks", "8", "--retries", "1"])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "No space left on device" in err and "--resume" in err
        assert "Traceback" not in err
        # nothing partial: every file is a complete Parquet file, no temp file is left over
        files = [p for p in small_fs.rglob("*") if p.is_file()]
        hidden = [p for p in files if p.name.startswith(".")]
        assert not hidden, f"temp files left behind: {hidden[:5]}"
        for p in files:
            if p.suffix == ".parquet":
                pq.read_metadata(p)  # raises on a truncated file
        run_id = next((small_fs / "out" / "segmentation" / "df" / "runs").iterdir()).name
        from dvidetl.sinks import open_sink

        s = open_sink(sink, uuid="df", instance="segmentation")
        ndone, nplan = len(s.done(run_id)), len(s.load_run(run_id).partitions)
        assert 0 < ndone < nplan, (ndone, nplan)
        # space comes back: resume finishes, verify finds the export exact
        assert _mount(small_fs, "64m", remount=True) is None
        rc = cli(["run", *common, "--resume", run_id])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert f"{ndone:,} already done" in err
        o = verify_and_record(nodeid, "disk full (1 MiB tmpfs) -> resume with space",
                              location=srv.location, uuid="df", sink_url=sink, runs=2,
                              run_id=run_id)
    src.close()
    assert o.exact, o.report.text()
