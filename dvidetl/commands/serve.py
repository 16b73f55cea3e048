"""`python -m dvidetl serve --source URL`: the reference Arrow Flight server.

Serves one source (synthetic://, shards://, dvid+http://) over the dvidetl Flight contract
(docs/flight-protocol.md) until SIGINT/SIGTERM. Binds 127.0.0.1 unless --host says
otherwise; the bearer token is read from --token-file (never from argv, never logged).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dvidetl.commands._options import examples, stop_signals
from dvidetl.errors import UserError

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (Arrow Flight, ssl, the plugin registry's entry points, NumPy/Arrow) loads when it
# runs.

log = logging.getLogger(__name__)


#: every source URL and its query keys, for ``serve --help`` (tests/test_operator.py checks
#: that each key the sources accept is listed here)
SOURCE_URLS = """\
source URLs (--source) and their query keys:

  synthetic://NAME?key=value&...   a generated labelmap (uuid = NAME); no keys: the demo volume
    size=X,Y,Z        scale-0 volume in voxels, each 64..262144 (default 1024,1024,768)
    scales=N          number of scales (default: up to 4)
    seed=S            integer seed (another seed, another volume)
    instance=NAME     instance name served (default segmentation)
    mask=KIND         ellipsoid (default), sparse or full
    empty=F           fraction of tissue bricks forced empty
    solid=F           fraction of 2x2x2-block regions filled by one supervoxel
    dense=F           fraction of dense blocks (two-voxel supervoxels, ~2 MB DVID blocks)
    bigids=1          about half the ids >= 2**63
    lattice=N         supervoxel size in voxels (16..256, default 32)
    maxindex=N        most blocks label indices are built for (default 100,000)
    cache=MIB         MiB of generated blocks kept (default 256)

  shards:///DIR?key=value&...      DVID export-shards files (*.arrow + *.json); no label indices
    spec=PATH         the neuroglancer multiscale spec export-shards used (default: DIR's)
    uuid=UUID         the uuid to report (default *: any)
    instance=NAME     instance name served (default segmentation)

  dvid+http://HOST:PORT?uuid=UUID&instance=NAME&...   a live DVID (dvid+https:// for TLS)
    uuid=UUID         the version node to export
    instance=NAME     the labelmap instance (default segmentation)
    timeout=S         seconds per request (default 60)
    retries=N         retries per request (default 6); backoff=S first delay (default 0.2)
    parallel=N        /blocks requests in flight (default 4); inflight=N cap on all requests
    box_bits=N        block slots per /blocks request, as a power of 2 (default 12)
    box_shape=SHAPE   rows (default) or cube: how a Morton range is cut into requests
    throttle=true     ask DVID to throttle /blocks (its 503s are waited out)
    minpoint=X,Y,Z    override DVID's extents (scale-0 voxels, inclusive);
    maxpoint=X,Y,Z      blocks outside them are never read
    spec=PATH         the multiscale spec of a shards export, to plan the same grids
    labels=HOW        auto (default), existing or listlabels: how indexed labels are listed
    index_parallel=N  /indices-compressed requests in flight (default: parallel)
    index_batch=N     labels per /indices-compressed request (default 2,000)
    rows_per_label=N  planning estimate of label_index rows per label (default 64)
    token_file=PATH   file holding the DVID token (or $DVIDETL_DVID_TOKEN[_FILE]; never in the URL)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a labelmap source over Arrow Flight",
        description="Serve a labelmap source (synthetic://, shards://, dvid+http://) over Arrow Flight.",
        epilog=SOURCE_URLS + "\n" + examples(
            "dvidetl serve --source synthetic://demo --port 8815",
            "dvidetl serve --source 'dvid+http://dvid-host:8000?uuid=UUID&instance=segmentation' \\",
            "      --host 0.0.0.0 --port 8815 --token-file ~/.dvidetl-token",
            "dvidetl serve --source shards:///data/export-shards --port 0   # any free port"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def _check_tls(cert: str, key: str) -> None:
    """The pair must load as a PEM certificate and its key (gRPC would only fail to bind,
    which reads like a busy port)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        why = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise UserError(f"--tls-cert {cert} / --tls-key {key}: not a usable PEM certificate and "
                        f"private key pair ({why})") from None


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
        _check_tls(args.tls_cert, args.tls_key)

    try:
        source = open_source(args.source)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"cannot open source {args.source!r}: {type(exc).__name__}: {exc}"
        ) from None

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
        try:
            with stop_signals() as stop:
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
            running.stop()
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return 0
