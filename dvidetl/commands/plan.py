"""`python -m dvidetl plan`: the partitions a run would use, and totals — reads no blocks."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Partition sizes, shared by ``plan`` and ``run``."""
    from dvidetl.planning import DEFAULT_INDEX_ROWS, DEFAULT_MAPPING_ROWS, DEFAULT_PARTITION_BLOCKS

    p.add_argument("--partition-blocks", type=int, default=None,
                   help=f"blocks per partition (default: {DEFAULT_PARTITION_BLOCKS}, less for small volumes)")
    p.add_argument("--index-partition-rows", type=int, default=None, metavar="ROWS",
                   help=f"label_index rows per indices partition (default: {DEFAULT_INDEX_ROWS:,}, "
                        "less for small volumes)")
    p.add_argument("--mapping-partition-rows", type=int, default=None, metavar="ROWS",
                   help=f"supervoxel pairs per mapping partition (default: {DEFAULT_MAPPING_ROWS:,}, "
                        "less for small volumes)")


def check_plan_options(args: argparse.Namespace) -> None:
    """The partition sizes must be positive: checked before any server is reached."""
    from dvidetl.errors import UserError

    for opt in ("partition_blocks", "index_partition_rows", "mapping_partition_rows"):
        v = getattr(args, opt, None)
        if v is not None and v < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be at least 1 (got {v})")


def plan_from_args(args: argparse.Namespace, ep, scales, *, indices: bool = True, mapping: bool = True):
    """The partitions the options ask for (``check_plan_options`` first), counted through
    the endpoint's Flight client."""
    from dvidetl.planning import make_plan

    return make_plan(ep.info, ep.client.count, scales, args.partition_blocks,
                     indices=indices, mapping=mapping, count_keys=ep.client.count_keys,
                     index_rows=getattr(args, "index_partition_rows", None),
                     mapping_rows=getattr(args, "mapping_partition_rows", None))


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.endpoint import add_flight_arguments

    p = sub.add_parser("plan", help="print the partitions and totals of an export (no blocks read)")
    add_flight_arguments(p)
    p.add_argument("--scales", default=None, help="comma-separated scales (default: all)")
    add_plan_arguments(p)
    p.add_argument("--partitions", action="store_true",
                   help="also list every partition (a full-size volume has ~10^5 of them)")
    p.add_argument("--summary", action="store_true", help=argparse.SUPPRESS)  # the default now
    return p


def print_plan(parts, out: TextIO, *, every: bool = False) -> None:
    """A summary per kind and scale (partitions, planned blocks / rows, largest and smallest
    partition), then the totals; with ``every`` first one line per partition. A male-CNS plan
    has ~10^5..10^6 partitions: the list is opt-in (``--partitions``), the summary is short."""
    if every:
        print(f"{'#':>7} {'kind':8} {'scale':>5} {'lo':>20} {'hi':>20} {'blocks':>10} {'rows':>12}",
              file=out)
        for i, p in enumerate(parts):
            print(f"{i:>7} {p.kind:8} {p.scale:>5} {p.lo:>20} {p.hi:>20} {p.blocks:>10,} "
                  f"{getattr(p, 'rows', 0):>12,}", file=out)
        print(file=out)
    per: dict = {}
    for p in parts:
        k = (p.kind, p.scale if p.kind == "blocks" else "-")
        size = p.blocks if p.kind == "blocks" else getattr(p, "rows", 0)
        n, b, r, mx, mn = per.get(k, (0, 0, 0, 0, None))
        per[k] = (n + 1, b + p.blocks, r + getattr(p, "rows", 0), max(mx, size),
                  size if mn is None else min(mn, size))
    print(f"{'kind':8} {'scale':>5} {'partitions':>11} {'blocks':>14} {'rows':>16} "
          f"{'largest':>12} {'smallest':>12}", file=out)
    for (kind, scale), (n, b, r, mx, mn) in per.items():
        print(f"{kind:8} {scale!s:>5} {n:>11,} {(f'~{b:,}' if kind == 'blocks' else '-'):>14} "
              f"{(f'~{r:,}' if r else '-'):>16} {f'{mx:,}':>12} {f'{mn or 0:,}':>12}", file=out)
    print(f"total: {len(parts):,} partitions, ~{sum(p.blocks for p in parts):,} blocks"
          + ("" if every else " (--partitions lists them)"), file=out)


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands.run import parse_scales
    from dvidetl.endpoint import open_flight
    from dvidetl.errors import UserError

    check_plan_options(args)
    scales = parse_scales(args.scales)
    ep = open_flight(args)
    try:
        have = [s.scale for s in ep.info.scales]
        if scales is not None and any(s not in have for s in scales):
            raise UserError(f"--scales {args.scales}: the volume has scales {have}")
        locked = {True: "locked", False: "NOT locked (run refuses it without --allow-unlocked)",
                  None: "not a versioned node"}[ep.info.locked]
        print(f"source: {ep.instance}@{ep.info.uuid}, {locked}", file=sys.stderr)
        t0 = time.perf_counter()
        parts = plan_from_args(args, ep, scales)
        print_plan(parts, sys.stdout, every=args.partitions)
        print(f"planned in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        return 0
    finally:
        ep.close()
