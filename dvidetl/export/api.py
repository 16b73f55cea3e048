"""The library API of an export: ``dvidetl.export(source, sinks, options) -> RunResult``.

Everything ``dvidetl run`` does, for programs: the source reached through Flight (a Flight
server's ``grpc://`` URL, a source URL served by the embedded reference server, or an open
``FlightEndpoint``), the sink checked before anything else, the version locked (or allowed),
a finished export refused unless ``overwrite``, a resumed run checked against what it
exported, planning while the cluster starts, the run's record kept, the result returned.

:class:`ExportRun` is the same thing step by step, for callers that show each step (the
command line prints the planning status, the plan of a dry run, the run id before the
export starts); :func:`export` runs every step. Nothing here prints: what a caller should
say is returned (``ExportRun.warnings``) or handed to its callbacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dvidetl.errors import UserError
from dvidetl.export.kinds import Partition, RunInfo
from dvidetl.export.options import RunOptions

if TYPE_CHECKING:
    from distributed import Client

    from dvidetl.cluster import ClusterOptions
    from dvidetl.export.driver import RunResult
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.planning import Planning
    from dvidetl.sinks.base import Sink

log = logging.getLogger(__name__)


def asked_as(info, requested: str | None) -> str:
    """`` (asked for as X)`` when the version was named otherwise than by its full UUID."""
    names = [n for n in dict.fromkeys((requested, info.requested_uuid)) if n and n != info.uuid]
    return f" (asked for as {' / '.join(names)})" if names else ""


@contextlib.contextmanager
def endpoint(source: str | FlightEndpoint, *, uuid: str | None = None, instance: str | None = None,
             token_file: str | None = None, serve_host: str = "127.0.0.1") -> Iterator[FlightEndpoint]:
    """The Flight endpoint of ``source``: an open endpoint as given (left open), a
    ``grpc://`` Flight server, or a source URL behind the embedded server (closed on exit)."""
    from dvidetl.export.endpoint import FlightEndpoint, open_flight

    if isinstance(source, FlightEndpoint):
        yield source
        return
    if not uuid:
        raise UserError("uuid= is required: the version to export (a synthetic source's name, a "
                        "DVID UUID, prefix or branch)")
    grpc = str(source).startswith(("grpc://", "grpc+tcp://", "grpc+tls://"))
    ep = open_flight(uuid=uuid, instance=instance, token_file=token_file, serve_host=serve_host,
                     flight=source if grpc else None, source=None if grpc else source)
    try:
        yield ep
    finally:
        ep.close()


def sink_list(sinks: str | Sequence[str]) -> tuple[str, ...]:
    """The sink URLs of a run (one URL, or several: ``--sink`` repeated), in order; none, or
    one given twice, is a ``UserError``."""
    urls = (sinks,) if isinstance(sinks, str) else tuple(sinks)
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise UserError("no sink given: name one with --sink URL (repeat it for several)")
    seen: set[str] = set()
    for u in urls:
        if u in seen:
            from dvidetl.redact import redact

            raise UserError(f"--sink {redact(u)} is given twice")
        seen.add(u)
    return urls


class ExportRun:
    """One export of the endpoint's volume into the sinks at ``sinks`` (one URL or several;
    see the module docstring). Made, it has checked everything that can be checked before
    planning: every sink (``Sink.check``), the scales, the lock, a resumed run (``resume``),
    an existing export (``options.overwrite``) — per sink, refusing when the sinks hold
    different things (one a finished export, another none) without an option that says
    what to do with each.

    Several sinks share one run: one plan and one run id, the source read once per
    partition, each sink committing the partitions it lacks with its own ledger and keeping
    its own record of the run (staged in the sinks that hold a finished export under
    ``overwrite``, plain in the others)."""

    def __init__(self, ep: FlightEndpoint, sinks: str | Sequence[str], options: RunOptions, *,
                 resume: str | None = None, uuid_requested: str | None = None,
                 source_desc: str | None = None, dry_run: bool = False):
        from dvidetl.export.planning import check_scales
        from dvidetl.sinks import open_sink

        self.sink_urls = sink_list(sinks)
        self.sink_url = self.sink_urls[0]
        self.ep, self.options = ep, options
        self.uuid_requested = uuid_requested or ep.uuid
        self.source_desc = source_desc or ep.location
        self.warnings: list[str] = []
        info = ep.info
        check_scales(options, info)
        # the export is named by the full version UUID the source resolved the asked name to
        # (a DVID prefix or branch names a node; the lock is that node's)
        self.uuid = info.uuid
        self._check_locked()
        self.sinks: list[Sink] = [open_sink(u, uuid=self.uuid, instance=ep.instance) for u in self.sink_urls]
        self.sink: Sink = self.sinks[0]
        self._check_distinct()
        # the sinks first: credentials, store, reachable, writable — in seconds, before any
        # planning or cluster (a dry run creates nothing)
        for s in self.sinks:
            s.check(write=True, create=not dry_run)
        # a sink that writes one file per aligned box (a neuroglancer shard) cuts the plan; a
        # volume it cannot store fails here, before planning (sinks wanting other cuts: refused)
        from dvidetl.export.planning import combine_cells

        self.cells = combine_cells([s.plan_cells(info) for s in self.sinks])
        self.not_exported = self._kinds_not_taken(self.sinks)
        #: per sink, the resumed run as that sink stores it (None: the sink lacks it)
        self._held: list[RunInfo | None] = []
        self.resumed: RunInfo | None = self._resumed(resume) if resume else None
        #: per sink: whether the run is staged there (``overwrite`` over a finished export)
        self.staged_in: list[bool] = [False] * len(self.sinks)
        if not (resume or dry_run):
            self.staged_in = self._check_existing()
        self.staged = any(self.staged_in)
        self.planning: Planning | None = None

    @property
    def where(self) -> str:
        """``instance@uuid (asked for as X) from LOCATION -> SINK[, SINK...]`` (secrets redacted)."""
        from dvidetl.redact import redact

        return (f"{self.ep.instance}@{self.uuid}{asked_as(self.ep.info, self.uuid_requested)} from "
                f"{self.ep.location} -> {', '.join(redact(u) for u in self.sink_urls)}")

    def _name(self, i: int) -> str:
        from dvidetl.redact import redact

        return redact(self.sink_urls[i])

    def _check_distinct(self) -> None:
        """Two sinks of one run must not share their storage (one ledger for two sinks would
        make each think the other's partitions are its own)."""
        seen: dict[str, int] = {}
        for i, s in enumerate(self.sinks):
            key = s.storage_key()
            if key in seen:
                raise UserError(f"--sink {self._name(i)} and --sink {self._name(seen[key])} are the "
                                "same export: give each sink once")
            seen[key] = i

    def _check_locked(self) -> None:
        """Only a locked DVID node exports deterministically (its range reads are not one
        snapshot): refuse an open node unless the options allow it (then a warning)."""
        if self.ep.info.locked is not False:
            return
        uuid = self.uuid
        msg = (f"DVID node {uuid} is not locked: blocks, indices and mapping read during the run "
               "may come from different states of it, and a rerun may differ")
        if not self.options.allow_unlocked:
            raise UserError(f"{msg}; lock (commit) the node first — POST /api/node/{uuid}/commit — "
                            "or export it anyway with --allow-unlocked")
        self.warnings.append(f"{msg} (--allow-unlocked)")
        log.warning("%s (--allow-unlocked)", msg)

    def _kinds_not_taken(self, sinks: list[Sink]) -> dict[str, str]:
        """The keyed kinds no sink of the run stores (a precomputed volume has no tables for
        them): switched off in the run's options, said in a warning and kept in the run's
        record (``not_exported``), so the summary and ``verify`` say so too."""
        from dataclasses import replace

        from dvidetl.redact import redact

        out: dict[str, str] = {}
        names = {"indices": "the label indices", "mapping": "the mapping"}
        for kind, flag in (("indices", "indices"), ("mapping", "mapping")):
            if not getattr(self.options, flag) or any(s.takes(kind) for s in sinks):
                continue
            self.options = (replace(self.options, indices=False) if flag == "indices"
                            else replace(self.options, mapping=False))
            out[kind] = (f"not exported: {', '.join(redact(s.url) for s in sinks)} stores the volume "
                         "(blocks) and the source's anomalies only; add a parquet:// or vastdb:// sink "
                         "to the run for the tables")
        self.anomalies = any(s.takes("anomalies") for s in sinks)
        if out:
            self.warnings.append(f"{' and '.join(names[k] for k in out)} are not exported: "
                                 f"{', '.join(redact(s.url) for s in sinks)} stores the volume only "
                                 "(add a parquet:// or vastdb:// sink to the run for them)")
        return out

    def _resumed(self, run_id: str) -> RunInfo:
        """The run to resume, from every sink that stores it. A sink that lacks it is added
        to the run (it gets every partition) only when it holds no finished export; the
        sinks that store it must store the same plan."""
        held: list[RunInfo | None]
        if len(self.sinks) == 1:
            held = [self.sink.load_run(run_id)]  # a wrong run id fails before any cluster
        else:
            held = [s.load_run(run_id) if run_id in s.runs() else None for s in self.sinks]
            if all(r is None for r in held):
                raise UserError(f"no run {run_id!r} in any of the sinks ({', '.join(map(self._name, range(len(self.sinks))))}) "
                                f"for {self.ep.instance}@{self.uuid}: `dvidetl status --sink URL` lists each sink's runs")
        first = next(r for r in held if r is not None)
        for i, run in enumerate(held):
            if run is None:
                continue
            if run.uuid != self.uuid or run.instance != self.ep.instance:
                raise UserError(f"run {run_id} exported {run.instance}@{run.uuid}, "
                                f"not {self.ep.instance}@{self.uuid}")
            if run.state == "superseded":
                where = f" in {self._name(i)}" if len(self.sinks) > 1 else ""
                raise UserError(f"run {run_id}{where} was replaced by run {run.record.get('superseded_by')}: "
                                "nothing to resume")
            if run.partitions != first.partitions:
                j = held.index(first)
                raise UserError(f"run {run_id} has another plan in {self._name(i)} than in {self._name(j)} "
                                f"({len(run.partitions)} and {len(first.partitions)} partitions): resume "
                                "each sink on its own")
        for i, run in enumerate(held):
            if run is not None:
                continue
            finished = self.sinks[i].finished_runs()
            if finished:
                raise UserError(f"{self._name(i)} holds a finished export of {self.ep.instance}@{self.uuid} "
                                f"(run {finished[-1]}), not run {run_id}: resume run {run_id} without that "
                                f"--sink, or replace the exports with a new run and --overwrite")
            log.info("run %s: %s does not hold it yet; every partition is written there", run_id, self._name(i))
        self._held = held
        return first

    def _check_existing(self) -> list[bool]:
        """A plain run into an export that already has a finished run refuses (naming what
        to do); with ``overwrite`` the new run is staged in each sink that holds one: written
        apart, and made the export plain readers see only when it finishes. Returns, per
        sink, whether the new run is staged there."""
        finished = [s.finished_runs() for s in self.sinks]
        holding = [i for i, f in enumerate(finished) if f]
        if not holding:
            return [False] * len(self.sinks)
        if not self.options.overwrite:
            exp = f"{self.sink.instance}@{self.sink.uuid}"
            if len(self.sinks) == 1:
                last = finished[0][-1]
                raise UserError(f"{self.sink_url} already holds a finished export of {exp} (run {last}): "
                                f"continue that run with --resume {last}, or replace it with --overwrite "
                                "(the old rows stay readable until the new run finishes)")
            held = "; ".join(f"{self._name(i)} holds a finished export of {exp} (run {finished[i][-1]})"
                             for i in holding)
            lacking = [self._name(i) for i in range(len(self.sinks)) if i not in holding]
            runs = {finished[i][-1] for i in holding}
            if lacking:
                what = f"{held}, {', '.join(lacking)} {'does' if len(lacking) == 1 else 'do'} not: "
                if len(runs) == 1:
                    (last,) = runs
                    what += (f"add the other sinks to that run with --resume {last} (each partition is "
                             "written only where it is missing), or ")
                what += ("replace it with a new run in every sink with --overwrite (staged where an "
                         "export exists, the old rows readable until the new run finishes)")
            else:
                what = held + ": "
                if len(runs) == 1:
                    (last,) = runs
                    what += f"continue that run with --resume {last}, or "
                what += ("replace them with --overwrite (the old rows stay readable until the new run "
                         "finishes)")
            raise UserError(what)
        return [bool(f) for f in finished]

    # -- planning --------------------------------------------------------------------------
    def start_planning(self) -> Planning | None:
        """Start planning in a daemon thread (None for a resumed run: its plan is stored)."""
        from dvidetl.export.planning import Planning

        if self.resumed is None and self.planning is None:
            self.planning = Planning(self.ep, self.options, cells=self.cells,
                                     anomalies=self.anomalies).start()
        return self.planning

    def plan(self, tick: Callable[[], None] | None = None) -> list[Partition]:
        """The run's partitions: the resumed run's, or planned (``tick()`` every half second
        while the source counts)."""
        if self.resumed is not None:
            return self.resumed.partitions
        planning = self.start_planning()
        assert planning is not None
        return planning.wait(tick)

    def new_run(self, parts: list[Partition]) -> RunInfo:
        """The run of a fresh plan: options, volume and record (source without secrets, the
        asked and the resolved uuid, staged or not)."""
        from dvidetl.export.planning import new_run_id

        info = self.ep.info
        opts = self.options
        if opts.scales is None:  # the record names the scales exported
            from dataclasses import replace

            opts = replace(opts, scales=tuple(s.scale for s in info.scales))
        # read now, not with _check_existing's: planning took a while, and the id must pass
        # every run the sinks hold when this one is stored
        held = [r for s in self.sinks for r in s.runs()]
        return RunInfo(
            run_id=new_run_id(after=held), uuid=self.uuid, instance=self.ep.instance, partitions=parts,
            options=opts, volume=json.loads(info.to_json()),
            record={"source": self.source_desc, "uuid_requested": self.uuid_requested,
                    "uuid_resolved": self.uuid, "staged": self.staged_in[0],
                    **({"not_exported": self.not_exported} if self.not_exported else {})},
        )

    # -- the export --------------------------------------------------------------------------
    def run(self, cluster: str | ClusterOptions | Any = "local", *, progress=None,
            page: bool = False,
            tick: Callable[[Planning], None] | None = None,
            started: Callable[[RunInfo], None] | None = None) -> tuple[RunInfo, RunResult]:
        """Plan (while the cluster starts: both take seconds, neither needs the other) and
        export, with the run's dashboard page up from the start; returns the run and its
        result. ``cluster``: where (``cluster.open_client``'s first argument), or a connected
        ``distributed.Client`` to use as it is. ``tick(planning)`` is called while planning,
        ``started(run)`` once the run exists, before its partitions are submitted."""
        from dvidetl.export.dashboard import RunState

        self.start_planning()
        with _client(cluster, page) as client:
            state = RunState(client, None, ", ".join(self.sink_urls), source=self.ep.location,
                             uuid=self.uuid, instance=self.ep.instance,
                             sinks=self.sink_urls if len(self.sink_urls) > 1 else ())
            planning = self.planning
            try:
                if planning is not None:
                    def each() -> None:
                        if tick is not None:
                            tick(planning)
                        state.planning(planning.doing)

                    state.planning(planning.doing)
                    run = self.new_run(planning.wait(each))
                else:
                    assert self.resumed is not None
                    run = self.resumed
            except BaseException as exc:
                state.fail(f"planning failed: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
                raise
            if started is not None:
                started(run)
            return run, self.execute(client, run, progress=progress, dashboard=state)

    def sink_runs(self, run: RunInfo) -> list[RunInfo]:
        """``run`` as each sink records it: one plan and run id, each sink its own record
        (staged or not there; a resumed run's state and verify outcome as that sink has
        them; a sink added on resume starts a plain record)."""
        from dataclasses import replace

        out = []
        for i in range(len(self.sinks)):
            held = self._held[i] if self._held else None
            if held is not None:
                out.append(held)
            elif i == 0 and self.resumed is None:
                out.append(run)
            else:
                keep = {k: run.record[k] for k in ("source", "uuid_requested", "uuid_resolved") if k in run.record}
                out.append(replace(run, record={**keep, "staged": self.staged_in[i]}))
        return out

    def execute(self, client: Client, run: RunInfo, *, progress=None, dashboard=None) -> RunResult:
        """Store the run with every sink and export the partitions each lacks on
        ``client``'s cluster; the outcome goes into each sink's record of the run (its own
        figures: ``RunResult.sinks``), and each sink that then holds every partition is
        finished (published) — whatever the other sinks hold."""
        from dvidetl.export.driver import execute
        from dvidetl.export.tasks import task_context
        from dvidetl.redact import redact

        runs = self.sink_runs(run)
        for s, r in zip(self.sinks, runs, strict=True):
            r.record.update(state="running", started=time.time())
            r.record.pop("ended", None)
            if len(self.sinks) > 1:
                r.record["sinks"] = [redact(u) for u in self.sink_urls]
            s.prepare(r)
            if self.resumed is not None:
                s.update_run(r)
        ctx = task_context(run, self.ep, self.sink_urls)
        try:
            res = execute(client, run, ctx, self.sinks, progress=progress,
                          retries=run.options.retries, max_errors=run.options.max_errors,
                          dashboard=dashboard)
        except BaseException as exc:
            crash = redact(f"{type(exc).__name__}: {exc}")
            _each(self.sinks, runs, [None] * len(runs), crash)
            raise
        _each(self.sinks, runs, res.sinks)
        for rs in res.sinks:
            for k, v in rs.removed_at_finish.items():
                res.removed_at_finish[k] = res.removed_at_finish.get(k, 0) + v
        return res


def _each(sinks: Sequence[Sink], runs: Sequence[RunInfo], results: Sequence[RunResult | None],
          crash: str | None = None) -> None:
    """``record_end`` in every sink, each tried even when an earlier one raised (one
    unreachable sink must not leave the others' records unwritten); then the first error of
    a run that completed there (its publishing failed). A failed run whose record cannot be
    updated (the disk that failed its partitions is full) is not a second error: the
    summary reports the run, the log says the record is stale (and ``--resume`` rewrites
    it); after a crash the crash is what the caller raises."""
    first: Exception | None = None
    for s, r, rs in zip(sinks, runs, results, strict=True):
        try:
            record_end(s, r, rs, crash)
            if rs is not None:
                rs.removed_at_finish = dict(r.record.get("removed_at_finish") or {})
        except Exception as exc:  # noqa: BLE001 - raised below, after the other sinks
            log.error("recording the end of run %s in %r failed (its stored record is not updated): %s",
                      r.run_id, s, exc)
            if rs is not None and rs.complete:
                first = first or exc
    if first is not None and crash is None:
        raise first


@contextlib.contextmanager
def _client(cluster, page: bool) -> Iterator[Any]:
    """A client of the cluster named, or the connected client given (left open)."""
    from dvidetl.cluster import ClusterOptions, open_client

    if isinstance(cluster, (str, ClusterOptions)):
        with open_client(cluster, page=page) as client:
            yield client
    else:
        yield cluster


def record_end(sink: Sink, run: RunInfo, res: RunResult | None, crash: str | None = None) -> None:
    """The run's outcome into the sink's record of it: ``finished`` (and published:
    ``sink.finish``) when every partition is committed there, else ``failed`` with the
    result (``res``: the sink's own figures, ``RunResult.sinks``)."""
    run.record["ended"] = time.time()
    if res is not None:
        run.record["result"] = res.to_dict()
    complete = res is not None and res.complete
    if complete:
        sink.finish(run)
        return
    run.record["state"] = "failed"
    if crash is not None:
        run.record["result"] = {**run.record.get("result", {}), "crash": crash[:300]}
    try:
        sink.update_run(run)
    except Exception:  # noqa: BLE001 - the original error matters more than its record
        if crash is None:
            raise


def export(source: str | FlightEndpoint, sinks: str | Sequence[str] | None = None,
           options: RunOptions | None = None, *, uuid: str | None = None, instance: str | None = None,
           token_file: str | None = None, serve_host: str = "127.0.0.1",
           cluster: str | ClusterOptions | Any = "local", resume: str | None = None, progress=None,
           sink: str | None = None) -> RunResult:
    """Export a labelmap into the sinks at ``sinks`` — one URL (``parquet://DIR``,
    ``vastdb://...``) or several, all written in the same pass (the source read once per
    partition) — exactly once in each; returns the run's ``RunResult`` (``ok`` when every
    partition is committed to every sink, no block failed and the source lost none; each
    sink's own figures in ``.sinks``).

    ``source``: a Flight server (``grpc://HOST:PORT``), a source URL served by the embedded
    reference server (``synthetic://demo``, ``shards:///DIR``, ``dvid+http://HOST/...``), or
    an open ``FlightEndpoint``; ``uuid``: the version (required unless an endpoint is given).
    ``cluster``: ``"local"``, ``"tcp://HOST:PORT"``, ``"slurm"``, a ``ClusterOptions``, or a
    connected ``distributed.Client``. ``resume``: a run id to continue (in every sink; a
    sink that lacks it gets every partition). ``sink=``: the one-sink keyword of earlier
    versions.
    """
    if sink is not None:
        if sinks is not None:
            raise UserError("give the sinks once: sinks= or sink=, not both")
        sinks = sink
    if sinks is None:
        raise UserError("no sink given: export(source, 'parquet://DIR', ...)")
    opts = options or RunOptions()
    with endpoint(source, uuid=uuid, instance=instance, token_file=token_file,
                  serve_host=serve_host) as ep:
        from dvidetl.urlquery import redact_url

        job = ExportRun(ep, sinks, opts, resume=resume, uuid_requested=uuid or ep.uuid,
                        source_desc=redact_url(source) if isinstance(source, str) else ep.location)
        return job.run(cluster, progress=progress)[1]
