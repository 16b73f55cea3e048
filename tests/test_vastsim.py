"""vastsim driven only through the real `vastdb` SDK (plus its own low-level API for the
requests the public API never sends, e.g. an oversize body)."""

from __future__ import annotations

import functools
import threading

import backoff
import duckdb
import ibis
import pyarrow as pa
import pytest
import vastdb
import vastdb.errors as verr
from vastdb.config import BackoffConfig, QueryConfig
from vastdb.table_metadata import TableMetadata, TableRef, TableType

from dvidetl.testing._vastsim_model import MAX_CELL_BYTES
from dvidetl.testing.vastsim import (
    start_vastsim,
    start_vastsim_process,
)

FAST_BACKOFF = BackoffConfig(wait_gen=functools.partial(backoff.expo, factor=0.01),
                             max_value=0.05, max_tries=30, max_time=20)

SCHEMA = pa.schema([
    ("scale", pa.uint8()),
    ("z", pa.int32()),
    ("morton", pa.uint64()),
    ("count", pa.uint32()),
    ("flag", pa.bool_()),
    ("body", pa.binary()),
    ("name", pa.string()),
    ("labels", pa.list_(pa.uint64())),
    ("counts", pa.list_(pa.uint32())),
])

BIG = 2**63


def _rows(n: int, start: int = 0) -> pa.Table:
    idx = list(range(start, start + n))
    return pa.table({
        "scale": [i % 3 for i in idx],
        "z": [-i for i in idx],
        "morton": [BIG + i if i % 2 else i for i in idx],
        "count": [i * 7 for i in idx],
        "flag": [i % 2 == 0 for i in idx],
        "body": [bytes([i % 256]) * (i % 50) for i in idx],
        "name": [f"n{i}" for i in idx],
        "labels": [[i, 2**64 - 1 - i] for i in idx],
        "counts": [[i] * (i % 4) for i in idx],
    }, schema=SCHEMA)


def _connect(sim, **kw) -> vastdb.session.Session:
    kw.setdefault("backoff_config", FAST_BACKOFF)
    return vastdb.connect(endpoint=sim.endpoint, access=sim.access_key, secret=sim.secret_key,
                          **kw)


def _setup(session, table: str = "t", rows: pa.Table | None = None):
    with session.transaction() as tx:
        s = tx.bucket("bucket").create_schema("s", fail_if_exists=False)
        t = s.create_table(table, SCHEMA)
        if rows is not None:
            t.insert(rows)


def _read(session, table: str = "t", **select) -> pa.Table:
    with session.transaction() as tx:
        t = tx.bucket("bucket").schema("s").table(table)
        return t.select(**select).read_all()


@pytest.fixture
def sim(tmp_path):
    with start_vastsim(tmp_path / "data") as s:
        yield s


def test_connect_reports_vast_version(sim):
    s = _connect(sim)
    assert s.api.vast_version == (5, 5, 0, 0)
    with s.transaction() as tx:
        with pytest.raises(verr.MissingBucket):
            tx.bucket("no-such-bucket")


def test_create_insert_select_roundtrip_all_types(sim):
    s = _connect(sim)
    rows = _rows(40)
    with s.transaction() as tx:
        sch = tx.bucket("bucket").create_schema("s")
        t = sch.create_table("t", SCHEMA)
        ids = t.insert(rows)
        assert ids.to_pylist() == list(range(40))
        # own writes are visible inside the transaction
        assert t.select().read_all().equals(rows)
    with s.transaction() as tx:
        t = tx.bucket("bucket").schema("s").table("t")
        assert t.columns().equals(SCHEMA)  # metadata (VAST:sort_type) ignored by equals
        assert t.stats.num_rows == 40
        assert tx.bucket("bucket").schema("s").tablenames() == ["t"]
    assert _read(s).equals(rows)


def test_predicates_are_evaluated_on_the_server(sim):
    s = _connect(sim)
    rows = _rows(60)
    _setup(s, rows=rows)
    py = rows.to_pylist()
    big = ibis.literal(BIG + 5, "uint64")

    def sel(pred, cols=("name",)):
        out = _read(s, columns=list(cols), predicate=pred)
        return sorted(out["name"].to_pylist())

    def want(f):
        return sorted(r["name"] for r in py if f(r))

    assert sel(ibis._.scale == 1) == want(lambda r: r["scale"] == 1)
    assert sel(ibis._.morton >= big) == want(lambda r: r["morton"] >= BIG + 5)
    assert sel((ibis._.morton >= 10) & (ibis._.morton < 20)) == \
        want(lambda r: 10 <= r["morton"] < 20)
    assert sel((ibis._.scale == 2) & ibis._.morton.between(ibis.literal(BIG, "uint64"),
                                                           ibis.literal(BIG + 30, "uint64"))) \
        == want(lambda r: r["scale"] == 2 and BIG <= r["morton"] <= BIG + 30)
    assert sel((ibis._.z == -3) | (ibis._.z == -8) | (ibis._.z < -57)) == \
        want(lambda r: r["z"] in (-3, -8) or r["z"] < -57)
    ins = [4, BIG + 7, BIG + 9, 10**6]
    assert sel(ibis._.morton.isin([ibis.literal(v, "uint64") for v in ins])) == \
        want(lambda r: r["morton"] in ins)
    assert sel(ibis._.flag == True) == want(lambda r: r["flag"])  # noqa: E712
    assert sel(ibis._.name.startswith("n1")) == want(lambda r: r["name"].startswith("n1"))
    assert sel(ibis._.body == bytes([3]) * 3) == want(lambda r: r["body"] == b"\x03" * 3)
    # predicate-only columns are not returned; count(*) with columns=[]
    out = _read(s, columns=["labels"], predicate=ibis._["count"] > 300)
    assert out.column_names == ["labels"]
    assert out.num_rows == sum(r["count"] > 300 for r in py)
    assert sum(len(b) for b in _read(s, columns=[], predicate=ibis._.scale == 0).to_batches()) \
        == sum(r["scale"] == 0 for r in py)


def test_multi_split_paging_returns_every_row_once(sim):
    s = _connect(sim)
    rows = _rows(300)
    _setup(s, rows=rows)
    cfg = QueryConfig(num_splits=3, num_sub_splits=2, limit_rows_per_sub_split=7,
                      num_row_groups_per_sub_split=1)
    out = _read(s, columns=["name", "morton"], predicate=ibis._.scale != 2, config=cfg)
    want = rows.filter(pa.compute.not_equal(rows["scale"], 2)).select(["name", "morton"])
    assert out.sort_by("name").equals(want.sort_by("name"))
    # DuckDB scans the reader (transaction kept open while it pulls)
    with s.transaction() as tx:
        batches = tx.bucket("bucket").schema("s").table("t").select(columns=["scale"])  # noqa
        got = duckdb.connect().execute(
            "SELECT scale, count(*) FROM batches GROUP BY 1 ORDER BY 1").fetchall()
    assert got == [(0, 100), (1, 100), (2, 100)]


def test_isolation_and_rollback(sim):
    s = _connect(sim)
    _setup(s)
    with s.transaction() as tx1, s.transaction() as tx2:
        t1 = tx1.bucket("bucket").schema("s").table("t")
        t2 = tx2.bucket("bucket").schema("s").table("t")
        t1.insert(_rows(5))
        assert t1.select(columns=[]).read_all().num_rows == 5
        assert t2.select().read_all().num_rows == 0  # uncommitted rows are invisible
        t2.insert(_rows(3, start=100))
        assert sorted(t2.select(columns=["z"]).read_all()["z"].to_pylist()) == [-102, -101, -100]
    assert _read(s).num_rows == 8

    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            t = tx.bucket("bucket").schema("s").table("t")
            t.insert(_rows(10, start=500))
            tx.bucket("bucket").create_schema("doomed")
            raise RuntimeError("abort")  # SDK rolls back on exception
    assert _read(s).num_rows == 8
    with s.transaction() as tx:
        assert tx.bucket("bucket").schema("doomed", fail_if_missing=False) is None
    # DDL is invisible to others until commit
    with s.transaction() as tx1, s.transaction() as tx2:
        tx1.bucket("bucket").schema("s").create_table("fresh", SCHEMA)
        assert tx2.bucket("bucket").schema("s").table("fresh", fail_if_missing=False) is None


def test_update_and_delete_by_row_id(sim):
    s = _connect(sim)
    _setup(s, rows=_rows(10))
    with s.transaction() as tx:
        t = tx.bucket("bucket").schema("s").table("t")
        got = t.select(columns=["z"], predicate=ibis._.z > -3, internal_row_id=True).read_all()
        upd = pa.table({"$row_id": got["$row_id"], "name": ["A", "B", "C"]})
        t.update(upd)
        dead = t.select(columns=[], predicate=ibis._.z == -9, internal_row_id=True).read_all()
        t.delete(dead)
    out = _read(s, columns=["z", "name"])
    assert out.num_rows == 9
    assert out["name"].to_pylist()[:4] == ["A", "B", "C", "n3"]


def test_cell_limit_is_enforced_by_the_server(sim):
    s = _connect(sim)
    _setup(s)
    ok = _rows(1).set_column(5, "body", pa.array([b"x" * MAX_CELL_BYTES], pa.binary()))
    big = _rows(1).set_column(5, "body", pa.array([b"x" * 130_000], pa.binary()))
    biglist = _rows(1).set_column(7, "labels", pa.array([list(range(16_200))],
                                                        pa.list_(pa.uint64())))
    with s.transaction() as tx:
        tx.bucket("bucket").schema("s").table("t").insert(ok)
    for bad in (big, biglist):
        with pytest.raises(verr.BadRequest) as e:
            with s.transaction() as tx:
                tx.bucket("bucket").schema("s").table("t").insert(bad)
        assert "cell limit" in str(e.value)
    assert _read(s, columns=["scale"]).num_rows == 1


def test_request_body_limit(sim):
    s = _connect(sim)
    _setup(s)
    rows = _rows(60).set_column(5, "body", pa.array([b"y" * 100_000] * 60, pa.binary()))
    body = pa.ipc.new_stream  # noqa: F841 (documentation: the SDK's own serializer is used)
    from vastdb import util

    payload = util.serialize_record_batch(rows.to_batches()[0])
    assert len(payload) > 5 * 1024 * 1024
    with s.transaction() as tx:
        with pytest.raises(verr.BadRequest) as e:
            tx._rpc.api.insert_rows("bucket", "s", "t", payload, txid=tx.txid)
        assert "EntityTooLarge" in str(e.value)
        # the public API splits the same rows into < 5 MiB RPCs, which the server accepts
        tx.bucket("bucket").schema("s").table("t").insert(rows)
    assert _read(s, columns=["body"])["body"].to_pylist() == [b"y" * 100_000] * 60


def test_unsupported_types_rejected(sim):
    s = _connect(sim)
    with s.transaction() as tx:
        sch = tx.bucket("bucket").create_schema("s")
        with pytest.raises(verr.NotSupportedSchema):
            sch.create_table("bad", pa.schema([("d", pa.dictionary(pa.int32(), pa.string()))]))


def test_sorting_key_table(sim):
    s = _connect(sim)
    with s.transaction() as tx:
        t = tx.bucket("bucket").create_schema("s").create_table(
            "blocks", SCHEMA, sorting_key=["scale", "morton"])
        ids = t.insert(_rows(6))
        assert ids.type == pa.decimal128(38, 0)
    with s.transaction() as tx:
        t = tx.bucket("bucket").schema("s").table("blocks")
        assert t.sorted_table
        key = sorted((f.metadata[b"VAST:sort_index"], f.name) for f in t.columns()
                     if f.metadata[b"VAST:sort_type"] == b"Sorted")
        assert [name for _, name in key] == ["scale", "morton"]
        out = t.select(columns=["morton"], predicate=ibis._.scale == 1).read_all()
        assert out["morton"].to_pylist() == [BIG + 1, 4]
        # many estimated splits on a sorted table: the SDK first sends the row-group
        # estimation request (split id 4294967292), then one query per split
        cfg = QueryConfig(rows_per_split=1)
        out = t.select(columns=["morton"], predicate=ibis._.scale == 1, config=cfg).read_all()
        assert sorted(out["morton"].to_pylist()) == [4, BIG + 1]


def test_persistence_across_restart(tmp_path):
    d = tmp_path / "data"
    with start_vastsim(d) as sim:
        s = _connect(sim)
        _setup(s, rows=_rows(20))
        with s.transaction() as tx:  # updated + deleted rows must persist too
            t = tx.bucket("bucket").schema("s").table("t")
            rid = t.select(columns=[], predicate=ibis._.z == 0, internal_row_id=True).read_all()
            t.delete(rid)
    with start_vastsim(d) as sim:
        s = _connect(sim)
        out = _read(s)
        assert out.equals(_rows(20).slice(1))
        with s.transaction() as tx:  # new row ids continue after the old ones
            ids = tx.bucket("bucket").schema("s").table("t").insert(_rows(2))
            assert min(ids.to_pylist()) >= 20


def test_subprocess_kill_keeps_committed_drops_uncommitted(tmp_path):
    d = tmp_path / "data"
    proc = start_vastsim_process(d)
    try:
        s = _connect(proc)
        _setup(s, rows=_rows(7))
        tx = s.transaction()
        tx.__enter__()
        tx.bucket("bucket").schema("s").table("t").insert(_rows(5, start=50))
        proc.kill()  # SIGKILL with a transaction open
    finally:
        proc.stop()
    with start_vastsim_process(d) as proc2:
        s = _connect(proc2)
        assert _read(s).equals(_rows(7))


def test_eight_threads_parallel_transactions(sim):
    s0 = _connect(sim)
    _setup(s0)
    md = TableMetadata(TableRef("bucket", "s", "t"), arrow_schema=SCHEMA,
                       table_type=TableType.Regular)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            s = _connect(sim)  # one session per thread
            for k in range(4):
                with s.transaction() as tx:
                    tx.table_from_metadata(md).insert(_rows(25, start=(w * 4 + k) * 25))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sim.counters["POST rows"] == 32 and "PUT rows" not in sim.counters  # 1 RPC/insert
    out = _read(s0, columns=["name"])
    assert sorted(out["name"].to_pylist()) == sorted(f"n{i}" for i in range(800))


def test_fault_slowdown_is_retried_and_can_exhaust(sim):
    s = _connect(sim)
    _setup(s)
    sim.set_faults(slowdown_rate=0.5, seed=7)
    for k in range(4):
        with s.transaction() as tx:
            tx.bucket("bucket").schema("s").table("t").insert(_rows(5, start=k * 5))
    assert sim.counters.get("slowdown", 0) > 0
    sim.set_faults(slowdown_rate=1.0)
    impatient = _connect(sim, backoff_config=BackoffConfig(
        wait_gen=functools.partial(backoff.expo, factor=0.01), max_tries=2))
    with pytest.raises(verr.Slowdown):
        impatient.transaction().__enter__()
    sim.clear_faults()
    assert _read(s).num_rows == 20


def test_fault_dropped_connection_and_delay(sim):
    s = _connect(sim)
    _setup(s, rows=_rows(30))
    sim.set_faults(drop_rate=1.0, commands=("rows",))
    with pytest.raises(verr.ConnectionError) as e:  # a POST is never retried by the SDK
        with s.transaction() as tx:
            tx.bucket("bucket").schema("s").table("t").insert(_rows(1))
    assert e.value.may_retry is False
    assert sim.counters["dropped"] >= 1
    # a response cut mid-stream on select is resumed by the SDK without duplicates
    sim.set_faults(drop_rate=0.0, drop_after_apply_rate=0.5, commands=("data",), seed=3)
    cfg = QueryConfig(num_splits=1, num_sub_splits=1, limit_rows_per_sub_split=4)
    out = _read(s, columns=["name"], config=cfg)
    assert sorted(out["name"].to_pylist()) == sorted(f"n{i}" for i in range(30))
    assert sim.counters["dropped_after_apply"] >= 1
    # delayed responses hit the client's read timeout
    sim.set_faults(drop_after_apply_rate=0.0, delay_s=1.0, commands=("stats",))
    slow = _connect(sim, timeout=(5, 0.2), backoff_config=BackoffConfig(max_tries=1))
    with pytest.raises(Exception) as e:
        with slow.transaction() as tx:
            tx.bucket("bucket").schema("s").table("t")
    assert "timed out" in repr(e.value).lower() or "timeout" in repr(e.value).lower()
    sim.clear_faults()


def test_commit_conflict_knob(sim):
    s = _connect(sim)
    _setup(s)
    sim.set_faults(commit_conflict_rate=1.0, commands=("transaction",))
    with pytest.raises(verr.Conflict):
        with s.transaction() as tx:
            tx.bucket("bucket").schema("s").table("t").insert(_rows(3))
    sim.clear_faults()
    assert _read(s).num_rows == 0


def test_credentials_checked_when_configured(tmp_path):
    with start_vastsim(None, access_key="AK", secret_key="SK") as sim:
        assert sim.access_key == "AK"
        _connect(sim)
        with pytest.raises(verr.Forbidden):
            vastdb.connect(endpoint=sim.endpoint, access="wrong", secret="SK")
        with pytest.raises(verr.Forbidden):  # SigV4 signatures are verified
            vastdb.connect(endpoint=sim.endpoint, access="AK", secret="wrong")
        s = _connect(sim)  # signed requests with bodies, query params and nested paths
        _setup(s, rows=_rows(3))
        assert _read(s, columns=["name"], predicate=ibis._.z < 0).num_rows == 2


def test_abandoned_transaction_expires(tmp_path):
    with start_vastsim(None, tx_timeout_s=0.3) as sim:
        s = _connect(sim)
        dead = s.transaction()
        dead.__enter__()  # a client that dies mid-transaction holding a DDL change
        dead.bucket("bucket").create_schema("s")
        with pytest.raises(verr.Conflict):
            with s.transaction() as tx:
                tx.bucket("bucket").create_schema("s")
        import time

        time.sleep(0.5)
        with s.transaction() as tx:  # the abandoned transaction was rolled back
            tx.bucket("bucket").create_schema("s")
        with pytest.raises(verr.NotFound):  # ... and is gone for its owner too
            dead.__exit__(None, None, None)


def test_lost_commit_response_is_applied(sim):
    """The case the sink's ledger must resolve: commit applied, client told nothing."""
    s = _connect(sim)
    _setup(s)
    sim.set_faults(drop_after_apply_rate=1.0, commands=("PUT transaction",))
    with pytest.raises(verr.ConnectionError) as e:
        with s.transaction() as tx:
            tx.bucket("bucket").schema("s").table("t").insert(_rows(4))
    assert e.value.may_retry is False
    sim.clear_faults()
    assert _read(s).equals(_rows(4))


def test_random_predicates_match_local_evaluation(sim):
    """Differential check: AND-of-ORs predicates evaluated by vastsim vs. by pyarrow here."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s = _connect(sim)
    rows = _rows(120)
    _setup(s, rows=rows)
    with s.transaction() as tx:  # nulls must never match a comparison
        tx.bucket("bucket").schema("s").table("t").insert(
            pa.table({"z": pa.array([None], pa.int32()), "name": [None]}))
    local = _read(s, columns=["name", "z", "morton", "scale"])
    ops = ["==", "!=", "<", "<=", ">", ">="]
    mortons = [0, 5, 60, BIG, BIG + 1, BIG + 61, 2**64 - 1]
    conds = st.one_of(
        st.tuples(st.just("z"), st.sampled_from(ops), st.integers(-130, 5)),
        st.tuples(st.just("morton"), st.sampled_from(ops), st.sampled_from(mortons)),
        st.tuples(st.just("scale"), st.sampled_from(ops), st.integers(0, 3)),
        st.tuples(st.just("name"), st.sampled_from(ops), st.sampled_from(["n1", "n55", "x"])),
    )
    types = {"z": "int32", "morton": "uint64", "scale": "uint8", "name": "string"}

    def ibis_cond(col, op, v):
        c, lit = ibis._[col], ibis.literal(v, types[col])
        return {"==": c == lit, "!=": c != lit, "<": c < lit, "<=": c <= lit, ">": c > lit,
                ">=": c >= lit}[op]

    def py_cond(r, col, op, v):
        x = r[col]
        if x is None:
            return False
        return {"==": x == v, "!=": x != v, "<": x < v, "<=": x <= v, ">": x > v,
                ">=": x >= v}[op]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(conds, min_size=1, max_size=3), min_size=1, max_size=3))
    def check(terms):
        # one OR-term per column (the SDK's allowed shape): keep the first term per column
        by_col: dict[str, list] = {}
        for term in terms:
            col = term[0][0]
            by_col.setdefault(col, [c for c in term if c[0] == col])
        pred = None
        for conds_ in by_col.values():
            ors = functools.reduce(lambda a, b: a | b, [ibis_cond(*c) for c in conds_])
            pred = ors if pred is None else pred & ors
        got = sorted(map(str, _read(s, columns=["name"], predicate=pred)["name"].to_pylist()))
        want = sorted(str(r["name"]) for r in local.to_pylist()
                      if all(any(py_cond(r, *c) for c in cs) for cs in by_col.values()))
        assert got == want, (by_col, got[:5], want[:5])

    check()
