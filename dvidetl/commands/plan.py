"""`python -m dvidetl plan`: the partitions a run would use, and totals — reads no blocks."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.pipeline import DEFAULT_PARTITION_BLOCKS, add_flight_arguments

    p = sub.add_parser("plan", help="print the partitions and totals of an export (no blocks read)")
    add_flight_arguments(p)
    p.add_argument("--scales", default=None, help="comma-separated scales (default: all)")
    p.add_argument("--partition-blocks", type=int, default=None,
                   help=f"blocks per partition (default: {DEFAULT_PARTITION_BLOCKS}, less for small volumes)")
    p.add_argument("--summary", action="store_true", help="totals only, not every partition")
    return p


def print_plan(parts, out: TextIO, *, every: bool = True) -> None:
    """One line per partition (kind, scale, Morton/label range, estimated blocks), then
    per-scale totals."""
    if every:
        print(f"{'#':>6} {'kind':8} {'scale':>5} {'lo':>20} {'hi':>20} {'blocks':>10}", file=out)
        for i, p in enumerate(parts):
            print(f"{i:>6} {p.kind:8} {p.scale:>5} {p.lo:>20} {p.hi:>20} {p.blocks:>10,}", file=out)
    per: dict = {}
    for p in parts:
        k = (p.kind, p.scale if p.kind == "blocks" else "-")
        n, b, mx = per.get(k, (0, 0, 0))
        per[k] = (n + 1, b + p.blocks, max(mx, p.blocks))
    for (kind, scale), (n, b, mx) in per.items():
        extra = f", ~{b:,} blocks, largest {mx:,}" if kind == "blocks" else ""
        print(f"total {kind} scale {scale}: {n:,} partitions{extra}", file=out)
    print(f"total: {len(parts):,} partitions, ~{sum(p.blocks for p in parts):,} blocks", file=out)


def main(args: argparse.Namespace) -> int:
    from dvidetl.commands.run import parse_scales
    from dvidetl.errors import UserError
    from dvidetl.pipeline import make_plan, open_flight

    if args.partition_blocks is not None and args.partition_blocks < 1:
        raise UserError(f"--partition-blocks must be at least 1 (got {args.partition_blocks})")
    scales = parse_scales(args.scales)
    ep = open_flight(args)
    try:
        have = [s.scale for s in ep.info.scales]
        if scales is not None and any(s not in have for s in scales):
            raise UserError(f"--scales {args.scales}: the volume has scales {have}")
        t0 = time.perf_counter()
        parts = make_plan(ep.info, ep.client.count, scales, args.partition_blocks)
        print_plan(parts, sys.stdout, every=not args.summary)
        print(f"planned in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        return 0
    finally:
        ep.close()
