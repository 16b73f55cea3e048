"""What a partition's task hands its sinks: typed partition data, not storage rows.

A blocks partition is handed as :class:`BlockData`: the exported blocks as ``BLOCK_BATCH``
record batches (coordinates, the label table ``supervoxels``, the ``labels`` (bodies) of its
entries, voxels per entry, the unwrapped block's size and CRC, the zstd ``payload`` of the
block without its table and — when a sink of the run asks for it (``Sink.needs``) — the
unwrapped DVID block bytes ``raw``), in Morton order, plus the blocks that failed
(``FAILED_BLOCKS``: reason and the bytes as served). Each sink stores it its own way: the
tabular sinks (Parquet, VastDB) cut cells for their cell limit (``tables.cells.cut_blocks``);
a sink that writes volumes (neuroglancer precomputed) transcodes ``raw`` with ``labels``
(``codec.cseg.encode_chunks``) without ever reassembling cells or decoding voxels.

The keyed kinds (label indices, mapping, anomalies) are rows already: their data is the
kind's table as :class:`TableData`.

Both may be in memory (``pa.Table``) or spilled to the worker's disk
(``spill.SpilledTable``), and a sink may iterate them more than once (a retried write).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import pyarrow as pa

#: one row per exported block (the columns a sink may take; ``raw`` only when asked for)
BLOCK_BATCH = pa.schema(
    [
        ("scale", pa.uint8()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("supervoxels", pa.list_(pa.uint64())),  # the block's label table, stored order
        ("labels", pa.list_(pa.uint64())),  # the body of each table entry (the mapping)
        ("sv_voxels", pa.list_(pa.uint32())),  # voxels per table entry
        ("raw_size", pa.uint32()),  # bytes of the unwrapped DVID block
        ("crc32", pa.uint32()),  # of the unwrapped DVID block
        ("payload", pa.binary()),  # zstd frame of the block without its label table
    ]
)
#: the unwrapped DVID block bytes, added to ``BLOCK_BATCH`` when a sink needs them
RAW_FIELD = pa.field("raw", pa.binary())
BLOCK_BATCH_RAW = BLOCK_BATCH.append(RAW_FIELD)

#: one row per block that could not be exported, with the bytes as the source served them
FAILED_BLOCKS = pa.schema(
    [
        ("scale", pa.uint8()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("z", pa.int32()),
        ("morton", pa.uint64()),
        ("stage", pa.string()),  # repack | validate | duplicate
        ("reason", pa.string()),
        ("data", pa.binary()),
    ]
)

#: a table's rows: a whole table, or a stream of batches / tables (a ``SpilledTable``
#: streams from disk and can be read again)
TableData: TypeAlias = pa.Table | Iterable[pa.RecordBatch | pa.Table]

#: what sinks may ask the transform for besides the default columns (``Sink.needs``)
NEEDS = frozenset({"raw"})


@dataclass
class BlockData:
    """A blocks partition as its sinks receive it (see the module docstring)."""

    blocks: TableData  # BLOCK_BATCH (or BLOCK_BATCH_RAW) rows, Morton order
    failed: pa.Table = field(default_factory=FAILED_BLOCKS.empty_table)
    num_blocks: int = 0

    def batches(self) -> Iterator[pa.Table]:
        """The exported blocks as tables of about one transform group each (read from disk
        one at a time when spilled); may be called again."""
        data = self.blocks
        for b in (data.to_batches() if isinstance(data, pa.Table) else data):
            t = pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
            if t.num_rows:
                yield t

    @property
    def replayable(self) -> bool:
        return isinstance(self.blocks, pa.Table) or bool(getattr(self.blocks, "replayable", False))

    def values(self) -> list:
        """What holds memory or files (for ``spill.close_tables``)."""
        return [self.blocks, self.failed]


#: a partition's data: ``BlockData`` (blocks) or the kind's tables (table name -> rows)
PartitionData: TypeAlias = BlockData | Mapping[str, TableData]


__all__ = ["BLOCK_BATCH", "BLOCK_BATCH_RAW", "RAW_FIELD", "FAILED_BLOCKS", "NEEDS", "BlockData",
           "PartitionData", "TableData"]
