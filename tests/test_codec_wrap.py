"""DVID storage wrappers: gzip / lz4 / zstd / none / dvid (format byte + optional CRC32)."""

from __future__ import annotations

import gzip
import struct
import zlib

import lz4.block
import pytest
import zstandard

from dvidetl.codec import BlockFormatError, unwrap, wrap
from dvidetl.codec import wrapper as W

PAYLOAD = bytes(range(256)) * 300 + b"tail"


@pytest.mark.parametrize(
    "codec",
    ["gzip", "lz4", "zstd", "none", "dvid", "dvid-gzip", "dvid-lz4", "dvid-lz4-crc", "dvid-none", "dvid-none-crc"],
)
def test_roundtrip(codec):
    w = wrap(PAYLOAD, codec)
    back = "dvid" if codec.startswith("dvid") else codec
    assert type(unwrap(w, back)) is bytes and unwrap(w, back) == PAYLOAD
    assert bytes(unwrap(memoryview(w), back)) == PAYLOAD


def test_forms_are_standard():
    assert gzip.decompress(wrap(PAYLOAD, "gzip")) == PAYLOAD
    d = wrap(PAYLOAD, "dvid")
    assert d[0] == 0x40 and gzip.decompress(d[1:]) == PAYLOAD
    lz = wrap(PAYLOAD, "lz4")
    assert struct.unpack_from("<I", lz)[0] == len(PAYLOAD) and lz4.block.decompress(lz) == PAYLOAD
    assert wrap(PAYLOAD, "dvid-lz4")[0] == 0x80
    c = wrap(PAYLOAD, "dvid-lz4-crc")
    assert c[0] == 0x88 and struct.unpack_from("<I", c, 1)[0] == zlib.crc32(c[5:])
    assert zstandard.ZstdDecompressor().decompress(wrap(PAYLOAD, "zstd")) == PAYLOAD


def test_real_go_gzip_and_dvid_prefix(shared_data):
    s = (shared_data / "dvid" / "stream_1block.dat").read_bytes()[16:]
    assert s[:10] == bytes.fromhex("1f8b08000000000000ff")  # Go's gzip header
    raw = unwrap(s, "gzip")
    assert len(raw) == 152672 and bytes(raw) == gzip.decompress(s)
    assert bytes(unwrap(b"\x40" + s, "dvid")) == bytes(raw)


def test_lz4_legacy_zero_size():
    assert unwrap(b"\0\0\0\0abc", "lz4") == b"abc"
    assert unwrap(b"\x80\0\0\0\0abc", "dvid") == b"abc"


def test_gzip_multi_member_and_padding():
    g = gzip.compress(PAYLOAD)
    assert bytes(unwrap(g + g, "gzip")) == PAYLOAD * 2
    assert bytes(unwrap(g + gzip.compress(b"xy"), "gzip")) == PAYLOAD + b"xy"
    assert bytes(unwrap(g + b"\0" * 8, "gzip")) == PAYLOAD


@pytest.mark.parametrize(
    "data,codec,match",
    [
        (b"", "gzip", "gzip: truncated"),
        (b"\x1f\x8b\x08", "gzip", "gzip: truncated"),
        (b"PK" + b"\0" * 30, "gzip", "gzip: bad magic"),
        (gzip.compress(PAYLOAD)[:-9], "gzip", "gzip: "),
        (gzip.compress(PAYLOAD) + b"junk", "gzip", "gzip: 4 trailing bytes"),
        (b"\1\2", "lz4", "lz4: truncated"),
        (struct.pack("<I", 100) + b"\xff" * 20, "lz4", "lz4: "),
        (struct.pack("<I", 2**31), "lz4", "lz4: size prefix"),
        (wrap(PAYLOAD, "lz4") + b"junk", "lz4", "lz4: "),
        (b"notzstd!", "zstd", "zstd: "),
        (wrap(PAYLOAD, "zstd")[:-5], "zstd", "zstd: "),
        (wrap(PAYLOAD, "zstd") + b"junk", "zstd", "zstd: 4 trailing bytes"),
        (b"", "dvid", "dvid: empty"),
        (b"\x41" + gzip.compress(b"x"), "dvid", "unknown format byte 0x41"),
        (b"\x60abc", "dvid", "unknown format byte 0x60"),
        (b"\x08\0\0\0\0abc", "dvid", "CRC32 mismatch"),
        (b"\x08ab", "dvid", "truncated CRC32"),
        (b"\x40notgzip-notgzip-notgzip", "dvid", "dvid 0x40: gzip: bad magic"),
    ],
)
def test_bad_wrappers(data, codec, match):
    with pytest.raises(BlockFormatError, match=match):
        unwrap(data, codec)


def test_corrupt_gzip_message_is_zlibs():
    g = bytearray(gzip.compress(PAYLOAD, compresslevel=0))  # stored blocks
    g[11] ^= 0xFF  # break LEN/NLEN of the first stored block
    with pytest.raises(BlockFormatError, match="gzip: invalid stored block lengths"):
        unwrap(bytes(g), "gzip")


def test_every_gzip_truncation_is_an_error():
    g = gzip.compress(PAYLOAD[:3000])
    for k in range(len(g)):
        with pytest.raises(BlockFormatError):
            unwrap(g[:k], "gzip")


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec"):
        unwrap(b"abc", "brotli")
    with pytest.raises(ValueError, match="unknown codec"):
        wrap(b"abc", "brotli")


_CHOICE = """
import gzip, os, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # importing it now raises ImportError: not installed
from dvidetl.codec import wrapper as W
raw = os.urandom(3000) + bytes(60000)
assert bytes(W.gunzip(gzip.compress(raw, 6))) == raw
print(W.GZIP_INFLATER)
"""


@pytest.mark.parametrize(
    "missing, expected",
    [
        ((), "libdeflate"),  # deflate is a hard dependency: the default everywhere
        (("deflate",), "isal"),
        (("deflate", "isal"), "zlib-ng"),
        (("deflate", "isal", "zlib_ng"), "zlib"),
    ],
)
def test_inflater_choice(missing, expected):
    """The fastest installed inflater is chosen, each fallback inflates exactly."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CHOICE, *missing], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected
    if not missing:
        assert W.GZIP_INFLATER == expected
