"""The Flight endpoint a command talks to: the ``--flight`` server it names, or the
embedded reference server over ``--source`` (default ``synthetic://UUID``); the shared
command-line options and the token file."""

from __future__ import annotations

from dvidetl.export.tasks import Secret


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


def read_token(path: str | None) -> str | None:
    """The bearer token of ``--token-file`` (never from argv), else env
    ``DVIDETL_FLIGHT_TOKEN`` (as docs/flight-protocol.md promises); one reader for both
    (``flight.client.load_token``), whose errors name the file."""
    from dvidetl.errors import UserError
    from dvidetl.flight.client import load_token

    try:
        return load_token(path)
    except UserError as exc:
        raise UserError(f"--token-file: {exc}") from None


class FlightEndpoint:
    """A Flight location (+ token) and a driver-side client; the embedded server if any."""

    def __init__(self, location: str, token: str | None, uuid: str, instance: str | None,
                 server=None, source=None):
        from dvidetl.flight.client import FlightClient

        self.source = source
        self.location = location
        self.token = Secret(token)
        self.server = server
        self.uuid = uuid
        import logging

        self.client = FlightClient(location, token=token, uuid=uuid, instance=instance,
                                   retry_log_level=logging.INFO)
        self.info = self.client.info()
        self.instance = instance or self.info.instance

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
        if self.server is not None:
            self.server.stop()
        if self.source is not None:
            self.source.close()


def open_flight(args) -> FlightEndpoint:
    """The endpoint the options name: ``--flight`` or the embedded reference server over
    ``synthetic://<uuid>`` (or ``--source``), bound to ``--serve-host`` — loopback by default,
    which only workers on this node can reach; a wildcard bind is advertised under this
    host's fully qualified name so SLURM workers on other nodes can connect."""
    import socket

    from dvidetl.errors import UserError

    token = read_token(getattr(args, "token_file", None))
    server = source = None
    location = args.flight
    if location is None:
        from dvidetl.flight.server import start_server
        from dvidetl.sources import open_source

        host = getattr(args, "serve_host", None) or "127.0.0.1"
        source = open_source(getattr(args, "source", None) or f"synthetic://{args.uuid}")
        try:
            server = start_server(source, host=host, port=0, token=token)
        except Exception as exc:  # noqa: BLE001 - a bad bind address is the user's to fix
            source.close()
            raise UserError(f"--serve-host {host!r}: cannot listen there ({exc})") from None
        location = server.location
        if host in ("0.0.0.0", "::", "[::]"):
            location = f"grpc://{socket.getfqdn()}:{server.port}"
    elif not location.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")):
        raise UserError(f"--flight {location!r}: expected grpc://HOST:PORT or grpc+tls://HOST:PORT")
    from dvidetl.flight.client import FlightUnavailable

    try:
        return FlightEndpoint(location, token, args.uuid, args.instance, server, source)
    except Exception as exc:
        if server is not None:
            server.stop()
        if source is not None:
            source.close()
        if isinstance(exc, FlightUnavailable):  # nothing listening / wrong --flight
            raise UserError(f"{str(exc).splitlines()[0]} (is a Flight server running there? "
                            "check --flight)") from None
        raise
