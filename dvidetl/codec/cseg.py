"""DVID blocks → neuroglancer ``compressed_segmentation`` chunks, transcoded, never decoded.

Why: a precomputed export of a connectome rewrites every block once. Decoding a 64³ block to
2 MiB of uint64 voxels and re-encoding them (what a TensorStore writer does) costs
milliseconds per block; DVID's sub-blocks already are cseg's 8³ blocks in the same voxel
order, so translating palettes and re-packing indices does the same job without touching
voxels (``_cseg_kernels``). Pure functions over whole Arrow/NumPy buffers; no I/O.

Contract:

* Input blocks are unwrapped DVID blocks (``unwrap``/``repack`` output joined with its table,
  or raw ``compression=blocks`` bytes); any grid DVID allows, not only 64³.
* ``labels`` (optional) is the block's table mapped to output ids — the ``labels`` list of
  the blocks table, aligned one to one with ``supervoxels`` (duplicates allowed). Without it
  the output holds the stored (supervoxel) ids. Two table entries mapping to one body are one
  lookup-table value, so bit widths follow the deduplicated palette.
* ``shapes`` is the in-volume extent (x, y, z voxels) of each chunk: a chunk in a partial slot
  at the volume's upper bound must be encoded at its clipped size, because readers derive the
  cseg block grid from the clipped shape (a full 64³ chunk there decodes wrong with no error
  in TensorStore and cloud-volume). Voxels of the block outside the shape are ignored, and
  padding follows the cseg rule (index 0 = the smallest in-volume value of the block).
* The output is one channel: a uint32 channel-offset table (one word, value 1) then the cseg
  data, byte-identical to neuroglancer's / the ``compressed-segmentation`` package's encoder
  for the same voxels (sorted tables, tables shared within a chunk), so a written chunk can
  be checked by re-encoding its source block and comparing bytes.
* ``background[r]`` says every in-volume voxel of row r is 0: such chunks need not be written
  (readers return 0 for missing chunks, as DVID and TensorStore do).
* A bad row (corrupt block, labels of the wrong length, a shape outside the block, a null)
  gets a reason in ``errors`` and an empty output; its neighbours are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dvidetl.codec import _cseg_kernels as CK
from dvidetl.codec import _kernels as K
from dvidetl.codec.block import _as_u8, describe_error
from dvidetl.codec.errors import BlockFormatError
from dvidetl.codec.repack import _binary_parts

__all__ = ["CsegChunks", "encode_chunks", "encode_chunk", "is_background", "decode_chunk", "CSEG_BLOCK"]

#: the cseg encoding block size this module writes (``compressed_segmentation_block_size``):
#: DVID's sub-block, which is what lets blocks be transcoded without decoding
CSEG_BLOCK = (8, 8, 8)


@dataclass(frozen=True)
class CsegChunks:
    """Encoded chunks of a batch, back to back: row r is ``data[offsets[r]:offsets[r+1]]``."""

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, R + 1 byte offsets; error rows are empty
    background: np.ndarray  # bool, R: every in-volume voxel is label 0
    errors: list[str | None]  # None = ok, else the reason

    def __len__(self) -> int:
        return len(self.errors)

    def __getitem__(self, r: int) -> bytes:
        return self.data[self.offsets[r] : self.offsets[r + 1]].tobytes()

    @property
    def n_errors(self) -> int:
        return sum(e is not None for e in self.errors)

    @property
    def ok(self) -> np.ndarray:
        """Rows that encoded (bool, R)."""
        return np.array([e is None for e in self.errors], dtype=bool)

    def to_arrow(self) -> pa.Array:
        """A binary array (large_binary past 2 GiB) with NULL for error rows; zero-copy."""
        n = len(self)
        bad = ~self.ok
        validity = pa.py_buffer(np.packbits(~bad, bitorder="little")) if bad.any() else None
        large = self.offsets[-1] > np.iinfo(np.int32).max
        otype, atype = (np.int64, pa.large_binary()) if large else (np.int32, pa.binary())
        return pa.Array.from_buffers(
            atype,
            n,
            [validity, pa.py_buffer(self.offsets.astype(otype)), pa.py_buffer(self.data)],
            null_count=int(bad.sum()),
        )


def _describe(info: np.ndarray, buf: np.ndarray, start: int) -> str:
    err = int(info[K.I_ERR])
    if err == CK.E_LABELS:
        return (
            f"labels: {int(info[K.I_A])} labels given for a block table of "
            f"N={int(info[K.I_B])} entries (they must be aligned one to one)"
        )
    if err == CK.E_SHAPE:
        dims = tuple(8 * int(g) for g in buf[start : start + 12].view("<u4"))
        shape = tuple(int(info[k]) for k in (K.I_A, K.I_B, K.I_C))
        where = "outside the volume" if min(shape) < 1 else "larger than the block"
        return (
            f"chunk shape {shape[0]}x{shape[1]}x{shape[2]} is {where} "
            f"(each axis must be 1..{dims[0]}x{dims[1]}x{dims[2]})"
        )
    if err == CK.E_NULL:
        return "null block or labels"
    return describe_error(info)


def _blocks_buffer(blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 data, int64 offsets, valid) of an Arrow binary array or a sequence of bytes."""
    if isinstance(blocks, pa.ChunkedArray):
        blocks = blocks.combine_chunks()
    if isinstance(blocks, pa.Array):
        if not (pa.types.is_binary(blocks.type) or pa.types.is_large_binary(blocks.type)):
            raise TypeError(f"encode_chunks: blocks must be binary, got {blocks.type}")
        offs, buf, valid = _binary_parts(blocks)
        return np.frombuffer(buf, np.uint8), offs, valid
    parts = [_as_u8(b) for b in blocks]
    offs = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([p.shape[0] for p in parts], out=offs[1:])
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return data, offs, np.ones(len(parts), bool)


def _labels_buffer(labels, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint64 values, int64 offsets into them, valid) of a list<uint64> array or a
    sequence of uint64 arrays."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    if isinstance(labels, pa.Array):
        if not (pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)):
            raise TypeError(f"encode_chunks: labels must be a list<uint64> array, got {labels.type}")
        if labels.type.value_type != pa.uint64():
            raise TypeError(f"encode_chunks: labels must be list<uint64>, got {labels.type}")
        if len(labels) != n:
            raise ValueError(f"encode_chunks: {len(labels)} labels rows for {n} blocks")
        values = labels.values
        if values.null_count:
            raise ValueError("encode_chunks: labels contain null values")
        vals = values.to_numpy(zero_copy_only=True) if len(values) else np.zeros(0, np.uint64)
        offs = np.asarray(labels.offsets, dtype=np.int64)
        valid = (
            np.asarray(labels.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            if labels.null_count
            else np.ones(n, bool)
        )
        return vals, offs, valid
    parts = [np.asarray(v, dtype=np.uint64).reshape(-1) for v in labels]
    if len(parts) != n:
        raise ValueError(f"encode_chunks: {len(parts)} labels rows for {n} blocks")
    offs = np.zeros(n + 1, np.int64)
    np.cumsum([p.shape[0] for p in parts], out=offs[1:])
    vals = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    return vals, offs, np.ones(n, bool)


def _full_shapes(data: np.ndarray, offs: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The whole-block shape (8·gx, 8·gy, 8·gz) of every row with a header (else 1, 1, 1: the
    row fails its scan anyway)."""
    n = offs.shape[0] - 1
    shapes = np.ones((n, 3), np.int64)
    has = ok & (offs[1:] - offs[:-1] >= 12)
    rows = np.flatnonzero(has)
    if rows.size:
        idx = offs[:-1][rows, None] + np.arange(12)
        dims = data[idx].reshape(-1, 12).copy().view("<u4").astype(np.int64)
        shapes[rows] = np.clip(8 * dims, 1, 8 * K.MAX_GRID)
    return shapes


def encode_chunks(
    blocks: pa.Array | pa.ChunkedArray | Sequence,
    labels: pa.Array | pa.ChunkedArray | Sequence | None = None,
    shapes: np.ndarray | Sequence[Sequence[int]] | None = None,
) -> CsegChunks:
    """Transcode a batch of unwrapped DVID blocks into cseg chunks in one numba pass (see the
    module contract). ``shapes``: (R, 3) in-volume extents, x, y, z; None = whole blocks."""
    data, offs, valid = _blocks_buffer(blocks)
    n = offs.shape[0] - 1
    ok = valid.copy()
    if labels is None:
        lab_vals, lab_offs = np.zeros(0, np.uint64), np.zeros(n + 1, np.int64)
    else:
        lab_vals, lab_offs, lvalid = _labels_buffer(labels, n)
        ok &= lvalid
    if shapes is None:
        shp = _full_shapes(data, offs, ok)
    else:
        shp = np.array(shapes, dtype=np.int64).reshape(-1, 3)
        if shp.shape[0] != n:
            raise ValueError(f"encode_chunks: {shp.shape[0]} shapes for {n} blocks")
    info, words, word_offs, background = CK.encode_many(
        data, offs, ok, lab_vals, lab_offs, labels is not None, shp
    )
    info[~ok, K.I_ERR] = CK.E_NULL
    errors: list[str | None] = [None] * n
    for r in np.flatnonzero(info[:, K.I_ERR] != K.E_OK).tolist():
        errors[r] = _describe(info[r], data, int(offs[r]))
    return CsegChunks(
        data=words.view(np.uint8), offsets=4 * word_offs, background=background, errors=errors
    )


def _one(block, labels, shape) -> CsegChunks:
    return encode_chunks(
        [block], None if labels is None else [labels], None if shape is None else [shape]
    )


def encode_chunk(block, labels=None, shape: Sequence[int] | None = None) -> bytes:
    """One block → one cseg chunk (a convenience for tests and tools; batches go through
    ``encode_chunks``). Raises ``BlockFormatError`` for a corrupt block, ``ValueError`` for
    labels or a shape that do not fit it."""
    out = _one(block, labels, shape)
    err = out.errors[0]
    if err is not None:
        if err.startswith(("labels:", "chunk shape")):
            raise ValueError(err)
        raise BlockFormatError(err)
    return out[0]


def is_background(block, labels=None, shape: Sequence[int] | None = None) -> bool:
    """True when every voxel of the block inside ``shape`` maps to label 0 (such a chunk is
    not written). Batches get this as ``CsegChunks.background``."""
    out = _one(block, labels, shape)
    if out.errors[0] is not None:
        raise BlockFormatError(out.errors[0])
    return bool(out.background[0])


_DECODE_ERRORS = {
    CK.D_SHORT: "the chunk ({a} words) ends before its channel offset or block headers",
    CK.D_HEADER: "encoding block {a}'s header points outside the chunk (word {b})",
    CK.D_BITS: "encoding block {a} has bit width {b} (not 0/1/2/4/8/16/32)",
    CK.D_INDEX: "encoding block {a} holds value index {b}, past its lookup table",
}


def decode_chunk(data, shape: Sequence[int]) -> np.ndarray:
    """One stored cseg chunk (one uint64 channel, 8³ encoding blocks) → voxels (z, y, x) of
    its ``shape`` (x, y, z), e.g. a clipped edge chunk's. Written apart from the encoder (it
    shares only the format), so ``verify`` can read back what was stored; a damaged chunk is
    a ``BlockFormatError`` saying what is wrong, never an out-of-bounds read."""
    buf = np.frombuffer(bytes(data), np.uint8)
    if buf.shape[0] % 4:
        raise BlockFormatError(f"cseg chunk: {buf.shape[0]} bytes, not whole 32-bit words")
    cx, cy, cz = (int(v) for v in shape)
    if min(cx, cy, cz) < 1:
        raise ValueError(f"decode_chunk: shape {tuple(shape)} must be at least 1 on every axis")
    out = np.zeros((cz, cy, cx), np.uint64)
    err = np.zeros(2, np.int64)
    code = CK.decode_chunk_into(buf.view("<u4"), cx, cy, cz, out, err)
    if code != CK.D_OK:
        raise BlockFormatError("cseg chunk: " + _DECODE_ERRORS[code].format(a=int(err[0]), b=int(err[1])))
    return out
