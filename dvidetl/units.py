"""Sizes and counts as users type them: one parser for every size option and URL key.

Why one parser: ``--worker-memory 4`` used to mean four *bytes* to Dask, and a worker that
can hold nothing restart-looped for minutes. Here a byte size either carries a unit
(``4GiB``, ``512MB``, ``1.5G``) or the option documents its default unit (``--cell-limit``:
bytes), and every message names the option and shows a valid example.
"""

from __future__ import annotations

import re

from dvidetl.errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
#: the largest count or size any option takes: beyond it numpy's int64 arithmetic overflows
MAX_VALUE = 2**62


def parse_size(text: str, what: str, *, default_unit: str | None = None, lo: int = 0,
               hi: int = MAX_VALUE) -> int:
    """Bytes from ``4GiB`` / ``512MB`` / ``1.5G`` / ``129024``.

    A bare number is in ``default_unit`` (``"B"``, ``"MiB"``, ...); without one a bare number
    is refused, because it is ambiguous (``4`` meant 4 GiB to the user and 4 bytes to Dask).
    ``UserError`` naming ``what`` (the option or URL key) for anything else."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{what} {text!r}: expected a size such as 4GiB, 512MiB or 2GB")
    num = float(m.group(1).replace("_", "").replace(",", ""))
    if not unit:
        if default_unit is None:
            raise UserError(f"{what} {text!r}: give a unit, e.g. {m.group(1)}GiB or {m.group(1)}MiB "
                            "(a bare number is ambiguous)")
        unit = default_unit.lower()
    value = int(num * _UNITS[unit])
    if not lo <= value <= hi:
        raise UserError(f"{what} {text!r}: must be between {format_size(lo)} and {format_size(hi)}")
    return value


def parse_count(text: str, what: str, *, lo: int = 1, hi: int = MAX_VALUE) -> int:
    """A whole number of things (blocks, rows): ``4096``, ``2,000,000``, ``2_000_000``,
    ``2M``, ``500k`` (decimal suffixes), between ``lo`` and ``hi``."""
    s = str(text).strip().replace("_", "").replace(",", "")
    suffix = s[-1:].lower() if s[-1:].isalpha() else ""
    try:
        if suffix not in _COUNT_SUFFIX:
            raise ValueError
        num = float(s[: len(s) - len(suffix)]) * _COUNT_SUFFIX[suffix]
        if num != int(num):
            raise ValueError
        value = int(num)
    except (ValueError, OverflowError):
        raise UserError(f"{what} {text!r}: expected a whole number such as 4096 or 2M") from None
    if value < lo:
        raise UserError(f"{what} must be at least {lo:,} (got {text})")
    if value > hi:
        raise UserError(f"{what} must be at most {hi:,} (got {text})")
    return value


def format_size(n: float) -> str:
    """Bytes as the largest binary unit that keeps the number >= 1 (``2.0 GiB``)."""
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["parse_size", "parse_count", "format_size", "MAX_VALUE"]
