"""`python -m dvidetl plan`: the partitions a run would use, and totals — reads no blocks.

Planning asks the server for counts (``count`` per scale, ``count_keys`` for the label
index and the mapping). Most answers take milliseconds, but the first ``count_keys`` of the
label index may make the source read every label index (a generated volume builds them),
which grows with the volume: its deadline grows with the blocks counted
(``--plan-timeout`` overrides), and a status line says what is being counted while it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from dvidetl.commands._options import (
    add_flight_arguments,
    add_json_argument,
    command_parser,
    count_arg,
    emit_json,
    flight_options,
    human,
    run_options,
)

if TYPE_CHECKING:
    from dvidetl.export.endpoint import FlightEndpoint

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (the plugin registry's entry points, NumPy/Arrow) loads when it runs.

#: a status line while planning, at most this often (the first after this long)
STATUS_EVERY_S = 10.0


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Partition sizes and the planning deadline, shared by ``plan`` and ``run``."""
    from dvidetl.export.kinds import KINDS
    from dvidetl.export.planning import DEFAULT_PARTITION_BLOCKS, PLAN_S_PER_BLOCK

    p.add_argument("--partition-blocks", type=count_arg("--partition-blocks", hi=2**40), default=None,
                   metavar="N",
                   help=f"blocks per partition (default: {DEFAULT_PARTITION_BLOCKS}, less for small volumes)")
    p.add_argument("--index-partition-rows", type=count_arg("--index-partition-rows", hi=2**40),
                   default=None, metavar="ROWS",
                   help=f"label_index rows per indices partition (default: {KINDS['indices'].default_rows:,}, "
                        "less for small volumes; 2M works too)")
    p.add_argument("--mapping-partition-rows", type=count_arg("--mapping-partition-rows", hi=2**40),
                   default=None, metavar="ROWS",
                   help=f"supervoxel pairs per mapping partition (default: {KINDS['mapping'].default_rows:,}, "
                        "less for small volumes)")
    p.add_argument("--plan-timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline of each planning call to the server (default: 60 s plus "
                        f"{PLAN_S_PER_BLOCK * 1000:g} ms per block counted, so it grows with the volume)")


class StatusLine:
    """``planning: <what> (<elapsed>)`` on stderr while planning lasts: after
    ``STATUS_EVERY_S`` and then when it changes or every ``STATUS_EVERY_S``."""

    def __init__(self, planning, stream: TextIO | None = None, prefix: str = "planning"):
        self.p, self.stream, self.prefix = planning, stream or sys.stderr, prefix
        self._last = time.monotonic()
        self._said = ""

    def __call__(self) -> None:
        now = time.monotonic()
        el = now - self.p.t0
        if el < STATUS_EVERY_S:
            return
        if self.p.doing == self._said and now - self._last < STATUS_EVERY_S:
            return
        self._last, self._said = now, self.p.doing
        print(f"{self.prefix}: {self.p.doing} ({el:.0f} s)", file=self.stream, flush=True)


def plan_summary(parts, requests=None) -> list[dict[str, Any]]:
    """Per kind and scale: partitions, planned blocks / rows, largest and smallest partition,
    and with ``requests`` (aligned with ``parts``) the source's requests to read them."""
    per: dict = {}
    for i, p in enumerate(parts):
        k = (p.kind, p.scale if p.spec.scaled else None)
        size = p.size
        g = per.setdefault(k, {"kind": p.kind, "scale": k[1], "partitions": 0, "blocks": 0, "rows": 0,
                               "largest": 0, "smallest": None})
        g["partitions"] += 1
        g["blocks"] += p.blocks
        g["rows"] += getattr(p, "rows", 0)
        g["largest"] = max(g["largest"], size)
        g["smallest"] = size if g["smallest"] is None else min(g["smallest"], size)
        if requests is not None:
            g["requests"] = g.get("requests", 0) + int(requests[i])
    return list(per.values())


def index_note(info, parts=None, *, skipped: bool = False) -> str | None:
    """Why a plan or export has no label_index, in words (None when it has one)."""
    if not info.has_indices:
        return ("no label_index: the source has no label indices (a shards:// export holds "
                "blocks and mapping only)")
    if skipped:
        return "no label_index: skipped (--no-indices)"
    if parts is not None and not any(p.kind == "indices" for p in parts):
        if any(p.kind == "blocks" and p.scale == 0 for p in parts):
            return "no label_index: skipped (--no-indices)"
        return "no label_index: scale 0 is not exported (--scales)"
    return None


def print_plan(parts, out: TextIO, *, every: bool = False, note: str | None = None,
               requests=None) -> None:
    """A summary per kind and scale (partitions, planned blocks / rows, largest and smallest
    partition), then the totals; with ``every`` first one line per partition. A male-CNS plan
    has ~10^5..10^6 partitions: the list is opt-in (``--partitions``), the summary is short.
    ``note``: why the plan has no label_index (see :func:`index_note`). ``requests`` (aligned
    with ``parts``; None when the source cannot say): the requests the source will send its
    store (a live DVID) to read each partition, per row and in total — what a run will ask
    of the store before it starts."""
    req = None if requests is None else [int(r) for r in requests]
    col = (lambda v, w: f" {v:>{w},}") if req is not None else (lambda v, w: "")
    if every:
        print(f"{'#':>7} {'kind':8} {'scale':>5} {'lo':>20} {'hi':>20} {'blocks':>10} {'rows':>12}"
              + (f" {'requests':>9}" if req is not None else ""), file=out)
        for i, p in enumerate(parts):
            print(f"{i:>7} {p.kind:8} {p.scale:>5} {p.lo:>20} {p.hi:>20} {p.blocks:>10,} "
                  f"{getattr(p, 'rows', 0):>12,}" + col(req[i] if req else 0, 9), file=out)
        print(file=out)
    print(f"{'kind':8} {'scale':>5} {'partitions':>11} {'blocks':>14} {'rows':>16} "
          f"{'largest':>12} {'smallest':>12}" + (f" {'requests':>10}" if req is not None else ""),
          file=out)
    for g in plan_summary(parts, req):
        kind, scale, b, r = g["kind"], "-" if g["scale"] is None else g["scale"], g["blocks"], g["rows"]
        print(f"{kind:8} {scale!s:>5} {g['partitions']:>11,} {(f'~{b:,}' if kind == 'blocks' else '-'):>14} "
              f"{(f'~{r:,}' if r else '-'):>16} {g['largest']:>12,} {g['smallest'] or 0:>12,}"
              + col(g.get("requests", 0), 10), file=out)
    if note:
        print(note, file=out)
    print(f"total: {len(parts):,} partitions, ~{sum(p.blocks for p in parts):,} blocks"
          + (f", {sum(req):,} requests to the source" if req is not None else "")
          + ("" if every else " (--partitions lists them)"), file=out)


def plan_json(parts, *, every: bool = False, note: str | None = None,
              requests=None) -> dict[str, Any]:
    """The plan as the ``--json`` document's ``plan`` object (docs/cli.md); ``requests``:
    the source's requests per partition (None: it cannot say)."""
    doc: dict[str, Any] = {
        "partitions": len(parts),
        "blocks": sum(p.blocks for p in parts),
        "index_rows": sum(p.rows for p in parts if p.spec.counter == "index_rows"),
        "mapping_rows": sum(p.rows for p in parts if p.spec.counter == "mapping_rows"),
        "requests": None if requests is None else int(sum(int(r) for r in requests)),
        "label_index": note is None,
        "label_index_note": note,
        "groups": plan_summary(parts, requests),
    }
    if every:
        doc["list"] = [p.to_dict() | {"rows": p.rows} for p in parts]
    return doc


def add_parser(sub) -> argparse.ArgumentParser:
    p = command_parser(
        sub, "plan", help="print the partitions and totals of an export (no blocks read)",
        description=__doc__,
        example=("dvidetl plan --uuid demo                      # the embedded demo volume",
                 "dvidetl plan --uuid UUID --flight grpc://server:8815 --partitions",
                 "dvidetl plan --uuid demo --json | jq .plan.partitions"))
    add_flight_arguments(p)
    p.add_argument("--scales", default=None, help="comma-separated scales (default: all)")
    add_plan_arguments(p)
    p.add_argument("--partitions", action="store_true",
                   help="also list every partition (a full-size volume has ~10^5 of them)")
    add_json_argument(p)
    p.add_argument("--summary", action="store_true", help=argparse.SUPPRESS)  # the default now
    return p


def source_json(ep: FlightEndpoint) -> dict[str, Any]:
    """The ``source`` object of every ``--json`` document (docs/cli.md)."""
    return {"instance": ep.instance, "uuid": ep.info.uuid,
            "requested_uuid": ep.info.requested_uuid, "location": ep.location,
            "locked": ep.info.locked, "has_indices": ep.info.has_indices,
            "has_mapping": ep.info.has_mapping}


def main(args: argparse.Namespace) -> int:
    from dvidetl.export.api import asked_as
    from dvidetl.export.endpoint import open_flight
    from dvidetl.export.planning import Planning, check_scales

    opts = run_options(args)
    ep = open_flight(**flight_options(args))
    try:
        check_scales(opts, ep.info)
        locked = {True: "locked", False: "NOT locked (run refuses it without --allow-unlocked)",
                  None: "not a versioned node"}[ep.info.locked]
        print(f"source: {ep.instance}@{ep.info.uuid}{asked_as(ep.info, args.uuid)}, {locked}",
              file=sys.stderr)
        planning = Planning(ep, opts).start()
        parts = planning.wait(StatusLine(planning))
        note = index_note(ep.info, parts)
        requests = ep.client.count_requests(parts)
        print_plan(parts, human(args), every=args.partitions, note=note, requests=requests)
        print(f"planned in {planning.seconds:.2f} s", file=sys.stderr)
        if args.json:
            emit_json({"command": "plan", "source": source_json(ep),
                       "plan": plan_json(parts, every=args.partitions, note=note, requests=requests),
                       "planning_s": planning.seconds})
        return 0
    finally:
        ep.close()
