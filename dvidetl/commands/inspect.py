"""`python -m dvidetl inspect`: one block or one label of an export — where it is, what it holds."""

from __future__ import annotations

import argparse
import sys

from dvidetl.errors import UserError


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.sinks import DEFAULT_SINK

    p = sub.add_parser("inspect", help="show one exported block (--block X,Y,Z) or label (--label L)")
    p.add_argument("--sink", default=DEFAULT_SINK, help=f"the export (default {DEFAULT_SINK})")
    p.add_argument("--uuid", default=None, help="UUID (default: the only one in the sink)")
    p.add_argument("--instance", default=None, help="instance (default: the only one in the sink)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run (default: the latest)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--block", default=None, metavar="X,Y,Z", help="block coordinates (in blocks)")
    g.add_argument("--label", type=int, default=None, help="a body label (or supervoxel with --supervoxel)")
    p.add_argument("--scale", type=int, default=0, help="scale of --block (default 0)")
    p.add_argument("--supervoxel", action="store_true", help="--label is a supervoxel id")
    return p


def _xyz(text: str) -> tuple[int, int, int]:
    try:
        x, y, z = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--block {text!r}: expected X,Y,Z block coordinates, e.g. 10,11,12") from None
    return x, y, z


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from dvidetl import schema as S
    from dvidetl.read import block_rows, connect

    if not args.sink.startswith("parquet://"):
        raise UserError("inspect reads parquet:// exports (VastDB: query the tables directly)")
    con = connect(args.sink, uuid=args.uuid, instance=args.instance, run_id=args.run)
    out = sys.stdout
    if args.block is not None:
        x, y, z = _xyz(args.block)
        b, o = block_rows(con, args.scale, x, y, z)
        if b.num_rows == 0:
            print(f"block ({x}, {y}, {z}) scale {args.scale}: not in the export (empty or not exported)", file=out)
            err = con.execute("SELECT stage, reason FROM export_errors WHERE scale=? AND x=? AND y=? AND z=? LIMIT 1",
                              [args.scale, x, y, z]).fetchall()
            if err:
                print(f"  in export_errors: {err[0][0]}: {err[0][1]}", file=out)
            return 1
        r = S.reassemble(b, o).to_pylist()[0]
        svs, labels, vox = (np.asarray(r[c], np.uint64) for c in ("supervoxels", "labels", "sv_voxels"))
        print(f"block ({x}, {y}, {z}) scale {args.scale}: morton {r['morton']} (0x{r['morton']:x})", file=out)
        print(f"  raw DVID block {r['raw_size']:,} bytes, crc32 {r['crc32']:08x}; zstd body {r['body_size']:,} bytes "
              f"in {r['nparts']} cells{' (overflow rows: ' + str(o.num_rows) + ')' if r['overflow'] else ''}", file=out)
        print(f"  {len(svs)} label-table entries, {len(np.unique(svs))} supervoxels, {len(np.unique(labels))} bodies, "
              f"{int(vox.sum()):,} voxels", file=out)
        order = np.argsort(-vox.astype(np.int64), kind="stable")[:10]
        for i in order:
            print(f"    supervoxel {int(svs[i]):>20} body {int(labels[i]):>20} voxels {int(vox[i]):>9,}", file=out)
        return 0
    col = "supervoxel" if args.supervoxel else "label"
    rows = con.execute(
        f"SELECT label, supervoxel, count(*) AS blocks, sum(voxels) AS voxels, min(x), min(y), min(z), max(x), max(y), max(z) "
        f"FROM label_index WHERE {col} = ? GROUP BY label, supervoxel ORDER BY voxels DESC",
        [args.label],
    ).fetchall()
    what = "supervoxel" if args.supervoxel else "label"
    if not rows:
        body = con.execute("SELECT body FROM mapping WHERE supervoxel = ?", [args.label]).fetchall()
        print(f"{what} {args.label}: not in label_index" + (f" (supervoxel of body {body[0][0]})" if body else ""), file=out)
        return 1
    total_blocks = sum(r[2] for r in rows)
    total_vox = sum(int(r[3]) for r in rows)
    print(f"{what} {args.label}: {len(rows)} (label, supervoxel) pairs, {total_blocks:,} block entries, {total_vox:,} voxels (scale 0)", file=out)
    for r in rows[:20]:
        print(f"  label {r[0]} supervoxel {r[1]}: {r[2]:,} blocks, {int(r[3]):,} voxels, blocks ({r[4]},{r[5]},{r[6]})..({r[7]},{r[8]},{r[9]})", file=out)
    return 0
