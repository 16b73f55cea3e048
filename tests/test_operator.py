"""The operator's experience (issue 25), each item as a user meets it: the real command in a
subprocess (``.venv/bin/dvidetl`` through ``python -m dvidetl``), its exit code, and the
whole of stderr checked for a traceback and for secrets.

Volumes are small synthetic ones; slow planning comes from ``testing.slow.SlowSource`` (a
real source whose counts wait), served by a real Flight server in this process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dvidetl.flight.server import start_server
from dvidetl.sources import open_source
from dvidetl.testing.slow import SlowSource

ROOT = Path(__file__).resolve().parents[1]
SMALL = "synthetic://ops?size=256,256,192&scales=2&seed=3"
#: values that must never appear in any output
SECRETS = ("AKIAOPSACCESS", "opsSecretValue42", "opsFlightToken77")
SECRET_ENV = {"VASTDB_ACCESS_KEY": SECRETS[0], "VASTDB_SECRET_KEY": SECRETS[1]}


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(SECRET_ENV)
    env.update(extra)
    return env


def _clean(text: str) -> None:
    """No traceback, no secret, anywhere in ``text``."""
    assert "Traceback" not in text, text[-3000:]
    for s in SECRETS:
        assert s not in text, f"secret {s[:4]}... leaked: {text[-2000:]}"


def dvidetl(*argv: str, timeout: float = 240, env: dict | None = None, prefix: tuple = ()
            ) -> subprocess.CompletedProcess:
    p = subprocess.run([*prefix, sys.executable, "-m", "dvidetl", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env or _env())
    _clean(p.stderr)
    _clean(p.stdout)
    return p


def _one_line(p: subprocess.CompletedProcess, cmd: str, *want: str, info: tuple = ()) -> str:
    """Exit 2 and one error line (``info``: prefixes of informational lines before it)."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(info or ("\0",))]
    assert len(lines) == 1 and lines[0].startswith(f"dvidetl {cmd}: error: "), p.stderr
    for w in want:
        assert w in lines[0], lines[0]
    return lines[0]


class Live:
    """A command running in its own process group (as in a terminal), stderr read live."""

    def __init__(self, *argv: str, env: dict | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", "dvidetl", *argv], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env or _env(), start_new_session=True)
        self.err: list[str] = []
        self.out = ""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.err.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        rx = re.compile(pattern)
        end = time.time() + timeout
        while time.time() < end:
            for line in list(self.err):
                m = rx.search(line)
                if m:
                    return m
            if self.p.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared: {''.join(self.err)[-3000:]}")

    def interrupt(self) -> float:
        """Ctrl-C as a terminal sends it (the whole group); seconds until the process ended."""
        t0 = time.time()
        os.killpg(self.p.pid, signal.SIGINT)
        self.p.wait(timeout=60)
        self.out = self.p.stdout.read()
        self._t.join(10)
        return time.time() - t0

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for this test: apt-get install chromium (.ci/run does)"
    return exe


def _browse(url: str) -> str:
    p = subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--virtual-time-budget=4000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


# -- item 1, 4: sizes with units, numbers in range, one line -------------------------------------

@pytest.mark.parametrize("argv, want", [
    (["--worker-memory", "4"], ["--worker-memory '4'", "give a unit"]),
    (["--worker-memory", "100MiB"], ["at least 512.0 MiB"]),
    (["--partition-blocks", "99999999999999999999999"], ["--partition-blocks must be at most"]),
    (["--partition-blocks", "0"], ["--partition-blocks must be at least 1"]),
    (["--index-partition-rows", "1.5"], ["whole number"]),
    (["--cell-limit", "10KB0"], ["--cell-limit"]),
    (["--dashboard-address", "nonsense"], ["--dashboard-address 'nonsense'", "HOST:PORT"]),
    (["--dashboard-address", "no-such-host.invalid:0"], ["unknown host"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_bad_options_are_one_line(argv, want, tmp_path):
    p = dvidetl("run", "--uuid", "demo", "--sink", f"parquet://{tmp_path}/o", *argv, timeout=120)
    _one_line(p, "run", *want)
    assert not (tmp_path / "o").exists()


def test_sizes_take_units(tmp_path):
    """2M rows, 126KiB cells and 1GiB workers are understood (a dry run plans with them)."""
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"parquet://{tmp_path}/o",
                "--dry-run", "--json", "--partition-blocks", "1k", "--index-partition-rows", "2M",
                "--cell-limit", "126KiB", "--worker-memory", "1GiB")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["dry_run"] and doc["run_id"] is None and doc["plan"]["partitions"] > 0


# -- item 3, 5: the sink is checked first, in seconds; secrets never shown ------------------------

def test_unreachable_vastdb_fails_in_seconds_before_planning():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    t0 = time.time()
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink",
                f"vastdb://127.0.0.1:{port}/bucket/schema", "--quiet", timeout=120)
    took = time.time() - t0
    line = _one_line(p, "run", f"127.0.0.1:{port}", "cannot reach", "Connection refused")
    assert "local cluster" not in p.stderr and "run " not in line
    assert took < 60, took  # process start + imports; the check itself has a 5 s deadline


def test_vastdb_bucket_and_credentials_checked_first():
    from dvidetl.testing.vastsim import start_vastsim

    sim = start_vastsim(None, access_key=SECRETS[0], secret_key=SECRETS[1])
    base = f"vastdb://127.0.0.1:{sim.port}"
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"{base}/nobucket/s", "--quiet")
    _one_line(p, "run", "bucket 'nobucket' does not exist")
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"{base}/vastdb/s", "--quiet",
                env=_env(VASTDB_SECRET_KEY="wrongSecretValue"))
    _one_line(p, "run", "refused the credentials")
    assert "wrongSecretValue" not in p.stderr
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"{base}/vastdb/s", "--quiet",
                env={k: v for k, v in _env().items() if not k.startswith("VASTDB_")})
    _one_line(p, "run", "no VastDB credentials")


def test_credentials_in_the_sink_url_are_never_printed():
    p = dvidetl("run", "--uuid", "ops", "--sink", f"vastdb://{SECRETS[0]}:{SECRETS[1]}@host/b/s",
                "--dry-run")
    _one_line(p, "run", "credentials do not go in the URL", "vastdb://***:***@host/b/s")
    p = dvidetl("run", "--uuid", "ops", "--sink", f"vastdb://{SECRETS[0]}:{SECRETS[1]}@host/b/s",
                "--dry-run", "-vv")  # every log line too (dvidetl()'s _clean)
    assert p.returncode == 2 and "vastdb://***:***@host" in p.stderr.splitlines()[-1]


def test_redaction_helper():
    from dvidetl.redact import redact, register_secret

    register_secret("tok-abcdef-123")
    text = ("GET dvid+http://u:pw@h:8000/x?token=abc&uuid=1 failed; Authorization: Bearer eyJhbGci.x; "
            "value tok-abcdef-123; vastdb://K:S@vip/b/s")
    out = redact(text)
    for s in ("u:pw", "token=abc", "eyJhbGci", "tok-abcdef-123", "K:S@", ":pw@"):
        assert s not in out, out
    assert "uuid=1" in out and "dvid+http://u:***@h:8000" in out and "vastdb://K:***@vip" in out


# -- item 4: file systems that refuse, one line each --------------------------------------------

def test_parquet_sink_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"parquet://{tmp_path}/f", "--quiet")
    _one_line(p, "run", "is a file, not a directory")


def test_parquet_sink_without_permission(tmp_path):
    """As root, permission bits are enforced only without CAP_DAC_OVERRIDE: setpriv drops it."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    prefix: tuple = ()
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's override"
        prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search")
    try:
        p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"parquet://{d}/out",
                    "--quiet", prefix=prefix)
    finally:
        d.chmod(0o700)
    _one_line(p, "run", "cannot write to", "Permission denied")


def test_parquet_sink_on_a_read_only_file_system(tmp_path):
    """A real read-only mount, in a private mount namespace (nothing leaks to the host)."""
    if os.geteuid() != 0:
        pytest.fail("needs root (CI runs as root) for a private read-only mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {sys.executable} -m dvidetl run --uuid ops "
           f"--source '{SMALL}' --sink parquet://{ro}/out --quiet")
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, env=_env())
    _clean(p.stderr)
    _one_line(p, "run", "cannot write to", "Read-only file system")


def test_serve_with_a_bad_certificate(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    p = dvidetl("serve", "--source", "synthetic://demo", "--port", "0", "--tls-cert", str(bad),
                "--tls-key", str(bad), timeout=60)
    line = _one_line(p, "serve", "not a usable PEM certificate")
    assert "port in use" not in line


# -- items 2, 8, 4: slow planning — status, the page, deadlines, Ctrl-C --------------------------

@pytest.fixture
def slow_planning():
    """A server whose ``count_keys`` each take 20 s: planning lasts long enough to look at."""
    src = SlowSource(open_source(SMALL), 0.0, plan_delay=20.0)
    with start_server(src) as srv:
        yield srv
    src.close()


def test_planning_deadline_is_an_option(slow_planning, tmp_path):
    p = dvidetl("plan", "--uuid", "ops", "--flight", slow_planning.location, "--plan-timeout", "1",
                timeout=120)
    _one_line(p, "plan", "planning failed while counting label-index rows", "--plan-timeout",
              info=("source: ",))


def test_page_during_planning_then_ctrl_c(slow_planning, tmp_path):
    """The run's page answers while the run plans (source, uuid, elapsed, what it counts);
    closing a browser tab on Dask's page prints nothing; Ctrl-C ends it within seconds,
    without a traceback from the driver or the workers."""
    run = Live("run", "--uuid", "ops", "--flight", slow_planning.location, "--sink",
               f"parquet://{tmp_path}/o", "--workers", "1", "--dashboard-address", "127.0.0.1:0",
               "--quiet")
    try:
        m = run.wait_for(r"dashboard (http://127\.0\.0\.1:\d+)/dvidetl \(the run; Dask's own pages: "
                         r"http://127\.0\.0\.1:\d+/status\)")
        base = m.group(1)
        end = time.time() + 60
        while time.time() < end:
            with urllib.request.urlopen(base + "/dvidetl/state.json", timeout=10) as r:
                st = json.loads(r.read())
            if st.get("phase") == "planning" and "label-index" in st.get("message", ""):
                break
            time.sleep(0.2)
        assert st["phase"] == "planning" and st["run_id"] is None, st
        assert st["uuid"] == "ops" and st["source"] == slow_planning.location and st["elapsed_s"] > 0
        dom = _browse(base + "/dvidetl")
        assert "planning" in dom and "ops" in dom and "elapsed" in dom
        _browse(base + "/status")  # Dask's bokeh page: the tab closes when chromium exits
        run.wait_for(r"planning: counting label-index rows", timeout=60)
        took = run.interrupt()
    finally:
        run.kill()
    assert run.p.returncode == 130, run.stderr
    assert took < 20, took
    assert "dvidetl run: interrupted" in run.stderr
    assert "AssertionError" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    _clean(run.stderr)


def test_ctrl_c_during_export_names_the_run_to_resume(tmp_path):
    src = SlowSource(open_source(SMALL), 1.0)
    with start_server(src) as srv:
        run = Live("run", "--uuid", "ops", "--flight", srv.location, "--sink", f"parquet://{tmp_path}/o",
                   "--workers", "2", "--dashboard-address", "127.0.0.1:0", "--partition-blocks", "8")
        try:
            rid = run.wait_for(r"^run (\S+): \d+ partitions").group(1)
            run.wait_for(r"\[\d+/\d+ partitions\]", timeout=120)
            took = run.interrupt()
        finally:
            run.kill()
    src.close()
    assert run.p.returncode == 130, run.stderr
    assert took < 20, took
    assert f"resume with --resume {rid}" in run.stderr
    assert "KeyboardInterrupt" not in run.stderr
    _clean(run.stderr)


# -- items 5, 6, 7, 9: one real run, as a script would use it ------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """``run --json --log-file`` of a small volume with a Flight token in the environment;
    the dashboard's bound sockets are recorded while it runs."""
    import psutil

    tmp = tmp_path_factory.mktemp("ops")
    sink = f"parquet://{tmp}/o"
    log = tmp / "run.log"
    env = _env(DVIDETL_FLIGHT_TOKEN=SECRETS[2])
    run = Live("run", "--uuid", "ops", "--source", SMALL, "--sink", sink, "--workers", "2",
               "--dashboard-address", "127.0.0.1:0", "--json", "-v", "--log-file", str(log), env=env)
    try:
        port = int(run.wait_for(r"dashboard http://127\.0\.0\.1:(\d+)/dvidetl").group(1))
        bound = {c.laddr.ip for c in psutil.Process(run.p.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/dvidetl/state.json",
                                                  timeout=10).read())
        run.p.wait(timeout=400)
        run.out = run.p.stdout.read()
        run._t.join(10)
    finally:
        run.kill()
    return {"run": run, "sink": sink, "log": log.read_text(), "bound": bound, "state": state,
            "env": env, "tmp": tmp}


def test_run_json_is_one_document_and_human_text_goes_to_stderr(real_run):
    run = real_run["run"]
    assert run.p.returncode == 0, run.stderr
    _clean(run.stderr)
    _clean(run.out)
    doc = json.loads(run.out)  # the whole of stdout is one document
    assert doc["command"] == "run" and doc["ok"] and doc["exit_code"] == 0
    assert doc["partitions"]["planned"] == doc["partitions"]["written"] > 0
    assert doc["blocks"] > 0 and doc["rows"]["label_index"] > 0 and doc["rows"]["mapping"] > 0
    assert doc["bytes"]["raw"] > doc["bytes"]["written"] > 0 and doc["bytes"]["read"] > 0
    assert doc["seconds"]["planning"] > 0 and doc["seconds"]["total"] >= doc["seconds"]["export"]
    assert f"run {doc['run_id']}" in run.stderr and "run_id" not in run.out.split("\n")[0]
    # the summary explains its byte figures and shows planning time
    for words in ("of blocks as the source served them", "of DVID block bytes", "smaller than the raw",
                  "planning ", "export "):
        assert words in run.stderr, run.stderr
    # --log-file and -v after the command: the log has INFO lines, redacted
    assert " INFO " in real_run["log"] and "dvidetl" in real_run["log"]
    # the workers' lines too: one per partition committed, naming the worker
    worker_lines = [ln for ln in real_run["log"].splitlines() if "[worker tcp://" in ln]
    assert len([ln for ln in worker_lines if "committed to parquet://" in ln]) == doc["partitions"]["written"]
    _clean(real_run["log"])


def test_dashboard_binds_what_it_prints(real_run):
    assert real_run["bound"] == {"127.0.0.1"}, real_run["bound"]
    st = real_run["state"]
    assert st["uuid"] == "ops" and "source" in st and "elapsed_s" in st
    _clean(json.dumps(st))


def test_verify_shows_progress_and_json(real_run):
    p = dvidetl("verify", "--uuid", "ops", "--source", SMALL, "--sink", real_run["sink"],
                "--in-process", "--json", env=real_run["env"])
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] and doc["blocks"]["checked"] == doc["blocks"]["source"] > 0
    assert re.search(r"verify \[\d+/\d+ partitions\]", p.stderr), p.stderr
    assert "verify run" in p.stderr  # the human report, on stderr under --json


def test_plan_json(real_run):
    p = dvidetl("plan", "--uuid", "ops", "--source", SMALL, "--json", env=real_run["env"])
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["command"] == "plan" and doc["plan"]["label_index"] is True
    assert sum(g["partitions"] for g in doc["plan"]["groups"]) == doc["plan"]["partitions"]
    assert "total:" in p.stderr


def test_status_and_inspect_take_the_uuid_prefix_run_was_given(real_run):
    """An export is named by the full node UUID; a prefix (as DVID takes) finds it."""
    p = dvidetl("status", "--sink", real_run["sink"], "--uuid", "op", "--json", env=real_run["env"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["uuid"] == "ops"
    p = dvidetl("inspect", "--sink", real_run["sink"], "--uuid", "op", "--block", "0,0,0",
                env=real_run["env"])
    assert p.stdout.startswith("block (0, 0, 0) scale 0"), (p.stdout, p.stderr)  # the export opened
    for cmd in ("status", "inspect"):
        p = dvidetl(cmd, "--sink", real_run["sink"], "--uuid", "opz", "--block", "0,0,0",
                    env=real_run["env"]) if cmd == "inspect" else \
            dvidetl(cmd, "--sink", real_run["sink"], "--uuid", "opz", env=real_run["env"])
        _one_line(p, cmd, "no export found", "for uuid opz")


def test_a_uuid_prefix_of_several_exports_is_refused(tmp_path):
    from dvidetl.errors import UserError
    from dvidetl.sinks import find_export

    for u in ("5f3b0a", "5f3b0b", "77aa"):
        (tmp_path / "seg" / u / "runs").mkdir(parents=True)
    url = f"parquet://{tmp_path}"
    assert find_export(url, "77", None) == ("seg", "77aa")
    assert find_export(url, "5f3b0a", "seg") == ("seg", "5f3b0a")
    with pytest.raises(UserError, match=r"several exports .*seg@5f3b0a, seg@5f3b0b.*longer uuid"):
        find_export(url, "5f3b", None)


# -- item 7: progress moves within a partition ---------------------------------------------------

def test_running_partitions_report_what_they_streamed():
    """A task streaming slowly reports through the scheduler; the driver's counts move before
    the task commits."""
    from distributed import Client, LocalCluster

    from dvidetl.export.driver import LiveParts, RunResult
    from dvidetl.export.tasks import PROGRESS_TOPIC, ProgressReporter

    def stream():
        """Streams 10 blocks every 0.2 s until the driver has seen it move (at most 2 min)."""
        from distributed import Event

        r, seen_enough, t0 = ProgressReporter("blocks"), Event("seen"), time.time()
        while not seen_enough.is_set() and time.time() - t0 < 120:
            r.add(blocks=10, nbytes=1000)
            time.sleep(0.2)
        return r.blocks

    live = LiveParts()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as c, \
            Client(c) as client:
        from distributed import Event

        client.subscribe_topic(PROGRESS_TOPIC, live.on_event)
        live.started("stream-1", "blocks")
        fut = client.submit(stream, key="stream-1", pure=False)
        seen: set[int] = set()
        while not fut.done() and len(seen - {0}) < 3:
            seen.add(live.done(RunResult("r")).blocks)
            time.sleep(0.1)
        Event("seen").set()
        final = fut.result()
    moving = sorted(seen - {0})
    assert len(moving) >= 3 and moving[0] < final, (seen, final)  # counts that moved while it ran


def test_rate_is_recent_and_eta_from_what_is_left():
    from dvidetl.export.progress import Counts, Estimator

    est = Estimator(Counts(blocks=10_000), window=10.0)
    t = 1000.0
    for i in range(100):  # a slow start (warm-up): 1 block/s for 100 s
        est.sample(Counts(blocks=i), now=t + i)
    for i in range(1, 21):  # then 100 blocks/s
        est.sample(Counts(blocks=100 + 100 * i), now=t + 100 + i)
    rate = est.rate("blocks")
    assert rate == pytest.approx(100.0)  # the last 10 s, not the average since start (~17/s)
    assert est.eta(Counts(blocks=2100)) == pytest.approx(79.0)


# -- item 9: scripting and --help ----------------------------------------------------------------

def test_version_and_verbose_after_the_command(tmp_path):
    from dvidetl import __version__

    p = dvidetl("--version", timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"dvidetl {__version__}"
    p = dvidetl("plan", "--uuid", "ops", "--source", SMALL, "-v", timeout=120)
    assert p.returncode == 0 and " INFO dvidetl" in p.stderr, p.stderr


def test_every_command_has_examples_that_parse():
    """Each sub-command's --help has examples, and each example is a valid command line."""
    import shlex

    from dvidetl.cli import COMMANDS, build_parser

    parser = build_parser()
    for cmd in COMMANDS:
        p = dvidetl(cmd, "--help", timeout=60)
        assert p.returncode == 0 and "examples:" in p.stdout, (cmd, p.stdout[-500:])
        text = p.stdout.split("examples:", 1)[1].replace("\\\n", " ")
        lines = [ln.split("   #")[0].strip() for ln in text.splitlines() if ln.strip().startswith("dvidetl ")]
        assert lines, cmd
        for ln in lines:
            argv = shlex.split(ln.split("|")[0].split(">")[0])[1:]
            args = parser.parse_args(argv)
            assert args.command == cmd, ln


def test_serve_help_documents_every_source_key():
    """Every key a source URL accepts (as its own parser lists them) is in serve --help."""
    from dvidetl.errors import UserError

    helptext = dvidetl("serve", "--help", timeout=60).stdout
    for url in ("synthetic://x?nope=1", "shards:///tmp?nope=1", "dvid+http://h:1?nope=1"):
        with pytest.raises(UserError) as e:
            open_source(url)
        known = re.search(r"known: ([^)]*)\)", str(e.value)).group(1).split(", ")
        assert known
        for key in known:
            assert f"{key}=" in helptext, (url, key)


def test_dry_run_prints_no_run_id(tmp_path):
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", f"parquet://{tmp_path}/o",
                "--dry-run", timeout=120)
    assert p.returncode == 0, p.stderr
    assert "dry run (no run id" in p.stderr
    assert not re.search(r"\d{8}T\d{12}Z-[0-9a-f]{6}", p.stdout + p.stderr)
    assert not (tmp_path / "o").exists()


# -- item 10: the README's own example, and an export without a label index ----------------------

def test_readme_block_is_inside_the_demo_volume():
    text = (ROOT / "README.md").read_text()
    src = open_source("synthetic://demo")
    calls = re.findall(r"ex\.(?:raw_)?block\((\d+), (\d+), (\d+), (\d+)\)", text)
    assert calls
    for s, x, y, z in calls:
        assert src.is_present(int(s), int(x), int(y), int(z)), (s, x, y, z)
    src.close()
    assert ".venv/bin/dvidetl" in text and "no label indices" in text


def test_shards_export_says_it_has_no_label_index(tmp_path, shared_data):
    shard = tmp_path / "shards" / "s1"
    shard.mkdir(parents=True)
    name = "30720_24576_28672"
    os.symlink(shared_data / "mcns-shard" / f"{name}.arrow", shard / f"{name}.arrow")
    os.symlink(shared_data / "mcns-shard" / f"{name}-newformat.csv", shard / f"{name}.csv")
    source = f"shards://{tmp_path / 'shards'}?spec={shared_data / 'dvid' / 'mcns-ng-specs.json'}"
    sink = f"parquet://{tmp_path}/o"
    p = dvidetl("plan", "--uuid", "x", "--source", source, "--scales", "1", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["plan"]["label_index"] is False and "no label indices" in doc["plan"]["label_index_note"]
    assert "no label_index" in p.stderr
    p = dvidetl("run", "--uuid", "x", "--source", source, "--scales", "1", "--sink", sink,
                "--workers", "1", "--dashboard-address", "127.0.0.1:0", "--quiet", timeout=400)
    assert p.returncode == 0, p.stderr
    assert "no label_index: the source has no label indices" in p.stderr
    assert "0 label_index" not in p.stderr
    p = dvidetl("inspect", "--sink", sink, "--label", "1")
    _one_line(p, "inspect", "no label_index", "--block")


def test_a_partition_that_kills_its_worker_stops_the_run(tmp_path):
    """Item 1: a worker that cannot hold a partition (here: one that makes its worker exit
    every time, as the kernel's OOM killer would) ends the run with one line, instead of
    restart-looping the workers partition after partition."""
    src = open_source(SMALL)
    morton = int(src.present_blocks(0)[3][0])
    src.close()
    sink = f"flaky+parquet://{tmp_path}/o?rate=0&mode=die&poison=0:{morton}"
    t0 = time.time()
    p = dvidetl("run", "--uuid", "ops", "--source", SMALL, "--sink", sink, "--workers", "2",
                "--dashboard-address", "127.0.0.1:0", "--retries", "0", "--quiet", "--partition-blocks", "8",
                env=_env(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1"), timeout=300)
    took = time.time() - t0
    assert p.returncode == 1, p.stderr
    assert "killed its worker every time it ran" in p.stderr and "--worker-memory" in p.stderr
    run_id = re.search(r"^run (\S+):", p.stderr, re.M).group(1)
    assert f"resume with --resume {run_id}" in p.stderr
    assert took < 240, took
