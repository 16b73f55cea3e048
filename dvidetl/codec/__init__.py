"""The DVID compressed label Block codec (DVID's labels/compressed.go and the storage wrappers
of dvid/storage/serialize.go): pure functions, no I/O.

Stable API (other tools call these names):
``decode_block``, ``encode_block``, ``block_labels``, ``label_voxel_counts``,
``split_block``, ``join_block``, ``wrap``, ``unwrap``, ``repack``/``Repacked``,
``restore_block`` and ``BlockFormatError``.
"""

from __future__ import annotations

from dvidetl.codec.block import (
    MAX_VOXELS,
    block_header,
    block_labels,
    decode_block,
    describe_error,
    encode_block,
    join_block,
    label_voxel_counts,
    split_block,
    validate_block,
    validate_blocks,
)
from dvidetl.codec.errors import BlockFormatError
from dvidetl.codec.repack import Repacked, repack, restore_block
from dvidetl.codec.wrapper import CODECS, GZIP_INFLATER, MAX_RAW, crc32, gunzip, unwrap, wrap

__all__ = [
    "BlockFormatError",
    "CODECS",
    "GZIP_INFLATER",
    "MAX_RAW",
    "MAX_VOXELS",
    "Repacked",
    "block_header",
    "block_labels",
    "crc32",
    "decode_block",
    "describe_error",
    "encode_block",
    "gunzip",
    "join_block",
    "label_voxel_counts",
    "repack",
    "restore_block",
    "split_block",
    "unwrap",
    "validate_block",
    "validate_blocks",
    "wrap",
]
