"""Retries in one place: a backoff policy and the loop that applies it.

Every layer retries something — a Flight call, a DVID GET, a VastDB transaction, a sink write —
and each has its own idea of what is worth retrying, but not of *how*: the attempts, the
doubling, the cap and the jitter are a `Backoff`, and `retry` is the one loop that spends it.
Loops that cannot be a plain call (a stream resumed after its delivered rows, DVID's throttle
that does not count against the budget) still take their pauses from a `Backoff`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dvidetl.errors import first_line

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """How often to try and how long to wait between tries.

    ``tries`` counts every attempt (the first one too). Retry ``n`` (1-based) waits
    ``min(cap, base * 2**(n-1))`` scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``:
    ``jitter=0`` waits exactly, ``0.5`` spreads workers that failed together over ±50 %,
    ``1.0`` is "full jitter" (anywhere from nothing to twice the step).
    """

    tries: int
    base: float
    cap: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"Backoff needs at least one try, got tries={self.tries}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Backoff jitter must be within [0, 1], got {self.jitter}")

    def step(self, retry: int) -> float:
        """The wait before retry ``retry`` without jitter."""
        return min(self.cap, self.base * 2.0 ** min(max(retry - 1, 0), 60))

    def delay(self, retry: int) -> float:
        """The wait before retry ``retry``, jittered."""
        d = self.step(retry)
        return d * (1.0 - self.jitter + 2.0 * self.jitter * random.random()) if self.jitter else d

    def pause(self, retry: int) -> None:
        time.sleep(self.delay(retry))


def retry(
    fn: Callable[[], T],
    policy: Backoff,
    *,
    retryable: Callable[[BaseException], bool],
    what: str,
    exhausted: Callable[[int, BaseException], BaseException] | None = None,
    describe: Callable[[BaseException], str] = first_line,
    logger: logging.Logger = log,
    level: int = logging.INFO,
) -> T:
    """``fn()``, called again after each error ``retryable`` accepts, up to ``policy.tries``
    attempts. Only for work that is safe to repeat (reads, connects, whole transactions,
    idempotent writes).

    ``retryable`` may raise instead of answering, to turn an error into a clearer one. An error it
    refuses is raised unchanged; the last retryable one is raised unchanged too, or as
    ``exhausted(attempts, exc)`` when given (chained to the original).
    """
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 — classified by ``retryable``
            if not retryable(exc):
                raise
            if attempt == policy.tries:
                if exhausted is None:
                    raise
                raise exhausted(attempt, exc) from exc
            wait = policy.delay(attempt)
            logger.log(level, "%s: %s; retry %d/%d in %.2f s",
                       what, describe(exc), attempt, policy.tries - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
