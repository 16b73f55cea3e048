"""What every sub-command shares on the command line: one-line usage errors, the size and
count option types, ``-v`` / ``--log-file`` accepted after the sub-command too, examples in
``--help``, and the ``--json`` convention.

The ``--json`` convention (``plan``, ``run``, ``verify``, ``status``): exactly one JSON
document on stdout (:func:`emit_json`, credentials redacted, keys documented in
``docs/cli.md``), every human line on stderr (:func:`human`), so ``dvidetl run --json ... |
jq .run_id`` works while the progress line stays visible. The exit code does not change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from dvidetl.errors import UserError
from dvidetl.redact import redact_obj
from dvidetl.units import MAX_VALUE, parse_count, parse_size

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (NumPy/Arrow) loads when it runs.


class UsageError(UserError):
    """A command line argparse refused (unknown option, missing value): one line, exit 2."""

    def __init__(self, prog: str, message: str):
        self.prog, self.message = prog, message
        super().__init__(f"{message} (see {prog} --help)")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) raised as a ``UserError``, so the CLI
    reports it like every other bad input: ``dvidetl run: error: ...``, exit 2."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def size_arg(what: str, *, default_unit: str | None = None, lo: int = 0, hi: int = MAX_VALUE):
    """An argparse ``type`` for a byte size (``dvidetl.units.parse_size``); its
    ``UserError`` passes through argparse to the CLI's one-line report."""
    def conv(text: str) -> int:
        return parse_size(text, what, default_unit=default_unit, lo=lo, hi=hi)

    conv.__name__ = "size"
    return conv


def count_arg(what: str, *, lo: int = 1, hi: int = MAX_VALUE):
    """An argparse ``type`` for a count (``dvidetl.units.parse_count``): ``4096``, ``2M``."""
    def conv(text: str) -> int:
        return parse_count(text, what, lo=lo, hi=hi)

    conv.__name__ = "count"
    return conv


def examples(*lines: str) -> str:
    """The ``--help`` epilog of a sub-command: its examples, one command per line."""
    return "examples:\n" + "\n".join(f"  {ln}" for ln in lines)


def command_parser(sub, name: str, *, help: str, description: str | None = None,
                   example: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A sub-command's parser with its examples in ``--help`` (text kept as written)."""
    return sub.add_parser(name, help=help, description=description or help,
                          epilog=examples(*example) if example else None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_arguments(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``-v`` and ``--log-file``, on the top-level parser and on every sub-command, so they
    work before or after the sub-command (``dvidetl run -v`` == ``dvidetl -v run``). A
    sub-command's copies write to their own dests (argparse would otherwise let the
    sub-command's default overwrite what was given before it); :func:`verbosity` adds them."""
    suffix = "" if top else "_sub"
    p.add_argument("-v", "--verbose", action="count", dest="verbose" + suffix,
                   default=0 if top else argparse.SUPPRESS,
                   help="more logging (-vv: debug)")
    p.add_argument("--log-file", metavar="PATH", dest="log_file" + suffix,
                   default=None if top else argparse.SUPPRESS,
                   help="also write the log (INFO and up, DEBUG with -vv; credentials redacted) to PATH")


def verbosity(args: argparse.Namespace) -> int:
    return int(getattr(args, "verbose", 0) or 0) + int(getattr(args, "verbose_sub", 0) or 0)


def log_file(args: argparse.Namespace) -> str | None:
    return getattr(args, "log_file_sub", None) or getattr(args, "log_file", None)


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (keys: docs/cli.md); human text goes to stderr")


def human(args: argparse.Namespace) -> TextIO:
    """Where a command's human-readable report goes: stdout, or stderr under ``--json``."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def emit_json(doc: dict[str, Any]) -> None:
    """The command's one JSON document on stdout (credentials redacted)."""

    sys.stdout.write(json.dumps(redact_obj(doc), indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


_hint: list[str] = []


def set_interrupt_hint(text: str | None) -> None:
    """What Ctrl-C should tell the user (e.g. ``resume with --resume RUN_ID``); None clears."""
    _hint[:] = [text] if text else []


def interrupt_hint() -> str | None:
    return _hint[0] if _hint else None


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """For a server command (``serve``, ``view``): inside the block SIGINT and SIGTERM set
    the yielded event instead of interrupting, so the command stops its server cleanly and
    exits 0 — Ctrl-C is how a server is stopped. Entered before the command prints what to
    connect to, so a signal sent as soon as that is read is already handled."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    prev = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in prev.items():
            signal.signal(s, h)



def parse_scales(text: str | None) -> list[int] | None:
    if text is None or text == "" or text == "all":
        return None
    try:
        return sorted({int(s) for s in text.split(",") if s.strip() != ""})
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated scale numbers, e.g. 0,1") from None


def add_flight_arguments(parser) -> None:
    """--uuid / --instance / --flight / --token-file, shared by run, plan, verify, inspect."""
    parser.add_argument("--uuid", required=True, help="version UUID to export (embedded default: synthetic volume name, e.g. demo)")
    parser.add_argument("--instance", default=None, help="labelmap instance (default: the server's)")
    parser.add_argument(
        "--flight", default=None, metavar="grpc://HOST:PORT",
        help="Flight server; without it an in-process reference server over synthetic://UUID is started",
    )
    parser.add_argument("--token-file", default=None, help="file holding the server's bearer token")
    parser.add_argument(
        "--source", default=None, metavar="URL",
        help="what the embedded server serves (default synthetic://UUID); not used with --flight",
    )
    parser.add_argument(
        "--serve-host", default="127.0.0.1", metavar="ADDR",
        help="address the embedded server binds (default 127.0.0.1); 0.0.0.0 lets workers on "
             "other nodes reach it (advertised under this host's name); not used with --flight",
    )


def add_sink_arguments(parser, what: str, *, endpoints_help: str) -> None:
    """``--sink URL`` (repeatable: several sinks written, checked or listed in one command)
    and ``--vast-endpoints``, shared by run, verify and status."""
    from dvidetl.sinks import DEFAULT_SINK

    parser.add_argument("--sink", action="append", default=None, metavar="URL",
                        help=f"{what} (default {DEFAULT_SINK}); repeat it for several sinks, e.g. "
                             "--sink vastdb://... --sink parquet:///data/export")
    parser.add_argument("--vast-endpoints", default=None, metavar="H:P,H:P", help=endpoints_help)


def sink_urls(args: argparse.Namespace) -> list[str]:
    """The ``--sink`` URLs in order (the default sink when none is given), with
    ``--vast-endpoints`` added to each vastdb:// one (refused when there is none); one given
    twice is a usage error. ``args.sink`` is set to the first (what one-sink code reads)."""
    from dvidetl.sinks import DEFAULT_SINK

    raw = getattr(args, "sink", None)
    urls = list(raw) if isinstance(raw, list) else [raw or DEFAULT_SINK]
    for u in urls:
        if urls.count(u) > 1:
            raise UserError(f"--sink {u} is given twice")
    eps = getattr(args, "vast_endpoints", None)
    if eps:
        from dvidetl.sinks._vastdb_support import with_endpoints

        if not any(u.startswith("vastdb://") for u in urls):
            raise UserError("--vast-endpoints only applies to a vastdb:// sink")
        urls = [with_endpoints(u, eps) if u.startswith("vastdb://") else u for u in urls]
    args.sinks, args.sink = urls, urls[0]
    return urls


def flight_options(args: argparse.Namespace) -> dict[str, Any]:
    """``open_flight``'s keywords from the options ``add_flight_arguments`` adds."""
    return {"uuid": args.uuid, "flight": getattr(args, "flight", None),
            "source": getattr(args, "source", None), "instance": getattr(args, "instance", None),
            "token_file": getattr(args, "token_file", None),
            "serve_host": getattr(args, "serve_host", None) or "127.0.0.1"}


def run_options(args: argparse.Namespace):
    """The ``RunOptions`` of a command's flags (``run`` has them all, ``plan`` the planning
    ones); validated as they are made, before any server is reached."""
    from dvidetl.export.options import RunOptions

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    kw: dict[str, Any] = {"scales": parse_scales(get("scales")), "partition_blocks": get("partition_blocks"),
          "index_partition_rows": get("index_partition_rows"),
          "mapping_partition_rows": get("mapping_partition_rows"), "plan_timeout": get("plan_timeout"),
          "indices": not get("no_indices", False), "mapping": not get("no_mapping", False),
          "max_errors": get("max_errors"), "overwrite": bool(get("overwrite", False)),
          "allow_unlocked": bool(get("allow_unlocked", False))}
    for name in ("cell_limit", "zstd_level", "retries"):
        if get(name) is not None:
            kw[name] = get(name)
    return RunOptions(**kw)

__all__ = ["Parser", "UsageError", "size_arg", "count_arg", "examples", "command_parser",
           "add_common_arguments", "verbosity", "log_file", "add_json_argument", "human",
           "emit_json", "set_interrupt_hint", "interrupt_hint", "stop_signals", "parse_scales",
           "add_flight_arguments", "add_sink_arguments", "sink_urls", "flight_options", "run_options"]
