"""vastsim's flatbuffer answers for the catalog calls (schemas, tables, stats, columns)."""

from __future__ import annotations

import flatbuffers
import pyarrow as pa
from vastdb.vast_flatbuf.tabular import GetTableStatsResponse as fb_stats
from vastdb.vast_flatbuf.tabular import ListSchemasResponse as fb_list_schemas
from vastdb.vast_flatbuf.tabular import ListTablesResponse as fb_list_tables
from vastdb.vast_flatbuf.tabular import ObjectDetails as fb_obj

from dvidetl.testing._vastsim_model import (
    SORT_INDEX,
    SORT_TYPE,
    TableMeta,
)

# --------------------------------------------------------------------------------------------
# flatbuffer responses


def _obj_details(b: flatbuffers.Builder, name: str, properties: str = "", handle: str | None = None,
                 num_rows: int = 0, size: int = 0, sorting: bool = False) -> int:
    n = b.CreateString(name)
    p = b.CreateString(properties)
    h = b.CreateString(handle) if handle is not None else None
    fb_obj.Start(b)
    fb_obj.AddName(b, n)
    fb_obj.AddProperties(b, p)
    if h is not None:
        fb_obj.AddHandle(b, h)
    fb_obj.AddNumRows(b, num_rows)
    fb_obj.AddSizeInBytes(b, size)
    fb_obj.AddSortingKeyEnabled(b, sorting)
    if sorting:
        fb_obj.AddSortingScore(b, -(1 << 63))  # bit 63 = sorting done
    return fb_obj.End(b)


def _vector(b: flatbuffers.Builder, start_fn, offsets: list[int]) -> int:
    start_fn(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _list_schemas_body(bucket: str, names: list[tuple[str, str]]) -> bytes:
    b = flatbuffers.Builder(1024)
    objs = [_obj_details(b, n, p) for n, p in names]
    vec = _vector(b, fb_list_schemas.StartSchemasVector, objs)
    bn = b.CreateString(bucket)
    fb_list_schemas.Start(b)
    fb_list_schemas.AddBucketName(b, bn)
    fb_list_schemas.AddSchemas(b, vec)
    b.Finish(fb_list_schemas.End(b))
    return bytes(b.Output())


def _list_tables_body(bucket: str, schema: str, rows: list[dict]) -> bytes:
    b = flatbuffers.Builder(1024)
    objs = [_obj_details(b, r["name"], "", str(r["handle"]), r["num_rows"], r["size"],
                         r["sorting"]) for r in rows]
    vec = _vector(b, fb_list_tables.StartTablesVector, objs)
    bn = b.CreateString(bucket)
    sn = b.CreateString(schema)
    fb_list_tables.Start(b)
    fb_list_tables.AddBucketName(b, bn)
    fb_list_tables.AddSchemaName(b, sn)
    fb_list_tables.AddTables(b, vec)
    b.Finish(fb_list_tables.End(b))
    return bytes(b.Output())


def _stats_body(num_rows: int, size: int, sorting: bool, external: bool) -> bytes:
    b = flatbuffers.Builder(256)
    fb_stats.StartVipsVector(b, 0)
    vips = b.EndVector()
    fb_stats.Start(b)
    fb_stats.AddNumRows(b, num_rows)
    fb_stats.AddSizeInBytes(b, size)
    fb_stats.AddIsExternalRowidAlloc(b, external)
    fb_stats.AddVips(b, vips)
    fb_stats.AddSortingKeyEnabled(b, sorting)
    fb_stats.AddSortingScore(b, -(1 << 63) if sorting else 0)
    fb_stats.AddAcummulativeRowInseritionCount(b, num_rows)
    b.Finish(fb_stats.End(b))
    return bytes(b.Output())


def _columns_body(meta: TableMeta, only_sorted: bool, start: int = 0,
                  max_keys: int | None = None) -> bytes:
    pos = {cid: i for i, cid in enumerate(meta.sort_key)}
    fields = []
    for cid, f in meta.fields:
        md = dict(f.metadata or {})
        if cid in pos:
            md[SORT_TYPE.encode()] = b"Sorted"
            md[SORT_INDEX.encode()] = str(pos[cid]).encode()
        else:
            md[SORT_TYPE.encode()] = b"Unsorted"
        fields.append((cid, f.with_metadata(md)))
    if only_sorted:
        by = dict(fields)
        fields = [(cid, by[cid]) for cid in meta.sort_key]
    if max_keys is not None:
        fields = fields[start:start + max_keys]
    schema = pa.schema([f for _, f in fields], metadata=dict(meta.schema_metadata) or None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    return sink.getvalue().to_pybytes()
