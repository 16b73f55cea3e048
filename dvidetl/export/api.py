"""The library API of an export: ``dvidetl.export(source, sink, options) -> RunResult``.

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
from collections.abc import Callable, Iterator
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


class ExportRun:
    """One export of the endpoint's volume into the sink at ``sink_url`` (see the module
    docstring). Made, it has checked everything that can be checked before planning: the
    sink (``Sink.check``), the scales, the lock, a resumed run (``resume``), an existing
    export (``options.overwrite``)."""

    def __init__(self, ep: FlightEndpoint, sink_url: str, options: RunOptions, *,
                 resume: str | None = None, uuid_requested: str | None = None,
                 source_desc: str | None = None, dry_run: bool = False):
        from dvidetl.export.planning import check_scales
        from dvidetl.sinks import open_sink

        self.ep, self.sink_url, self.options = ep, sink_url, options
        self.uuid_requested = uuid_requested or ep.uuid
        self.source_desc = source_desc or ep.location
        self.warnings: list[str] = []
        info = ep.info
        check_scales(options, info)
        # the export is named by the full version UUID the source resolved the asked name to
        # (a DVID prefix or branch names a node; the lock is that node's)
        self.uuid = info.uuid
        self._check_locked()
        self.sink: Sink = open_sink(sink_url, uuid=self.uuid, instance=ep.instance)
        # the sink first: credentials, store, reachable, writable — in seconds, before any
        # planning or cluster (a dry run creates nothing)
        self.sink.check(write=True, create=not dry_run)
        # a sink that writes one file per aligned box (a neuroglancer shard) cuts the plan; a
        # volume it cannot store fails here, before planning
        from dvidetl.export.planning import combine_cells

        self.cells = combine_cells([self.sink.plan_cells(info)])
        self.not_exported = self._kinds_not_taken([self.sink])
        self.resumed: RunInfo | None = self._resumed(resume) if resume else None
        self.staged = False if resume or dry_run else self._check_existing()
        self.planning: Planning | None = None

    @property
    def where(self) -> str:
        """``instance@uuid (asked for as X) from LOCATION -> SINK`` (secrets redacted)."""
        from dvidetl.redact import redact

        return (f"{self.ep.instance}@{self.uuid}{asked_as(self.ep.info, self.uuid_requested)} from "
                f"{self.ep.location} -> {redact(self.sink_url)}")

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
        run = self.sink.load_run(run_id)  # a wrong run id fails before any cluster
        if run.uuid != self.uuid or run.instance != self.ep.instance:
            raise UserError(f"run {run_id} exported {run.instance}@{run.uuid}, "
                            f"not {self.ep.instance}@{self.uuid}")
        if run.state == "superseded":
            raise UserError(f"run {run_id} was replaced by run {run.record.get('superseded_by')}: "
                            "nothing to resume")
        return run

    def _check_existing(self) -> bool:
        """A plain run into an export that already has a finished run refuses (naming what
        to do); with ``overwrite`` the new run is staged: written apart, and made the export
        plain readers see only when it finishes. Returns whether the new run is staged."""
        finished = self.sink.finished_runs()
        if not finished:
            return False
        if not self.options.overwrite:
            raise UserError(f"{self.sink_url} already holds a finished export of {self.sink.instance}@"
                            f"{self.sink.uuid} (run {finished[-1]}): continue that run with --resume "
                            f"{finished[-1]}, or replace it with --overwrite (the old rows stay readable "
                            "until the new run finishes)")
        return True

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
        return RunInfo(
            run_id=new_run_id(), uuid=self.uuid, instance=self.ep.instance, partitions=parts,
            options=opts, volume=json.loads(info.to_json()),
            record={"source": self.source_desc, "uuid_requested": self.uuid_requested,
                    "uuid_resolved": self.uuid, "staged": self.staged,
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
            state = RunState(client, None, self.sink_url, source=self.ep.location, uuid=self.uuid,
                             instance=self.ep.instance)
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

    def execute(self, client: Client, run: RunInfo, *, progress=None, dashboard=None) -> RunResult:
        """Store the run with the sink and export its not-yet-committed partitions on
        ``client``'s cluster; the outcome goes into the run's record."""
        from dvidetl.export.driver import execute
        from dvidetl.export.tasks import task_context
        from dvidetl.redact import redact

        run.record.update(state="running", started=time.time())
        run.record.pop("ended", None)
        self.sink.prepare(run)
        if self.resumed is not None:
            self.sink.update_run(run)
        ctx = task_context(run, self.ep, self.sink_url)
        try:
            res = execute(client, run, ctx, self.sink, progress=progress, retries=run.options.retries,
                          max_errors=run.options.max_errors, dashboard=dashboard)
        except BaseException as exc:
            record_end(self.sink, run, None, redact(f"{type(exc).__name__}: {exc}"))
            raise
        record_end(self.sink, run, res)
        return res


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
    """The run's outcome into its record: ``finished`` (and published: ``sink.finish``) when
    every partition is committed, else ``failed`` with the result."""
    run.record["ended"] = time.time()
    if res is not None:
        run.record["result"] = res.to_dict()
    complete = res is not None and not res.failed and res.done + res.skipped >= res.partitions
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


def export(source: str | FlightEndpoint, sink: str, options: RunOptions | None = None, *,
           uuid: str | None = None, instance: str | None = None, token_file: str | None = None,
           serve_host: str = "127.0.0.1", cluster: str | ClusterOptions | Any = "local",
           resume: str | None = None, progress=None) -> RunResult:
    """Export a labelmap into the sink at URL ``sink`` (``parquet://DIR``, ``vastdb://...``),
    exactly once; returns the run's ``RunResult`` (``ok`` when every partition is committed,
    no block failed and the source lost none).

    ``source``: a Flight server (``grpc://HOST:PORT``), a source URL served by the embedded
    reference server (``synthetic://demo``, ``shards:///DIR``, ``dvid+http://HOST/...``), or
    an open ``FlightEndpoint``; ``uuid``: the version (required unless an endpoint is given).
    ``cluster``: ``"local"``, ``"tcp://HOST:PORT"``, ``"slurm"``, a ``ClusterOptions``, or a
    connected ``distributed.Client``. ``resume``: a run id to continue.
    """
    opts = options or RunOptions()
    with endpoint(source, uuid=uuid, instance=instance, token_file=token_file,
                  serve_host=serve_host) as ep:
        from dvidetl.urlquery import redact_url

        job = ExportRun(ep, sink, opts, resume=resume, uuid_requested=uuid or ep.uuid,
                        source_desc=redact_url(source) if isinstance(source, str) else ep.location)
        return job.run(cluster, progress=progress)[1]
