"""Shared pieces of the fault suite: a slowed-down source (so a fault lands mid-run), a
subprocess Flight server that can be SIGKILLed and restarted on its port, and the
verify-and-record step every test ends with.

Run as a script (``python tests/faults/_support.py SOURCE_URL PORT DELAY``) it serves
``SlowSource(SOURCE_URL)`` on 127.0.0.1:PORT and prints the location.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvidetl.testing.slow import SlowSource  # noqa: F401 - the fault tests import it from here

ROOT = Path(__file__).resolve().parents[2]

#: fault table rows by test node id (filled by ``verify_and_record``, printed by conftest)
ROWS: dict[str, dict] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``SlowSource(url)`` served by a child process on a fixed port: kill() is a SIGKILL,
    start() brings it back on the same port."""

    def __init__(self, url: str, delay: float = 0.0, port: int | None = None):
        self.url, self.delay = url, delay
        self.port = port or free_port()
        self.location = f"grpc://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.url, str(self.port), str(self.delay)],
            stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env,
        )
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("line", self.proc.stdout.readline()))
        t.start()
        t.join(timeout)
        line = (box.get("line") or "").strip()
        if line != self.location:
            self.kill()
            raise RuntimeError(f"Flight server did not start: {line!r}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def ledger_count(sink_dir: str | os.PathLike, uuid: str) -> tuple[str | None, int]:
    """(run id, committed partitions) of the newest run under a Parquet sink directory."""
    dirs = sorted(Path(sink_dir).glob(f"*/{uuid}/export_ledger/*"))
    if not dirs:
        return None, 0
    d = dirs[-1]
    return d.name.removeprefix("run="), sum(1 for f in d.iterdir() if f.name.endswith(".parquet")
                                      and not f.name.startswith("."))


def wait_for(pred, timeout: float, what: str, poll: float = 0.05, alive=None):
    """Poll ``pred()`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if alive is not None:
            alive()
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Outcome:
    report: object  # dvidetl.read.verify.VerifyReport
    expected: int
    found: int
    duplicates: int
    errors: int
    expect_errors: int = 0

    @property
    def exact(self) -> bool:
        """Every source block exported once and byte-exact, except exactly the expected
        number of blocks reported in export_errors."""
        r = self.report
        clean = r.run_id is not None and not (
            r.missing or r.extra or r.duplicated or r.mismatched or r.index_diffs
            or r.mapping_diffs or r.partitions_unfinished)
        return (clean and r.export_errors == self.expect_errors == self.errors
                and self.found + self.errors == self.expected and self.duplicates == 0)


def verify_and_record(nodeid: str, fault: str, *, location: str, uuid: str, sink_url: str,
                      runs: int, run_id: str | None = None, token: str | None = None,
                      instance: str | None = None, expect_errors: int = 0) -> Outcome:
    """The full ``verify`` of a run against its source, plus an independent duplicate count
    over the exported keys; the result becomes this test's row in the fault table."""
    import pyarrow.compute as pc

    from dvidetl.flight.client import FlightClient
    from dvidetl.read.verify import verify_export
    from dvidetl.sinks import open_sink

    client = FlightClient(location, token, uuid=uuid, instance=instance)
    try:
        inst = instance or client.info().instance
        sink = open_sink(sink_url, uuid=uuid, instance=inst)
        rep = verify_export(client, sink, run_id)
        rid = rep.run_id
        blocks = sink.read("blocks", run_id=rid, columns=["scale", "morton"]) if rid else None
        found = blocks.num_rows if blocks is not None else 0
        if found:
            key = blocks.column("morton").to_numpy().astype(np.uint64) + (
                blocks.column("scale").to_numpy().astype(np.uint64) << np.uint64(56))
            dups = found - len(np.unique(key))
        else:
            dups = 0
        errs = sink.read("export_errors", run_id=rid) if rid else None
        nerr = 0
        if errs is not None and errs.num_rows:
            nerr = len(pc.unique(pc.binary_join_element_wise(
                pc.cast(errs.column("scale"), "string"), pc.cast(errs.column("morton"), "string"),
                ":")))
    finally:
        client.close()
    out = Outcome(rep, rep.blocks_source, found, dups, nerr, expect_errors)
    ROWS[nodeid] = {"fault": fault, "runs": runs, "expected": rep.blocks_source, "found": found,
                    "duplicates": dups, "errors": nerr, "verify": "OK" if out.exact else "DIFF"}
    return out


def _serve_main(url: str, port: int, delay: float) -> None:
    from dvidetl.flight.server import start_server
    from dvidetl.sources import open_source

    src = SlowSource(open_source(url), delay)
    srv = start_server(src, port=port)
    print(srv.location, flush=True)
    try:
        signal.pause()  # until killed: SIGKILL in the tests, SIGTERM / Ctrl-C by hand
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    _serve_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
