"""Flight tickets as raw JSON bytes, for tests that send the server (or the parser) what a
real client never would: a field set to ``...`` is left out, any other value is sent as is."""

from __future__ import annotations

import json
from typing import Any

#: a valid blocks ticket for the tests' volume (uuid ``abc123``, instance ``segmentation``)
BLOCKS_TICKET: dict[str, Any] = {
    "v": 1, "kind": "blocks", "uuid": "abc123", "instance": "segmentation", "scale": 0, "lo": 0, "hi": 10,
}


def raw_ticket(**fields: Any) -> bytes:
    """``BLOCKS_TICKET`` with ``fields`` replaced (``...`` removes a field), as JSON bytes."""
    d = BLOCKS_TICKET | fields
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()
