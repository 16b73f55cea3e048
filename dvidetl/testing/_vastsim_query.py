"""vastsim's ``query_data``: the request's flatbuffer predicate decoded, evaluated with
Arrow compute, and the answer framed in splits and sub-splits the way the SDK pages it."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf import LiteralImpl as _LI
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Call import Call as FbCall
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.ExpressionImpl import (
    ExpressionImpl,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.FieldIndex import (
    FieldIndex as FbFieldIndex,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.FieldRef import (
    FieldRef as FbFieldRef,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Literal import (
    Literal as FbLiteral,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Relation import (
    Relation as FbRelation,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.RelationImpl import (
    RelationImpl,
)
from vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.Source import (
    Source as FbSource,
)

from dvidetl.testing._vastsim_model import (
    EOS,
    ESTIMATION_SPLIT_ID,
    INVALID_ROW_ID,
    ROW_ID,
    ROWS_PER_ROW_GROUP,
    SimError,
    _bad,
    _cname,
    _combine,
)
from dvidetl.testing._vastsim_state import (
    SimState,
)

# Those in try/if/with blocks are optional or conditional.

# --------------------------------------------------------------------------------------------
# query_data: request decoding, predicate evaluation, response framing


@dataclass
class _Node:
    name: str
    index: int
    children: list
    parent: _Node | None = None


def _fb_str(b) -> str:
    return b.decode() if isinstance(b, bytes) else (b or "")


def _build_nodes(fb_field, counter, parent=None) -> _Node:
    node = _Node(_fb_str(fb_field.Name()), next(counter), [], parent)
    for j in range(fb_field.ChildrenLength()):
        node.children.append(_build_nodes(fb_field.Children(j), counter, node))
    return node


def _iter_nodes(node: _Node):
    yield node
    for c in node.children:
        yield from _iter_nodes(c)


_LIT_CLASSES: dict[int, type] = {}


def _literal_class(kind: int) -> type:
    cls = _LIT_CLASSES.get(kind)
    if cls is None:
        import importlib

        names = {v: k for k, v in vars(_LI.LiteralImpl).items() if not k.startswith("_")}
        if kind not in names or kind == 0:
            raise _bad(f"unsupported literal kind {kind}")
        mod = importlib.import_module(
            f"vastdb.vast_flatbuf.org.apache.arrow.computeir.flatbuf.{names[kind]}")
        cls = _LIT_CLASSES[kind] = getattr(mod, names[kind])
    return cls


def _literal_value(lit: FbLiteral) -> tuple[int, Any]:
    kind = lit.ImplType()
    tab = lit.Impl()
    LI = _LI.LiteralImpl
    obj = _literal_class(kind)()
    obj.Init(tab.Bytes, tab.Pos)
    if kind == LI.BinaryLiteral:
        return kind, obj.ValueAsNumpy().tobytes() if not obj.ValueIsNone() else b""
    if kind == LI.DecimalLiteral:
        raw = obj.ValueAsNumpy().tobytes() if not obj.ValueIsNone() else b"\0" * 16
        return kind, int.from_bytes(raw, "little", signed=True)
    if kind == LI.StringLiteral:
        v = obj.Value()
        return kind, v if isinstance(v, bytes) else (v or "").encode()
    if kind == LI.ListLiteral:
        return kind, [_literal_value(obj.Values(j))[1] for j in range(obj.ValuesLength())]
    return kind, obj.Value()


_CMP = {"equal": pc.equal, "not_equal": pc.not_equal, "greater": pc.greater,
        "greater_equal": pc.greater_equal, "less": pc.less, "less_equal": pc.less_equal}


class _QueryEval:
    """Evaluates the SDK's filter expression over a table with user column names."""

    def __init__(self, tbl: pa.Table, nodes_by_index: dict[int, _Node], types: dict[str, Any]):
        self.tbl = tbl
        self.nodes = nodes_by_index
        self.types = types
        self._cols: dict[int, pa.Array] = {}

    def column(self, position: int) -> pa.Array:
        if position in self._cols:
            return self._cols[position]
        node = self.nodes.get(position)
        if node is None:
            raise _bad(f"predicate references unknown column position {position}")
        path = []
        n = node
        while n.parent is not None:
            path.append(n)
            n = n.parent
        path.reverse()
        if n.name not in self.tbl.column_names:
            raise _bad(f"predicate references unknown column {n.name!r}")
        arr = _combine(self.tbl[n.name])
        parent = n
        for child in path:
            t = arr.type
            if pa.types.is_struct(t):
                idx = parent.children.index(child)
                arr = arr.flatten()[idx]
            elif pa.types.is_fixed_size_list(t):
                # a predicate on the single child of a fixed-size list compares whole vectors
                break
            else:
                raise _bad(f"predicates on nested column {n.name!r} are not supported")
            parent = child
        self._cols[position] = arr
        return arr

    def literal(self, expr_tab, col: pa.Array) -> pa.Scalar:
        lit = FbLiteral()
        lit.Init(expr_tab.Bytes, expr_tab.Pos)
        kind, v = _literal_value(lit)
        t = col.type
        LI = _LI.LiteralImpl
        try:
            if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
                    or pa.types.is_large_binary(t):
                return pa.scalar(v if isinstance(v, bytes) else str(v).encode(), pa.binary())
            if pa.types.is_decimal(t):
                return pa.scalar(Decimal(v).scaleb(-t.scale), t)
            if kind == LI.Float16Literal:
                return pa.scalar(float(np.uint16(v).view(np.float16)), pa.float32())
            if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
                base = pa.int32() if pa.types.is_date32(t) or pa.types.is_time32(t) \
                    else pa.int64()
                return pa.scalar(int(v), base).cast(t)
            if pa.types.is_fixed_size_list(t):
                return v  # raw element values (ints for dates/times, unscaled decimals)
            return pa.scalar(v, t)
        except (pa.ArrowInvalid, OverflowError, TypeError) as e:
            raise _bad(f"literal {v!r} does not fit column type {t}: {e}") from e

    def _call_parts(self, expr):
        """(name, column position, literal expr impl) of `call(ref, lit)`, else None."""
        if expr.ImplType() != ExpressionImpl.Call:
            return None
        call = FbCall()
        tab = expr.Impl()
        call.Init(tab.Bytes, tab.Pos)
        if call.ArgumentsLength() != 2:
            return None
        a0, a1 = call.Arguments(0), call.Arguments(1)
        if a0.ImplType() != ExpressionImpl.FieldRef or a1.ImplType() != ExpressionImpl.Literal:
            return None
        ref = FbFieldRef()
        rt = a0.Impl()
        ref.Init(rt.Bytes, rt.Pos)
        idx = FbFieldIndex()
        it = ref.Ref()
        idx.Init(it.Bytes, it.Pos)
        return _fb_str(call.Name()), idx.Position(), a1.Impl()

    def _isin(self, args) -> pa.Array | None:
        """`isin([...])` arrives as OR of n equals on one column: answer it with is_in."""
        parts = [self._call_parts(a) for a in args]
        if any(p is None or p[0] != "equal" for p in parts):
            return None
        if len({p[1] for p in parts}) != 1:
            return None
        col = self.column(parts[0][1])
        if pa.types.is_fixed_size_list(col.type) or pa.types.is_float16(col.type):
            return None
        lits = [self.literal(p[2], col) for p in parts]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary())
        values = pa.array([x.as_py() for x in lits], lits[0].type)
        res = pc.is_in(col, value_set=values)
        return pa.array(res.to_numpy(zero_copy_only=False), pa.bool_(),
                        mask=pc.is_null(col).to_numpy(zero_copy_only=False)) \
            if col.null_count else res

    def eval(self, expr) -> pa.Array:
        kind = expr.ImplType()
        tab = expr.Impl()
        if kind != ExpressionImpl.Call:
            raise _bad(f"unsupported filter expression kind {kind}")
        call = FbCall()
        call.Init(tab.Bytes, tab.Pos)
        name = _fb_str(call.Name())
        args = [call.Arguments(j) for j in range(call.ArgumentsLength())]
        n = self.tbl.num_rows
        if name in ("and", "or"):
            if not args:
                return pa.array(np.full(n, name == "and"))
            if name == "or" and len(args) > 4:
                fast = self._isin(args)
                if fast is not None:
                    return fast
            res = self.eval(args[0])
            f = pc.and_kleene if name == "and" else pc.or_kleene
            for a in args[1:]:
                res = f(res, self.eval(a))
            return res
        if not args or args[0].ImplType() != ExpressionImpl.FieldRef:
            raise _bad(f"filter call {name!r}: first argument must be a column reference")
        ref = FbFieldRef()
        rt = args[0].Impl()
        ref.Init(rt.Bytes, rt.Pos)
        idx = FbFieldIndex()
        it = ref.Ref()
        idx.Init(it.Bytes, it.Pos)
        col = self.column(idx.Position())
        if name == "is_null":
            return pc.is_null(col)
        if name == "is_valid":
            return pc.is_valid(col)
        if len(args) != 2 or args[1].ImplType() != ExpressionImpl.Literal:
            raise _bad(f"filter call {name!r} needs a column and a literal")
        lit = self.literal(args[1].Impl(), col)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.cast(pa.binary())
        if name == "match_substring":
            return pc.match_substring(col, lit.as_py().decode("utf-8", "surrogateescape"))
        if pa.types.is_fixed_size_list(t):
            return _fsl_compare(name, col, lit)
        fn = _CMP.get(name)
        if fn is None:
            raise SimError(501, "NotImplemented", f"filter function {name!r} is not supported")
        if pa.types.is_float16(t):
            col = col.cast(pa.float32())
        if pa.types.is_fixed_size_list(t):
            return _fsl_compare(name, col, lit)
        return fn(col, lit)


def _fsl_raw(col: pa.FixedSizeListArray) -> np.ndarray:
    """(rows, list_size) matrix of element values in literal encoding."""
    t = col.type
    vals = col.values.slice(col.offset * t.list_size, len(col) * t.list_size)
    et = t.value_type
    if pa.types.is_decimal(et):
        scale = 10 ** et.scale
        raw = np.array([0 if v is None else int(v * scale) for v in vals.to_pylist()],
                       dtype=object)
    elif pa.types.is_date32(et) or pa.types.is_time32(et):
        raw = vals.cast(pa.int32()).to_numpy(zero_copy_only=False)
    elif pa.types.is_timestamp(et) or pa.types.is_time64(et) or pa.types.is_date64(et):
        raw = vals.cast(pa.int64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_float16(et):
        raw = vals.cast(pa.float32()).to_numpy(zero_copy_only=False)
    else:
        raw = vals.to_numpy(zero_copy_only=False)
    return raw.reshape(len(col), t.list_size)


def _fsl_compare(name: str, col: pa.Array, lit) -> pa.Array:
    """Lexicographic comparison of fixed-size-list rows with a list literal (nulls stay null)."""
    want = list(lit)
    if len(want) != col.type.list_size:
        raise _bad(f"list literal of {len(want)} values for a list of {col.type.list_size}")
    if pa.types.is_float16(col.type.value_type):
        want = [float(np.uint16(v).view(np.float16)) for v in want]
    m = _fsl_raw(col)
    w = np.array(want, dtype=m.dtype)
    n = len(col)
    if n == 0:
        return pa.array([], pa.bool_())
    diff = m != w
    anyd = diff.any(axis=1)
    first = np.argmax(diff, axis=1)
    rows = np.arange(n)
    a, b = m[rows, first], w[first]
    gt = anyd & (a > b).astype(bool)
    lt = anyd & (a < b).astype(bool)
    res = {"equal": ~anyd, "not_equal": anyd, "greater": gt, "less": lt,
           "greater_equal": gt | ~anyd, "less_equal": lt | ~anyd}.get(name)
    if res is None:
        raise SimError(501, "NotImplemented", f"{name} on a fixed-size list")
    mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
    return pa.array(res.astype(bool), pa.bool_(), mask=mask)


def _leaf_array(arr: pa.Array, node: _Node, leaf: _Node) -> pa.Array:
    """The root-to-leaf path array of `leaf` (struct levels with exactly one child)."""
    path = []
    n: _Node | None = leaf
    while n is not node:
        assert n is not None  # leaf lies under node
        path.append(n)
        n = n.parent
    path.reverse()
    return _path_array(arr, node, path)


def _mask(arr: pa.Array):
    return pc.is_null(arr) if arr.null_count else None


def _path_array(arr: pa.Array, node: _Node, path: list) -> pa.Array:
    if not path:
        return arr
    t = arr.type
    child_node = path[0]
    if pa.types.is_struct(t):
        i = node.children.index(child_node)
        child = arr.field(i)
        if arr.offset or len(child) != len(arr):
            child = child.slice(arr.offset, len(arr))
        sub = _path_array(child, child_node, path[1:])
        return pa.StructArray.from_arrays([sub], fields=[t.field(i).with_type(sub.type)],
                                          mask=_mask(arr))
    if pa.types.is_map(t):
        entries = path[0]
        which = path[1]
        i = entries.children.index(which)
        values = arr.values  # struct<key, value>, unsliced
        child = values.field(i)
        sub = _path_array(child, which, path[2:])
        ent = pa.StructArray.from_arrays([sub], fields=[values.type.field(i).with_type(sub.type)])
        return pa.ListArray.from_arrays(arr.offsets, ent, mask=_mask(arr))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        sub = _path_array(arr.values, child_node, path[1:])
        cls = pa.ListArray if pa.types.is_list(t) else pa.LargeListArray
        return cls.from_arrays(arr.offsets, sub, mask=_mask(arr))
    if pa.types.is_fixed_size_list(t):
        vals = arr.values.slice(arr.offset * t.list_size, len(arr) * t.list_size)
        sub = _path_array(vals, child_node, path[1:])
        return pa.FixedSizeListArray.from_arrays(sub, t.list_size, mask=_mask(arr))
    raise _bad(f"cannot project nested path through type {t}")


def _record(stream_id: int, next_row_id: int, msg: bytes) -> bytes:
    return struct.pack("<LQ", stream_id, next_row_id) + msg


def _page(stream_id: int, next_row_id: int, arrays: list[pa.Array], nrows: int) -> list[bytes]:
    if arrays:
        batch = pa.record_batch(arrays, names=[f"l{i}" for i in range(len(arrays))])
    else:
        batch = pa.record_batch({"x": pa.nulls(nrows)}).select([])
    return [_record(stream_id, next_row_id, batch.schema.serialize().to_pybytes()),
            _record(stream_id, next_row_id, batch.serialize().to_pybytes()),
            _record(stream_id, next_row_id, EOS)]


_LAYOUTS: dict = {}  # tiny LRU: id(view) -> (view, ids, {(rg, splits, subs): layout})
_LAYOUT_LOCK = threading.Lock()


def _layout_entry(view: pa.Table) -> tuple:
    with _LAYOUT_LOCK:
        ent = _LAYOUTS.get(id(view))
        if ent is None or ent[0] is not view:
            ent = (view, view[ROW_ID].to_numpy(), {})
            _LAYOUTS[id(view)] = ent
            while len(_LAYOUTS) > 4:
                del _LAYOUTS[next(iter(_LAYOUTS))]
        return ent


def _rowid_numpy(view: pa.Table) -> np.ndarray:
    return _layout_entry(view)[1]


def _split_layout(view: pa.Table, ids: np.ndarray, rg: int, num_splits: int, num_sub: int):
    """Row positions grouped by (split, sub-split), each group in row-id order (cached)."""
    ent = _layout_entry(view)
    key = (rg, num_splits, num_sub)
    got = ent[2].get(key)
    if got is None:
        block = ids // np.uint64(ROWS_PER_ROW_GROUP * rg)
        grp = (block % np.uint64(num_splits)) * np.uint64(num_sub) + \
            (block // np.uint64(num_splits)) % np.uint64(num_sub)
        order = np.argsort(grp, kind="stable")
        bounds = np.searchsorted(grp[order], np.arange(num_splits * num_sub + 1,
                                                       dtype=np.uint64))
        got = (order, bounds)
        ent[2][key] = got
    return got


def query_data(state: SimState, txid: int, bucket: str, schema: str, name: str, body: bytes,
               headers) -> list[bytes]:
    """Answer one GET ?data; returns the response body as a list of complete pages."""
    with state.lock:
        tx = state.tx(txid)
        meta = state.need_table(tx, bucket, schema, name)
        internal = state.view(tx, meta)
    try:
        rel = FbRelation.GetRootAs(body, 0)
        if rel.ImplType() != RelationImpl.Source:
            raise _bad("query_data: the relation must be a Source")
        src = FbSource()
        it = rel.Impl()
        src.Init(it.Bytes, it.Pos)
        fb_schema = src.Schema()
        counter = iter(range(1 << 30))
        roots = [_build_nodes(fb_schema.Fields(j), counter)
                 for j in range(fb_schema.FieldsLength())]
        projection = [src.Projection(j).Position() for j in range(src.ProjectionLength())]
        filt = src.Filter()
    except SimError:
        raise
    except Exception as e:  # a malformed flatbuffer must be a 400, not a dropped socket
        raise _bad(f"query_data: cannot decode the request flatbuffer: {e}") from e
    nodes = {n.index: n for r in roots for n in _iter_nodes(r)}
    # user-named view of the needed columns
    cols, names = [], []
    for r in roots:
        if r.name == ROW_ID:
            rid = _combine(internal[ROW_ID])
            cols.append(rid.cast(meta.rowid_type()) if meta.sorted else rid)
        else:
            field_ = meta.field_by_name(r.name)
            if field_ is None:
                raise SimError(404, "TabularColumnNotFound",
                               f"table {meta.name} has no column {r.name!r}")
            cols.append(internal[_cname(field_[0])])
        names.append(r.name)
    ids = _rowid_numpy(internal)
    tbl = pa.table(cols + [internal[ROW_ID]], names=names + ["\0rid"]) if cols else \
        pa.table({"\0rid": internal[ROW_ID]})

    # split / sub-split / paging
    split_hdr = headers.get("tabular-split", "0,1,8")
    try:
        split_id, num_splits, rg = (int(x) for x in split_hdr.split(","))
        num_sub = int(headers.get("tabular-num-of-subsplits", "1"))
        limit = int(headers.get("tabular-limit-rows", "0")) or (1 << 62)
        prio = headers.get("tabular-schedule-id")
        if prio is not None and int(prio) < 0:
            raise _bad(f"invalid schedule id {prio}")
        starts = {}
        for i in range(num_sub):
            v = headers.get(f"tabular-start-row-id-{i}", f"{i},0")
            starts[i] = int(v.split(",")[1])
    except (ValueError, IndexError) as e:
        raise _bad(f"query_data: bad split headers: {e}") from e
    if num_splits < 1 or num_sub < 1 or rg < 1:
        raise _bad("query_data: split counts must be positive")

    def matches(positions: np.ndarray) -> np.ndarray:
        """Predicate over the rows at `positions` (bool per position)."""
        if len(positions) == 0:
            return np.zeros(0, bool)
        sub_tbl = tbl if len(positions) == tbl.num_rows else tbl.take(pa.array(positions))
        res = _QueryEval(sub_tbl, nodes, {}).eval(filt).fill_null(False)
        return res.to_numpy(zero_copy_only=False).astype(bool)

    if split_id == ESTIMATION_SPLIT_ID:  # sorted tables: row-group estimate
        count = int(matches(np.arange(tbl.num_rows)).sum())
        groups = (count + ROWS_PER_ROW_GROUP - 1) // ROWS_PER_ROW_GROUP
        return [b"".join(_page(0, INVALID_ROW_ID, [], groups))]

    order, bounds = _split_layout(internal, ids, rg, num_splits, num_sub)
    leaves = [nodes[p] for p in projection]
    out: list[bytes] = []
    for i in range(num_sub):
        start = starts[i]
        if start >= INVALID_ROW_ID:
            continue
        k = split_id * num_sub + i
        cand = order[bounds[k]:bounds[k + 1]] if split_id < num_splits else order[:0]
        if start:
            cand = cand[np.searchsorted(ids[cand], np.uint64(start)):]
        # evaluate the predicate window by window until limit+1 matches (paging stays cheap)
        found: list[np.ndarray] = []
        nfound, pos, window = 0, 0, max(4096, min(limit + 1, 1 << 20))
        while pos < len(cand) and nfound <= limit:
            w = cand[pos:pos + window]
            hit = w[matches(w)]
            found.append(hit)
            nfound += len(hit)
            pos += window
            window *= 2
        rows = np.concatenate(found) if found else np.zeros(0, np.int64)
        page = rows[:limit]
        nxt = int(ids[page[-1]]) + 1 if len(rows) > limit else INVALID_ROW_ID
        arrays = []
        if leaves:
            taken = tbl.take(pa.array(page, pa.int64()))
            for leaf in leaves:
                root = leaf
                while root.parent is not None:
                    root = root.parent
                arrays.append(_leaf_array(_combine(taken[root.name]), root, leaf))
        out.append(b"".join(_page(i, nxt, arrays, len(page))))
    return out
