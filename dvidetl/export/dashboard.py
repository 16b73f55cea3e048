"""A dvidetl page on the Dask dashboard: the run as a whole, not the submission window.

Dask's own progress bar shows only the tasks the driver has submitted (a bounded window of
a plan of 10^5+ partitions), so it cannot say how far an export is. This page can: the
driver publishes a small state document (partitions and blocks/rows done and planned, by
kind and scale; rate; ETA; the latest corrupt blocks with their coordinates; the source's
anomalies stored with the run, per kind) into the
scheduler's metadata store (``Client.set_metadata``) as tasks complete, and two handlers on
the scheduler's own HTTP server serve it:

* ``/dvidetl`` — the page (plain HTML; its script re-reads the state every second);
* ``/dvidetl/state.json`` — the state itself, for scripts and monitoring.

This module is a Dask HTTP *routes module* (the documented way to extend the dashboard:
list it under ``distributed.scheduler.http.routes``). Schedulers dvidetl does not start
(``--cluster tcp://...``) get the routes installed at run time by :func:`install`, which
needs dvidetl importable on the scheduler.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed.http.utils import RequestHandler, get_handlers

from dvidetl.errors import first_line
from dvidetl.export.progress import Counts, Estimator
from dvidetl.redact import redact

if TYPE_CHECKING:
    from distributed import Client

    from dvidetl.export.kinds import Partition, RunInfo

METADATA_KEY = "dvidetl"
#: corrupt blocks listed on the page (the rest are in export_errors)
MAX_ERRORS_LISTED = 50


class StateHandler(RequestHandler):
    def get(self) -> None:
        state = self.server.get_metadata([METADATA_KEY], default=None)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(state or {"run_id": None}))


class PageHandler(RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE)


routes: list[tuple] = [
    (r"dvidetl", PageHandler, {}),
    (r"dvidetl/state.json", StateHandler, {}),
]


def _install(dask_scheduler=None) -> None:
    """Add the routes to a running scheduler's HTTP server (once; none without a server)."""

    app = getattr(dask_scheduler, "http_application", None)
    if app is not None and not getattr(dask_scheduler, "_dvidetl_routes", False):
        app.add_handlers(r".*$", get_handlers(dask_scheduler, [__name__], prefix="/"))
        dask_scheduler._dvidetl_routes = True


def install(client: Client) -> str | None:
    """Serve the page on ``client``'s scheduler; returns its URL (None if it cannot be)."""

    try:
        client.run_on_scheduler(_install)
    except Exception as exc:  # noqa: BLE001 - the page is a convenience, never a failure
        logging.getLogger(__name__).warning(
            "dvidetl dashboard page not available on this scheduler (%s); install dvidetl "
            "there, or add dvidetl.export.dashboard to distributed.scheduler.http.routes",
            first_line(exc))
        return None
    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    base = link.rsplit("/", 1)[0] if link.endswith("/status") else link.rstrip("/")
    return base + "/dvidetl"


class _HarmlessTornadoErrors(logging.Filter):
    """Two tracebacks tornado logs into a run's output that say nothing about the run, and
    only those (every other tornado error still shows):

    * closing a browser tab on Dask's own (bokeh) pages: "Uncaught exception GET
      /status/ws" with bokeh's ``assert self._session is not None`` (the socket closed
      before its session existed);
    * Ctrl-C landing inside a ``distributed`` sync call: its cleanup callback ``cancel``
      reads a variable the interrupted call never set (``NameError``), after which the
      interrupt proceeds as it should."""

    CASES = ((AssertionError, ("bokeh", "server"), None),
             (NameError, ("distributed", "utils.py"), "cancel"))

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None:
            return True
        code = tb.tb_frame.f_code
        for kind, where, func in self.CASES:
            if isinstance(exc, kind) and all(w in code.co_filename for w in where) and \
                    (func is None or code.co_name == func):
                return False
        return True


def silence_bokeh_disconnects() -> None:
    """Install :class:`_HarmlessTornadoErrors` on tornado's application logger (once)."""
    lg = logging.getLogger("tornado.application")
    if not any(isinstance(f, _HarmlessTornadoErrors) for f in lg.filters):
        lg.addFilter(_HarmlessTornadoErrors())


class RunState:
    """What the page shows, published to the scheduler at most every ``interval`` seconds
    (and at each phase change). It exists from the moment the cluster is up, so the page
    answers during planning (phase ``planning``, with the source, uuid and elapsed time);
    :meth:`start` brings the plan (phase ``running``), :meth:`finish` the end.

    Counts are the whole run's — every partition of the plan, committed before this
    invocation (``skipped``) or now, plus what running partitions have streamed — never the
    submission window Dask's own progress bars show. Rate and ETA come from
    ``progress.Estimator`` (recent rate, what is left), like the terminal line."""

    def __init__(self, client: Client, run: RunInfo | None = None, sink_desc: str = "",
                 interval: float = 0.5, *,
                 source: str = "", uuid: str = "", instance: str = "", sinks: Sequence[str] = ()):
        self.client, self.interval = client, interval
        self.sink_desc = redact(sink_desc)
        #: per sink of the run (several sinks): partitions it held before, took now, lacks
        self.sinks: list[dict[str, Any]] = [
            {"sink": redact(u), "parts_before": 0, "parts_written": 0, "parts_failed": 0} for u in sinks]
        self.source, self.uuid, self.instance = redact(source), uuid, instance
        self.t0 = time.time()
        self.phase = "planning"
        self.planning_s: float | None = None
        self.run_id: str | None = None
        self._last = 0.0
        self.groups: dict[str, dict[str, Any]] = {}
        self.errors: list[dict] = []
        self.failed: list[dict] = []
        self.est = Estimator(Counts())
        self.finished = False
        self.message = ""
        if run is not None:
            self.start(run)

    def planning(self, message: str = "") -> None:
        """Publish the planning phase (what is being counted, ``message``) at once."""
        self.message = message
        self.publish(None, force=True)

    def start(self, run: RunInfo) -> None:
        """The plan is known: one group per kind and scale, counts from zero."""
        if self.run_id == run.run_id:
            return
        self.run_id = run.run_id
        self.uuid, self.instance = run.uuid, run.instance
        self.planning_s = time.time() - self.t0
        self.phase, self.message = "running", ""
        self.groups = {}
        for p in run.partitions:
            g = self._group(p)
            g["parts_total"] += 1
            g["planned"] += p.size
        self.est = Estimator(Counts.of_plan(run.partitions))

    def _group(self, p) -> dict[str, Any]:
        spec = p.spec
        name = f"{p.kind} scale {p.scale}" if spec.scaled else p.kind
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = {"kind": p.kind, "scale": p.scale if spec.scaled else None,
                                     "parts_total": 0, "parts_done": 0, "planned": 0, "done": 0,
                                     "unit": spec.unit, "errors": 0}
        return g

    def skipped(self, parts) -> None:
        """Partitions committed before this invocation (a resumed run)."""
        for p in parts:
            g = self._group(p)
            g["parts_done"] += 1
            g["done"] += p.size

    def sinks_before(self, held: Sequence[int], total: Sequence[int]) -> None:
        """Partitions of the plan each sink held before this invocation (a resumed run), of
        those it stores (``total``: a volume sink stores no label_index partitions)."""
        for d, n, t in zip(self.sinks, held, total, strict=False):
            d["parts_before"], d["parts_total"] = int(n), int(t)

    def completed(self, part: Partition, stats, res, failure: str | None = None, *,
                  written: Sequence[int] = (), lacking: Sequence[int] = ()) -> None:
        """A task's outcome: its ``tasks.PartitionStats``, or the reason it failed;
        ``written`` / ``lacking``: the sinks that took the partition now / still lack it."""
        g = self._group(part)
        for i in written:
            self.sinks[i]["parts_written"] += 1
        for i in lacking:
            self.sinks[i]["parts_failed"] += 1
        if failure is not None:
            self.failed.append({"partition": part.key, "reason": redact(failure)})
        elif stats is not None:
            g["parts_done"] += 1
            g["done"] += stats.blocks if part.spec.scaled else stats.rows
            g["errors"] += stats.errors
            for e in stats.error_samples:
                if len(self.errors) < MAX_ERRORS_LISTED:
                    self.errors.append({**e, "reason": redact(e.get("reason", ""))})

    def snapshot(self, res, done: Counts | None = None) -> dict[str, Any]:
        now = time.time()
        el = max(now - self.t0, 1e-9)
        blocks = [g for g in self.groups.values() if g["unit"] == "blocks"]
        total = sum(g["planned"] for g in blocks)
        committed = sum(g["done"] for g in blocks)
        streamed = 0
        if done is not None and res is not None:
            streamed = max(done.blocks - res.blocks, 0)
        parts_total = sum(g["parts_total"] for g in self.groups.values())
        parts_done = sum(g["parts_done"] for g in self.groups.values())
        rate = self.est.rate("blocks")
        eta = None
        if self.finished:
            eta = 0.0
        elif done is not None:
            eta = self.est.eta(done)
        return {
            "phase": self.phase, "message": self.message,
            "run_id": self.run_id, "source": self.source, "uuid": self.uuid,
            "instance": self.instance, "sink": self.sink_desc, "started": self.t0,
            "elapsed_s": el, "planning_s": self.planning_s, "finished": self.finished,
            "partitions_total": parts_total, "partitions_done": parts_done,
            "blocks_total": total, "blocks_done": committed + streamed,
            "blocks_streamed": streamed,
            "blocks_per_s": rate, "bytes_in": getattr(done or res, "bytes_in", 0), "eta_s": eta,
            "errors": sum(g["errors"] for g in self.groups.values()),
            "groups": list(self.groups.values()), "error_blocks": self.errors,
            "failed": self.failed[:MAX_ERRORS_LISTED],
            "sinks": [{"parts_total": parts_total, **d} for d in self.sinks],
            # the source's anomalies stored with the run (source_anomalies), per kind
            "anomalies": dict(getattr(res, "anomalies", {}) or {}), "anomalies_lost": getattr(res, "lost", 0),
        }

    def publish(self, res, done: Counts | None = None, force: bool = False) -> None:
        if done is not None:
            self.est.sample(done)
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        try:
            self.client.set_metadata(METADATA_KEY, self.snapshot(res, done))
        except Exception:  # noqa: BLE001 - a dashboard hiccup never stops an export
            pass

    def finish(self, res, done: Counts | None = None) -> None:
        self.finished = True
        self.phase = "aborted" if getattr(res, "aborted", None) else "finished"
        self.publish(res, done, force=True)

    def fail(self, message: str) -> None:
        """The run ended before it started exporting (planning failed, interrupted)."""
        self.phase, self.message, self.finished = "failed", redact(message), True
        self.publish(None, force=True)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dvidetl run</title>
<style>
 body { font-family: sans-serif; margin: 1.5em; color: #222; }
 table { border-collapse: collapse; margin: 0.8em 0; }
 td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
 th { background: #f0f0f0; } td.l, th.l { text-align: left; }
 .bar { background: #e8e8e8; width: 12em; height: 0.9em; display: inline-block; }
 .bar > span { background: #3b7dd8; height: 100%; display: block; }
 .err { color: #b00; }
</style></head>
<body>
<h2>dvidetl export <span id="run">(waiting for a run)</span></h2>
<p id="what"></p>
<p id="phase"></p>
<p id="summary"></p>
<table id="groups"><thead><tr><th class="l">kind</th><th>partitions</th><th>done</th>
<th>planned</th><th class="l">progress</th><th>errors</th></tr></thead><tbody></tbody></table>
<table id="sinks" style="display:none"><thead><tr><th class="l">sink</th><th>partitions committed</th>
<th>held before</th><th>written now</th><th>failed</th></tr></thead><tbody></tbody></table>
<h3>Corrupt blocks <span id="nerr"></span></h3>
<table id="errors"><thead><tr><th>scale</th><th>x</th><th>y</th><th>z</th>
<th class="l">reason</th></tr></thead><tbody></tbody></table>
<h3>Failed partitions</h3><table id="failed"><tbody></tbody></table>
<h3>Source anomalies <span id="nanom"></span></h3>
<table id="anomalies"><thead><tr><th class="l">kind</th><th>rows</th></tr></thead><tbody></tbody></table>
<script>
function fmt(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }
function dur(s) { if (s === null || s === undefined) return "--:--";
  s = Math.round(s); var h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
  return (h ? h + ":" : "") + String(m).padStart(2, "0") + ":" + String(x).padStart(2, "0"); }
function cell(tr, text, cls) { var td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); return td; }
function render(s) {
  if (!s.phase && !s.run_id) return;
  var el = s.elapsed_s;
  document.getElementById("run").textContent = s.run_id ? s.run_id : "(planning)";
  document.getElementById("what").textContent = (s.instance || "") + "@" + (s.uuid || "") +
    (s.source ? " from " + s.source : "") + (s.sink ? " -> " + s.sink : "");
  document.getElementById("phase").textContent = s.phase + (s.message ? ": " + s.message : "") +
    ", elapsed " + dur(el) + (s.planning_s !== null && s.planning_s !== undefined ?
    " (planning took " + dur(s.planning_s) + ")" : "");
  if (!s.run_id) return;
  document.getElementById("summary").textContent =
    fmt(s.partitions_done) + " / " + fmt(s.partitions_total) + " partitions, " +
    fmt(s.blocks_done) + " / " + fmt(s.blocks_total) + " blocks, " +
    (s.blocks_per_s === null ? "--" : fmt(Math.round(s.blocks_per_s))) + " blocks/s (recent), " +
    fmt(s.errors) + " errors, ETA " + dur(s.eta_s);
  var tb = document.querySelector("#groups tbody"); tb.innerHTML = "";
  s.groups.forEach(function (g) {
    var tr = document.createElement("tr"); tr.className = "group";
    tr.dataset.kind = g.kind; tr.dataset.scale = g.scale === null ? "" : g.scale;
    tr.dataset.partsDone = g.parts_done; tr.dataset.partsTotal = g.parts_total;
    cell(tr, g.kind + (g.scale === null ? "" : " scale " + g.scale), "l");
    cell(tr, fmt(g.parts_done) + " / " + fmt(g.parts_total));
    cell(tr, fmt(g.done) + " " + g.unit); cell(tr, fmt(g.planned) + " " + g.unit);
    var td = cell(tr, "", "l"), bar = document.createElement("span"), inner = document.createElement("span");
    bar.className = "bar"; inner.style.width = (g.parts_total ? 100 * g.parts_done / g.parts_total : 100) + "%";
    bar.appendChild(inner); td.appendChild(bar);
    cell(tr, fmt(g.errors), g.errors ? "err" : ""); tb.appendChild(tr); });
  var sk = s.sinks || [], st = document.getElementById("sinks"), sb = st.querySelector("tbody");
  st.style.display = sk.length > 1 ? "" : "none"; sb.innerHTML = "";
  sk.forEach(function (d) { var tr = document.createElement("tr"); tr.className = "sink";
    tr.dataset.sink = d.sink; tr.dataset.partsDone = d.parts_before + d.parts_written;
    tr.dataset.partsFailed = d.parts_failed;
    cell(tr, d.sink, "l"); cell(tr, fmt(d.parts_before + d.parts_written) + " / " + fmt(d.parts_total));
    cell(tr, fmt(d.parts_before)); cell(tr, fmt(d.parts_written));
    cell(tr, fmt(d.parts_failed), d.parts_failed ? "err" : ""); sb.appendChild(tr); });
  document.getElementById("nerr").textContent = "(" + fmt(s.errors) + ")";
  var eb = document.querySelector("#errors tbody"); eb.innerHTML = "";
  s.error_blocks.forEach(function (e) { var tr = document.createElement("tr"); tr.className = "error";
    [e.scale, e.x, e.y, e.z].forEach(function (v) { cell(tr, v); }); cell(tr, e.reason, "l err");
    eb.appendChild(tr); });
  var fb = document.querySelector("#failed tbody"); fb.innerHTML = "";
  s.failed.forEach(function (f) { var tr = document.createElement("tr");
    cell(tr, f.partition, "l"); cell(tr, f.reason, "l err"); fb.appendChild(tr); });
  var an = s.anomalies || {}, ab = document.querySelector("#anomalies tbody"); ab.innerHTML = "";
  document.getElementById("nanom").textContent = s.anomalies_lost ?
    "(" + fmt(s.anomalies_lost) + " lose blocks: see source_anomalies)" : "(see source_anomalies)";
  document.getElementById("nanom").className = s.anomalies_lost ? "err" : "";
  Object.keys(an).sort().forEach(function (k) { var tr = document.createElement("tr");
    tr.className = "anomaly"; cell(tr, k, "l"); cell(tr, fmt(an[k])); ab.appendChild(tr); });
}
function poll() { fetch(location.pathname.replace(/\\/?$/, "") + "/state.json", {cache: "no-store"}).then(function (r) { return r.json(); }).then(render).catch(function () {}); }
poll(); setInterval(poll, 1000);
</script></body></html>
"""
