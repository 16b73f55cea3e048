"""The options in a source or sink URL's query string, parsed one way for every scheme.

Why one parser: a URL is where users put most options, and a typo must never silently mean
"default". So every scheme gets the same rules and messages: only known keys, each given
once and non-empty (keys declared ``multi`` may repeat), numbers in range, choices from a
list — and every error names the URL and the key.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import overload
from urllib.parse import parse_qs, urlsplit

from dvidetl.errors import UserError
from dvidetl.redact import redact


class Query:
    """The query of ``url`` checked against ``known`` keys; typed getters with defaults."""

    def __init__(self, url: str, known: Iterable[str], *, multi: Iterable[str] = (),
                 query: str | None = None) -> None:
        self.url = url
        self.known = tuple(known)
        multi = set(multi)
        text = urlsplit(url).query if query is None else query
        try:
            q = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            raise UserError(f"{url!r}: cannot parse the query {text!r} (use key=value&key=value)") from None
        unknown = sorted(set(q) - set(self.known))
        if unknown:
            raise UserError(f"{url!r}: unknown parameter(s) {unknown} (known: {', '.join(self.known)})")
        for k, v in q.items():
            if k not in multi and (len(v) != 1 or not v[0]):
                raise UserError(f"{url!r}: parameter {k!r} must be given once, non-empty")
        self._q = q

    def __contains__(self, key: str) -> bool:
        return key in self._q

    @overload
    def str(self, key: builtins.str, default: builtins.str) -> builtins.str: ...

    @overload
    def str(self, key: builtins.str, default: None = None) -> builtins.str | None: ...

    def str(self, key: builtins.str, default: builtins.str | None = None) -> builtins.str | None:
        return self._q[key][-1] if key in self._q else default

    def all(self, key: builtins.str) -> list[builtins.str]:
        """Every value of a ``multi`` key, in order."""
        return list(self._q.get(key, []))

    def _num(self, key: builtins.str, conv, default, lo, hi, what: builtins.str):
        if key not in self._q:
            return default
        raw = self._q[key][-1]
        try:
            v = conv(raw)
        except ValueError:
            raise UserError(f"{self.url!r}: parameter {key}={raw!r} is not {what}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise UserError(f"{self.url!r}: parameter {key}={v} out of range [{lo}, {hi}]")
        return v

    def int(self, key: builtins.str, default=None, lo: int | None = None, hi: int | None = None):
        return self._num(key, int, default, lo, hi, "an integer")

    def float(self, key: builtins.str, default=None, lo: float | None = None, hi: float | None = None):
        return self._num(key, float, default, lo, hi, "a number")

    def bool(self, key: builtins.str, default: bool = False) -> bool:
        if key not in self._q:
            return default
        v = self._q[key][-1].lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{self.url!r}: parameter {key}={v!r} must be true or false")

    def choice(self, key: builtins.str, allowed: Iterable[builtins.str], default: builtins.str | None = None) -> builtins.str:
        allowed = tuple(allowed)
        v = self._q[key][-1] if key in self._q else (default if default is not None else allowed[0])
        if v not in allowed:
            raise UserError(f"{self.url!r}: parameter {key}={v!r} must be one of {', '.join(allowed)}")
        return v


__all__ = ["Query"]


def redact_url(url: str) -> str:
    """``url`` fit to store and print: a password in the authority and the values of
    secret-looking query keys replaced by ``***`` — ``dvidetl.redact.redact``, the one
    redaction helper (kept under this name for the run records)."""

    return redact(url)
