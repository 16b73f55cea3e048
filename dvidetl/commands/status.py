"""`python -m dvidetl status`: every run of an export — state, progress, errors, verify outcome.

Reads only the sink (run records, the ledger): no source, no cluster. Works for a finished
run and for one still going (its partitions committed so far, the time of its last commit).
With ``--json`` one JSON document goes to stdout (keys in ``docs/runs.md``) and the text to
stderr. ``--sink`` repeated: each sink's runs (a run written to several sinks has a record
in each, with that sink's own figures).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from dvidetl.commands._options import add_json_argument, command_parser, emit_json, human, sink_urls
from dvidetl.redact import redact

if TYPE_CHECKING:
    from dvidetl.sinks.base import Sink

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (the plugin registry's entry points, NumPy/Arrow) loads when it runs.

#: the keys of each run in ``status --json`` (documented in docs/runs.md)
RUN_KEYS = ("run_id", "state", "created", "started", "ended", "source", "uuid_requested", "uuid_resolved",
            "staged", "superseded_by", "removed_at_finish", "partitions_planned", "partitions_done", "blocks_planned",
            "blocks_done", "index_rows", "mapping_rows", "errors", "failed_partitions", "last_commit",
            "verify", "result", "options", "sinks", "not_exported")


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.sinks import DEFAULT_SINK

    p = command_parser(
        sub, "status", help="every run of an export: state, partitions done, errors, verify outcome",
        description=__doc__,
        example=("dvidetl status                                 # the export in ./dvidetl-out",
                 "dvidetl status --sink parquet:///data/export --run RUN_ID",
                 "dvidetl status --sink vastdb://vip:80/bucket/schema --json | jq .current_run"))
    p.add_argument("--sink", action="append", default=None, metavar="URL",
                   help=f"the export (default {DEFAULT_SINK}); repeat it for several")
    p.add_argument("--uuid", default=None, help="UUID (default: the only one in the sink)")
    p.add_argument("--instance", default=None, help="instance (default: the only one in the sink)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="only this run")
    add_json_argument(p)
    return p


def run_status(sink: Sink, run_id: str) -> dict:
    """One run's status from its record and its ledger rows."""
    from dvidetl.export.driver import RunResult

    run = sink.load_run(run_id)
    # the partitions this sink stores (a volume sink in a run with a tabular one stores no
    # label_index / mapping partitions: the other sink does)
    mine = [p for p in run.partitions if sink.takes(p.kind)]
    led = sink.ledger(run_id)
    tot = RunResult(run_id)
    tot.add_ledger(led)
    rec = run.record
    state = rec.get("state")
    if state is None:  # stored before runs had records: what the ledger says
        state = "finished" if led.num_rows >= len(mine) else "unknown"
    last = None
    if led.num_rows:
        last = max(led.column("finished_at").to_pylist()).timestamp()
    result = rec.get("result") or {}
    return {
        "run_id": run.run_id, "state": state, "created": run.created, "started": rec.get("started"),
        "ended": rec.get("ended"), "source": rec.get("source"), "uuid_requested": rec.get("uuid_requested", run.uuid),
        "uuid_resolved": rec.get("uuid_resolved"), "staged": bool(rec.get("staged")),
        "superseded_by": rec.get("superseded_by"),
        # what the finish removed: stray rows outside the run's partitions, temporary files
        "removed_at_finish": rec.get("removed_at_finish"),
        "partitions_planned": len(mine), "partitions_done": led.num_rows,
        "blocks_planned": sum(p.blocks for p in mine), "blocks_done": tot.blocks,
        "index_rows": tot.index_rows, "mapping_rows": tot.mapping_rows, "errors": tot.errors,
        "failed_partitions": result.get("failed_partitions", []), "last_commit": last,
        "verify": rec.get("verify"), "result": result or None, "options": run.options.to_dict(),
        # every sink the run wrote (a run of several sinks; None: this sink only)
        "sinks": rec.get("sinks"),
        # kinds no sink of the run stores, with why (a precomputed-only run: the tables)
        "not_exported": rec.get("not_exported") or {},
    }


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def text(export: str, runs: list[dict]) -> str:
    from dvidetl.export.progress import removed_line

    lines = [f"export {export}: {len(runs)} run(s)"]
    for r in runs:
        v = r["verify"]
        ver = "not verified" if not v else \
            f"verified {_when(v['at'])}: {'exact' if v['exact'] else 'DIFFERENCES FOUND'}"
        lines.append(f"run {r['run_id']}: {r['state']}"
                     + (f" (replaced by {r['superseded_by']})" if r["superseded_by"] else "")
                     + (" (written apart until it finishes: --overwrite)" if r["staged"] and r["state"] == "running" else ""))
        lines.append(f"  source      {r['source'] or '-'} (uuid {r['uuid_requested']}"
                     + (f", resolved {r['uuid_resolved']}" if r["uuid_resolved"] not in (None, r["uuid_requested"]) else "")
                     + ")")
        lines.append(f"  time        started {_when(r['started'] or r['created'])}, ended {_when(r['ended'])}"
                     + (f", last commit {_when(r['last_commit'])}" if r["state"] == "running" else ""))
        lines.append(f"  partitions  {r['partitions_done']:,}/{r['partitions_planned']:,} done; blocks "
                     f"{r['blocks_done']:,}/{r['blocks_planned']:,}; "
                     + ("label_index, mapping not exported (a volume)" if r.get("not_exported") else
                        f"{r['index_rows']:,} label_index rows, {r['mapping_rows']:,} mapping pairs"))
        lines.append(f"  errors      {r['errors']:,} blocks in export_errors"
                     + (f"; {len(r['failed_partitions'])} partitions failed" if r["failed_partitions"] else ""))
        for f in r["failed_partitions"][:5]:
            lines.append(f"    FAILED {f['partition']}: {f['reason']}")
        removed = removed_line(r.get("removed_at_finish"))
        if removed:
            lines.append(f"  removed     {removed}")
        lines.append(f"  verify      {ver}")
        if r.get("sinks"):
            lines.append(f"  sinks       written together to {', '.join(r['sinks'])} (figures above: this sink's)")
    return "\n".join(lines)


def sink_status(url: str, uuid: str | None, instance: str | None, run_id: str | None) -> tuple[dict, str]:
    """One sink's ``status`` document and text."""
    from dvidetl.sinks import find_export, open_sink

    instance, uuid = find_export(url, uuid, instance)
    sink = open_sink(url, uuid=uuid, instance=instance)
    ids = [run_id] if run_id else sink.runs()
    runs = [run_status(sink, r) for r in ids]
    doc = {"command": "status", "sink": url, "instance": instance, "uuid": uuid,
           "current_run": sink.latest_run(), "runs": runs}
    return doc, text(f"{url} ({instance}@{uuid})", runs)


def main(args: argparse.Namespace) -> int:
    urls = sink_urls(args)
    docs = []
    for url in urls:
        doc, txt = sink_status(url, args.uuid, args.instance, args.run)
        print(redact(txt), file=human(args))
        docs.append(doc)
    if args.json:  # the --json convention of every command (commands/_options.py)
        out = dict(docs[0]) if len(docs) == 1 else {"command": "status"}
        out["sinks"] = [{k: v for k, v in d.items() if k != "command"} for d in docs]
        emit_json(out)
    return 0
