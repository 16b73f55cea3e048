"""`python -m dvidetl verify`: re-read every exported block and compare it with the source.

One task per partition of the run on the same kind of Dask cluster ``run`` uses (a local
one by default, ``--cluster slurm`` ...), or ``--in-process``.

Exit 0 only when every source block is exported exactly once and byte-exact, and
label_index and mapping agree; 1 with the differences listed by coordinates otherwise.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.cluster import add_cluster_arguments
    from dvidetl.endpoint import add_flight_arguments
    from dvidetl.sinks import DEFAULT_SINK

    p = sub.add_parser("verify", help="check an export against its source, block by block")
    add_flight_arguments(p)
    p.add_argument("--sink", default=DEFAULT_SINK, help=f"the export to check (default {DEFAULT_SINK})")
    p.add_argument("--vast-endpoints", default=None, metavar="H:P,H:P",
                   help="vastdb:// sink: more CNode endpoints to read through")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run to check (default: the latest)")
    p.add_argument("--scales", default=None, help="only these scales (default: all the run exported)")
    p.add_argument("--in-process", action="store_true",
                   help="check every partition in this process instead of on a Dask cluster")
    p.add_argument("--repair", action="store_true",
                   help="re-export the partitions found wrong, remove rows outside every partition, "
                        "then verify again (exit 0 only when the export is then exact)")
    add_cluster_arguments(p)
    return p


def repair(dask_client, sink, run, ctx, report) -> dict:
    """Re-export exactly the partitions ``report`` found wrong (unreadable, missing,
    extra, duplicated or different rows, not committed) and remove the rows it found outside
    every partition; returns what was done (for the summary and the run's record)."""
    from dvidetl.driver import execute

    bad = [p for p in run.partitions if p.key in report.bad_partitions]
    unfinished = [p for p in run.partitions if p.key not in sink.done(run.run_id)]
    removed = sink.remove_outside(run, report.outside)
    for p in bad:
        sink.forget(run.run_id, p)
    print(f"dvidetl verify --repair: re-exporting {len(bad)} partitions found wrong"
          + (f" and {len(unfinished)} not committed" if unfinished else "")
          + (f", removed {removed:,} rows outside every partition" if report.outside else ""),
          file=sys.stderr)
    res = execute(dask_client, run, ctx, sink)
    if not res.failed and res.done + res.skipped >= res.partitions:
        sink.finish(run)
    return {"partitions": sorted(p.key for p in bad + unfinished), "rows_removed": removed,
            "failed": [k for k, _ in res.failed]}


def record_verify(sink, run, report, scales) -> None:
    """The outcome into the run's record (``verify``: when, exact or not, the counters)."""
    import time

    run = sink.load_run(run.run_id)
    run.record["verify"] = {"at": time.time(), "exact": bool(report.ok), "scales": scales,
                            "counters": report.counters(), "seconds": round(report.seconds, 3),
                            **({"repaired": report.repaired} if getattr(report, "repaired", None) else {})}
    sink.update_run(run)


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands.run import parse_scales
    from dvidetl.endpoint import open_flight
    from dvidetl.sinks import open_sink
    from dvidetl.verify import verify_export

    scales = parse_scales(args.scales)
    if args.vast_endpoints:
        from dvidetl.sinks.vastdb import with_endpoints

        args.sink = with_endpoints(args.sink, args.vast_endpoints)
    if args.repair and scales is not None:
        from dvidetl.errors import UserError

        raise UserError("--repair checks the whole export: drop --scales")
    ep = open_flight(args)
    try:
        sink = open_sink(args.sink, uuid=args.uuid, instance=ep.instance)
        if args.run is None and sink.latest_run() is None:
            from dvidetl.errors import UserError

            raise UserError(f"no run found in {args.sink} for {sink.instance}@{sink.uuid}: "
                            "nothing to verify (export it first with `dvidetl run`)")
        run = sink.load_run(args.run or sink.latest_run())
        if args.in_process and not args.repair:
            report = verify_export(ep.client, sink, run.run_id, scales)
        else:
            from dvidetl.cluster import open_client
            from dvidetl.tasks import task_context

            ctx = task_context(run, ep, args.sink)
            with open_client(args) as dask_client:
                def check():
                    if args.in_process:
                        return verify_export(ep.client, sink, run.run_id, scales)
                    return verify_export(ep.client, sink, run.run_id, scales, dask_client=dask_client, ctx=ctx)

                report = check()
                if args.repair and not report.ok:
                    print(report.text())
                    repaired = repair(dask_client, sink, run, ctx, report)
                    report = check()
                    report.repaired = repaired
        record_verify(sink, run, report, scales)
    finally:
        ep.close()
    print(report.text())
    if not report.ok:
        print(f"dvidetl verify: export {args.sink} differs from the source (see above)", file=sys.stderr)
        return 1
    return 0
