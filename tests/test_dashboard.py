"""The dvidetl page on the Dask dashboard, rendered by a real headless Chromium during a run."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from html.parser import HTMLParser

import pytest

from dvidetl.cli import main as cli
from dvidetl.flight.server import start_server
from dvidetl.sinks import open_sink
from dvidetl.sources import open_source
from dvidetl.testing.corrupt import CorruptSource
from dvidetl.testing.slow import SlowSource

VOLUME = "synthetic://dash?size=512,512,256&scales=2&seed=9"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is needed for this test: apt-get install chromium (.ci/run does)"
    return exe


def _browse(url: str, *extra: str) -> str:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=5000", "--window-size=1200,900", *extra, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


class _Rows(HTMLParser):
    """The rendered group and error rows of the page."""

    def __init__(self):
        super().__init__()
        self.groups: list[dict] = []
        self.errors = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "group":
            self.groups.append(a)
        if tag == "tr" and a.get("class") == "error":
            self.errors += 1

    def handle_data(self, data):
        self.text.append(data)


def _state(base: str) -> dict:
    with urllib.request.urlopen(base + "/dvidetl/state.json", timeout=10) as r:
        return json.loads(r.read())


def test_run_page_renders_the_whole_run(tmp_path):
    from distributed import LocalCluster

    src = SlowSource(CorruptSource(open_source(VOLUME), rate=0.06, seed=4), 0.25)
    sink = f"parquet://{tmp_path}/out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, start_server(src) as srv:
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(rc=cli(
            ["run", "--uuid", "dash", "--flight", srv.location, "--sink", sink, "--cluster",
             cluster.scheduler_address, "--partition-blocks", "8", "--quiet"])))
        t.start()
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    st = _state(base)
                except OSError:
                    st = {}
                if st.get("run_id") and 2 <= st["partitions_done"] and not st["finished"]:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the run never showed progress on the page: {st}")
            # mid-run, as a user's browser sees it
            dom = _browse(base + "/dvidetl", "--dump-dom")
            shot = tmp_path / "page.png"
            _browse(base + "/dvidetl", f"--screenshot={shot}")
        finally:
            t.join(300)
        assert result.get("rc") == 1  # corrupt blocks: exit 1, the rest exported
        final = _state(base)

    page = _Rows()
    page.feed(dom)
    run = open_sink(sink, uuid="dash", instance=src.info().instance).load_run(final["run_id"])
    want: dict = {}
    for p in run.partitions:
        k = (p.kind, str(p.scale) if p.kind == "blocks" else "")
        want[k] = want.get(k, 0) + 1
    got = {(g["data-kind"], g["data-scale"]): int(g["data-parts-total"]) for g in page.groups}
    assert got == want  # every kind and scale of the plan, with its partition count
    done = sum(int(g["data-parts-done"]) for g in page.groups)
    assert 2 <= done < len(run.partitions)  # rendered mid-run
    text = " ".join(page.text)
    assert final["run_id"] in text and "blocks/s" in text and "ETA" in text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000

    # at the end: everything done, and the corrupt blocks listed with their coordinates
    assert final["finished"] and final["partitions_done"] == final["partitions_total"] == len(run.partitions)
    errs = open_sink(sink, uuid="dash", instance=src.info().instance).read("export_errors")
    coords = set(zip(errs["scale"].to_pylist(), errs["x"].to_pylist(), errs["y"].to_pylist(),
                     errs["z"].to_pylist(), strict=True))
    assert final["errors"] == len(coords) > 0
    listed = {(e["scale"], e["x"], e["y"], e["z"]) for e in final["error_blocks"]}
    assert listed and listed <= coords
    assert final["blocks_done"] + final["errors"] == final["blocks_total"] == sum(p.blocks for p in run.partitions)
