"""`python -m dvidetl serve --source URL`: the reference Arrow Flight server.

Serves one source (synthetic://, shards://, dvid+http://) over the dvidetl Flight contract
(docs/flight-protocol.md) until SIGINT/SIGTERM. Binds 127.0.0.1 unless --host says
otherwise; the bearer token is read from --token-file (never from argv, never logged).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from dvidetl.errors import UserError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a labelmap source over Arrow Flight",
        description="Serve a labelmap source (synthetic://, shards://, dvid+http://) over Arrow Flight.",
    )
    p.add_argument(
        "--source", required=True, metavar="URL", help="source URL, e.g. synthetic://demo"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8815, help="port (default 8815; 0 = any free port)")
    p.add_argument(
        "--token-file", metavar="F", help="file holding the bearer token clients must send"
    )
    p.add_argument("--tls-cert", metavar="F", help="TLS certificate (PEM); needs --tls-key")
    p.add_argument("--tls-key", metavar="F", help="TLS private key (PEM); needs --tls-cert")
    p.add_argument(
        "--prefetch",
        type=int,
        default=0,
        metavar="N",
        help="batches prepared ahead of the network per stream (helps I/O-bound sources; default 0)",
    )
    p.set_defaults(func=main)
    return p


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def main(args: argparse.Namespace) -> int:
    # gRPC's C core logs bind failures itself (several lines); we report them in one line
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from dvidetl.flight.client import load_token
    from dvidetl.flight.server import start_server
    from dvidetl.sources import open_source

    if not (0 <= args.port <= 65535):
        raise UserError(f"--port {args.port} is not a TCP port (0..65535)")
    if not (0 <= args.prefetch <= 64):
        raise UserError(f"--prefetch {args.prefetch}: use 0..64")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    token = load_token(args.token_file)  # else env DVIDETL_FLIGHT_TOKEN
    certs = None
    if args.tls_cert:
        certs = [(_read(args.tls_cert, "TLS certificate"), _read(args.tls_key, "TLS key"))]

    try:
        source = open_source(args.source)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"cannot open source {args.source!r}: {type(exc).__name__}: {exc}"
        ) from None

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    try:
        try:
            running = start_server(
                source,
                host=args.host,
                port=args.port,
                token=token,
                tls_certificates=certs,
                prefetch=args.prefetch,
            )
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"cannot serve on {args.host}:{args.port} (port in use or address not local?): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        prev = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            info = running.server.volume_info
            print(running.location, flush=True)
            print(
                f"serving {info.instance} at uuid {info.uuid} ({len(info.scales)} scales, codec {info.codec}); "
                f"auth: {'bearer token' if token else 'none'}; Ctrl-C to stop",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        finally:
            for s, h in prev.items():
                signal.signal(s, h)
            running.stop()
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return 0
