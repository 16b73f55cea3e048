"""The one small protocol every source implements (synthetic, shards, dvid+http).

The Flight server is a thin adapter over this: tickets are validated there, so a source may
assume scale exists and ``0 <= lo < hi <= morton_end``. Everything is streamed as Arrow
record batches so no source ever needs a whole volume in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from dvidetl.geometry import VolumeInfo

#: Blocks as a source yields them, sorted by morton within one call.
BLOCKS_WIRE_SCHEMA = pa.schema(
    [
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("data", pa.binary()),  # the block exactly as stored (still wrapped, see VolumeInfo.codec)
    ]
)

MAPPING_SCHEMA = pa.schema([("supervoxel", pa.uint64()), ("body", pa.uint64())])

#: label = body label; data = the LabelIndex protobuf bytes, unwrapped (DVID stores them LZ4).
INDICES_SCHEMA = pa.schema([("label", pa.uint64()), ("data", pa.binary())])


@runtime_checkable
class Source(Protocol):
    """A labelmap at one UUID, readable by Morton range."""

    def info(self) -> VolumeInfo:
        """Volume description. ``info().uuid == "*"`` means "answers for any UUID"."""
        ...

    def count(self, scale: int, level: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Blocks per aligned Morton cell ``code >> level``: (cells uint64 ascending,
        counts uint64, exact). Only non-empty cells need be listed. ``exact=False`` means the
        counts are upper bounds (block slots inside the extents)."""
        ...

    def read_blocks(self, scale: int, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Stored blocks with ``lo <= morton < hi``, ascending morton, as BLOCKS_WIRE_SCHEMA."""
        ...

    def map_supervoxels(self, svs: np.ndarray) -> np.ndarray:
        """Body of each supervoxel (uint64, identity where unmapped)."""
        ...

    def read_mapping(self) -> Iterator[pa.RecordBatch]:
        """All non-identity (supervoxel, body) pairs, as MAPPING_SCHEMA."""
        ...

    def read_indices(self, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Label indices of body labels ``lo <= label < hi``, ascending, as INDICES_SCHEMA."""
        ...

    def close(self) -> None: ...
