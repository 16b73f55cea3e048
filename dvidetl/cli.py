"""The `python -m dvidetl` command line.

Each sub-command lives in its own module under `dvidetl.commands` exposing
`add_parser(subparsers)` and `main(args) -> int`, so commands are added without touching
a shared file and heavy imports (dask, pyarrow.flight) happen only for the command run.

What every command gets from here: one-line errors (exit 2) with credentials redacted, a
log that is redacted on every handler, ``-v`` / ``--log-file`` before or after the
sub-command, ``--version``, and a Ctrl-C that always ends the process within seconds
(:func:`_interrupts`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from dvidetl.commands._options import (
    Parser,
    UsageError,
    add_common_arguments,
    interrupt_hint,
    log_file,
    verbosity,
)
from dvidetl.errors import UserError
from dvidetl.redact import install_log_redaction, redact

#: command name -> module; the module is imported only to build its parser or to run it.
COMMANDS: dict[str, str] = {
    "run": "dvidetl.commands.run",
    "serve": "dvidetl.commands.serve",
    "plan": "dvidetl.commands.plan",
    "verify": "dvidetl.commands.verify",
    "inspect": "dvidetl.commands.inspect",
    "status": "dvidetl.commands.status",
    "demo-codec": "dvidetl.commands.demo_codec",
    "view": "dvidetl.commands.view",
}

#: seconds a command gets to clean up after Ctrl-C before the process is ended anyway
INTERRUPT_GRACE_S = 10.0
_HANDLERS: list[logging.Handler] = []
_TIMERS: list[threading.Timer] = []


def build_parser() -> argparse.ArgumentParser:
    from dvidetl import __version__

    parser = Parser(
        prog="dvidetl",
        description="Export a DVID labelmap at one UUID into VastDB or Parquet, exactly once.",
        epilog="`dvidetl COMMAND --help` shows each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"dvidetl {__version__}")
    add_common_arguments(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for modname in COMMANDS.values():
        importlib.import_module(modname).add_parser(sub)
    for p in sub.choices.values():
        add_common_arguments(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """The terminal gets WARNING (INFO with -v, DEBUG with -vv); ``--log-file`` gets INFO
    (DEBUG with -vv) whatever the terminal shows. Every handler redacts."""
    v = verbosity(args)
    term = logging.WARNING - 10 * min(v, 2)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for old in _HANDLERS:  # an earlier main() in this process (tests call it in-process)
        root.removeHandler(old)
        old.close()
    _HANDLERS.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(term)
    h.setFormatter(fmt)
    root.addHandler(h)
    _HANDLERS.append(h)
    level = term
    path = log_file(args)
    if path:
        try:
            fh = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--log-file {path}: cannot write it ({exc.strerror or exc})") from None
        fh.setLevel(min(logging.INFO, term))
        fh.setFormatter(fmt)
        root.addHandler(fh)
        _HANDLERS.append(fh)
        level = min(level, fh.level)
    root.setLevel(level)
    install_log_redaction()


def _interrupted_line(command: str) -> str:
    hint = interrupt_hint()
    return f"dvidetl {command}: interrupted" + (f"; {hint}" if hint else "")


def _end_now(command: str) -> None:
    """The last resort: say so, end the Dask worker processes we started, exit 130."""
    try:
        sys.stderr.write(_interrupted_line(command) + " (cleanup cut short)\n")
        sys.stderr.flush()
    finally:
        import multiprocessing

        for child in multiprocessing.active_children():
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        os._exit(130)


def _interrupts(command: str) -> None:
    """Ctrl-C: the first raises KeyboardInterrupt in the main thread (the command cleans up:
    cluster closed, server stopped) and arms a timer that ends the process after
    ``INTERRUPT_GRACE_S`` whatever is still blocking (a gRPC call in a planning thread, a
    scheduler that does not answer); a second Ctrl-C ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    state = {"n": 0}

    def on_sigint(signum, frame):
        state["n"] += 1
        if state["n"] > 1:
            _end_now(command)
        t = threading.Timer(INTERRUPT_GRACE_S, _end_now, (command,))
        t.daemon = True
        t.start()
        _TIMERS.append(t)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    """The command line; ``argv=None``: this process's (the entry point), and then a Ctrl-C's
    timer stays armed past ``main`` to end a hung interpreter shutdown too. Called with an
    ``argv`` (in-process, tests) the timer is cancelled when ``main`` returns."""
    in_process = argv is not None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help(sys.stderr)
            return 2
        _setup_logging(args)
    except UserError as exc:
        prog = f"dvidetl {_command_of(argv) or ''}".strip()
        text = f"{exc.message} (see {prog} --help)" if isinstance(exc, UsageError) else str(exc)
        print(f"{prog}: error: {redact(text)}", file=sys.stderr)
        return 2
    prev = signal.getsignal(signal.SIGINT)
    _interrupts(args.command)
    mod = importlib.import_module(COMMANDS[args.command])
    try:
        return int(mod.main(args) or 0)
    except UserError as exc:
        print(f"dvidetl {args.command}: error: {redact(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a lost mount (-v: where)
        logging.getLogger("dvidetl").info("%s failed", args.command, exc_info=True)
        print(f"dvidetl {args.command}: error: {redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(_interrupted_line(args.command), file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, prev)
        if in_process:
            for t in _TIMERS:
                t.cancel()
            _TIMERS.clear()


if __name__ == "__main__":
    raise SystemExit(main())
