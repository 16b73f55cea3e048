"""Reading an export back, and checking it against its source.

* ``export``: ``open_export(url)`` — the same pushed-down reads on every sink (``Export``);
* ``sql``: ``connect(DIR)`` — DuckDB views over a Parquet export's committed files, and one
  block back from them (``block_rows``, ``reassemble_block``);
* ``verify``: an export compared with its source, partition by partition;
* ``view``: ``dvidetl view`` — a precomputed volume and neuroglancer on one HTTP server.
"""

from __future__ import annotations

from dvidetl.read.export import GROUP_BLOCKS, Box, Export, open_export
from dvidetl.read.sql import block_rows, connect, reassemble_block

__all__ = ["open_export", "Export", "Box", "GROUP_BLOCKS", "connect", "block_rows", "reassemble_block"]
