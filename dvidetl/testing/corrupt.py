"""A corpus of corrupt stored blocks, and a source wrapper that mixes them into a real volume.

Why: a half-billion-block export will meet every kind of damaged value a disk, a buggy
writer or a truncated transfer can leave, and each must land in ``export_errors`` with its
coordinates, stage and reason while every good block is exported. This module makes those
values from real blocks, deterministically:

=================  ==================================================================
kind               what is wrong
=================  ==================================================================
truncated          the raw DVID block cut short, then stored with the volume's codec
wrong_counts       header N (label-table length) off by a little or a lot
index_range        a palette index past the label table
bad_wrapper        the storage wrapper's header is wrong (gzip magic, lz4 size
                   prefix, zstd magic)
bad_stream         the compressed stream is damaged inside (cut short / bytes flipped)
random             random bytes of a plausible size
=================  ==================================================================

Every value ``corrupt()`` returns is checked to really fail ``repack`` (the export's parse),
so a test can expect exactly one ``export_errors`` entry per corrupted block.
``CorruptSource(inner, rate=, seed=, codec=)`` serves ``inner`` with a deterministic
``rate`` fraction of its blocks replaced (``codec`` re-wraps every block in another storage
codec first, to damage lz4 / zstd volumes as well as DVID's default gzip).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa

from dvidetl.codec import repack, unwrap, wrap

KINDS = ("truncated", "wrong_counts", "index_range", "bad_wrapper", "bad_stream", "random")


def _fails(value: bytes, codec: str) -> bool:
    return repack(pa.array([value], pa.binary()), codec).n_errors == 1


def _header(raw: bytes) -> tuple[int, int, int, int]:
    return struct.unpack_from("<4I", raw, 0)


def _one(raw: bytes, kind: str, codec: str, rng: np.random.Generator) -> bytes:
    """One attempt at a corrupt stored value of ``kind`` (may by chance still be valid)."""
    if kind == "truncated":
        return wrap(raw[: int(rng.integers(0, len(raw)))], codec)
    if kind == "wrong_counts":
        gx, gy, gz, n = _header(raw)
        delta = int(rng.choice([-1, 1, 7, 1 << 20, (1 << 32) - 1 - n]))
        return wrap(raw[:12] + struct.pack("<I", (n + delta) % (1 << 32)) + raw[16:], codec)
    if kind == "index_range":
        gx, gy, gz, n = _header(raw)
        nsb = gx * gy * gz
        pal0 = 16 + 8 * n + 2 * nsb
        if len(raw) < pal0:  # a header-only (solid) block has no index to break: miscount it
            return _one(raw, "wrong_counts", codec, rng)
        ns = np.frombuffer(raw, "<u2", nsb, 16 + 8 * n)
        k = int(rng.integers(0, max(int(ns.sum()), 1)))
        off = pal0 + 4 * k
        return wrap(raw[:off] + struct.pack("<I", n + int(rng.integers(0, 1000))) + raw[off + 4:],
                    codec)
    good = wrap(raw, codec)
    if kind == "bad_wrapper":
        b = bytearray(good)
        if codec == "gzip":
            b[int(rng.integers(0, 2))] ^= 0xFF  # magic
        elif codec == "lz4":
            b[0:4] = struct.pack("<I", int(rng.choice([len(raw) + 1, len(raw) - 1, 1 << 29])))
        elif codec == "zstd":
            b[int(rng.integers(0, 4))] ^= 0xFF  # magic
        else:  # none: the block header is the only wrapper there is
            b[0:4] = struct.pack("<I", 0)
        return bytes(b)
    if kind == "bad_stream":
        if rng.random() < 0.5 or codec == "none":
            return good[: len(good) - int(rng.integers(1, min(64, len(good) - 1) + 1))]
        b = bytearray(good)
        lo = {"gzip": 10, "lz4": 4, "zstd": 6}.get(codec, 0)
        for _ in range(8):
            b[int(rng.integers(lo, len(b) - 1))] ^= int(rng.integers(1, 256))
        return bytes(b)
    if kind == "random":
        return rng.bytes(int(rng.integers(1, max(2, min(len(good), 1 << 16)))))
    raise ValueError(f"unknown corruption kind {kind!r}: use one of {', '.join(KINDS)}")


def corrupt(wrapped: bytes, kind: str, codec: str, seed: int = 0) -> bytes:
    """A stored value of ``kind`` made from a good stored block, guaranteed to fail the
    export's parse (``repack``); deterministic for (input, kind, codec, seed)."""
    raw = unwrap(wrapped, codec)
    rng = np.random.default_rng([seed, len(raw), KINDS.index(kind) if kind in KINDS else 99])
    for _ in range(64):
        bad = _one(raw, kind, codec, rng)
        if _fails(bad, codec):
            return bad
    raise RuntimeError(f"could not make a failing {kind} value from a {len(raw)}-byte block")


class CorruptSource:
    """A real source with a deterministic ``rate`` fraction of blocks replaced by corrupt
    values (kinds cycling through ``kinds``); ``codec`` re-wraps every block first.

    ``corrupted`` records what was served: {(scale, morton): kind}.
    """

    def __init__(self, inner, rate: float = 0.1, seed: int = 0, codec: str | None = None,
                 kinds: tuple[str, ...] = KINDS):
        self.inner, self.rate, self.seed, self.kinds = inner, rate, seed, tuple(kinds)
        self.src_codec = inner.info().codec
        self.codec = codec or self.src_codec
        self.corrupted: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def info(self):
        return replace(self.inner.info(), codec=self.codec)

    def _pick(self, scale: int, morton: int) -> str | None:
        h = hashlib.blake2b(f"{self.seed}:{scale}:{morton}".encode(), digest_size=8).digest()
        v = int.from_bytes(h, "little")
        if (v >> 8) / 2.0**56 >= self.rate:
            return None
        return self.kinds[(v & 0xFF) % len(self.kinds)]

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        for b in self.inner.read_blocks(scale, lo, hi):
            data = b.column("data").to_pylist()
            mortons = b.column("morton").to_numpy()
            out = []
            for d, m in zip(data, mortons.tolist(), strict=True):
                if self.codec != self.src_codec:
                    d = wrap(unwrap(d, self.src_codec), self.codec)
                kind = self._pick(scale, m)
                if kind is not None:
                    d = corrupt(d, kind, self.codec, seed=self.seed ^ m)
                    with self._lock:
                        self.corrupted[(scale, m)] = kind
                out.append(d)
            yield b.set_column(b.schema.get_field_index("data"), "data", pa.array(out, pa.binary()))
