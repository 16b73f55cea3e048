"""Bad input at the command line (run, plan, verify, serve): a one-line error that says what
to fix, exit code 2, never a traceback. Extends tests/test_cli.py (sink scheme, scales,
partition size, token file, --flight scheme, unknown run) and tests/test_flight.py /
test_flight_protocol.py (tickets on the wire); the cases here are the rest: source URLs,
sink URLs, UUIDs, instances, unreachable servers and schedulers, numeric options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dvidetl.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _one_line(capsys, argv: list[str]) -> str:
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("run ")]
    assert len(lines) == 1 and lines[0].startswith(f"dvidetl {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, msg",
    [
        # source URLs (the embedded server's --source)
        (["--source", "nope://x"], "unknown source URL scheme"),
        (["--source", "synthetic://x?size=abc"], "size='abc' must be X,Y,Z"),
        (["--source", "synthetic://x?bogus=1"], "unknown parameter(s) ['bogus']"),
        (["--source", "synthetic://x?scales=0"], "scales=0 out of range"),
        (["--source", "shards:///nonexistent/dvidetl-dir"], "does not exist"),
        (["--source", "shards:///tmp?bogus=1"], "unknown parameter"),
        # sink URLs
        (["--sink", "parquet://"], "names no directory"),
        (["--sink", "flaky+parquet://x?rate=2"], "rate"),
        (["--sink", "vastdb://nohost"], "BUCKET/SCHEMA"),
        # UUIDs and instances the server does not serve / that are not names
        (["--uuid", "other", "--source", "synthetic://demo"], "'other' is not served here"),
        (["--uuid", "a b"], "not a version UUID"),
        (["--uuid", "../../etc", "--sink", "parquet://{tmp}/o"], "cannot be used as a directory"),
        (["--instance", "grayscale"], "'grayscale' is not served here"),
        # numeric options
        (["--cell-limit", "10"], "--cell-limit"),
        (["--zstd-level", "99"], "--zstd-level"),
        (["--max-errors", "-1"], "--max-errors"),
        (["--retries", "-1"], "--retries"),
        (["--scales", "-1"], "not in the volume"),
        (["--partition-blocks", "-5"], "--partition-blocks"),
    ],
)
def test_run_dry_run_bad_input(argv, msg, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = ["run", "--uuid", "x" if any(a.startswith("synthetic://x") for a in argv) else "demo"]
    if "--uuid" in argv:
        base = ["run"]
    line = _one_line(capsys, [*base, *argv, "--dry-run"])
    assert msg in line


def test_nothing_listening_at_flight(capsys):
    import socket

    with socket.socket() as s:  # a port that is free: nothing serves there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_line(capsys, ["plan", "--uuid", "demo", "--flight", f"grpc://127.0.0.1:{port}"])
    assert f"grpc://127.0.0.1:{port}" in line and "--flight" in line


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--cluster", "bogus"], "--cluster 'bogus'"),
        (["--workers", "0"], "--workers"),
        (["--worker-memory", "lots"], "--worker-memory 'lots'"),
    ],
)
def test_run_cluster_options(argv, msg, tmp_path, capsys):
    line = _one_line(capsys, ["run", "--uuid", "demo", "--scales", "3", "--sink",
                              f"parquet://{tmp_path}/o", "--quiet", *argv])
    assert msg in line


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--source", "nope://x"], "unknown source URL scheme"),
        (["--source", "synthetic://demo", "--port", "99999"], "not a TCP port"),
        (["--source", "synthetic://demo", "--token-file", "/nonexistent/tok"], "cannot read"),
        (["--source", "synthetic://demo", "--tls-cert", "/x"], "go together"),
        (["--source", "synthetic://demo", "--prefetch", "1000"], "--prefetch"),
        (["--source", "shards:///etc"], "no s<scale> directories"),
    ],
)
def test_serve_bad_input(argv, msg, capsys):
    assert msg in _one_line(capsys, ["serve", *argv])


def test_verify_unknown_run(tmp_path, capsys):
    line = _one_line(capsys, ["verify", "--uuid", "demo", "--sink", f"parquet://{tmp_path}",
                              "--run", "nope"])
    assert "no run 'nope'" in line


def test_real_entry_point_prints_one_line():
    """Through `python -m dvidetl` (logging, argparse and exit code as a user sees them)."""
    p = subprocess.run([sys.executable, "-m", "dvidetl", "run", "--uuid", "demo", "--source",
                        "synthetic://demo?size=1,2", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("dvidetl run: error: synthetic URL")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_test_sink_is_not_a_production_scheme(monkeypatch):
    """flaky+parquet:// exists only where the environment registers it (the test suite)."""
    from dvidetl.errors import UserError
    from dvidetl.sinks import SCHEMES, known_schemes, open_sink

    assert "flaky+parquet" not in SCHEMES
    monkeypatch.delenv("DVIDETL_EXTRA_SINKS", raising=False)
    assert "flaky+parquet" not in known_schemes()
    with pytest.raises(UserError, match="unknown sink URL scheme"):
        open_sink("flaky+parquet:///tmp/x", uuid="u", instance="i")
    monkeypatch.setenv("DVIDETL_EXTRA_SINKS", "flaky+parquet")
    with pytest.raises(UserError, match="scheme=module:callable"):
        known_schemes()
