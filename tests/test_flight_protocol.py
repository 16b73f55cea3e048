"""The Flight contract without a server: ticket parsing, validation, clipping, count encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dvidetl.errors import UserError
from dvidetl.flight import protocol as P
from dvidetl.geometry import ScaleInfo, VolumeInfo
from dvidetl.testing.tickets import raw_ticket

INFO = VolumeInfo(
    "abc123",
    "segmentation",
    "gzip",
    [ScaleInfo(0, (64, 64, 64), (5, 3, 7)), ScaleInfo(1, (64, 64, 64), (3, 2, 4))],
)


def test_roundtrip_all_kinds():
    for t in (
        P.BlocksTicket("abc123", "segmentation", 1, 3, 17),
        P.MappingTicket("abc123", "segmentation"),
        P.IndicesTicket("abc123", "segmentation", 0, 2**64),
        P.AnomaliesTicket("abc123", "segmentation", 5, 9),
    ):
        raw = t.to_json()
        assert len(raw) <= P.MAX_TICKET_BYTES
        assert json.loads(raw)["v"] == P.PROTOCOL_VERSION
        assert P.parse_ticket(raw) == t
        assert P.parse_ticket(raw).validate(INFO) == t


def test_range_clipped_to_grid():
    end = INFO.scale(0).morton_end  # grid (5,3,7): 3+2+3 bits
    assert end == 256
    t = P.parse_ticket(raw_ticket(lo=200, hi=2**64)).validate(INFO)
    assert (t.lo, t.hi) == (200, end)
    t = P.parse_ticket(raw_ticket(lo=0, hi=end)).validate(INFO)
    assert (t.lo, t.hi) == (0, end)


@pytest.mark.parametrize(
    "raw, field",
    [
        (b"not json", "ticket"),
        (b"\xff\xfe", "ticket"),
        (b"[1, 2]", "ticket"),
        (raw_ticket(v=...), "v"),
        (raw_ticket(v=2), "v"),
        (raw_ticket(v="1"), "v"),
        (raw_ticket(kind="voxels"), "kind"),
        (raw_ticket(kind=...), "kind"),
        (raw_ticket(uuid=...), "uuid"),
        (raw_ticket(uuid=""), "uuid"),
        (raw_ticket(uuid="a b"), "uuid"),
        (raw_ticket(uuid=7), "uuid"),
        (raw_ticket(uuid="x" * 65), "uuid"),
        (raw_ticket(instance=...), "instance"),
        (raw_ticket(instance="seg\n"), "instance"),
        (raw_ticket(scale=-1), "scale"),
        (raw_ticket(scale=1.0), "scale"),
        (raw_ticket(scale=True), "scale"),
        (raw_ticket(scale=...), "scale"),
        (raw_ticket(lo=-1), "lo"),
        (raw_ticket(lo="0"), "lo"),
        (raw_ticket(lo=5, hi=5), "hi"),
        (raw_ticket(lo=6, hi=5), "hi"),
        (raw_ticket(hi=2**64 + 1), "hi"),
        (raw_ticket(extra=1), "extra"),
        (raw_ticket(instance="x" * 5000), "ticket"),  # over the size limit
        (b" " * (P.MAX_TICKET_BYTES + 1), "ticket"),
        (b"[" * 4000 + b"]" * 4000, "ticket"),  # oversize and deeply nested
        (b"[" * 2040 + b"]" * 2040, "ticket"),
        (b'{"v": 1, "kind": "blocks", "lo": NaN}', "uuid"),
        (raw_ticket(lo=float("inf")), "lo"),
        (
            json.dumps(
                {"v": 1, "kind": "indices", "uuid": "u", "instance": "i", "lo": 3, "hi": 3}
            ).encode(),
            "hi",
        ),
        (
            json.dumps({"v": 1, "kind": "mapping", "uuid": "u", "instance": "i", "lo": "3"}).encode(),
            "lo",
        ),
        (
            json.dumps({"v": 1, "kind": "anomalies", "uuid": "u", "instance": "i", "lo": 4, "hi": 4}).encode(),
            "hi",
        ),
        (
            json.dumps({"v": 1, "kind": "anomalies", "uuid": "u", "instance": "i", "lo": 0, "hi": 1,
                        "scale": 0}).encode(),
            "scale",
        ),
        (
            json.dumps({"v": 1, "kind": "mapping", "uuid": "u", "instance": "i", "lo": 5, "hi": 5}).encode(),
            "hi",
        ),
    ],
)
def test_structurally_bad_tickets_name_the_field(raw, field):
    with pytest.raises(P.TicketError) as ei:
        P.parse_ticket(raw)
    assert ei.value.field == field
    assert f"field {field!r}" in str(ei.value)
    assert isinstance(ei.value, UserError)


@pytest.mark.parametrize(
    "raw, field",
    [
        (raw_ticket(uuid="def456"), "uuid"),
        (raw_ticket(instance="grayscale"), "instance"),
        (raw_ticket(scale=2), "scale"),
        (raw_ticket(lo=256, hi=300), "lo"),  # wholly past the grid
    ],
)
def test_semantically_bad_tickets_name_the_field(raw, field):
    t = P.parse_ticket(raw)
    with pytest.raises(P.TicketError) as ei:
        t.validate(INFO)
    assert ei.value.field == field


def test_any_uuid_source_accepts_any_uuid():
    from dataclasses import replace

    star = replace(INFO, uuid="*")
    assert P.parse_ticket(raw_ticket(uuid="f00d")).validate(star).uuid == "f00d"
    with pytest.raises(P.TicketError):
        P.parse_ticket(raw_ticket(instance="other")).validate(star)


def test_no_mapping_no_indices():
    from dataclasses import replace

    bare = replace(INFO, has_mapping=False, has_indices=False)
    with pytest.raises(P.TicketError, match="no mapping"):
        P.MappingTicket("abc123", "segmentation").validate(bare)
    with pytest.raises(P.TicketError, match="no label indices"):
        P.IndicesTicket("abc123", "segmentation", 0, 5).validate(bare)


def test_count_request_and_descriptors():
    req = P.parse_count_request(P.CountRequest("abc123", "segmentation", 1, 3).to_json())
    assert req.validate(INFO) == req and req.cell_bits == 3
    # cell_bits travels under its protocol-v1 name, so v1 peers of other makers still agree
    wire = json.loads(P.CountRequest("abc123", "segmentation", 1, 3).to_json())
    assert wire == {"v": 1, "uuid": "abc123", "instance": "segmentation", "scale": 1, "level": 3}
    kreq = P.CountKeysRequest("abc123", "segmentation", "indices", 40, 5, 9)
    assert json.loads(kreq.to_json())["level"] == 40 and "cell_bits" not in json.loads(kreq.to_json())
    assert P.parse_count_keys_request(kreq.to_json()) == kreq
    with pytest.raises(P.TicketError) as ei:
        P.parse_count_request(P.CountRequest("abc123", "segmentation", 1, 65).to_json())
    assert ei.value.field == "level"
    with pytest.raises(P.TicketError) as ei:
        P.parse_count_request(P.CountRequest("abc123", "segmentation", 4, 0).to_json()).validate(
            INFO
        )
    assert ei.value.field == "scale"
    assert P.parse_descriptor(None, [b"abc123", b"segmentation"], "d") == P.VolumeRef(
        "abc123", "segmentation"
    )
    assert P.parse_descriptor(b"", None, "d") is None
    with pytest.raises(P.TicketError):
        P.parse_descriptor(None, [b"abc123"], "d")
    assert P.parse_map_command(P.map_command("abc123", "seg")) == P.VolumeRef("abc123", "seg")
    assert P.parse_map_command(b"map") is None
    with pytest.raises(P.TicketError):
        P.parse_map_command(b'{"v":1,"kind":"blocks","uuid":"a","instance":"b"}')


def test_count_ipc_roundtrip_in_parts():
    cells = np.arange(0, 3000, 3, dtype=np.uint64)
    counts = (cells % 7 + 1).astype(np.uint64)
    parts = P.count_to_ipc(cells, counts, False, max_rows=128)
    assert len(parts) == 8
    c, n, exact = P.count_from_ipc(parts)
    assert exact is False
    np.testing.assert_array_equal(c, cells)
    np.testing.assert_array_equal(n, counts)
    c, n, exact = P.count_from_ipc(
        P.count_to_ipc(np.zeros(0, np.uint64), np.zeros(0, np.uint64), True)
    )
    assert len(c) == 0 and len(n) == 0 and exact is True
