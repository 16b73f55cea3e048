"""The one retry loop and backoff policy every layer uses (dvidetl/retry.py)."""

from __future__ import annotations

import logging

import pytest

from dvidetl import retry as R
from dvidetl.retry import Backoff, retry


@pytest.fixture
def no_sleep(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(R.time, "sleep", waits.append)
    return waits


def test_steps_double_up_to_the_cap():
    b = Backoff(tries=10, base=0.25, cap=3.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.step(10_000) == 3.0  # no overflow far past the cap


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
def test_jitter_stays_within_its_band(jitter):
    b = Backoff(tries=3, base=1.0, cap=100.0, jitter=jitter)
    waits = [b.delay(3) for _ in range(2000)]  # step 4.0
    assert min(waits) >= 4.0 * (1 - jitter) and max(waits) <= 4.0 * (1 + jitter)
    assert max(waits) - min(waits) > 4.0 * jitter  # it does spread (2000 draws)


@pytest.mark.parametrize("kw", [dict(tries=0), dict(tries=2, jitter=1.5)])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ValueError):
        Backoff(base=0.1, **kw)


def test_retry_until_success_logs_each_retry(no_sleep, caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(f"boom {len(calls)}\nsecond line")
        return "ok"

    with caplog.at_level(logging.INFO, logger="dvidetl.retry"):
        got = retry(flaky, Backoff(tries=5, base=0.1, jitter=0.0), retryable=lambda e: True, what="read x")
    assert got == "ok" and len(calls) == 3
    assert no_sleep == [0.1, 0.2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["read x: boom 1; retry 1/4 in 0.10 s", "read x: boom 2; retry 2/4 in 0.20 s"]


def test_refused_error_is_raised_at_once(no_sleep):
    calls = []

    def bad():
        calls.append(1)
        raise KeyError("not transient")

    with pytest.raises(KeyError):
        retry(bad, Backoff(tries=5, base=0.1), retryable=lambda e: isinstance(e, OSError), what="x")
    assert len(calls) == 1 and no_sleep == []


def test_exhausted_budget_raises_the_last_error_or_its_translation(no_sleep):
    def down():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        retry(down, Backoff(tries=3, base=0.1), retryable=lambda e: True, what="x")
    assert len(no_sleep) == 2  # three tries, two pauses

    with pytest.raises(RuntimeError, match="gave up after 3") as ei:
        retry(down, Backoff(tries=3, base=0.1), retryable=lambda e: True, what="x",
              exhausted=lambda n, e: RuntimeError(f"gave up after {n}: {e}"))
    assert isinstance(ei.value.__cause__, ConnectionError)


def test_classifier_may_translate_the_error(no_sleep):
    def forbidden():
        raise PermissionError("403")

    def classify(exc):
        raise ValueError("check the credentials") from None

    with pytest.raises(ValueError, match="credentials"):
        retry(forbidden, Backoff(tries=4, base=0.1), retryable=classify, what="x")
    assert no_sleep == []


def test_first_line_of_long_and_empty_errors():
    from dvidetl.errors import first_line

    assert first_line(OSError("line one\nline two")) == "line one"
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
    assert first_line(TimeoutError()) == "TimeoutError"  # an empty message still says something
