"""Arrow Flight: the contract (`protocol`), the reference server (`server`), the client (`client`).

Import the submodules directly (``from dvidetl.flight.client import FlightClient``); this
package re-exports the stable names lazily so importing it stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FlightClient": "dvidetl.flight.client",
    "FlightUnavailable": "dvidetl.flight.client",
    "FlightAuthError": "dvidetl.flight.client",
    "FlightRequestError": "dvidetl.flight.client",
    "load_token": "dvidetl.flight.client",
    "DvidFlightServer": "dvidetl.flight.server",
    "RunningServer": "dvidetl.flight.server",
    "start_server": "dvidetl.flight.server",
    "TicketError": "dvidetl.flight.protocol",
    "PROTOCOL_VERSION": "dvidetl.flight.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dvidetl.flight' has no attribute {name!r}")
