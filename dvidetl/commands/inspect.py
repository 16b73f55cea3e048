"""`python -m dvidetl inspect`: one block or one label of an export — where it is, what it
holds — or the anomalies the source reported and the run stored (``--anomalies``)."""

from __future__ import annotations

import argparse
import sys

from dvidetl.commands._options import command_parser
from dvidetl.errors import UserError

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (the plugin registry's entry points, NumPy/Arrow) loads when it runs. Those in try/if/with blocks are optional or conditional.


def add_parser(sub) -> argparse.ArgumentParser:
    from dvidetl.sinks import DEFAULT_SINK

    p = command_parser(
        sub, "inspect", help="show one exported block (--block X,Y,Z) or label (--label L), "
        "or the source's anomalies (--anomalies)",
        example=("dvidetl inspect --block 8,8,6                  # a block of the demo export",
                 "dvidetl inspect --sink parquet:///data/export --label 1234567",
                 "dvidetl inspect --label 42 --supervoxel --run RUN_ID",
                 "dvidetl inspect --sink parquet:///data/export --anomalies"))
    p.add_argument("--sink", default=DEFAULT_SINK, help=f"the export (default {DEFAULT_SINK})")
    p.add_argument("--uuid", default=None, help="UUID (default: the only one in the sink)")
    p.add_argument("--instance", default=None, help="instance (default: the only one in the sink)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run (default: the latest)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--block", default=None, metavar="X,Y,Z", help="block coordinates (in blocks)")
    g.add_argument("--label", type=int, default=None, help="a body label (or supervoxel with --supervoxel)")
    g.add_argument("--anomalies", action="store_true",
                   help="what the source found wrong in its input (source_anomalies), per kind")
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
    """Reads through ``dvidetl.read.open_export``: the same pushed-down reads on every sink."""
    import numpy as np
    import pyarrow.compute as pc

    from dvidetl.read import open_export

    ex = open_export(args.sink, uuid=args.uuid, instance=args.instance, run_id=args.run)
    out = sys.stdout
    if args.anomalies:
        return _anomalies(ex, out)
    if args.block is not None:
        x, y, z = _xyz(args.block)
        b = ex._one(args.scale, x, y, z)
        if b.num_rows == 0:
            print(f"block ({x}, {y}, {z}) scale {args.scale}: not in the export (empty or not exported)", file=out)
            m = ex._morton(args.scale, x, y, z)
            err = ex.read("export_errors", scale=args.scale, morton_range=(m, m + 1),
                          columns=["stage", "reason"])
            if err.num_rows:
                print(f"  in export_errors: {err['stage'][0].as_py()}: {err['reason'][0].as_py()}", file=out)
            _block_anomalies(ex, args.scale, x, y, z, out)
            return 1
        r = b.to_pylist()[0]
        svs, labels, vox = (np.asarray(r[c], np.uint64) for c in ("supervoxels", "labels", "sv_voxels"))
        print(f"block ({x}, {y}, {z}) scale {args.scale}: morton {r['morton']} (0x{r['morton']:x})", file=out)
        print(f"  raw DVID block {r['raw_size']:,} bytes, crc32 {r['crc32']:08x}; zstd payload {r['payload_size']:,} bytes "
              f"in {r['nparts']} cells{' (with overflow rows)' if r['overflow'] else ''}", file=out)
        print(f"  {len(svs)} label-table entries, {len(np.unique(svs))} supervoxels, {len(np.unique(labels))} bodies, "
              f"{int(vox.sum()):,} voxels", file=out)
        order = np.argsort(-vox.astype(np.int64), kind="stable")[:10]
        for i in order:
            print(f"    supervoxel {int(svs[i]):>20} body {int(labels[i]):>20} voxels {int(vox[i]):>9,}", file=out)
        _block_anomalies(ex, args.scale, x, y, z, out)
        return 0
    col = "supervoxel" if args.supervoxel else "label"
    what = col
    if not any(p.kind == "indices" for p in ex.run.partitions):
        from dvidetl.commands.plan import index_note

        ne = ex.run.record.get("not_exported") or {}
        note = (f"no label_index ({ne['indices']})" if "indices" in ne
                else index_note(ex.volume, ex.run.partitions) or "no label_index")
        raise UserError(f"--label: run {ex.run_id} has {note}; look at blocks with --block X,Y,Z")
    t = ex.read("label_index", where={col: int(args.label)},
                columns=["label", "supervoxel", "x", "y", "z", "voxels"])
    if t.num_rows == 0:
        body = ex.read("mapping", where={"supervoxel": int(args.label)}, columns=["body"])
        print(f"{what} {args.label}: not in label_index"
              + (f" (supervoxel of body {body['body'][0].as_py()})" if body.num_rows else ""), file=out)
        return 1
    g = t.group_by(["label", "supervoxel"]).aggregate(
        [("voxels", "count"), ("voxels", "sum"), ("x", "min"), ("y", "min"), ("z", "min"),
         ("x", "max"), ("y", "max"), ("z", "max")])
    g = g.sort_by([("voxels_sum", "descending")])
    total_vox = int(pc.sum(t.column("voxels")).as_py())
    print(f"{what} {args.label}: {g.num_rows} (label, supervoxel) pairs, {t.num_rows:,} block entries, "
          f"{total_vox:,} voxels (scale 0)", file=out)
    for r in g.slice(0, 20).to_pylist():
        print(f"  label {r['label']} supervoxel {r['supervoxel']}: {r['voxels_count']:,} blocks, "
              f"{int(r['voxels_sum']):,} voxels, blocks ({r['x_min']},{r['y_min']},{r['z_min']}).."
              f"({r['x_max']},{r['y_max']},{r['z_max']})", file=out)
    return 0


#: anomalies listed one per line by ``--anomalies`` (the table holds them all)
ANOMALIES_LISTED = 20


def _anomaly_text(r: dict) -> str:
    where = r["file"] or "the directory"
    block = "" if r["x"] is None else f" block ({r['x']}, {r['y']}, {r['z']})"
    scale = "" if r["scale"] is None else f"scale {r['scale']} "
    return f"{r['kind']}{' [LOST BLOCKS]' if r['lost'] else ''}: {scale}{where}{block}: {r['detail']}"


def _anomalies(ex, out) -> int:
    """The stored anomalies: a line per kind, then the first rows (lost ones first)."""
    import pyarrow.compute as pc

    from dvidetl.sources.base import anomaly_counts, anomaly_summary

    t = ex.read("source_anomalies")
    if t.num_rows == 0:
        print("source anomalies: none stored with this run", file=out)
        return 0
    lost = int(pc.sum(pc.cast(t.column("lost"), "int64")).as_py() or 0)
    print(f"source anomalies: {anomaly_summary(anomaly_counts(t), lost)}", file=out)
    t = t.sort_by([("lost", "descending"), ("seq", "ascending")])
    for r in t.slice(0, ANOMALIES_LISTED).to_pylist():
        print(f"  {_anomaly_text(r)}", file=out)
    if t.num_rows > ANOMALIES_LISTED:
        print(f"  ... {t.num_rows - ANOMALIES_LISTED:,} more in source_anomalies", file=out)
    return 0


def _block_anomalies(ex, scale: int, x: int, y: int, z: int, out) -> None:
    """What the source reported about this block (copies it did not export, a dangling index
    row, a cut record, ...)."""
    t = ex.read("source_anomalies", scale=scale, where={"x": x, "y": y, "z": z})
    for r in t.to_pylist():
        print(f"  source anomaly: {_anomaly_text(r)}", file=out)
