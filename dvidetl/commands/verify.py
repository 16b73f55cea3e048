"""`python -m dvidetl verify`: re-read every exported block and compare it with the source.

One task per partition of the run on the same kind of Dask cluster ``run`` uses (a local
one by default, ``--cluster slurm`` ...), or ``--in-process``.

Exit 0 only when every source block is exported exactly once and byte-exact, and
label_index and mapping agree; 1 with the differences listed by coordinates otherwise.
With ``--sink`` repeated, every sink is checked in one pass: each partition is read from
the source once and compared with every sink that stores its kind; each sink gets its own
report, and the exit code is 0 only when every one is exact. ``--repair`` re-exports a
partition once for all the sinks that have it wrong, then checks again only what it redid.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.cluster import add_cluster_arguments
    from dvidetl.commands._options import (
        add_flight_arguments,
        add_json_argument,
        add_sink_arguments,
        command_parser,
    )

    p = command_parser(
        sub, "verify", help="check an export against its source, block by block",
        description=__doc__,
        example=("dvidetl verify --uuid demo                     # the demo export in ./dvidetl-out",
                 "dvidetl verify --uuid UUID --flight grpc://server:8815 --sink parquet:///data/export",
                 "dvidetl verify --uuid UUID --flight grpc://server:8815 --sink vastdb://vip:80/b/s "
                 "--sink parquet:///data/export   # each of them",
                 "dvidetl verify --uuid demo --in-process --json | jq .ok"))
    add_flight_arguments(p)
    add_sink_arguments(p, "the export to check",
                       endpoints_help="vastdb:// sink: more CNode endpoints to read through")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run to check (default: the latest)")
    p.add_argument("--scales", default=None, help="only these scales (default: all the run exported)")
    p.add_argument("--in-process", action="store_true",
                   help="check every partition in this process instead of on a Dask cluster")
    p.add_argument("--repair", action="store_true",
                   help="re-export the partitions found wrong, remove rows outside every partition, "
                        "then verify again (exit 0 only when the export is then exact)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_json_argument(p)
    add_cluster_arguments(p)
    return p


def report_json(report, rc: int, sink_url: str) -> dict:
    """The ``verify --json`` document (keys: docs/cli.md)."""
    return {
        "command": "verify", "run_id": report.run_id, "ok": report.ok, "exit_code": rc,
        "sink": sink_url,
        "blocks": {"source": report.blocks_source, "checked": report.blocks_checked,
                   "missing": report.missing, "extra": report.extra,
                   "duplicated": report.duplicated, "different": report.mismatched,
                   "in_export_errors": report.export_errors},
        "label_index": {"rows": report.index_rows, "differences": report.index_diffs},
        "mapping": {"rows": report.mapping_rows, "differences": report.mapping_diffs},
        "partitions_unfinished": report.partitions_unfinished,
        # source vs itself: label ranges where the source's index disagrees with its own
        # blocks and mapping while the export equals both (not a difference; docs/runs.md)
        "source_inconsistent": report.source_inconsistent,
        # what the source found wrong in its input, stored with the run (source_anomalies)
        "anomalies": {"rows": report.anomalies, "kinds": report.anomaly_kinds,
                      "lost": report.anomalies_lost, "differences": report.anomaly_diffs},
        "counters": report.counters(),
        "repaired": report.repaired,
        "problems": list(report.problems), "seconds": report.seconds,
    }


class _VerifyProgress:
    """The ``verify`` progress line: partitions and blocks checked of the run's, recent
    rate and ETA (``progress.Progress``, the same line ``run`` shows)."""

    def __init__(self):
        from dvidetl.export.progress import Progress

        self.line = Progress(label="verify ")
        self._started = False

    def __call__(self, report, done: int, parts) -> None:
        from dvidetl.export.progress import Counts

        if not self._started:
            self.line.start(Counts.of_plan(parts))
            self._started = True
        d = Counts(blocks=report.blocks_checked + report.export_errors, index_rows=report.index_rows,
                   mapping_rows=report.mapping_rows, errors=report.export_errors, parts=done)
        if done == len(parts):
            self.line.finish(d)
        else:
            self.line.update(d, force=done == 0)


def main(args: argparse.Namespace) -> int:
    from dvidetl.cluster import ClusterOptions
    from dvidetl.commands._options import (
        emit_json,
        flight_options,
        human,
        parse_scales,
        set_interrupt_hint,
        sink_urls,
    )
    from dvidetl.export.endpoint import open_flight
    from dvidetl.read.verify import verify
    from dvidetl.redact import redact

    scales = parse_scales(args.scales)
    cluster = ClusterOptions.from_args(args)
    urls = sink_urls(args)
    several = len(urls) > 1
    set_interrupt_hint("nothing was changed; run verify again" if not args.repair else None)
    docs, rcs = [], []
    with open_flight(**flight_options(args)) as ep:
        # one pass over the source for every sink (read once per partition)
        got = verify(ep, urls, run_id=args.run, scales=scales,
                         cluster=None if args.in_process and not args.repair else cluster,
                         repair=args.repair, progress=None if args.quiet else _VerifyProgress(),
                         say=lambda line: print(f"dvidetl verify --repair: {line}", file=sys.stderr))
    reports = got if isinstance(got, list) else [got]  # a list of URLs: one report per sink
    for url, report in zip(urls, reports, strict=True):
        if several:
            print(f"sink {redact(url)}:", file=human(args))
        if report.before_repair:
            print(report.before_repair, file=human(args))
        print(report.text(), file=human(args))
        rc = 0 if report.ok else 1
        if not report.ok:
            print(f"dvidetl verify: export {redact(url)} differs from the source (see above)",
                  file=sys.stderr)
        print(f"verified {redact(url)} in {report.seconds:.1f} s" if several else
              f"verified in {report.seconds:.1f} s", file=sys.stderr)
        docs.append(report_json(report, rc, url))
        rcs.append(rc)
    rc = max(rcs)
    if several:
        bad = [redact(u) for u, r in zip(urls, rcs, strict=True) if r]
        print(f"dvidetl verify: {len(urls) - len(bad)} of {len(urls)} sinks exact"
              + (f"; differing: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    if args.json:
        doc = dict(docs[0]) if not several else {"command": "verify", "ok": rc == 0, "exit_code": rc}
        doc["sinks"] = [{k: v for k, v in d.items() if k != "command"} for d in docs]
        emit_json(doc)
    return rc
