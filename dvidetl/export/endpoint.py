"""The Flight endpoint an export talks to: a Flight server it names (``flight=``), or the
embedded reference server over a source URL (``source=``, default ``synthetic://UUID``);
and the token file."""

from __future__ import annotations

import logging
import socket

from dvidetl.errors import UserError
from dvidetl.export.tasks import Secret

# Imports inside functions load Arrow Flight, the plugin registry's entry points only where used:
# importing this module must not (CLI start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.


def read_token(path: str | None) -> str | None:
    """The bearer token of ``--token-file`` (never from argv), else env
    ``DVIDETL_FLIGHT_TOKEN`` (as docs/flight-protocol.md promises); one reader for both
    (``flight.client.load_token``), whose errors name the file."""
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

        self.client = FlightClient(location, token=token, uuid=uuid, instance=instance,
                                   retry_log_level=logging.INFO)
        self.info = self.client.info()
        self.instance = instance or self.info.instance

    def __enter__(self) -> FlightEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
        if self.server is not None:
            self.server.stop()
        if self.source is not None:
            self.source.close()


def open_flight(*, uuid: str, flight: str | None = None, source: str | None = None,
                instance: str | None = None, token_file: str | None = None,
                serve_host: str = "127.0.0.1") -> FlightEndpoint:
    """The endpoint of a Flight server (``flight=grpc://HOST:PORT``) or of the embedded
    reference server over ``source`` (default ``synthetic://<uuid>``), bound to
    ``serve_host`` — loopback by default, which only workers on this node can reach; a
    wildcard bind is advertised under this host's fully qualified name so SLURM workers on
    other nodes can connect. The bearer token comes from ``token_file`` or the environment
    (never an argument). Close it (``close()``) when done."""

    token = read_token(token_file)
    server = src = None
    location = flight
    if location is None:
        from dvidetl.flight.server import start_server
        from dvidetl.sources import open_source

        host = serve_host or "127.0.0.1"
        src = open_source(source or f"synthetic://{uuid}")
        try:
            server = start_server(src, host=host, port=0, token=token)
        except Exception as exc:  # noqa: BLE001 - a bad bind address is the user's to fix
            src.close()
            raise UserError(f"--serve-host {host!r}: cannot listen there ({exc})") from None
        location = server.location
        if host in ("0.0.0.0", "::", "[::]"):
            location = f"grpc://{socket.getfqdn()}:{server.port}"
    elif not location.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")):
        raise UserError(f"--flight {location!r}: expected grpc://HOST:PORT or grpc+tls://HOST:PORT")
    from dvidetl.flight.client import FlightUnavailable

    try:
        return FlightEndpoint(location, token, uuid, instance, server, src)
    except Exception as exc:
        if server is not None:
            server.stop()
        if src is not None:
            src.close()
        if isinstance(exc, FlightUnavailable):  # nothing listening / wrong --flight
            raise UserError(f"{str(exc).splitlines()[0]} (is a Flight server running there? "
                            "check --flight)") from None
        raise
