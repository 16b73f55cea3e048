"""Fixtures of the fault suite and the table `make faults` prints at the end."""

from __future__ import annotations

import pytest

from ._support import ROWS

#: a small multi-scale volume (~200 blocks): enough partitions to fail some mid-run
VOLUME = "size=512,512,256&scales=2&seed=9"
#: VastDB keys of the local wire-compatible server; workers get them from the environment
VAST_ACCESS, VAST_SECRET = "AKFAULTS", "faults-secret-key-0b5e"  # noqa: S105 — test keys


@pytest.fixture(scope="session")
def cluster():
    """A real LocalCluster (worker processes under nannies) shared by the fault tests;
    yields the cluster itself (tests that kill workers need its client)."""
    import os

    from distributed import LocalCluster

    # VastDB credentials only through the environment, set before the workers start
    os.environ.setdefault("VASTDB_ACCESS_KEY", VAST_ACCESS)
    os.environ.setdefault("VASTDB_SECRET_KEY", VAST_SECRET)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c:
        yield c


@pytest.fixture
def nodeid(request) -> str:
    return request.node.nodeid


_OUTCOMES: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if "faults" in item.nodeid and (rep.when == "call" or rep.failed):
        prev = _OUTCOMES.get(item.nodeid)
        if prev != "FAIL":
            _OUTCOMES[item.nodeid] = (
                "XFAIL" if hasattr(rep, "wasxfail") and rep.skipped
                else "PASS" if rep.passed else "SKIP" if rep.skipped else "FAIL")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _OUTCOMES:
        return
    tr = terminalreporter
    head = ("fault", "runs", "blocks expected", "blocks found", "duplicates",
            "errors reported", "verify", "result")
    rows = []
    for nid, res in _OUTCOMES.items():
        r = ROWS.get(nid)
        name = nid.split("::", 1)[-1]
        if r is None and res in ("PASS", "SKIP"):
            continue  # not a fault run (e.g. a corpus unit test)
        if r is None:
            rows.append((name, "-", "-", "-", "-", "-", "-", res))
        else:
            rows.append((r["fault"], r["runs"], r["expected"], r["found"], r["duplicates"],
                         r["errors"], r["verify"], res))
    if not rows:
        return
    tr.section("fault injection")
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda r: "  ".join(str(v).ljust(w[i]) if i == 0 else str(v).rjust(w[i])  # noqa: E731
                                for i, v in enumerate(r))
    tr.write_line(line(head))
    tr.write_line("  ".join("-" * n for n in w))
    for r in rows:
        tr.write_line(line(r))
