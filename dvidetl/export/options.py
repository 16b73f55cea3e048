"""The options of an export run: ``RunOptions``, frozen and validated when made, stored with
the run (``RunInfo.options``) so a resumed run, its workers and its readers use exactly
what it was planned with.

The same object whether it comes from the command line (``dvidetl run`` builds it from its
flags) or from a program (``dvidetl.export(source, sink, RunOptions(...))``); a bad value is
a one-line ``UserError`` naming the flag. Records written before options were typed load
with :meth:`RunOptions.from_dict` (missing keys take today's defaults, unknown keys are
kept out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dvidetl.errors import UserError
from dvidetl.tables.cells import check_cell_limit
from dvidetl.tables.schema import DEFAULT_CELL_LIMIT


def _positive(v: int | None, flag: str) -> None:
    if v is not None and (type(v) is not int or v < 1):
        raise UserError(f"{flag} must be at least 1 (got {v})")


@dataclass(frozen=True)
class RunOptions:
    """What an export run does (every field has the CLI's default)."""

    #: scales to export (None: every scale the source has)
    scales: tuple[int, ...] | None = None
    #: blocks per blocks partition (None: 4096, less for small volumes)
    partition_blocks: int | None = None
    #: label_index rows per indices partition / pairs per mapping partition (None: auto)
    index_partition_rows: int | None = None
    mapping_partition_rows: int | None = None
    #: bytes a binary or list cell may hold in a tabular sink (the one cell-limit knob)
    cell_limit: int = DEFAULT_CELL_LIMIT
    #: zstd level of the block payloads
    zstd_level: int = 3
    #: export the label indices / the mapping
    indices: bool = True
    mapping: bool = True
    #: stop submitting after more than this many corrupt blocks (None: never)
    max_errors: int | None = None
    #: retries per failed partition
    retries: int = 3
    #: replace a finished export (staged until the new run finishes)
    overwrite: bool = False
    #: export a DVID node that is not locked
    allow_unlocked: bool = False
    #: deadline of each planning call (None: 60 s plus 20 ms per block counted)
    plan_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.scales is not None:
            try:
                scales = tuple(sorted({int(s) for s in self.scales}))
            except (TypeError, ValueError):
                raise UserError(f"--scales {self.scales!r}: expected scale numbers, e.g. 0,1") from None
            object.__setattr__(self, "scales", scales)
        for name in ("partition_blocks", "index_partition_rows", "mapping_partition_rows"):
            _positive(getattr(self, name), f"--{name.replace('_', '-')}")
        check_cell_limit(self.cell_limit)
        if type(self.zstd_level) is not int or not -7 <= self.zstd_level <= 22:
            raise UserError(f"--zstd-level must be -7..22 (got {self.zstd_level})")
        if self.max_errors is not None and (type(self.max_errors) is not int or self.max_errors < 0):
            raise UserError(f"--max-errors must be 0 or more (got {self.max_errors})")
        if type(self.retries) is not int or self.retries < 0:
            raise UserError(f"--retries must be 0 or more (got {self.retries})")
        if self.plan_timeout is not None and not self.plan_timeout > 0:
            raise UserError(f"--plan-timeout must be more than 0 seconds (got {self.plan_timeout})")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with the run."""
        d = asdict(self)
        d["scales"] = None if self.scales is None else list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RunOptions:
        """Options as a run record stores them; a record from before a field existed gets
        its default (older records must still load)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in dict(d or {}).items() if k in names and v is not None}
        if "cell_limit" in kw:
            kw["cell_limit"] = int(kw["cell_limit"])
        return cls(**kw)
