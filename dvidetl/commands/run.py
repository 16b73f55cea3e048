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
import time

from dvidetl.cluster import ClusterOptions, add_cluster_arguments, open_client
from dvidetl.commands._options import (
    add_json_argument,
    asked_as,
    command_parser,
    emit_json,
    human,
    parse_scales,
    set_interrupt_hint,
    size_arg,
)
from dvidetl.errors import UserError
from dvidetl.redact import redact
from dvidetl.tables import schema as S


def check_locked(info, uuid: str, allow: bool) -> None:
    """Only a locked DVID node exports deterministically (its range reads are not one
    snapshot): refuse an open node unless the user says it is fine."""
    if info.locked is not False:
        return
    msg = (f"DVID node {uuid} is not locked: blocks, indices and mapping read during the run "
           "may come from different states of it, and a rerun may differ")
    if not allow:
        raise UserError(f"{msg}; lock (commit) the node first — POST /api/node/{uuid}/commit — "
                        "or export it anyway with --allow-unlocked")
    print(f"dvidetl run: warning: {msg} (--allow-unlocked)", file=sys.stderr)


def check_existing(sink, args) -> bool:
    """A plain run into an export that already has a finished run refuses (naming what to
    do); with ``--overwrite`` the new run is staged: written apart, and made the export
    plain readers see only when it finishes. Returns whether the new run is staged."""
    finished = sink.finished_runs()
    if not finished:
        return False
    if not args.overwrite:
        raise UserError(f"{args.sink} already holds a finished export of {sink.instance}@{sink.uuid} "
                        f"(run {finished[-1]}): continue that run with --resume {finished[-1]}, or replace "
                        "it with --overwrite (the old rows stay readable until the new run finishes)")
    return True


def source_desc(args, ep) -> str:
    """Where the run reads from, without secrets: the source URL, else the Flight location."""
    from dvidetl.urlquery import redact_url

    if getattr(args, "flight", None):
        return redact_url(args.flight)
    return redact_url(getattr(args, "source", None) or f"synthetic://{args.uuid}")


def record_end(sink, run, res, crash: str | None = None) -> None:
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


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.commands.plan import add_plan_arguments
    from dvidetl.export.endpoint import add_flight_arguments
    from dvidetl.sinks import DEFAULT_SINK

    p = command_parser(
        sub, "run", help="export a labelmap (blocks, label indices, mapping) to a sink",
        description=__doc__,
        example=("dvidetl run --uuid demo                                  # demo volume -> ./dvidetl-out",
                 "dvidetl run --uuid UUID --flight grpc://server:8815 --sink parquet:///data/export",
                 "dvidetl run --uuid UUID --flight grpc://server:8815 --sink vastdb://vip:80/bucket/schema "
                 "--cluster slurm --jobs 8",
                 "dvidetl run --uuid demo --resume RUN_ID                  # continue an interrupted run",
                 "dvidetl run --uuid demo --json > result.json            # the result for scripts"))
    add_flight_arguments(p)
    p.add_argument("--sink", default=DEFAULT_SINK, help=f"where to write (default {DEFAULT_SINK})")
    p.add_argument("--vast-endpoints", default=None, metavar="H:P,H:P",
                   help="vastdb:// sink: more CNode endpoints; workers spread across them")
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


def _check_options(args: argparse.Namespace) -> None:
    from dvidetl.commands.plan import check_plan_options

    check_plan_options(args)
    from dvidetl.tables.cells import check_cell_limit

    check_cell_limit(args.cell_limit)
    if not -7 <= args.zstd_level <= 22:  # zstd's fast (negative) levels through its maximum
        raise UserError(f"--zstd-level must be -7..22 (got {args.zstd_level})")
    if args.max_errors is not None and args.max_errors < 0:
        raise UserError(f"--max-errors must be 0 or more (got {args.max_errors})")
    if args.retries < 0:
        raise UserError(f"--retries must be 0 or more (got {args.retries})")
    ClusterOptions.from_args(args)  # a bad cluster option fails before planning, not after


def result_json(res, run, ep, sink_url: str, planning_s: float | None, rc: int,
                note: str | None) -> dict:
    """The ``run --json`` document (keys: docs/cli.md)."""
    from dvidetl.commands.plan import source_json

    return {
        "command": "run", "run_id": run.run_id, "ok": rc == 0, "exit_code": rc,
        "source": source_json(ep), "sink": sink_url,
        "partitions": {"planned": res.partitions, "written": res.done, "already_done": res.skipped,
                       "failed": len(res.failed)},
        "blocks": res.blocks, "errors": res.errors,
        "rows": {"label_index": res.index_rows, "mapping": res.mapping_rows},
        "label_index_note": note,
        "bytes": {"read": res.bytes_in, "raw": res.raw_bytes, "written": res.bytes_out},
        "seconds": {"planning": planning_s, "export": res.seconds,
                    "total": res.seconds + (planning_s or 0.0)},
        "failed": [{"partition": k, "reason": r} for k, r in res.failed],
        "aborted": res.aborted,
        "anomalies": {"kinds": res.anomalies, "lost": res.lost},
    }


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands.plan import Planning, StatusLine, index_note, plan_json, print_plan
    from dvidetl.export.endpoint import open_flight
    from dvidetl.export.kinds import RunInfo
    from dvidetl.export.planning import new_run_id
    from dvidetl.sinks import open_sink

    _check_options(args)
    scales = parse_scales(args.scales)
    if getattr(args, "vast_endpoints", None):
        from dvidetl.sinks._vastdb_support import with_endpoints

        args.sink = with_endpoints(args.sink, args.vast_endpoints)
    ep = open_flight(args)
    try:
        info = ep.info
        have = [s.scale for s in info.scales]
        if scales is not None:
            missing = [s for s in scales if s not in have]
            if missing:
                raise UserError(f"--scales {args.scales}: scales {missing} not in the volume (has {have})")
        # the export is named by the full version UUID the source resolved --uuid to (a DVID
        # prefix or branch names a node; the lock is that node's), and records what was asked
        uuid = info.uuid
        check_locked(info, uuid, args.allow_unlocked)
        sink = open_sink(args.sink, uuid=uuid, instance=ep.instance)
        # the sink first: credentials, store, reachable, writable — in seconds, before any
        # planning or cluster (a dry run creates nothing)
        sink.check(write=True, create=not args.dry_run)
        where = (f"{ep.instance}@{uuid}{asked_as(info, args.uuid)} from {ep.location} -> "
                 f"{redact(args.sink)}")
        resumed = None
        if args.resume:
            resumed = sink.load_run(args.resume)  # a wrong run id fails before any cluster
            if resumed.uuid != uuid or resumed.instance != ep.instance:
                raise UserError(f"run {args.resume} exported {resumed.instance}@{resumed.uuid}, "
                                f"not {ep.instance}@{uuid}")
            if resumed.state == "superseded":
                raise UserError(f"run {args.resume} was replaced by run "
                                f"{resumed.record.get('superseded_by')}: nothing to resume")
        staged = False if args.resume or args.dry_run else check_existing(sink, args)
        planning = None
        if resumed is None:
            planning = Planning(args, ep, scales, indices=not args.no_indices,
                                mapping=not args.no_mapping)

        def new_run(parts) -> RunInfo:
            return RunInfo(
                run_id=new_run_id(), uuid=uuid, instance=ep.instance, partitions=parts,
                options={"scales": scales if scales is not None else have,
                         "partition_blocks": args.partition_blocks,
                         "index_partition_rows": args.index_partition_rows,
                         "mapping_partition_rows": args.mapping_partition_rows,
                         "cell_limit": args.cell_limit,
                         "zstd_level": args.zstd_level,
                         "indices": not args.no_indices, "mapping": not args.no_mapping,
                         "max_errors": args.max_errors, "retries": args.retries,
                         "overwrite": bool(args.overwrite), "allow_unlocked": bool(args.allow_unlocked)},
                volume=__import__("json").loads(info.to_json()),
                # --uuid as given, and the full node UUID the source resolved it to (a DVID
                # prefix or branch; the source's own uuid= is volume.requested_uuid)
                record={"source": source_desc(args, ep), "uuid_requested": args.uuid,
                        "uuid_resolved": uuid, "staged": staged},
            )

        if args.dry_run:
            parts = resumed.partitions if resumed is not None else \
                planning.start().wait(StatusLine(planning))
            note = index_note(info, parts, skipped=args.no_indices)
            what = f"run {resumed.run_id} (resumed)" if resumed is not None else "dry run (no run id: nothing is written)"
            print(f"{what}: {len(parts)} partitions, ~{sum(p.blocks for p in parts):,} blocks ({where})",
                  file=sys.stderr)
            requests = ep.client.count_requests(parts)
            print_plan(parts, human(args), every=getattr(args, "partitions", False), note=note,
                       requests=requests)
            if args.json:
                from dvidetl.commands.plan import source_json

                emit_json({"command": "run", "dry_run": True, "run_id": args.resume,
                           "source": source_json(ep), "sink": args.sink,
                           "plan": plan_json(parts, every=args.partitions, note=note,
                                             requests=requests),
                           "planning_s": planning.seconds if planning else None})
            return 0
        return _export(args, ep, sink, resumed, planning, new_run, where)
    finally:
        ep.close()


def _export(args, ep, sink, resumed, planning, new_run, where: str) -> int:
    """Plan while the cluster starts (both take seconds, neither needs the other), with the
    run's dashboard page up from the start; then export and report."""
    from dvidetl.commands.plan import StatusLine, index_note
    from dvidetl.export.dashboard import RunState
    from dvidetl.export.driver import execute
    from dvidetl.export.progress import Progress, summary
    from dvidetl.export.tasks import task_context

    progress = None if args.quiet else Progress()
    if planning is not None:
        planning.start()
    with open_client(ClusterOptions.from_args(args), page=True) as client:
        state = RunState(client, None, args.sink, source=ep.location, uuid=ep.info.uuid,
                         instance=ep.instance)
        try:
            if planning is not None:
                status = StatusLine(planning)

                def tick() -> None:
                    status()
                    state.planning(planning.doing)

                state.planning(planning.doing)
                run = new_run(planning.wait(tick))
            else:
                run = resumed
        except BaseException as exc:
            state.fail(f"planning failed: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
            raise
        set_interrupt_hint(f"resume with --resume {run.run_id}")
        nblocks = sum(p.blocks for p in run.partitions)
        print(f"run {run.run_id}: {len(run.partitions)} partitions, ~{nblocks:,} blocks ({where})",
              file=sys.stderr)
        run.record.update(state="running", started=time.time())
        run.record.pop("ended", None)
        sink.prepare(run)
        if args.resume:
            sink.update_run(run)
        ctx = task_context(run, ep, args.sink)
        try:
            res = execute(client, run, ctx, sink, progress=progress, retries=args.retries,
                          max_errors=args.max_errors, dashboard=state)
        except BaseException as exc:
            record_end(sink, run, None, redact(f"{type(exc).__name__}: {exc}"))
            raise
        record_end(sink, run, res)
    planning_s = planning.seconds if planning is not None else None
    note = index_note(ep.info, run.partitions, skipped=args.no_indices)
    print(summary(res, sink_desc=args.sink, planning_s=planning_s, index_note=note), file=sys.stderr)
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
        emit_json(result_json(res, run, ep, args.sink, planning_s, rc, note))
    else:
        print(f"run_id {run.run_id}", file=sys.stdout, flush=True)
    return rc
