"""Older on-disk layouts of a Parquet export, made from today's, for the tests that check an
export written by an earlier dvidetl still reads (the sink keeps reading them: users keep
their exports across upgrades)."""

from __future__ import annotations

from pathlib import Path

from dvidetl.tables import schema as S


def to_layout_1(root: Path) -> None:
    """The export under ``root`` (one instance@uuid's directory) in layout 1, as written
    before ``layout.json``: ``scale=<s>`` and ``run=<id>`` directories, no layout file."""
    (root / "layout.json").unlink()
    for table in S.SCALED_TABLES:
        for d in sorted((root / table).glob("scale-*")):
            d.rename(d.with_name("scale=" + d.name[len("scale-"):]))
    for d in sorted((root / "export_ledger").iterdir()):
        d.rename(d.with_name("run=" + d.name))
