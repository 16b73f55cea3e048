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


def _plan(capsys, *extra) -> tuple[list[str], list[list[str]]]:
    assert cli(["plan", "--uuid", "demo", "--partition-blocks", "32", *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, [ln.split() for ln in lines]


def test_plan_prints_a_summary_by_default(capsys):
    """One line per kind and scale, however many partitions: the summary's block totals add
    up to the plan's, and no partition line is printed unless asked."""
    lines, rows = _plan(capsys)
    assert rows[0][:3] == ["kind", "scale", "partitions"]
    body = [r for r in rows[1:] if r and r[0] in ("blocks", "indices", "mapping")]
    scales = [int(r[1]) for r in body if r[0] == "blocks"]
    assert scales == sorted(set(scales)) and 0 in scales
    nparts = sum(int(r[2].replace(",", "")) for r in body)
    assert nparts > 60  # 32-block partitions of the demo volume: many more than lines
    assert len(lines) < 16
    total = [ln for ln in lines if ln.startswith("total:")]
    assert total and f"{nparts:,} partitions" in total[0]
    blocks = sum(int(r[3].lstrip("~").replace(",", "")) for r in body if r[0] == "blocks")
    assert f"~{blocks:,} blocks" in total[0]
    assert {"indices", "mapping"} <= {r[0] for r in body}


def test_plan_lists_partitions_when_asked(capsys):
    _, summary = _plan(capsys)
    nparts = sum(int(r[2].replace(",", "")) for r in summary[1:]
                 if r and r[0] in ("blocks", "indices", "mapping"))
    lines, rows = _plan(capsys, "--partitions")
    listed = [r for r in rows if len(r) == 7 and r[0].isdigit()]
    assert [int(r[0]) for r in listed] == list(range(nparts))
    blocks = [r for r in listed if r[1] == "blocks"]
    assert all(int(r[4]) > int(r[3]) for r in blocks)  # hi > lo


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
