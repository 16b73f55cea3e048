"""Run VAST's own SDK integration tests (shipped in the vastdb wheel) against vastsim.

Why: vastsim is only useful if it behaves like a real cluster. The best independent judge
here is the test suite VAST wrote for its SDK (`vastdb/tests/`), which nobody on this project
wrote. This runner starts a fresh vastsim in a child process, runs the in-scope tests through
pytest with a replacement for the wheel's conftest (which needs boto3 and a real cluster's
credentials), prints passed/failed per test, and lists the out-of-scope tests and why.

    python -m dvidetl.testing.conformance [-k EXPR] [-x] [--keep]
    make vast-conformance

Exit status: 0 when every in-scope test passed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest

# Imports inside functions load vastdb, ibis, Parquet, protobuf, ssl, NumPy/Arrow only where used:
# importing this module must not (CLI start-up, processes that never call them). Those in try/if/with blocks are optional or conditional.

# Whole modules that exercise features vastsim does not implement.
OUT_OF_SCOPE_MODULES: dict[str, str] = {
    "test_imports.py": "server-side Parquet import from S3 objects (needs an S3 object store)",
    "test_projections.py": "semi-sorted projections (a VAST storage feature, not used by dvidetl)",
    "test_blob_expansion.py": "blob expansion sub-tables (5.5 feature, not used by dvidetl)",
    "test_vector_index.py": "vector indexes (not used by dvidetl)",
    "test_vector_search.py": "vector search through the ADBC query engine",
    "test_adbc_integration.py": "needs the ADBC driver and VAST's SQL query engine",
}

# Single tests out of scope inside otherwise in-scope modules.
OUT_OF_SCOPE_TESTS: dict[str, str] = {
    "test_table_in_tx.py::test_projections": "semi-sorted projections (not used by dvidetl)",
    "test_schemas.py::test_list_snapshots": "S3 snapshots (needs boto3 + the S3 object API)",
    "test_tables.py::test_catalog_select": "VAST catalog (a system table of the whole cluster)",
    "test_tables.py::test_catalog_snapshots_select": "VAST catalog snapshots",
    "test_tables.py::test_audit_log_select": "VAST audit log (a system table)",
    "test_tables.py::test_elysium_splits": "sleeps 300 s waiting for background sorting "
                                           "(vastsim sorts nothing in the background)",
    "test_duckdb.py::test_duckdb": "the test calls DuckDBPyConnection.arrow(), which the "
                                   "installed duckdb no longer has (client-side API drift; "
                                   "tests/test_vastsim.py runs DuckDB over a select reader)",
}

IN_SCOPE_MODULES = [
    "test_sanity.py", "test_schemas.py", "test_tables.py", "test_table_in_tx.py",
    "test_nested.py", "test_fixed_list.py", "test_duckdb.py", "test_configs.py",
    "test_util.py", "test_ibis_utils.py", "test_by_column_inserter.py",
]

BUCKET = "vastdb"


class _Check:
    """The few pytest-check helpers the wheel's tests use, as plain asserts."""

    @staticmethod
    def greater(a, b, msg=""):
        assert a > b, msg

    @staticmethod
    def is_true(x, msg=""):
        assert x, msg

    @staticmethod
    def equal(a, b, msg=""):
        assert a == b, msg


class _Plugin:
    """Replaces vastdb/conftest.py: same options and fixtures, no boto3, no real cluster."""

    def __init__(self, endpoint: str, access: str, secret: str):
        self.endpoint, self.access, self.secret = endpoint, access, secret
        self.results: dict[str, str] = {}

    def pytest_addoption(self, parser):
        parser.addoption("--tabular-bucket-name", default=BUCKET)
        parser.addoption("--tabular-access-key", default=self.access)
        parser.addoption("--tabular-secret-key", default=self.secret)
        parser.addoption("--tabular-endpoint-url", default=[], action="append")
        parser.addoption("--data-path", default=None)
        parser.addoption("--crater-path", default=None)
        parser.addoption("--schema-name", default=None)
        parser.addoption("--table-name", default=None)
        parser.addoption("--num-workers", default=1)

    @pytest.fixture(scope="session")
    def tabular_endpoint_urls(self, request):
        return request.config.getoption("--tabular-endpoint-url") or [self.endpoint]

    @pytest.fixture(scope="session")
    def session_kwargs(self, request, tabular_endpoint_urls):
        return dict(access=request.config.getoption("--tabular-access-key"),
                    secret=request.config.getoption("--tabular-secret-key"),
                    endpoint=tabular_endpoint_urls[0])

    @pytest.fixture(scope="session")
    def session_provider(self, request, tabular_endpoint_urls):
        from vastdb.session import Session

        def provider(session_config):
            return Session(access=request.config.getoption("--tabular-access-key"),
                           secret=request.config.getoption("--tabular-secret-key"),
                           endpoint=tabular_endpoint_urls[0], config=session_config)
        return provider

    @pytest.fixture(scope="session")
    def session(self, session_kwargs):
        import vastdb

        return vastdb.connect(**session_kwargs)

    @pytest.fixture(scope="session")
    def num_workers(self, request):
        return int(request.config.getoption("--num-workers"))

    @pytest.fixture(scope="session")
    def test_bucket_name(self, request):
        return request.config.getoption("--tabular-bucket-name")

    @pytest.fixture(scope="function")
    def clean_bucket_name(self, request, test_bucket_name, session):
        import vastdb.errors

        def iter_schemas(schema):
            for child in schema.schemas():
                yield from iter_schemas(child)
            yield schema

        with session.transaction() as tx:
            b = tx.bucket(test_bucket_name)
            for top in b.schemas():
                for s in iter_schemas(top):
                    for t_name in s.tablenames():
                        try:
                            t = s.table(t_name)
                            if t is not None:
                                t.drop()
                        except vastdb.errors.NotSupportedSchema:
                            tx._rpc.api.drop_table(b.name, s.name, t_name, txid=tx.txid)
                    s.drop()
        return test_bucket_name

    @pytest.fixture(scope="function")
    def check(self):
        """Stand-in for the pytest-check plugin's `check` fixture (not installed here)."""
        return _Check()

    @pytest.fixture(scope="session")
    def s3(self):
        pytest.skip("boto3/S3 object API is not part of vastsim")

    @pytest.fixture(scope="function")
    def parquets_path(self, request):
        return Path(request.config.getoption("--data-path") or tempfile.gettempdir())

    @pytest.fixture(scope="function")
    def crater_path(self, request):
        return request.config.getoption("--crater-path")

    @pytest.fixture(scope="function")
    def schema_name(self, request):
        return request.config.getoption("--schema-name")

    @pytest.fixture(scope="function")
    def table_name(self, request):
        return request.config.getoption("--table-name")

    @pytest.fixture(scope="function")
    def perf_metrics_db(self, crater_path):
        return sqlite3.connect(f"{crater_path}/metrics.sqlite" if crater_path else ":memory:")

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            key = f"{os.path.basename(item.location[0])}::{item.name.split('[')[0]}"
            (drop if key in OUT_OF_SCOPE_TESTS else keep).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report):
        nodeid = os.path.basename(report.location[0]) + "::" + report.location[2]
        if report.when == "call" or report.outcome != "passed":
            prev = self.results.get(nodeid)
            if prev in ("failed", "error"):
                return
            outcome = report.outcome
            if report.when != "call" and outcome == "failed":
                outcome = "error"
            self.results[nodeid] = outcome


def tests_dir() -> Path:
    import vastdb

    return Path(vastdb.__file__).parent / "tests"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dvidetl.testing.conformance",
                                description=__doc__.splitlines()[0])
    p.add_argument("-k", default=None, help="pytest -k expression (subset of in-scope tests)")
    p.add_argument("-x", action="store_true", help="stop at the first failure")
    p.add_argument("-v", action="store_true", help="pytest output (tracebacks)")
    p.add_argument("--keep", action="store_true", help="keep the server's data directory")
    a = p.parse_args(argv)

    from dvidetl.testing.vastsim import VastSimProcess

    tdir = tests_dir()
    work = Path(tempfile.mkdtemp(prefix="vastsim-conformance-"))
    (work / "pytest.ini").write_text("[pytest]\n")
    access, secret = "vastsim-conformance", "vastsim-conformance-secret"
    server = VastSimProcess(work / "data", 0, access_key=access, secret_key=secret,
                            extra_args=["--bucket", BUCKET])
    plugin = _Plugin(server.endpoint, access, secret)
    args = [str(tdir / m) for m in IN_SCOPE_MODULES] + [
        "--noconftest", "-c", str(work / "pytest.ini"), "--rootdir", str(work),
        "-p", "no:cacheprovider", "-p", "no:randomly", "--timeout=300",
        "-q" if not a.v else "-v", "--tb=short" if a.v else "--tb=no", "-rN", "--durations=15",
    ]
    if a.k:
        args += ["-k", a.k]
    if a.x:
        args.append("-x")
    print(f"vastsim conformance: server {server.endpoint}, tests from {tdir}", flush=True)
    try:
        old = os.getcwd()
        os.chdir(work)
        try:
            pytest.main(args, plugins=[plugin])
        finally:
            os.chdir(old)
    finally:
        server.stop()
        if not a.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    res = plugin.results
    passed = sorted(k for k, v in res.items() if v == "passed")
    failed = sorted(k for k, v in res.items() if v in ("failed", "error"))
    skipped = sorted(k for k, v in res.items() if v == "skipped")
    print("\n=== vastsim conformance (vastdb wheel tests) ===")
    for k in passed:
        print(f"PASS  {k}")
    for k in skipped:
        print(f"SKIP  {k}")
    for k in failed:
        print(f"FAIL  {k}")
    print("\nOut of scope (not run):")
    for m, why in OUT_OF_SCOPE_MODULES.items():
        print(f"  {m}: {why}")
    for t, why in OUT_OF_SCOPE_TESTS.items():
        print(f"  {t}: {why}")
    per: dict[str, list[int]] = {}
    for k, v in res.items():
        row = per.setdefault(k.split("::")[0], [0, 0, 0])
        row[0 if v == "passed" else 1 if v in ("failed", "error") else 2] += 1
    print("\nper module (passed/failed/skipped):")
    for mod, (p_, f_, s_) in sorted(per.items()):
        print(f"  {mod:32s} {p_:4d} {f_:4d} {s_:4d}")
    print(f"\npassed {len(passed)}, failed {len(failed)}, skipped {len(skipped)}")
    return 0 if not failed and passed else 1


if __name__ == "__main__":
    sys.exit(main())
