"""What a partition's task hands its sinks: typed partition data, not storage rows.

A blocks partition is handed as :class:`BlockData`: the exported blocks as record batches
(coordinates, the label table ``supervoxels``, the ``labels`` (bodies) of its entries, voxels
per entry, the unwrapped block's size and CRC, and what the run's sinks ask for
(``Sink.needs``, ``NEEDS``): ``payload``, the zstd frame of the block without its table, and
``raw``, the unwrapped DVID block bytes), in Morton order, plus the blocks that failed
(``FAILED_BLOCKS``: reason and the bytes as served). Each sink stores it its own way: the
tabular sinks (Parquet, VastDB) need ``payload`` and cut cells for their cell limit
(``tables.cells.cut_blocks``); a sink that writes volumes (neuroglancer precomputed) needs
``raw`` and transcodes it with ``labels`` (``codec.cseg.encode_chunks``) without ever
reassembling cells or decoding voxels.

Why the optional columns: each costs the transform real work per block (the zstd payload is
about half of it), and a partition whose sinks are all volumes never reads a payload. A column
nobody asked for is absent (``block_schema``), not empty, and a sink that reads one without
declaring it is refused by ``Sink.check_data`` (``BlockData.lacks``) before it writes.

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

#: the columns of every exported block, whatever the sinks ask for
BASE_COLUMNS = pa.schema(
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
    ]
)
#: the zstd frame of the block without its label table (need ``payload``: the tabular sinks)
PAYLOAD_FIELD = pa.field("payload", pa.binary())
#: the unwrapped DVID block bytes (need ``raw``: a sink that transcodes blocks)
RAW_FIELD = pa.field("raw", pa.binary())

#: what sinks may ask the transform for besides ``BASE_COLUMNS`` (``Sink.needs``), each the
#: name of the column it adds
NEEDS = frozenset({"payload", "raw"})


def block_schema(needs: Iterable[str]) -> pa.Schema:
    """The exported blocks' schema for a partition whose sinks need ``needs``: the base
    columns, then ``payload`` and ``raw`` when asked for (in that order)."""
    needs = frozenset(needs)
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown block data needs {sorted(unknown)} (known: {sorted(NEEDS)})")
    s = BASE_COLUMNS
    if "payload" in needs:
        s = s.append(PAYLOAD_FIELD)
    if "raw" in needs:
        s = s.append(RAW_FIELD)
    return s


#: one row per exported block for the tabular sinks (``payload``)
BLOCK_BATCH = block_schema({"payload"})
#: ... and for a run that also has a sink transcoding blocks (``payload`` and ``raw``)
BLOCK_BATCH_RAW = block_schema({"payload", "raw"})

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

@dataclass
class BlockData:
    """A blocks partition as its sinks receive it (see the module docstring)."""

    blocks: TableData  # block_schema(needs) rows, Morton order
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
    def schema(self) -> pa.Schema | None:
        """The blocks' schema when the data says it (a table, a spilled table), else None."""
        s = getattr(self.blocks, "schema", None)
        return s if isinstance(s, pa.Schema) else None

    def lacks(self, needs: Iterable[str]) -> list[str]:
        """The optional columns among ``needs`` that these blocks do not carry (the
        transform made them only for the needs of the run's sinks); [] when the schema is not
        known up front (a plain stream of batches, a sink's own test data)."""
        s = self.schema
        if s is None:
            return []
        return sorted(n for n in set(needs) & NEEDS if n not in s.names)

    @property
    def replayable(self) -> bool:
        return isinstance(self.blocks, pa.Table) or bool(getattr(self.blocks, "replayable", False))

    def values(self) -> list:
        """What holds memory or files (for ``spill.close_tables``)."""
        return [self.blocks, self.failed]


#: a partition's data: ``BlockData`` (blocks) or the kind's tables (table name -> rows)
PartitionData: TypeAlias = BlockData | Mapping[str, TableData]


__all__ = ["BASE_COLUMNS", "BLOCK_BATCH", "BLOCK_BATCH_RAW", "PAYLOAD_FIELD", "RAW_FIELD", "FAILED_BLOCKS",
           "NEEDS", "block_schema", "BlockData", "PartitionData", "TableData"]
