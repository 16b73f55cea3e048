"""`python -m dvidetl view precomputed:///DIR`: look at a neuroglancer precomputed volume.

Serves DIR and neuroglancer's client (the ``neuroglancer`` package, ``pip install
'dvidetl[view]'``) from one local HTTP server and prints the one link that opens the volume
(``dvidetl.read.view``). Binds 127.0.0.1 unless ``--host`` says otherwise (the server has no
authentication and serves every file under DIR). Runs until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from dvidetl.commands._options import command_parser, stop_signals
from dvidetl.errors import UserError

# Imports inside functions: a command module is imported to build the parser of every command, so
# what it runs (numba (dvidetl.codec), tornado, ssl, the plugin registry's entry points,
# NumPy/Arrow, the compression libraries) loads when it runs.


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = command_parser(
        subparsers, "view",
        help="look at a neuroglancer precomputed volume: serve it with neuroglancer, print the link",
        description="Serve a neuroglancer precomputed volume (Range requests, CORS) and neuroglancer's "
                    "client (pip install 'dvidetl[view]') from one HTTP server, and print the link "
                    "that opens the volume. Runs until Ctrl-C.",
        example=("dvidetl view precomputed:///data/mcns-precomputed       # 127.0.0.1, any free port",
                 "dvidetl view precomputed://./out --port 8080             # ssh -L 8080:127.0.0.1:8080 HOST",
                 "dvidetl view precomputed:///data/out --host 0.0.0.0 --port 8080   # open to the network"),
    )
    p.add_argument("volume", metavar="precomputed:///DIR", help="the volume's directory (holding its info)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 opens it to the network, unauthenticated)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed)")
    return p


def main(args: argparse.Namespace) -> int:
    from dvidetl.read.view import start_view, volume_dir

    if not (0 <= args.port <= 65535):
        raise UserError(f"--port {args.port} is not a TCP port (0..65535)")
    root = volume_dir(args.volume)
    view = start_view(root, host=args.host, port=args.port)
    try:
        with stop_signals() as stop:
            print(view.link, flush=True)
            scales = len(view.info["scales"])
            print(f"serving {root} ({scales} scale{'s' * (scales != 1)}) and neuroglancer at "
                  f"{view.server.url}; open the link above; Ctrl-C to stop", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        view.stop()
    return 0
