"""The command line: help, dry runs, plans, and one-line errors for user mistakes."""

from __future__ import annotations

import pytest

from dvidetl.cli import main as cli


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in ("run", "plan", "verify", "inspect"):
        assert c in out


def test_plan_prints_partitions_and_totals(capsys):
    assert cli(["plan", "--uuid", "demo", "--partition-blocks", "512"]) == 0
    out = capsys.readouterr().out
    assert "total blocks scale 0" in out and "total:" in out
    assert "indices" in out and "mapping" in out


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert cli(["run", "--uuid", "demo", "--sink", f"parquet://{tmp_path}/o", "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert "partitions" in capsys.readouterr().out


def test_serve_host_wildcard_is_advertised_by_name(tmp_path, capsys):
    """Workers on other nodes can't use 127.0.0.1: a wildcard bind is advertised under this
    host's name, and the driver's own client already connected through that address."""
    import socket

    argv = ["run", "--uuid", "demo", "--serve-host", "0.0.0.0", "--dry-run",
            "--sink", f"parquet://{tmp_path}/o"]
    assert cli(argv) == 0
    assert f"grpc://{socket.getfqdn()}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["run", "--uuid", "demo", "--sink", "ftp://x", "--dry-run"], "unknown sink URL scheme"),
        (["run", "--uuid", "demo", "--scales", "0,x"], "--scales"),
        (["run", "--uuid", "demo", "--scales", "99", "--dry-run"], "not in the volume"),
        (["run", "--uuid", "demo", "--partition-blocks", "0"], "--partition-blocks"),
        (["run", "--uuid", "demo", "--token-file", "/nonexistent/tok"], "--token-file"),
        (["run", "--uuid", "demo", "--flight", "http://x:1"], "--flight"),
        (["plan", "--uuid", "demo", "--serve-host", "192.0.2.1"], "--serve-host"),
        (["run", "--uuid", "demo", "--resume", "nope", "--sink", "parquet://{tmp}"], "no run"),
        (["verify", "--uuid", "demo", "--sink", "parquet://{tmp}"], "no run found"),
        (["verify", "--uuid", "demo", "--sink", "parquet://{tmp}", "--run", "nope"], "no run"),
        (["inspect", "--sink", "parquet://{tmp}", "--block", "1,2"], "no export found"),
    ],
)
def test_user_errors_are_one_line(argv, msg, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli(argv)
    err = capsys.readouterr()
    assert rc == 2, (rc, err.err)
    assert msg in err.err
    assert "Traceback" not in err.err and len(err.err.strip().splitlines()) == 1
