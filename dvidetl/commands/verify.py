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
    add_cluster_arguments(p)
    return p


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands.run import parse_scales
    from dvidetl.endpoint import open_flight
    from dvidetl.sinks import open_sink
    from dvidetl.verify import verify_export

    scales = parse_scales(args.scales)
    if args.vast_endpoints:
        from dvidetl.sinks.vastdb import with_endpoints

        args.sink = with_endpoints(args.sink, args.vast_endpoints)
    ep = open_flight(args)
    try:
        sink = open_sink(args.sink, uuid=args.uuid, instance=ep.instance)
        if args.run is None and sink.latest_run() is None:
            from dvidetl.errors import UserError

            raise UserError(f"no run found in {args.sink} for {sink.instance}@{sink.uuid}: "
                            "nothing to verify (export it first with `dvidetl run`)")
        if args.in_process:
            report = verify_export(ep.client, sink, args.run, scales)
        else:
            from dvidetl.cluster import open_client
            from dvidetl.tasks import task_context

            run = sink.load_run(args.run or sink.latest_run())
            ctx = task_context(run, ep, args.sink)
            with open_client(args) as dask_client:
                report = verify_export(ep.client, sink, run.run_id, scales,
                                       dask_client=dask_client, ctx=ctx)
    finally:
        ep.close()
    print(report.text())
    if not report.ok:
        print(f"dvidetl verify: export {args.sink} differs from the source (see above)", file=sys.stderr)
        return 1
    return 0
