"""Security: token auth end to end, tickets that try to leave what the source serves, and
secrets (Flight token from a file, VastDB keys from the environment) that must never show in
logs, the summary, stored run metadata or the task names the Dask dashboard shows.

Every-RPC rejection of a wrong/missing token over the wire is tests/test_flight.py
(``test_every_call_unauthenticated_without_the_token``); here the same holds through the
real ``dvidetl serve`` process and the command line, over a real shards:// source."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl
import pytest

from dvidetl.cli import main as cli
from dvidetl.flight import protocol as P
from dvidetl.testing.env import environ

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "flight-" + secrets.token_hex(16)
ACCESS = "AKSEC" + secrets.token_hex(4).upper()
SECRET = "vast-" + secrets.token_hex(16)
NAME = "30720_24576_28672"
VOL = "synthetic://sec?size=256,256,128&scales=2&seed=3"


@pytest.fixture(scope="module")
def creds():
    """VastDB keys only in the environment, set before the worker processes start."""
    with environ(VASTDB_ACCESS_KEY=ACCESS, VASTDB_SECRET_KEY=SECRET):
        yield


@pytest.fixture(scope="module")
def cluster(creds):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("tok") / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    return f


@pytest.fixture(scope="module")
def shards_server(tmp_path_factory, shared_data, token_file):
    """`dvidetl serve --token-file` over a shards:// directory (the real shard, symlinked)."""
    d = tmp_path_factory.mktemp("shards")
    (d / "s1").mkdir()
    os.symlink(shared_data / "mcns-shard" / f"{NAME}.arrow", d / "s1" / f"{NAME}.arrow")
    os.symlink(shared_data / "mcns-shard" / f"{NAME}-newformat.csv", d / "s1" / f"{NAME}.csv")
    (d.parent / "outside.arrow").write_bytes(b"must never be served")
    spec = shared_data / "dvid" / "mcns-ng-specs.json"
    p = subprocess.Popen(
        [sys.executable, "-m", "dvidetl", "serve", "--source", f"shards://{d}?spec={spec}",
         "--port", "0", "--token-file", str(token_file)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loc = p.stdout.readline().strip()
    assert loc.startswith("grpc://"), p.stderr.read() if p.poll() is not None else loc
    yield loc, p
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert TOKEN not in err
    # bad tokens and bad tickets are answered, not logged as server crashes
    assert "Traceback" not in err, err[-3000:]


def _opts(token: str | None = TOKEN) -> fl.FlightCallOptions:
    h = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return fl.FlightCallOptions(headers=h, timeout=30)


def _ticket(**kw) -> bytes:
    d = {"v": 1, "kind": "blocks", "uuid": "mcns", "instance": "segmentation", "scale": 1,
         "lo": 0, "hi": 2**64}
    d.update(kw)
    return json.dumps(d).encode()


def test_served_process_rejects_bad_tokens_on_every_rpc(shards_server):
    loc, _ = shards_server
    raw = fl.FlightClient(loc)
    calls = {
        "GetFlightInfo": lambda o: raw.get_flight_info(
            fl.FlightDescriptor.for_path("mcns", "segmentation"), o),
        "ListFlights": lambda o: list(raw.list_flights(options=o)),
        "ListActions": lambda o: list(raw.list_actions(o)),
        "DoAction count": lambda o: list(raw.do_action(fl.Action(
            "count", P.CountRequest("mcns", "segmentation", 1, 3).to_json()), o)),
        "DoGet blocks": lambda o: raw.do_get(fl.Ticket(_ticket()), o).read_all(),
        "DoGet mapping": lambda o: raw.do_get(
            fl.Ticket(P.MappingTicket("mcns", "segmentation").to_json()), o).read_all(),
    }
    for name, call in calls.items():
        for bad in (None, "wrong", TOKEN[:-1], TOKEN + " ", "Basic " + TOKEN):
            with pytest.raises(fl.FlightUnauthenticatedError) as ei:
                call(_opts(bad))
            assert TOKEN not in str(ei.value), name
        call(_opts())  # and the right token works
    raw.close()


@pytest.mark.parametrize("field, value", [
    ("instance", "../../etc"), ("instance", "segmentation/../../x"), ("instance", "/etc/passwd"),
    ("uuid", "../outside"), ("uuid", ".."), ("uuid", "/abs"), ("uuid", "a/b"), ("scale", 2),
    ("scale", 99),
])
def test_tickets_cannot_leave_the_source(shards_server, field, value):
    """Names in tickets are validated names, never paths; scales must be served ones."""
    loc, _ = shards_server
    raw = fl.FlightClient(loc)
    with pytest.raises(pa.ArrowInvalid, match=f"field '{field}'"):
        raw.do_get(fl.Ticket(_ticket(**{field: value})), _opts()).read_all()
    raw.close()


def test_only_the_shard_files_are_served(shards_server, shared_data):
    """What a valid ticket reads is exactly the shard's rows, whatever uuid it names."""
    import pyarrow.ipc as ipc

    loc, _ = shards_server
    with open(shared_data / "mcns-shard" / f"{NAME}.arrow", "rb") as f:
        n = ipc.open_stream(f).read_all().num_rows
    raw = fl.FlightClient(loc)
    for uuid in ("mcns", "x..", "other"):
        t = raw.do_get(fl.Ticket(_ticket(uuid=uuid)), _opts()).read_all()
        assert t.num_rows == n
    raw.close()


def test_cli_token_errors_are_one_line(shards_server, tmp_path, capsys, monkeypatch):
    loc, _ = shards_server
    monkeypatch.delenv("DVIDETL_FLIGHT_TOKEN", raising=False)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    for extra in ([], ["--token-file", str(wrong)]):
        rc = cli(["plan", "--uuid", "mcns", "--flight", loc, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "token" in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and TOKEN not in err
    # a path as --uuid: refused by the server's ticket check, one line
    good = tmp_path / "good-token"
    good.write_text(TOKEN)
    rc = cli(["run", "--uuid", "../x", "--flight", loc, "--token-file", str(good),
              "--sink", f"parquet://{tmp_path}/out", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "field 'uuid'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_secrets_never_leak(cluster, token_file, tmp_path, capfd, caplog):
    """A whole export (token on, VastDB keys in the env) at DEBUG logging: the token and the
    secret key are in no captured output, no scheduler/worker log, no task key or group name,
    no stored run metadata and no file the Parquet sink wrote."""
    from distributed import Client

    from dvidetl.flight.server import start_server
    from dvidetl.sources import open_source
    from dvidetl.testing.vastsim import start_vastsim

    caplog.set_level(logging.DEBUG)
    src = open_source(VOL)
    texts: list[str] = []
    with start_server(src, token=TOKEN) as srv, start_vastsim(
            None, access_key=ACCESS, secret_key=SECRET) as sim:
        vast = f"vastdb://127.0.0.1:{sim.port}/bucket/sec"
        for sink in (vast, f"parquet://{tmp_path}/out"):
            common = ["--uuid", "sec", "--flight", srv.location, "--token-file", str(token_file),
                      "--sink", sink]
            assert cli(["-vv", "run", *common, "--cluster", cluster.scheduler_address,
                        "--partition-blocks", "16"]) == 0
            assert cli(["-vv", "verify", *common]) == 0
            o = capfd.readouterr()
            texts += [o.out, o.err]
            assert "blocks/s" in o.err  # the summary was printed and is among what we grep
        with Client(cluster.scheduler_address) as dc:
            logs = [*dc.get_scheduler_logs(n=100000), *(
                rec for wl in dc.get_worker_logs(n=100000).values() for rec in wl)]
            texts.append("\n".join(str(r) for r in logs))

            def task_names(dask_scheduler):
                out = [repr(e) for e in dask_scheduler.transition_log]
                out += [str(k) for k in dask_scheduler.task_groups]
                out += [str(k) for k in dask_scheduler.task_prefixes]
                out += [repr(e) for e in dask_scheduler.get_events()]
                return "\n".join(out)

            names = dc.run_on_scheduler(task_names)
            assert "export-" in names  # the export's tasks are in what we grep
            texts.append(names)
        from dvidetl.sinks import open_sink

        for sink in (vast, f"parquet://{tmp_path}/out"):
            s = open_sink(sink, uuid="sec", instance="segmentation")
            texts.append(s.load_run(s.latest_run()).to_json() + repr(s))
    src.close()
    texts.append(caplog.text)
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("latin-1"))
    blob = "\n".join(texts)
    assert len(blob) > 10_000
    assert TOKEN not in blob, "the Flight token leaked"
    assert SECRET not in blob, "the VastDB secret key leaked"
