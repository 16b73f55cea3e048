"""Block coordinates, volume descriptions and neuroglancer compressed Morton codes.

A partition is a half-open Morton range ``[lo, hi)`` of one scale. The code is the one
neuroglancer sharding and DVID's ``export-shards`` use: bits of x, y, z interleaved (x lowest
at each level), each axis contributing only the bits its grid extent needs. Any aligned range
of codes is an aligned box of blocks, which is what makes Morton ranges good partitions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import SupportsInt

import numpy as np

Vec3 = tuple[int, int, int]

#: the exclusive end of every uint64 key space — Morton codes, labels, supervoxels, anomaly
#: numbers: the one "to the end" bound of range reads and plans. (A plan's ledger stores
#: bounds in uint64 columns, so its last key range ends at ``KEY_END - 1``: key 2**64-1 is
#: never a real label.)
KEY_END = 1 << 64


def uncovered(ranges: Iterable[tuple[int, int]], end: int = KEY_END) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of [0, end) that no range of ``ranges`` covers (they may overlap
    and come in any order): where a plan has no partition — verify looks there for blocks,
    the VastDB sink for rows an earlier run left."""
    out, pos = [], 0
    for lo, hi in sorted(ranges):
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        out.append((pos, end))
    return out


def vec3(v: Iterable[SupportsInt]) -> Vec3:
    """``(x, y, z)`` as three Python ints, from any three numbers (a JSON list, numpy
    integers); ``ValueError`` for another count."""
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values (x, y, z), got {len(t)}")
    return t[0], t[1], t[2]


def axis_bits(grid: Vec3) -> Vec3:
    """Bits each axis contributes to the compressed Morton code (0 for an axis of extent 1)."""
    return vec3(max(0, int(g) - 1).bit_length() for g in grid)


def _bit_plan(grid: Vec3) -> list[tuple[int, int, int]]:
    """(axis, source bit, destination bit) for every bit of the code, lowest first."""
    bits = axis_bits(grid)
    plan = []
    j = 0
    for i in range(max(bits) if bits else 0):
        for d in range(3):
            if i < bits[d]:
                plan.append((d, i, j))
                j += 1
    return plan


def morton_bits(grid: Vec3) -> int:
    """Total number of bits of a compressed Morton code for this grid."""
    return sum(axis_bits(grid))


def morton_end(grid: Vec3) -> int:
    """Exclusive upper bound of the codes of a grid: every block's code is below it."""
    return 1 << morton_bits(grid)


def morton_encode(x, y, z, grid: Vec3) -> np.ndarray:
    """Compressed Morton codes (uint64) of block coordinates, vectorized over arrays."""
    coords = [np.asarray(c, dtype=np.uint64) for c in (x, y, z)]
    shape = np.broadcast_shapes(*(c.shape for c in coords))
    out = np.zeros(shape, dtype=np.uint64)
    one = np.uint64(1)
    for d, i, j in _bit_plan(grid):
        out |= ((coords[d] >> np.uint64(i)) & one) << np.uint64(j)
    return out


def morton_decode(codes, grid: Vec3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block coordinates (int32 x, y, z) of compressed Morton codes."""
    codes = np.asarray(codes, dtype=np.uint64)
    out = [np.zeros(codes.shape, dtype=np.uint64) for _ in range(3)]
    one = np.uint64(1)
    for d, i, j in _bit_plan(grid):
        out[d] |= ((codes >> np.uint64(j)) & one) << np.uint64(i)
    return out[0].astype(np.int32), out[1].astype(np.int32), out[2].astype(np.int32)


def in_grid(x, y, z, grid: Vec3) -> np.ndarray:
    """True where a block coordinate lies inside the grid (codes past the box exist otherwise)."""
    x, y, z = (np.asarray(c) for c in (x, y, z))
    return (x >= 0) & (y >= 0) & (z >= 0) & (x < grid[0]) & (y < grid[1]) & (z < grid[2])


def shard_of(code: int, preshift_bits: int, minishard_bits: int, shard_bits: int) -> int:
    """Neuroglancer identity-hash shard number of a chunk's Morton code."""
    return (int(code) >> (preshift_bits + minishard_bits)) & ((1 << shard_bits) - 1)


@dataclass(frozen=True)
class ScaleInfo:
    """One scale of a labelmap: block size and the block grid (block coords 0..grid-1)."""

    scale: int
    block_size: Vec3
    grid: Vec3
    #: voxel extents at this scale, min inclusive / max exclusive (hints, like DVID's)
    voxel_min: Vec3 = (0, 0, 0)
    voxel_max: Vec3 = (0, 0, 0)

    @property
    def morton_end(self) -> int:
        return morton_end(self.grid)

    @property
    def block_slots(self) -> int:
        return int(self.grid[0]) * int(self.grid[1]) * int(self.grid[2])


@dataclass(frozen=True)
class VolumeInfo:
    """What a source serves: one labelmap instance at one version UUID."""

    uuid: str
    instance: str
    codec: str  # storage codec of the block bytes served ("gzip", "zstd", "lz4", "none", "dvid")
    scales: list[ScaleInfo] = field(default_factory=list)
    has_mapping: bool = True
    has_indices: bool = True
    #: a versioned source's node state: True locked (committed, immutable), False open (its
    #: data can change under an export), None when the source is not a versioned node
    locked: bool | None = None
    #: the version as the source was asked for it, when the source resolves names (a DVID
    #: UUID prefix, ``PREFIX:BRANCH``, ``:BRANCH``); ``uuid`` is then the full node UUID
    requested_uuid: str | None = None

    def answers_to(self, uuid: str) -> bool:
        """Whether ``uuid`` names this volume's version: the full UUID, the name the source
        was asked for, or (as DVID allows) a prefix of the full UUID. A client that names
        the version any of these ways is answered with the full UUID, and uses it after."""
        return bool(uuid) and (uuid == self.requested_uuid or self.uuid.startswith(uuid))

    def scale(self, s: int) -> ScaleInfo:
        for info in self.scales:
            if info.scale == s:
                return info
        raise KeyError(f"scale {s} not in volume (scales {[i.scale for i in self.scales]})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VolumeInfo:
        d = json.loads(text)
        scales = [
            ScaleInfo(
                scale=int(s["scale"]),
                block_size=vec3(s["block_size"]),
                grid=vec3(s["grid"]),
                voxel_min=vec3(s.get("voxel_min", (0, 0, 0))),
                voxel_max=vec3(s.get("voxel_max", (0, 0, 0))),
            )
            for s in d["scales"]
        ]
        return cls(
            uuid=d["uuid"],
            instance=d["instance"],
            codec=d["codec"],
            scales=scales,
            has_mapping=bool(d.get("has_mapping", True)),
            has_indices=bool(d.get("has_indices", True)),
            locked=None if d.get("locked") is None else bool(d["locked"]),
            requested_uuid=d.get("requested_uuid"),
        )
