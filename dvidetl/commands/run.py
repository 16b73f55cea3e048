"""`python -m dvidetl run`: export one labelmap at one UUID, exactly once.

Plans (or, with ``--resume``, reloads the stored plan), submits one Dask task per
not-yet-committed partition, shows progress, prints the summary. Exit 0 only when every
partition is committed, no block went to ``export_errors`` and the source reports no
anomaly by which the export lacks blocks (``source_anomalies.lost``, e.g. a killed
export-shards run); 1 otherwise (the summary says why); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dvidetl.cluster import ClusterOptions, add_cluster_arguments
from dvidetl.commands._options import (
    add_json_argument,
    command_parser,
    emit_json,
    human,
    set_interrupt_hint,
    size_arg,
)
from dvidetl.redact import redact
from dvidetl.tables import schema as S

if TYPE_CHECKING:
    from dvidetl.export.endpoint import FlightEndpoint
    from dvidetl.export.kinds import RunInfo


def source_desc(args) -> str:
    """Where the run reads from, without secrets: the source URL, else the Flight location."""
    from dvidetl.urlquery import redact_url

    if getattr(args, "flight", None):
        return redact_url(args.flight)
    return redact_url(getattr(args, "source", None) or f"synthetic://{args.uuid}")


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.commands._options import add_flight_arguments, add_sink_arguments
    from dvidetl.commands.plan import add_plan_arguments

    p = command_parser(
        sub, "run", help="export a labelmap (blocks, label indices, mapping) to a sink",
        description=__doc__,
        example=("dvidetl run --uuid demo                                  # demo volume -> ./dvidetl-out",
                 "dvidetl run --uuid UUID --flight grpc://server:8815 --sink parquet:///data/export",
                 "dvidetl run --uuid UUID --flight grpc://server:8815 --sink vastdb://vip:80/bucket/schema "
                 "--cluster slurm --jobs 8",
                 "dvidetl run --uuid UUID --flight grpc://server:8815 --sink vastdb://vip:80/bucket/schema "
                 "--sink parquet:///data/export   # both, reading the source once",
                 "dvidetl run --uuid demo --resume RUN_ID                  # continue an interrupted run",
                 "dvidetl run --uuid demo --json > result.json            # the result for scripts"))
    add_flight_arguments(p)
    add_sink_arguments(p, "where to write",
                       endpoints_help="vastdb:// sink: more CNode endpoints; workers spread across them")
    p.add_argument("--scales", default=None, help="comma-separated scales (default: all)")
    add_plan_arguments(p)
    p.add_argument("--cell-limit", type=size_arg("--cell-limit", default_unit="B"),
                   default=S.DEFAULT_CELL_LIMIT, metavar="SIZE",
                   help=f"max bytes per binary/list cell, e.g. 126KiB (default {S.DEFAULT_CELL_LIMIT}; "
                        "a bare number is bytes)")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd level of the block payloads (default 3)")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="continue a run: reuse its plan, skip committed partitions")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished export of the same instance@uuid: the new run is written "
                        "apart and replaces the old rows only when it finishes")
    p.add_argument("--dry-run", action="store_true",
                   help="check the sink, plan and print the plan; write nothing (and make no run id)")
    p.add_argument("--partitions", action="store_true", help="with --dry-run: list every partition")
    p.add_argument("--max-errors", type=int, default=None, help="stop submitting after more than N corrupt blocks")
    p.add_argument("--retries", type=int, default=3, help="retries per failed partition (default 3)")
    p.add_argument("--no-indices", action="store_true", help="skip the label_index table")
    p.add_argument("--no-mapping", action="store_true", help="skip the mapping table")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--allow-unlocked", action="store_true",
                   help="export a DVID node that is not locked (its data may change during the run)")
    add_json_argument(p)
    add_cluster_arguments(p)
    return p


def sink_json(r) -> dict:
    """One sink's figures in ``run --json`` (``RunResult.sinks``)."""
    return {"sink": r.sink, "complete": r.complete,
            "partitions": {"planned": r.partitions, "written": r.done, "already_done": r.skipped,
                           "failed": len(r.failed)},
            "blocks": r.blocks, "errors": r.errors,
            "rows": {"label_index": r.index_rows, "mapping": r.mapping_rows},
            "bytes_written": r.bytes_out,
            "failed": [{"partition": k, "reason": why} for k, why in r.failed],
            "ledger_unreadable": r.unreadable, "removed_at_finish": r.removed_at_finish}


def result_json(res, run: RunInfo, ep: FlightEndpoint, sink_urls: str | list[str],
                planning_s: float | None, rc: int,
                note: str | None) -> dict:
    """The ``run --json`` document (keys: docs/cli.md): the run's figures (the source read
    once), and each sink's in ``sinks``."""
    from dvidetl.commands.plan import source_json

    urls = [sink_urls] if isinstance(sink_urls, str) else list(sink_urls)
    return {
        "command": "run", "run_id": run.run_id, "ok": rc == 0, "exit_code": rc,
        "source": source_json(ep), "sink": urls[0], "sinks": [sink_json(r) for r in res.sinks],
        "partitions": {"planned": res.partitions, "written": res.done, "already_done": res.skipped,
                       "failed": len(res.failed)},
        "blocks": res.blocks, "errors": res.errors,
        "rows": {"label_index": res.index_rows, "mapping": res.mapping_rows},
        "label_index_note": note,
        "not_exported": run.record.get("not_exported") or {},
        "bytes": {"read": res.bytes_in, "raw": res.raw_bytes, "written": res.bytes_out},
        "seconds": {"planning": planning_s, "export": res.seconds,
                    "total": res.seconds + (planning_s or 0.0)},
        "failed": [{"partition": k, "reason": r} for k, r in res.failed],
        "aborted": res.aborted,
        "anomalies": {"kinds": res.anomalies, "lost": res.lost},
    }


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands._options import flight_options, run_options, sink_urls
    from dvidetl.commands.plan import StatusLine, index_note, plan_json, print_plan, source_json
    from dvidetl.export.api import ExportRun
    from dvidetl.export.endpoint import open_flight

    opts = run_options(args)  # every option checked before a server or cluster is reached
    cluster = ClusterOptions.from_args(args)
    sinks = sink_urls(args)
    with open_flight(**flight_options(args)) as ep:
        job = ExportRun(ep, sinks, opts, resume=args.resume, uuid_requested=args.uuid,
                        source_desc=source_desc(args), dry_run=args.dry_run)
        for w in job.warnings:
            print(f"dvidetl run: warning: {w}", file=sys.stderr)
        if not args.dry_run:
            return _export(args, job, cluster)
        planning = job.start_planning()
        parts = job.plan(StatusLine(planning) if planning is not None else None)
        note = index_note(ep.info, parts, skipped=args.no_indices)
        if job.not_exported:
            from dvidetl.export.progress import not_exported_line

            note = not_exported_line(job.not_exported)
        what = (f"run {job.resumed.run_id} (resumed)" if job.resumed is not None
                else "dry run (no run id: nothing is written)")
        print(f"{what}: {len(parts)} partitions, ~{sum(p.blocks for p in parts):,} blocks ({job.where})",
              file=sys.stderr)
        requests = ep.client.count_requests(parts)
        print_plan(parts, human(args), every=getattr(args, "partitions", False), note=note,
                   requests=requests)
        if args.json:
            emit_json({"command": "run", "dry_run": True, "run_id": args.resume,
                       "source": source_json(ep), "sink": args.sink, "sinks": args.sinks,
                       "plan": plan_json(parts, every=args.partitions, note=note, requests=requests),
                       "planning_s": planning.seconds if planning else None})
        return 0


def _export(args: argparse.Namespace, job, cluster: ClusterOptions) -> int:
    """The export (``ExportRun.run``), with the planning status line, the run's line before
    it starts, the progress line and the summary."""
    from dvidetl.commands.plan import StatusLine, index_note
    from dvidetl.export.progress import Progress, summary

    progress = None if args.quiet else Progress()
    status: list = []

    def tick(planning) -> None:
        if not status:
            status.append(StatusLine(planning))
        status[0]()

    def started(run: RunInfo) -> None:
        set_interrupt_hint(f"resume with --resume {run.run_id}")
        nblocks = sum(p.blocks for p in run.partitions)
        print(f"run {run.run_id}: {len(run.partitions)} partitions, ~{nblocks:,} blocks ({job.where})",
              file=sys.stderr)

    run, res = job.run(cluster, progress=progress, page=True, tick=tick, started=started)
    ep = job.ep
    planning_s = job.planning.seconds if job.planning is not None else None
    note = index_note(ep.info, run.partitions, skipped=args.no_indices)
    print(summary(res, sink_desc=", ".join(args.sinks), planning_s=planning_s, index_note=note,
                  not_exported=run.record.get("not_exported")), file=sys.stderr)
    unfinished = (f"{len(res.failed)} partitions failed" if res.failed
                  else f"aborted: {redact(res.aborted)}" if res.aborted else None)
    if unfinished:
        print(f"dvidetl run: {unfinished}; resume with --resume {run.run_id}", file=sys.stderr)
    elif res.errors:
        print(f"dvidetl run: {res.errors} blocks could not be exported (see export_errors)",
              file=sys.stderr)
    if not unfinished and res.lost:
        print(f"dvidetl run: the source lacks blocks it should hold ({res.lost} anomalies, see "
              "source_anomalies and `dvidetl inspect --anomalies`)", file=sys.stderr)
    rc = 1 if unfinished or res.errors or res.lost else 0
    if args.json:
        emit_json(result_json(res, run, ep, args.sinks, planning_s, rc, note))
    else:
        print(f"run_id {run.run_id}", file=sys.stdout, flush=True)
    return rc
