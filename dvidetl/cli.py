"""The `python -m dvidetl` command line.

Each sub-command lives in its own module under `dvidetl.commands` exposing
`add_parser(subparsers)` and `main(args) -> int`, so commands are added without touching
a shared file and heavy imports (dask, pyarrow.flight) happen only for the command run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dvidetl.errors import UserError

#: command name -> module; the module is imported only to build its parser or to run it.
COMMANDS: dict[str, str] = {
    "run": "dvidetl.commands.run",
    "serve": "dvidetl.commands.serve",
    "plan": "dvidetl.commands.plan",
    "verify": "dvidetl.commands.verify",
    "inspect": "dvidetl.commands.inspect",
    "status": "dvidetl.commands.status",
    "demo-codec": "dvidetl.commands.demo_codec",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvidetl",
        description="Export a DVID labelmap at one UUID into VastDB or Parquet, exactly once.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMANDS.values():
        importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command])
    try:
        return int(mod.main(args) or 0)
    except UserError as exc:
        print(f"dvidetl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dvidetl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
